"""LoRA leaves and the transforms of a parameter tree: wrap, split, combine, merge."""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._errors import AxesError, RuleError, SpecError, TreeError
from jlora._paths import CompiledRules, Rules, closest_paths, normalise_rules, path_str
from jlora._spec import Full, LoRA

__all__ = [
    "Axes", "LoraWeight", "FullWeight", "wrap", "split", "combine", "merge", "unmerge",
    "trainable_mask", "is_adapted", "adapted_leaves",
]


@dataclasses.dataclass(frozen=True)
class Axes:
  """Which kernel axes are stacked layers, contracted inputs and produced outputs.

  Every kernel axis appears in exactly one group; stacked axes lead.
  ``a`` has shape ``stack + in + (rank,)`` and ``b`` ``stack + (rank,) + out``.

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


class LoraWeight:
  """A frozen base ``w`` with trainable low-rank factors ``a`` and ``b``.

  A registered pytree node: its children are ``w``, ``a`` and ``b`` (any of
  them may be ``None`` in the halves that :func:`split` returns); its spec,
  axes and the rule that made it are static. It stands in the params tree
  where the original array was.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"kernel": jnp.ones((6, 4))}, {"kernel": jlora.LoRA(2)},
    ...                   key=jax.random.key(0))
    >>> leaf = tree["kernel"]
    >>> leaf.w.shape, leaf.a.shape, leaf.b.shape, leaf.scale
    ((6, 4), (6, 2), (2, 4), 1.0)
  """

  __slots__ = ("w", "a", "b", "spec", "axes", "rule")

  def __init__(self, w, a, b, *, spec: LoRA, axes: Axes, rule: str = ""):
    self.w, self.a, self.b = w, a, b
    self.spec, self.axes, self.rule = spec, axes, rule

  @property
  def scale(self) -> float:
    return self.spec.scale

  @property
  def rank(self) -> int:
    return self.spec.rank

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return self.w.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def delta(self) -> jax.Array:
    """``scale * A @ B`` in the kernel's layout, in float32 (float64 for float64 factors)."""
    return _delta(self.a, self.b, self.axes, self.scale, self.w.shape)

  def replace(self, **kw) -> "LoraWeight":
    fields = dict(w=self.w, a=self.a, b=self.b, spec=self.spec, axes=self.axes, rule=self.rule)
    fields.update(kw)
    return LoraWeight(fields.pop("w"), fields.pop("a"), fields.pop("b"), **fields)

  def __repr__(self):
    def s(x):
      return None if x is None else f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', ()))}"
    return (f"LoraWeight(w={s(self.w)}, a={s(self.a)}, b={s(self.b)}, rank={self.spec.rank}, "
            f"scale={self.spec.scale:g}, rule={self.rule!r})")


class FullWeight:
  """A leaf trained in full (from a :class:`jlora.Full` rule). Its child is ``w``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"bias": jnp.zeros(3)}, {"bias": jlora.Full()}, key=jax.random.key(0))
    >>> type(tree["bias"]).__name__
    'FullWeight'
  """

  __slots__ = ("w", "rule")

  def __init__(self, w, *, rule: str = ""):
    self.w, self.rule = w, rule

  @property
  def shape(self):
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return self.w.dtype

  def __repr__(self):
    return f"FullWeight(w={getattr(self.w, 'dtype', None)}{list(getattr(self.w, 'shape', ()))}, rule={self.rule!r})"


_W, _A, _B = (jax.tree_util.GetAttrKey(n) for n in ("w", "a", "b"))

jax.tree_util.register_pytree_with_keys(
    LoraWeight,
    lambda x: (((_W, x.w), (_A, x.a), (_B, x.b)), (x.spec, x.axes, x.rule)),
    lambda aux, ch: LoraWeight(*ch, spec=aux[0], axes=aux[1], rule=aux[2]),
    flatten_func=lambda x: ((x.w, x.a, x.b), (x.spec, x.axes, x.rule)),
)
jax.tree_util.register_pytree_with_keys(
    FullWeight,
    lambda x: (((_W, x.w),), x.rule),
    lambda aux, ch: FullWeight(ch[0], rule=aux),
    flatten_func=lambda x: ((x.w,), x.rule),
)


