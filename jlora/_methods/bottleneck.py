"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): a small MLP on a layer's output.

``Bottleneck(reduction_factor)`` on a kernel ``W`` with ``d`` outputs adds, to the
contraction's output ``y = x @ W``,

    y -> y + scaling * (up(act(down(y) + bias_down)) + bias_up)

with ``down`` ``(d, m)``, ``up`` ``(m, d)``, ``m = d // reduction_factor``. The
frozen ``W`` is contracted as it is and the adapter runs on the result, inside
:func:`jlora.lora`; it is a non-linear function of the output, so it has no
merged weight (:func:`jlora.merge` refuses it with a clear error).

*Houlsby* placement adapts the attention output projection and the feed-forward
output projection of every layer, *Pfeiffer* the feed-forward output only
(:func:`jlora.adapter_rules` writes either for the shipped models).

The layer's bias. jlora adapts a kernel leaf, so the adapter reads ``x @ W``:
the layer's own bias ``b`` is added by the model afterwards. AdapterHub's
adapter reads the whole output ``x @ W + b``; because ``down`` is linear, it
equals jlora's adapter with ``bias_down + b @ down`` in place of ``bias_down``
(the same function for every input), which :func:`from_adapterhub` applies.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _families
from jlora._adapter import Adapter, AdapterSpec, Axes, group_shapes, infer_axes, register
from jlora._errors import SpecError, TreeError
from jlora._lazy import ACTIVATIONS, Post, from_kernel
from jlora._methods.lora import adapter_dtype, check_float, is_array

__all__ = ["Bottleneck", "BottleneckWeight", "adapter_rules", "from_adapterhub"]

_ACTS = tuple(ACTIVATIONS)
_INITS = ("bert", "zero")


