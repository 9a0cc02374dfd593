"""Quantised frozen bases (QLoRA): ``jlora.quantize(params, rules)`` with NF4, FP4 and Int8.

A quantised leaf is a :class:`QuantizedArray`, a registered pytree node that
holds packed integer codes and their scales and stands where the float kernel
was. It has the kernel's ``.shape`` and ``.dtype`` and gives the float kernel
back with ``.dequantize()``; :func:`jlora.wrap` accepts it as a base, so a
QLoRA tree is ``jlora.wrap(jlora.quantize(params, q_rules), lora_rules, key=...)``.

The layout follows bitsandbytes 0.50, which quantises a torch ``(out, in)``
weight row by row: for every output unit, blocks of ``block_size`` consecutive
weights along the input axis share one absmax scale. NF4 and FP4 store two
4-bit codes per byte (the first in the high nibble); with ``double_quant`` the
float32 absmax scales are themselves quantised to 8 bits (bitsandbytes'
dynamic map, blocks of 256, after subtracting their mean). Int8 is absmax per
output channel (``round(127 * w / max|w_row|)``), LLM.int8()'s weight format.
Stacked axes (scanned layers) lead every child, and each layer is quantised
on its own, exactly as bitsandbytes quantises one layer's weight.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"k": jax.random.normal(jax.random.key(0), (128, 32))}
  >>> q = jlora.quantize(params, {"k": jlora.NF4()})
  >>> q["k"].shape, q["k"].dtype, q["k"].data.dtype, round(q["k"].bits_per_weight(), 3)
  ((128, 32), dtype('float32'), dtype('uint8'), 4.127)
  >>> float(jnp.abs(q["k"].dequantize() - params["k"]).max()) < 0.3
  True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jlora._adapter import Axes, from_matrix, group_shapes, infer_axes, is_adapted, to_matrix
from jlora._errors import JloraError, SpecError

__all__ = ["NF4", "FP4", "Int8", "Q4_0", "Q4_1", "Q8_0", "QuantizedArray", "quantize", "is_quantized", "dense",
           "NF4_VALUES", "FP4_VALUES", "dynamic_map"]


class QuantizationError(JloraError, ValueError):
  """A leaf cannot be quantised as asked (an integer or 1-D leaf, a block size that does not fit)."""


# The 16 NF4 values of the QLoRA paper (Dettmers et al. 2023, Appendix E), as bitsandbytes stores them.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

# bitsandbytes' FP4 (e2m1, no infinities) in code order: code c and c + 8 are +-, normalised to max 1.
_FP4_POS = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
FP4_VALUES = np.array([v / 12.0 for v in _FP4_POS] + [-v / 12.0 for v in _FP4_POS], np.float32)


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
  """float32 ``linspace`` as torch's CPU kernel computes it (a float32 step, one fused rounding
  per value, the second half counted back from ``end``), so the codes are bit-identical."""
  a, b = np.float32(start), np.float32(end)
  step = np.float64(np.float32((b - a) / np.float32(n - 1)))
  i = np.arange(n, dtype=np.float64)
  first = np.float64(a) + step * i
  second = np.float64(b) - step * (n - 1 - i)
  return np.where(i < n // 2, first, second).astype(np.float32)


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
  """The signed 8-bit dynamic-exponent code (Dettmers 2015) that quantises NF4's absmax scales,
  equal bit for bit to bitsandbytes' ``create_dynamic_map()``."""
  data: list[float] = []
  non_sign = total_bits - 1
  extra = 2 ** (non_sign - max_exponent_bits) - 1
  p = np.float32(1.0)
  for i in range(max_exponent_bits):
    bounds = _linspace32(0.1, 1.0, int(2 ** (i + non_sign - max_exponent_bits) + 1))
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
    p = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
    data += (p * means).tolist() + (-p * means).tolist()
  if extra > 0:  # pragma: no cover - not with the defaults
    bounds = _linspace32(0.1, 1.0, extra + 1)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
    data += (p * means).tolist() + (-p * means).tolist()
  data += [0.0, 1.0]
  data += [0.0] * (2 ** total_bits - len(data))
  return np.sort(np.array(data, np.float32))


