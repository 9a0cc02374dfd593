"""DoRA: weight-decomposed low-rank adaptation, ``m * (W + s A B) / ||W + s A B||_c``.

DoRA (Liu et al., 2024) splits a kernel into a magnitude per output unit and a
direction, trains the magnitude ``m`` directly and the direction through a LoRA
update. As in the paper (section 4.3) and PEFT, the column norm is treated as a
constant: it is recomputed from the current factors in every forward pass but
gets no gradient.

In ``jlora.lora(fn)`` the value is a LoRA term with a per-output scaling
``v = m / stop_gradient(||W + s A B||_c)``, so a contraction computes
``(x @ W + s (x @ A) @ B) * v``. The norm is computed without forming the
full-size ``W + s A B``: per output unit ``j``,
``||w_j||^2 + 2 s (A^T W)_j . b_j + s^2 b_j^T (A^T A) b_j``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jlora._adapter import Adapter, acc_dtype, factor_layouts, register, to_matrix, vector_to_kernel
from jlora._errors import SpecError
from jlora._lazy import Term, from_kernel
from jlora._methods.lora import LoRA, LoraWeight, adapter_dtype

__all__ = ["DoRA", "DoraWeight"]

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
  """The spec of a DoRA adapter: LoRA's fields (rank, alpha, dropout, init, rslora, dtype, axes).

  The adapted kernel is ``m * (W + s A @ B) / ||W + s A @ B||_c``, the norm
  taken per output unit over the kernel's input axes (PEFT's
  ``LoraConfig(use_dora=True)``). ``m`` starts at ``||W||_c`` and ``B`` at
  zero, so wrapping changes nothing (up to rounding). ``init`` is
  ``"kaiming"`` or ``"gaussian"``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> w = jnp.arange(12.0).reshape(4, 3)
    >>> tree = jlora.wrap({"k": w}, {"k": jlora.DoRA(2)}, key=jax.random.key(0))
    >>> tree["k"].m.shape, bool(jnp.allclose(jlora.merge(tree)["k"], w, atol=1e-5))
    ((3,), True)
  """

  def __post_init__(self):
    super().__post_init__()
    if self.init not in ("kaiming", "gaussian"):
      raise SpecError(f"DoRA init must be 'kaiming' or 'gaussian', got {self.init!r} (PiSSA / OLoRA "
                      "are LoRA inits: jlora.LoRA(r, init=...))")

  def adapt(self, path: str, leaf: Any, key: jax.Array) -> Any:
    lora = LoRA.adapt(self, path, leaf, key)
    if not isinstance(lora, LoraWeight):
      return lora  # a 1-D leaf under a broad glob: left alone, as LoRA does
    m = column_norm(leaf, lora.axes).astype(adapter_dtype(self, leaf.dtype))
    return DoraWeight(w=leaf, a=lora.a, b=lora.b, m=m, spec=self, axes=lora.axes, shape=lora.shape)


@register
class DoraWeight(Adapter):
  """A frozen base ``w``, LoRA factors ``a`` / ``b`` and a magnitude ``m`` (shape ``stack + out``).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> leaf = jlora.wrap({"k": jnp.ones((6, 4))}, {"k": jlora.DoRA(2)}, key=jax.random.key(0))["k"]
    >>> leaf.trainable, leaf.a.shape, leaf.b.shape, leaf.m.shape
    (('a', 'b', 'm'), (6, 2), (2, 4), (4,))
  """

  kind = "dora"
  spec_type = DoRA
  frozen = ("w",)
  lazy_reads_base = True  # the column norm of w + s*A@B
  trainable = ("a", "b", "m")

  @property
  def scale(self) -> float:
    return self.spec.scale

  @property
  def rank(self) -> int:
    return self.spec.rank

  def layouts(self):
    la, lb = factor_layouts(self.axes)
    return {"a": la, "b": lb, "m": self.axes.stack + self.axes.outputs}

  def norm(self) -> jax.Array:
    """``||W + s A B||_c`` per output unit (``stack + out``), float32, without a full-size matrix."""
    self.require("the DoRA norm", "w", "a", "b")
    return lowrank_column_norm(self.w, self.a, self.b, self.scale, self.axes)

  def direction(self) -> jax.Array:
    """``W + s A B`` in the kernel's layout (float32/64): full size."""
    w = jax.lax.stop_gradient(self.w)
    acc = acc_dtype(w.dtype)
    return w.astype(acc) + LoraWeight(w, self.a, self.b, spec=self.spec, axes=self.axes).delta().astype(acc)

  def merged(self):
    self.require("merge")
    v = self.direction()
    norm = jax.lax.stop_gradient(column_norm(v, self.axes))
    g = vector_to_kernel(self.m.astype(v.dtype) / norm, self.axes, "out", self.ndim)
    return (v * g).astype(self.w.dtype)

  def unmerged(self, merged):
    """The base back from ``merged``. The norm ``||W + s A B||_c`` cannot be read off a merged
    weight (whose columns have norm ``m``), so it is taken from this leaf's own base, as PEFT
    caches it at merge time; the leaf must therefore hold ``w``."""
    self.require("unmerge", "w", "a", "b", "m")
    acc = acc_dtype(merged.dtype)
    norm = column_norm(self.direction(), self.axes)
    g = vector_to_kernel(self.m.astype(acc) / norm, self.axes, "out", self.ndim)
    delta = LoraWeight(self.w, self.a, self.b, spec=self.spec, axes=self.axes).delta().astype(acc)
    return (merged.astype(acc) / g - delta).astype(merged.dtype)

  def lazy(self, path):
    v = self.m.astype(jnp.float32) / jax.lax.stop_gradient(self.norm())
    return from_kernel(self.w, self.axes, [Term(self.a, self.b, self.scale, self.spec.dropout)], v=v,
                       path=path)


