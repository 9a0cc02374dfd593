"""Adapter specs: what a rule asks for on the leaves it matches."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jlora._errors import SpecError

__all__ = ["LoRA", "Full", "INITS"]

INITS = ("kaiming", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoRA:
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
      LoRA paper's random Gaussian ``A``). ``B`` is zeros in both.
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
      object.__setattr__(self, "alpha", float(self.alpha))
    if not 0.0 <= float(self.dropout) < 1.0:
      raise SpecError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
    object.__setattr__(self, "dropout", float(self.dropout))
    if self.init not in INITS:
      raise SpecError(f"LoRA init must be one of {INITS}, got {self.init!r}")
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


@dataclasses.dataclass(frozen=True)
class Full:
  """Train the matched leaves in full (PEFT's ``modules_to_save``; BitFit on biases).

  Example:
    >>> import jlora
    >>> rules = {"**/kernel": jlora.LoRA(4), "head/**": jlora.Full()}
  """