@dataclasses.dataclass(frozen=True)
class _QSpec:
  stack_axes: int | None = None

  kind: ClassVar[str] = ""

  def describe(self) -> str:
    return f"{type(self).__name__}()"

  def _check_common(self):
    if self.stack_axes is not None and (not isinstance(self.stack_axes, int) or self.stack_axes < 0):
      raise SpecError(f"{type(self).__name__} stack_axes must be a non-negative int, got {self.stack_axes!r}")


@dataclasses.dataclass(frozen=True)
class NF4(_QSpec):
  """4-bit NormalFloat with blockwise absmax scales (QLoRA's data type).

  Attributes:
    block_size: weights per absmax scale, consecutive along the input axis of
      one output unit (bitsandbytes' blocksize; 64 by default). Must divide
      the kernel's input size.
    double_quant: quantise the absmax scales to 8 bits (blocks of 256, mean
      subtracted), as bitsandbytes' ``compress_statistics=True``.
    stack_axes: leading stacked-layer axes (each layer is quantised on its own).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"k": jnp.ones((128, 4))}, {"k": jlora.NF4()})["k"]
    >>> q.spec.kind, q.data.shape, q.absmax.dtype  # 2 codes a byte; 8-bit scales (double quant)
    ('nf4', (256,), dtype('uint8'))
  """

  block_size: int = 64
  double_quant: bool = True
  stack_axes: int | None = None

  kind: ClassVar[str] = "nf4"

  def __post_init__(self):
    self._check_common()
    if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2 \
        or self.block_size % 2:
      raise SpecError(f"{type(self).__name__} block_size must be an even integer >= 2, got {self.block_size!r}")


@dataclasses.dataclass(frozen=True)
class FP4(NF4):
  """bitsandbytes' 4-bit float (e2m1) with blockwise absmax scales; ``double_quant`` is off by default.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"k": jnp.ones((64, 2))}, {"k": jlora.FP4()})["k"]
    >>> q.absmax.dtype, float(q.dequantize()[0, 0])
    (dtype('float32'), 1.0)
  """

  double_quant: bool = False

  kind: ClassVar[str] = "fp4"


@dataclasses.dataclass(frozen=True)
class Int8(_QSpec):
  """8-bit integers with one absmax scale per output channel (LLM.int8()'s weight format).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"k": jnp.full((3, 2), 0.5)}, {"k": jlora.Int8()})["k"]
    >>> q.data.dtype, q.absmax.shape, float(q.dequantize()[0, 0])
    (dtype('int8'), (2,), 0.5)
  """

  kind: ClassVar[str] = "int8"

  def __post_init__(self):
    self._check_common()


@dataclasses.dataclass(frozen=True)
class _GGML(_QSpec):
  """A llama.cpp (GGUF) block type: blocks of 32 weights along the input axis, float16 scales."""

  block_size: ClassVar[int] = 32

  def __post_init__(self):
    self._check_common()


@dataclasses.dataclass(frozen=True)
class Q4_0(_GGML):
  """llama.cpp's Q4_0: ``w = d * (q - 8)``, 4-bit ``q``, one float16 ``d`` per 32 weights (4.5 bits).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"k": jnp.ones((32, 2))}, {"k": jlora.Q4_0()})["k"]
    >>> q.bits_per_weight(), q.absmax.dtype
    (4.5, dtype('float16'))
  """

  kind: ClassVar[str] = "q4_0"


