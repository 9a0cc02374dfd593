"""The jaxpr interpreter behind :func:`jlora.lora`: contractions with adapted bases go low-rank.

``fn`` is traced once with every adapted base ``W`` as an ordinary input, then
its jaxpr is evaluated here with each such input replaced by a :class:`jlora._lazy.Lazy`
value: the (frozen, ``stop_gradient``-ed) base together with its factors.
Shape-only operations on a lazy value (cast, transpose, reshape, squeeze,
broadcast, slice, dynamic slice, gather along stacked axes) are applied to the
base and to the factors, so the value stays lazy. Contractions that consume it
(``dot_general``, ``conv_general_dilated``, an embedding ``gather``) compute
``op(x, W) + s * op(op(x, A), B)`` and never form ``W + s A B``. Control flow
(``scan``, ``while``, ``cond``, ``remat``) is rebuilt around the interpreted
bodies; calls (``jit``, ``custom_jvp``, ``custom_vjp``) are inlined. Any other
use of a lazy value materialises that value (exact), logs it at DEBUG on the
``"jlora"`` logger, or raises :class:`RewriteError` in strict mode.

The lazy value, ``base`` plus terms, is :class:`jlora._lazy.Lazy`; each adapter kind
builds its own in ``lazy()`` (see :mod:`jlora._adapter`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jlora._adapter import Axes, is_adapted
from jlora._errors import JloraError, TreeError
from jlora._lazy import ACTIVATIONS, Lazy, Term, from_kernel, is_routed
from jlora._paths import path_str
from jlora._quant import QuantizedArray, dense, is_quantized, is_whole

try:  # name stacks make profiles and HLO readable; optional
  from jax._src import source_info_util as _siu
except ImportError:  # pragma: no cover
  _siu = None

__all__ = ["RewriteError", "lift", "full_size_dots"]

logger = logging.getLogger("jlora")


class RewriteError(JloraError, ValueError):
  """``jlora.lora(fn, strict=True)`` met a use of an adapted weight it cannot keep low-rank."""


# -- the lazy value ---------------------------------------------------------------------------



class _QBase:
  """A quantised frozen base whose dequantisation waits for its use.

  Shape-only operations on the lazy value queue up in ``ops`` (each an
  equation and its other operands) and run after :meth:`realise` dequantises,
  so a stacked base sliced by ``lax.scan`` is dequantised one layer at a time,
  inside the loop body, where a contraction consumes it.
  """

  __slots__ = ("q", "ops", "shape", "dtype")

  def __init__(self, q: QuantizedArray, ops=(), shape=None, dtype=None):
    self.q, self.ops = q, tuple(ops)
    self.shape = tuple(q.shape if shape is None else shape)
    self.dtype = jnp.dtype(q.dtype if dtype is None else dtype)

  def then(self, eqn, rest) -> _QBase:
    aval = eqn.outvars[0].aval
    return _QBase(self.q, self.ops + ((eqn, tuple(rest)),), aval.shape, aval.dtype)

  def realise(self) -> jax.Array:
    x = self.q.dequantize()
    for eqn, rest in self.ops:
      x = _bind(eqn, [x, *rest])
    return x

  def elementwise(self) -> bool:
    """True when every queued op is elementwise (commutes with slicing a stacked layer out)."""
    return all(e.primitive.name in _ELEMENTWISE for e, _ in self.ops)

  def unstacked(self, sliced: QuantizedArray) -> _QBase:
    """This base for one layer of its leading stacked axis, from that layer's codes (``sliced``:
    the children cut by ``lax.scan``, under the stacked static fields)."""
    q, ax = self.q, self.q.axes
    q_children = (sliced.data, sliced.absmax, sliced.absmax2, sliced.offset)
    axes = Axes(tuple(i - 1 for i in ax.stack[1:]), tuple(i - 1 for i in ax.inputs),
                tuple(i - 1 for i in ax.outputs))
    one = QuantizedArray(*q_children, spec=q.spec, axes=axes, shape=q.shape[1:], dtype=q.dtype)
    return _QBase(one, self.ops, self.shape[1:], self.dtype)


jax.tree_util.register_pytree_node(
    _QBase,
    lambda b: ((b.q, tuple(rest for _, rest in b.ops)), (tuple(e for e, _ in b.ops), b.shape, b.dtype)),
    lambda aux, ch: _QBase(ch[0], tuple(zip(aux[0], ch[1])), aux[1], aux[2]),
)

_ELEMENTWISE = frozenset({"convert_element_type", "copy", "copy_p", "stop_gradient"})


def _real(base) -> jax.Array:
  """The base as an array (dequantised where it is a :class:`_QBase`)."""
  return base.realise() if isinstance(base, _QBase) else base


def _bind_q(eqn, operands, qpos: int) -> jax.Array:
  """``eqn`` on ``operands`` whose ``qpos``-th is a :class:`_QBase`, for a contraction linear in
  the others: the dequantised weight is recomputed for the backward pass rather than kept, so
  only the packed codes are residuals (the weight of one layer exists only while it is used)."""
  qb = operands[qpos]
  chunked = _row_chunked_dot(eqn, operands, qpos)
  if chunked is not None:
    return chunked
  others = [o for i, o in enumerate(operands) if i != qpos]
  leaves, tdef = jax.tree_util.tree_flatten(qb.q)
  shapes = [(jnp.shape(o), jnp.result_type(o)) for o in others]

  def run(others, leaves):
    w = _QBase(jax.tree_util.tree_unflatten(tdef, leaves), qb.ops, qb.shape, qb.dtype).realise()
    ops = list(others)
    ops.insert(qpos, w)
    return _bind(eqn, ops)

  @jax.custom_vjp
  def contract(others, leaves):
    return run(others, leaves)

  def fwd(others, leaves):
    return run(others, leaves), leaves

  def bwd(leaves, g):
    zeros = [jnp.zeros(sh, dt) for sh, dt in shapes]  # the op is linear in them: any point works
    _, vjp = jax.vjp(lambda o: run(o, leaves), zeros)
    (d_others,) = vjp(g)
    return d_others, [None] * len(leaves)

  contract.defvjp(fwd, bwd)
  return contract(others, leaves)


_CHUNK_BYTES = 64 << 20  # a row-quantised table bigger than this is contracted in row chunks
_CHUNK_TARGET = 8 << 20  # of about this many float32 bytes each


def _row_chunks(n_rows: int, n_in: int) -> int:
  """How many equal row chunks keep each dequantised chunk near 8 MB (a divisor of ``n_rows``)."""
  want = max(1, -(-n_rows * n_in * 4 // _CHUNK_TARGET))
  for k in range(want, n_rows + 1):
    if n_rows % k == 0:
      return k
  return n_rows


def _row_chunked_dot(eqn, operands, qpos: int):
  """``x @ E^T`` against a large row-quantised table (a tied output projection over the token
  embedding): the rows are dequantised a chunk at a time, forward and backward, so the float
  table never exists whole. None where the contraction has another form."""
  qb = operands[qpos]
  if qpos != 1 or not qb.elementwise() or qb.q.axes != Axes((), (1,), (0,)) or len(qb.shape) != 2:
    return None
  n_rows, n_in = qb.shape
  if n_rows * n_in * 4 <= _CHUNK_BYTES:
    return None
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if tuple(rc) != (1,) or lb or rb:
    return None
  x = operands[0]
  k = _row_chunks(n_rows, n_in)
  rows = n_rows // k
  # the rows' codes and (decoded, small) scales, cut into k chunks of `rows` rows
  xs = tuple(None if p is None else p.reshape((k, rows) + p.shape[1:]) for p in qb.q.row_parts())

  def chunk_w(d, s, m):
    w = qb.q.rows_from(d, s, m)
    for e, rest in qb.ops:
      w = _bind(e, [w, *rest])
    return w

  out_dtype = eqn.outvars[0].aval.dtype

  def fwd_all(x):
    ys = lax.map(lambda c: _bind(eqn, [x, chunk_w(*c)]), xs)  # (k, ..., rows)
    return jnp.moveaxis(ys, 0, -2).reshape(ys.shape[1:-1] + (n_rows,)).astype(out_dtype)

  @jax.custom_vjp
  def contract(x):
    return fwd_all(x)

  def bwd(xshape_dtype, g):
    shape, dt = xshape_dtype.shape, xshape_dtype.dtype
    gs = jnp.moveaxis(g.reshape(g.shape[:-1] + (k, rows)), -2, 0)

    def body(acc, c):
      (d, s, m), gc = c
      w = chunk_w(d, s, m)
      _, vjp = jax.vjp(lambda o: _bind(eqn, [o, w]), jnp.zeros(shape, dt))
      return acc + vjp(gc)[0].astype(acc.dtype), None
    acc, _ = lax.scan(body, jnp.zeros(shape, _acc(dt)), (xs, gs))
    return (acc.astype(dt),)

  contract.defvjp(lambda x: (fwd_all(x), jax.ShapeDtypeStruct(x.shape, x.dtype)), bwd)
  return contract(x)


def _axes_of(sides: Sequence[str], factor: str) -> list[int]:
  """The value axes a side's tensors carry, in value order (their rank axis comes after them):
  ``"a"`` the left ones, ``"b"`` the right ones, ``"s"`` the stack tensors (``S`` axes only)."""
  if factor == "s":
    return [i for i, s in enumerate(sides) if s == "S"]
  skip = "R" if factor == "a" else "L"
  return [i for i, s in enumerate(sides) if s != skip]


def _is_lazy(x) -> bool:
  return isinstance(x, Lazy)


def _acc(*dtypes) -> Any:
  return jnp.float64 if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.float32


def _compute_dtype(t: Term, x=None) -> Any:
  """The low-rank path's dtype: the widest of the input's and the factors' (PEFT casts the
  input to the adapter's dtype; on a float32 input a bfloat16 adapter would lose precision)."""
  dt = jnp.promote_types(t.a.dtype, t.b.dtype)
  if x is not None and jnp.issubdtype(x.dtype, jnp.floating):
    dt = jnp.promote_types(dt, x.dtype)
  return dt


