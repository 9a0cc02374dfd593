"""LoRA (``W + scale * A @ B``) and full training of a leaf (``Full``): the first two methods.

Every other method follows the same shape: a spec with ``adapt``, a leaf
registered with :func:`jlora._adapter.register`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._adapter import (
    Adapter, AdapterSpec, acc_dtype, factor_layouts, factor_shapes, group_shapes, infer_axes,
    lowrank_delta, register,
)
from jlora._errors import SpecError
from jlora._lazy import Term, from_kernel

__all__ = ["LoRA", "Full", "LoraWeight", "FullWeight", "INITS"]

INITS = ("kaiming", "gaussian", "pissa", "olora")  # and "pissa_niter_K" (jlora/_methods/lora_init.py)


@dataclasses.dataclass(frozen=True)
class LoRA(AdapterSpec):
  """The spec of one low-rank adapter: ``W + scale * A @ B`` with ``W`` frozen.

  ``scale`` is ``alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora=True``).
  When ``alpha`` is left out it equals ``rank``, so the default scale is 1.0
  for every rank (never the surprising ``1 / rank``); with ``rslora=True`` and no
  ``alpha`` the scale is ``sqrt(rank)``. ``A`` has shape ``(in, rank)`` and ``B``
  ``(rank, out)`` in Flax's ``(in, out)`` kernel layout; ``B`` starts at zero,
  so a freshly wrapped tree computes exactly what the original did.

  Attributes:
    rank: the adapter rank r (>= 1, <= min(in, out) of the targeted kernel).
    alpha: the scaling numerator (> 0); default ``rank``.
    dropout: dropout rate on the adapter's input, as PEFT does (applied by
      :func:`jlora.lora`'s factored path; merging ignores it).
    init: ``"kaiming"`` (default: ``A`` uniform in ``+-1/sqrt(fan_in)``, as
      PEFT's ``kaiming_uniform_(a=sqrt(5))``) or ``"gaussian"`` (``A`` normal
      with std ``1/rank``, as PEFT's ``init_lora_weights="gaussian"`` and the
      LoRA paper's random Gaussian ``A``). ``B`` is zeros in both. ``"pissa"``,
      ``"pissa_niter_K"`` and ``"olora"`` start ``A`` and ``B`` from the base's
      SVD / QR and keep those initial factors as frozen children (a
      :class:`jlora.LoraInitWeight`, see ``docs/method_lora_init.md``).
    rslora: use the rank-stabilised scale ``alpha / sqrt(rank)``.
    dtype: the adapters' dtype; default float32 (float64 for a float64 base).
    stack_axes: how many leading axes of the kernel are stacked layers (scanned
      models keep kernels as ``(L, in, out)``); each layer gets its own adapter.
    in_axes: the kernel axes contracted with the input (DenseGeneral / Einsum /
      Conv), e.g. ``(0,)``; inferred for 2-D kernels and Conv kernels.
    out_axes: the kernel axes produced, e.g. ``(1, 2)`` for a
      ``(d, heads, head_dim)`` kernel.

  Example:
    >>> import jlora
    >>> spec = jlora.LoRA(8, alpha=16)
    >>> spec.scale
    2.0
    >>> jlora.LoRA(4, rslora=True, alpha=8).scale
    4.0
  """

  rank: int
  alpha: float | None = None
  dropout: float = 0.0
  init: str = "kaiming"
  rslora: bool = False
  dtype: Any = None
  stack_axes: int | None = None
  in_axes: tuple[int, ...] | None = None
  out_axes: tuple[int, ...] | None = None

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
      raise SpecError(f"LoRA rank must be a positive integer, got {self.rank!r}; use e.g. LoRA(8)")
    object.__setattr__(self, "rank", int(self.rank))
    if self.alpha is not None:
      if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.number)) or not (
          self.alpha > 0 and math.isfinite(self.alpha)):
        raise SpecError(
            f"LoRA alpha must be a positive finite number, got {self.alpha!r}; leave it out for "
            "alpha = rank (scale 1.0), or pass e.g. alpha=2 * rank")
      # alpha = rank is the default: store it as None, so equal adapters have equal specs
      object.__setattr__(self, "alpha", None if float(self.alpha) == self.rank else float(self.alpha))
    if not 0.0 <= float(self.dropout) < 1.0:
      raise SpecError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
    object.__setattr__(self, "dropout", float(self.dropout))
    if not isinstance(self.init, str) or not (self.init in INITS or is_base_init(self.init)):
      raise SpecError(f"LoRA init must be one of {INITS} or 'pissa_niter_K' (K >= 0 randomised-SVD "
                      f"subspace iterations, e.g. 'pissa_niter_4'), got {self.init!r}")
    if self.dtype is not None:
      dt = np.dtype(self.dtype)
      if not np.issubdtype(dt, np.floating) and dt.name != "bfloat16":
        raise SpecError(f"LoRA dtype must be a floating dtype, got {dt}")
      object.__setattr__(self, "dtype", dt.name)
    if self.stack_axes is not None and (not isinstance(self.stack_axes, int) or self.stack_axes < 0):
      raise SpecError(f"LoRA stack_axes must be a non-negative int, got {self.stack_axes!r}")
    for name in ("in_axes", "out_axes"):
      v = getattr(self, name)
      if v is not None:
        v = (v,) if isinstance(v, int) else tuple(int(x) for x in v)
        if not v:
          raise SpecError(f"LoRA {name} must name at least one axis")
        object.__setattr__(self, name, v)
    if (self.in_axes is None) != (self.out_axes is None):
      raise SpecError("give LoRA in_axes and out_axes together (or neither, to infer them)")

  @property
  def effective_alpha(self) -> float:
    return float(self.rank) if self.alpha is None else self.alpha

  @property
  def scale(self) -> float:
    """The factor on ``A @ B``: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
    denom = math.sqrt(self.rank) if self.rslora else self.rank
    return self.effective_alpha / denom

  def adapt(self, path: str, leaf: Any, key: jax.Array) -> Any:
    if not is_array(leaf) or leaf.ndim < 2:
      return leaf  # biases, norm scales and scalars are never wrapped by accident
    check_float(path, leaf, type(self).__name__)
    shape = tuple(leaf.shape)
    axes = infer_axes(path, shape, self)
    _, ins, outs = group_shapes(shape, axes)
    n_in, n_out = math.prod(ins), math.prod(outs)
    if self.rank > min(n_in, n_out):
      raise SpecError(
          f"{type(self).__name__} rank {self.rank} at {path!r} exceeds min(in, out) = min({n_in}, "
          f"{n_out}) of its kernel {shape}; use rank <= {min(n_in, n_out)}")
    if is_base_init(self.init):
      from jlora._methods.lora_init import adapt_from_base  # noqa: PLC0415 - it builds on this module
      return adapt_from_base(self, path, leaf, key, axes)
    dtype = adapter_dtype(self, leaf.dtype)
    a_shape, b_shape = factor_shapes(shape, axes, self.rank)
    a = init_a(self.init, leaf_key(key, path), a_shape, n_in, self.rank)
    return LoraWeight(leaf, a.astype(dtype), jnp.zeros(b_shape, dtype), spec=self, axes=axes)


@dataclasses.dataclass(frozen=True)
class Full(AdapterSpec):
  """Train the matched leaves in full (PEFT's ``modules_to_save``; BitFit on biases).

  Example:
    >>> import jlora
    >>> rules = {"**/kernel": jlora.LoRA(4), "head/**": jlora.Full()}
  """

  def adapt(self, path: str, leaf: Any, key: jax.Array) -> Any:
    if not is_array(leaf):
      return leaf
    check_float(path, leaf, "Full")
    return FullWeight(leaf, spec=self, axes=None)


@register
class LoraWeight(Adapter):
  """A frozen base ``w`` with trainable low-rank factors ``a`` and ``b``.

  A registered pytree node: its children are ``w``, ``a`` and ``b`` (any of
  them may be ``None`` in the halves that :func:`jlora.split` returns); its
  spec, axes and base shape are static. It stands in the params tree where
  the original array was.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"kernel": jnp.ones((6, 4))}, {"kernel": jlora.LoRA(2)},
    ...                   key=jax.random.key(0))
    >>> leaf = tree["kernel"]
    >>> leaf.w.shape, leaf.a.shape, leaf.b.shape, leaf.scale
    ((6, 4), (6, 2), (2, 4), 1.0)
  """

  kind = "lora"
  spec_type = LoRA
  frozen = ("w",)
  trainable = ("a", "b")

  def __init__(self, w=None, a=None, b=None, *, spec: LoRA, axes, shape=None):
    super().__init__(w=w, a=a, b=b, spec=spec, axes=axes, shape=shape)

  @property
  def scale(self) -> float:
    return self.spec.scale

  @property
  def rank(self) -> int:
    return self.spec.rank

  def delta(self) -> jax.Array:
    """``scale * A @ B`` in the kernel's layout, in float32 (float64 for float64 factors)."""
    self.require("delta", "a", "b")
    return lowrank_delta(self.a, self.b, self.axes, self.scale, self.shape)

  def layouts(self):
    la, lb = factor_layouts(self.axes)
    return {"a": la, "b": lb}

  def merged(self):
    self.require("merge")
    w = jax.lax.stop_gradient(self.w)
    acc = acc_dtype(w.dtype)
    return (w.astype(acc) + self.delta().astype(acc)).astype(w.dtype)

  def unmerged(self, merged):
    acc = acc_dtype(merged.dtype)
    return (merged.astype(acc) - self.delta().astype(acc)).astype(merged.dtype)

  def lazy(self, path):
    return from_kernel(self.w, self.axes, [Term(self.a, self.b, self.scale, self.spec.dropout)],
                       path=path)


@register
class FullWeight(Adapter):
  """A leaf trained in full (from a :class:`jlora.Full` rule). Its child is ``w``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"bias": jnp.zeros(3)}, {"bias": jlora.Full()}, key=jax.random.key(0))
    >>> type(tree["bias"]).__name__
    'FullWeight'
  """

  kind = "full"
  spec_type = Full
  frozen = ()
  trainable = ("w",)

  def __init__(self, w=None, *, spec: Full | None = None, axes=None, shape=None):
    super().__init__(w=w, spec=Full() if spec is None else spec, axes=None, shape=shape)

  def merged(self):
    self.require("merge")
    return self.w

  def unmerged(self, merged):
    return merged

  def base_count(self) -> int:
    return 0


# -- helpers shared by the methods -------------------------------------------------------------

def is_base_init(init) -> bool:
  """True for the inits that derive the factors from the base: ``"pissa"``, ``"olora"``, ``"pissa_niter_K"``."""
  return isinstance(init, str) and re.fullmatch(r"pissa|olora|pissa_niter_\d+", init) is not None


def leaf_key(key: jax.Array, path: str) -> jax.Array:
  """A leaf's own PRNG key, from its path: adding a rule never changes other leaves' init."""
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init_a(init: str, key: jax.Array, shape, n_in: int, rank: int) -> jax.Array:
  """LoRA's ``A``: PEFT's kaiming-uniform (bound ``1/sqrt(fan_in)``) or gaussian (std ``1/rank``)."""
  if init == "gaussian":
    return jax.random.normal(key, shape, jnp.float32) / rank
  bound = 1.0 / math.sqrt(n_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def adapter_dtype(spec: Any, base_dtype) -> Any:
  """The spec's dtype, or float32 (float64 on a float64 base)."""
  if getattr(spec, "dtype", None) is not None:
    return jnp.dtype(spec.dtype)
  return acc_dtype(base_dtype)


def is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (str, bytes))


def check_float(path: str, leaf, what: str) -> None:
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise SpecError(
        f"{what} rule targets {path!r}, a {leaf.dtype} array of shape {tuple(leaf.shape)}; only "
        "floating-point leaves can be adapted. Narrow the rule's pattern (e.g. '**/kernel') or "
        "exclude this path with an earlier rule mapping it to None")