@dataclasses.dataclass(frozen=True)
class Q4_1(_GGML):
  """llama.cpp's Q4_1: ``w = d * q + m``, 4-bit ``q``, float16 ``d`` and ``m`` per 32 weights (5 bits).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"k": jnp.ones((32, 2))}, {"k": jlora.Q4_1()})["k"]
    >>> q.bits_per_weight(), float(q.dequantize()[0, 0])
    (5.0, 1.0)
  """

  kind: ClassVar[str] = "q4_1"


@dataclasses.dataclass(frozen=True)
class Q8_0(_GGML):
  """llama.cpp's Q8_0: ``w = d * q``, int8 ``q``, one float16 ``d`` per 32 weights (8.5 bits).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"k": jnp.ones((32, 2))}, {"k": jlora.Q8_0()})["k"]
    >>> q.bits_per_weight(), q.data.dtype
    (8.5, dtype('int8'))
  """

  kind: ClassVar[str] = "q8_0"


class QuantizedArray:
  """A quantised kernel: codes plus scales, standing where the float kernel was.

  Children (pytree leaves): ``data`` (packed uint8 codes, or int8 for Int8),
  ``absmax`` (float32 scales, or their uint8 codes under double quantisation),
  ``absmax2`` and ``offset`` (the second-level scales and the mean; ``None``
  without double quantisation). Static: the spec, the kernel axes, the
  kernel's shape and dtype. Every child leads with the kernel's stacked axes.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"k": jnp.ones((64, 8))}, {"k": jlora.NF4()})["k"]
    >>> q.shape, q.nbytes(), len(jax.tree.leaves(q))  # data, absmax codes, absmax2, offset
    ((64, 8), 272, 4)
  """

  __slots__ = ("data", "absmax", "absmax2", "offset", "spec", "axes", "shape", "dtype")

  def __init__(self, data, absmax, absmax2, offset, *, spec, axes: Axes, shape, dtype):
    self.data, self.absmax, self.absmax2, self.offset = data, absmax, absmax2, offset
    self.spec, self.axes, self.shape, self.dtype = spec, axes, tuple(int(d) for d in shape), jnp.dtype(dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def astype(self, dtype):
    """The dequantised kernel in ``dtype`` (so ``w.astype(f32)`` works on a quantised base)."""
    return self.dequantize().astype(dtype)

  def nbytes(self) -> int:
    """Bytes of storage, scales included."""
    return sum(int(np.prod(np.shape(c))) * jnp.dtype(c.dtype).itemsize
               for c in (self.data, self.absmax, self.absmax2, self.offset) if c is not None)

  def bits_per_weight(self) -> float:
    return 8.0 * self.nbytes() / self.size

  def dequantize(self) -> jax.Array:
    """The float kernel (in ``self.dtype``), computed as bitsandbytes dequantises (float32 math)."""
    stack, ins, outs = group_shapes(self.shape, self.axes)
    n_in, n_out = math.prod(ins), math.prod(outs)
    kids = [jax.lax.stop_gradient(c) if c is not None else None
            for c in (self.data, self.absmax, self.absmax2, self.offset)]
    data, absmax, absmax2, offset = kids
    kind = self.spec.kind
    if kind == "int8":
      wt = data.astype(jnp.float32) * absmax[..., None] * jnp.float32(7.874015718698502e-3)
    elif kind in ("q4_0", "q4_1", "q8_0"):  # as the gguf package dequantises (float32 math)
      d = absmax.astype(jnp.float32)[..., None]
      if kind == "q8_0":
        q = data.reshape(stack + (-1, 32)).astype(jnp.float32)
      else:
        b = data.reshape(stack + (-1, 16))
        q = jnp.concatenate([b & 15, b >> 4], axis=-1)  # low nibbles first, then high
        q = (q.astype(jnp.int8) - jnp.int8(8)).astype(jnp.float32) if kind == "q4_0" else q.astype(jnp.float32)
      wt = q * d
      if kind == "q4_1":
        wt = wt + offset.astype(jnp.float32)[..., None]
      wt = wt.reshape(stack + (n_out, n_in))
    else:
      if absmax2 is not None:
        absmax = _dq_blockwise(absmax, absmax2, 256) + offset[..., None]
      hi = (data >> 4).astype(jnp.int32)
      lo = (data & 15).astype(jnp.int32)
      codes = jnp.stack([hi, lo], axis=-1).reshape(stack + (n_out * n_in,))
      table = jnp.asarray(NF4_VALUES if self.spec.kind == "nf4" else FP4_VALUES)
      vals = table[codes].reshape(stack + (-1, self.spec.block_size))
      wt = (vals * absmax[..., None]).reshape(stack + (n_out, n_in))
    m = jnp.swapaxes(wt, -1, -2)
    return from_matrix(m, self.shape, self.axes).astype(self.dtype)

  def row_parts(self) -> tuple:
    """``(codes, scales, mins)`` of a 2-D table quantised row by row (an embedding: axes
    ``inputs=(1,), outputs=(0,)``), each with one leading entry per row (``mins``: Q4_1's, else
    None); double-quantised scales come decoded. Slice them and pass them to :meth:`rows_from`."""
    if self.axes != Axes((), (1,), (0,)):
      raise ValueError(f"row_parts needs a row-quantised 2-D table, not axes {self.axes}")
    n_rows = self.shape[0]
    absmax = self.absmax
    if self.absmax2 is not None:
      absmax = _dq_blockwise(absmax, self.absmax2, 256) + self.offset[..., None]
    mins = self.offset.reshape(n_rows, -1) if self.spec.kind == "q4_1" else None
    return self.data.reshape(n_rows, -1), absmax.reshape(n_rows, -1), mins

  def rows_from(self, codes, scales, mins) -> jax.Array:
    """The dequantised ``(k, n_in)`` rows that slices of :meth:`row_parts` hold."""
    k, int8 = codes.shape[0], self.spec.kind == "int8"
    spec = dataclasses.replace(self.spec, double_quant=False) if isinstance(self.spec, NF4) else self.spec
    part = QuantizedArray(codes if int8 else codes.reshape(-1), scales[:, 0] if int8 else scales.reshape(-1),
                          None, None if mins is None else mins.reshape(-1), spec=spec, axes=self.axes,
                          shape=(k, self.shape[1]), dtype=self.dtype)
    return part.dequantize()

  def take_rows(self, ids) -> jax.Array:
    """Dequantised rows ``w[ids]`` of a 2-D table quantised row by row, decoding only those
    rows. ``ids``: in-range ints, any shape."""
    flat = jnp.reshape(ids, (-1,))
    rows = self.rows_from(*(None if p is None else p[flat] for p in self.row_parts()))
    return rows.reshape(tuple(jnp.shape(ids)) + (self.shape[1],))

  def __repr__(self):
    return f"QuantizedArray({self.spec.kind}, shape={self.shape}, dtype={self.dtype.name}, spec={self.spec})"


jax.tree_util.register_pytree_with_keys(
    QuantizedArray,
    lambda q: (tuple((jax.tree_util.GetAttrKey(n), getattr(q, n)) for n in ("data", "absmax", "absmax2", "offset")),
               (q.spec, q.axes, q.shape, q.dtype.name)),
    lambda aux, ch: QuantizedArray(*ch, spec=aux[0], axes=aux[1], shape=aux[2], dtype=aux[3]),
    flatten_func=lambda q: ((q.data, q.absmax, q.absmax2, q.offset), (q.spec, q.axes, q.shape, q.dtype.name)),
)


def is_quantized(x: Any) -> bool:
  """True for a :class:`QuantizedArray` (use as ``is_leaf`` to keep it whole).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.quantize({"k": jnp.ones((64, 8)), "b": jnp.ones(8)}, {"k": jlora.Int8()})
    >>> [jlora.is_quantized(x) for x in jax.tree.leaves(tree, is_leaf=jlora.is_quantized)]
    [False, True]
  """
  return isinstance(x, QuantizedArray)


def is_whole(x: Any) -> bool:
  """True for an adapter or a quantised base: the nodes that tree walks keep as one leaf."""
  return is_adapted(x) or is_quantized(x)


def dense(w: Any) -> Any:
  """``w`` itself, or its dequantised value when it is a :class:`QuantizedArray`."""
  return w.dequantize() if isinstance(w, QuantizedArray) else w


def requantize_like(w: jax.Array, like: QuantizedArray) -> QuantizedArray:
  """``w`` quantised with ``like``'s spec and axes (``merge(..., requantize=True)``)."""
  return _quantize_leaf("", w, like.spec, axes=like.axes, dtype=like.dtype)


def _dq_blockwise(q, absmax2, block):
  code = jnp.asarray(dynamic_map())
  n = q.shape[-1]
  vals = code[q.astype(jnp.int32)]
  pad = (-n) % block
  if pad:
    vals = jnp.concatenate([vals, jnp.zeros(vals.shape[:-1] + (pad,), vals.dtype)], axis=-1)
  vals = vals.reshape(vals.shape[:-1] + (-1, block)) * absmax2[..., None]
  return vals.reshape(vals.shape[:-2] + (-1,))[..., :n]


def _q_blockwise(x, block):
  """bitsandbytes' quantize_blockwise with the dynamic map: uint8 codes and per-block absmax."""
  n = x.shape[-1]
  pad = (-n) % block
  xp = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (pad,), x.dtype)], axis=-1) if pad else x
  xb = xp.reshape(x.shape[:-1] + (-1, block))
  am = jnp.abs(xb).max(-1)
  # As bitsandbytes' CPU kernel: divide by the block's absmax, take the code at or below, and step
  # up only when the upper neighbour is strictly nearer (ties go down).
  normed = (xb / jnp.maximum(am, 1e-38)[..., None]).reshape(xp.shape)[..., :n]
  code = jnp.asarray(dynamic_map())
  lo = jnp.clip(jnp.searchsorted(code, normed, side="right") - 1, 0, code.shape[0] - 1)
  hi = jnp.minimum(lo + 1, code.shape[0] - 1)
  q = jnp.where(jnp.abs(normed - code[hi]) < jnp.abs(normed - code[lo]), hi, lo).astype(jnp.uint8)
  return q, am


