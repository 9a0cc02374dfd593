"""Many LoRA adapters on one frozen base: ``StackedLoRA`` / ``StackedLoraWeight``.

A stacked leaf holds the base ``w`` once and N adapters' factors on a leading
adapter axis, each padded with zeros to the largest rank R (exact: a zero
column of ``a`` meets a zero row of ``b``, and both get zero gradients):

    a: (N,) + stack + in + (R,)      b: (N,) + stack + (R,) + out

:func:`jlora.lora` evaluates it for a mixed batch: given ``adapter_ids`` (one
id per batch row), each row's contraction uses its own adapter's factors
(gathered, so the cost is one adapter's whatever N is). The tree-level API
(``stack_adapters``, ``select_adapter``, ``add_adapter``, ``delete_adapter``)
lives in :mod:`jlora._multi`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from jlora._adapter import Adapter, AdapterSpec, factor_layouts, register
from jlora._errors import SpecError, TreeError
from jlora._lazy import Term, from_kernel
from jlora._methods.lora import LoRA, LoraWeight

__all__ = ["StackedLoRA", "StackedLoraWeight"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True)
class StackedLoRA(AdapterSpec):
  """The spec of a stacked leaf: N named LoRA adapters (``ranks[i]``, ``alphas[i]``, ...).

  Built by :func:`jlora.stack_adapters` from the adapters' own :class:`jlora.LoRA`
  specs; the kernel layout fields (``dtype``, ``stack_axes``, ``in_axes``,
  ``out_axes``) are shared.

  Example:
    >>> import jlora
    >>> spec = jlora.StackedLoRA.of(("a", "b"), (jlora.LoRA(4, alpha=8), jlora.LoRA(2)))
    >>> spec.count, spec.rank, spec.scales
    (2, 4, (2.0, 1.0))
    >>> spec.specs[1].describe()
    'LoRA(2)'
  """

  names: tuple[str, ...]
  ranks: tuple[int, ...]
  alphas: tuple[Any, ...]
  rslora: tuple[bool, ...]
  dropouts: tuple[float, ...]
  inits: tuple[str, ...] | None = None
  dtype: Any = None
  stack_axes: int | None = None
  in_axes: tuple[int, ...] | None = None
  out_axes: tuple[int, ...] | None = None

  def __post_init__(self):
    n = len(self.names)
    if n == 0:
      raise SpecError("StackedLoRA needs at least one adapter")
    if self.inits is None:
      object.__setattr__(self, "inits", ("kaiming",) * n)
    for f in ("ranks", "alphas", "rslora", "dropouts", "inits"):
      if len(getattr(self, f)) != n:
        raise SpecError(f"StackedLoRA: {f} has {len(getattr(self, f))} entries for {n} names")
    for name in self.names:
      if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError(f"adapter name {name!r} is not a plain name (letters, digits, '_', '.', '-', "
                        "not starting with a symbol); it also names a folder in PEFT exports")
    if len(set(self.names)) != n:
      raise SpecError(f"adapter names repeat: {list(self.names)}; give each adapter its own name")
    self.specs  # noqa: B018 - each adapter's own LoRA validation

  @classmethod
  def of(cls, names, specs) -> StackedLoRA:
    """From adapter names and their :class:`jlora.LoRA` specs (layout fields must agree)."""
    specs = tuple(specs)
    layout = {(s.dtype, s.stack_axes, s.in_axes, s.out_axes) for s in specs}
    if len(layout) != 1:
      raise TreeError(f"the adapters' LoRA specs disagree on dtype / stack_axes / in_axes / out_axes "
                      f"({sorted(map(str, layout))}); wrap every adapter with the same layout")
    s0 = specs[0]
    return cls(tuple(names), tuple(s.rank for s in specs), tuple(s.alpha for s in specs),
               tuple(s.rslora for s in specs), tuple(s.dropout for s in specs),
               tuple(s.init for s in specs), s0.dtype,
               s0.stack_axes, s0.in_axes, s0.out_axes)

  @property
  def count(self) -> int:
    return len(self.names)

  @property
  def rank(self) -> int:
    """The padded rank R (the largest adapter's)."""
    return max(self.ranks)

  @property
  def specs(self) -> tuple[LoRA, ...]:
    return tuple(LoRA(r, alpha=a, dropout=d, init=i, rslora=rs, dtype=self.dtype,
                      stack_axes=self.stack_axes, in_axes=self.in_axes, out_axes=self.out_axes)
                 for r, a, rs, d, i in zip(self.ranks, self.alphas, self.rslora, self.dropouts,
                                           self.inits))

  @property
  def scales(self) -> tuple[float, ...]:
    return tuple(s.scale for s in self.specs)

  def index(self, name_or_index: int | str) -> int:
    """The position of an adapter given by name or index (TreeError when there is none)."""
    if isinstance(name_or_index, str):
      if name_or_index not in self.names:
        raise TreeError(f"no adapter named {name_or_index!r}; the tree holds {list(self.names)}")
      return self.names.index(name_or_index)
    if isinstance(name_or_index, bool) or not isinstance(name_or_index, int) \
        or not -self.count <= name_or_index < self.count:
      raise TreeError(f"adapter index {name_or_index!r} is out of range for {self.count} adapters "
                      f"{list(self.names)}; pass a name or an index in 0..{self.count - 1}")
    return name_or_index % self.count

  def adapt(self, path: str, leaf: Any, key: jax.Array) -> Any:
    """N fresh adapters on ``leaf`` (each initialised as its own ``LoRA`` would be)."""
    parts = [s.adapt(path, leaf, jax.random.fold_in(key, i)) for i, s in enumerate(self.specs)]
    if not isinstance(parts[0], LoraWeight):
      return leaf
    return StackedLoraWeight.stack(parts, self)


@register
class StackedLoraWeight(Adapter):
  """One frozen base ``w`` with N LoRA adapters' factors stacked on a leading axis.

  Its children are ``w`` (frozen), ``a`` and ``b`` (trainable, see the module
  docstring); ``spec`` is a :class:`jlora.StackedLoRA`. :func:`jlora.merge`
  refuses it (it stands for N weights): select one adapter first.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> base = {"k": jnp.ones((6, 4))}
    >>> ta = jlora.wrap(base, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> tb = jlora.wrap(base, {"k": jlora.LoRA(3)}, key=jax.random.key(1))
    >>> leaf = jlora.stack_adapters([ta, tb], names=["a", "b"])["k"]
    >>> leaf.a.shape, leaf.b.shape, leaf.spec.names
    ((2, 6, 3), (2, 3, 4), ('a', 'b'))
  """

  kind = "stacked_lora"
  spec_type = StackedLoRA
  frozen = ("w",)
  trainable = ("a", "b")
  routed = True

  def __init__(self, w=None, a=None, b=None, *, spec: StackedLoRA, axes, shape=None):
    super().__init__(w=w, a=a, b=b, spec=spec, axes=axes, shape=shape)

  @classmethod
  def stack(cls, parts: list[LoraWeight], spec: StackedLoRA, rank: int | None = None) -> StackedLoraWeight:
    """Stacks LoRA leaves on one base (``parts[0].w``), zero-padding to ``max(rank, spec.rank)``."""
    ns = len(parts[0].axes.stack)
    width = max(spec.rank, rank or 0)
    dtype = jnp.result_type(*[p.a.dtype for p in parts], *[p.b.dtype for p in parts])

    def pad(x, axis):
      extra = width - x.shape[axis]
      x = x.astype(dtype)
      if extra == 0:
        return x
      cfg = [(0, 0)] * x.ndim
      cfg[axis] = (0, extra)
      return jnp.pad(x, cfg)
    a = jnp.stack([pad(p.a, p.a.ndim - 1) for p in parts])
    b = jnp.stack([pad(p.b, ns) for p in parts])
    return cls(parts[0].w, a, b, spec=spec, axes=parts[0].axes, shape=parts[0].shape)

  def select(self, i: int) -> LoraWeight:
    """Adapter ``i`` as a plain :class:`jlora.LoraWeight` (its own rank, padding dropped)."""
    spec = self.spec.specs[i]
    ns = len(self.axes.stack)
    a = None if self.a is None else self.a[i][..., :spec.rank]
    b = None if self.b is None else jax.lax.slice_in_dim(self.b[i], 0, spec.rank, axis=ns)
    return LoraWeight(self.w, a, b, spec=spec, axes=self.axes, shape=self.shape)

  def layouts(self):
    la, lb = factor_layouts(self.axes)
    return {"a": (None,) + la, "b": (None,) + lb}

  def merged(self):
    raise TreeError(
        f"this leaf holds {self.spec.count} stacked adapters {list(self.spec.names)}, not one weight; "
        "pick one with jlora.select_adapter(tree, name) (or combine them with "
        "jlora.weighted_merge) before merging")

  def unmerged(self, merged):
    return self.merged()

  def lazy(self, path, adapter_ids=None):
    if adapter_ids is None:
      self.merged()
    ns = len(self.axes.stack)
    a = jnp.moveaxis(self.a, 0, -2)                # stack + in + (N, R)
    a = a.reshape(a.shape[:-2] + (-1,))
    b = jnp.moveaxis(self.b, 0, ns)                # stack + (N, R) + out
    b = b.reshape(b.shape[:ns] + (-1,) + b.shape[ns + 2:])
    term = Term(a, b, self.spec.scales, self.spec.dropouts, adapter_ids, self.spec.count)
    return from_kernel(self.w, self.axes, [term], path=path)