def column_norm(w: jax.Array, axes) -> jax.Array:
  """The norm over a kernel's input axes, per stacked layer and output unit (``stack + out``)."""
  mat = to_matrix(w, axes, acc_dtype(w.dtype))
  n = jnp.sqrt(jnp.sum(mat * mat, axis=-2))
  stack = tuple(w.shape[i] for i in axes.stack)
  return n.reshape(stack + tuple(w.shape[i] for i in axes.outputs))


def lowrank_column_norm(w, a, b, scale: float, axes) -> jax.Array:
  """``||W + scale * a @ b||_c`` from ``W``'s column norms and small products (``stack + out``)."""
  acc = jnp.promote_types(acc_dtype(w.dtype), acc_dtype(a.dtype))
  wm = to_matrix(jax.lax.stop_gradient(w), axes, acc)                  # stack + (n_in, n_out)
  ns = len(axes.stack)
  r = a.shape[-1]
  am = a.astype(acc).reshape(a.shape[:ns] + (-1, r))                   # stack + (n_in, r)
  bm = b.astype(acc).reshape(b.shape[:ns] + (r, -1))                   # stack + (r, n_out)
  wsq = jnp.sum(wm * wm, axis=-2)                                      # stack + (n_out,)
  atw = jnp.einsum("...ir,...io->...ro", am, wm, precision=_HI)        # A^T W
  cross = jnp.sum(atw * bm, axis=-2)
  gram = jnp.einsum("...ir,...iq->...rq", am, am, precision=_HI)       # A^T A
  quad = jnp.sum(bm * jnp.einsum("...rq,...qo->...ro", gram, bm, precision=_HI), axis=-2)
  s = jnp.asarray(scale, acc)
  n = jnp.sqrt(jnp.maximum(wsq + 2 * s * cross + s * s * quad, 0.0))
  stack = tuple(w.shape[i] for i in axes.stack)
  return n.reshape(stack + tuple(w.shape[i] for i in axes.outputs))
