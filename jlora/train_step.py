"""One compiled training step for LoRA and full fine-tuning, on one device or a mesh.

:func:`make_train_step` turns a loss ``loss_fn(params, batch) -> scalar`` and
an optax transform into a :class:`TrainStep`. ``step.init(tree)`` splits the
tree (a wrapped tree trains its adapters; a plain params tree trains in full),
places both halves on the mesh with :func:`jlora.sharding.tree_specs`, and
initialises the optimizer state sharded like the parameters it tracks.
``step(state, frozen, batch)`` runs one jit-compiled update with explicit in
and out shardings, donates the old state's buffers (not on CPU, by default),
and accumulates gradients over ``accum_steps`` micro-batches. The program is
the same on one CPU and on a pod; only the mesh differs.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np, optax, jlora
  >>> from jlora.train_step import make_train_step
  >>> params = {"w": jnp.ones((4, 2))}
  >>> loss = lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2)
  >>> tree = jlora.wrap(params, {"w": jlora.LoRA(1)}, key=jax.random.key(0))
  >>> step = make_train_step(loss, optax.sgd(0.1))
  >>> state, frozen = step.init(tree)
  >>> state, metrics = step(state, frozen, {"x": np.ones((8, 4), np.float32)})
  >>> int(state.step), float(metrics["loss"])
  (1, 16.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora import distributed, sharding
from jlora._errors import ConfigError, ShardingError, TreeError
from jlora._lora import lora
from jlora._tree import adapted_leaves, combine, split

__all__ = ["TrainState", "TrainStep", "make_train_step"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """What a training step updates: the step count, the trainable half, the optimizer state.

  A pytree (checkpoint it with Orbax, pass it through ``jit``). The frozen half
  is not part of it: it never changes and is never donated.

  Attributes:
    step: int32 scalar, the number of updates done.
    trainable: the trainable half (``jlora.split(tree)[0]``; the whole params
      tree under full fine-tuning).
    opt_state: the optax state for ``trainable``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.train_step import TrainState
    >>> s = TrainState(jnp.zeros((), jnp.int32), {"a": jnp.ones(2)}, ())
    >>> int(s.step)
    0
  """

  step: jax.Array
  trainable: Any
  opt_state: Any


def make_train_step(loss_fn: Callable[[Any, Any], jax.Array], tx: optax.GradientTransformation, *,
                    mesh: Mesh | None = None, specs: Any = "dp",
                    batch_spec: PartitionSpec | None = None, accum_steps: int = 1,
                    donate: bool | None = None, lift: bool = True,
                    compiler_options: dict[str, Any] | None = None) -> TrainStep:
  """Builds a training step for ``loss_fn``, sharded on ``mesh`` as ``specs`` says.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a batch,
      or ``-> (total, weight)`` (e.g. the summed token losses and the token
      count) for means weighted exactly across micro-batches; with a ``rng``
      passed to the step, ``loss_fn(params, batch, key)``. With ``lift=True``
      (default) it receives plain params (it is lifted with
      :func:`jlora.lora`), so the same function serves LoRA and full
      fine-tuning. With ``lift=False`` it receives the tree with
      :class:`jlora.LoraWeight` leaves.
    tx: the optax transform. It only ever sees the trainable half, so a plain
      ``optax.adamw(...)`` is right (``jlora.optimizer(...)`` works too for LoRA).
    mesh: the device mesh; ``None`` compiles for the default device.
    specs: how to shard the base (anything :func:`jlora.sharding.tree_specs`
      takes: a preset name, ``ShardingRules``, a ``{path: PartitionSpec}``
      mapping, a spec tree). Adapters follow their base. Ignored without a mesh.
    batch_spec: the spec of every batch leaf's leading dimension; default the
      preset's / rules' batch axes, or every mesh axis for other ``specs``.
    accum_steps: micro-batches per step. Each batch leaf of ``B`` rows is cut
      into ``accum_steps`` micro-batches (row ``i`` goes to micro-batch
      ``i % accum_steps``, so each stays spread over the devices); gradients and
      losses are averaged over them (weighted by ``weight`` for a pair).
    donate: donate the state's buffers to the step (the state passed in is
      deleted; keep the returned one). ``None`` (default): donate unless every
      device the step runs on is a CPU. Donation saves a copy of the state's
      memory on accelerators; on XLA:CPU it measured slower at the SmolLM2
      shape (``experiments/bench_donate.py``: 0.86x full fine-tuning, 0.89x
      LoRA, 30 layers), so there the state is not donated by default.
    lift: lift ``loss_fn`` with :func:`jlora.lora` (see above).
    compiler_options: XLA options for the step's compilation (``jax.jit``'s
      ``compiler_options``), e.g. ``{"xla_backend_optimization_level": 0}`` to
      compile faster on CPU.

  Returns:
    A :class:`TrainStep`; call ``init(tree)`` then ``step(state, frozen, batch)``.

  Raises:
    ConfigError: ``accum_steps`` is not a positive int.
    ShardingError: the mesh has ``Explicit`` axes (``jax.make_mesh``'s default);
      the step relies on the compiler's sharding propagation (``Auto`` axes).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, jlora
    >>> from jlora import sharding
    >>> from jlora.train_step import make_train_step
    >>> mesh = sharding.make_mesh((len(jax.devices()),))
    >>> loss = lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2)
    >>> tree = jlora.wrap({"w": jnp.ones((4, 2))}, {"w": jlora.LoRA(1)}, key=jax.random.key(0))
    >>> step = make_train_step(loss, optax.adam(1e-2), mesh=mesh, specs={"w": sharding.P()},
    ...                        accum_steps=2)
    >>> state, frozen = step.init(tree)
    >>> state, metrics = step(state, frozen, {"x": np.ones((16, 4), np.float32)})
    >>> state.trainable["w"].a.sharding.spec
    P(None, None)
  """
  if isinstance(accum_steps, bool) or not isinstance(accum_steps, (int, np.integer)) or accum_steps < 1:
    raise ConfigError(f"accum_steps must be a positive int, got {accum_steps!r}")
  if mesh is not None:
    explicit = [n for n, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ()))
                if t != jax.sharding.AxisType.Auto]
    if explicit:
      raise ShardingError(
          f"mesh axes {tuple(explicit)} are not Auto (jax.make_mesh makes Explicit axes by "
          "default); build the mesh with jlora.sharding.make_mesh(shape, preset), or pass "
          "axis_types=(jax.sharding.AxisType.Auto,) * n to jax.make_mesh")
  return TrainStep(loss_fn, tx, mesh=mesh, specs=specs, batch_spec=batch_spec,
                   accum_steps=int(accum_steps), donate=donate, lift=lift,
                   compiler_options=compiler_options)


class TrainStep:
  """A compiled training step and the shardings it runs with (from :func:`make_train_step`).

  Attributes:
    mesh: the mesh, or ``None``.
    spec_tree: the specs of the whole tree (after :meth:`init`).
    state_shardings: ``TrainState`` of ``NamedSharding`` (after :meth:`init`).
    frozen_shardings: the frozen half's shardings (after :meth:`init`).
    batch_spec: the spec of the batch leaves' leading dimension.
    full: True when the tree has no adapters (full fine-tuning).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> from jlora.train_step import make_train_step
    >>> step = make_train_step(lambda p, b: jnp.mean(b @ p["w"]), optax.sgd(0.1))
    >>> state, frozen = step.init({"w": jnp.ones((3, 1))})  # no adapters: full fine-tuning
    >>> step.full, frozen is None
    (True, True)
  """

  def __init__(self, loss_fn, tx, *, mesh, specs, batch_spec, accum_steps, donate, lift,
               compiler_options=None):
    self.loss_fn = loss_fn
    self.tx = tx
    self.mesh = mesh
    self.specs = specs
    self.accum_steps = accum_steps
    if donate is None:
      devices = mesh.devices.flat if mesh is not None else jax.devices()[:1]
      donate = any(d.platform != "cpu" for d in devices)
    self.donate = bool(donate)
    self.compiler_options = compiler_options
    self._loss = lora(loss_fn) if lift else loss_fn
    self.batch_spec = None
    if mesh is not None:
      if batch_spec is None:
        if isinstance(specs, (str, sharding.ShardingRules)):
          batch_spec = sharding.batch_spec(specs, mesh)
        else:
          batch_spec = PartitionSpec(tuple(mesh.axis_names))
      self.batch_spec = PartitionSpec(*tuple(batch_spec)[:1])
    self.spec_tree = None
    self.state_shardings = None
    self.frozen_shardings = None
    self.full = None
    self._jitted = None

  def init(self, tree: Any) -> tuple[TrainState, Any]:
    """Splits, places and initialises: returns ``(state, frozen)``.

    Args:
      tree: a wrapped tree (LoRA / Full leaves train, the rest is frozen) or
        plain params (everything trains). Its arrays are copied, never donated.

    Returns:
      ``(state, frozen)``: a :class:`TrainState` on the mesh and the frozen
      half on the mesh (``None`` under full fine-tuning).

    Raises:
      ShardingError: the specs do not fit the tree or the mesh.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> from jlora.train_step import make_train_step
      >>> tree = jlora.wrap({"w": jnp.ones((4, 4))}, {"w": jlora.LoRA(2)}, key=jax.random.key(0))
      >>> state, frozen = make_train_step(lambda p, b: 0.0, optax.sgd(0.1)).init(tree)
      >>> state.trainable["w"].a.shape, frozen["w"].w.shape
      ((4, 2), (4, 4))
    """
    self.full = not adapted_leaves(tree)
    trainable, frozen = (tree, None) if self.full else split(tree)
    if self.mesh is None:
      trainable = jax.tree.map(_copy, trainable)  # the step donates it; keep the caller's arrays
      opt_state = jax.jit(self.tx.init)(trainable)
      # commit the whole state to the device the step's outputs will live on: the step's
      # cache key includes whether each argument is committed, and an uncommitted first
      # state would make the second call compile the step again
      arrays = [x for x in jax.tree.leaves(trainable) if isinstance(x, jax.Array)]
      device = next(iter(arrays[0].devices())) if arrays else jax.devices()[0]
      state = jax.device_put(TrainState(np.zeros((), np.int32), trainable, opt_state), device)
      self._build()
      return state, frozen
    mesh = self.mesh
    self.spec_tree = sharding.tree_specs(tree, self.specs, mesh=mesh)
    t_specs, f_specs = (self.spec_tree, None) if self.full else split(self.spec_tree)
    placed = sharding.shard(trainable, mesh, t_specs)
    # the step donates the trainable buffers: never hand it the caller's own arrays
    trainable = jax.tree.map(lambda new, old: _copy(new) if new is old else new, placed, trainable)
    frozen = None if frozen is None else sharding.shard(frozen, mesh, f_specs)
    opt_specs = _opt_specs(self.tx, trainable, t_specs)
    opt_shardings = None if opt_specs is None else sharding.named_shardings(mesh, opt_specs)
    opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(trainable)
    if opt_shardings is None:
      opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
    replicated = NamedSharding(mesh, PartitionSpec())
    self.state_shardings = TrainState(replicated, sharding.named_shardings(mesh, t_specs),
                                      opt_shardings)
    self.frozen_shardings = None if f_specs is None else sharding.named_shardings(mesh, f_specs)
    step = jax.device_put(np.zeros((), np.int32), replicated) if jax.process_count() == 1 else \
        jax.make_array_from_process_local_data(replicated, np.zeros((), np.int32), ())
    self._build()
    return TrainState(step, trainable, opt_state), frozen

  def __call__(self, state: TrainState, frozen: Any, batch: Any,
               rng: jax.Array | None = None) -> tuple[TrainState, dict]:
    """One update: returns ``(new_state, metrics)``.

    ``batch`` leaves are numpy or jax arrays with the batch as leading
    dimension: in one process the global batch, in several each process's own
    rows (:func:`jlora.distributed.process_rows`); scalars are replicated.

    ``metrics["loss"]`` is computed before the update: the mean of the
    micro-batches' losses, or, when ``loss_fn`` returns ``(total, weight)``,
    ``sum(total) / sum(weight)`` over them (exact token-weighted means across
    micro-batches of different sizes; then ``metrics["weight"]`` holds the sum).
    ``metrics["grad_norm"]`` is the global norm of the averaged gradient.

    Args:
      state: the :class:`TrainState` (donated: use the returned one).
      frozen: the frozen half from :meth:`init`.
      batch: a pytree of arrays.
      rng: a PRNG key for dropout; when given, ``loss_fn(params, batch, key)``
        is called with ``fold_in(rng, micro_batch_index)``.

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax
      >>> from jlora.train_step import make_train_step
      >>> step = make_train_step(lambda p, b: jnp.mean(b @ p["w"]), optax.sgd(1.0))
      >>> state, frozen = step.init({"w": jnp.ones((2, 1))})
      >>> state, m = step(state, frozen, np.ones((4, 2), np.float32))
      >>> float(m["loss"]), state.trainable["w"].ravel().tolist()
      (2.0, [0.0, 0.0])
    """
    if self._jitted is None:
      raise TreeError("call step.init(tree) before step(state, frozen, batch)")
    batch, rng = self._place(batch, rng)
    return self._jit_for(batch, rng)(state, frozen, batch, rng)

  def lower(self, state: TrainState, frozen: Any, batch: Any, rng: jax.Array | None = None):
    """``jax.jit(...).lower`` of the step on these arguments (for ``.compile()``, cost analysis).

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax
      >>> from jlora.train_step import make_train_step
      >>> step = make_train_step(lambda p, b: jnp.mean(b @ p["w"]), optax.sgd(1.0))
      >>> state, frozen = step.init({"w": jnp.ones((2, 1))})
      >>> "stablehlo" in step.lower(state, frozen, np.ones((4, 2), np.float32)).as_text()
      True
    """
    if self._jitted is None:
      raise TreeError("call step.init(tree) before step.lower(...)")
    batch, rng = self._place(batch, rng)
    return self._jit_for(batch, rng).lower(state, frozen, batch, rng)

  # ------------------------------------------------------------------------------------------

  def _build(self) -> None:
    self._jitted = {}

  def _place(self, batch, rng):
    if self.mesh is None:
      return batch, rng
    batch = distributed.global_batch(batch, self.mesh, self.batch_spec)
    if rng is not None and not (isinstance(rng, jax.Array) and not rng.is_fully_addressable):
      replicated = NamedSharding(self.mesh, PartitionSpec())
      if jax.process_count() == 1:
        rng = jax.device_put(rng, replicated)
      else:
        rng = jax.random.wrap_key_data(jax.make_array_from_process_local_data(
            replicated, np.asarray(jax.random.key_data(rng)), jax.random.key_data(rng).shape),
            impl=jax.random.key_impl(rng))
    return batch, rng

  def _jit_for(self, batch, rng):
    """The jitted step for this batch structure (in_shardings name every batch leaf)."""
    leaves, treedef = jax.tree.flatten(batch)
    key = (treedef, tuple(np.ndim(x) for x in leaves), rng is None)
    if key not in self._jitted:
      kwargs: dict[str, Any] = {}
      if self.donate:
        kwargs["donate_argnums"] = (0,)
      if self.mesh is not None:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        rows = NamedSharding(self.mesh, self.batch_spec)
        batch_shardings = jax.tree.unflatten(
            treedef, [rows if np.ndim(x) else replicated for x in leaves])
        kwargs["in_shardings"] = (self.state_shardings, self.frozen_shardings, batch_shardings,
                                  None if rng is None else replicated)
        kwargs["out_shardings"] = (self.state_shardings, replicated)
      if self.compiler_options:
        kwargs["compiler_options"] = dict(self.compiler_options)
      self._jitted[key] = jax.jit(self._step, **kwargs)
    return self._jitted[key]

  def _step(self, state: TrainState, frozen: Any, batch: Any, rng: jax.Array | None):
    weighted = []

    def loss_of(trainable, micro, key):
      params = trainable if frozen is None else combine(trainable, frozen)
      out = self._loss(params, micro) if key is None else self._loss(params, micro, key)
      if isinstance(out, (tuple, list)):
        if len(out) != 2:
          raise ConfigError("loss_fn must return a scalar or a (total, weight) pair")
        weighted.append(True)
        return jnp.asarray(out[0], jnp.float32), jnp.asarray(out[1], jnp.float32)
      return jnp.asarray(out, jnp.float32), jnp.ones((), jnp.float32)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    k = self.accum_steps
    if k == 1:  # the same key as micro-batch 0 of an accumulated step: fold_in(rng, 0)
      key = None if rng is None else jax.random.fold_in(rng, 0)
      (total, weight), grads = grad_fn(state.trainable, batch, key)
    else:
      micro = jax.tree_util.tree_map_with_path(self._split_micro, batch)
      zeros = jax.tree.map(jnp.zeros_like, state.trainable)

      def body(carry, xs):
        g_acc, t_acc, w_acc = carry
        mb, i = xs
        key = None if rng is None else jax.random.fold_in(rng, i)
        (t, w), g = grad_fn(state.trainable, mb, key)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        if self.mesh is not None:
          g_acc = jax.lax.with_sharding_constraint(g_acc, self.state_shardings.trainable)
        return (g_acc, t_acc + t, w_acc + w), None

      zero = jnp.zeros((), jnp.float32)
      (grads, total, weight), _ = jax.lax.scan(body, (zeros, zero, zero), (micro, jnp.arange(k)))
    denom = jnp.maximum(weight, jnp.finfo(jnp.float32).tiny)
    grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    new = TrainState(state.step + 1, trainable, opt_state)
    metrics = {"loss": total / denom, "grad_norm": optax.global_norm(grads).astype(jnp.float32)}
    if weighted:
      metrics["weight"] = weight
    return new, metrics

  def _split_micro(self, kp, x):
    k = self.accum_steps
    if not x.ndim:
      return jnp.broadcast_to(x, (k,))
    rows = x.shape[0]
    if rows % k:
      raise ConfigError(
          f"batch leaf {jax.tree_util.keystr(kp)} has {rows} rows, which accum_steps={k} does not "
          f"divide; use a batch that is a multiple of {k}")
    y = x.reshape((rows // k, k) + x.shape[1:])
    y = jnp.swapaxes(y, 0, 1)
    if self.mesh is not None:
      n = _axes_size(self.mesh, self.batch_spec)
      if (rows // k) % n:
        raise ShardingError(
            f"batch leaf {jax.tree_util.keystr(kp)}: micro-batches of {rows // k} rows "
            f"({rows} / accum_steps={k}) cannot be split over the {n} batch devices; use a batch "
            f"that is a multiple of {k * n}")
      spec = PartitionSpec(None, *tuple(self.batch_spec)[:1])
      y = jax.lax.with_sharding_constraint(y, NamedSharding(self.mesh, spec))
    return y


# ----------------------------------------------------------------------------------------------
# Private helpers.


def _copy(x):
  if isinstance(x, jax.Array):
    return jax.device_put(x, x.sharding, may_alias=False)
  return x


def _axes_size(mesh: Mesh, spec: PartitionSpec) -> int:
  if not len(spec) or spec[0] is None:
    return 1
  axes = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
  return int(np.prod([mesh.shape[a] for a in axes]))


def _opt_specs(tx, trainable, t_specs):
  """The optimizer state's specs: param-shaped entries like their param, the rest replicated."""
  abstract = jax.eval_shape(tx.init, trainable)
  try:
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract, t_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec))
  except Exception:  # an optimizer optax cannot map: let the compiler propagate from the params
    return None