def is_adapted(x: Any) -> bool:
  """True for the nodes jlora puts in a tree (:class:`LoraWeight`, :class:`FullWeight`)."""
  return isinstance(x, (LoraWeight, FullWeight))


def wrap(params: Any, rules: Rules, *, key: jax.Array) -> Any:
  """Returns ``params`` with the leaves that ``rules`` match turned into adapters.

  Rules are a mapping ``{pattern: spec}`` or a list of ``(pattern, spec)``
  pairs (first match wins in both), or a callable ``(path, leaf) -> spec |
  None``. A spec is :class:`jlora.LoRA`, :class:`jlora.Full`, or ``None`` (leave
  the leaf frozen; useful to exclude paths before a broader rule). Patterns are
  globs over ``/``-joined paths (``"layers/*/attn/{q,v}_proj/kernel"``,
  ``"**/kernel"``) or regular expressions (``"re:..."``). LoRA rules skip
  leaves with fewer than two dimensions (biases, norm scales), so a broad glob
  never wraps them by accident. The input tree is not modified.

  Args:
    params: any pytree of arrays (Flax linen params, an NNX state, an Equinox
      module, plain dicts).
    rules: the rules.
    key: a PRNG key for the adapters' ``A`` factors. Each leaf's key is derived
      from its path, so adding a rule never changes the other leaves' init.

  Returns:
    A tree of the same structure whose matched leaves are :class:`LoraWeight`
    (or :class:`FullWeight`) nodes. At init it computes exactly what ``params`` did.

  Raises:
    RuleError: a rule matches no leaf it can adapt (the message lists the
      closest paths).
    SpecError: an impossible rank, or an integer / bool leaf targeted.
    AxesError: the kernel's axes cannot be inferred (pass ``stack_axes`` or
      ``in_axes`` / ``out_axes``).
    TreeError: the tree is already wrapped.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
    >>> tree = jlora.wrap(params, {"**/kernel": jlora.LoRA(4, alpha=8)}, key=jax.random.key(0))
    >>> bool(jnp.array_equal(jlora.merge(tree)["dense"]["kernel"], params["dense"]["kernel"]))
    True
  """
  compiled = normalise_rules(rules)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_adapted)
  paths = [path_str(kp) for kp, _ in flat]
  for path, (_, leaf) in zip(paths, flat):
    if is_adapted(leaf):
      raise TreeError(
          f"the tree is already wrapped (leaf {path!r} is a {type(leaf).__name__}); wrap the "
          "original params, or call jlora.merge(tree) first to fold the adapters in")
  used: dict[str, int] = {}
  out = []
  for path, (_, leaf) in zip(paths, flat):
    rule, spec = compiled.match(path, leaf)
    new = leaf
    if spec is not None:
      new = _adapt(path, leaf, spec, rule, key)
    if rule is not None:
      used.setdefault(rule, 0)
      if new is not leaf or spec is None:
        used[rule] += 1
    out.append(new)
  _check_all_rules_used(compiled, used, paths, flat)
  return jax.tree_util.tree_unflatten(treedef, out)


def _adapt(path: str, leaf: Any, spec: Any, rule: str, key: jax.Array) -> Any:
  if isinstance(spec, Full):
    if not _is_array(leaf):
      return leaf
    _check_float(path, leaf, "Full")
    return FullWeight(leaf, rule=rule)
  if not isinstance(spec, LoRA):
    raise RuleError(
        f"rule {rule!r} maps path {path!r} to {spec!r}; a spec must be jlora.LoRA(...), "
        "jlora.Full() or None")
  if not _is_array(leaf) or leaf.ndim < 2:
    return leaf  # biases, norm scales and scalars are never wrapped by accident
  _check_float(path, leaf, "LoRA")
  axes = infer_axes(path, tuple(leaf.shape), spec)
  shape = tuple(leaf.shape)
  stack_shape = tuple(shape[i] for i in axes.stack)
  in_shape = tuple(shape[i] for i in axes.inputs)
  out_shape = tuple(shape[i] for i in axes.outputs)
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  if spec.rank > min(n_in, n_out):
    raise SpecError(
        f"LoRA rank {spec.rank} at {path!r} exceeds min(in, out) = min({n_in}, {n_out}) of its "
        f"kernel {shape}; use rank <= {min(n_in, n_out)}")
  dtype = _adapter_dtype(spec, leaf.dtype)
  leaf_key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
  a_shape = stack_shape + in_shape + (spec.rank,)
  if spec.init == "kaiming":
    bound = 1.0 / math.sqrt(n_in)
    a = jax.random.uniform(leaf_key, a_shape, jnp.float32, -bound, bound)
  else:
    a = jax.random.normal(leaf_key, a_shape, jnp.float32) / spec.rank
  b = jnp.zeros(stack_shape + (spec.rank,) + out_shape, dtype)
  return LoraWeight(leaf, a.astype(dtype), b, spec=spec, axes=axes, rule=rule)