@dataclasses.dataclass(frozen=True)
class Bottleneck(AdapterSpec):
  """The spec of a bottleneck adapter on a kernel's output.

  Attributes:
    reduction_factor: the bottleneck width is ``outputs // reduction_factor``
      (at least 1), AdapterHub's ``reduction_factor`` (16 for its Houlsby and
      Pfeiffer configs).
    non_linearity: ``relu`` (Pfeiffer), ``swish`` (= ``silu``, Houlsby in
      AdapterHub), ``gelu`` (exact), ``gelu_new`` (tanh form), ``tanh``,
      ``sigmoid`` or ``identity``.
    scaling: the factor on the adapter's output (AdapterHub's ``scaling``, 1.0).
    width: the bottleneck width itself, overriding ``reduction_factor``.
    init: ``bert`` (AdapterHub's default: ``down`` and ``up`` from N(0, 0.02),
      biases zero, a near-identity start) or ``zero`` (``up`` and both biases
      zero: exactly the base at the start).
    dtype: the adapter's dtype; default float32 (float64 for a float64 base).
    stack_axes: how many leading kernel axes are stacked layers.
    in_axes / out_axes: the kernel's contracted and produced axes (inferred for
      2-D kernels and ``(L, in, out)`` stacks).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"out": {"kernel": jnp.eye(32)}}, {"out/kernel": jlora.Bottleneck(8)},
    ...                   key=jax.random.key(0))
    >>> leaf = tree["out"]["kernel"]
    >>> leaf.down.shape, leaf.up.shape, leaf.width
    ((32, 4), (4, 32), 4)
  """

  reduction_factor: float = 16.0
  non_linearity: str = "relu"
  scaling: float = 1.0
  width: int | None = None
  init: str = "bert"
  dtype: Any = None
  stack_axes: int | None = None
  in_axes: tuple[int, ...] | None = None
  out_axes: tuple[int, ...] | None = None

  def __post_init__(self):
    rf = self.reduction_factor
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0:
      raise SpecError(f"Bottleneck reduction_factor must be a positive number, got {rf!r}")
    object.__setattr__(self, "reduction_factor", float(rf))
    if self.non_linearity not in _ACTS:
      raise SpecError(f"Bottleneck non_linearity must be one of {list(_ACTS)}, got {self.non_linearity!r}")
    if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
      raise SpecError(f"Bottleneck scaling must be a number, got {self.scaling!r}")
    object.__setattr__(self, "scaling", float(self.scaling))
    if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int)
                                   or self.width < 1):
      raise SpecError(f"Bottleneck width must be a positive int (or None for reduction_factor), "
                      f"got {self.width!r}")
    if self.init not in _INITS:
      raise SpecError(f"Bottleneck init must be one of {list(_INITS)}, got {self.init!r}")
    if self.dtype is not None:
      dt = np.dtype(self.dtype)
      if not np.issubdtype(dt, np.floating) and dt.name != "bfloat16":
        raise SpecError(f"Bottleneck dtype must be a floating dtype, got {dt}")
      object.__setattr__(self, "dtype", dt.name)
    if self.stack_axes is not None and (isinstance(self.stack_axes, bool) or not isinstance(
        self.stack_axes, int) or self.stack_axes < 0):
      raise SpecError(f"Bottleneck stack_axes must be a non-negative int, got {self.stack_axes!r}")
    for name in ("in_axes", "out_axes"):
      v = getattr(self, name)
      if v is not None:
        object.__setattr__(self, name, (v,) if isinstance(v, int) else tuple(int(x) for x in v))
    if (self.in_axes is None) != (self.out_axes is None):
      raise SpecError("give Bottleneck in_axes and out_axes together (or neither, to infer them)")

  def width_for(self, n_out: int) -> int:
    return self.width if self.width is not None else max(1, int(n_out // self.reduction_factor))

  def adapt(self, path: str, leaf: Any, key: jax.Array) -> Any:
    if not is_array(leaf):
      return leaf
    check_float(path, leaf, "Bottleneck")
    shape = tuple(leaf.shape)
    if len(shape) - (self.stack_axes or 0) < 2:
      raise SpecError(
          f"Bottleneck rule targets {path!r}, a leaf of shape {shape} with no input and output "
          "axes; a bottleneck adapter reads a kernel's contraction output. Narrow the rule's "
          "pattern to kernels (e.g. '**/output/dense/kernel')")
    axes = infer_axes(path, shape, self)
    stack, _, outs = group_shapes(shape, axes)
    n_out = math.prod(outs)
    m = self.width_for(n_out)
    dt = adapter_dtype(self, leaf.dtype)
    kd, ku = jax.random.split(key)
    if self.init == "bert":
      down = (0.02 * jax.random.normal(kd, stack + outs + (m,), jnp.float32)).astype(dt)
      up = (0.02 * jax.random.normal(ku, stack + (m,) + outs, jnp.float32)).astype(dt)
    else:  # zero: the adapter adds nothing until trained (down random, so up gets gradients)
      bound = 1.0 / math.sqrt(n_out)
      down = jax.random.uniform(kd, stack + outs + (m,), jnp.float32, -bound, bound).astype(dt)
      up = jnp.zeros(stack + (m,) + outs, dt)
    return BottleneckWeight(leaf, down, up, jnp.zeros(stack + (m,), dt), jnp.zeros(stack + outs, dt),
                            spec=self, axes=axes)


@register
class BottleneckWeight(Adapter):
  """A frozen kernel ``w`` and a bottleneck MLP on its output (see :class:`jlora.Bottleneck`).

  ``down`` is ``stack + out + (m,)``, ``up`` ``stack + (m,) + out``,
  ``bias_down`` ``stack + (m,)`` and ``bias_up`` ``stack + out`` (output axes
  in the order of the kernel :class:`jlora.Axes`).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.eye(8)}, {"k": jlora.Bottleneck(width=2, init="zero")},
    ...                   key=jax.random.key(0))
    >>> x = jnp.ones((1, 8))
    >>> bool(jnp.allclose(jlora.lora(lambda p, x: x @ p["k"])(tree, x), x))  # zero init: the base
    True
    >>> tree["k"] = tree["k"].replace(bias_up=jnp.full((8,), 0.5))
    >>> jlora.lora(lambda p, x: x @ p["k"])(tree, x)[0, :3]
    Array([1.5, 1.5, 1.5], dtype=float32)
  """

  kind = "bottleneck"
  spec_type = Bottleneck
  frozen = ("w",)
  trainable = ("down", "up", "bias_down", "bias_up")
  mergeable = False

  def __init__(self, w=None, down=None, up=None, bias_down=None, bias_up=None, *, spec: Bottleneck,
               axes: Axes, shape=None):
    super().__init__(w=w, down=down, up=up, bias_down=bias_down, bias_up=bias_up, spec=spec,
                     axes=axes, shape=shape)

  @property
  def width(self) -> int:
    return int(self.bias_down.shape[-1]) if self.bias_down is not None else \
        self.spec.width_for(math.prod(self.shape[i] for i in self.axes.outputs))

  def layouts(self):
    s, o = self.axes.stack, self.axes.outputs
    return {"down": s + o + (None,), "up": s + (None,) + o, "bias_down": s + (None,), "bias_up": s + o}

  def merged(self):
    raise TreeError(
        "a bottleneck adapter (jlora.Bottleneck) is a small network on the layer's output, not a "
        "change of the weight, so it cannot be merged into the base: keep the adapted tree and call "
        "the model through jlora.lora(fn), or train a mergeable method (jlora.LoRA, jlora.IA3)")

  def unmerged(self, merged):
    return self.merged()

  def lazy(self, path):
    self.require(f"jlora.lora: the bottleneck adapter at {path!r}")
    post = Post(self.down, self.up, self.bias_down, self.bias_up, self.spec.non_linearity,
                self.spec.scaling)
    return from_kernel(self.w, self.axes, [], post=post, path=path)


def adapter_rules(family: str, placement: str = "houlsby", **spec: Any) -> list[tuple[str, Any]]:
  """The ``jlora.wrap`` rules of bottleneck adapters for a shipped model family.

  ``placement="houlsby"``: after the attention output projection and after the
  feed-forward output of every layer; ``"pfeiffer"``: after the feed-forward
  output only. ``spec`` goes to :class:`jlora.Bottleneck` (``stack_axes=1`` is
  set for the stacked layers). Defaults follow AdapterHub's configs:
  ``swish`` for Houlsby, ``relu`` for Pfeiffer, ``reduction_factor=16``.

  Example:
    >>> import jlora
    >>> [(p, s.non_linearity) for p, s in jlora.adapter_rules("bert", "pfeiffer")]
    [('layers/output/dense/kernel', 'relu')]
  """
  fam = _families.family(family)
  if placement not in fam.adapter_targets:
    raise SpecError(f"adapter placement must be one of {sorted(fam.adapter_targets)}, got {placement!r}")
  spec.setdefault("non_linearity", "swish" if placement == "houlsby" else "relu")
  spec.setdefault("stack_axes", 1)
  b = Bottleneck(**spec)
  return [(f"{t}/kernel", b) for t in fam.adapter_targets[placement]]


def from_adapterhub(leaf: BottleneckWeight, down_weight, down_bias, up_weight, up_bias,
                    layer_bias=None, *, layer: int | None = None) -> BottleneckWeight:
  """``leaf`` with an AdapterHub adapter's torch tensors (as numpy arrays) put in.

  ``down_weight`` ``(m, d)`` / ``up_weight`` ``(d, m)`` are torch Linear weights
  (``adapter_down.0`` / ``adapter_up``); ``layer_bias`` is the adapted layer's
  own bias ``b``, which AdapterHub's adapter reads and jlora's does not: it is
  folded in as ``bias_down + b @ down``. ``layer`` picks the layer of a stacked leaf.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> w, b = np.eye(4, dtype=np.float32), np.full(4, 0.5, np.float32)  # a Linear: x @ w + b
    >>> tree = jlora.wrap({"k": jnp.asarray(w)}, {"k": jlora.Bottleneck(width=2)}, key=jax.random.key(0))
    >>> dw, uw = np.ones((2, 4), np.float32), np.ones((4, 2), np.float32)  # torch layouts
    >>> tree["k"] = jlora.from_adapterhub(tree["k"], dw, np.zeros(2), uw, np.zeros(4), layer_bias=b)
    >>> y = jlora.lora(lambda p, x: x @ p["k"])(tree, jnp.ones((1, 4))) + b
    >>> z = np.ones(4) + b                       # AdapterHub: z + up(relu(down(z)))
    >>> np.allclose(y[0], z + uw @ np.maximum(dw @ z, 0))
    True
  """
  down = np.asarray(down_weight).T
  bd = np.asarray(down_bias)
  if layer_bias is not None:
    bd = bd + np.asarray(layer_bias) @ down
  vals = {"down": down, "up": np.asarray(up_weight).T, "bias_down": bd, "bias_up": np.asarray(up_bias)}
  out = {}
  for name, v in vals.items():
    cur = getattr(leaf, name)
    want = cur.shape[1:] if layer is not None else cur.shape
    if tuple(v.shape) != tuple(want):
      raise SpecError(f"from_adapterhub: {name} has shape {tuple(v.shape)}, the leaf needs {tuple(want)}")
    out[name] = cur.at[layer].set(v.astype(cur.dtype)) if layer is not None else jnp.asarray(v, cur.dtype)
  return leaf.replace(**out)
