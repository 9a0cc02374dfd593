"""VeRA: a frozen kernel plus ``A diag(lambda_d) B diag(lambda_b)`` with random frozen ``A``, ``B``.

``VeRA(r)`` on a kernel ``W`` of shape ``(in, out)`` stands for
``W + (A * lambda_d) @ (B * lambda_b)``: ``A`` ``(in, r)`` and ``B`` ``(r, out)``
are fixed random projections (Kaiming-uniform, as PEFT draws them) and only
the vectors ``lambda_d`` ``(r,)`` and ``lambda_b`` ``(out,)`` train.
``lambda_b`` starts at zero, so wrapping changes nothing.

Sharing: PEFT draws one ``vera_A`` of shape ``(r, max in)`` and one ``vera_B``
``(max out, r)`` for the whole model and gives each layer the slices
``vera_A[:, :in]`` and ``vera_B[:out]``. jlora draws each projection one input
row (one output column) at a time from ``fold_in(key(seed), index)``, so a
narrower leaf's projection is a slice of a wider one's up to the Kaiming bound,
which depends on the leaf's fan-in: a scalar that :func:`jlora.save_peft`
folds into ``lambda_d`` when it writes the one shared pair.

PEFT's format (``peft_type: "VERA"``): ``base_model.vera_A`` / ``base_model.vera_B``
(written with ``save_projection=True``, PEFT's default) and per adapted torch
Linear ``M`` the tensors ``base_model.model.M.vera_lambda_b`` ``(out,)`` and
``...vera_lambda_d`` ``(r,)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _peft
from jlora._adapter import Adapter, AdapterSpec, Axes, acc_dtype, group_shapes, infer_axes, lowrank_delta, register
from jlora._errors import AxesError, CheckpointError, SpecError
from jlora._lazy import Term, from_kernel
from jlora._methods.ia3 import _leaf_named
from jlora._methods.lora import adapter_dtype, check_float, is_array

__all__ = ["VeRA", "VeraWeight"]


@dataclasses.dataclass(frozen=True)
class VeRA(AdapterSpec):
  """The spec of VeRA (Kopiczko et al., 2024): shared random projections, trained vectors.

  ``y = x @ W + ((x @ A) * lambda_d) @ B * lambda_b`` with ``A`` ``(in, r)``
  and ``B`` ``(r, out)`` frozen and drawn from ``seed`` (equal for
  every leaf of one shape, and slices of one another across shapes), and
  ``lambda_d`` ``stack + (r,)`` (init ``d_initial``), ``lambda_b``
  ``stack + out`` (init zero) trained. Like LoRA, a 1-D leaf is left alone.

  Attributes:
    rank: r, the projections' width (PEFT's default 256; it may exceed the
      kernel's sides: only ``r + out`` numbers per kernel train).
    d_initial: ``lambda_d``'s initial value (PEFT's 0.1).
    dropout: dropout on the adapter's input (PEFT's ``vera_dropout``).
    seed: the projections' PRNG seed (shared by every VeRA leaf).
    dtype: the vectors' and projections' dtype; default float32 (float64 for a
      float64 base).
    stack_axes / in_axes / out_axes: the kernel layout, as for :class:`jlora.LoRA`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"q": {"kernel": jnp.ones((8, 6))}, "v": {"kernel": jnp.ones((4, 6))}},
    ...                   {"*/kernel": jlora.VeRA(3)}, key=jax.random.key(0))
    >>> q, v = tree["q"]["kernel"], tree["v"]["kernel"]
    >>> q.proj_a.shape, q.proj_b.shape, q.lambda_d.shape, q.lambda_b.shape
    ((8, 3), (3, 6), (3,), (6,))
    >>> bool(jnp.allclose(v.proj_a * 2 ** -0.5, q.proj_a[:4]))  # a slice, up to the fan-in bound
    True
  """

  rank: int = 256
  d_initial: float = 0.1
  dropout: float = 0.0
  seed: int = 0
  dtype: Any = None
  stack_axes: int | None = None
  in_axes: tuple[int, ...] | None = None
  out_axes: tuple[int, ...] | None = None

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
      raise SpecError(f"VeRA rank must be a positive integer, got {self.rank!r}; use e.g. VeRA(256)")
    object.__setattr__(self, "rank", int(self.rank))
    if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float, np.number)) or \
        not math.isfinite(self.d_initial):
      raise SpecError(f"VeRA d_initial must be a finite number, got {self.d_initial!r}")
    object.__setattr__(self, "d_initial", float(self.d_initial))
    if not 0.0 <= float(self.dropout) < 1.0:
      raise SpecError(f"VeRA dropout must be in [0, 1), got {self.dropout!r}")
    object.__setattr__(self, "dropout", float(self.dropout))
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
      raise SpecError(f"VeRA seed must be a non-negative integer, got {self.seed!r}")
    object.__setattr__(self, "seed", int(self.seed))
    if self.dtype is not None:
      dt = np.dtype(self.dtype)
      if not np.issubdtype(dt, np.floating) and dt.name != "bfloat16":
        raise SpecError(f"VeRA dtype must be a floating dtype, got {dt}")
      object.__setattr__(self, "dtype", dt.name)
    if self.stack_axes is not None and (isinstance(self.stack_axes, bool) or not isinstance(
        self.stack_axes, int) or self.stack_axes < 0):
      raise SpecError(f"VeRA stack_axes must be a non-negative int, got {self.stack_axes!r}")
    for name in ("in_axes", "out_axes"):
      v = getattr(self, name)
      if v is not None:
        v = (v,) if isinstance(v, int) else tuple(int(x) for x in v)
        if not v:
          raise SpecError(f"VeRA {name} must name at least one axis")
        object.__setattr__(self, name, v)
    if (self.in_axes is None) != (self.out_axes is None):
      raise SpecError("give VeRA in_axes and out_axes together (or neither, to infer them)")

  def adapt(self, path: str, leaf: Any, key: jax.Array) -> Any:
    del key  # the projections come from `seed`, the vectors are constants
    if not is_array(leaf) or leaf.ndim < 2:
      return leaf
    check_float(path, leaf, "VeRA")
    shape = tuple(leaf.shape)
    axes = infer_axes(path, shape, self)
    stack, ins, outs = group_shapes(shape, axes)
    dtype = adapter_dtype(self, leaf.dtype)
    proj_a, proj_b = projections(self.seed, math.prod(ins), math.prod(outs), self.rank)
    return VeraWeight(
        leaf, proj_a.reshape(ins + (self.rank,)).astype(dtype),
        proj_b.reshape((self.rank,) + outs).astype(dtype),
        jnp.full(stack + (self.rank,), self.d_initial, dtype), jnp.zeros(stack + outs, dtype),
        spec=self, axes=axes)


def _rows(key: jax.Array, n: int, r: int) -> jax.Array:
  """``(n, r)``: row ``i`` uniform in ``[-1, 1)`` from ``fold_in(key, i)`` (so rows never depend on ``n``)."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n, dtype=jnp.uint32))
  return jax.vmap(lambda k: jax.random.uniform(k, (r,), jnp.float32, -1.0, 1.0))(keys)