def infer_axes(path: str, shape: tuple[int, ...], spec: LoRA) -> Axes:
  """The kernel's (stack, in, out) axes, from the spec or inferred from the shape.

  Inference: explicit ``in_axes``/``out_axes`` win (the other axes are stacked
  and must lead); otherwise after ``stack_axes`` leading axes, a 2-D rest is a
  Dense ``(in, out)`` kernel, and a kernel under a path component containing
  ``conv`` is a Conv kernel ``(spatial..., in, out)``.
  """
  ndim = len(shape)
  fix = ("pass LoRA(..., stack_axes=N) for N leading stacked-layer axes (scanned layers), or "
         "LoRA(..., in_axes=..., out_axes=...) for a DenseGeneral / Einsum kernel")
  if spec.in_axes is not None:
    norm = []
    for group in (spec.in_axes, spec.out_axes):
      g = []
      for ax in group:
        if not -ndim <= ax < ndim:
          raise AxesError(f"axis {ax} is out of range for kernel {path!r} of shape {shape}")
        g.append(ax % ndim)
      norm.append(tuple(g))
    ins, outs = norm
    if set(ins) & set(outs) or len(set(ins)) < len(ins) or len(set(outs)) < len(outs):
      raise AxesError(f"in_axes {spec.in_axes} and out_axes {spec.out_axes} overlap or repeat at {path!r}")
    rest = tuple(sorted(set(range(ndim)) - set(ins) - set(outs)))
    if rest != tuple(range(len(rest))):
      raise AxesError(
          f"kernel {path!r} of shape {shape}: axes {rest} are neither input nor output, so they "
          "must be leading stacked-layer axes; list them in in_axes/out_axes or move them first")
    if spec.stack_axes is not None and spec.stack_axes != len(rest):
      raise AxesError(
          f"kernel {path!r} of shape {shape}: stack_axes={spec.stack_axes} disagrees with "
          f"in_axes={spec.in_axes} and out_axes={spec.out_axes}, which leave {len(rest)} stacked axes")
    return Axes(rest, ins, outs)
  n_stack = spec.stack_axes or 0
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


def split(tree: Any) -> tuple[Any, Any]:
  """Splits a wrapped tree into ``(trainable, frozen)`` halves.

  ``trainable`` holds only adapter arrays (``a``, ``b`` and :class:`Full`
  leaves); ``frozen`` holds the base. Missing entries are ``None`` (empty
  subtrees), as in Equinox's ``partition``, so both halves work with ``jit``,
  ``grad`` and Orbax. :func:`combine` puts them back together.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.ones((8, 8)), "b": jnp.ones(8)}, {"k": jlora.LoRA(2)},
    ...                   key=jax.random.key(0))
    >>> trainable, frozen = jlora.split(tree)
    >>> [x.shape for x in jax.tree.leaves(trainable)]
    [(8, 2), (2, 8)]
    >>> sorted(x.shape for x in jax.tree.leaves(frozen))
    [(8,), (8, 8)]
  """
  def train(x):
    if isinstance(x, LoraWeight):
      return x.replace(w=None)
    if isinstance(x, FullWeight):
      return x
    return None

  def freeze(x):
    if isinstance(x, LoraWeight):
      return x.replace(a=None, b=None)
    if isinstance(x, FullWeight):
      return FullWeight(None, rule=x.rule)
    return x

  return (jax.tree.map(train, tree, is_leaf=is_adapted),
          jax.tree.map(freeze, tree, is_leaf=is_adapted))