def _quantize_leaf(path: str, leaf, spec, *, axes: Axes | None = None, dtype=None) -> QuantizedArray:
  what = type(spec).__name__
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise QuantizationError(
        f"{what} rule targets {path!r}, a {leaf.dtype} array; only floating-point kernels can be "
        "quantised. Narrow the rule's pattern (e.g. '**/kernel')")
  if leaf.ndim < 2:
    raise QuantizationError(
        f"{what} rule targets {path!r}, a {leaf.ndim}-D array of shape {tuple(leaf.shape)}; only "
        "kernels (>= 2-D) are quantised. Narrow the pattern, or map this path to None first")
  shape = tuple(leaf.shape)
  if axes is None:
    n_stack = spec.stack_axes or 0
    if path.rsplit("/", 1)[-1] == "embedding" and len(shape) - n_stack == 2:
      # a lookup table: quantised row by row, blocks along the features (as bitsandbytes does an
      # nn.Embedding's (vocab, features) weight and GGUF stores token_embd), so a lookup decodes
      # only its rows and a tied output projection contracts over the blocked axis
      axes = Axes(tuple(range(n_stack)), (n_stack + 1,), (n_stack,))
    else:
      axes = infer_axes(path, shape, spec)
  dtype = leaf.dtype if dtype is None else dtype
  stack, ins, outs = group_shapes(shape, axes)
  n_in, n_out = math.prod(ins), math.prod(outs)
  wt = jnp.swapaxes(to_matrix(jnp.asarray(leaf), axes, jnp.float32), -1, -2)  # stack + (out, in)
  if spec.kind == "int8":
    stats = jnp.abs(wt).max(-1)
    data = jnp.round(wt * (127.0 / stats)[..., None]).astype(jnp.int8)
    return QuantizedArray(data, stats, None, None, spec=spec, axes=axes, shape=shape, dtype=dtype)
  bs = spec.block_size
  if isinstance(spec, _GGML):
    _check_block(what, path, shape, n_in, bs)
    return _quantize_ggml(wt.reshape(stack + (-1, bs)), spec, axes=axes, shape=shape, dtype=dtype)
  _check_block(what, path, shape, n_in, bs)
  blocks = wt.reshape(stack + (-1, bs))
  absmax = jnp.abs(blocks).max(-1)
  scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, 1e-38))[..., None], -1, 1)
  table = NF4_VALUES if spec.kind == "nf4" else FP4_VALUES
  order = np.argsort(table, kind="stable")
  srt = table[order]
  q = jnp.searchsorted(jnp.asarray((srt[:-1] + srt[1:]) / 2), scaled, side="left")
  q = jnp.asarray(order.astype(np.int32))[q].astype(jnp.uint8).reshape(stack + (-1, 2))
  data = (q[..., 0] << 4) | q[..., 1]
  absmax = absmax.reshape(stack + (-1,))
  if not spec.double_quant:
    return QuantizedArray(data, absmax, None, None, spec=spec, axes=axes, shape=shape, dtype=dtype)
  try:  # the mean as bitsandbytes gets it (accurately summed), where the values are concrete
    offset = jnp.asarray(np.asarray(absmax, np.float64).mean(-1).astype(np.float32))
  except jax.errors.TracerArrayConversionError:
    offset = absmax.mean(-1)
  qa, am2 = _q_blockwise(absmax - offset[..., None], 256)
  return QuantizedArray(data, qa, am2, offset, spec=spec, axes=axes, shape=shape, dtype=dtype)