def _side_full(x, sides, f: str):
  """A rank-1 side tensor (``u`` / ``v``) broadcastable against the value."""
  have = _axes_of(sides, f)
  x = x[..., 0]
  return x.reshape(tuple(x.shape[have.index(i)] if i in have else 1 for i in range(len(sides))))


def _delta(lz: Lazy) -> jax.Array:
  """``sum_k scale_k * a_k (x) b_k`` in the value's layout (float32/64): the full-size update."""
  letters = string.ascii_letters[:lz.ndim]
  r = string.ascii_letters[lz.ndim]
  la = "".join(letters[i] for i in _axes_of(lz.sides, "a")) + r
  lb = "".join(letters[i] for i in _axes_of(lz.sides, "b")) + r
  total = None
  for t in lz.terms:
    acc = _acc(t.a.dtype, t.b.dtype)
    d = _scaled(jnp.einsum(f"{la},{lb}->{letters}", t.a.astype(acc), t.b.astype(acc),
                           precision=lax.Precision.HIGHEST), t.scale)
    total = d if total is None else total + d
  return total


def _materialise(lz: Lazy) -> jax.Array:
  acc = _acc(lz.base.dtype, *[x.dtype for x in lz.lefts() + lz.rights()])
  out = _real(lz.base).astype(acc)
  if lz.u is not None:
    out = out * _side_full(lz.u, lz.sides, "a").astype(acc)
  if lz.terms:
    out = out + _delta(lz).astype(acc)
  if lz.v is not None:
    out = out * _side_full(lz.v, lz.sides, "b").astype(acc)
  return out.astype(lz.base.dtype)


# -- context ----------------------------------------------------------------------------------

class _Ctx:
  """Per-(sub)jaxpr state: the dropout key, strictness, a counter for fresh subkeys."""

  def __init__(self, key, strict: bool, unroll: bool = False):
    self.key, self.strict, self.unroll, self.count = key, strict, unroll, 0

  def next_key(self):
    k = jax.random.fold_in(self.key, self.count)
    self.count += 1
    return k

  def child(self, key) -> _Ctx:
    return _Ctx(key, self.strict, self.unroll)

  def give_up(self, lz: Lazy, what: str) -> jax.Array:
    """Materialises ``lz`` for a use the rewrite does not cover (or raises when strict)."""
    if lz.post is not None:
      raise RewriteError(
          f"jlora.lora: {what} uses the weight {lz.path!r} (shape {lz.shape}), which carries a "
          "bottleneck adapter, in a way other than a dense contraction with the activations "
          "(x @ W, einsum, dot_general): a bottleneck adapts that contraction's output and cannot "
          "be folded into the weight. Contract the weight directly in the model, or adapt this "
          "leaf with another method (jlora.LoRA, jlora.IA3)")
    if is_routed(lz):
      raise RewriteError(
          f"jlora.lora: {what} uses the stacked adapters at {lz.path!r} (shape {lz.shape}) in a way "
          "that cannot stay low-rank; a mixed-adapter batch (adapter_ids=...) needs every use of a "
          "stacked weight to be a contraction with the activations (x @ W, einsum, dot_general). "
          "Select one adapter with jlora.select_adapter(tree, name) to run this model")
    msg = (f"jlora.lora: {what} uses the adapted weight {lz.path!r} (shape {lz.shape}) in a way "
           "that cannot stay low-rank, so W + s*A@B is formed for that use")
    if self.strict:
      raise RewriteError(
          msg + "; rewrite the model to contract the weight directly (x @ W, einsum, conv, take), "
          "or call jlora.lora(fn) without strict=True to accept the merge")
    logger.debug(msg)
    return _materialise(lz)


