"""Loading and saving Llama-family decoders: Hugging Face folders and GGUF files.

* :func:`load_llama` reads a Hugging Face folder (``config.json`` plus ``model.safetensors``
  or a sharded ``model.safetensors.index.json``) or a llama.cpp ``.gguf`` file (any
  quantization the ``gguf`` package can dequantize: F32, F16, BF16, Q4_0 ... Q8_0, K-quants).
* :func:`save_llama` writes a Hugging Face folder that ``transformers`` loads as is.
* :func:`save_llama_gguf` writes an F32/F16 ``.gguf`` that llama.cpp (and ``transformers``)
  load, with the tokenizer copied from a source GGUF.
* :func:`load_llama_tokenizer` returns a ``transformers`` tokenizer for either kind of path.

No pickle: ``pytorch_model.bin`` checkpoints are refused (convert them to safetensors).
Writes are atomic: a failed save leaves any existing folder or file untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._errors import ConfigError, ModelError
from jlora.models.llama import LlamaConfig, _inv_freq, _param_shapes, stack_layers

__all__ = [
    "load_llama",
    "save_llama",
    "save_llama_gguf",
    "load_llama_tokenizer",
    "llama_config_from_hf",
    "llama_config_to_hf",
]

_HF_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM"}
_GGUF_ARCHS = ("llama", "qwen2")
# our module path (below "layers") -> (HF name below "model.layers.{i}.", GGUF name below "blk.{i}.")
_LAYER_NAMES = {
    ("input_layernorm",): ("input_layernorm", "attn_norm"),
    ("self_attn", "q_proj"): ("self_attn.q_proj", "attn_q"),
    ("self_attn", "k_proj"): ("self_attn.k_proj", "attn_k"),
    ("self_attn", "v_proj"): ("self_attn.v_proj", "attn_v"),
    ("self_attn", "o_proj"): ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm",): ("post_attention_layernorm", "ffn_norm"),
    ("mlp", "gate_proj"): ("mlp.gate_proj", "ffn_gate"),
    ("mlp", "up_proj"): ("mlp.up_proj", "ffn_up"),
    ("mlp", "down_proj"): ("mlp.down_proj", "ffn_down"),
}
_TOP_NAMES = {
    ("embed_tokens",): ("model.embed_tokens", "token_embd"),
    ("norm",): ("model.norm", "output_norm"),
    ("lm_head",): ("lm_head", "output"),
}


def load_llama(path: str | os.PathLike, *, dtype: Any = None,
               keep_quantized: bool = False) -> tuple[LlamaConfig, dict]:
  """Loads a Llama-family model from a Hugging Face folder or a ``.gguf`` file.

  Args:
    path: a folder with ``config.json`` and safetensors weights, or a ``.gguf`` file.
    dtype: dtype of the returned params; ``None`` keeps a Hugging Face checkpoint's stored
      dtype and gives float32 for GGUF (quantized tensors are dequantized).
    keep_quantized: GGUF only: keep Q4_0, Q4_1 and Q8_0 kernels and the token embedding as
      :class:`jlora.QuantizedArray` leaves holding the file's own blocks (``dtype`` is then
      the dtype they dequantise to), so LoRA trains straight on the llama.cpp file. Other
      tensor types are dequantized as usual.

  Returns:
    ``(config, params)``, params as in :mod:`jlora.models.llama` (jax arrays on the default device).

  Raises:
    ModelError: the path is missing, the architecture is not Llama/Mistral/Qwen2, or a
      weight is missing, unexpected or of the wrong shape (the message names it).

  Example:
    >>> from jlora.models.llama_io import load_llama
    >>> config, params = load_llama("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
  """
  path = Path(path)
  if not path.exists():
    raise ModelError(f"{path} does not exist; pass a Hugging Face model folder or a .gguf file")
  if path.is_file():
    if path.suffix.lower() != ".gguf":
      raise ModelError(
          f"{path} is a file but not a .gguf; pass a .gguf file or a Hugging Face folder "
          "holding config.json and *.safetensors")
    config, params = _read_gguf(path, lambda a: _to_jax(a, dtype), keep_quantized=keep_quantized,
                                dtype=dtype)
  else:
    if keep_quantized:
      raise ModelError(f"{path} is a Hugging Face folder; keep_quantized applies to GGUF files. "
                       "Quantise its params with jlora.quantize(params, rules) instead")
    config, params = _read_hf(path, lambda a: _to_jax(a, dtype))
  return config, params


def save_llama(path: str | os.PathLike, params: dict, config: LlamaConfig, *, tokenizer: Any = None,
               dtype: Any = None, max_shard_bytes: int = 4 << 30, overwrite: bool = False) -> Path:
  """Saves params as a Hugging Face folder (``config.json`` + safetensors) that transformers loads.

  Args:
    path: the folder to write; it must not exist unless ``overwrite``.
    params: the params pytree (merge any LoRA adapters into it first).
    config: the model's config.
    tokenizer: a ``transformers`` tokenizer to save beside the weights, or ``None``.
    dtype: dtype of the saved weights (e.g. ``jnp.bfloat16``); ``None`` keeps the params'.
    max_shard_bytes: weights larger than this are split into shards with an index file.
    overwrite: replace an existing folder (atomically: on failure the old one stays).

  Returns:
    The folder written.

  Raises:
    ModelError: params do not match ``config`` (a key or shape is named), or ``path`` exists
      and ``overwrite`` is False.

  Example:
    >>> from jlora.models.llama_io import save_llama
    >>> save_llama("out/my-model", params, config, tokenizer=tok)  # doctest: +SKIP
  """
  path = Path(path)
  if path.exists() and not overwrite:
    raise ModelError(f"{path} already exists; pass overwrite=True to replace it")
  if path.exists() and not path.is_dir():
    raise ModelError(f"{path} exists and is not a folder; choose another path")
  if max_shard_bytes <= 0:
    raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  tensors = _to_hf_tensors(params, config, dtype)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp-") as tmp:
    tmp = Path(tmp) / "out"
    tmp.mkdir()
    _write_safetensors_shards(tmp, tensors, max_shard_bytes)
    hf = llama_config_to_hf(config)
    hf["torch_dtype"] = hf["dtype"] = _dtype_name(next(iter(tensors.values())).dtype)
    (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id}
    if config.eos_token_ids:
      gen["eos_token_id"] = (config.eos_token_ids[0] if len(config.eos_token_ids) == 1
                             else list(config.eos_token_ids))
    gen = {k: v for k, v in gen.items() if v is not None}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    _atomic_replace_dir(tmp, path)
  return path


def save_llama_gguf(path: str | os.PathLike, params: dict, config: LlamaConfig, *,
                    tokenizer_from: str | os.PathLike | None = None, dtype: str = "f16",
                    name: str | None = None, overwrite: bool = False) -> Path:
  """Saves params as an unquantized GGUF file for llama.cpp (architecture ``llama``/``qwen2``).

  Query/key rows are permuted to llama.cpp's RoPE layout, as its converter does. The
  tokenizer (vocabulary, merges, special ids, chat template) is copied from the GGUF file
  ``tokenizer_from``; without one the file holds weights only (llama.cpp needs a tokenizer to
  run it; quantize it with llama.cpp's ``llama-quantize`` if you want).

  Args:
    path: the ``.gguf`` file to write; it must not exist unless ``overwrite``.
    params: the params pytree (merge any LoRA adapters into it first).
    config: the model's config; ``model_type`` ``"llama"`` or ``"mistral"`` is written as
      architecture ``llama``, ``"qwen2"`` as ``qwen2``.
    tokenizer_from: a GGUF file whose ``tokenizer.*`` metadata to copy, or ``None``.
    dtype: ``"f16"`` or ``"f32"`` for the matrices (norms are always F32).
    name: ``general.name``; ``None``: the file's stem.
    overwrite: replace an existing file (atomically).

  Returns:
    The file written.

  Raises:
    ModelError: bad params, an existing path, or a ``tokenizer_from`` that is not a GGUF.
    ConfigError: a dtype other than ``"f16"``/``"f32"``, or a config GGUF cannot express.

  Example:
    >>> from jlora.models.llama_io import save_llama_gguf
    >>> save_llama_gguf("tuned.gguf", params, config, tokenizer_from="base.gguf")  # doctest: +SKIP
  """
  import gguf

  path = Path(path)
  if path.exists() and not overwrite:
    raise ModelError(f"{path} already exists; pass overwrite=True to replace it")
  if dtype not in ("f16", "f32"):
    raise ConfigError(f"save_llama_gguf dtype must be 'f16' or 'f32', got {dtype!r}")
  if config.rope_type == "linear" and (config.rope_freq_factors is not None):
    raise ConfigError("save_llama_gguf cannot combine linear RoPE scaling with rope_freq_factors")
  arch = "qwen2" if config.model_type == "qwen2" else "llama"
  source = None
  if tokenizer_from is not None:
    try:
      source = gguf.GGUFReader(str(tokenizer_from))
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a GGUF"
      raise ModelError(f"tokenizer_from={tokenizer_from} is not a readable GGUF file: {e}") from e
  arrays = _check_params(params, config)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
  os.close(fd)
  try:
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(name or path.stem)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if config.rope_type == "linear":
      writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
      writer.add_rope_scaling_factor(float(config.rope_factor))
    if config.sliding_window is not None:
      writer.add_sliding_window(int(config.sliding_window))
    if source is not None:
      _copy_tokenizer_fields(source, writer)
    else:
      for setter, value in ((writer.add_bos_token_id, config.bos_token_id),
                            (writer.add_pad_token_id, config.pad_token_id),
                            (writer.add_eos_token_id,
                             config.eos_token_ids[0] if config.eos_token_ids else None)):
        if value is not None:
          setter(int(value))
    for gguf_name, array in _to_gguf_tensors(arrays, config, arch, dtype):
      writer.add_tensor(gguf_name, array)
    factors = _rope_factors(config)
    if factors is not None:  # llama.cpp's encoding of llama3 (or free-form) frequency scaling
      writer.add_tensor("rope_freqs.weight", factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def load_llama_tokenizer(path: str | os.PathLike) -> Any:
  """A ``transformers`` tokenizer for a Hugging Face folder or a ``.gguf`` file.

  Args:
    path: the same path given to :func:`load_llama`.

  Returns:
    A ``transformers.PreTrainedTokenizerBase`` (a GGUF's vocabulary is converted by
    transformers).

  Raises:
    ModelError: no tokenizer could be built from ``path``.

  Example:
    >>> from jlora.models.llama_io import load_llama_tokenizer
    >>> tok = load_llama_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> tok("Hello").input_ids  # doctest: +SKIP
    [19556]
  """
  from transformers import AutoTokenizer

  path = Path(path)
  if not path.exists():
    raise ModelError(f"{path} does not exist; pass a Hugging Face model folder or a .gguf file")
  try:
    if path.is_file():
      return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))
  except Exception as e:  # noqa: BLE001 - transformers raises many kinds
    raise ModelError(
        f"could not build a tokenizer from {path}: {type(e).__name__}: {e}. A Hugging Face "
        "folder needs tokenizer.json (or tokenizer_config.json and its vocab files); a GGUF "
        "needs tokenizer.ggml.* metadata") from e


def llama_config_from_hf(hf: dict) -> LlamaConfig:
  """Converts a Hugging Face ``config.json`` dict (Llama, Mistral or Qwen2) to a LlamaConfig.

  Reads both the transformers 4 (``rope_theta`` + ``rope_scaling``) and 5
  (``rope_parameters``) spellings of RoPE settings.

  Args:
    hf: the parsed ``config.json``.

  Returns:
    The config.

  Raises:
    ModelError: unsupported ``model_type``, activation or RoPE scaling, or a missing field.

  Example:
    >>> from jlora.models.llama_io import llama_config_from_hf
    >>> cfg = llama_config_from_hf({"model_type": "llama", "vocab_size": 128,
    ...     "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    ...     "num_attention_heads": 4, "num_key_value_heads": 2})
    >>> cfg.num_kv_heads
    2
  """
  model_type = hf.get("model_type", "llama")
  if model_type not in _HF_ARCHS:
    raise ModelError(
        f"config.json model_type {model_type!r} is not a supported decoder; jlora.models.llama "
        f"supports {sorted(_HF_ARCHS)}")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ModelError(f"config.json hidden_act {act!r} is not supported; Llama models use 'silu'")
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads") if k not in hf]
  if missing:
    raise ModelError(f"config.json lacks {missing}; is it a Llama-family config?")
  rope = dict(hf.get("rope_parameters") or {})
  rope.update(hf.get("rope_scaling") or {})
  theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "linear", "llama3"):
    raise ModelError(
        f"config.json asks for RoPE scaling {rope_type!r}; jlora.models.llama supports default, "
        "linear and llama3")
  sliding = hf.get("sliding_window")
  if model_type == "qwen2" and not hf.get("use_sliding_window", False):
    sliding = None
  eos = hf.get("eos_token_id")
  eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
  bias = bool(hf.get("attention_bias", False))
  try:
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_positions=int(rope.get("original_max_position_embeddings", 8192)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bias or model_type == "qwen2",
        attention_out_bias=bias and model_type != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=sliding,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=hf.get("pad_token_id"),
        model_type=model_type,
    )
  except ConfigError as e:
    raise ModelError(f"config.json describes an invalid model: {e}") from e


def llama_config_to_hf(config: LlamaConfig) -> dict:
  """The Hugging Face ``config.json`` dict for a LlamaConfig (inverse of :func:`llama_config_from_hf`).

  Example:
    >>> from jlora.models.llama import LlamaConfig
    >>> from jlora.models.llama_io import llama_config_to_hf
    >>> llama_config_to_hf(LlamaConfig(128, 64, 128, 2, 4, 2))["architectures"]
    ['LlamaForCausalLM']
  """
  if config.attention_bias != config.attention_out_bias and config.model_type != "qwen2":
    raise ConfigError(
        f"a {config.model_type} config.json cannot express attention_bias="
        f"{config.attention_bias} with attention_out_bias={config.attention_out_bias}; "
        "use model_type='qwen2' for q/k/v-only biases")
  if config.model_type == "qwen2" and (not config.attention_bias or config.attention_out_bias):
    raise ConfigError("a qwen2 config needs attention_bias=True and attention_out_bias=False")
  if config.rope_freq_factors is not None:
    raise ConfigError(
        "a config.json cannot express free-form rope_freq_factors (from a GGUF rope_freqs "
        "tensor that matches no llama3 scaling); save it as GGUF with save_llama_gguf")
  if config.model_type != "llama" and config.mlp_bias:
    raise ConfigError(f"a {config.model_type} config.json cannot express mlp_bias=True")
  hf: dict[str, Any] = {
      "architectures": [_HF_ARCHS[config.model_type]],
      "model_type": config.model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_word_embeddings,
      "bos_token_id": config.bos_token_id,
      "pad_token_id": config.pad_token_id,
      "eos_token_id": (None if not config.eos_token_ids else config.eos_token_ids[0]
                       if len(config.eos_token_ids) == 1 else list(config.eos_token_ids)),
      "initializer_range": 0.02,
      "use_cache": True,
  }
  if config.model_type == "llama":
    hf["attention_bias"] = config.attention_bias
    hf["mlp_bias"] = config.mlp_bias
  if config.model_type == "mistral":
    hf["sliding_window"] = config.sliding_window
  if config.model_type == "qwen2":
    hf["use_sliding_window"] = config.sliding_window is not None
    hf["sliding_window"] = config.sliding_window
    hf["max_window_layers"] = config.num_layers
  if config.rope_type == "linear":
    hf["rope_scaling"] = {"rope_type": "linear", "factor": config.rope_factor}
  elif config.rope_type == "llama3":
    hf["rope_scaling"] = {
        "rope_type": "llama3", "factor": config.rope_factor,
        "low_freq_factor": config.rope_low_freq_factor,
        "high_freq_factor": config.rope_high_freq_factor,
        "original_max_position_embeddings": config.rope_original_max_positions,
    }
  return hf


# ----------------------------------------------------------------------------------------------
# Private helpers.


def _leaf_paths(config: LlamaConfig) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
  """(path, shape) of every params leaf, in a fixed order."""
  out = []

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, tuple):
        out.append((prefix + (k,), v))
      else:
        walk(v, prefix + (k,))

  walk(_param_shapes(config), ())
  return out


def _hf_names(path: tuple[str, ...], num_layers: int) -> list[str]:
  """HF tensor names of one params leaf (one per layer for stacked leaves)."""
  leaf = path[-1]
  suffix = "bias" if leaf == "bias" else "weight"
  if path[0] == "layers":
    hf_mod = _LAYER_NAMES[path[1:-1]][0]
    return [f"model.layers.{i}.{hf_mod}.{suffix}" for i in range(num_layers)]
  return [f"{_TOP_NAMES[path[:-1]][0]}.{suffix}"]


def _gguf_names(path: tuple[str, ...], num_layers: int) -> list[str]:
  leaf = path[-1]
  suffix = "bias" if leaf == "bias" else "weight"
  if path[0] == "layers":
    mod = _LAYER_NAMES[path[1:-1]][1]
    return [f"blk.{i}.{mod}.{suffix}" for i in range(num_layers)]
  return [f"{_TOP_NAMES[path[:-1]][1]}.{suffix}"]


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def _to_jax(a: np.ndarray, dtype) -> jax.Array:
  """One leaf to a jax array (leaf by leaf, so only one float32 leaf is alive at a time)."""
  a = np.asarray(a)
  return jnp.asarray(a, dtype=dtype if dtype is not None else a.dtype)


def _read_hf(folder: Path, convert) -> tuple[LlamaConfig, dict]:
  from safetensors import safe_open

  cfg_file = folder / "config.json"
  if not cfg_file.is_file():
    raise ModelError(f"{folder} has no config.json; is it a Hugging Face model folder?")
  try:
    hf = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise ModelError(f"{cfg_file} is not valid JSON: {e}") from e
  config = llama_config_from_hf(hf)
  index_file = folder / "model.safetensors.index.json"
  if index_file.is_file():
    try:
      weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ModelError(f"{index_file} is not a safetensors index (no weight_map): {e}") from e
    files = sorted(set(weight_map.values()))
  elif (folder / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
      raise ModelError(
          f"{folder} holds only pickled PyTorch weights (*.bin/*.pt), which jlora does not "
          "load (pickle can run code). Convert them to model.safetensors first, e.g. "
          "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)`.")
    raise ModelError(
        f"{folder} has no model.safetensors nor model.safetensors.index.json; put the "
        "checkpoint's safetensors weights beside config.json (transformers writes them with "
        "model.save_pretrained(folder))")
  # name -> (file, handle) for every stored tensor
  handles = {}
  location = {}
  try:
    for name in files:
      f = folder / name
      if not f.is_file():
        raise ModelError(f"{index_file} names {name}, which is missing from {folder}")
      try:
        handles[name] = safe_open(str(f), framework="np")
      except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelError(
            f"{f} is not a readable safetensors file ({f.stat().st_size} bytes: {e}); it is "
            "probably truncated or corrupt (an interrupted download or save?): download or "
            "save it again") from e
      for key in handles[name].keys():
        location[key] = name
    stored = {_strip_prefix(k): k for k in location}
    arrays: dict = {}
    used = set()
    for path, shape in _leaf_paths(config):
      names = _hf_names(path, config.num_layers)
      want = _hf_shape(shape, path)
      parts = []
      for hf_name in names:
        if hf_name not in stored:
          raise ModelError(
              f"{folder} lacks weight {hf_name} that config.json implies "
              f"({_describe_config(config)}); is the checkpoint complete and for this config?")
        key = stored[hf_name]
        used.add(hf_name)
        t = handles[location[key]].get_tensor(key)
        if tuple(t.shape) != want:
          raise ModelError(
              f"weight {hf_name} in {location[key]} has shape {tuple(t.shape)}, but "
              f"config.json implies {want}; is config.json for this checkpoint?")
        parts.append(t.T if path[-1] == "kernel" else t)
      value = np.stack(parts) if path[0] == "layers" else parts[0]
      del parts
      _set_path(arrays, path, convert(value))
    extra = sorted(k for k in stored if k not in used and not k.endswith("rotary_emb.inv_freq")
                   and not (k == "lm_head.weight" and config.tie_word_embeddings))
    if extra:
      raise ModelError(
          f"{folder} holds weights that a {config.model_type} model with this config.json does "
          f"not have: {extra[:5]}{' ...' if len(extra) > 5 else ''}; check config.json "
          "(attention_bias, mlp_bias, tie_word_embeddings, num_hidden_layers)")
  finally:
    handles.clear()
  return config, arrays


def _strip_prefix(name: str) -> str:
  if name.startswith("model.") or name.startswith("lm_head."):
    return name
  return "model." + name  # a bare LlamaModel checkpoint


def _hf_shape(shape, path) -> tuple:
  shape = tuple(shape)
  if path[0] == "layers":
    shape = shape[1:]
  if path[-1] == "kernel":
    shape = shape[::-1]
  return shape


def _describe_config(config: LlamaConfig) -> str:
  return (f"{config.num_layers} layers, attention_bias={config.attention_bias}, "
          f"mlp_bias={config.mlp_bias}, tie_word_embeddings={config.tie_word_embeddings}")


def _check_params(params: dict, config: LlamaConfig) -> dict:
  """Numpy copies of params (stacked or per-layer layout) after checking every leaf against config."""
  params = stack_layers(params)
  arrays: dict = {}
  for path, shape in _leaf_paths(config):
    try:
      value = _get_path(params, path)
    except (KeyError, TypeError):
      raise ModelError(
          f"params lack {'/'.join(path)}, which the config needs ({_describe_config(config)}); "
          "if LoRA adapters are attached, merge them into the params before saving") from None
    if not hasattr(value, "shape") or tuple(value.shape) != shape:
      raise ModelError(
          f"params leaf {'/'.join(path)} has shape {getattr(value, 'shape', type(value))}, "
          f"expected {shape}; merge LoRA adapters before saving")
    _set_path(arrays, path, np.asarray(jax.device_get(value)))
  expected = {p for p, _ in _leaf_paths(config)}
  extra = [
      "/".join(str(getattr(k, "key", k)) for k in kp)
      for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]
      if tuple(str(getattr(k, "key", k)) for k in kp) not in expected
  ]
  if extra:
    raise ModelError(
        f"params hold leaves the config does not describe: {extra[:5]}; merge LoRA adapters "
        "into the base params (or check tie_word_embeddings / biases in the config)")
  return arrays


def _to_hf_tensors(params: dict, config: LlamaConfig, dtype) -> dict[str, np.ndarray]:
  arrays = _check_params(params, config)
  out = {}
  for path, _ in _leaf_paths(config):
    value = _get_path(arrays, path)
    if dtype is not None:
      value = value.astype(jnp.dtype(dtype))
    names = _hf_names(path, config.num_layers)
    parts = list(value) if path[0] == "layers" else [value]
    for name, part in zip(names, parts):
      out[name] = np.ascontiguousarray(part.T if path[-1] == "kernel" else part)
  return out


def _write_safetensors_shards(folder: Path, tensors: dict[str, np.ndarray], max_bytes: int):
  from safetensors.numpy import save_file

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > max_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  if len(shards) == 1:
    save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  n = len(shards)
  for i, shard in enumerate(shards, 1):
    fname = f"model-{i:05d}-of-{n:05d}.safetensors"
    save_file(shard, str(folder / fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in shard})
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
           "weight_map": weight_map}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _dtype_name(dtype) -> str:
  return {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}.get(
      np.dtype(dtype).name, "float32")


def _atomic_replace_dir(src: Path, dst: Path) -> None:
  if not dst.exists():
    os.replace(src, dst)
    return
  backup = dst.parent / f".{dst.name}.old-{os.getpid()}"
  os.replace(dst, backup)
  try:
    os.replace(src, dst)
  except BaseException:
    os.replace(backup, dst)
    raise
  shutil.rmtree(backup, ignore_errors=True)


# GGUF ------------------------------------------------------------------------------------------


def _gguf_field(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def _read_gguf(file: Path, convert, *, keep_quantized: bool = False,
               dtype: Any = None) -> tuple[LlamaConfig, dict]:
  import gguf
  from gguf import quants

  from jlora._adapter import Axes
  from jlora._quant import GGML_SPECS, from_ggml

  try:
    reader = gguf.GGUFReader(str(file))
  except Exception as e:  # noqa: BLE001 - the reader raises ValueError, struct.error, ...
    with open(file, "rb") as f:
      magic = f.read(4)
    hint = ("it starts like a GGUF file, so it is probably truncated or corrupt (an interrupted "
            "download or copy?): download or convert it again" if magic == b"GGUF" else
            "it lacks the GGUF magic bytes; pass a llama.cpp .gguf file")
    raise ModelError(f"{file} is not a readable GGUF file ({file.stat().st_size} bytes; "
                     f"{type(e).__name__}: {e}); {hint}") from e
  arch = _gguf_field(reader, "general.architecture")
  if arch not in _GGUF_ARCHS:
    raise ModelError(
        f"{file} holds a {arch!r} model (general.architecture); jlora.models.llama loads GGUF "
        f"architectures {_GGUF_ARCHS}: pass a Llama, Mistral or Qwen2 GGUF, or run this model "
        "with llama.cpp or transformers")
  tensors = {t.name: t for t in reader.tensors}

  def meta(key, default=None, required=False):
    value = _gguf_field(reader, f"{arch}.{key}", default)
    if required and value is None:
      raise ModelError(f"{file} lacks GGUF metadata {arch}.{key}")
    return value

  scaling = meta("rope.scaling.type", "none")
  if scaling not in ("none", "linear"):
    raise ModelError(f"{file} uses RoPE scaling {scaling!r}; jlora supports none and linear")
  num_heads = int(meta("attention.head_count", required=True))
  hidden = int(meta("embedding_length", required=True))
  if "token_embd.weight" not in tensors:
    raise ModelError(f"{file} lacks tensor token_embd.weight")
  vocab = int(meta("vocab_size", None) or tensors["token_embd.weight"].shape[-1])
  eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
  eot = _gguf_field(reader, "tokenizer.ggml.eot_token_id")
  eos_ids = tuple(dict.fromkeys(int(e) for e in (eos, eot) if e is not None))
  tied = "output.weight" not in tensors
  try:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length", required=True)),
        num_layers=int(meta("block_count", required=True)),
        num_heads=num_heads,
        num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=int(meta("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_type="linear" if scaling == "linear" else "default",
        rope_factor=float(meta("rope.scaling.factor", 1.0) or 1.0),
        max_position_embeddings=int(meta("context_length", 2048)),
        tie_word_embeddings=tied,
        attention_bias="blk.0.attn_q.bias" in tensors,
        attention_out_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        sliding_window=meta("attention.sliding_window"),
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=_gguf_field(reader, "tokenizer.ggml.padding_token_id"),
        model_type="qwen2" if arch == "qwen2" else "llama",
    )
    if "rope_freqs.weight" in tensors:
      t = tensors["rope_freqs.weight"]
      factors = np.asarray(t.data, np.float32).reshape(-1)
      config = _rope_config_from_factors(config, factors)
  except ConfigError as e:
    raise ModelError(f"{file} has inconsistent GGUF metadata: {e}") from e

  def load(name, shape):
    t = tensors.get(name)
    if t is None:
      raise ModelError(f"{file} lacks tensor {name} that its metadata implies")
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
      a = np.asarray(t.data, dtype=np.float32)
    else:
      try:
        a = quants.dequantize(t.data, t.tensor_type)
      except NotImplementedError as e:
        raise ModelError(
            f"{file}: tensor {name} has quantization {t.tensor_type.name}, which the gguf "
            f"package cannot dequantize ({e}); requantize the model with another type") from e
    a = a.reshape(tuple(int(d) for d in reversed(t.shape)))  # numpy order: (out, in)
    if a.shape != shape:
      raise ModelError(
          f"{file}: tensor {name} has shape {a.shape}, but the file's metadata ({arch}.*: "
          f"{_describe_gguf_config(config)}) implies {shape}; metadata and tensors disagree, so "
          "the file is corrupt or was written by a faulty converter: convert the model again")
    return a

  def load_raw(path, shape, names):
    """The path's tensors as a QuantizedArray of their own blocks, or None (not a kept type)."""
    ts = [tensors.get(n) for n in names]
    if path[-1] not in ("kernel", "embedding") or any(t is None for t in ts):
      return None
    kinds = {t.tensor_type.name for t in ts}
    if len(kinds) != 1 or next(iter(kinds)) not in GGML_SPECS:
      return None
    spec = GGML_SPECS[next(iter(kinds))]()
    rows = []
    for name, t in zip(names, ts):
      raw = np.asarray(t.data)
      out_in = tuple(int(d) for d in reversed(t.shape))
      if out_in != _hf_shape(shape, path):
        return None  # the float path reports the shape mismatch
      if arch == "llama" and path[1:3] in (("self_attn", "q_proj"), ("self_attn", "k_proj")):
        heads = config.num_heads if path[2] == "q_proj" else config.num_kv_heads
        raw = _unpermute_rope_rows(raw, heads)  # whole rows of blocks move
      rows.append(raw)
      used.add(name)
    if path[-1] == "embedding":  # (vocab, hidden): rows are vocabulary entries, blocks along hidden
      axes = Axes((), (1,), (0,))
    elif path[0] == "layers":  # (layers, in, out)
      axes = Axes((0,), (1,), (2,))
    else:
      axes = Axes((), (0,), (1,))
    return from_ggml(rows, spec, shape=shape, axes=axes, dtype=dtype or jnp.float32)

  arrays: dict = {}
  used = set()
  for path, shape in _leaf_paths(config):
    names = _gguf_names(path, config.num_layers)
    hf_shape = _hf_shape(shape, path)
    if keep_quantized:
      q = load_raw(path, shape, names)
      if q is not None:
        _set_path(arrays, path, q)
        continue
    parts = []
    for name in names:
      used.add(name)
      a = load(name, hf_shape)
      if arch == "llama" and path[1:3] in (("self_attn", "q_proj"), ("self_attn", "k_proj")):
        heads = config.num_heads if path[2] == "q_proj" else config.num_kv_heads
        a = _unpermute_rope_rows(a, heads)
      parts.append(a.T if path[-1] == "kernel" else a)
    value = np.stack(parts) if path[0] == "layers" else parts[0]
    del parts
    _set_path(arrays, path, convert(value))
  extra = sorted(set(tensors) - used - {"rope_freqs.weight"})
  if extra:
    raise ModelError(f"{file} holds tensors jlora.models.llama does not know: {extra[:5]}")
  return config, arrays


def _describe_gguf_config(config: LlamaConfig) -> str:
  return (f"embedding_length={config.hidden_size}, feed_forward_length="
          f"{config.intermediate_size}, attention.head_count={config.num_heads}, "
          f"attention.head_count_kv={config.num_kv_heads}, head dim {config.head_dim}, "
          f"vocabulary {config.vocab_size}")


def _rope_factors(config: LlamaConfig) -> np.ndarray | None:
  """Divisors of the default RoPE frequencies that give config's (llama3 / free-form) ones."""
  if config.rope_type != "llama3" and config.rope_freq_factors is None:
    return None
  plain = config.replace(rope_type="default", rope_freq_factors=None)
  return (_inv_freq(plain).astype(np.float64) / _inv_freq(config)).astype(np.float32)


def _rope_config_from_factors(config: LlamaConfig, factors: np.ndarray) -> LlamaConfig:
  """llama3 scaling when the factors are one (as llama.cpp writes it), else free-form factors."""
  if factors.shape != (config.head_dim // 2,):
    raise ModelError(
        f"rope_freqs.weight has shape {factors.shape}, expected ({config.head_dim // 2},)")
  if config.rope_type == "default" and factors.max() > 1:
    for orig in dict.fromkeys((8192, config.max_position_embeddings, 4096, 2048, 16384, 32768)):
      candidate = config.replace(
          rope_type="llama3", rope_factor=float(factors.max()), rope_low_freq_factor=1.0,
          rope_high_freq_factor=4.0, rope_original_max_positions=orig)
      if np.allclose(_rope_factors(candidate), factors, rtol=1e-4, atol=1e-6):
        return candidate
  return config.replace(rope_freq_factors=tuple(float(f) for f in factors))


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp stores q/k rows of each head interleaved (pairs); HF stores them as halves."""
  rows = w.shape[0]
  hd = rows // heads
  rest = w.shape[1:]
  return w.reshape(heads, hd // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
  rows = w.shape[0]
  hd = rows // heads
  rest = w.shape[1:]
  return w.reshape(heads, 2, hd // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _to_gguf_tensors(arrays: dict, config: LlamaConfig, arch: str, dtype: str):
  for path, _ in _leaf_paths(config):
    value = _get_path(arrays, path)
    names = _gguf_names(path, config.num_layers)
    parts = list(value) if path[0] == "layers" else [value]
    for name, part in zip(names, parts):
      a = np.asarray(part.T if path[-1] == "kernel" else part, dtype=np.float32)
      if arch == "llama" and path[1:3] in (("self_attn", "q_proj"), ("self_attn", "k_proj")):
        heads = config.num_heads if path[2] == "q_proj" else config.num_kv_heads
        a = _permute_rope_rows(a, heads)
      if dtype == "f16" and a.ndim == 2:
        a = a.astype(np.float16)
      yield name, np.ascontiguousarray(a)


def _copy_tokenizer_fields(reader, writer) -> None:
  import gguf

  for key, field in reader.fields.items():
    if not key.startswith("tokenizer."):
      continue
    types = field.types
    value = field.contents()
    if types[0] == gguf.GGUFValueType.ARRAY:
      writer.add_array(key, value)
    elif types[0] == gguf.GGUFValueType.STRING:
      writer.add_string(key, value)
    else:
      writer.add_key_value(key, value, types[0])