def _check_block(what, path, shape, n_in, bs):
  if n_in % bs:
    fix = (f"use a block size that divides {n_in} (e.g. "
           f"{math.gcd(n_in, bs) if math.gcd(n_in, bs) % 2 == 0 else 2})" if what in ("NF4", "FP4")
           else f"{what} blocks are always {bs} long: quantise this leaf with jlora.NF4(block_size=...) "
           "or jlora.Int8(), or leave it out of the rules")
    raise QuantizationError(
        f"{what}(block_size={bs}) at {path!r}: the input size {n_in} of kernel {shape} is not a "
        f"multiple of the block size, so a block would span two output units; {fix}")


def _f16(x):
  return x.astype(jnp.float16)


def _quantize_ggml(blocks, spec, *, axes, shape, dtype) -> QuantizedArray:
  """llama.cpp's reference quantisers (as the gguf package implements them), blocks of 32."""
  stack = blocks.shape[:-2]
  if spec.kind == "q8_0":
    d = jnp.abs(blocks).max(-1, keepdims=True) / jnp.float32(127)
    inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
    x = blocks * inv
    a = jnp.abs(x)
    fl = jnp.floor(a)
    q = (jnp.sign(x) * (fl + jnp.floor(2 * (a - fl)))).astype(jnp.int8)  # C roundf: halves away from 0
    return QuantizedArray(q.reshape(stack + (-1,)), _f16(d[..., 0]), None, None, spec=spec, axes=axes,
                          shape=shape, dtype=dtype)
  if spec.kind == "q4_0":
    imax = jnp.abs(blocks).argmax(-1)[..., None]
    mx = jnp.take_along_axis(blocks, imax, axis=-1)
    d = mx / jnp.float32(-8)
    inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
    q = jnp.clip(jnp.trunc(blocks * inv + jnp.float32(8.5)), 0, 15).astype(jnp.uint8)
    m = None
  else:
    mx, mn = blocks.max(-1, keepdims=True), blocks.min(-1, keepdims=True)
    d = (mx - mn) / jnp.float32(15)
    inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
    q = jnp.clip(jnp.trunc((blocks - mn) * inv + jnp.float32(0.5)), 0, 15).astype(jnp.uint8)
    m = _f16(mn[..., 0]).reshape(stack + (-1,))
  packed = q[..., :16] | (q[..., 16:] << 4)
  return QuantizedArray(packed.reshape(stack + (-1,)), _f16(d[..., 0]), None, m, spec=spec, axes=axes,
                        shape=shape, dtype=dtype)