# -- entry point ------------------------------------------------------------------------------

def lift(fn: Callable[..., Any], *, strict: bool, unroll: bool = False,
         checked: bool = False) -> Callable[..., Any]:
  """``fn`` on trees with LoRA leaves, evaluated with low-rank contractions (see module doc).

  ``unroll=True`` also fully unrolls every ``lax.scan`` (used to count FLOPs:
  XLA's cost analysis counts a loop body once).
  """
  def lifted(*args, lora_key=None, adapter_ids=None, **kwargs):
    flat, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_whole)
    dyn_pos, dyn_vals, lazies = [], [], {}
    routed = [leaf for _, leaf in flat if getattr(leaf, "routed", False)]
    ids = _adapter_ids(adapter_ids, routed, checked)
    static = [None] * len(flat)
    for i, (kp, leaf) in enumerate(flat):
      if is_quantized(leaf):  # a frozen quantised base: dequantised where it is used
        lz = from_kernel(leaf, leaf.axes, path=_user_path(kp, path_str))
        lazies[len(dyn_vals)] = lz.replace(base=_QBase(lz.base))
        dyn_pos.append(i)
        dyn_vals.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        continue
      if is_adapted(leaf) and is_quantized(leaf.w) and type(leaf).lazy_reads_base:
        leaf = leaf.replace(w=leaf.w.dequantize())
      if is_adapted(leaf):
        where = _user_path(kp, path_str)
        leaf.require(f"jlora.lora: the adapter at {where!r}")
        lz = leaf.lazy(where, ids) if leaf.routed else leaf.lazy(where)
        if lz is not None:
          if is_quantized(lz.base):
            lz = lz.replace(base=_QBase(lz.base))
          lazies[len(dyn_vals)] = lz
          dyn_pos.append(i)
          dyn_vals.append(jax.ShapeDtypeStruct(lz.shape, lz.base.dtype) if isinstance(lz.base, _QBase)
                          else leaf.w)
        else:
          dyn_pos.append(i)
          dyn_vals.append(leaf.replace(w=dense(leaf.w)).merged())
      elif isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        dyn_pos.append(i)
        dyn_vals.append(leaf)
      else:
        static[i] = leaf

    def traced(*dyn):
      leaves = list(static)
      for i, v in zip(dyn_pos, dyn):
        leaves[i] = v
      a, k = jax.tree_util.tree_unflatten(treedef, leaves)
      return fn(*a, **k)

    if not lazies and not unroll:
      return traced(*dyn_vals)
    closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(*dyn_vals)
    ins = [lazies.get(j, v) for j, v in enumerate(dyn_vals)]
    ctx = _Ctx(lora_key, strict, unroll)
    outs = _eval(closed.jaxpr, closed.consts, ins, ctx)
    outs = [ctx.give_up(o, "returning it from the function") if _is_lazy(o) else o for o in outs]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return lifted


def _adapter_ids(adapter_ids, routed: list, checked: bool):
  """Validates ``adapter_ids`` against the stacked leaves; returns an int32 ``(batch,)`` array."""
  if not routed:
    if adapter_ids is not None:
      raise TreeError("jlora.lora: adapter_ids was given but the tree holds no stacked adapters; "
                      "build one with jlora.stack_adapters([tree_a, tree_b, ...])")
    return None
  counts = {leaf.spec.count for leaf in routed}
  if len(counts) > 1:
    raise TreeError(f"jlora.lora: the stacked leaves hold different numbers of adapters {sorted(counts)}; "
                    "stack every leaf with jlora.stack_adapters")
  (n,) = counts
  if adapter_ids is None:
    raise TreeError(
        f"jlora.lora: the tree holds {n} stacked adapters {list(routed[0].spec.names)}; pass "
        "adapter_ids=<int array, one per batch row> (-1 = the base alone), or pick one with "
        "jlora.select_adapter(tree, name)")
  ids = jnp.asarray(adapter_ids)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TreeError(f"jlora.lora: adapter_ids must be a 1-D int array (one id per batch row), got "
                    f"{ids.dtype} of shape {ids.shape}")
  ids = ids.astype(jnp.int32)
  try:
    host = np.asarray(ids)
  except jax.errors.TracerArrayConversionError:
    host = None
  if host is not None:
    _check_ids_range(host, n, routed[0].spec.names)
  elif checked:
    jax.debug.callback(lambda h: _check_ids_range(np.asarray(h), n, routed[0].spec.names), ids)
  return ids


def validate_adapter_ids(tree: Any, adapter_ids) -> Any:
  """``adapter_ids`` checked against ``tree``'s stacked leaves as ``lora(fn)`` would (eagerly)."""
  routed = [x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_whole) if getattr(x, "routed", False)]
  return _adapter_ids(adapter_ids, routed, False)


def _check_ids_range(ids: np.ndarray, n: int, names) -> None:
  bad = (ids < -1) | (ids >= n)
  if bad.any():
    raise TreeError(f"jlora.lora: adapter_ids {ids[bad][:8].tolist()} are out of range: the tree "
                    f"holds {n} adapters {list(names)} (ids 0..{n - 1}, -1 = the base alone)")


def _user_path(kp, path_str) -> str:
  # kp starts with (tuple index of (args, kwargs), arg index or kwarg name)
  where, rest = kp[:2], kp[2:]
  p = path_str(rest)
  if where[0].idx == 0:
    if where[1].idx == 0:
      return p
    name = f"argument {where[1].idx}"
  else:
    name = f"keyword {where[1].key!r}"
  return f"{p} ({name})" if p else name


# -- the evaluator ----------------------------------------------------------------------------

def _eval(jaxpr, consts: Sequence[Any], args: Sequence[Any], ctx: _Ctx) -> list[Any]:
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  def write(v, x):
    if not isinstance(v, jcore.DropVar):
      env[v] = x

  for v, x in zip(jaxpr.constvars, consts):
    write(v, x)
  for v, x in zip(jaxpr.invars, args):
    write(v, x)
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    with _eqn_context(eqn):
      rule = _CONTROL.get(eqn.primitive.name)
      if any(_is_lazy(x) for x in invals) or (ctx.unroll and rule is not None):
        outs = _apply_rule(eqn, invals, ctx)
      else:
        outs = _bind(eqn, invals)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      write(v, x)
  return [read(v) for v in jaxpr.outvars]


def _eqn_context(eqn):
  stack = contextlib.ExitStack()
  if _siu is not None:
    try:
      name_stack = _siu.current_name_stack() + eqn.source_info.name_stack
      stack.enter_context(_siu.user_context(eqn.source_info.traceback, name_stack=name_stack))
    except Exception:  # pragma: no cover - best effort across jax versions
      pass
  manager = getattr(getattr(eqn, "ctx", None), "manager", None)
  if manager is not None:
    stack.enter_context(manager)
  return stack


