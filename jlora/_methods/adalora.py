"""AdaLoRA: ``W + s * A diag(E) B`` with a rank budget moved, during training, to where it matters.

AdaLoRA (Zhang et al., ICLR 2023) writes each update in an SVD-like form
``P diag(E) Q`` (jlora: ``a`` ``(in, r)``, ``e`` ``(r,)``, ``b`` ``(r, out)``),
keeps ``P`` and ``Q`` near-orthogonal with a regulariser, and prunes singular
values ``E`` by an importance score so that the total rank falls from
``init_r`` per module to ``target_r`` per module on average, spread unevenly
across modules. The parameterisation, initialisation and schedule are PEFT's
(``AdaLoraConfig`` / ``RankAllocator``, PEFT 0.21):

* forward: ``y = x @ W + (x @ (a * e)) @ b * alpha / (init_r + 1e-5)``
  (PEFT's ``scaling / ranknum``; ``ranknum`` stays ``init_r`` after pruning);
* init: ``e = 0``, ``a`` and ``b`` ``N(0, 0.02)``, so wrapping changes nothing;
* regulariser: ``orth_reg_weight * mean(||a^T a - I||_F, ||b b^T - I||_F)``
  over every adapted module;
* importance of an entry: ``|p * g|`` smoothed, ``I = EMA_beta1(|p g|)``,
  uncertainty ``U = EMA_beta2(|(|p g|) - I|)``, score ``I * U``; a rank's
  score is ``e``'s plus the mean of its ``a`` column and of its ``b`` row;
* budget: ``init_r`` per module up to step ``tinit``, then a cubic decrease to
  ``target_r`` per module at step ``total_step - tfinal`` (masking every
  ``deltaT`` steps), then the final pattern is fixed for the last ``tfinal``
  steps. The lowest-scoring ranks model-wide get ``e = 0``.

The allocator is :func:`rank_allocator`, an optax transform around any
optimizer: it adds the regulariser's gradient, runs the inner optimizer, then
updates the scores and masks ``e`` -- a pure function of the training state
(its state is part of ``opt_state``, so it is checkpointed with it), which
:func:`jlora.train_step.make_train_step` and ``jlora train`` run unchanged.
After training, :func:`apply_rank_pattern` writes the final pattern into the
leaves' specs (PEFT's ``rank_pattern``); masked ranks then stay masked in the
forward pass, in checkpoints and in PEFT files.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora._adapter import Adapter, AdapterSpec, factor_layouts, factor_shapes, group_shapes
from jlora._adapter import infer_axes, lowrank_delta, register
from jlora._errors import SpecError, TreeError
from jlora._lazy import Term, from_kernel
from jlora._methods.lora import LoraWeight, adapter_dtype, check_float, is_array, leaf_key

__all__ = ["AdaLoRA", "AdaLoraWeight", "RankAllocatorState", "rank_allocator", "apply_rank_pattern",
           "orthogonal_penalty", "budget_schedule"]

_EPS = 1e-5  # PEFT's ranknum + 1e-5
_SCHEDULE = ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


@dataclasses.dataclass(frozen=True)
class AdaLoRA(AdapterSpec):
  """The spec of an AdaLoRA adapter (PEFT's ``AdaLoraConfig``; its defaults).

  Attributes:
    init_r: the rank every module starts with (PEFT's 12).
    target_r: the average rank per module at the end (PEFT's 8); <= ``init_r``.
    alpha: the scaling numerator; the update is scaled by
      ``alpha / (init_r + 1e-5)``. Default ``init_r`` (scale ~1, as
      :class:`jlora.LoRA`'s default; PEFT's ``lora_alpha`` defaults to 8).
    dropout: dropout on the adapter's input (``lora_dropout``).
    tinit: steps of warm-up at the full budget.
    tfinal: steps at the end with the final pattern fixed.
    deltaT: steps between two re-allocations while the budget falls.
    beta1, beta2: the EMA factors of importance and uncertainty, in (0, 1).
    orth_reg_weight: the orthogonal regulariser's weight (>= 0).
    total_step: the number of optimizer steps of the run (needed by the
      allocator; ``None`` for an adapter only used for inference).
    rank_pattern: which of the ``init_r`` ranks are kept, once allocated: a
      tuple over the stacked layers (one entry for an unstacked kernel) of
      tuples of bools. Set by :func:`jlora.apply_rank_pattern` and by
      :func:`jlora.load_peft`; masked ranks contribute nothing.
    dtype, stack_axes, in_axes, out_axes: as :class:`jlora.LoRA`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.ones((6, 4))}, {"k": jlora.AdaLoRA(4, 2, total_step=100)},
    ...                   key=jax.random.key(0))
    >>> leaf = tree["k"]
    >>> leaf.a.shape, leaf.e.shape, leaf.b.shape, bool((jlora.merge(tree)["k"] == 1).all())
    ((6, 4), (4,), (4, 4), True)
  """

  init_r: int = 12
  target_r: int = 8
  alpha: float | None = None
  dropout: float = 0.0
  tinit: int = 0
  tfinal: int = 0
  deltaT: int = 1  # noqa: N815 - PEFT's name
  beta1: float = 0.85
  beta2: float = 0.85
  orth_reg_weight: float = 0.5
  total_step: int | None = None
  rank_pattern: tuple | None = None
  dtype: Any = None
  stack_axes: int | None = None
  in_axes: tuple[int, ...] | None = None
  out_axes: tuple[int, ...] | None = None

  def __post_init__(self):
    def posint(name, lo=1):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise SpecError(f"AdaLoRA {name} must be an integer >= {lo}, got {v!r}")
      object.__setattr__(self, name, int(v))

    posint("init_r")
    posint("target_r")
    posint("tinit", 0)
    posint("tfinal", 0)
    posint("deltaT")
    if self.target_r > self.init_r:
      raise SpecError(f"AdaLoRA target_r={self.target_r} exceeds init_r={self.init_r}: the budget only "
                      f"shrinks; use target_r <= init_r (e.g. AdaLoRA(init_r={self.target_r + 4}, "
                      f"target_r={self.target_r}))")
    if self.alpha is not None:
      if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.number)) or not (
          self.alpha > 0 and math.isfinite(self.alpha)):
        raise SpecError(f"AdaLoRA alpha must be a positive finite number, got {self.alpha!r}")
      object.__setattr__(self, "alpha", None if float(self.alpha) == self.init_r else float(self.alpha))
    if not 0.0 <= float(self.dropout) < 1.0:
      raise SpecError(f"AdaLoRA dropout must be in [0, 1), got {self.dropout!r}")
    object.__setattr__(self, "dropout", float(self.dropout))
    for name in ("beta1", "beta2"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
        raise SpecError(f"AdaLoRA {name} must be in (0, 1), got {v!r}")
      object.__setattr__(self, name, float(v))
    w = self.orth_reg_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w >= 0 and math.isfinite(w)):
      raise SpecError(f"AdaLoRA orth_reg_weight must be >= 0, got {w!r}")
    object.__setattr__(self, "orth_reg_weight", float(w))
    if self.total_step is not None:
      posint("total_step")
      if self.tinit >= self.total_step - self.tfinal:
        raise SpecError(
            f"AdaLoRA tinit={self.tinit}, tfinal={self.tfinal} leave no budgeting phase in "
            f"total_step={self.total_step} steps (tinit < total_step - tfinal is needed); lower "
            "tinit / tfinal or raise total_step")
    if self.rank_pattern is not None:
      pat = tuple(tuple(bool(b) for b in row) for row in self.rank_pattern)
      if not pat or any(len(row) != self.init_r for row in pat):
        raise SpecError(f"AdaLoRA rank_pattern must hold one row of init_r={self.init_r} bools per "
                        f"stacked layer, got {self.rank_pattern!r}")
      object.__setattr__(self, "rank_pattern", pat)
    if self.dtype is not None:
      object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
    for name in ("in_axes", "out_axes"):
      v = getattr(self, name)
      if v is not None:
        object.__setattr__(self, name, (v,) if isinstance(v, int) else tuple(int(x) for x in v))

  @property
  def effective_alpha(self) -> float:
    return float(self.init_r) if self.alpha is None else self.alpha

  @property
  def scale(self) -> float:
    """PEFT's ``scaling / (ranknum + 1e-5)`` with ``ranknum = init_r``."""
    return self.effective_alpha / (self.init_r + _EPS)

  def adapt(self, path: str, leaf: Any, key: jax.Array) -> Any:
    if not is_array(leaf) or leaf.ndim < 2:
      return leaf
    check_float(path, leaf, "AdaLoRA")
    shape = tuple(leaf.shape)
    axes = infer_axes(path, shape, self)
    stack, ins, outs = group_shapes(shape, axes)
    if self.init_r > min(math.prod(ins), math.prod(outs)):
      raise SpecError(f"AdaLoRA init_r {self.init_r} at {path!r} exceeds min(in, out) of its kernel "
                      f"{shape}; use init_r <= {min(math.prod(ins), math.prod(outs))}")
    if self.rank_pattern is not None and len(self.rank_pattern) != max(math.prod(stack), 1):
      raise SpecError(f"AdaLoRA rank_pattern at {path!r} has {len(self.rank_pattern)} rows but the "
                      f"kernel has {math.prod(stack)} stacked layers")
    dtype = adapter_dtype(self, leaf.dtype)
    a_shape, b_shape = factor_shapes(shape, axes, self.init_r)
    ka, kb = jax.random.split(leaf_key(key, path))
    a = 0.02 * jax.random.normal(ka, a_shape, jnp.float32)
    b = 0.02 * jax.random.normal(kb, b_shape, jnp.float32)
    e = jnp.zeros(stack + (self.init_r,), dtype)
    return AdaLoraWeight(leaf, a.astype(dtype), b.astype(dtype), e, spec=self, axes=axes)


@register
class AdaLoraWeight(Adapter):
  """A frozen base ``w`` and trainable ``a`` (``stack + in + (r,)``), ``e`` (``stack + (r,)``), ``b``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> leaf = jlora.wrap({"k": jnp.ones((6, 4))}, {"k": jlora.AdaLoRA(2, 1, total_step=9)},
    ...                   key=jax.random.key(0))["k"]
    >>> leaf.trainable, leaf.rank
    (('a', 'b', 'e'), 2)
  """

  kind = "adalora"
  spec_type = AdaLoRA
  frozen = ("w",)
  trainable = ("a", "b", "e")

  def __init__(self, w=None, a=None, b=None, e=None, *, spec: AdaLoRA, axes, shape=None):
    super().__init__(w=w, a=a, b=b, e=e, spec=spec, axes=axes, shape=shape)

  @property
  def scale(self) -> float:
    return self.spec.scale

  @property
  def rank(self) -> int:
    return self.spec.init_r

  def kept(self) -> jax.Array | None:
    """The spec's rank pattern as a ``stack + (r,)`` float mask, or None."""
    if self.spec.rank_pattern is None:
      return None
    stack = tuple(self.shape[i] for i in self.axes.stack)
    return jnp.asarray(np.asarray(self.spec.rank_pattern, np.float32).reshape(stack + (self.rank,)))

  def scaled_a(self) -> jax.Array:
    """``a * e`` (``e`` masked by the rank pattern), broadcast over ``a``'s input axes."""
    self.require("the AdaLoRA factors", "a", "e")
    e = self.e
    kept = self.kept()
    if kept is not None:
      e = e * kept.astype(e.dtype)
    n_in = len(self.axes.inputs)
    e = e.reshape(e.shape[:-1] + (1,) * n_in + e.shape[-1:])
    return self.a * e.astype(self.a.dtype)

  def delta(self) -> jax.Array:
    self.require("delta", "a", "b", "e")
    return lowrank_delta(self.scaled_a(), self.b, self.axes, self.scale, self.shape)

  def layouts(self):
    la, lb = factor_layouts(self.axes)
    return {"a": la, "b": lb, "e": self.axes.stack + (None,)}

  # W + delta() and its inverse, exactly as LoRA's (they read only w and delta())
  merged = LoraWeight.merged
  unmerged = LoraWeight.unmerged

  def lazy(self, path):
    return from_kernel(self.w, self.axes, [Term(self.scaled_a(), self.b, self.scale, self.spec.dropout)],
                       path=path)


# -- the regulariser and the allocator -------------------------------------------------------------


def _is_ada(x) -> bool:
  return isinstance(x, AdaLoraWeight)


def _ada_leaves(tree) -> list[AdaLoraWeight]:
  return [x for x in jax.tree.leaves(tree, is_leaf=_is_ada) if _is_ada(x)]


def _mats(leaf: AdaLoraWeight):
  """``a`` as ``(M, n_in, r)`` and ``b`` as ``(M, r, n_out)`` over the M stacked modules."""
  r = leaf.rank
  return leaf.a.reshape((-1,) + (math.prod(leaf.a.shape[len(leaf.axes.stack):-1]), r)), \
      leaf.b.reshape((-1, r, math.prod(leaf.b.shape[len(leaf.axes.stack) + 1:])))


def _fro(x):
  ss = jnp.sum(x * x, axis=(-2, -1))
  safe = jnp.where(ss > 0, ss, 1.0)
  return jnp.where(ss > 0, jnp.sqrt(safe), 0.0)


def orthogonal_penalty(tree: Any) -> jax.Array:
  """PEFT's AdaLoRA regulariser: the mean over modules of ``||a^T a - I||_F`` and ``||b b^T - I||_F``.

  Unweighted (multiply by ``orth_reg_weight``); every stacked layer counts as
  a module. :func:`rank_allocator` adds its gradient itself; call this to
  report it or to add it to a loss by hand.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.ones((6, 4))}, {"k": jlora.AdaLoRA(2, 1)}, key=jax.random.key(0))
    >>> round(float(jlora.orthogonal_penalty(tree)), 2)  # a, b ~ N(0, 0.02): ~ ||-I|| = sqrt(2)
    1.41
  """
  leaves = _ada_leaves(tree)
  if not leaves:
    raise TreeError("orthogonal_penalty: the tree has no AdaLoRA leaves (wrap with jlora.AdaLoRA)")
  return _penalty([(x.a, x.b) for x in leaves], leaves)


def _penalty(factors, leaves) -> jax.Array:
  total, count = jnp.zeros((), jnp.float32), 0
  for (fa, fb), leaf in zip(factors, leaves):
    a, b = _mats(leaf.replace(a=fa, b=fb))
    eye = jnp.eye(leaf.rank, dtype=jnp.float32)
    ga = jnp.einsum("mir,miq->mrq", a.astype(jnp.float32), a.astype(jnp.float32))
    gb = jnp.einsum("mro,mqo->mrq", b.astype(jnp.float32), b.astype(jnp.float32))
    total = total + jnp.sum(_fro(ga - eye)) + jnp.sum(_fro(gb - eye))
    count += 2 * a.shape[0]
  return total / count


def budget_schedule(spec: AdaLoRA, init_bgt: int, target_bgt: int) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's ``RankAllocator.budget_schedule`` for steps ``0 .. total_step``: ``(budget, mask_now)``.

  Up to ``tinit`` the whole budget and no masking; after ``total_step -
  tfinal`` the target; in between ``int((init - target) * (1 - (t - tinit) /
  (T - tfinal - tinit)) ** 3 + target)``, masking when ``t % deltaT == 0``.

  Example:
    >>> import jlora
    >>> b, m = jlora.budget_schedule(jlora.AdaLoRA(4, 2, total_step=5), 8, 4)
    >>> b.tolist(), m.tolist()
    ([8, 6, 4, 4, 4, 4], [False, True, True, True, True, True])
  """
  if spec.total_step is None:
    raise SpecError("AdaLoRA needs total_step (the run's optimizer steps) for its budget schedule: "
                    "jlora.AdaLoRA(init_r, target_r, total_step=N)")
  t_tot, ti, tf = spec.total_step, spec.tinit, spec.tfinal
  budget = np.zeros(t_tot + 1, np.int64)
  mask = np.zeros(t_tot + 1, bool)
  for t in range(t_tot + 1):
    if t <= ti:
      budget[t], mask[t] = init_bgt, False
    elif t > t_tot - tf:
      budget[t], mask[t] = target_bgt, True
    else:
      mul = 1 - (t - ti) / (t_tot - tf - ti)
      budget[t] = int((init_bgt - target_bgt) * (mul ** 3) + target_bgt)
      mask[t] = t % spec.deltaT == 0
  return budget, mask


class RankAllocatorState(NamedTuple):
  """:func:`rank_allocator`'s state: the step, the EMAs, the last pattern, the inner state.

  ``ipt`` / ``unc`` hold ``(a, b, e)``-shaped EMAs per AdaLoRA leaf (in tree
  order); ``pattern`` a ``stack + (r,)`` bool mask per leaf; ``allocated`` is
  true once a mask was computed (before that, no pattern is final).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> tree = jlora.wrap({"k": jnp.ones((6, 4))}, {"k": jlora.AdaLoRA(3, 1, total_step=4)},
    ...                   key=jax.random.key(0))
    >>> state = jlora.rank_allocator(optax.sgd(0.1)).init(jlora.split(tree)[0])
    >>> int(state.count), state.pattern[0].tolist(), bool(state.allocated)
    (0, [True, True, True], False)
  """

  count: jax.Array
  ipt: tuple
  unc: tuple
  pattern: tuple
  allocated: jax.Array
  inner: Any


def _schedule_spec(leaves: list[AdaLoraWeight]) -> AdaLoRA:
  specs = {tuple(getattr(x.spec, f) for f in _SCHEDULE) for x in leaves}
  if len(specs) > 1:
    raise SpecError(f"the AdaLoRA leaves disagree on their schedule ({', '.join(_SCHEDULE)}); one "
                    "allocator runs one budget, as PEFT's one AdaLoraConfig: wrap every AdaLoRA leaf "
                    "with the same spec fields")
  spec = leaves[0].spec
  if spec.total_step is None:
    raise SpecError("jlora.rank_allocator needs the run's length: wrap with "
                    "jlora.AdaLoRA(init_r, target_r, total_step=N) (N optimizer steps)")
  return spec


def _modules(leaf: AdaLoraWeight) -> int:
  return max(math.prod(leaf.shape[i] for i in leaf.axes.stack), 1)


def rank_allocator(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps ``tx`` with AdaLoRA's regulariser and rank allocation (PEFT's ``update_and_allocate``).

  Each update (step ``t`` = the number of earlier updates, PEFT's ``global_step``):

  1. adds ``orth_reg_weight *`` the gradient of :func:`orthogonal_penalty` to
     the AdaLoRA leaves' gradients ``g`` (PEFT adds the term to the loss);
  2. runs ``tx`` and applies its update, giving the new parameters ``p``;
  3. for ``t < total_step - tfinal``: updates the importance EMAs from
     ``|p * g|`` and, on the schedule's masking steps, zeroes the lowest-scoring
     entries of ``e`` model-wide down to the step's budget; at ``t = total_step
     - tfinal`` masks to the target budget and fixes that pattern; after it,
     re-applies the fixed pattern every step.

  Parameters other than AdaLoRA leaves pass through ``tx`` untouched.

  Args:
    tx: any optax transform (e.g. ``optax.adamw(1e-3)``).

  Returns:
    An optax transform; its ``update`` needs ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> tree = jlora.wrap({"k": jnp.ones((6, 4))}, {"k": jlora.AdaLoRA(3, 1, total_step=4)},
    ...                   key=jax.random.key(0))
    >>> train, frozen = jlora.split(tree)
    >>> tx = jlora.rank_allocator(optax.adam(0.1))
    >>> state = tx.init(train)
    >>> loss = lambda t: jnp.sum(jlora.merge(jlora.combine(t, frozen))["k"] ** 2)
    >>> for _ in range(4):
    ...   updates, state = tx.update(jax.grad(loss)(train), state, train)
    ...   train = optax.apply_updates(train, updates)
    >>> int((train["k"].e != 0).sum()), int(state.pattern[0].sum())  # 3 ranks -> 1
    (1, 1)
  """

  def init(params):
    leaves = _ada_leaves(params)
    if not leaves:
      raise TreeError("jlora.rank_allocator: the params have no AdaLoRA leaves (wrap with "
                      "jlora.AdaLoRA); use the optimizer alone")
    _schedule_spec(leaves)
    for x in leaves:
      x.require("jlora.rank_allocator", "a", "b", "e")
    zeros = tuple(tuple(jnp.zeros(getattr(x, n).shape, jnp.float32) for n in ("a", "b", "e"))
                  for x in leaves)
    pattern = tuple(jnp.ones(x.e.shape, bool) for x in leaves)
    return RankAllocatorState(jnp.zeros((), jnp.int32), zeros, zeros, pattern,
                              jnp.zeros((), bool), tx.init(params))

  def update(grads, state, params=None):
    if params is None:
      raise TreeError("jlora.rank_allocator needs params in update(grads, state, params)")
    leaves = _ada_leaves(params)
    spec = _schedule_spec(leaves)
    init_bgt = sum(_modules(x) * x.rank for x in leaves)
    target_bgt = sum(_modules(x) * spec.target_r for x in leaves)
    budgets, mask_now = budget_schedule(spec, init_bgt, target_bgt)
    t_fix = spec.total_step - spec.tfinal
    t = state.count

    if spec.orth_reg_weight:  # d/d(a, b) of orth_reg_weight * the penalty (only a and b)
      pen = iter(jax.grad(_penalty)([(x.a, x.b) for x in leaves], leaves))
      w = spec.orth_reg_weight

      def add(g):
        if not _is_ada(g):
          return g
        pa, pb = next(pen)
        return g.replace(a=g.a + w * pa.astype(g.a.dtype), b=g.b + w * pb.astype(g.b.dtype))
      grads = jax.tree.map(add, grads, is_leaf=_is_ada)

    updates, inner = tx.update(grads, state.inner, params)
    new = optax.apply_updates(params, updates)
    new_leaves, g_leaves = _ada_leaves(new), _ada_leaves(grads)

    learning = t < t_fix
    ipt, unc = [], []  # the EMAs the scores read: updated while the budget is being learned
    for x, g, (i0, u0) in zip(new_leaves, g_leaves, zip(state.ipt, state.unc)):
      ii, uu = [], []
      for n, io, uo in zip(("a", "b", "e"), i0, u0):
        now = jnp.abs(getattr(x, n).astype(jnp.float32) * getattr(g, n).astype(jnp.float32))
        i1 = spec.beta1 * io + (1 - spec.beta1) * now
        u1 = spec.beta2 * uo + (1 - spec.beta2) * jnp.abs(now - i1)
        ii.append(jnp.where(learning, i1, io))
        uu.append(jnp.where(learning, u1, uo))
      ipt.append(tuple(ii))
      unc.append(tuple(uu))

    # the scores PEFT's mask_to_budget reads (after this step's EMA update)
    scores = []
    for x, (ia, ib, ie), (ua, ub, ue) in zip(new_leaves, ipt, unc):
      ns = len(x.axes.stack)
      sa, sb, se = ia * ua, ib * ub, ie * ue
      a_axes = tuple(range(ns, sa.ndim - 1))
      b_axes = tuple(range(ns + 1, sb.ndim))
      scores.append(se + jnp.mean(sa, axis=a_axes) + jnp.mean(sb, axis=b_axes))
    flat = jnp.concatenate([s.reshape(-1) for s in scores])
    tc = jnp.clip(t, 0, spec.total_step)
    budget = jnp.where(t == t_fix, target_bgt, jnp.asarray(budgets)[tc])
    k = init_bgt - budget
    ordered = jnp.sort(flat)
    threshold = jnp.where(k >= 1, ordered[jnp.clip(k - 1, 0, flat.size - 1)], -jnp.inf)
    masking = (learning & jnp.asarray(mask_now)[tc]) | (t == t_fix)
    fixed = t > t_fix

    out_pattern = []
    masks = []
    for s, old in zip(scores, state.pattern):
      fresh = s > threshold
      out_pattern.append(jnp.where(masking, fresh, old))
      masks.append(jnp.where(masking, fresh, jnp.where(fixed, old, True)))
    allocated = state.allocated | masking

    it = iter(zip(new_leaves, masks))

    def finish(u, p):
      if not _is_ada(u):
        return u
      _, keep = next(it)
      # kept entries take the inner update as it is; masked ones end at exactly zero (p + -p)
      return u.replace(e=jnp.where(keep, u.e, -p.e).astype(u.e.dtype))
    updates = jax.tree.map(finish, updates, params, is_leaf=_is_ada)
    reset = t == t_fix  # PEFT's reset_ipt once the pattern is fixed
    ipt = tuple(tuple(jnp.where(reset, 0.0, z) for z in zs) for zs in ipt)
    unc = tuple(tuple(jnp.where(reset, 0.0, z) for z in zs) for zs in unc)
    return updates, RankAllocatorState(t + 1, ipt, unc, tuple(out_pattern), allocated, inner)

  return optax.GradientTransformation(init, update)


def _find_state(opt_state) -> RankAllocatorState | None:
  if isinstance(opt_state, RankAllocatorState):
    return opt_state
  if isinstance(opt_state, (tuple, list)):
    for s in opt_state:
      found = _find_state(s)
      if found is not None:
        return found
  return None


def apply_rank_pattern(tree: Any, opt_state: Any) -> Any:
  """The tree with the allocator's pattern written into its AdaLoRA leaves (PEFT's ``rank_pattern``).

  Each AdaLoRA leaf's spec gets ``rank_pattern`` (so masked ranks stay masked
  when training goes on, in checkpoints and in :func:`jlora.save_peft`) and its
  ``a``, ``b``, ``e`` are zeroed at the masked ranks (what a PEFT file keeps
  of them). Before the first allocation there is no pattern and the tree is
  returned as it is.

  Args:
    tree: the whole tree or its trainable half (the AdaLoRA leaves in the
      order the allocator saw them).
    opt_state: the optimizer state holding a :class:`RankAllocatorState`
      (``TrainState.opt_state``), or that state itself.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.ones((6, 4))}, {"k": jlora.AdaLoRA(3, 1, total_step=4)},
    ...                   key=jax.random.key(0))
    >>> st = jlora.rank_allocator(__import__("optax").sgd(0.1)).init(jlora.split(tree)[0])
    >>> st = st._replace(pattern=(jnp.array([True, False, True]),), allocated=jnp.array(True))
    >>> jlora.apply_rank_pattern(tree, st)["k"].spec.rank_pattern
    ((True, False, True),)
  """
  state = _find_state(opt_state)
  if state is None:
    raise TreeError("apply_rank_pattern: opt_state holds no RankAllocatorState; train with "
                    "jlora.rank_allocator(tx)")
  if not bool(state.allocated):
    return tree
  patterns = [np.asarray(p) for p in state.pattern]
  n = len(_ada_leaves(tree))
  if n != len(patterns):
    raise TreeError(f"apply_rank_pattern: the tree has {n} AdaLoRA leaves but the allocator tracked "
                    f"{len(patterns)}; pass the tree that was trained")
  it = iter(patterns)

  def go(x):
    if not _is_ada(x):
      return x
    keep = next(it)
    if keep.shape != tuple(x.shape[i] for i in x.axes.stack) + (x.rank,):
      raise TreeError(f"apply_rank_pattern: a pattern of shape {keep.shape} does not fit an AdaLoRA "
                      f"leaf of rank {x.rank} and shape {x.shape}")
    rows = tuple(tuple(bool(b) for b in row) for row in keep.reshape(-1, x.rank))
    spec = dataclasses.replace(x.spec, rank_pattern=rows)
    return x.replace(spec=spec).with_children(lambda name, c: _zero_masked(name, c, keep, x))
  return jax.tree.map(go, tree, is_leaf=_is_ada)


def _zero_masked(name: str, c, keep: np.ndarray, x: AdaLoraWeight):
  if name == "w":
    return c
  ns = len(x.axes.stack)
  if name == "e":
    m = keep
  elif name == "a":
    m = keep.reshape(keep.shape[:-1] + (1,) * (c.ndim - ns - 1) + keep.shape[-1:])
  else:  # b: stack + (r,) + out
    m = keep.reshape(keep.shape + (1,) * (c.ndim - ns - 1))
  return jnp.where(jnp.asarray(m), c, jnp.zeros((), c.dtype))


# -- PEFT's format (peft_type "ADALORA") -----------------------------------------------------------
#
# Per adapted torch Linear ``M``: ``base_model.model.M.lora_A`` ``(k, in)``, ``.lora_B`` ``(out, k)``,
# ``.lora_E`` ``(k, 1)``, where ``k`` is ``init_r`` or, for a module in ``rank_pattern`` (keys
# ``"M.lora_E"``, values ``init_r`` bools), the number of kept ranks: PEFT slices the masked ranks
# off when it saves and puts them back (as zeros-to-be-ignored) when it loads. ``ranknum`` is not
# saved; it is ``init_r``.

_KINDS = ("lora_A", "lora_B", "lora_E")
_UNSUPPORTED = {"fan_in_fan_out": (False, None), "bias": ("none", None), "use_dora": (False, None),
                "layer_replication": (None,), "use_qalora": (False, None),
                "trainable_token_indices": (None,), "target_parameters": (None, [])}


def _validate(config: dict, f: str) -> None:
  from jlora._errors import CheckpointError  # noqa: PLC0415

  missing = [k for k in ("init_r", "target_modules") if k not in config]
  if missing:
    raise CheckpointError(f"{f} lacks the required field(s) {missing}; re-save the adapter with PEFT")
  for name in ("init_r", "target_r"):
    v = config.get(name, 1)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise CheckpointError(f"{f}: {name} must be a positive integer, got {v!r}")
  for field, ok in _UNSUPPORTED.items():
    if field in config and config[field] not in ok:
      raise CheckpointError(f"{f}: {field}={config[field]!r} is not supported by jlora's AdaLoRA "
                            f"(torch Linear layers only): {field} must be {ok[0]!r}")
  rp = config.get("rank_pattern")
  if rp is not None:
    r = config["init_r"]
    if not isinstance(rp, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and len(v) == r and all(isinstance(b, bool) for b in v)
        for k, v in rp.items()):
      raise CheckpointError(f"{f}: rank_pattern must map 'module.lora_E' names to lists of init_r={r} "
                            f"booleans, got {str(rp)[:120]}")
  d = config.get("lora_dropout", 0.0)
  if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
    raise CheckpointError(f"{f}: lora_dropout must be a number in [0, 1), got {d!r}")


def _spec_from(config: dict, **kw) -> AdaLoRA:
  alpha = config.get("lora_alpha", 8)
  total = config.get("total_step")
  return AdaLoRA(init_r=config["init_r"], target_r=config.get("target_r", 8),
                 alpha=float(alpha) if alpha and alpha > 0 else None,
                 dropout=float(config.get("lora_dropout", 0.0)), tinit=config.get("tinit", 0),
                 tfinal=config.get("tfinal", 0), deltaT=config.get("deltaT", 1),
                 beta1=config.get("beta1", 0.85), beta2=config.get("beta2", 0.85),
                 orth_reg_weight=config.get("orth_reg_weight", 0.5),
                 total_step=total if total else None, **kw)


def _load(config, tensors, params, m, where):
  from jlora import _peft  # noqa: PLC0415 - _peft imports the methods
  from jlora._errors import AxesError, CheckpointError  # noqa: PLC0415
  from jlora._methods.ia3 import _leaf_named  # noqa: PLC0415

  leaves, treedef, index = _peft._plain_leaves(params)
  adapter, full = _peft._sort_tensors(where, config, tensors, m, index, _KINDS)
  if not adapter:
    raise CheckpointError(f"{where} holds no {'/'.join(_KINDS)} tensors")
  r = config["init_r"]
  patterns = config.get("rank_pattern") or {}
  by_module: dict[str, dict] = {}
  for torch_module, kind, module, layer, value in adapter:
    slot = by_module.setdefault(module, {"torch": {}, "layers": {}})
    slot["torch"][layer] = torch_module
    slot["layers"].setdefault(layer, {})[kind] = np.asarray(value)
  out = list(leaves)
  adapted = set()
  for module, slot in by_module.items():
    path = _leaf_named(m, module, index, "weight", True)
    some = next(iter(slot["torch"].values()))
    if path is None:
      raise CheckpointError(f"{where}: PEFT's AdaLoRA on torch module {some!r} maps to jlora module "
                            f"{module!r}, which has no kernel leaf in the params; is the adapter for "
                            "this model (mapping=...)?")
    w = leaves[index[path]]
    stacked = m.stacked(module)
    try:
      axes = infer_axes(path, tuple(w.shape), AdaLoRA(r, min(r, 1), stack_axes=1 if stacked else None))
    except AxesError as e:
      raise CheckpointError(f"{where}: cannot place AdaLoRA's factors of {some!r} on {path!r}: {e}") from None
    stack, ins, outs = group_shapes(tuple(w.shape), axes)
    n_in, n_out = math.prod(ins), math.prod(outs)
    dtype = np.dtype(np.result_type(*(v.dtype for k in slot["layers"].values() for v in k.values())))
    a = np.zeros(stack + (n_in, r), dtype)
    b = np.zeros(stack + (r, n_out), dtype)
    e = np.zeros(stack + (r,), dtype)
    keep_rows = np.zeros(stack + (r,), bool)  # layers PEFT left out add nothing
    for layer, kinds in slot["layers"].items():
      name = slot["torch"][layer]
      if set(kinds) != set(_KINDS):
        raise CheckpointError(f"{where}: {name} has {sorted(kinds)} but AdaLoRA needs all of "
                              f"{list(_KINDS)}; the file is truncated or not AdaLoRA")
      if stacked and not 0 <= layer < stack[0]:
        raise CheckpointError(f"{where}: layer {layer} of {name!r} is outside the params' {stack[0]} "
                              "layers; is the adapter for this model?")
      pat = patterns.get(f"{name}.lora_E")
      keep = np.ones(r, bool) if pat is None else np.asarray(pat, bool)
      k = int(keep.sum())
      la, lb, le = kinds["lora_A"], kinds["lora_B"], kinds["lora_E"]
      if la.shape != (k, n_in) or lb.shape != (n_out, k) or le.shape != (k, 1):
        raise CheckpointError(
            f"{where}: {name}.lora_A / lora_B / lora_E have shapes {la.shape} / {lb.shape} / "
            f"{le.shape}, but {path!r} of shape {tuple(w.shape)} with {k} kept of init_r={r} ranks "
            f"needs ({k}, {n_in}) / ({n_out}, {k}) / ({k}, 1); is the adapter for this model, and "
            "does its rank_pattern match its tensors?")
      at = (layer,) if stacked else ()
      a[at][:, keep] = la.T  # a[at] is a view (of the layer, or of the whole unstacked array)
      b[at][keep] = lb.T
      e[at][keep] = le[:, 0]
      keep_rows[at][...] = keep
    pattern = None
    if patterns:
      pattern = tuple(tuple(bool(x) for x in row) for row in keep_rows.reshape(-1, r))
    spec = _spec_from(config, rank_pattern=pattern, stack_axes=1 if stacked else None,
                      dtype=None if dtype == np.float32 else dtype.name)
    out[index[path]] = AdaLoraWeight(w, jnp.asarray(a.reshape(stack + ins + (r,))),
                                     jnp.asarray(b.reshape(stack + (r,) + outs)), jnp.asarray(e),
                                     spec=spec, axes=axes)
    adapted.add(path)
  _peft._place_full(where, full, m, leaves, index, out, adapted)
  return jax.tree_util.tree_unflatten(treedef, out)


def _save(tree, m):
  from jlora import _peft  # noqa: PLC0415

  tensors: dict[str, np.ndarray] = {}
  kernels, full_modules = _peft._linear_kernels(tree, m, "adalora", "AdaLoRA", AdaLoraWeight)
  specs = {dataclasses.replace(n.spec, rank_pattern=None, stack_axes=None, dtype=None)
           for _, n in kernels.values()}
  if len(specs) > 1:
    raise SpecError("the AdaLoRA leaves have different specs (init_r, alpha, schedule); PEFT's "
                    "AdaLoraConfig holds one: wrap every AdaLoRA leaf with the same spec")
  spec = next(iter(specs))
  r = spec.init_r
  rank_pattern = {}
  for module, (path, node) in kernels.items():
    ns = len(node.axes.stack)
    a = _peft._host(node.a).reshape(node.a.shape[:ns] + (-1, r))
    b = _peft._host(node.b).reshape(node.b.shape[:ns] + (r, -1))
    e = _peft._host(node.e)
    keep_all = np.ones(e.shape, bool)
    if node.spec.rank_pattern is not None:
      keep_all = np.asarray(node.spec.rank_pattern, bool).reshape(e.shape)
    for (i, ai), (_, bi), (_, ei), (_, ki) in zip(*(_peft._layers(x, m.stacked(module))
                                                   for x in (a, b, e, keep_all))):
      name = m.to_torch(module, i)
      key = f"{_peft._PREFIX}{name}"
      tensors[f"{key}.lora_A"] = np.ascontiguousarray(ai.T[ki])
      tensors[f"{key}.lora_B"] = np.ascontiguousarray(bi.T[:, ki])
      tensors[f"{key}.lora_E"] = np.ascontiguousarray(ei[ki][:, None])
      if node.spec.rank_pattern is not None:
        rank_pattern[f"{name}.lora_E"] = [bool(x) for x in ki]
  leaves_by_module = _peft._leaves_by_module(tree)
  _peft._full_tensors(full_modules, m, leaves_by_module, tensors)
  short = _peft._short_names(m, leaves_by_module)
  total = spec.total_step if spec.total_step is not None else spec.tinit + spec.tfinal + 1
  config = {
      "peft_type": "ADALORA",
      "r": 8,  # PEFT ignores r for AdaLoRA (and warns unless it is LoraConfig's default, 8)
      "init_r": r,
      "target_r": spec.target_r,
      "lora_alpha": _peft._num(spec.effective_alpha),
      "lora_dropout": spec.dropout,
      "tinit": spec.tinit,
      "tfinal": spec.tfinal,
      "deltaT": spec.deltaT,
      "beta1": spec.beta1,
      "beta2": spec.beta2,
      "orth_reg_weight": spec.orth_reg_weight,
      "total_step": total,  # PEFT needs a positive one even for inference
      "rank_pattern": rank_pattern or None,
      "target_modules": _peft._target_modules(set(kernels), m, short),
      "modules_to_save": _peft._modules_to_save(full_modules, m, leaves_by_module),
      "fan_in_fan_out": False,
      "bias": "none",
      "init_lora_weights": True,
      "layers_to_transform": None,
      "layers_pattern": None,
      "inference_mode": True,
  }
  return config, tensors


def _register_codec() -> None:
  from jlora import _peft  # noqa: PLC0415

  _peft.register_codec(_peft.PeftCodec("ADALORA", ("adalora",), _validate, _load, _save))


_register_codec()