_GGML_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
GGML_SPECS = {"Q4_0": Q4_0, "Q4_1": Q4_1, "Q8_0": Q8_0}


def from_ggml(rows: list[np.ndarray], spec: _GGML, *, shape, axes: Axes, dtype) -> QuantizedArray:
  """A :class:`QuantizedArray` from llama.cpp blocks: ``rows`` holds, per stacked layer (one
  entry when unstacked), the tensor's raw bytes as ``(out, bytes per row)`` (the ``gguf``
  reader's ``data``), rows in the output order the kernel uses. No value is dequantised."""
  nb = _GGML_BLOCK_BYTES[spec.kind]
  datas, ds, ms = [], [], []
  for raw in rows:
    b = np.ascontiguousarray(raw, np.uint8).reshape(raw.shape[0], -1, nb)
    ds.append(b[..., 0:2].copy().view(np.float16).reshape(-1))
    start = 4 if spec.kind == "q4_1" else 2
    if spec.kind == "q4_1":
      ms.append(b[..., 2:4].copy().view(np.float16).reshape(-1))
    qs = b[..., start:].reshape(-1)
    datas.append(qs.view(np.int8) if spec.kind == "q8_0" else qs)
  stacked = len(axes.stack) > 0
  pick = (lambda xs: jnp.asarray(np.stack(xs))) if stacked else (lambda xs: jnp.asarray(xs[0]))
  return QuantizedArray(pick(datas), pick(ds), None, pick(ms) if ms else None, spec=spec, axes=axes,
                        shape=shape, dtype=dtype)