def _bind(eqn, invals, params=None):
  params = eqn.params if params is None else params
  bp = eqn.primitive.get_bind_params(params)
  if isinstance(bp, tuple):  # older jax: (subfuns, params)
    subfuns, bp = bp
    return eqn.primitive.bind(*subfuns, *invals, **bp)
  return eqn.primitive.bind(*invals, **bp)


def _apply_rule(eqn, invals, ctx: _Ctx):
  name = eqn.primitive.name
  rule = _CONTROL.get(name) or _CONSUMERS.get(name) or _ARITH.get(name)
  if rule is not None:
    out = rule(eqn, invals, ctx)
    if out is not None:
      return out
  elif name in _TRANSFORMS and _is_lazy(invals[0]) and not any(_is_lazy(x) for x in invals[1:]):
    out = _TRANSFORMS[name](eqn, invals[0], invals[1:])
    if out is not None:
      return out
  invals = [ctx.give_up(x, f"the primitive {name!r}") if _is_lazy(x) else x for x in invals]
  return _bind(eqn, invals)


def _bind_base(eqn, lz: Lazy, rest):
  if isinstance(lz.base, _QBase):
    return lz.base.then(eqn, rest)
  return _bind(eqn, [lz.base, *rest])


# -- shape-only transforms: the value stays lazy ------------------------------------------------

def _t_convert(eqn, lz, rest):
  if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
    return None
  return lz.replace(base=_bind_base(eqn, lz, rest))


def _t_identity(eqn, lz, rest):
  return lz.replace(base=_bind_base(eqn, lz, rest))


def _t_stop_gradient(eqn, lz, rest):
  return lz.map_sides(lambda f: lax.stop_gradient, base=_bind_base(eqn, lz, rest))


def _t_transpose(eqn, lz, rest):
  perm = tuple(eqn.params["permutation"])
  sides = tuple(lz.sides[p] for p in perm)

  def per(f):
    old = _axes_of(lz.sides, f)
    fperm = [old.index(p) for p in perm if p in old] + [len(old)]
    return lambda x: x if fperm == list(range(len(fperm))) else lax.transpose(x, fperm)
  return lz.map_sides(per, base=_bind_base(eqn, lz, rest), sides=sides)


def _t_squeeze(eqn, lz, rest):
  dims = {d % lz.ndim for d in eqn.params["dimensions"]}
  sides = tuple(s for i, s in enumerate(lz.sides) if i not in dims)

  def per(f):
    old = _axes_of(lz.sides, f)
    fd = [old.index(d) for d in sorted(dims) if d in old]
    return lambda x: lax.squeeze(x, fd) if fd else x
  return lz.map_sides(per, base=_bind_base(eqn, lz, rest), sides=sides)


def _reshape_groups(old: Sequence[int], new: Sequence[int]):
  """Groups of non-unit axes ``(old_axes, new_axes)`` with equal products, or None."""
  if 0 in old or 0 in new:
    return None
  oi = [i for i, d in enumerate(old) if d != 1]
  ni = [j for j, d in enumerate(new) if d != 1]
  groups, i, j = [], 0, 0
  while i < len(oi) and j < len(ni):
    go, gn = [oi[i]], [ni[j]]
    po, pn = old[oi[i]], new[ni[j]]
    i, j = i + 1, j + 1
    while po != pn:
      if po < pn:
        if i >= len(oi):
          return None
        go.append(oi[i])
        po *= old[oi[i]]
        i += 1
      else:
        if j >= len(ni):
          return None
        gn.append(ni[j])
        pn *= new[ni[j]]
        j += 1
    groups.append((go, gn))
  if i != len(oi) or j != len(ni):
    return None
  return groups


def _t_reshape(eqn, lz, rest):
  if eqn.params.get("dimensions") is not None or rest:
    return None
  new = tuple(eqn.params["new_sizes"])
  groups = _reshape_groups(lz.shape, new)
  if groups is None:
    return None
  sides = ["L"] * len(new)  # new unit axes live on the left side only
  for go, gn in groups:
    kinds = {lz.sides[i] for i in go}
    if len(kinds) != 1:
      return None  # merges an input axis with an output axis: not low-rank any more
    (side,) = kinds
    for j in gn:
      sides[j] = side

  def per(f):
    fshape = tuple(new[j] for j in _axes_of(sides, f))
    return lambda x: x if tuple(x.shape) == fshape + (x.shape[-1],) else x.reshape(fshape + (x.shape[-1],))
  return lz.map_sides(per, base=_bind_base(eqn, lz, rest), sides=tuple(sides))


def _t_broadcast(eqn, lz, rest):
  if rest:
    return None  # dynamic shapes
  shape = tuple(eqn.params["shape"])
  bd = tuple(eqn.params["broadcast_dimensions"])
  sides = ["L"] * len(shape)  # new axes live on the left side only
  for k, j in enumerate(bd):
    sides[j] = lz.sides[k]

  def per(f):
    old = _axes_of(lz.sides, f)
    new = _axes_of(sides, f)
    fshape = tuple(shape[j] for j in new)
    fbd = tuple(new.index(bd[k]) for k in old) + (len(new),)
    return lambda x: lax.broadcast_in_dim(x, fshape + (x.shape[-1],), fbd)
  return lz.map_sides(per, base=_bind_base(eqn, lz, rest), sides=tuple(sides))


def _t_slice(eqn, lz, rest):
  p = eqn.params
  strides = p.get("strides")

  def per(f):
    ax = _axes_of(lz.sides, f)
    return lambda x: lax.slice(x, [p["start_indices"][i] for i in ax] + [0],
                               [p["limit_indices"][i] for i in ax] + [x.shape[-1]],
                               None if strides is None else [strides[i] for i in ax] + [1])
  return lz.map_sides(per, base=_bind_base(eqn, lz, rest))


def _t_dynamic_slice(eqn, lz, rest):
  sizes = eqn.params["slice_sizes"]
  if len(rest) != lz.ndim:
    return None
  zero = jnp.zeros((), jnp.asarray(rest[0]).dtype) if rest else 0

  def per(f):
    ax = _axes_of(lz.sides, f)
    return lambda x: lax.dynamic_slice(x, [rest[i] for i in ax] + [zero],
                                       [sizes[i] for i in ax] + [x.shape[-1]])
  return lz.map_sides(per, base=_bind_base(eqn, lz, rest))