def projections(seed: int, n_in: int, n_out: int, rank: int) -> tuple[jax.Array, jax.Array]:
  """VeRA's frozen ``A`` ``(n_in, rank)`` and ``B`` ``(rank, n_out)``, Kaiming-uniform as PEFT draws them.

  PEFT's ``vera_A`` (``(r, in)``, fan-in ``in``) has bound ``sqrt(6 / in)`` and
  ``vera_B`` (``(out, r)``, fan-in ``r``) ``sqrt(6 / r)``.
  """
  key = jax.random.key(seed)
  a = _rows(jax.random.fold_in(key, 0), n_in, rank) * math.sqrt(6.0 / n_in)
  b = _rows(jax.random.fold_in(key, 1), n_out, rank).T * math.sqrt(6.0 / rank)
  return a, b


@register
class VeraWeight(Adapter):
  """A frozen base ``w``, frozen projections ``proj_a``, ``proj_b``; trainable ``lambda_d``, ``lambda_b``.

  Shapes: ``proj_a`` ``in + (r,)``, ``proj_b`` ``(r,) + out`` (no stacked axes:
  every layer shares them, as in PEFT), ``lambda_d`` ``stack + (r,)``,
  ``lambda_b`` ``stack + out``. A checkpoint stores the projections too, so a
  tree loaded from PEFT (whose projections torch drew) saves and loads exactly.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.zeros((4, 3))}, {"k": jlora.VeRA(2)}, key=jax.random.key(0))
    >>> leaf = tree["k"].replace(lambda_b=jnp.ones(3))
    >>> want = (leaf.proj_a * leaf.lambda_d) @ leaf.proj_b
    >>> bool(jnp.allclose(jlora.merge({"k": leaf})["k"], want))
    True
  """

  kind = "vera"
  spec_type = VeRA
  frozen = ("w", "proj_a", "proj_b")
  trainable = ("lambda_d", "lambda_b")
  saved = ("lambda_d", "lambda_b", "proj_a", "proj_b")

  def __init__(self, w=None, proj_a=None, proj_b=None, lambda_d=None, lambda_b=None, *, spec: VeRA,
               axes: Axes, shape=None):
    super().__init__(w=w, proj_a=proj_a, proj_b=proj_b, lambda_d=lambda_d, lambda_b=lambda_b,
                     spec=spec, axes=axes, shape=shape)

  @property
  def rank(self) -> int:
    return self.spec.rank

  def factors(self) -> tuple[jax.Array, jax.Array]:
    """``A * lambda_d`` (``stack + in + (r,)``) and ``B * lambda_b`` (``stack + (r,) + out``)."""
    self.require("factors", "proj_a", "proj_b", "lambda_d", "lambda_b")
    ns, d, b = len(self.axes.stack), self.lambda_d, self.lambda_b
    d = d.reshape(d.shape[:ns] + (1,) * len(self.axes.inputs) + d.shape[ns:])
    b = b.reshape(b.shape[:ns] + (1,) + b.shape[ns:])
    return jax.lax.stop_gradient(self.proj_a) * d, jax.lax.stop_gradient(self.proj_b) * b

  def delta(self) -> jax.Array:
    """``(A * lambda_d) @ (B * lambda_b)`` in the kernel's layout, in float32 (float64)."""
    a, b = self.factors()
    return lowrank_delta(a, b, self.axes, 1.0, self.shape)

  def layouts(self):
    return {"proj_a": self.axes.inputs + (None,), "proj_b": (None,) + self.axes.outputs,
            "lambda_d": self.axes.stack + (None,), "lambda_b": self.axes.stack + self.axes.outputs}

  def merged(self):
    self.require("merge")
    w = jax.lax.stop_gradient(self.w)
    acc = acc_dtype(w.dtype)
    return (w.astype(acc) + self.delta().astype(acc)).astype(w.dtype)

  def unmerged(self, merged):
    acc = acc_dtype(merged.dtype)
    return (merged.astype(acc) - self.delta().astype(acc)).astype(merged.dtype)

  def lazy(self, path):
    a, b = self.factors()
    return from_kernel(self.w, self.axes, [Term(a, b, 1.0, self.spec.dropout)], path=path)


