"""PiSSA and OLoRA: LoRA whose factors start from the base weight's SVD / QR, base kept as it is.

PEFT's PiSSA (``init_lora_weights="pissa"``) and OLoRA (``"olora"``) set the
factors from the base weight ``W`` and replace the base by the residual
``W_res = W - scale * A0 @ B0``, so that the model is unchanged at init and
trains ``W_res + scale * A @ B``. jlora keeps ``W`` itself in the tree and the
initial factors as frozen children, and computes

    W + scale * (A @ B - A0 @ B0)

which is ``W`` at init and PEFT's ``W_res + scale * A @ B`` after training.
So the base stays the one the tree was wrapped on (fingerprints, shared bases,
merged serving all work unchanged), an adapter checkpoint stores ``a, b, a0,
b0`` and loads bit-exactly without any SVD, and :func:`jlora.save_peft`
writes PEFT's documented conversion to a plain LoRA adapter on the original
base: rank ``2r``, ``lora_A = [A; A0]``, ``lora_B = [B, -B0]`` (see
:meth:`LoraInitWeight.as_lora`).

Factors, in jlora's ``(in, out)`` layout (PEFT works on the torch weight
``W.T`` of shape ``(out, in)``; the products agree, the factors up to the
signs an SVD / QR is free to choose):

* PiSSA: ``W = U S Vh`` (thin SVD), ``A0 = U_r sqrt(S_r / scale)``,
  ``B0 = sqrt(S_r / scale) Vh_r``, so ``scale * A0 @ B0`` is the best rank-r
  approximation of ``W``. ``"pissa_niter_K"`` uses a randomised SVD with ``K``
  subspace iterations (Halko et al. 2009, as PEFT's ``svd_lowrank``): cheaper
  on large kernels, an approximation of the same.
* OLoRA: ``W.T = Q R`` (thin QR of the torch weight), ``B0 = Q_r.T`` and
  ``A0 = R_r.T`` (the first r columns of Q and rows of R); no division by the
  scale, as PEFT does.
"""

from __future__ import annotations

import math
import re
import jax
import jax.numpy as jnp
from jax import lax

from jlora._adapter import (
    Adapter, acc_dtype, factor_layouts, group_shapes, lowrank_delta, register, to_matrix,
)
from jlora._lazy import Term, from_kernel
from jlora._methods.lora import LoRA, LoraWeight, adapter_dtype, leaf_key

__all__ = ["LoraInitWeight", "adapt_from_base", "initial_factors"]

_NITER = re.compile(r"pissa_niter_(\d+)")
_HI = lax.Precision.HIGHEST


def adapt_from_base(spec: LoRA, path: str, leaf: jax.Array, key: jax.Array, axes) -> LoraInitWeight:
  """The :class:`LoraInitWeight` of ``leaf`` (already checked: float, rank fits) for ``spec``."""
  a0, b0 = initial_factors(spec, leaf, axes, leaf_key(key, path))
  dtype = adapter_dtype(spec, leaf.dtype)
  a0, b0 = a0.astype(dtype), b0.astype(dtype)
  return LoraInitWeight(leaf, a0, b0, a0, b0, spec=spec, axes=axes)


