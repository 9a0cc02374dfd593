"""Test configuration: 8 fake CPU devices so sharding tests run anywhere."""

import os

# Must be set before jax is imported anywhere.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

from hypothesis import settings  # noqa: E402

settings.register_profile("jlora", deadline=None, max_examples=25, print_blob=True)
settings.load_profile("jlora")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
  """A tiny random LlamaForCausalLM saved by transformers, and the same model as jlora params.

  Returns ``(folder, config, params)``; torch seed 0, so every module that uses it sees the same
  weights. Shared by the PEFT interop and many-adapter suites.
  """
  import torch
  import transformers

  from jlora.models.llama_io import load_llama

  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)
  torch.manual_seed(0)
  d = tmp_path_factory.mktemp("tiny_llama") / "base"
  transformers.LlamaForCausalLM(cfg).save_pretrained(d)
  config, params = load_llama(d)
  return d, config, params
