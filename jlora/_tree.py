"""The transforms of a parameter tree: wrap, split, combine, merge, unmerge (any adapter kind)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jlora._adapter import AdapterSpec, Axes, acc_dtype, infer_axes, is_adapted
from jlora._errors import RuleError, TreeError
from jlora._methods.lora import Full, FullWeight, LoraWeight, adapter_dtype, is_array
from jlora._paths import CompiledRules, Rules, closest_paths, normalise_rules, path_str
from jlora._quant import QuantizationError, dense, is_quantized, is_whole, requantize_like

__all__ = [
    "Axes", "LoraWeight", "FullWeight", "wrap", "split", "combine", "merge", "unmerge",
    "trainable_mask", "is_adapted", "adapted_leaves", "infer_axes",
]

_adapter_dtype = adapter_dtype
_acc_dtype = acc_dtype
_is_array = is_array


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
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_adapted)[0]:
    if is_adapted(leaf):
      raise TreeError(
          f"the tree is already wrapped (leaf {path_str(kp)!r} is a {type(leaf).__name__}); wrap "
          "the original params, or call jlora.merge(tree) first to fold the adapters in")

  def adapt(path, leaf, spec, rule):
    if is_quantized(leaf) and isinstance(spec, Full):
      raise QuantizationError(
          f"rule {rule!r} trains {path!r} in full, but it is a quantised base "
          f"({leaf.spec.kind}); a quantised leaf is frozen. Leave it out of jlora.quantize's "
          "rules to train it in full, or put an adapter (jlora.LoRA, ...) on it")
    return _adapt(path, leaf, spec, rule, key)
  return map_rules(params, rules, adapt)


def map_rules(params: Any, rules: Rules, fn) -> Any:
  """``params`` with each leaf a rule matches replaced by ``fn(path, leaf, spec, rule)``.

  Adapter and quantised leaves count as leaves. A rule that matches no leaf
  (or only leaves ``fn`` returns unchanged) is a :class:`RuleError`, as in
  :func:`wrap`; nothing is returned on any error.
  """
  compiled = normalise_rules(rules)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_whole)
  paths = [path_str(kp) for kp, _ in flat]
  used: dict[str, int] = {}
  out = []
  for path, (_, leaf) in zip(paths, flat):
    rule, spec = compiled.match(path, leaf)
    new = leaf if spec is None else fn(path, leaf, spec, rule)
    if rule is not None:
      used.setdefault(rule, 0)
      if new is not leaf or spec is None:
        used[rule] += 1
    out.append(new)
  _check_all_rules_used(compiled, used, paths, flat)
  return jax.tree_util.tree_unflatten(treedef, out)


def _adapt(path: str, leaf: Any, spec: Any, rule: str, key: jax.Array) -> Any:
  if not isinstance(spec, AdapterSpec):
    raise RuleError(
        f"rule {rule!r} maps path {path!r} to {spec!r}; a spec must be a jlora method spec "
        "(jlora.LoRA(...), jlora.Full(), ...) or None")
  return spec.adapt(path, leaf, key)


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
  def half(keep):
    def go(x):
      if not is_adapted(x):
        return None if keep == "trainable" else x
      names = x.trainable if keep == "trainable" else x.frozen
      return x.replace(**{n: None for n in x.children() if n not in names})
    return go

  return (jax.tree.map(half("trainable"), tree, is_leaf=is_whole),  # a quantised base is frozen
          jax.tree.map(half("frozen"), tree, is_leaf=is_whole))


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
  is_none = lambda x: x is None or is_quantized(x)  # noqa: E731 - a quantised base is one leaf
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


def merge(tree: Any, *, requantize: bool = False, dtype: Any = None) -> Any:
  """Folds every adapter into its base: plain params with ``W + scale * A @ B``.

  The sum is computed in float32 (float64 for float64 bases) and cast back to
  ``W``'s dtype, so a bf16 base stays bf16. :class:`Full` leaves become plain
  arrays. Gradients do not flow into frozen bases (``W`` is wrapped in
  ``stop_gradient``), so ``jax.grad`` of a loss through ``merge`` costs no
  weight-gradient for them. Trees without adapters pass through unchanged.

  A quantised base (:func:`jlora.quantize`) is dequantised first. By default
  the result is a float base, quantised leaves without adapters dequantised
  too; with ``requantize=True`` each merged leaf is quantised again with its
  base's spec (rounding error: one more quantisation step, see
  ``docs/method_qlora.md``) and unadapted quantised leaves stay as they are.

  Args:
    tree: a wrapped tree.
    requantize: quantise merged quantised bases again instead of returning floats.
    dtype: the float dtype for dequantised leaves (default: the dtype each
      quantised leaf records, the kernel's original one).

  Raises:
    QuantizationError: ``dtype`` is not a floating-point dtype (nothing is merged).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.eye(4)}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> jlora.merge(tree)["k"].shape
    (4, 4)
  """
  _check_float_dtype(dtype, "merge")

  def fold(x):
    if is_quantized(x):
      return x if requantize else _cast(x.dequantize(), dtype)
    if not is_adapted(x):
      return x
    if not is_quantized(x.w):
      return x.merged()
    m = x.replace(w=_cast(x.w.dequantize(), dtype)).merged()
    return requantize_like(m, x.w) if requantize else m

  return jax.tree.map(fold, tree, is_leaf=is_whole)


def _check_float_dtype(dtype, what: str) -> None:
  if dtype is None:
    return
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise QuantizationError(
        f"{what}: dtype={dtype!r} cannot hold a dequantised weight; pass a floating-point dtype "
        "(jnp.float32, jnp.bfloat16, jnp.float16) or leave it out for each base's own dtype")


def _cast(x, dtype):
  return x if dtype is None else x.astype(dtype)


def unmerge(merged: Any, tree: Any, *, requantize: bool = False) -> Any:
  """Recovers the base params from ``merge(tree)``: ``W = merged - scale * A @ B``.

  Exact up to rounding: float32 bases come back within a few ulps of
  ``|W| + |delta|``; a bfloat16 base is rounded twice (merge and unmerge), so
  expect ``|recovered - W| <= 2**-7 * (|W| + |delta|)`` elementwise. Where the
  wrapped tree's base is quantised, the merged leaf (float or requantised) is
  dequantised, the delta taken out, and the result returned as a float base, or
  quantised again with ``requantize=True``.

  Args:
    merged: plain params, as :func:`merge` returned them (or after serving).
    tree: the wrapped tree that holds the adapters.
    requantize: quantise recovered bases whose wrapped base was quantised.

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
    if not is_adapted(x):
      return m
    if tuple(m.shape) != x.shape:
      raise TreeError(f"unmerge: merged leaf has shape {tuple(m.shape)}, the adapter's base {x.shape}")
    if is_quantized(x.w):
      w = x.replace(w=x.w.dequantize()).unmerged(dense(m))
      return requantize_like(w, x.w) if requantize else w
    return x.unmerged(m)
  try:
    return jax.tree.map(take_out, tree, merged, is_leaf=is_whole)
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
    if not is_adapted(x):
      return frozen
    return x.replace(**{n: (None if getattr(x, n) is None else
                            (trainable if n in x.trainable else frozen)) for n in x.children()})
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

def _check_all_rules_used(compiled: CompiledRules, used: dict[str, int], paths, flat) -> None:
  if compiled.callable is not None:
    if not used:
      raise RuleError("the rules callable returned a spec for no leaf; check it against the tree's "
                      f"paths, e.g. {paths[:5]}")
    return
  for name, _, spec in compiled.entries:
    if used.get(name, 0) == 0:
      shadowed = name in used
      arr_paths = [p for p, (_, x) in zip(paths, flat) if is_array(x)]
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
