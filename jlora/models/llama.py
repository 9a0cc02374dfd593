"""Llama-family causal decoder (Llama 1-3, Mistral, Qwen2) as a pure function of a params pytree.

The model is a plain function of a nested dict of arrays, so LoRA and the other
jlora transforms act on it like on any other pytree. The decoder layers are
stacked along a leading axis of size ``num_layers`` and run with
:func:`jax.lax.scan`, so compile time does not grow with depth.

Params layout (``L`` layers, ``D`` hidden, ``H``/``K`` query/key-value heads of
size ``hd``, ``F`` MLP width, ``V`` vocabulary); kernels are ``(in, out)`` like
``flax.linen.Dense``, with the layer axis first under ``"layers"``::

  {"embed_tokens": {"embedding": (V, D)},
   "layers": {
     "input_layernorm": {"scale": (L, D)},
     "self_attn": {"q_proj": {"kernel": (L, D, H*hd), ["bias": (L, H*hd)]},
                   "k_proj": {"kernel": (L, D, K*hd), ["bias"]},
                   "v_proj": {"kernel": (L, D, K*hd), ["bias"]},
                   "o_proj": {"kernel": (L, H*hd, D), ["bias": (L, D)]}},
     "post_attention_layernorm": {"scale": (L, D)},
     "mlp": {"gate_proj": {"kernel": (L, D, F)}, "up_proj": {"kernel": (L, D, F)},
             "down_proj": {"kernel": (L, F, D)}}},
   "norm": {"scale": (D,)},
   "lm_head": {"kernel": (D, V)},          # absent when embeddings are tied
   "prompt": {"embedding": (N, D)},        # optional: a soft prompt (prompt tuning)
   "prefix": {"embedding": (N, L, 2, K, hd)}}  # optional: per-layer keys/values (prefix tuning)
   # or "prefix": {"embedding": (N, K*hd), "projection": {...}}: a projected prefix

A ``"prompt"`` entry (:func:`jlora.add_prompt`, PEFT's prompt tuning) is the
model's soft-prompt input: ``N`` embeddings placed before every row's tokens
(before its padding too, as PEFT does), always attended to, at positions
``0 .. N-1`` (the tokens' positions shift by ``N``). :func:`llama_forward`
returns the logits of the real tokens only (the ``N`` virtual positions are
sliced off); :func:`llama_forward_cached` writes them to the cache when called
with ``prefill_prompt=True`` (generation's prefill).

A ``"prefix"`` entry (:func:`jlora.add_prefix`, PEFT's prefix tuning) holds
``N`` keys and values per layer: layer ``l``'s keys are ``embedding[:, l, 0]``
and its values ``embedding[:, l, 1]`` (PEFT's flat ``(N, L*2*K*hd)`` reshaped),
used as they are (no RoPE: they are past keys, as PEFT passes them) in ``N``
always-attended slots before the tokens, whose positions then start at ``N``. A
prefix with a ``"projection"`` (``PrefixTuning(N, projection=H)``, PEFT's
``prefix_projection=True``) is read through :func:`jlora.project_prefix`, in
the forward and in the cache prefill alike.

Module names follow Hugging Face's, so PEFT-style target names (``q_proj``,
``v_proj``, ...) mean the same here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._errors import ConfigError, TreeError

__all__ = [
    "LlamaConfig",
    "init_llama",
    "init_llama_cache",
    "llama_forward",
    "llama_forward_cached",
    "LAYER_AXIS",
    "stack_layers",
    "unstack_layers",
]

#: The axis of every leaf under ``params["layers"]`` that indexes the layer.
LAYER_AXIS = 0

_ROPE_TYPES = ("default", "linear", "llama3")
_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a Llama-family decoder. Frozen and hashable (a static jit argument).

  Attributes:
    vocab_size: number of token ids.
    hidden_size: model width ``D``.
    intermediate_size: MLP width ``F``.
    num_layers: number of decoder layers ``L``.
    num_heads: query heads ``H``.
    num_kv_heads: key/value heads ``K`` (grouped-query attention); divides ``num_heads``.
    head_dim: size of one head; ``None`` means ``hidden_size // num_heads``.
    rms_norm_eps: epsilon of every RMSNorm.
    rope_theta: RoPE base frequency.
    rope_type: ``"default"``, ``"linear"`` (positions divided by ``rope_factor``) or
      ``"llama3"`` (Llama 3.1 frequency-dependent scaling).
    rope_factor: scaling factor for ``"linear"`` and ``"llama3"``.
    rope_low_freq_factor: ``"llama3"`` only.
    rope_high_freq_factor: ``"llama3"`` only.
    rope_original_max_positions: ``"llama3"`` only, the pre-extension context length.
    max_position_embeddings: the context length the model was trained for (informational,
      and the default cache length of :func:`jlora.generate.generate`).
    tie_word_embeddings: the output projection is the transposed token embedding.
    attention_bias: q/k/v projections have a bias (Llama ``attention_bias``, Qwen2).
    attention_out_bias: the output projection has a bias (Llama ``attention_bias``).
    mlp_bias: gate/up/down projections have a bias.
    sliding_window: attend to at most this many most recent tokens (Mistral); ``None``: all.
    bos_token_id: beginning-of-sequence id, or ``None``.
    eos_token_ids: ids that end generation.
    pad_token_id: id written after generation stopped, or ``None``.
    model_type: ``"llama"``, ``"mistral"`` or ``"qwen2"``; chooses the saved config format.
    rope_freq_factors: ``head_dim // 2`` divisors of the RoPE frequencies (llama.cpp's
      ``rope_freqs`` tensor), applied after ``rope_type``'s scaling; ``None``: none.

  Example:
    >>> from jlora.models.llama import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
    ...                   num_layers=2, num_heads=4, num_kv_heads=2)
    >>> cfg.head_dim
    16
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  attention_out_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  model_type: str = "llama"
  rope_freq_factors: tuple[float, ...] | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads}) for grouped-query attention")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ConfigError(
            f"LlamaConfig.hidden_size ({self.hidden_size}) is not a multiple of num_heads "
            f"({self.num_heads}); pass head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if not isinstance(self.head_dim, (int, np.integer)) or self.head_dim <= 0 or self.head_dim % 2:
      raise ConfigError(f"LlamaConfig.head_dim must be a positive even int, got {self.head_dim!r}")
    if self.rope_type not in _ROPE_TYPES:
      raise ConfigError(
          f"LlamaConfig.rope_type {self.rope_type!r} is not supported; use one of {_ROPE_TYPES}")
    if self.model_type not in _MODEL_TYPES:
      raise ConfigError(
          f"LlamaConfig.model_type {self.model_type!r} is not supported; use one of {_MODEL_TYPES}")
    if not self.rms_norm_eps > 0 or not self.rope_theta > 0 or not self.rope_factor > 0:
      raise ConfigError("LlamaConfig.rms_norm_eps, rope_theta and rope_factor must be positive")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ConfigError(
          f"LlamaConfig.sliding_window must be None or positive, got {self.sliding_window!r}")
    if self.rope_freq_factors is not None:
      factors = tuple(float(f) for f in np.asarray(self.rope_freq_factors).reshape(-1))
      if len(factors) != self.head_dim // 2 or not all(f > 0 for f in factors):
        raise ConfigError(
            f"LlamaConfig.rope_freq_factors must hold head_dim // 2 = {self.head_dim // 2} "
            f"positive numbers, got {len(factors)}")
      object.__setattr__(self, "rope_freq_factors", factors)
    eos = self.eos_token_ids
    if isinstance(eos, (int, np.integer)):
      eos = (eos,)
    object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in eos))
    for name in ("bos_token_id", "pad_token_id"):
      value = getattr(self, name)
      if value is not None and not 0 <= value < self.vocab_size:
        raise ConfigError(f"LlamaConfig.{name}={value} is outside [0, {self.vocab_size})")
    for e in self.eos_token_ids:
      if not 0 <= e < self.vocab_size:
        raise ConfigError(f"LlamaConfig.eos_token_ids holds {e}, outside [0, {self.vocab_size})")

  def replace(self, **changes: Any) -> LlamaConfig:
    """A copy with some fields changed.

    Example:
      >>> from jlora.models.llama import LlamaConfig
      >>> cfg = LlamaConfig(128, 64, 128, 2, 4, 2).replace(num_layers=1)
      >>> cfg.num_layers
      1
    """
    return dataclasses.replace(self, **changes)


def init_llama(config: LlamaConfig, key: jax.Array, dtype: Any = jnp.float32) -> dict:
  """Random params for ``config``: normal(0, 0.02) kernels and embeddings, unit norms, zero biases.

  Args:
    config: the model's shape.
    key: a PRNG key.
    dtype: dtype of every leaf.

  Returns:
    The params pytree described in this module's docstring.

  Example:
    >>> import jax
    >>> from jlora.models.llama import LlamaConfig, init_llama
    >>> cfg = LlamaConfig(128, 64, 128, 2, 4, 2)
    >>> params = init_llama(cfg, jax.random.key(0))
    >>> params["layers"]["self_attn"]["k_proj"]["kernel"].shape
    (2, 64, 32)
  """
  return _init_jit(key, config=config, dtype=jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _init_jit(key, *, config, dtype):
  shapes = _param_shapes(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, shape), k in zip(leaves, keys):
    last = path[-1].key
    if last == "scale":
      out.append(jnp.ones(shape, dtype))
    elif last == "bias":
      out.append(jnp.zeros(shape, dtype))
    else:
      out.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def init_llama_cache(config: LlamaConfig, batch_size: int, max_length: int,
                     dtype: Any = jnp.float32) -> dict:
  """An empty key/value cache for :func:`llama_forward_cached`.

  Args:
    config: the model's shape.
    batch_size: rows of the batch.
    max_length: slots per row; prompt plus generated tokens must fit.
    dtype: dtype of the cached keys and values (use the params' dtype).

  Returns:
    ``{"k", "v": (L, B, S, K, hd), "mask": (B, S) bool, "pos": (B,) int32, "index": () int32}``:
    cached keys/values, which slots hold real tokens, each row's next position, and the
    next slot to write.

  Example:
    >>> from jlora.models.llama import LlamaConfig, init_llama_cache
    >>> cache = init_llama_cache(LlamaConfig(128, 64, 128, 2, 4, 2), 3, 16)
    >>> cache["k"].shape
    (2, 3, 16, 2, 16)
  """
  if batch_size <= 0 or max_length <= 0:
    raise ConfigError(
        f"init_llama_cache needs a positive batch_size and max_length, got {batch_size}, "
        f"{max_length}")
  shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
  return {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "mask": jnp.zeros((batch_size, max_length), bool),
      "pos": jnp.zeros((batch_size,), jnp.int32),
      "index": jnp.zeros((), jnp.int32),
  }


def unstack_layers(params: dict) -> dict:
  """The same params with ``params["layers"]`` as a list of per-layer dicts (layer axis removed).

  Every function of this module accepts both layouts and computes the same values. The
  stacked layout (the default, what loaders and savers use) runs the layers with
  ``lax.scan``: one compiled layer body, so compile time does not grow with depth, but each
  step copies every layer's weights out of the stacked arrays (and, when training them, the
  gradients back in). The unstacked layout runs a Python loop: compile time grows with
  depth, and no weight is copied. On CPU a 30-layer training step is faster unstacked (see
  ``experiments/results/bench_peft.txt``). LoRA rules then match per-layer paths such as
  ``layers/3/self_attn/q_proj/kernel`` (``layers/*/self_attn/q_proj/kernel`` for every
  layer) and need no ``stack_axes``. :func:`stack_layers` undoes it (the savers in
  :mod:`jlora.models.llama_io` take either layout).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlora.models.llama import LlamaConfig, init_llama, llama_forward, unstack_layers
    >>> cfg = LlamaConfig(128, 64, 128, 2, 4, 2)
    >>> params = init_llama(cfg, jax.random.key(0))
    >>> flat = unstack_layers(params)
    >>> len(flat["layers"]), flat["layers"][0]["self_attn"]["q_proj"]["kernel"].shape
    (2, (64, 64))
    >>> tokens = jnp.array([[1, 2, 3]])
    >>> bool(jnp.allclose(llama_forward(flat, tokens, cfg), llama_forward(params, tokens, cfg),
    ...                   atol=1e-5))
    True
  """
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return params
  n = {x.shape[LAYER_AXIS] for x in jax.tree.leaves(layers)}
  if len(n) != 1:
    raise TreeError(f"params['layers'] leaves disagree on the layer count: {sorted(n)}")
  count = n.pop()
  out = dict(params)
  out["layers"] = [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)]
  return out


def stack_layers(params: dict) -> dict:
  """Inverse of :func:`unstack_layers`: ``params["layers"]`` as one dict of stacked arrays.

  Example:
    >>> import jax
    >>> from jlora.models.llama import LlamaConfig, init_llama, stack_layers, unstack_layers
    >>> params = init_llama(LlamaConfig(128, 64, 128, 2, 4, 2), jax.random.key(0))
    >>> back = stack_layers(unstack_layers(params))
    >>> jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back, params))
    True
  """
  layers = params["layers"]
  if not isinstance(layers, (list, tuple)):
    return params
  out = dict(params)
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs, axis=LAYER_AXIS), *layers)
  return out


def llama_forward(params: dict, tokens: jax.Array, config: LlamaConfig, *,
                  attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                  remat: bool = False, past_key_values: Any = None) -> jax.Array:
  """Next-token logits for every position of a batch of token ids.

  Args:
    params: the params pytree (see the module docstring).
    tokens: ``(B, T)`` int token ids.
    config: the model's shape (static under jit).
    attention_mask: ``(B, T)``, 1 for real tokens and 0 for padding (left or right); padded
      keys are never attended to. ``None``: all real.
    positions: ``(B, T)`` RoPE positions. ``None``: the count of real tokens before each
      one (``cumsum(mask) - 1``, so left padding does not shift positions).
    remat: recompute each layer's activations in the backward pass (saves memory when
      training).
    past_key_values: ``N`` earlier keys and values in Hugging Face's layout, a tuple of
      ``L`` ``(key, value)`` pairs each ``(B, K, N, hd)`` (what :func:`jlora.prepend_prefix`
      passes; keys already rotated, used as they are). ``attention_mask`` then covers
      ``N + T`` slots (``(B, N + T)``, as in transformers), derived positions count the
      real slots before each token (so tokens start at ``N``), and explicit ``positions``
      are used as given. ``None``: no past.

  Returns:
    ``(B, T, V)`` float32 logits; row ``t`` predicts token ``t + 1``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlora.models.llama import LlamaConfig, init_llama, llama_forward
    >>> cfg = LlamaConfig(128, 64, 128, 2, 4, 2)
    >>> params = init_llama(cfg, jax.random.key(0))
    >>> llama_forward(params, jnp.array([[1, 2, 3]]), cfg).shape
    (1, 3, 128)
  """
  tokens = _check_tokens(tokens, config)
  batch, length = tokens.shape
  if past_key_values is not None:
    return _forward_with_past(params, tokens, config, past_key_values, attention_mask, positions,
                              remat)
  pkv = _prefix_of(params, config)
  if pkv is not None:
    return _forward_with_prefix(params, tokens, config, pkv, attention_mask, positions, remat)
  prefix = _prompt_of(params, config)
  n = 0 if prefix is None else prefix.shape[0]
  mask = _mask_or_ones(attention_mask, tokens.shape)
  if positions is not None:
    if jnp.shape(positions) != tokens.shape:
      raise TreeError(f"positions has shape {jnp.shape(positions)}, expected {tokens.shape}")
    positions = jnp.asarray(positions, jnp.int32)
  if n:  # the soft prompt's slots: real, at positions 0..n-1; the tokens' positions shift by n
    mask = jnp.concatenate([jnp.ones((batch, n), mask.dtype), mask], axis=1)
    if positions is not None:
      positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n)),
                                   positions + n], axis=1)
  bound = None
  if positions is None and attention_mask is not None:
    positions = _positions_from_mask(mask, jnp.zeros((batch,), jnp.int32))
    bound = n + length  # derived positions lie in [0, n + length)
  # positions=None: 0..length-1 for every row; q_slots=None: queries in slots 0..length-1
  logits, _ = _decoder(params, tokens, config, positions=positions, key_mask=mask, q_slots=None,
                       cache=None, remat=remat, positions_bound=bound, prefix=prefix)
  return logits[:, n:] if n else logits


def llama_forward_cached(params: dict, tokens: jax.Array, cache: dict, config: LlamaConfig, *,
                         attention_mask: jax.Array | None = None,
                         prefill_prompt: bool = False) -> tuple[jax.Array, dict]:
  """Logits for new tokens that attend to a key/value cache; returns the updated cache.

  The ``T`` new tokens are written to slots ``[cache["index"], cache["index"] + T)``. Use it
  for a prompt (prefill, left-padded with ``attention_mask``) and then one token at a time.
  The caller keeps the slots within the cache length (:func:`jlora.generate.generate` does).

  Args:
    params: the params pytree.
    tokens: ``(B, T)`` int token ids.
    cache: from :func:`init_llama_cache` or a previous call.
    config: the model's shape (static under jit).
    attention_mask: ``(B, T)``, 0 for padding; ``None``: all real.
    prefill_prompt: write the params' soft prompt (``params["prompt"]``) to the cache before
      the tokens (the prefill of a prompt-tuned model; later calls leave it False). The
      cache needs ``N`` more slots; the logits are the tokens' only.

  Returns:
    ``(logits, cache)``: ``(B, T, V)`` float32 logits and the cache holding the new tokens.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlora.models.llama import (LlamaConfig, init_llama, init_llama_cache,
    ...                          llama_forward_cached)
    >>> cfg = LlamaConfig(128, 64, 128, 2, 4, 2)
    >>> params = init_llama(cfg, jax.random.key(0))
    >>> cache = init_llama_cache(cfg, 1, 8)
    >>> logits, cache = llama_forward_cached(params, jnp.array([[1, 2, 3]]), cache, cfg)
    >>> int(cache["index"])
    3
  """
  tokens = _check_tokens(tokens, config)
  batch, length = tokens.shape
  prefix = _prompt_of(params, config) if prefill_prompt else None
  pkv = _prefix_of(params, config) if prefill_prompt else None
  if prefill_prompt and prefix is None and pkv is None:
    raise TreeError("prefill_prompt=True but params has no 'prompt' or 'prefix' entry "
                    "(jlora.add_prompt / jlora.add_prefix)")
  n = prefix.shape[0] if prefix is not None else (pkv.shape[2] if pkv is not None else 0)
  if cache["k"].shape[1] != batch:
    raise TreeError(f"cache holds {cache['k'].shape[1]} rows but tokens has {batch}")
  if n + length > cache["k"].shape[2]:
    raise TreeError(f"{n + length} slots ({n} of them the soft prompt) do not fit a cache of "
                    f"{cache['k'].shape[2]} slots")
  mask = _mask_or_ones(attention_mask, tokens.shape)
  if n:
    mask = jnp.concatenate([jnp.ones((batch, n), mask.dtype), mask], axis=1)
  positions = _positions_from_mask(mask, cache["pos"])
  index = cache["index"]
  key_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
  if pkv is not None:  # the prefix fills n cache slots; only the tokens are queries
    positions = positions[:, n:]
    q_slots = index + n + jnp.arange(length, dtype=jnp.int32)
  else:
    q_slots = index + jnp.arange(n + length, dtype=jnp.int32)
  logits, (ks, vs) = _decoder(params, tokens, config, positions=positions, key_mask=key_mask,
                              q_slots=q_slots, cache=(cache["k"], cache["v"], index), remat=False,
                              positions_bound=cache["k"].shape[2], prefix=prefix, prefix_kv=pkv)
  logits = logits[:, n:] if prefix is not None else logits
  length = n + length
  new_cache = {
      "k": ks,
      "v": vs,
      "mask": key_mask,
      "pos": cache["pos"] + jnp.sum(mask, axis=1, dtype=jnp.int32),
      "index": index + length,
  }
  return logits, new_cache


# ----------------------------------------------------------------------------------------------
# Private helpers.


def _param_shapes(config: LlamaConfig) -> dict:
  L, D, F, V = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size
  q_out = config.num_heads * config.head_dim
  kv_out = config.num_kv_heads * config.head_dim

  def dense(din, dout, bias):
    p = {"kernel": (L, din, dout)}
    if bias:
      p["bias"] = (L, dout)
    return p

  shapes = {
      "embed_tokens": {"embedding": (V, D)},
      "layers": {
          "input_layernorm": {"scale": (L, D)},
          "self_attn": {
              "q_proj": dense(D, q_out, config.attention_bias),
              "k_proj": dense(D, kv_out, config.attention_bias),
              "v_proj": dense(D, kv_out, config.attention_bias),
              "o_proj": dense(q_out, D, config.attention_out_bias),
          },
          "post_attention_layernorm": {"scale": (L, D)},
          "mlp": {
              "gate_proj": dense(D, F, config.mlp_bias),
              "up_proj": dense(D, F, config.mlp_bias),
              "down_proj": dense(F, D, config.mlp_bias),
          },
      },
      "norm": {"scale": (D,)},
  }
  if not config.tie_word_embeddings:
    shapes["lm_head"] = {"kernel": (D, V)}
  return shapes


def _check_tokens(tokens, config: LlamaConfig) -> jax.Array:
  if not isinstance(tokens, jax.core.Tracer):  # concrete: check the ids on the host
    host = np.asarray(tokens)
    if host.ndim == 2 and np.issubdtype(host.dtype, np.integer) and host.size:
      low, high = int(host.min()), int(host.max())
      if low < 0 or high >= config.vocab_size:
        raise TreeError(
            f"token ids must lie in [0, {config.vocab_size}), got range [{low}, {high}]")
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2:
    raise TreeError(f"tokens must be (batch, length), got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TreeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
  return tokens.astype(jnp.int32)


def _mask_or_ones(mask, shape) -> jax.Array:
  if mask is None:
    return jnp.ones(shape, bool)
  mask = jnp.asarray(mask)
  if mask.shape != tuple(shape):
    raise TreeError(f"attention_mask has shape {mask.shape}, expected {tuple(shape)}")
  return mask.astype(bool)


def _positions_from_mask(mask: jax.Array, start: jax.Array) -> jax.Array:
  pos = start[:, None] + jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
  return jnp.maximum(pos, 0)


def _inv_freq(config: LlamaConfig) -> np.ndarray:
  hd = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  if config.rope_type == "linear":
    inv = inv / config.rope_factor
  elif config.rope_type == "llama3":
    old = config.rope_original_max_positions
    low_wavelen = old / config.rope_low_freq_factor
    high_wavelen = old / config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor)
    mid = (1 - smooth) * inv / config.rope_factor + smooth * inv
    inv = np.where(wavelen > low_wavelen, inv / config.rope_factor,
                   np.where(wavelen < high_wavelen, inv, mid))
  if config.rope_freq_factors is not None:
    inv = inv / np.asarray(config.rope_freq_factors, np.float64)
  return inv.astype(np.float32)


#: Largest position count whose RoPE tables are baked into the program as constants.
_ROPE_TABLE_MAX = 8192


def _rope_tables(positions: jax.Array | None, config: LlamaConfig, length: int,
                 bound: int | None) -> tuple[jax.Array, jax.Array]:
  """``cos, sin`` of shape ``(B or 1, T, 1, hd)`` for ``positions`` (``None``: ``0..length-1``).

  ``bound``: when not ``None``, every position is known to lie in ``[0, bound)``; the tables
  are then computed on the host at trace time and looked up. Computing cos/sin in the
  program instead lets XLA fuse the transcendentals into every layer's q/k fusions (forward
  and backward) and recompute them there (see experiments/bench_llama_ablation.py).
  """
  if positions is None:
    bound = length
  if bound is not None and bound <= _ROPE_TABLE_MAX:
    angles = np.arange(bound, dtype=np.float32)[:, None] * _inv_freq(config)  # float32 product
    angles = np.concatenate([angles, angles], axis=-1).astype(np.float64)
    cos_t, sin_t = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    if positions is None:
      return jnp.asarray(cos_t)[None, :, None, :], jnp.asarray(sin_t)[None, :, None, :]
    idx = jnp.clip(positions, 0, bound - 1)
    return (jnp.take(jnp.asarray(cos_t), idx, axis=0)[:, :, None, :],
            jnp.take(jnp.asarray(sin_t), idx, axis=0)[:, :, None, :])
  if positions is None:
    positions = jnp.arange(length, dtype=jnp.int32)[None, :]
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(_inv_freq(config))
  angles = jnp.concatenate([angles, angles], axis=-1)  # (B, T, hd)
  return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale * normed.astype(x.dtype)


def _dense(x: jax.Array, p: dict) -> jax.Array:
  y = x @ p["kernel"]
  if "bias" in p:
    y = y + p["bias"]
  return y


def _attention_allowed(key_mask, q_slots, num_slots, config: LlamaConfig):
  """``(B, T, S)`` bool: which key slots each query may attend to (causal, window, padding).

  ``q_slots=None`` means the queries sit in slots ``0..T-1`` (no cache): the causal part is
  then a constant built on the host, so no layer recomputes it.
  """
  if q_slots is None:  # numpy throughout: a host constant
    qs, ks = np.arange(key_mask.shape[1])[:, None], np.arange(num_slots)[None, :]
  else:
    qs, ks = q_slots[:, None], jnp.arange(num_slots, dtype=jnp.int32)[None, :]
  allowed = ks <= qs  # (T, S)
  if config.sliding_window is not None:
    allowed = allowed & (qs - ks < config.sliding_window)
  return jnp.asarray(allowed)[None, :, :] & key_mask[:, None, :]  # (B, T, S)


def _attention(q, k, v, allowed, config: LlamaConfig):
  # q: (B, T, H, hd); k, v: (B, S, K, hd); allowed: (B, T, S) bool
  batch, length, heads, hd = q.shape
  kv_heads, slots = k.shape[2], k.shape[1]
  group = heads // kv_heads
  # head-major operands, with each kv head's query group stacked along the rows: two plain
  # batched matmuls over (B, K), (G*T, hd) x (hd, S) and (G*T, S) x (S, hd)
  qh = q.reshape(batch, length, kv_heads, group, hd).transpose(0, 2, 3, 1, 4)
  qh = qh.reshape(batch, kv_heads, group * length, hd)
  kh = k.transpose(0, 2, 1, 3)
  vh = v.transpose(0, 2, 1, 3)
  scores = jax.lax.dot_general(qh, kh, (((3,), (3,)), ((0, 1), (0, 1))),
                               preferred_element_type=jnp.float32)
  scores = scores.reshape(batch, kv_heads, group, length, slots) * (1.0 / math.sqrt(hd))
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  probs = probs.reshape(batch, kv_heads, group * length, slots)
  out = jax.lax.dot_general(probs, vh, (((3,), (2,)), ((0, 1), (0, 1))))  # (B, K, G*T, hd)
  out = out.reshape(batch, kv_heads, group, length, hd).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, length, heads * hd)


def _decoder(params, tokens, config: LlamaConfig, **kwargs):
  if not isinstance(params, dict) or "layers" not in params or "embed_tokens" not in params:
    raise TreeError(
        "params is not a Llama params tree (no 'embed_tokens'/'layers'); load it with "
        "jlora.models.llama_io.load_llama or make it with jlora.models.llama.init_llama")
  layers = params["layers"]
  if isinstance(layers, (list, tuple)) and len(layers) != config.num_layers:
    raise TreeError(f"params['layers'] is a list of {len(layers)} layers but the config has "
                    f"num_layers={config.num_layers}")
  # the soft prompt / prefix come as prefix= / prefix_kv=
  params = {k: v for k, v in params.items() if k not in ("prompt", "prefix")}
  return _decoder_jit(params, tokens, config=config, **kwargs)


def _prefix_of(params, config: LlamaConfig):
  """The prefix's keys/values ``(L, 2, N, K, hd)`` from ``params["prefix"]`` (projected if it has a
  projection, :func:`jlora.project_prefix`), or None."""
  if not isinstance(params, dict) or "prefix" not in params:
    return None
  if "prompt" in params:
    raise TreeError("params hold both a soft prompt and a prefix; use one of them")
  from jlora._methods.prompt import project_prefix  # noqa: PLC0415 - the methods import the models

  p = params["prefix"]
  want = (config.num_layers, 2, config.num_kv_heads, config.head_dim)
  emb = project_prefix(p) if isinstance(p, dict) and "embedding" in p else None
  if emb is None or jnp.ndim(emb) != 5 or tuple(jnp.shape(emb)[1:]) != want:
    raise TreeError(f"params['prefix'] must be {{'embedding': (N, {', '.join(map(str, want))})}} "
                    "(N keys and values per layer and kv head: a prefix, jlora.add_prefix), or "
                    f"{{'embedding': (N, {config.num_kv_heads * config.head_dim}), 'projection': ...}} "
                    f"whose projection gives them; got {jax.tree.map(jnp.shape, p)}")
  return jnp.transpose(emb, (1, 2, 0, 3, 4))


def _forward_with_prefix(params, tokens, config, pkv, attention_mask, positions, remat):
  batch, length = tokens.shape
  n = pkv.shape[2]
  mask = jnp.concatenate([jnp.ones((batch, n), bool), _mask_or_ones(attention_mask, tokens.shape)],
                         axis=1)
  if positions is None:  # the tokens' positions start at n (PEFT: the prefix is n past tokens)
    positions = _positions_from_mask(mask, jnp.zeros((batch,), jnp.int32))[:, n:]
  else:
    if jnp.shape(positions) != tokens.shape:
      raise TreeError(f"positions has shape {jnp.shape(positions)}, expected {tokens.shape}")
    positions = jnp.asarray(positions, jnp.int32) + n  # as PEFT offsets position_ids
  q_slots = n + jnp.arange(length, dtype=jnp.int32)
  logits, _ = _decoder(params, tokens, config, positions=positions, key_mask=mask, q_slots=q_slots,
                       cache=None, remat=remat, positions_bound=None, prefix_kv=pkv)
  return logits


def _forward_with_past(params, tokens, config, past_key_values, attention_mask, positions, remat):
  """``llama_forward`` with Hugging Face-layout ``past_key_values`` (see its docstring)."""
  if isinstance(params, dict) and ({"prompt", "prefix"} & set(params)):
    raise TreeError("past_key_values and a params['prompt'] / params['prefix'] at once; pass the "
                    "prefix one way: in the params, or as past_key_values (jlora.prepend_prefix)")
  batch, length = tokens.shape
  want = (batch, config.num_kv_heads, None, config.head_dim)
  pairs = list(past_key_values) if isinstance(past_key_values, (tuple, list)) else None
  shapes = None if pairs is None else [tuple(jnp.shape(x)) for pair in pairs for x in
                                       (pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else ())]
  n = shapes[0][2] if shapes and len(shapes[0]) == 4 else None
  if (pairs is None or len(pairs) != config.num_layers or len(shapes) != 2 * config.num_layers
      or any(len(x) != 4 or x != (want[0], want[1], n, want[3]) for x in shapes)):
    raise TreeError(f"past_key_values must be {config.num_layers} (key, value) pairs, each "
                    f"(B, K, N, hd) = ({batch}, {config.num_kv_heads}, N, {config.head_dim}) "
                    f"(Hugging Face's layout), got {shapes if shapes is not None else type(past_key_values)}")
  # (L, 2, B, N, K, hd): each layer's past keys and values, batched
  pkv = jnp.stack([jnp.stack([k, v]) for k, v in pairs]).transpose(0, 1, 2, 4, 3, 5)
  if attention_mask is None:
    mask = jnp.ones((batch, n + length), bool)
  else:
    if jnp.shape(attention_mask) != (batch, n + length):
      raise TreeError(f"with past_key_values of {n} slots the attention_mask covers the past and the "
                      f"tokens: ({batch}, {n} + {length}), got {jnp.shape(attention_mask)} (transformers' "
                      "layout; jlora.prepend_prefix extends the mask)")
    mask = jnp.asarray(attention_mask).astype(bool)
  if positions is None:
    positions = _positions_from_mask(mask, jnp.zeros((batch,), jnp.int32))[:, n:]
  elif jnp.shape(positions) != tokens.shape:
    raise TreeError(f"positions has shape {jnp.shape(positions)}, expected {tokens.shape}")
  q_slots = n + jnp.arange(length, dtype=jnp.int32)
  logits, _ = _decoder(params, tokens, config, positions=jnp.asarray(positions, jnp.int32),
                       key_mask=mask, q_slots=q_slots, cache=None, remat=remat,
                       positions_bound=None, prefix_kv=pkv)
  return logits


def _prompt_of(params, config: LlamaConfig):
  """The soft prompt ``params["prompt"]["embedding"]`` ``(N, D)``, or None."""
  if not isinstance(params, dict) or "prompt" not in params:
    return None
  p = params["prompt"]
  emb = p.get("embedding") if isinstance(p, dict) else None
  if emb is None or jnp.ndim(emb) != 2 or jnp.shape(emb)[1] != config.hidden_size:
    raise TreeError(f"params['prompt'] must be {{'embedding': (N, {config.hidden_size})}} (a soft "
                    f"prompt, jlora.add_prompt), got {jax.tree.map(jnp.shape, p)}")
  return emb


@functools.partial(jax.jit, static_argnames=("config", "remat", "positions_bound"))
def _decoder_jit(params, tokens, *, config: LlamaConfig, positions, key_mask, q_slots, cache,
                 remat, positions_bound=None, prefix=None, prefix_kv=None):
  embedding = params["embed_tokens"]["embedding"]
  dtype = embedding.dtype
  h = jnp.take(embedding, tokens, axis=0)
  if prefix is not None:  # the soft prompt before every row (PEFT's prompt tuning)
    p = jnp.broadcast_to(prefix.astype(dtype)[None], (h.shape[0],) + prefix.shape)
    h = jnp.concatenate([p, h], axis=1)
  batch, length = h.shape[:2]
  n_kv = 0 if prefix_kv is None else prefix_kv.shape[-3]  # (L, 2, [B,] N, K, hd)
  num_slots = n_kv + length if cache is None else cache[0].shape[2]
  cos, sin = _rope_tables(positions, config, length, positions_bound)
  allowed = _attention_allowed(key_mask, q_slots, num_slots, config)
  hd, nh, nkv = config.head_dim, config.num_heads, config.num_kv_heads

  def layer(h, xs):
    lp, cache_k, cache_v, pkv = xs
    attn_p = lp["self_attn"]
    x = _rms_norm(h, lp["input_layernorm"]["scale"], config.rms_norm_eps)
    q = _dense(x, attn_p["q_proj"]).reshape(batch, length, nh, hd)
    k = _dense(x, attn_p["k_proj"]).reshape(batch, length, nkv, hd)
    v = _dense(x, attn_p["v_proj"]).reshape(batch, length, nkv, hd)
    q = _apply_rope(q, cos, sin)
    k = _apply_rope(k, cos, sin)
    if pkv is not None:  # prefix tuning: n past keys/values before the tokens', as they are
      pk, pv = (p if p.ndim == 4 else jnp.broadcast_to(p[None], (batch,) + p.shape) for p in (pkv[0], pkv[1]))
      k = jnp.concatenate([pk.astype(k.dtype), k], 1)
      v = jnp.concatenate([pv.astype(v.dtype), v], 1)
    if cache_k is not None:
      cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
      cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
      k, v = cache_k.astype(dtype), cache_v.astype(dtype)
    attn = _attention(q, k, v, allowed, config)
    h = h + _dense(attn.astype(h.dtype), attn_p["o_proj"]).astype(h.dtype)
    x = _rms_norm(h, lp["post_attention_layernorm"]["scale"], config.rms_norm_eps)
    mlp_p = lp["mlp"]
    gated = jax.nn.silu(_dense(x, mlp_p["gate_proj"])) * _dense(x, mlp_p["up_proj"])
    h = h + _dense(gated, mlp_p["down_proj"]).astype(h.dtype)
    return h, (cache_k, cache_v)

  if remat:
    layer = jax.checkpoint(layer)
  if cache is None:
    cache_k = cache_v = index = None
  else:
    cache_k, cache_v, index = cache
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    # Unstacked layout (see unstack_layers): a Python loop over per-layer weights, so no
    # weight slice is copied out of a stacked array in the forward or the backward pass.
    ks, vs = [], []
    for i, lp in enumerate(layers):
      h, (k_i, v_i) = layer(h, (lp, None if cache is None else cache_k[i],
                                None if cache is None else cache_v[i],
                                None if prefix_kv is None else prefix_kv[i]))
      ks.append(k_i)
      vs.append(v_i)
    new_kv = (None, None) if cache is None else (jnp.stack(ks), jnp.stack(vs))
  else:
    h, new_kv = jax.lax.scan(layer, h, (layers, cache_k, cache_v, prefix_kv))
  h = _rms_norm(h, params["norm"]["scale"], config.rms_norm_eps)
  if config.tie_word_embeddings:
    logits = jnp.einsum("btd,vd->btv", h, embedding)
  else:
    logits = _dense(h, params["lm_head"])
  return logits.astype(jnp.float32), new_kv