def _arith(eqn, invals, ctx):
  """``W * c``, ``c * W``, ``W / c`` (``c`` a scalar), ``-W``, ``W + C``, ``W - C`` (``C`` frozen).

  The result is still a frozen part plus terms: a scalar factor scales every
  term's ``a`` (and the base), and an added frozen array joins the base when
  no scaling ``u`` / ``v`` is in the way.
  """
  name = eqn.primitive.name
  lazy = [i for i, x in enumerate(invals) if _is_lazy(x)]
  if len(lazy) != 1:
    return None
  i = lazy[0]
  lz = invals[i]
  others = [x for j, x in enumerate(invals) if j != i]
  if lz.post is not None and name not in ("add", "sub"):
    return None  # a bottleneck reads the contraction's output: a scaled weight would change it

  def scale_terms(factor):
    return tuple(t._replace(a=(t.a * jnp.asarray(factor).astype(t.a.dtype)).astype(t.a.dtype))
                 for t in lz.terms)
  if name == "neg":
    return lz.replace(base=_bind(eqn, [_real(lz.base)]), terms=tuple(t._replace(a=-t.a) for t in lz.terms))
  (c,) = others
  if name in ("add", "sub"):
    if (jnp.shape(c) != lz.shape and jnp.ndim(c) != 0) or lz.u is not None or lz.v is not None:
      return None
    base = _bind(eqn, [_real(x.base) if _is_lazy(x) else x for x in invals])
    if name == "sub" and i == 1:
      return lz.replace(base=base, terms=tuple(t._replace(a=-t.a) for t in lz.terms))
    return lz.replace(base=base)
  if jnp.ndim(c) != 0 or (name == "div" and i == 1):
    return None  # only scaling by a scalar keeps the update low-rank
  base = _bind(eqn, [_real(x.base) if _is_lazy(x) else x for x in invals])
  c = jnp.asarray(c)
  return lz.replace(base=base, terms=scale_terms(c if name == "mul" else 1 / c))


_TRANSFORMS: dict[str, Callable] = {
    "convert_element_type": _t_convert,
    "copy": _t_identity,
    "copy_p": _t_identity,
    "sharding_constraint": _t_identity,
    "stop_gradient": _t_stop_gradient,
    "transpose": _t_transpose,
    "squeeze": _t_squeeze,
    "reshape": _t_reshape,
    "broadcast_in_dim": _t_broadcast,
    "slice": _t_slice,
    "dynamic_slice": _t_dynamic_slice,
}


# -- consumers: the low-rank contraction ------------------------------------------------------

def _dropout(x, t: Term, ctx: _Ctx):
  if ctx.key is None:
    return x
  if t.route is not None:  # each example's own adapter's rate
    rates = np.asarray(t.dropout, np.float32)
    if not rates.any():
      return x
    p = jnp.asarray(rates)[_safe_ids(t)].reshape((-1,) + (1,) * (x.ndim - 1))
    keep = jax.random.uniform(ctx.next_key(), x.shape) >= p
    return jnp.where(keep, x / (1.0 - p).astype(x.dtype), jnp.zeros((), x.dtype))
  if t.dropout <= 0.0:
    return x
  keep = jax.random.bernoulli(ctx.next_key(), 1.0 - t.dropout, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - t.dropout, x.dtype), jnp.zeros((), x.dtype))


def _safe_ids(t: Term):
  return jnp.clip(t.route, 0, t.groups - 1)