def quantize(params: Any, rules) -> Any:
  """``params`` with the leaves that ``rules`` match replaced by :class:`QuantizedArray` s.

  Rules are as in :func:`jlora.wrap` (``{pattern: spec}``, first match wins;
  ``None`` leaves a leaf alone) with the specs :class:`jlora.NF4`,
  :class:`jlora.FP4` and :class:`jlora.Int8`. The input is not modified; on
  any error nothing is returned.

  Raises:
    QuantizationError: an integer or 1-D leaf matched, or a block size that
      does not divide a kernel's input size.
    RuleError: a rule matches no leaf.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"q": {"kernel": jnp.ones((64, 8))}, "norm": {"scale": jnp.ones(8)}}
    >>> tree = jlora.quantize(params, {"**/kernel": jlora.Int8()})
    >>> type(tree["q"]["kernel"]).__name__, tree["norm"]["scale"].shape
    ('QuantizedArray', (8,))
  """
  from jlora._tree import map_rules  # noqa: PLC0415 - import cycle

  def quantise(path, leaf, spec, rule):
    if not isinstance(spec, _QSpec):
      raise SpecError(f"rule {rule!r} maps {path!r} to {spec!r}; jlora.quantize takes jlora.NF4(), "
                      "jlora.FP4(), jlora.Int8(), jlora.Q4_0(), jlora.Q4_1() or jlora.Q8_0() "
                      "(adapters go through jlora.wrap afterwards)")
    if is_adapted(leaf) or is_quantized(leaf):
      raise QuantizationError(f"{path!r} is already a {type(leaf).__name__}; quantise the plain "
                              "params first, then jlora.wrap them")
    return _quantize_leaf(path, leaf, spec)
  return map_rules(params, rules, quantise)
