"""The adapter protocol: one contract that every kind of adapted leaf follows.

A method is a spec class (a frozen dataclass subclassing :class:`AdapterSpec`,
what a rule asks for) plus a leaf class (subclassing :class:`Adapter`, what
:func:`jlora.wrap` puts in the tree), registered once with :func:`register`.
Everything else in jlora (split/combine, merge/unmerge, ``lora(fn)``, the
optimizer mask, summaries, checkpoints, sharding) reads the leaf through this
contract and knows nothing about any one method.

A leaf declares:

* ``frozen`` / ``trainable``: the names of its array children (``w``, the base,
  is always the first frozen one); ``saved``: the children an adapter
  checkpoint stores (default: the trainable ones);
* ``layouts()``: for every child but ``w``, which base axis each of its axes
  follows (``None`` for its own axes, e.g. LoRA's rank): sharding follows;
* ``merged()`` / ``unmerged(m)``: the weight it stands for, and the base back
  from a merged weight;
* ``lazy(path)``: the value :func:`jlora.lora` contracts instead of the merged
  weight (a frozen base plus terms, see :mod:`jlora._lazy`), or ``None`` to
  let the rewrite use ``merged()``;
* its static data: the spec, the kernel :class:`Axes` and the base shape. The
  rule that matched is provenance only and never part of the tree structure,
  so equivalent rules give equal treedefs.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> tree = jlora.wrap({"k": jnp.ones((6, 4))}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
  >>> leaf = tree["k"]
  >>> leaf.kind, leaf.trainable, leaf.layouts()
  ('lora', ('a', 'b'), {'a': (0, None), 'b': (None, 1)})
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jlora._errors import AxesError, CheckpointError, TreeError

__all__ = [
    "Axes", "Adapter", "AdapterSpec", "register", "leaf_class", "kinds", "is_adapted",
    "infer_axes", "factor_shapes", "lowrank_delta", "acc_dtype", "spec_to_json", "spec_from_json",
]


@dataclasses.dataclass(frozen=True)
class Axes:
  """Which kernel axes are stacked layers, contracted inputs and produced outputs.

  Every kernel axis appears in exactly one group; stacked axes lead.
  LoRA's ``a`` has shape ``stack + in + (rank,)`` and ``b`` ``stack + (rank,) + out``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"layers": {"kernel": jnp.ones((4, 16, 8))}},
    ...                   {"layers/kernel": jlora.LoRA(2, stack_axes=1)}, key=jax.random.key(0))
    >>> tree["layers"]["kernel"].axes
    Axes(stack=(0,), inputs=(1,), outputs=(2,))
  """

  stack: tuple[int, ...]
  inputs: tuple[int, ...]
  outputs: tuple[int, ...]

  @property
  def order(self) -> tuple[int, ...]:
    return self.stack + self.inputs + self.outputs


class AdapterSpec:
  """Base class of method specs. A subclass is a frozen dataclass with ``adapt``.

  ``adapt(path, leaf, key)`` returns the adapted leaf (an :class:`Adapter`),
  or ``leaf`` itself to leave it alone (LoRA skips 1-D leaves so that broad
  globs never wrap biases by accident).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> spec = jlora.LoRA(2)
    >>> isinstance(spec, jlora.AdapterSpec), spec.describe()
    (True, 'LoRA(2)')
    >>> spec.adapt("k", jnp.ones((4, 4)), jax.random.key(0)).kind
    'lora'
  """

  def adapt(self, path: str, leaf: Any, key: jax.Array) -> Any:  # pragma: no cover - abstract
    raise NotImplementedError

  def describe(self) -> str:
    """A short label for summaries (the spec's non-default fields)."""
    parts = []
    for f in dataclasses.fields(self):  # type: ignore[arg-type]
      v = getattr(self, f.name)
      if f.default is not dataclasses.MISSING and v == f.default:
        continue
      parts.append(repr(v) if not parts and f.default is dataclasses.MISSING else f"{f.name}={v!r}")
    return f"{type(self).__name__}({', '.join(parts)})"


_REGISTRY: dict[str, type] = {}


class Adapter:
  """Base class of every adapted leaf: a frozen base ``w`` plus the method's children.

  Children may be ``None`` in the halves that :func:`jlora.split` returns.
  Subclasses set ``kind``, ``frozen``, ``trainable`` (and ``saved`` when a
  checkpoint must store more than the trainable children) and implement
  ``merged``, ``unmerged``, ``layouts`` and, for a low-rank evaluation in
  :func:`jlora.lora`, ``lazy``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> leaf = jlora.wrap({"k": jnp.ones((4, 3))}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))["k"]
    >>> isinstance(leaf, jlora.Adapter), leaf.children(), leaf.shape
    (True, ('w', 'a', 'b'), (4, 3))
    >>> trainable, frozen = jlora.split({"k": leaf})
    >>> trainable["k"].w is None, trainable["k"].shape
    (True, (4, 3))
  """

  kind: ClassVar[str] = ""
  spec_type: ClassVar[type] = object
  frozen: ClassVar[tuple[str, ...]] = ("w",)
  trainable: ClassVar[tuple[str, ...]] = ()
  saved: ClassVar[tuple[str, ...] | None] = None
  # True where ``lazy()`` reads the base's values (DoRA's column norm): a quantised base is then
  # dequantised before ``lazy()`` instead of at each contraction.
  lazy_reads_base: ClassVar[bool] = False
  # True for leaves holding several adapters (jlora.stack_adapters): ``lazy(path, ids)`` routes
  # each example to its own adapter.
  routed: ClassVar[bool] = False
  # False for leaves that are not a change of the weight (a bottleneck adapter on the layer's
  # output): ``merged()`` raises, and callers that would merge run ``jlora.lora(fn)`` instead.
  mergeable: ClassVar[bool] = True

  def __init__(self, *, spec: Any, axes: Axes | None, shape: tuple[int, ...] | None = None, **children):
    names = self.children()
    unknown = set(children) - set(names)
    if unknown:
      raise TypeError(f"{type(self).__name__} has no children {sorted(unknown)}; it has {list(names)}")
    if shape is None:  # the base shape defaults to the frozen base's
      if children.get("w") is None:
        raise TypeError(f"{type(self).__name__} needs shape= when w is None")
      shape = children["w"].shape
    for n in names:
      object.__setattr__(self, n, children.get(n))
    self.spec, self.axes, self.shape = spec, axes, tuple(int(d) for d in shape)

  # -- the structure ---------------------------------------------------------------------------

  @classmethod
  def children(cls) -> tuple[str, ...]:
    return cls.frozen + cls.trainable

  @classmethod
  def saved_children(cls) -> tuple[str, ...]:
    return cls.trainable if cls.saved is None else cls.saved

  def replace(self, **kw) -> Adapter:
    """A copy with some children (or ``spec`` / ``axes``) replaced."""
    fields = {n: getattr(self, n) for n in self.children()}
    fields.update(spec=self.spec, axes=self.axes, shape=self.shape)
    if kw.get("w") is not None and hasattr(kw["w"], "shape"):
      fields["shape"] = tuple(kw["w"].shape)
    fields.update(kw)
    return type(self)(**fields)

  def with_children(self, fn) -> Adapter:
    """A copy with every child ``c`` named ``n`` replaced by ``fn(n, c)`` (``None`` stays ``None``)."""
    return self.replace(**{n: (None if getattr(self, n) is None else fn(n, getattr(self, n)))
                           for n in self.children()})

  @property
  def dtype(self):
    """The base's dtype (``None`` on a trainable half, which has no base)."""
    return None if self.w is None else self.w.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def require(self, what: str, *names: str) -> None:
    """Raises TreeError when one of the named children (default: all) is missing."""
    missing = [n for n in (names or self.children()) if getattr(self, n) is None]
    if missing:
      raise TreeError(
          f"{what}: the {type(self).__name__} lacks {missing} (one half of jlora.split?); pass the "
          "whole tree, jlora.combine(trainable, frozen)")

  @classmethod
  def restore(cls, path: str, base, spec, axes, saved: dict) -> Adapter:
    """The leaf on the plain ``base`` with the checkpoint's ``saved`` children.

    When the saved children and ``w`` are all the children and the spec keeps
    the base as it is, they are put together directly; otherwise the leaf is
    rebuilt with ``spec.adapt`` (frozen children that derive from the spec and
    the base: a modified base, fixed random projections) and the saved
    children replace the fresh ones.
    """
    if set(cls.children()) == {"w", *saved} and not getattr(spec, "modifies_base", False):
      return cls(**{"w": base, **saved}, spec=spec, axes=axes, shape=tuple(base.shape))
    return spec.adapt(path, base, jax.random.key(0)).replace(**saved)

  # -- what each method implements -------------------------------------------------------------

  def layouts(self) -> dict[str, tuple[int | None, ...]]:
    """For every child but ``w``: the base axis each of its axes follows, or ``None``."""
    return {}

  def merged(self) -> jax.Array:  # pragma: no cover - abstract
    """The weight this leaf stands for, in the base's dtype (float32/64 arithmetic)."""
    raise NotImplementedError

  def unmerged(self, merged: jax.Array) -> jax.Array:  # pragma: no cover - abstract
    """The base back from ``merged()``'s value (which may have been served since)."""
    raise NotImplementedError

  def lazy(self, path: str):
    """The rewrite's value (see :mod:`jlora._lazy`), or ``None``: contract ``merged()``."""
    return None

  def base_count(self) -> int:
    """Frozen parameters counted in the total (as PEFT counts them)."""
    return _size(self.w)

  def trainable_count(self) -> int:
    return sum(_size(getattr(self, n)) for n in self.trainable)

  def trainable_bytes(self) -> int:
    return sum(_bytes(getattr(self, n)) for n in self.saved_children())

  def __repr__(self):
    def s(x):
      return None if x is None else f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', ()))}"
    kids = ", ".join(f"{n}={s(getattr(self, n))}" for n in self.children())
    return f"{type(self).__name__}({kids}, spec={self.spec.describe()})"


def register(cls: type) -> type:
  """Class decorator: registers an :class:`Adapter` subclass as a pytree node and a kind.

  The children are the pytree children (with ``GetAttrKey`` names, so paths
  read ``.../kernel/a``); ``(spec, axes, shape)`` is the static data.
  """
  if not (isinstance(cls, type) and issubclass(cls, Adapter)) or not cls.kind or cls.spec_type is object:
    raise TypeError("register() takes an Adapter subclass with a non-empty kind and a spec_type")
  if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
    raise TypeError(f"adapter kind {cls.kind!r} is already registered by {_REGISTRY[cls.kind].__name__}")
  names = cls.children()
  keys = tuple(jax.tree_util.GetAttrKey(n) for n in names)

  def flatten_with_keys(x):
    return tuple(zip(keys, (getattr(x, n) for n in names))), (x.spec, x.axes, x.shape)

  def flatten(x):
    return tuple(getattr(x, n) for n in names), (x.spec, x.axes, x.shape)

  def unflatten(aux, ch):
    obj = object.__new__(cls)
    for n, c in zip(names, ch):
      object.__setattr__(obj, n, c)
    obj.spec, obj.axes, obj.shape = aux
    return obj

  jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten_func=flatten)
  _REGISTRY[cls.kind] = cls
  return cls