def initial_factors(spec: LoRA, w: jax.Array, axes, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(A0, B0)`` of shapes ``stack + in + (r,)`` and ``stack + (r,) + out``, in float32/64.

  One SVD / QR per stacked layer (the linear algebra is batched over the stack).
  """
  stack, ins, outs = group_shapes(tuple(w.shape), axes)
  r, scale = spec.rank, spec.scale
  m = to_matrix(lax.stop_gradient(w), axes, acc_dtype(w.dtype))  # stack + (n_in, n_out)
  if spec.init == "olora":
    q, rr = jnp.linalg.qr(_t(m))  # torch's (out, in) weight: Q (out, k), R (k, in)
    a0, b0 = _t(rr[..., :r, :]), _t(q[..., :, :r])
  else:
    niter = _NITER.fullmatch(spec.init)
    if niter is None:
      u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    else:
      u, s, vh = _svd_lowrank(m, r, int(niter.group(1)), key)
    root = jnp.sqrt(s[..., :r] / scale)
    a0 = u[..., :, :r] * root[..., None, :]
    b0 = root[..., :, None] * vh[..., :r, :]
  return a0.reshape(stack + ins + (r,)), b0.reshape(stack + (r,) + outs)


@register
class LoraInitWeight(Adapter):
  """A frozen base ``w`` and initial factors ``a0``, ``b0``; trainable ``a``, ``b`` (from ``a0``, ``b0``).

  Made by ``jlora.LoRA(r, init="pissa" | "olora" | "pissa_niter_K")``. It
  stands for ``w + scale * (a @ b - a0 @ b0)`` (``w`` at init). PEFT's
  modified base is :meth:`residual`; :func:`jlora.save_peft` writes
  :meth:`as_lora`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
    >>> tree = jlora.wrap({"k": w}, {"k": jlora.LoRA(2, alpha=4, init="pissa")}, key=jax.random.key(0))
    >>> leaf = tree["k"]
    >>> leaf.kind, leaf.trainable, leaf.a.shape, leaf.b0.shape
    ('lora_init', ('a', 'b'), (6, 2), (2, 4))
    >>> bool(jnp.array_equal(jlora.merge(tree)["k"], w))  # unchanged at init
    True
    >>> s = np.linalg.svd(np.asarray(w), compute_uv=False)  # the residual drops the top 2 directions
    >>> bool(np.allclose(np.linalg.svd(np.asarray(leaf.residual()), compute_uv=False)[:2], s[2:], atol=1e-5))
    True
  """

  kind = "lora_init"
  spec_type = LoRA
  frozen = ("w", "a0", "b0")
  trainable = ("a", "b")
  saved = ("a", "b", "a0", "b0")

  def __init__(self, w=None, a0=None, b0=None, a=None, b=None, *, spec: LoRA, axes, shape=None):
    super().__init__(w=w, a0=a0, b0=b0, a=a, b=b, spec=spec, axes=axes, shape=shape)

  @property
  def scale(self) -> float:
    return self.spec.scale

  @property
  def rank(self) -> int:
    return self.spec.rank

  def delta(self) -> jax.Array:
    """``scale * (a @ b - a0 @ b0)`` in the kernel's layout, in float32 (float64 for float64 factors).

    The two products are computed alike, so the delta is exactly zero at init.
    """
    self.require("delta", "a", "b", "a0", "b0")
    a0, b0 = lax.stop_gradient(self.a0), lax.stop_gradient(self.b0)
    return (lowrank_delta(self.a, self.b, self.axes, self.scale, self.shape)
            - lowrank_delta(a0, b0, self.axes, self.scale, self.shape))

  def residual(self) -> jax.Array:
    """PEFT's modified base ``w - scale * a0 @ b0`` (in the base's dtype)."""
    self.require("residual", "w", "a0", "b0")
    acc = acc_dtype(self.w.dtype)
    d = lowrank_delta(self.a0, self.b0, self.axes, self.scale, self.shape)
    return (self.w.astype(acc) - d.astype(acc)).astype(self.w.dtype)

  def as_lora(self) -> LoraWeight:
    """The same weight as a plain LoRA on the original base: PEFT's PiSSA / OLoRA conversion.

    Rank ``2r`` with ``a' = [a, a0]`` and ``b' = [b; -b0]`` (so ``a' @ b' = a @ b - a0 @ b0``)
    and the alpha that keeps the scale: ``2 alpha`` (``sqrt(2) alpha`` with rsLoRA), as PEFT's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does. Dropout then acts on
    both halves (PEFT's converted adapter does the same); ``init`` becomes the default.
    """
    self.require("as_lora", "a", "b", "a0", "b0")
    s = self.spec
    alpha = s.effective_alpha * (math.sqrt(2.0) if s.rslora else 2.0)
    spec = LoRA(2 * s.rank, alpha=alpha, dropout=s.dropout, rslora=s.rslora, dtype=s.dtype,
                stack_axes=s.stack_axes, in_axes=s.in_axes, out_axes=s.out_axes)
    ns = len(self.axes.stack)
    a = jnp.concatenate([self.a, self.a0.astype(self.a.dtype)], axis=-1)
    b = jnp.concatenate([self.b, -self.b0.astype(self.b.dtype)], axis=ns)
    return LoraWeight(self.w, a, b, spec=spec, axes=self.axes, shape=self.shape)

  def layouts(self):
    la, lb = factor_layouts(self.axes)
    return {"a0": la, "b0": lb, "a": la, "b": lb}

  def merged(self):
    self.require("merge")
    w = lax.stop_gradient(self.w)
    acc = acc_dtype(w.dtype)
    return (w.astype(acc) + self.delta().astype(acc)).astype(w.dtype)

  def unmerged(self, merged):
    acc = acc_dtype(merged.dtype)
    return (merged.astype(acc) - self.delta().astype(acc)).astype(merged.dtype)

  def lazy(self, path):
    a0, b0 = lax.stop_gradient(self.a0), lax.stop_gradient(self.b0)
    # The initial term is part of PEFT's residual base: no dropout on it.
    return from_kernel(self.w, self.axes, [Term(self.a, self.b, self.scale, self.spec.dropout),
                                           Term(a0, -b0, self.scale, 0.0)], path=path)


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _svd_lowrank(m: jax.Array, r: int, niter: int, key: jax.Array):
  """A rank-``r`` randomised SVD ``(u, s, vh)`` of (a batch of) ``m``: a Gaussian range finder
  with ``niter`` subspace iterations, re-orthonormalised by QR at every step."""
  tall = m.shape[-2] >= m.shape[-1]
  x = m if tall else _t(m)
  g = jax.random.normal(key, x.shape[:-2] + (x.shape[-1], r), x.dtype)
  q = jnp.linalg.qr(jnp.matmul(x, g, precision=_HI))[0]
  for _ in range(niter):
    q = jnp.linalg.qr(jnp.matmul(_t(x), q, precision=_HI))[0]
    q = jnp.linalg.qr(jnp.matmul(x, q, precision=_HI))[0]
  u, s, vh = jnp.linalg.svd(jnp.matmul(_t(q), x, precision=_HI), full_matrices=False)
  u = jnp.matmul(q, u, precision=_HI)
  return (u, s, vh) if tall else (_t(vh), s, _t(u))