def _route_factor(f, t: Term):
  """``(..., N * r)`` -> ``(B, ..., r)``: each example's own adapter's columns."""
  g = f.reshape(f.shape[:-1] + (t.groups, f.shape[-1] // t.groups))
  return jnp.moveaxis(jnp.take(g, _safe_ids(t), axis=-2), -2, 0)


def _check_route(x, xl: str, vl: str, lz: Lazy, t: Term) -> None:
  ids = t.route
  if jnp.ndim(x) == 0 or xl[0] in vl or jnp.shape(x)[0] != ids.shape[0]:
    raise RewriteError(
        f"jlora.lora: adapter_ids has {ids.shape[0]} entries, but the activation contracted with "
        f"the stacked adapters at {lz.path!r} has shape {tuple(jnp.shape(x))}: a mixed-adapter batch "
        "routes along the leading (batch) axis of every input to an adapted contraction; pass one "
        "id per row of that axis, or keep the batch axis first in the model")


def _lowrank(x, xl: str, lz: Lazy, t: Term, vl: str, outl: str, ctx: _Ctx, precision) -> jax.Array:
  """``scale * einsum(x, a (x) b)`` as two small contractions through the rank axis.

  A routed term gathers each example's factors first (``(B, ..., r)``, sharing the
  activation's batch letter), so its cost is one adapter's whatever N is.
  """
  used = set(xl) | set(vl) | set(outl)
  r = next(c for c in string.ascii_letters if c not in used)
  la = "".join(vl[i] for i in _axes_of(lz.sides, "a")) + r
  lb = "".join(vl[i] for i in _axes_of(lz.sides, "b")) + r
  fa, fb = t.a, t.b
  if t.route is not None:
    _check_route(x, xl, vl, lz, t)
    fa, fb = _route_factor(fa, t), _route_factor(fb, t)
    la, lb = xl[0] + la, xl[0] + lb
  contracted = (set(xl) & set(vl)) - set(outl)
  first_a = len(contracted & set(la)) >= len(contracted & set(lb))
  (f1, l1), (f2, l2) = ((fa, la), (fb, lb)) if first_a else ((fb, lb), (fa, la))
  cd = _compute_dtype(t, x)
  acc = _acc(cd)
  x = _dropout(x, t, ctx).astype(cd)
  need = set(l2) | set(outl)
  keep = "".join(dict.fromkeys(c for c in xl + l1 if c in need))
  h = jnp.einsum(f"{xl},{l1}->{keep}", x, f1.astype(cd), precision=precision,
                 preferred_element_type=acc).astype(cd)
  d = jnp.einsum(f"{keep},{l2}->{outl}", h, f2.astype(cd), precision=precision,
                 preferred_element_type=acc)
  if t.route is None:
    return _scaled(d, t.scale)
  s = jnp.where(t.route >= 0, jnp.asarray(t.scale, d.dtype)[_safe_ids(t)], jnp.zeros((), d.dtype))
  shape = [1] * d.ndim
  shape[outl.index(xl[0])] = -1
  return d * s.reshape(shape)


def _scaled(d, scale: float):
  return d if scale == 1.0 else d * jnp.asarray(scale, d.dtype)


def _add(base_out, delta):
  acc = _acc(base_out.dtype, delta.dtype)
  return (base_out.astype(acc) + delta.astype(acc)).astype(base_out.dtype)


def _scale_by(y, yl: str, vec, vec_letters: str):
  """``y * vec`` with ``vec``'s axes (named ``vec_letters``) broadcast into ``y``'s (``yl``)."""
  vec = vec[..., 0]
  order = sorted(range(len(vec_letters)), key=lambda k: yl.index(vec_letters[k]))
  if order != list(range(len(order))):
    vec = jnp.transpose(vec, order)
  present = [yl.index(vec_letters[k]) for k in order]
  vec = vec.reshape(tuple(vec.shape[present.index(i)] if i in present else 1 for i in range(len(yl))))
  acc = _acc(y.dtype, vec.dtype)
  return (y.astype(acc) * vec.astype(acc)).astype(y.dtype)


def _c_dot_general(eqn, invals, ctx):
  lhs, rhs = invals
  if _is_lazy(lhs) and _is_lazy(rhs):
    lhs = ctx.give_up(lhs, "a dot_general with two adapted operands (the left one)")
  lz_rhs = _is_lazy(rhs)
  lz, x = (rhs, lhs) if lz_rhs else (lhs, rhs)
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
    return None
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  nl, nr = len(jnp.shape(lhs)), len(jnp.shape(rhs))
  letters = iter(string.ascii_letters)
  L = [next(letters) for _ in range(nl)]
  R = [None] * nr
  for i, j in zip(lc, rc):
    R[j] = L[i]
  for i, j in zip(lb, rb):
    R[j] = L[i]
  R = [c if c is not None else next(letters) for c in R]
  out = "".join([L[i] for i in lb] + [L[i] for i in range(nl) if i not in lc and i not in lb]
                + [R[j] for j in range(nr) if j not in rc and j not in rb])
  xl, vl = ("".join(L), "".join(R)) if lz_rhs else ("".join(R), "".join(L))
  # u scales the base alone, v everything: each goes onto x (its axes are contracted or batch
  # axes) or onto the output (its axes are produced); anything else cannot stay factored.
  where = {}
  for name, vec, f in (("u", lz.u, "a"), ("v", lz.v, "b")):
    if vec is None:
      continue
    vls = "".join(vl[i] for i in _axes_of(lz.sides, f))
    if set(vls) <= set(out):
      where[name] = ("out", vls)
    elif set(vls) <= set(xl):
      where[name] = ("x", vls)
    else:
      return None
  if where.get("v", ("",))[0] == "x":
    x = _scale_by(x, xl, lz.v, where["v"][1])
  xb = _scale_by(x, xl, lz.u, where["u"][1]) if where.get("u", ("",))[0] == "x" else x
  if isinstance(lz.base, _QBase):
    base_out = _bind_q(eqn, [xb, lz.base] if lz_rhs else [lz.base, xb], 1 if lz_rhs else 0)
  else:
    base_out = _bind(eqn, [xb, lz.base] if lz_rhs else [lz.base, xb])
  if where.get("u", ("",))[0] == "out":
    base_out = _scale_by(base_out, out, lz.u, where["u"][1])
  y = base_out
  for t in lz.terms:
    y = _add(y, _lowrank(x, xl, lz, t, vl, out, ctx, eqn.params.get("precision")))
  if where.get("v", ("",))[0] == "out":
    y = _scale_by(y, out, lz.v, where["v"][1])
  if lz.post is not None:
    y = _bottleneck(y, out, lz, vl, ctx)
  return y


def _put(t, tl: str, yl: str):
  """``t`` (axes named ``tl``, each in ``yl``) transposed and reshaped to broadcast against ``yl``."""
  order = sorted(range(len(tl)), key=lambda k: yl.index(tl[k]))
  if order != list(range(len(tl))):
    t = jnp.transpose(t, order)
  have = [tl[k] for k in order]
  return t.reshape(tuple(t.shape[have.index(c)] if c in have else 1 for c in yl))


def _bottleneck(y, yl: str, lz: Lazy, vl: str, ctx: _Ctx) -> jax.Array:
  """``y + s * (up(act(down(y) + bias_down)) + bias_up)`` along the kernel's output axes of ``y``."""
  p = lz.post
  rl = "".join(vl[i] for i in _axes_of(lz.sides, "b"))
  sl = "".join(vl[i] for i in _axes_of(lz.sides, "s"))
  if not set(rl) <= set(yl):
    return ctx.give_up(lz, "a contraction that sums over the weight's stacked axes")
  used = set(yl) | set(vl)
  m = next(c for c in string.ascii_letters if c not in used)
  hl = "".join(c for c in yl if c not in rl or c in sl) + m
  cd = jnp.promote_types(jnp.promote_types(p.down.dtype, p.up.dtype), y.dtype)
  acc = _acc(cd)
  h = jnp.einsum(f"{yl},{rl}{m}->{hl}", y.astype(cd), p.down.astype(cd), preferred_element_type=acc)
  h = ACTIVATIONS[p.act](h + _put(p.bias_down.astype(acc), sl + m, hl)).astype(cd)
  d = jnp.einsum(f"{hl},{rl}{m}->{yl}", h, p.up.astype(cd), preferred_element_type=acc)
  d = d + _put(p.bias_up[..., 0].astype(acc), rl, yl)
  return _add(y, _scaled(d, p.scale))


def _c_conv(eqn, invals, ctx):
  lhs, rhs = invals
  p = eqn.params
  if _is_lazy(lhs) or is_routed(rhs) or rhs.post is not None or p["feature_group_count"] != 1 \
      or p["batch_group_count"] != 1:
    return None
  if rhs.u is not None or rhs.v is not None:
    return None
  dn = p["dimension_numbers"]
  out_dim = dn.rhs_spec[0]
  if any((s != "R") if i == out_dim else (s != "L") for i, s in enumerate(rhs.sides)):
    return None
  y = _bind_q(eqn, [lhs, rhs.base], 1) if isinstance(rhs.base, _QBase) else _bind(eqn, [lhs, rhs.base])
  f = dn.out_spec[1]
  for term in rhs.terms:
    cd = _compute_dtype(term, lhs)
    acc = _acc(cd)
    a_kernel = jnp.moveaxis(term.a, -1, out_dim).astype(cd)
    x = _dropout(lhs, term, ctx).astype(cd)
    t = _bind(eqn, [x, a_kernel], {**p, "preferred_element_type": jnp.dtype(acc)}).astype(cd)
    d = jnp.moveaxis(jnp.tensordot(t, term.b.astype(cd), axes=[[f], [1]],
                                   precision=p.get("precision"),
                                   preferred_element_type=acc), -1, f)
    y = _add(y, _scaled(d, term.scale))
  return y


def _c_gather(eqn, invals, ctx):
  op, idx = invals
  if not _is_lazy(op) or _is_lazy(idx) or is_routed(op) or op.post is not None:
    return None
  p = eqn.params
  dn = p["dimension_numbers"]
  if isinstance(op.base, _QBase):
    rows = _q_row_lookup(op, idx, p)
    if rows is not None:
      return rows
  if dn.operand_batching_dims or dn.start_indices_batching_dims:
    return None
  sizes = tuple(p["slice_sizes"])
  indexed = set(dn.start_index_map)
  collapsed = set(dn.collapsed_slice_dims)
  nbatch = idx.ndim - 1
  plan = {}
  for f in ("a", "b"):
    ax = set(_axes_of(op.sides, f))
    if indexed <= ax:
      plan[f] = "gather"
    elif not indexed & ax:
      plan[f] = "slice"
    else:
      return None  # the index couples both factors
  gathered = [f for f in ("a", "b") if plan[f] == "gather"]
  batch_side = "S" if len(gathered) == 2 else ("L" if gathered == ["a"] else "R")
  base_out = _bind(eqn, [_real(op.base), idx])

  out_ndim = nbatch + sum(1 for d in range(op.ndim) if d not in collapsed)
  offset_dims = tuple(dn.offset_dims)
  out_ids: list[Any] = [None] * out_ndim
  kept = [d for d in range(op.ndim) if d not in collapsed]
  for pos, d in zip(offset_dims, kept):
    out_ids[pos] = ("o", d)
  bpos = [j for j in range(out_ndim) if out_ids[j] is None]
  for k, j in enumerate(bpos):
    out_ids[j] = ("b", k)
  sides = tuple(op.sides[i[1]] if i[0] == "o" else batch_side for i in out_ids)

  def per(f):
    ax = _axes_of(op.sides, f)
    pos = {d: k for k, d in enumerate(ax)}
    f_kept = [d for d in ax if d not in collapsed]

    def go(x):
      rank = x.shape[-1]
      if plan[f] == "gather":
        g_dn = lax.GatherDimensionNumbers(
            offset_dims=tuple(range(nbatch, nbatch + len(f_kept) + 1)),
            collapsed_slice_dims=tuple(sorted(pos[d] for d in collapsed if d in pos)),
            start_index_map=tuple(pos[d] for d in dn.start_index_map))
        x = lax.gather(x, idx, g_dn, tuple(sizes[d] for d in ax) + (rank,),
                       indices_are_sorted=p["indices_are_sorted"],
                       unique_indices=p["unique_indices"], mode=p["mode"],
                       fill_value=p.get("fill_value"))
        cur = [("b", k) for k in range(nbatch)] + [("o", d) for d in f_kept] + ["r"]
      else:
        x = lax.slice(x, [0] * x.ndim, [sizes[d] for d in ax] + [rank])
        sq = [pos[d] for d in ax if d in collapsed]
        if sq:
          x = lax.squeeze(x, sq)
        cur = [("o", d) for d in f_kept] + ["r"]
      want = [out_ids[j] for j in _axes_of(sides, f)] + ["r"]
      perm = [cur.index(w) for w in want]
      return x if perm == list(range(len(perm))) else lax.transpose(x, perm)
    return go

  out = op.map_sides(per, base=base_out, sides=sides)
  if nbatch and batch_side != "S":
    return _materialise(out)  # an embedding lookup: rows of W + rows of A, times B
  return out


def _q_row_lookup(op: Lazy, idx, p):
  """An embedding lookup in a quantised table: only the looked-up rows are dequantised."""
  qb, dn = op.base, p["dimension_numbers"]
  if op.terms or op.u is not None or op.v is not None or not qb.elementwise():
    return None
  if qb.q.axes != Axes((), (1,), (0,)) or len(qb.shape) != 2 or dn.operand_batching_dims:
    return None
  n_rows, n_in = qb.shape
  if (tuple(dn.start_index_map), tuple(dn.collapsed_slice_dims)) != ((0,), (0,)) \
      or tuple(p["slice_sizes"]) != (1, n_in) or tuple(dn.offset_dims) != (idx.ndim - 1,) \
      or idx.shape[-1] != 1:
    return None
  i = idx[..., 0]
  safe = jnp.clip(i, 0, n_rows - 1)
  rows = qb.q.take_rows(safe)
  for e, rest in qb.ops:  # elementwise: casts, stop_gradient
    rows = _bind(e, [rows, *rest])
  if p["mode"] == lax.GatherScatterMode.FILL_OR_DROP:
    fill = p.get("fill_value")
    fill = jnp.nan if fill is None and jnp.issubdtype(rows.dtype, jnp.inexact) else (fill or 0)
    ok = ((i >= 0) & (i < n_rows))[..., None]
    rows = jnp.where(ok, rows, jnp.asarray(fill, rows.dtype))
  return rows


_ARITH: dict[str, Callable] = {name: _arith for name in ("mul", "div", "neg", "add", "sub")}

_CONSUMERS: dict[str, Callable] = {
    "dot_general": _c_dot_general,
    "conv_general_dilated": _c_conv,
    "gather": _c_gather,
}


# -- control flow and calls -------------------------------------------------------------------

def _open(j):
  """``(jaxpr, consts)`` of a ClosedJaxpr or an open Jaxpr."""
  if hasattr(j, "jaxpr") and hasattr(j, "consts"):
    return j.jaxpr, j.consts
  return j, ()


def _concrete_outs(outs, ctx: _Ctx, where: str):
  return [ctx.give_up(o, f"returning it from {where}") if _is_lazy(o) else o for o in outs]


def _r_inline(param: str):
  def rule(eqn, invals, ctx):
    if ctx.unroll and not any(_is_lazy(x) for x in invals) and eqn.primitive.name != "jit" \
        and eqn.primitive.name != "pjit":
      return _bind(eqn, invals)  # keep custom derivative rules when nothing is adapted
    if eqn.primitive.name.startswith("custom") and any(_is_lazy(x) for x in invals):
      logger.debug("jlora.lora: an adapted weight flows into %s %r; its body is rewritten and "
                   "differentiated by JAX instead of its custom rule", eqn.primitive.name,
                   eqn.params.get("name", ""))
    jaxpr, consts = _open(eqn.params[param])
    return _eval(jaxpr, consts, invals, ctx)
  return rule


def _r_remat(eqn, invals, ctx):
  p = eqn.params
  jaxpr, consts = _open(p["jaxpr"])
  with_key = ctx.key is not None

  def body(vals, key):
    sub = ctx.child(key)
    return _concrete_outs(_eval(jaxpr, consts, vals, sub), sub, "a remat (checkpoint) body")

  fn = jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))
  return fn(list(invals), ctx.next_key() if with_key else None)