def leaf_class(kind: str) -> type:
  """The registered leaf class of ``kind`` (CheckpointError for an unknown kind)."""
  try:
    return _REGISTRY[kind]
  except KeyError:
    raise CheckpointError(f"unknown adapter kind {kind!r} (known: {sorted(_REGISTRY)}); the file is "
                          "from a newer jlora or corrupt") from None


def kinds() -> tuple[str, ...]:
  """The registered adapter kinds."""
  return tuple(_REGISTRY)


def is_adapted(x: Any) -> bool:
  """True for the nodes jlora puts in a tree (every :class:`Adapter`): use as ``is_leaf``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.ones((4, 4))}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> [type(x).__name__ for x in jax.tree.leaves(tree, is_leaf=jlora.is_adapted)]
    ['LoraWeight']
  """
  return isinstance(x, Adapter)


# -- the kernel layout, in one place -------------------------------------------------------------

def infer_axes(path: str, shape: tuple[int, ...], spec: Any) -> Axes:
  """The kernel's (stack, in, out) axes, from the spec or inferred from the shape.

  The spec's ``stack_axes`` / ``in_axes`` / ``out_axes`` (absent: ``None``)
  decide. Explicit ``in_axes``/``out_axes`` win (the other axes are stacked
  and must lead); otherwise after ``stack_axes`` leading axes, a 2-D rest is a
  Dense ``(in, out)`` kernel, and a kernel under a path component containing
  ``conv`` is a Conv kernel ``(spatial..., in, out)``.
  """
  name = type(spec).__name__
  stack_axes = getattr(spec, "stack_axes", None)
  in_axes, out_axes = getattr(spec, "in_axes", None), getattr(spec, "out_axes", None)
  ndim = len(shape)
  fix = (f"pass {name}(..., stack_axes=N) for N leading stacked-layer axes (scanned layers), or "
         f"{name}(..., in_axes=..., out_axes=...) for a DenseGeneral / Einsum kernel")
  if in_axes is not None:
    norm = []
    for group in (in_axes, out_axes):
      g = []
      for ax in group:
        if not -ndim <= ax < ndim:
          raise AxesError(f"axis {ax} is out of range for kernel {path!r} of shape {shape}")
        g.append(ax % ndim)
      norm.append(tuple(g))
    ins, outs = norm
    if set(ins) & set(outs) or len(set(ins)) < len(ins) or len(set(outs)) < len(outs):
      raise AxesError(f"in_axes {in_axes} and out_axes {out_axes} overlap or repeat at {path!r}")
    rest = tuple(sorted(set(range(ndim)) - set(ins) - set(outs)))
    if rest != tuple(range(len(rest))):
      raise AxesError(
          f"kernel {path!r} of shape {shape}: axes {rest} are neither input nor output, so they "
          "must be leading stacked-layer axes; list them in in_axes/out_axes or move them first")
    if stack_axes is not None and stack_axes != len(rest):
      raise AxesError(
          f"kernel {path!r} of shape {shape}: stack_axes={stack_axes} disagrees with "
          f"in_axes={in_axes} and out_axes={out_axes}, which leave {len(rest)} stacked axes")
    return Axes(rest, ins, outs)
  n_stack = stack_axes or 0
  if n_stack > ndim - 2:
    raise AxesError(
        f"kernel {path!r} of shape {shape} cannot have {n_stack} stacked axes and still keep an "
        "input and an output axis; lower stack_axes")
  stack = tuple(range(n_stack))
  rest = ndim - n_stack
  if rest == 2:
    return Axes(stack, (n_stack,), (n_stack + 1,))
  if any("conv" in part.lower() for part in path.split("/")):
    return Axes(stack, tuple(range(n_stack, ndim - 1)), (ndim - 1,))
  raise AxesError(
      f"cannot infer which axes of kernel {path!r} (shape {shape}) are stacked layers, inputs "
      f"and outputs; {fix}")


