"""Many adapters on one base: stack, select, add, delete, and PEFT's weighted merges.

``stack_adapters`` turns N LoRA trees on the same base into one tree whose
adapted leaves are :class:`jlora.StackedLoraWeight` (the base once, the
factors on a leading adapter axis); ``jlora.lora(fn)(multi, x,
adapter_ids=ids)`` then runs a mixed batch. ``weighted_merge`` combines
adapters into one, with the maths of PEFT's ``add_weighted_adapter``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._adapter import is_adapted, to_matrix
from jlora._errors import SpecError, TreeError
from jlora._methods.lora import FullWeight, LoRA, LoraWeight
from jlora._methods.stacked import StackedLoRA, StackedLoraWeight
from jlora._paths import path_str

__all__ = ["stack_adapters", "select_adapter", "add_adapter", "delete_adapter", "adapter_names",
           "weighted_merge", "COMBINATIONS"]

#: the combination types of :func:`weighted_merge` (PEFT's ``add_weighted_adapter`` names)
COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")


def stack_adapters(trees: Sequence[Any], names: Sequence[str] | None = None, *,
                   rank: int | None = None) -> Any:
  """One tree holding one frozen base and the LoRA adapters of ``trees``.

  The trees must come from the same rules on the same base (ranks, alphas and
  dropouts may differ): every LoRA leaf becomes a :class:`jlora.StackedLoraWeight`
  whose factors are padded with zeros to the largest rank (exact). The base
  arrays of the first tree are kept, not copied; the others' must be equal.
  Leaves trained in full (:class:`jlora.Full`) must be equal in every tree
  (a mixed batch routes only low-rank factors).

  Args:
    trees: wrapped trees (``jlora.wrap(params, rules)``, trained or loaded).
    names: one unique name per tree (default ``adapter0``, ``adapter1``, ...).
    rank: pad to at least this rank (keeps shapes fixed when adapters are swapped later).

  Returns:
    The stacked tree; use it as ``jlora.lora(fn)(tree, ..., adapter_ids=ids)``.

  Raises:
    TreeError: no trees, different rules or bases, an adapter kind other than
      LoRA, a stacked tree among the inputs, or names that are not unique.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"k": jnp.eye(4)}
    >>> ta = jlora.wrap(params, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> tb = jlora.wrap(params, {"k": jlora.LoRA(1, alpha=2)}, key=jax.random.key(1))
    >>> multi = jlora.stack_adapters([ta, tb], names=["sql", "chat"])
    >>> jlora.adapter_names(multi)
    ('sql', 'chat')
    >>> f = jlora.lora(lambda p, x: x @ p["k"])
    >>> f(multi, jnp.ones((3, 4)), adapter_ids=jnp.array([0, 1, -1])).shape
    (3, 4)
  """
  trees = list(trees)
  if not trees:
    raise TreeError("stack_adapters needs at least one tree")
  names = tuple(f"adapter{i}" for i in range(len(trees))) if names is None else tuple(names)
  if len(names) != len(trees):
    raise TreeError(f"stack_adapters got {len(trees)} trees but {len(names)} names; give one name "
                    "per tree")
  flats = []
  for i, t in enumerate(trees):
    flat, tdef = jax.tree_util.tree_flatten_with_path(t, is_leaf=is_adapted)
    flats.append((flat, tdef))
    for kp, x in flat:
      if isinstance(x, StackedLoraWeight):
        raise TreeError(f"tree {i} ({names[i]!r}) is already stacked (at {path_str(kp)!r}); add "
                        "adapters to it with jlora.add_adapter(multi, tree, name)")
  flat0, tdef0 = flats[0]
  for i, (flat, tdef) in enumerate(flats[1:], 1):
    if tdef != tdef0:
      raise TreeError(f"tree {i} ({names[i]!r}) has a different structure from tree 0 "
                      f"({names[0]!r}); stack adapters made by the same rules on the same model")
  out, n_lora = [], 0
  for j, (kp, x0) in enumerate(flat0):
    where = path_str(kp)
    xs = [f[0][j][1] for f in flats]
    kinds = {type(x).__name__ for x in xs}
    if len(kinds) > 1:
      raise TreeError(f"the trees adapt {where!r} differently ({sorted(kinds)}); stack adapters "
                      "made by the same rules")
    if isinstance(x0, LoraWeight) and type(x0) is LoraWeight:
      for i, x in enumerate(xs):
        x.require(f"stack_adapters: tree {i} at {where!r}")
        if x.axes != x0.axes or x.shape != x0.shape:
          raise TreeError(f"tree {i} ({names[i]!r}) has a different kernel layout at {where!r}")
        _same_base(x.w, x0.w, where, i, names)
      spec = StackedLoRA.of(names, [x.spec for x in xs])
      out.append(StackedLoraWeight.stack(xs, spec, rank))
      n_lora += 1
    elif isinstance(x0, FullWeight):
      for i, x in enumerate(xs[1:], 1):
        if not _equal(x.w, x0.w):
          raise TreeError(
              f"{where!r} is trained in full (jlora.Full) and differs between tree 0 ({names[0]!r}) "
              f"and tree {i} ({names[i]!r}); a mixed batch routes only LoRA factors: train that "
              "leaf with LoRA, or keep it frozen or equal in every adapter")
      out.append(x0)
    elif is_adapted(x0):
      raise TreeError(f"{where!r} is a {type(x0).__name__}; stack_adapters stacks LoRA adapters "
                      "(jlora.LoRA with the default init); merge other methods into the base first")
    else:
      for i, x in enumerate(xs[1:], 1):
        _same_base(x, x0, where, i, names)
      out.append(x0)
  if n_lora == 0:
    raise TreeError("stack_adapters found no LoRA leaves in the trees; wrap them with "
                    "jlora.wrap(params, {pattern: jlora.LoRA(r)}) first")
  return jax.tree_util.tree_unflatten(tdef0, out)


def adapter_names(tree: Any) -> tuple[str, ...]:
  """The adapter names of a stacked tree (TreeError when it holds no stacked leaves).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> t = jlora.wrap({"k": jnp.eye(4)}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> jlora.adapter_names(jlora.stack_adapters([t, t]))
    ('adapter0', 'adapter1')
  """
  return _stacked_leaves(tree)[0][1].spec.names


def select_adapter(tree: Any, which: int | str) -> Any:
  """Adapter ``which`` (a name or an index) of a stacked tree, as a plain LoRA tree.

  The base arrays are shared, not copied; the factors are cut back to the
  adapter's own rank, so the result equals the tree the adapter came from.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> p = {"k": jnp.eye(4)}
    >>> ta = jlora.wrap(p, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> tb = jlora.wrap(p, {"k": jlora.LoRA(3)}, key=jax.random.key(1))
    >>> one = jlora.select_adapter(jlora.stack_adapters([ta, tb], ["a", "b"]), "a")
    >>> one["k"].a.shape, bool(jnp.array_equal(one["k"].a, ta["k"].a))
    ((4, 2), True)
  """
  spec = _stacked_leaves(tree)[0][1].spec
  i = spec.index(which)
  return jax.tree.map(lambda x: x.select(i) if isinstance(x, StackedLoraWeight) else x, tree,
                      is_leaf=is_adapted)


def add_adapter(tree: Any, adapter: Any, name: str | None = None, *, replace: bool = False) -> Any:
  """A stacked tree with ``adapter`` (a plain LoRA tree on the same base) added.

  With ``replace=True`` the adapter called ``name`` is swapped for the new one
  in place: while its rank fits the padded rank the arrays keep their shapes,
  so a compiled step or generate call runs on without recompiling (hot swap).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> p = {"k": jnp.eye(4)}
    >>> t = [jlora.wrap(p, {"k": jlora.LoRA(2)}, key=jax.random.key(i)) for i in range(3)]
    >>> multi = jlora.add_adapter(jlora.stack_adapters(t[:2], ["a", "b"]), t[2], "c")
    >>> jlora.adapter_names(multi)
    ('a', 'b', 'c')
    >>> jlora.adapter_names(jlora.add_adapter(multi, t[0], "b", replace=True))
    ('a', 'b', 'c')
  """
  leaves = _stacked_leaves(tree)
  spec = leaves[0][1].spec
  names = list(spec.names)
  parts = [select_adapter(tree, i) for i in range(spec.count)]
  if replace:
    if name is None:
      raise TreeError("add_adapter(replace=True) needs the name of the adapter to replace")
    parts[spec.index(name)] = adapter
  else:
    name = f"adapter{len(names)}" if name is None else name
    if name in names:
      raise TreeError(f"an adapter named {name!r} is already in the tree {names}; pick another name, "
                      "or pass replace=True to swap it")
    parts.append(adapter)
    names.append(name)
  return stack_adapters(parts, names, rank=spec.rank)


def delete_adapter(tree: Any, which: int | str) -> Any:
  """A stacked tree without adapter ``which`` (a name or an index).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> p = {"k": jnp.eye(4)}
    >>> t = [jlora.wrap(p, {"k": jlora.LoRA(2)}, key=jax.random.key(i)) for i in range(3)]
    >>> jlora.adapter_names(jlora.delete_adapter(jlora.stack_adapters(t, ["a", "b", "c"]), "b"))
    ('a', 'c')
  """
  spec = _stacked_leaves(tree)[0][1].spec
  i = spec.index(which)
  if spec.count == 1:
    raise TreeError(f"{spec.names[0]!r} is the only adapter; use jlora.select_adapter(tree, 0) for "
                    "a plain tree instead of deleting it")
  keep = [k for k in range(spec.count) if k != i]
  return stack_adapters([select_adapter(tree, k) for k in keep], [spec.names[k] for k in keep])


# -- weighted merging -------------------------------------------------------------------------

def weighted_merge(trees: Sequence[Any], weights: Sequence[float], method: str = "linear", *,
                   density: float | None = None, key: jax.Array | None = None,
                   rank: int | None = None, majority_sign: str = "total") -> Any:
  """One LoRA tree combining ``trees`` (or a stacked tree's adapters) with ``weights``.

  The maths of PEFT's ``add_weighted_adapter`` (``combination_type=method``),
  leaf by leaf (per layer for stacked ``(L, ...)`` kernels, as PEFT works per
  module), with ``s_i`` each adapter's scale:

  * ``"cat"``: ``A = [w_i s_i A_i]``, ``B = [B_i]`` side by side (rank = the sum): exact.
  * ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``:
    ``A`` and ``B`` are combined separately with weights ``sign(w_i s_i) sqrt|w_i s_i|``
    and ``sqrt|w_i s_i|`` (ranks must be equal); ``ties`` / ``magnitude_prune``
    keep the ``density`` fraction of largest magnitudes per tensor, ``dare_*``
    a random ``density`` fraction rescaled by ``1/density``, and the ``ties``
    variants keep only entries agreeing with the majority sign (``majority_sign``
    ``"total"`` or ``"frequency"``) and average them.
  * ``"svd"`` and the ``*_svd`` variants: the full updates ``s_i A_i B_i`` are
    combined, then truncated by SVD to ``rank`` (default: the largest rank).

  The result's specs are ``LoRA(r, alpha=r)`` with the first adapter's dropout
  and rsLoRA flag (as PEFT copies the first config; with rsLoRA the merged
  adapter is scaled by ``sqrt(r)``, as in PEFT).

  Args:
    trees: LoRA trees on the same base, or one stacked tree (all its adapters).
    weights: one weight per adapter (negative weights subtract).
    method: one of ``jlora._multi.COMBINATIONS`` (the names above).
    density: the fraction kept by the pruning methods, in ``[0, 1]``.
    key: PRNG key for the ``dare`` methods' random masks.
    rank: the SVD methods' target rank.
    majority_sign: ``"total"`` or ``"frequency"`` for the ``ties`` methods.

  Returns:
    A plain LoRA tree on the shared base (the base arrays are not copied).

  Raises:
    TreeError: mismatched lengths, different bases or rules, unequal ranks
      where the method needs equal ones.
    SpecError: an unknown method, a missing or bad ``density`` / ``key`` / ``rank``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> p = {"k": jnp.eye(4)}
    >>> ta = jlora.wrap(p, {"k": jlora.LoRA(2, init="gaussian")}, key=jax.random.key(0))
    >>> tb = jlora.wrap(p, {"k": jlora.LoRA(2, init="gaussian")}, key=jax.random.key(1))
    >>> jlora.weighted_merge([ta, tb], [0.5, 0.5], method="cat")["k"].rank
    4
  """
  if method not in COMBINATIONS:
    raise SpecError(f"unknown combination method {method!r}; use one of {list(COMBINATIONS)}")
  trees = list(trees)
  if len(trees) == 1 and _has_stacked(trees[0]):
    multi = trees[0]
    trees = [select_adapter(multi, i) for i in range(len(adapter_names(multi)))]
  weights = [float(w) for w in weights]
  if not trees or len(weights) != len(trees):
    raise TreeError(f"weighted_merge got {len(trees)} adapters and {len(weights)} weights; give one "
                    "weight per adapter")
  if len(trees) == 1:
    method = "linear"  # as PEFT: one adapter can only be scaled
  base = _base_name(method)
  if base in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
    if density is None or not 0.0 <= float(density) <= 1.0:
      raise SpecError(f"method {method!r} needs density in [0, 1] (the fraction of entries kept), "
                      f"got {density!r}")
  if base.startswith("dare") and float(density) == 0.0:
    raise SpecError(f"method {method!r} rescales by 1/density; density must be > 0")
  if base.startswith("dare") and key is None:
    raise SpecError(f"method {method!r} draws random masks: pass key=jax.random.key(seed)")
  if majority_sign not in ("total", "frequency"):
    raise SpecError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
  stacked = stack_adapters(trees, [f"m{i}" for i in range(len(trees))])  # checks rules and bases
  ranks = {x.spec.ranks for _, x in _stacked_leaves(stacked)}
  if method in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
    if any(len(set(r)) != 1 for r in ranks):
      raise TreeError(f"method {method!r} needs adapters of equal rank (got ranks "
                      f"{sorted(set(sum(ranks, ())))}); use 'cat' or 'svd' for different ranks")
  if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
    raise SpecError(f"rank must be a positive int, got {rank!r}")
  opts = dict(method=method, base=base, weights=weights, density=density, key=key, rank=rank,
              majority_sign=majority_sign)

  def combine_leaf(kp, x):
    if not isinstance(x, StackedLoraWeight):
      return x
    return _combine_leaf(path_str(kp), x, **opts)
  return jax.tree_util.tree_map_with_path(combine_leaf, stacked, is_leaf=is_adapted)


def _base_name(method: str) -> str:
  return method[:-4] if method.endswith("_svd") else ("linear" if method == "svd" else method)


def _combine_leaf(path, x: StackedLoraWeight, *, method, base, weights, density, key, rank,
                  majority_sign) -> LoraWeight:
  spec, axes = x.spec, x.axes
  ns = len(axes.stack)
  parts = [x.select(i) for i in range(spec.count)]
  s0 = spec.specs[0]
  f32 = jnp.float32 if x.a.dtype != jnp.float64 else jnp.float64
  dtype = x.a.dtype

  def new_spec(r):
    return LoRA(r, alpha=r, dropout=s0.dropout, rslora=s0.rslora, dtype=s0.dtype,
                stack_axes=s0.stack_axes, in_axes=s0.in_axes, out_axes=s0.out_axes)

  ws = [w * s for w, s in zip(weights, spec.scales)]
  if method == "cat":
    a = jnp.concatenate([(p.a.astype(f32) * w).astype(dtype) for p, w in zip(parts, ws)], axis=-1)
    b = jnp.concatenate([p.b for p in parts], axis=ns)
    r = sum(spec.ranks)
    return LoraWeight(x.w, a, b, spec=new_spec(r), axes=axes, shape=x.shape)
  if not method.endswith("svd"):
    wa = [math.copysign(math.sqrt(abs(w)), w) if w != 0 else 0.0 for w in ws]
    wb = [math.sqrt(abs(w)) for w in ws]
    a = _task_combine(base, [p.a.astype(f32) for p in parts], wa, density, majority_sign, ns,
                      _keys(key, path, "a", len(parts)))
    b = _task_combine(base, [p.b.astype(f32) for p in parts], wb, density, majority_sign, ns,
                      _keys(key, path, "b", len(parts)))
    return LoraWeight(x.w, a.astype(dtype), b.astype(dtype), spec=new_spec(spec.ranks[0]), axes=axes,
                      shape=x.shape)
  # svd: combine the full updates s_i A_i B_i, then truncate
  deltas = [to_matrix(p.delta(), axes, f32) for p in parts]  # stack + (n_in, n_out)
  total = _task_combine(base, deltas, weights, density, majority_sign, ns,
                        _keys(key, path, "delta", len(parts)))
  r = rank or max(spec.ranks)
  n_in, n_out = total.shape[-2:]
  if r > min(n_in, n_out):
    raise SpecError(f"rank {r} exceeds min(in, out) = {min(n_in, n_out)} at {path!r}")
  u, sv, vt = jnp.linalg.svd(total, full_matrices=False)
  a_m = u[..., :r]                                      # stack + (n_in, r)
  b_m = sv[..., :r, None] * vt[..., :r, :]              # stack + (r, n_out)
  stack_shape = tuple(x.shape[i] for i in axes.stack)
  ins = tuple(x.shape[i] for i in axes.inputs)
  outs = tuple(x.shape[i] for i in axes.outputs)
  a = a_m.reshape(stack_shape + ins + (r,))
  b = b_m.reshape(stack_shape + (r,) + outs)
  return LoraWeight(x.w, a.astype(dtype), b.astype(dtype), spec=new_spec(r), axes=axes, shape=x.shape)


def _keys(key, path: str, side: str, n: int):
  """The ``dare`` masks' keys: ``fold_in(fold_in(key, crc32(path + ':' + side)), i)`` for adapter i."""
  if key is None:
    return [None] * n
  k = jax.random.fold_in(key, zlib.crc32(f"{path}:{side}".encode()) & 0x7FFFFFFF)
  return [jax.random.fold_in(k, i) for i in range(n)]


def dare_mask(key: jax.Array, path: str, side: str, index: int, shape, density: float) -> jax.Array:
  """The keep-mask ``weighted_merge`` draws for a ``dare`` method (for tests and audits).

  ``side`` is ``"a"`` / ``"b"`` (factor methods) or ``"delta"`` (``*_svd``);
  ``shape`` is the tensor's shape in jlora's layout (the full update is
  ``stack + (n_in, n_out)``).
  """
  return jax.random.bernoulli(_keys(key, path, side, index + 1)[index], density, tuple(shape))


def _task_combine(base: str, tensors, weights, density, majority_sign, ns: int, keys):
  """PEFT's ``task_arithmetic`` / ``ties`` / ``dare_*`` / ``magnitude_prune`` over one tensor each."""
  if base in ("ties", "magnitude_prune"):
    tensors = [_magnitude_prune(t, float(density), ns) for t in tensors]
  elif base in ("dare_linear", "dare_ties"):
    d = float(density)
    if d < 1.0:
      tensors = [jnp.where(jax.random.bernoulli(k, d, t.shape), t, 0.0) / d
                 for t, k in zip(tensors, keys)]
  stacked = jnp.stack(tensors)
  w = jnp.asarray(weights, stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
  if base in ("ties", "dare_ties"):
    sign = jnp.sign(stacked)
    mag = stacked.sum(0) if majority_sign == "total" else sign.sum(0)
    majority = jnp.where(mag >= 0, 1.0, -1.0)
    keep = sign == majority
    kept = jnp.sum(jnp.where(keep, stacked * w, 0.0), axis=0)
    return kept / jnp.maximum(jnp.sum(keep, axis=0), 1).astype(stacked.dtype)
  return jnp.sum(stacked * w, axis=0)


def _magnitude_prune(t, density: float, ns: int):
  """Keeps the ``int(density * size)`` largest magnitudes of each stacked slice (PEFT's top-k)."""
  if density >= 1.0:
    return t
  lead = t.shape[:ns]
  flat = t.reshape((math.prod(lead), -1))
  k = int(density * flat.shape[1])
  if k == 0:
    return jnp.zeros_like(t)
  _, idx = jax.lax.top_k(jnp.abs(flat), k)
  mask = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], idx].set(True)
  return jnp.where(mask, flat, 0.0).reshape(t.shape)


# -- helpers ----------------------------------------------------------------------------------

def _stacked_leaves(tree: Any) -> list[tuple[str, StackedLoraWeight]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapted)
  out = [(path_str(kp), x) for kp, x in flat if isinstance(x, StackedLoraWeight)]
  if not out:
    raise TreeError("the tree holds no stacked adapters; build one with "
                    "jlora.stack_adapters([tree_a, tree_b, ...], names=[...])")
  return out


def _has_stacked(tree: Any) -> bool:
  flat = jax.tree_util.tree_leaves(tree, is_leaf=is_adapted)
  return any(isinstance(x, StackedLoraWeight) for x in flat)


def _equal(x, y) -> bool:
  if x is y:
    return True
  lx, ly = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
  if len(lx) != len(ly):
    return False
  for a, b in zip(lx, ly):
    if a is b:
      continue
    if not (hasattr(a, "shape") and hasattr(b, "shape")):
      if a != b:
        return False
      continue
    if tuple(a.shape) != tuple(b.shape) or jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
      return False
    if not bool(jnp.array_equal(a, b)):
      return False
  return jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y)


def _same_base(x, x0, where: str, i: int, names) -> None:
  if not _equal(x, x0):
    raise TreeError(f"tree {i} ({names[i]!r}) has a different base at {where!r} than tree 0 "
                    f"({names[0]!r}); adapters can share one base only when it is the same model")