def combine(trainable: Any, frozen: Any) -> Any:
  """Puts :func:`split`'s halves back together (the first non-``None`` of each leaf).

  Raises:
    TreeError: the halves do not come from the same wrapped tree (the message
      names the first path where they differ).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.ones((4, 4))}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> jax.tree.structure(jlora.combine(*jlora.split(tree))) == jax.tree.structure(tree)
    True
  """
  is_none = lambda x: x is None  # noqa: E731
  s1 = jax.tree.structure(trainable, is_leaf=is_none)
  s2 = jax.tree.structure(frozen, is_leaf=is_none)
  if s1 != s2:
    raise TreeError(
        "combine: the trainable and frozen halves do not fit together "
        f"({_first_difference(trainable, frozen)}); pass the two halves of one jlora.split(tree), "
        "after the same rules")
  def pick(a, b):
    if a is not None and b is not None:
      raise TreeError("combine: a leaf is present in both halves; pass (trainable, frozen) from jlora.split")
    return b if a is None else a
  return jax.tree.map(pick, trainable, frozen, is_leaf=is_none)


def merge(tree: Any) -> Any:
  """Folds every adapter into its base: plain params with ``W + scale * A @ B``.

  The sum is computed in float32 (float64 for float64 bases) and cast back to
  ``W``'s dtype, so a bf16 base stays bf16. :class:`Full` leaves become plain
  arrays. Gradients do not flow into frozen bases (``W`` is wrapped in
  ``stop_gradient``), so ``jax.grad`` of a loss through ``merge`` costs no
  weight-gradient for them. Trees without adapters pass through unchanged.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.eye(4)}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> jlora.merge(tree)["k"].shape
    (4, 4)
  """
  def fold(x):
    if isinstance(x, LoraWeight):
      if x.w is None or x.a is None or x.b is None:
        raise TreeError(f"merge: the adapter made by rule {x.rule!r} is missing its base or factors; "
                        "merge the whole tree (jlora.combine(trainable, frozen)), not one half")
      w = jax.lax.stop_gradient(x.w)
      acc = _acc_dtype(w.dtype)
      return (w.astype(acc) + x.delta().astype(acc)).astype(w.dtype)
    if isinstance(x, FullWeight):
      return x.w
    return x
  return jax.tree.map(fold, tree, is_leaf=is_adapted)


def unmerge(merged: Any, tree: Any) -> Any:
  """Recovers the base params from ``merge(tree)``: ``W = merged - scale * A @ B``.

  Exact up to rounding: float32 bases come back within a few ulps of
  ``|W| + |delta|``; a bfloat16 base is rounded twice (merge and unmerge), so
  expect ``|recovered - W| <= 2**-7 * (|W| + |delta|)`` elementwise.

  Args:
    merged: plain params, as :func:`merge` returned them (or after serving).
    tree: the wrapped tree that holds the adapters.

  Returns:
    Plain params with the adapters taken out.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.eye(4)}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> base = jlora.unmerge(jlora.merge(tree), tree)
    >>> bool(jnp.allclose(base["k"], jnp.eye(4)))
    True
  """
  def take_out(x, m):
    if isinstance(x, LoraWeight):
      if tuple(m.shape) != x.shape:
        raise TreeError(f"unmerge: merged leaf has shape {tuple(m.shape)}, the adapter's base {x.shape}")
      acc = _acc_dtype(m.dtype)
      return (m.astype(acc) - x.delta().astype(acc)).astype(m.dtype)
    return m
  try:
    return jax.tree.map(take_out, tree, merged, is_leaf=is_adapted)
  except ValueError as e:
    raise TreeError(f"unmerge: the merged params do not have the wrapped tree's structure: {e}") from None


def trainable_mask(tree: Any) -> Any:
  """A tree of bools, ``True`` on trainable arrays (adapter factors, Full leaves).

  For users who build their own optax chain. Note that ``optax.masked`` alone
  passes the gradients of masked-out leaves through unchanged; use
  :func:`jlora.optimizer` (or ``optax.partition`` with ``set_to_zero``) to
  freeze them.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.ones((4, 4))}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> jax.tree.leaves(jlora.trainable_mask(tree))
    [False, True, True]
  """
  return _labels(tree, True, False)