def _r_scan(eqn, invals, ctx):
  p = eqn.params
  jaxpr, jconsts = _open(p["jaxpr"])
  nc, ncarry, length = p["num_consts"], p["num_carry"], p["length"]
  consts, init, xs = invals[:nc], list(invals[nc:nc + ncarry]), invals[nc + ncarry:]
  # carries the body passes through unchanged (a weight in a fori_loop carry) act as consts
  invariant = [jaxpr.outvars[k] is jaxpr.invars[nc + k] for k in range(ncarry)]
  for k in range(ncarry):
    if _is_lazy(init[k]) and not invariant[k]:
      init[k] = ctx.give_up(init[k], "a scan carry that the loop changes")
  hoisted = {k: init[k] for k in range(ncarry) if invariant[k] and _is_lazy(init[k])}
  moving = [k for k in range(ncarry) if k not in hoisted]

  # lazy xs: slice the base and whichever factors carry the scanned axis
  xs_in, rebuild = [], []
  for x in xs:
    if _is_lazy(x):
      s0 = x.sides[0]
      b = x.base
      if isinstance(b, _QBase) and b.elementwise() and b.q.axes.stack[:1] == (0,):
        parts = {"q": list(jax.tree_util.tree_flatten(b.q)[0])}  # sliced codes: one layer per step
      else:
        parts = {"base": _real(b)}
      if s0 != "R":
        parts["a"] = x.lefts()
      if s0 != "L":
        parts["b"] = x.rights()
      if s0 == "S" and x.stacks():
        parts["s"] = x.stacks()
      xs_in.append(parts)
      rebuild.append((x, s0))
    else:
      xs_in.append(x)
      rebuild.append(None)
  keys = None
  if ctx.key is not None:
    keys = jax.random.split(ctx.next_key(), length)

  def body(carry, scanned):
    xs_vals, key = scanned
    vals = list(consts)
    it = iter(carry)
    for k in range(ncarry):
      vals.append(hoisted[k] if k in hoisted else next(it))
    for x, rb in zip(xs_vals, rebuild):
      if rb is None:
        vals.append(x)
      else:
        lz, s0 = rb
        if "q" in x:
          q_tdef = jax.tree_util.tree_structure(lz.base.q)
          base = lz.base.unstacked(jax.tree_util.tree_unflatten(q_tdef, x["q"]))
        else:
          base = x["base"]
        vals.append(lz.with_sides(x.get("a", lz.lefts()), x.get("b", lz.rights()),
                                  x.get("s", lz.stacks()), base=base, sides=lz.sides[1:]))
    sub = ctx.child(key)
    outs = _eval(jaxpr, jconsts, vals, sub)
    outs = _concrete_outs(outs, sub, "a scan body")
    new_carry = [outs[k] for k in moving]
    return new_carry, outs[ncarry:]

  unroll = True if ctx.unroll else p.get("unroll", 1)
  carry, ys = lax.scan(body, [init[k] for k in moving], (xs_in, keys), length=length,
                       reverse=p.get("reverse", False), unroll=unroll,
                       _split_transpose=p.get("_split_transpose", False))
  out_carry, it = [], iter(carry)
  for k in range(ncarry):
    out_carry.append(hoisted[k] if k in hoisted else next(it))
  return out_carry + list(ys)


