"""Generation with the KV cache: greedy vs transformers' generate, eos handling, sampling laws."""

import numpy as np
import pytest
import torch
import transformers
from scipy import stats

from jlora import ConfigError, DataError
from jlora.generate import generate
from jlora.models.llama import llama_forward
from jlora.models.llama_io import load_llama

VOCAB = 37


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
      pad_token_id=0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  folder = tmp_path_factory.mktemp("tiny-gen")
  model.save_pretrained(folder)
  config, params = load_llama(folder)
  return model, config, params


PROMPTS = [[1, 5, 9, 3], [1, 7], [1, 4, 4, 4, 4, 4, 8, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


def test_greedy_matches_transformers_generate(tiny):
  model, config, params = tiny
  ours = generate(params, config, PROMPTS, max_new_tokens=12, eos_token_ids=())
  assert ours.shape == (3, 12) and ours.dtype == np.int32
  for prompt, row in zip(PROMPTS, ours):
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(row, ref[0, len(prompt):].numpy())


def test_array_prompts_with_padding_equal_list_prompts(tiny):
  _, config, params = tiny
  width = max(map(len, PROMPTS)) + 2
  arr = np.zeros((3, width), np.int32)
  mask = np.zeros((3, width), np.int32)
  for i, p in enumerate(PROMPTS):  # right padding here; generate re-pads on the left
    arr[i, :len(p)] = p
    mask[i, :len(p)] = 1
  a = generate(params, config, arr, attention_mask=mask, max_new_tokens=6, eos_token_ids=())
  b = generate(params, config, PROMPTS, max_new_tokens=6, eos_token_ids=())
  np.testing.assert_array_equal(a, b)


def test_eos_stops_row_and_pads(tiny):
  _, config, params = tiny
  free = generate(params, config, PROMPTS[:1], max_new_tokens=8, eos_token_ids=())[0]
  k = next(i for i in range(1, 8) if free[i] not in free[:i])  # first fresh token after step 0
  stop = int(free[k])
  out = generate(params, config, PROMPTS[:1], max_new_tokens=8, eos_token_ids=(stop,),
                 pad_token_id=-1)[0]
  np.testing.assert_array_equal(out[:k + 1], free[:k + 1])
  assert (out[k + 1:] == -1).all()


def _first_token_probs(params, config, prompt, temperature):
  logits = np.asarray(llama_forward(params, np.array([prompt]), config))[0, -1] / temperature
  p = np.exp(logits - logits.max())
  return p / p.sum()


def _chi2_pvalue(counts, probs):
  n = counts.sum()
  expected = probs * n
  big = expected >= 5  # pool the rare categories into one bin
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


@pytest.fixture(scope="module")
def many(tiny):
  _, config, params = tiny
  prompt = PROMPTS[0]
  return prompt, [prompt] * 3000


def test_temperature_sampling_follows_softmax(tiny, many):
  _, config, params = tiny
  prompt, batch = many
  out = generate(params, config, batch, max_new_tokens=1, temperature=0.5, seed=3,
                 eos_token_ids=())
  counts = np.bincount(out[:, 0], minlength=VOCAB)
  assert _chi2_pvalue(counts, _first_token_probs(params, config, prompt, 0.5)) > 1e-3
  # the test can tell temperatures apart: the same counts reject temperature 1.0
  assert _chi2_pvalue(counts, _first_token_probs(params, config, prompt, 1.0)) < 1e-6
  again = generate(params, config, batch, max_new_tokens=1, temperature=0.5, seed=3,
                   eos_token_ids=())
  other = generate(params, config, batch, max_new_tokens=1, temperature=0.5, seed=4,
                   eos_token_ids=())
  np.testing.assert_array_equal(again, out)
  assert (again != other).any()


def test_top_k_and_top_p_restrict_the_support(tiny, many):
  _, config, params = tiny
  prompt, batch = many
  probs = _first_token_probs(params, config, prompt, 1.0)
  order = np.argsort(-probs)
  out = generate(params, config, batch, max_new_tokens=1, temperature=1.0, top_k=4, seed=0,
                 eos_token_ids=())[:, 0]
  assert set(out) == set(order[:4])
  p_top = probs[order[:4]] / probs[order[:4]].sum()
  assert _chi2_pvalue(np.bincount(out, minlength=VOCAB)[order[:4]], p_top) > 1e-3
  top_p = 0.6
  cum = np.cumsum(probs[order])
  nucleus = set(order[:int(np.searchsorted(cum, top_p) + 1)])
  assert 1 < len(nucleus) < VOCAB
  out = generate(params, config, batch, max_new_tokens=1, temperature=1.0, top_p=top_p, seed=0,
                 eos_token_ids=())[:, 0]
  assert set(out) == nucleus
  greedy = generate(params, config, [prompt], max_new_tokens=5, eos_token_ids=())
  np.testing.assert_array_equal(
      generate(params, config, [prompt], max_new_tokens=5, temperature=2.0, top_k=1, seed=9,
               eos_token_ids=()), greedy)


def test_bad_inputs(tiny):
  _, config, params = tiny
  with pytest.raises(DataError, match="prompt 1 is empty"):
    generate(params, config, [[1, 2], []], max_new_tokens=2)
  with pytest.raises(DataError, match="outside the vocabulary"):
    generate(params, config, [[1, VOCAB]], max_new_tokens=2)
  with pytest.raises(DataError, match="tokenize"):
    generate(params, config, "hello", max_new_tokens=2)
  with pytest.raises(ConfigError, match="max_new_tokens"):
    generate(params, config, [[1]], max_new_tokens=0)
  with pytest.raises(ConfigError, match="temperature"):
    generate(params, config, [[1]], max_new_tokens=1, temperature=-1.0)
  with pytest.raises(ConfigError, match="top_p"):
    generate(params, config, [[1]], max_new_tokens=1, temperature=1.0, top_p=0.0)
  with pytest.raises(ConfigError, match="top_k"):
    generate(params, config, [[1]], max_new_tokens=1, temperature=1.0, top_k=VOCAB + 1)
  with pytest.raises(DataError, match="attention_mask"):
    generate(params, config, np.ones((2, 3), np.int32), attention_mask=np.ones((2, 4)),
             max_new_tokens=1)