# ---------------------------------------------------------------------------------------------
# PEFT's VeRA format.

_KINDS = ("vera_lambda_b", "vera_lambda_d")
_A, _B = "base_model.vera_A", "base_model.vera_B"
# Config fields that change what the adapter computes and that jlora does not implement.
_UNSUPPORTED = {"fan_in_fan_out": (False, None), "bias": ("none", None)}


def _validate(config: dict, f: str) -> None:
  missing = [k for k in ("r", "target_modules") if k not in config]
  if missing:
    raise CheckpointError(f"{f} lacks the required field(s) {missing}; re-save the adapter with PEFT, "
                          "or add them")
  r = config["r"]
  if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
    raise CheckpointError(f"{f}: r must be a positive integer, got {r!r}")
  tm = config["target_modules"]
  if not (tm is None or isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
    raise CheckpointError(f"{f}: target_modules must be a list of names, a regex string or null, got {tm!r}")
  if config.get("save_projection", True) is not True:
    raise CheckpointError(
        f"{f}: save_projection is {config.get('save_projection')!r}, so the file lacks vera_A / vera_B "
        "and PEFT would redraw them with torch's generator, which jlora does not reproduce; re-save "
        "the adapter with VeraConfig(save_projection=True) (PEFT's default)")
  for field, ok in _UNSUPPORTED.items():
    if field in config and config[field] not in ok:
      raise CheckpointError(f"{f}: {field}={config[field]!r} is not supported by jlora (it reads VeRA "
                            f"on torch Linear layers: {field} must be {ok[0]!r})")
  for field, lo, hi in (("vera_dropout", 0.0, 1.0),):
    v = config.get(field, 0.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v < hi:
      raise CheckpointError(f"{f}: {field} must be a number in [{lo}, {hi}), got {v!r}")
  d = config.get("d_initial", 0.1)
  if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d):
    raise CheckpointError(f"{f}: d_initial must be a finite number, got {d!r}")
  seed = config.get("projection_prng_key", 0)
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise CheckpointError(f"{f}: projection_prng_key must be a non-negative integer, got {seed!r}")


def _load(config, tensors, params, m, where):
  tensors = dict(tensors)
  r = config["r"]
  proj = {}
  for name, want in ((_A, f"({r}, max in)"), (_B, f"(max out, {r})")):
    if name not in tensors:
      raise CheckpointError(f"{where} lacks {name!r}, VeRA's shared projection {want}; re-save the "
                            "adapter with PEFT's save_projection=True")
    proj[name] = np.asarray(tensors.pop(name))
  va, vb = proj[_A], proj[_B]
  if va.ndim != 2 or vb.ndim != 2 or va.shape[0] != r or vb.shape[1] != r:
    raise CheckpointError(f"{where}: {_A} has shape {va.shape} and {_B} {vb.shape}; with r={r} they "
                          f"must be ({r}, max in) and (max out, {r})")
  leaves, treedef, index = _peft._plain_leaves(params)
  adapter, full = _peft._sort_tensors(where, config, tensors, m, index, _KINDS)
  if not adapter:
    raise CheckpointError(f"{where} holds no {'/'.join(_KINDS)} tensors")
  by_module: dict[str, dict] = {}
  for torch_module, kind, module, layer, value in adapter:
    slot = by_module.setdefault(module, {"torch": torch_module, "layers": {}})
    slot["layers"].setdefault(layer, {})[kind] = (torch_module, np.asarray(value))
  out = list(leaves)
  adapted = set()
  d0, dropout = float(config.get("d_initial", 0.1)), float(config.get("vera_dropout", 0.0))
  seed = int(config.get("projection_prng_key", 0))
  for module, slot in by_module.items():
    path = _leaf_named(m, module, index, "weight", True)
    if path is None:
      raise CheckpointError(
          f"{where}: PEFT's VeRA on torch module {slot['torch']!r} maps to jlora module {module!r}, "
          "which has no kernel leaf the params have; jlora reads VeRA on Linear layers only: is the "
          "adapter for this model (mapping=...)?")
    w = leaves[index[path]]
    stacked = m.stacked(module)
    try:
      axes = infer_axes(path, tuple(w.shape), VeRA(r, stack_axes=1 if stacked else None))
    except AxesError as e:
      raise CheckpointError(f"{where}: cannot place VeRA's vectors of {slot['torch']!r} on {path!r}: "
                            f"{e}") from None
    stack, ins, outs = group_shapes(tuple(w.shape), axes)
    n_in, n_out = math.prod(ins), math.prod(outs)
    if va.shape[1] < n_in or vb.shape[0] < n_out:
      raise CheckpointError(
          f"{where}: {_A} {va.shape} / {_B} {vb.shape} are too small for {path!r} of shape "
          f"{tuple(w.shape)} (in {n_in}, out {n_out}); is the adapter for this model?")
    dtype = jnp.result_type(va.dtype)
    spec_dtype = None if dtype == adapter_dtype(VeRA(r), w.dtype) else jnp.dtype(dtype).name
    lam_d = np.full(stack + (r,), d0, dtype)
    lam_b = np.zeros(stack + outs, dtype)  # layers PEFT left out add nothing
    for layer, kinds in slot["layers"].items():
      name = next(iter(kinds.values()))[0]
      if set(kinds) != set(_KINDS):
        raise CheckpointError(f"{where}: {name} has {sorted(kinds)} but VeRA needs both "
                              f"{list(_KINDS)}; the file is truncated or not VeRA")
      b, d = kinds["vera_lambda_b"][1], kinds["vera_lambda_d"][1]
      if b.shape != (n_out,) or d.shape != (r,):
        raise CheckpointError(
            f"{where}: {name}.vera_lambda_b / vera_lambda_d have shapes {b.shape} / {d.shape}, but "
            f"{path!r} of shape {tuple(w.shape)} with r={r} needs ({n_out},) / ({r},); is the "
            "adapter for this model?")
      if stacked and not 0 <= layer < stack[0]:
        raise CheckpointError(f"{where}: layer {layer} of {slot['torch']!r} is outside the params' "
                              f"{stack[0]} layers; is the adapter for this model?")
      at = (layer,) if stacked else ()
      lam_b[at] = b.astype(dtype).reshape(outs)
      lam_d[at] = d.astype(dtype)
    spec = VeRA(r, d_initial=d0, dropout=dropout, seed=seed, dtype=spec_dtype,
                stack_axes=1 if stacked else None)
    out[index[path]] = VeraWeight(
        w, jnp.asarray(va[:, :n_in].T.reshape(ins + (r,)), dtype),
        jnp.asarray(vb[:n_out].T.reshape((r,) + outs), dtype), jnp.asarray(lam_d), jnp.asarray(lam_b),
        spec=spec, axes=axes)
    adapted.add(path)
  _peft._place_full(where, full, m, leaves, index, out, adapted)
  return jax.tree_util.tree_unflatten(treedef, out)


def _scale_of(x: np.ndarray, ref: np.ndarray) -> float | None:
  """``c`` with ``x == c * ref`` (to float32 rounding), or None."""
  if x.shape == ref.shape and np.array_equal(x, ref):
    return 1.0
  den = float(np.vdot(ref, ref))
  if den == 0.0:
    return None
  c = float(np.vdot(ref, x)) / den
  tol = 1e-5 * float(np.max(np.abs(x))) + 1e-30
  return c if np.max(np.abs(x - c * ref)) <= tol else None


def _save(tree, m):
  tensors: dict[str, np.ndarray] = {}
  kernels, full_modules = _peft._linear_kernels(tree, m, "vera", "VeRA", VeraWeight)
  nodes = [n for _, n in kernels.values()]
  for field in ("rank", "dropout"):
    values = {getattr(n.spec, field) for n in nodes}
    if len(values) > 1:
      raise SpecError(f"the VeRA leaves have different {field}s {sorted(values)}; PEFT's VeRA config "
                      f"holds one: wrap every VeRA leaf with the same {field}")
  r = nodes[0].rank
  mats = {p: (_peft._host(n.proj_a).reshape(-1, r), _peft._host(n.proj_b).reshape(r, -1))
          for p, n in kernels.values()}
  ref_a = max(mats.values(), key=lambda ab: ab[0].shape[0])[0]
  ref_b = max(mats.values(), key=lambda ab: ab[1].shape[1])[1]
  for module, (path, node) in kernels.items():
    a, b = mats[path]
    ca, cb = _scale_of(a, ref_a[: a.shape[0]]), _scale_of(b, ref_b[:, : b.shape[1]])
    if ca is None or cb is None:
      raise SpecError(
          f"the VeRA projections of {path!r} are not slices of the widest leaf's (PEFT holds one "
          "shared vera_A / vera_B for the whole model); wrap every VeRA leaf with one seed, or "
          "export the merged model with jlora.export_merged")
    lam_d = _peft._host(node.lambda_d) * np.asarray(ca * cb, _peft._host(node.lambda_d).dtype)
    lam_b = _peft._host(node.lambda_b)
    for (i, d), (_, b) in zip(_peft._layers(lam_d, m.stacked(module)),
                              _peft._layers(lam_b, m.stacked(module))):
      name = f"{_peft._PREFIX}{m.to_torch(module, i)}"
      tensors[f"{name}.vera_lambda_b"] = np.ascontiguousarray(b.reshape(-1))
      tensors[f"{name}.vera_lambda_d"] = np.ascontiguousarray(d)
  tensors[_A] = np.ascontiguousarray(ref_a.T)
  tensors[_B] = np.ascontiguousarray(ref_b.T)
  leaves_by_module = _peft._leaves_by_module(tree)
  _peft._full_tensors(full_modules, m, leaves_by_module, tensors)
  short = _peft._short_names(m, leaves_by_module)
  config = {
      "peft_type": "VERA",
      "r": r,
      "target_modules": _peft._target_modules(set(kernels), m, short),
      "projection_prng_key": nodes[0].spec.seed,
      "save_projection": True,
      "vera_dropout": nodes[0].spec.dropout,
      "d_initial": nodes[0].spec.d_initial,
      "fan_in_fan_out": False,
      "bias": "none",
      "modules_to_save": _peft._modules_to_save(full_modules, m, leaves_by_module),
      "init_weights": True,
      "layers_to_transform": None,
      "layers_pattern": None,
      "inference_mode": True,
  }
  return config, tensors


_peft.register_codec(_peft.PeftCodec("VERA", ("vera",), _validate, _load, _save))
