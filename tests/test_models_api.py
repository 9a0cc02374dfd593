"""jlora.models.load / save_hf / resolve: one entry point for every family."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jlora
import jlora.models as models
from jlora.models.llama import LlamaConfig


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_llama")
  cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64, tie_word_embeddings=False)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)
  return d


def test_load_hf_folder_and_save_hf_round_trip(tiny_llama_dir, tmp_path):
  model, params, tok = models.load(tiny_llama_dir)
  assert isinstance(model, models.LlamaForCausalLM) and tok is None
  ids = np.array([[1, 5, 9, 3, 7]])
  ours = np.asarray(model.apply({"params": params}, ids))
  ref = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
  with torch.no_grad():
    theirs = ref(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  # LoRA -> merge -> save_hf -> transformers gives the LoRA model's logits
  tree = jlora.wrap(params, {"layers/self_attn/{q,v}_proj/kernel": jlora.LoRA(4, stack_axes=1)},
                    key=jax.random.key(0))
  tree = jax.tree.map(lambda x: x, tree)
  for path, leaf in jlora.adapted_leaves(tree):
    parts = path.split("/")
    tree[parts[0]][parts[1]][parts[2]][parts[3]] = leaf.replace(b=jnp.full(leaf.b.shape, 0.05))
  lora_logits = np.asarray(jlora.lora(model.apply)({"params": tree}, ids))
  out = models.save_hf(model, jlora.merge(tree), None, tmp_path / "merged")
  back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    np.testing.assert_allclose(back(torch.tensor(ids)).logits.numpy(), lora_logits, atol=1e-4)
  assert not np.allclose(lora_logits, ours, atol=1e-3)  # the adapter changed something


def test_resolve_errors(tmp_path):
  with pytest.raises(jlora.ModelError, match="no model at"):
    models.resolve(tmp_path / "missing")
  (tmp_path / "weights.bin").write_bytes(b"x")
  with pytest.raises(jlora.ModelError, match="not a .gguf"):
    models.resolve(tmp_path / "weights.bin")
  (tmp_path / "empty").mkdir()
  with pytest.raises(jlora.ModelError, match="no config.json"):
    models.resolve(tmp_path / "empty")
  (tmp_path / "t5").mkdir()
  (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
  with pytest.raises(jlora.ModelError, match="model_type 't5'"):
    models.resolve(tmp_path / "t5")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(jlora.FetchError, match="hub id.*local folder"):
    models.load("HuggingFaceTB/SmolLM2-135M")


@pytest.mark.slow
def test_packaged_models_load_by_name():
  model, params, tok = models.load("all-minilm-l6-v2")
  b = tok(["a movie"], return_tensors="np")
  assert model.apply({"params": params}, b["input_ids"], b["attention_mask"]).shape == (1, 384)
  model, params, tok = models.load("smollm2-135m-instruct")
  assert model.config.num_layers == 30 and model.config.hidden_size == 576
  assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (30, 576, 576)