def _r_while(eqn, invals, ctx):
  p = eqn.params
  cj, cconsts_j = _open(p["cond_jaxpr"])
  bj, bconsts_j = _open(p["body_jaxpr"])
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], list(invals[cn + bn:])
  n = len(init)
  invariant = [bj.outvars[k] is bj.invars[bn + k] for k in range(n)]
  for k in range(n):
    if _is_lazy(init[k]) and not invariant[k]:
      init[k] = ctx.give_up(init[k], "a while-loop carry that the loop changes")
  hoisted = {k: init[k] for k in range(n) if invariant[k] and _is_lazy(init[k])}
  moving = [k for k in range(n) if k not in hoisted]

  def full(carry):
    vals, it = [], iter(carry)
    for k in range(n):
      vals.append(hoisted[k] if k in hoisted else next(it))
    return vals

  def cond_fun(state):
    carry, _ = state
    sub = ctx.child(None)
    (out,) = _concrete_outs(_eval(cj, cconsts_j, list(cconsts) + full(carry), sub), sub,
                            "a while-loop condition")
    return out

  def body_fun(state):
    carry, key = state
    sub_key = None
    if key is not None:
      key, sub_key = jax.random.split(key)
    sub = ctx.child(sub_key)
    outs = _concrete_outs(_eval(bj, bconsts_j, list(bconsts) + full(carry), sub), sub,
                          "a while-loop body")
    return [outs[k] for k in moving], key

  key = ctx.next_key() if ctx.key is not None else None
  carry, _ = lax.while_loop(cond_fun, body_fun, ([init[k] for k in moving], key))
  return full(carry)


def _r_cond(eqn, invals, ctx):
  branches = eqn.params["branches"]
  index, ops = invals[0], list(invals[1:])
  key = ctx.next_key() if ctx.key is not None else None

  def make(br):
    jaxpr, consts = _open(br)

    def run(ops, key):
      sub = ctx.child(key)
      return _concrete_outs(_eval(jaxpr, consts, ops, sub), sub, "a cond branch")
    return run

  return lax.switch(index, [make(b) for b in branches], ops, key)


_CONTROL: dict[str, Callable] = {
    "jit": _r_inline("jaxpr"),
    "pjit": _r_inline("jaxpr"),
    "closed_call": _r_inline("call_jaxpr"),
    "core_call": _r_inline("call_jaxpr"),
    "custom_jvp_call": _r_inline("call_jaxpr"),
    "custom_vjp_call": _r_inline("call_jaxpr"),
    "custom_vjp_call_jaxpr": _r_inline("fun_jaxpr"),
    "remat2": _r_remat,
    "checkpoint": _r_remat,
    "scan": _r_scan,
    "while": _r_while,
    "cond": _r_cond,
}


# -- diagnostics --------------------------------------------------------------------------------

_HLO_DOT = re.compile(r"=\s*\w+\[([0-9,]*)\](?:\{[^}]*\})?\s+(dot|convolution)\(")


def full_size_dots(hlo_text: str, kernel_shapes: Sequence[Sequence[int]]) -> list[str]:
  """The dot / convolution instructions of an HLO text whose result has a kernel's full shape.

  ``kernel_shapes`` are per-layer ``(in, out)`` shapes; transposes and a
  leading layer axis count too. In a compiled LoRA step none should appear: a
  materialised ``A @ B`` and a weight gradient ``x^T @ dy`` would both be one.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> f = lambda x, a, b: x @ (a @ b)
    >>> text = jax.jit(f).lower(jnp.ones((2, 8)), jnp.ones((8, 2)), jnp.ones((2, 4))).compile().as_text()
    >>> len(full_size_dots(text, [(8, 4)])) >= 1
    True
  """
  bad = set()
  for shape in kernel_shapes:
    bad.add(tuple(shape))
    bad.add(tuple(shape)[::-1])
  hits = []
  for line in hlo_text.splitlines():
    m = _HLO_DOT.search(line)
    if not m:
      continue
    dims = tuple(int(d) for d in m.group(1).split(",") if d)
    if (dims[-2:] in bad and all(d == 1 for d in dims[:-2])) or (len(dims) == 3 and dims[1:] in bad):
      hits.append(line.strip()[:200])
  return hits