def _labels(tree, trainable, frozen):
  def label(x):
    if isinstance(x, LoraWeight):
      return x.replace(w=None if x.w is None else frozen,
                       a=None if x.a is None else trainable,
                       b=None if x.b is None else trainable)
    if isinstance(x, FullWeight):
      return FullWeight(None if x.w is None else trainable, rule=x.rule)
    return frozen
  return jax.tree.map(label, tree, is_leaf=is_adapted)


def adapted_leaves(tree: Any) -> list[tuple[str, Any]]:
  """``(path, node)`` for every :class:`LoraWeight` / :class:`FullWeight` in ``tree``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"a": {"kernel": jnp.ones((4, 4))}}, {"**/kernel": jlora.LoRA(2)},
    ...                   key=jax.random.key(0))
    >>> [path for path, _ in jlora.adapted_leaves(tree)]
    ['a/kernel']
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapted)
  return [(path_str(kp), x) for kp, x in flat if is_adapted(x)]


# -- helpers ---------------------------------------------------------------

def _delta(a, b, axes: Axes, scale: float, w_shape) -> jax.Array:
  acc = jnp.promote_types(_acc_dtype(a.dtype), _acc_dtype(b.dtype))
  n_stack = len(axes.stack)
  stack_shape = tuple(a.shape[:n_stack])
  in_shape = tuple(a.shape[n_stack:-1])
  out_shape = tuple(b.shape[n_stack + 1:])
  r = a.shape[-1]
  a2 = a.astype(acc).reshape(stack_shape + (math.prod(in_shape), r))
  b2 = b.astype(acc).reshape(stack_shape + (r, math.prod(out_shape)))
  d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * jnp.asarray(scale, acc)
  d = d.reshape(stack_shape + in_shape + out_shape)
  order = axes.order
  if order != tuple(range(len(order))):
    d = jnp.transpose(d, np.argsort(order))
  return d


def _acc_dtype(dtype) -> Any:
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _adapter_dtype(spec: LoRA, base_dtype) -> Any:
  if spec.dtype is not None:
    return jnp.dtype(spec.dtype)
  return _acc_dtype(base_dtype)


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (str, bytes))


def _check_float(path: str, leaf, what: str) -> None:
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise SpecError(
        f"{what} rule targets {path!r}, a {leaf.dtype} array of shape {tuple(leaf.shape)}; only "
        "floating-point leaves can be adapted. Narrow the rule's pattern (e.g. '**/kernel') or "
        "exclude this path with an earlier rule mapping it to None")


def _check_all_rules_used(compiled: CompiledRules, used: dict[str, int], paths, flat) -> None:
  if compiled.callable is not None:
    if not used:
      raise RuleError("the rules callable returned a spec for no leaf; check it against the tree's "
                      f"paths, e.g. {paths[:5]}")
    return
  for name, _, spec in compiled.entries:
    if used.get(name, 0) == 0:
      shadowed = name in used
      arr_paths = [p for p, (_, x) in zip(paths, flat) if _is_array(x)]
      hint = closest_paths(name, arr_paths)
      why = ("it matches only leaves it cannot adapt (fewer than 2 dimensions) or leaves an "
             "earlier rule took" if shadowed else "it matches no leaf")
      raise RuleError(
          f"rule {name!r} -> {spec!r}: {why}. Closest paths in the tree: {hint}. Paths are "
          "'/'-joined keys; use '*' for one component and '**' for any number")


def _first_difference(t1, t2) -> str:
  is_none = lambda x: x is None  # noqa: E731
  f1 = jax.tree_util.tree_flatten_with_path(t1, is_leaf=is_none)[0]
  f2 = jax.tree_util.tree_flatten_with_path(t2, is_leaf=is_none)[0]
  for (p1, x1), (p2, x2) in zip(f1, f2):
    if p1 != p2:
      return f"first difference at {path_str(p1)!r} vs {path_str(p2)!r}"
    if is_adapted(x1) != is_adapted(x2) or type(x1) is not type(x2) and not (x1 is None or x2 is None):
      return f"first difference at {path_str(p1)!r}"
  if len(f1) != len(f2):
    return f"one half has {len(f1)} entries, the other {len(f2)}"
  return "their adapters' specs or structure differ"