def group_shapes(shape: tuple[int, ...], axes: Axes) -> tuple[tuple[int, ...], ...]:
  """``(stack, in, out)`` sizes of a kernel of ``shape``."""
  return tuple(tuple(shape[i] for i in g) for g in (axes.stack, axes.inputs, axes.outputs))


def factor_shapes(shape: tuple[int, ...], axes: Axes, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The shapes of a left factor ``stack + in + (rank,)`` and a right one ``stack + (rank,) + out``."""
  stack, ins, outs = group_shapes(shape, axes)
  return stack + ins + (rank,), stack + (rank,) + outs


def factor_layouts(axes: Axes) -> tuple[tuple[int | None, ...], tuple[int | None, ...]]:
  """The base axis each axis of a left / right factor follows (``None``: the rank axis)."""
  return axes.stack + axes.inputs + (None,), axes.stack + (None,) + axes.outputs


def to_matrix(w: jax.Array, axes: Axes, dtype=None) -> jax.Array:
  """The kernel as ``stack + (n_in, n_out)`` (axes moved and grouped)."""
  stack, ins, outs = group_shapes(tuple(w.shape), axes)
  x = w if dtype is None else w.astype(dtype)
  if axes.order != tuple(range(len(axes.order))):
    x = jnp.transpose(x, axes.order)
  return x.reshape(stack + (math.prod(ins), math.prod(outs)))


def from_matrix(m: jax.Array, shape: tuple[int, ...], axes: Axes) -> jax.Array:
  """Inverse of :func:`to_matrix`: a ``stack + (n_in, n_out)`` matrix in the kernel's layout."""
  stack, ins, outs = group_shapes(shape, axes)
  x = m.reshape(stack + ins + outs)
  order = axes.order
  if order != tuple(range(len(order))):
    x = jnp.transpose(x, np.argsort(order))
  return x


def lowrank_delta(a: jax.Array, b: jax.Array, axes: Axes, scale: float, shape) -> jax.Array:
  """``scale * a @ b`` in the kernel's layout, in float32 (float64 for float64 factors)."""
  acc = jnp.promote_types(acc_dtype(a.dtype), acc_dtype(b.dtype))
  n_stack = len(axes.stack)
  stack_shape = tuple(a.shape[:n_stack])
  r = a.shape[-1]
  a2 = a.astype(acc).reshape(stack_shape + (-1, r))
  b2 = b.astype(acc).reshape(stack_shape + (r, -1))
  d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
  if scale != 1.0:
    d = d * jnp.asarray(scale, acc)
  return from_matrix(d, tuple(shape), axes)


def vector_to_kernel(v: jax.Array, axes: Axes, side: str, ndim: int) -> jax.Array:
  """A per-input (``side="in"``: shape ``stack + in``) or per-output (``stack + out``) vector
  reshaped to broadcast against the kernel."""
  group = axes.inputs if side == "in" else axes.outputs
  have = axes.stack + group
  order = sorted(range(len(have)), key=lambda k: have[k])
  x = jnp.transpose(v, order) if order != list(range(len(have))) else v
  present = sorted(have)
  return x.reshape(tuple(x.shape[present.index(i)] if i in present else 1 for i in range(ndim)))


def acc_dtype(dtype) -> Any:
  """float64 for float64, else float32: the dtype jlora does its adapter arithmetic in."""
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


# -- specs as JSON -----------------------------------------------------------------------------

def spec_to_json(spec: Any) -> dict:
  """A spec dataclass as a JSON object (its fields; tuples become lists)."""
  def norm(v):
    if isinstance(v, tuple):
      return [norm(x) for x in v]
    return v
  return {f.name: norm(getattr(spec, f.name)) for f in dataclasses.fields(spec)}


def spec_from_json(cls: type, d: Any, where: str) -> Any:
  """Rebuilds ``cls`` from :func:`spec_to_json`'s dict (CheckpointError when malformed)."""
  if not isinstance(d, dict):
    raise CheckpointError(f"{where}: the stored {cls.__name__} spec is missing or not an object")
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - names
  if unknown:
    raise CheckpointError(f"{where}: the stored {cls.__name__} spec has unknown fields {sorted(unknown)}; "
                          "the checkpoint is from a newer jlora or corrupt")
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
  try:
    return cls(**kw)
  except Exception as e:  # noqa: BLE001 - the spec's own validation
    raise CheckpointError(f"{where}: the stored {cls.__name__} spec is invalid: {e}") from None


def _size(x) -> int:
  return 0 if x is None or not hasattr(x, "shape") else math.prod(x.shape)


def _bytes(x) -> int:
  return 0 if x is None or not hasattr(x, "dtype") else _size(x) * jnp.dtype(x.dtype).itemsize
