"""Sharding LoRA trees on a ``jax.sharding.Mesh``: adapters follow their base's layout.

A base kernel's :class:`~jax.sharding.PartitionSpec` decides where its adapter
lives. ``a`` (shape ``stack + in + (r,)``) takes the base's entries on the
stacked and input axes and replicates the rank axis; ``b`` (shape
``stack + (r,) + out``) takes them on the stacked and output axes and also
replicates the rank axis. So ``x @ a`` needs exactly the communication that
``x @ w`` needs, ``(x @ a) @ b`` lands where ``x @ w`` lands, and ``a @ b`` has
``w``'s layout, so merging adds shard to shard with no data movement.

Specs for a whole tree come from :func:`tree_specs`, which takes any of

* a preset name, ``"dp"``, ``"fsdp"``, ``"tp"`` or ``"fsdp_tp"`` (logical-axis
  rules for the shipped Llama and BERT models, resolved against the mesh);
* :class:`ShardingRules`: logical axis names per leaf plus logical-to-mesh rules
  (the MaxText / Flax ``logical_axis_rules`` scheme);
* a mapping ``{path or glob: PartitionSpec}`` for the base leaves;
* a pytree of ``PartitionSpec`` shaped like the params (or like the wrapped tree).

:func:`shard` places a tree on a mesh with those specs; it works in one process
or many (multi-controller JAX).

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> from jlora import sharding
  >>> mesh = sharding.make_mesh((len(jax.devices()),))
  >>> tree = jlora.wrap({"w": jnp.ones((8, 4))}, {"w": jlora.LoRA(2)}, key=jax.random.key(0))
  >>> specs = sharding.tree_specs(tree, {"w": sharding.P("data", None)}, mesh=mesh)
  >>> specs["w"].a, specs["w"].b
  (P('data', None), P(None, None))
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora import _families
from jlora._errors import ShardingError
from jlora._paths import closest_paths, compile_pattern, path_str
from jlora._adapter import Adapter, Axes, factor_layouts, is_adapted
from jlora._quant import QuantizedArray, is_quantized, is_whole

__all__ = [
    "P", "PRESETS", "LLAMA_AXES", "BERT_AXES", "ShardingRules", "adapter_specs", "tree_specs",
    "shard", "named_shardings", "preset", "make_mesh", "batch_spec", "model_axes",
    "per_device_bytes",
]

#: Short alias of :class:`jax.sharding.PartitionSpec`.
P = PartitionSpec

#: The sharding presets :func:`preset` knows.
PRESETS = ("dp", "fsdp", "tp", "fsdp_tp")

MeshAxes = str | tuple[str, ...] | None

#: Logical axis names of every leaf of :mod:`jlora.models.llama` (first matching glob wins;
#: the Llama family record's ``axes``, :mod:`jlora._families`).
LLAMA_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = _families.LLAMA.axes

#: Logical axis names of every leaf of :mod:`jlora.models.bert` (first matching glob wins).
BERT_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = _families.BERT.axes


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical-axis sharding rules: leaf paths -> logical axis names -> mesh axes.

  Attributes:
    logical: ``(logical name, mesh axes)`` pairs; mesh axes are a mesh axis
      name, a tuple of names (sharded over their product) or ``None``
      (replicated). A logical name may appear several times: for each
      dimension the first candidate whose mesh axes exist, are not yet used by
      another dimension of the same leaf and divide the dimension wins. A
      logical name with no pair is replicated.
    batch: the mesh axes that split the batch (leading) dimension of the data.
    axes: ``(glob, logical names)`` pairs giving each leaf's logical axis names,
      one per dimension (first matching glob wins; unmatched leaves are
      replicated). ``None``: the table of the shipped model found in the tree
      (:data:`LLAMA_AXES` or :data:`BERT_AXES`).

  Example:
    >>> from jlora.sharding import ShardingRules
    >>> rules = ShardingRules(logical=(("embed", "data"), ("mlp", "model")), batch="data")
    >>> rules.mesh_axes_of("mlp")
    ('model',)
  """

  logical: tuple[tuple[str, MeshAxes], ...] = ()
  batch: MeshAxes = None
  axes: tuple[tuple[str, tuple[str | None, ...]], ...] | None = None

  def __post_init__(self):
    logical = tuple((str(name), _norm_axes(ax, f"logical rule {name!r}")) for name, ax in
                    _pairs(self.logical, "ShardingRules.logical"))
    object.__setattr__(self, "logical", logical)
    object.__setattr__(self, "batch", _norm_axes(self.batch, "ShardingRules.batch"))
    if self.axes is not None:
      axes = tuple((pattern, tuple(names)) for pattern, names in _pairs(self.axes, "ShardingRules.axes"))
      for pattern, _ in axes:
        compile_pattern(pattern)
      object.__setattr__(self, "axes", axes)

  def mesh_axes_of(self, name: str) -> MeshAxes:
    """The mesh axes of the first rule for logical axis ``name`` (``None`` when it has none)."""
    for n, ax in self.logical:
      if n == name:
        return ax
    return None


def adapter_specs(w_spec: PartitionSpec | None, axes: Axes) -> tuple[PartitionSpec, PartitionSpec]:
  """The partition specs of ``a`` and ``b`` for a base kernel sharded as ``w_spec``.

  ``a`` (``stack + in + (r,)``) takes ``w_spec``'s entries on the stacked and
  input axes; ``b`` (``stack + (r,) + out``) takes them on the stacked and output
  axes; the rank axis is replicated in both. Shorter specs are padded with
  ``None`` as JAX does.

  Args:
    w_spec: the base kernel's spec (``None``: replicated).
    axes: the adapter's :class:`jlora.Axes` (``LoraWeight.axes``).

  Returns:
    ``(a_spec, b_spec)``.

  Raises:
    ShardingError: ``w_spec`` has more entries than the kernel has dimensions.

  Example:
    >>> from jlora import Axes
    >>> from jlora.sharding import P, adapter_specs
    >>> adapter_specs(P(None, "data", "model"), Axes(stack=(0,), inputs=(1,), outputs=(2,)))
    (P(None, 'data', None), P(None, None, 'model'))
  """
  return _adapter_specs("<kernel>", w_spec, axes)


def tree_specs(tree: Any, specs: Any, *, mesh: Mesh | None = None) -> Any:
  """Partition specs for every array of a (wrapped) tree; adapters follow their base.

  Args:
    tree: params, a wrapped tree, or one half of :func:`jlora.split` (arrays or
      ``jax.ShapeDtypeStruct``).
    specs: how to shard the base leaves, one of

      * a preset name (``"dp"``, ``"fsdp"``, ``"tp"``, ``"fsdp_tp"``; needs
        ``mesh``), see :func:`preset`;
      * a :class:`ShardingRules`;
      * a mapping ``{path or glob: PartitionSpec}`` over the base leaves' paths
        (``"layers/self_attn/q_proj/kernel"``); every key must match a leaf, the
        first matching key wins, unmatched leaves are replicated;
      * a pytree of ``PartitionSpec`` (or ``None`` for replicated) with the
        params' structure, or a spec tree this function returned.
    mesh: the mesh; when given every spec is checked against it (axes exist,
      dimensions divide). Required for a preset name.

  Returns:
    A tree with ``tree``'s structure whose leaves are ``PartitionSpec``:
    :class:`jlora.LoraWeight` nodes hold the specs of ``w``, ``a`` and ``b``, so
    ``jlora.split`` splits it like the tree.

  Raises:
    ShardingError: a mesh axis that does not exist, a dimension the mesh does
      not divide, a spec for a path that is not in the tree, a spec tree of
      another structure. The message names the leaf and the axis.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora.sharding import P, tree_specs
    >>> tree = jlora.wrap({"layers": {"kernel": jnp.ones((2, 8, 4))}},
    ...                   {"**/kernel": jlora.LoRA(2, stack_axes=1)}, key=jax.random.key(0))
    >>> s = tree_specs(tree, {"layers/kernel": P(None, "data", "model")})
    >>> s["layers"]["kernel"].w, s["layers"]["kernel"].a, s["layers"]["kernel"].b
    (P(None, 'data', 'model'), P(None, 'data', None), P(None, None, 'model'))
  """
  entries, treedef = _entries(tree)
  if isinstance(specs, str):
    if mesh is None:
      raise ShardingError(f"the preset {specs!r} is resolved against a mesh; pass mesh=...")
    specs = preset(specs, mesh)
  if isinstance(specs, ShardingRules):
    base = _logical_specs(entries, specs, mesh)
  elif isinstance(specs, Mapping) and _is_path_mapping(specs):
    base = _mapping_specs(entries, specs)
  else:
    base = _pytree_specs(entries, specs)
  out = []
  for (path, node), spec in zip(entries, base):
    out.append(_node_spec(path, node, spec))
  spec_tree = jax.tree_util.tree_unflatten(treedef, out)
  if mesh is not None:
    _check_tree(tree, spec_tree, mesh)
  return spec_tree


def shard(tree: Any, mesh: Mesh, specs: Any) -> Any:
  """Places ``tree`` on ``mesh``: every array gets its ``NamedSharding``.

  Works in one process and in multi-controller JAX (each process passes the
  same host values; it keeps only the shards its devices hold).

  Args:
    tree: params, a wrapped tree or one half of :func:`jlora.split`.
    mesh: the device mesh.
    specs: anything :func:`tree_specs` accepts (a preset name, rules, a
      ``{path: spec}`` mapping, a spec tree).

  Returns:
    The same tree with every array a ``jax.Array`` sharded on ``mesh``.

  Raises:
    ShardingError: as :func:`tree_specs`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora import sharding
    >>> mesh = sharding.make_mesh((len(jax.devices()),))
    >>> tree = jlora.wrap({"w": jnp.ones((8, 4))}, {"w": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> placed = sharding.shard(tree, mesh, {"w": sharding.P("data")})
    >>> placed["w"].a.sharding.spec
    P('data', None)
  """
  spec_tree = tree_specs(tree, specs, mesh=mesh)
  shardings = named_shardings(mesh, spec_tree)
  return jax.tree.map(_put, tree, shardings)


def named_shardings(mesh: Mesh, spec_tree: Any) -> Any:
  """Turns a tree of ``PartitionSpec`` into a tree of ``NamedSharding`` on ``mesh``.

  Example:
    >>> import jax
    >>> from jlora.sharding import P, make_mesh, named_shardings
    >>> mesh = make_mesh((len(jax.devices()),))
    >>> named_shardings(mesh, {"w": P("data")})["w"].spec
    P('data',)
  """
  return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def preset(name: str, mesh: Mesh, *, axes: Sequence[tuple[str, Sequence[str | None]]] | None = None
           ) -> ShardingRules:
  """Logical-axis rules of a sharding preset, resolved against ``mesh``'s axis names.

  Presets speak of two mesh axes, ``"data"`` and ``"model"`` (use
  :func:`make_mesh`); the logical names are those of :data:`LLAMA_AXES` and
  :data:`BERT_AXES`:

  ========== ======================================= ==========================================
  preset     batch split over                        base weights
  ========== ======================================= ==========================================
  ``dp``     every mesh axis                         replicated
  ``fsdp``   every mesh axis                         ``embed`` over every mesh axis (1/N each)
  ``tp``     ``data`` (when the mesh has it)         ``heads``, ``mlp``, ``vocab`` over ``model``
  ``fsdp_tp`` ``data``                               ``embed`` over ``data``; ``heads``, ``mlp``,
                                                     ``vocab`` over ``model``
  ========== ======================================= ==========================================

  ``vocab`` falls back to replicated when ``model`` does not divide it (BERT's
  30522). Stacked ``layers`` and norm scales are never sharded.

  Args:
    name: one of :data:`PRESETS`.
    mesh: the mesh the rules are for.
    axes: logical axis names per leaf glob; ``None``: the shipped model's table,
      found from the tree's paths.

  Returns:
    A :class:`ShardingRules`.

  Raises:
    ShardingError: an unknown preset, or a mesh without the axes the preset needs.

  Example:
    >>> import jax
    >>> from jlora.sharding import make_mesh, preset
    >>> mesh = make_mesh((len(jax.devices()),), "fsdp")
    >>> preset("fsdp", mesh).mesh_axes_of("embed")
    ('data',)
  """
  if name not in PRESETS:
    raise ShardingError(f"unknown sharding preset {name!r}; use one of {PRESETS}")
  names = tuple(mesh.axis_names)
  everything = names
  data = ("data",) if "data" in names else None
  model = ("model",) if "model" in names else None
  if name in ("tp", "fsdp_tp") and data is None and model is None:
    raise ShardingError(
        f"preset {name!r} shards over mesh axes named 'data' and 'model', but the mesh has "
        f"{names}; build it with jlora.sharding.make_mesh(shape, {name!r})")
  if name == "tp" and model is None:
    raise ShardingError(
        f"preset 'tp' shards the weights over a mesh axis named 'model', but the mesh has "
        f"{names}; build it with jlora.sharding.make_mesh(shape, 'tp')")
  tensor = ()
  if model is not None:
    tensor = (("heads", model), ("mlp", model), ("vocab", model), ("vocab", None))
  if name == "dp":
    logical, batch = (), everything
  elif name == "fsdp":
    logical, batch = (("embed", everything),), everything
  elif name == "tp":
    logical, batch = tensor, data
  else:
    logical = ((("embed", data),) if data else ()) + tensor
    batch = data
  return ShardingRules(logical=logical, batch=batch,
                       axes=None if axes is None else tuple((p, tuple(n)) for p, n in axes))


def make_mesh(shape: Sequence[int], preset: str | None = None, *,
              axis_names: Sequence[str] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A device mesh with automatic (GSPMD) axes, named for the presets.

  A 2-D mesh is ``("data", "model")``. A 1-D mesh is ``("model",)`` for the
  ``"tp"`` preset and ``("data",)`` otherwise. One entry of ``shape`` may be
  ``-1`` (the remaining devices).

  Args:
    shape: devices per mesh axis, e.g. ``(4, 2)``.
    preset: the preset it is for (only names a 1-D mesh's axis).
    axis_names: explicit names (required beyond 2 axes).
    devices: the devices (default ``jax.devices()``, every process's).

  Returns:
    A ``jax.sharding.Mesh`` whose axes are ``AxisType.Auto``.

  Raises:
    ShardingError: the shape does not use exactly the devices given.

  Example:
    >>> import jax
    >>> from jlora.sharding import make_mesh
    >>> make_mesh((len(jax.devices()),)).axis_names
    ('data',)
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape) or not shape:
    raise ShardingError(f"mesh shape {tuple(shape)} is invalid; use positive sizes and at most one -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ShardingError(f"mesh shape {tuple(shape)} does not fit {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ShardingError(
        f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, but there are "
        f"{len(devices)}; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before "
        "importing jax")
  if axis_names is None:
    if len(shape) == 1:
      axis_names = ("model",) if preset == "tp" else ("data",)
    elif len(shape) == 2:
      axis_names = ("data", "model")
    else:
      raise ShardingError(f"a {len(shape)}-D mesh needs axis_names=...")
  axis_names = tuple(axis_names)
  if len(axis_names) != len(shape):
    raise ShardingError(f"mesh shape {tuple(shape)} and axis_names {axis_names} differ in length")
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  try:
    return jax.make_mesh(tuple(shape), axis_names, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), axis_names, axis_types=auto)


def batch_spec(specs: str | ShardingRules | PartitionSpec, mesh: Mesh | None = None) -> PartitionSpec:
  """The spec of a batch's leading dimension under a preset or rules.

  Example:
    >>> from jlora.sharding import ShardingRules, batch_spec
    >>> batch_spec(ShardingRules(batch=("data", "model")))
    P(('data', 'model'),)
  """
  if isinstance(specs, PartitionSpec):
    return specs
  if isinstance(specs, str):
    if mesh is None:
      raise ShardingError(f"the preset {specs!r} is resolved against a mesh; pass mesh=...")
    specs = preset(specs, mesh)
  if not isinstance(specs, ShardingRules):
    raise ShardingError(
        f"batch_spec takes a preset name, ShardingRules or a PartitionSpec, got {type(specs).__name__}")
  if mesh is not None:
    for ax in specs.batch or ():
      if ax not in mesh.axis_names:
        raise ShardingError(
            f"the batch is split over mesh axis {ax!r}, which the mesh {tuple(mesh.axis_names)} "
            "does not have; use one of its axes or None")
  axes = specs.batch
  return P(axes[0] if axes and len(axes) == 1 else axes)


def model_axes(tree: Any) -> tuple[tuple[str, tuple[str | None, ...]], ...]:
  """The logical-axis table of the shipped model whose params ``tree`` holds.

  Raises:
    ShardingError: the tree is not a shipped model's (pass ``ShardingRules(axes=...)``).

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.sharding import LLAMA_AXES, model_axes
    >>> model_axes({"embed_tokens": {"embedding": jnp.zeros((4, 2))}}) is LLAMA_AXES
    True
  """
  entries, _ = _entries(tree)
  paths = [p for p, _ in entries]
  for fam in _families.FAMILIES.values():
    regex = compile_pattern(fam.marker)
    if any(regex.fullmatch(p) for p in paths):
      return fam.axes
  raise ShardingError(
      "cannot tell which model this tree belongs to (no 'embed_tokens/embedding' of "
      "jlora.models.llama, no 'embeddings/word_embeddings/embedding' of jlora.models.bert); "
      "give each leaf's logical axis names with ShardingRules(axes=[(glob, names), ...]), or "
      f"pass a {{path: PartitionSpec}} mapping. Paths: {paths[:5]}")


def per_device_bytes(tree: Any) -> dict[Any, int]:
  """Bytes of ``tree``'s arrays on each addressable device (replicas counted on each).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlora.sharding import P, make_mesh, per_device_bytes, shard
    >>> mesh = make_mesh((len(jax.devices()),))
    >>> n = len(jax.devices())
    >>> placed = shard({"w": jnp.ones((8 * n,))}, mesh, {"w": P("data")})
    >>> set(per_device_bytes(placed).values())
    {32}
  """
  out: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      for s in leaf.addressable_shards:
        out[s.device] = out.get(s.device, 0) + s.data.nbytes
  return out


# ----------------------------------------------------------------------------------------------
# Private helpers.


def _pairs(value, what: str) -> tuple:
  if isinstance(value, Mapping):
    value = tuple(value.items())
  try:
    pairs = tuple(value)
  except TypeError:
    raise ShardingError(f"{what} must be a sequence of pairs, got {value!r}") from None
  for p in pairs:
    if not (isinstance(p, (tuple, list)) and len(p) == 2):
      raise ShardingError(f"{what} must be a sequence of pairs, got the entry {p!r}")
  return tuple(tuple(p) for p in pairs)


def _norm_axes(ax, what: str) -> tuple[str, ...] | None:
  if ax is None:
    return None
  if isinstance(ax, str):
    return (ax,)
  if isinstance(ax, (tuple, list)) and all(isinstance(a, str) for a in ax):
    return tuple(ax) or None
  raise ShardingError(f"{what}: mesh axes must be a name, a tuple of names or None, got {ax!r}")


def _entries(tree) -> tuple[list[tuple[str, Any]], Any]:
  """(path, node) for every base leaf: arrays, adapter nodes and ``None`` halves."""
  is_leaf = lambda x: x is None or is_whole(x)  # noqa: E731
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_str(kp), x) for kp, x in flat], treedef


def _quant_specs(path: str, q: QuantizedArray, spec) -> QuantizedArray:
  """The children's specs of a quantised kernel sharded as ``spec`` (a spec of the kernel).

  Stacked axes keep their entries. The codes and scales are stored per output unit, blocks
  along its inputs, so they shard with the kernel's output axis (whole rows, so a block is
  never split) and the second-level scales of NF4's double quantisation are replicated. A
  sharded input axis cannot cut the packed rows: those children are replicated along it.
  """
  if isinstance(spec, QuantizedArray):
    return spec
  e = _spec_entries(path, P() if spec is None else spec, q.ndim)
  ax = q.axes
  stack = [e[i] for i in ax.stack]
  outs = [e[i] for i in ax.outputs if e[i] is not None]
  out_e = outs[0] if len(outs) == 1 and len(ax.outputs) == 1 else None
  if q.spec.kind == "int8":
    in_e = e[ax.inputs[0]] if len(ax.inputs) == 1 else None
    data, absmax = P(*stack, out_e, in_e), P(*stack, out_e)
  else:
    data = absmax = P(*stack, out_e)
  offset = None
  if q.offset is not None:
    offset = absmax if q.spec.kind == "q4_1" else P(*stack)
  absmax2 = None if q.absmax2 is None else P(*stack, None)
  return QuantizedArray(data, absmax, absmax2, offset, spec=q.spec, axes=q.axes, shape=q.shape,
                        dtype=q.dtype)


def _base_shape(node) -> tuple[int, ...] | None:
  """The base kernel's shape (adapters keep it as static data, also in the trainable half)."""
  if node is None:
    return None
  if is_adapted(node):
    return None if all(getattr(node, n) is None for n in node.children()) else tuple(node.shape)
  return tuple(node.shape) if hasattr(node, "shape") else None


def _spec_entries(path: str, spec, ndim: int) -> list:
  if spec is None:
    spec = P()
  if not isinstance(spec, PartitionSpec):
    raise ShardingError(
        f"{path!r}: the spec {spec!r} is not a jax.sharding.PartitionSpec; write e.g. "
        "P(None, 'model')")
  entries = list(spec)
  if len(entries) > ndim:
    raise ShardingError(
        f"{path!r}: the spec {spec} has {len(entries)} entries but the leaf has {ndim} "
        "dimensions; give one entry per dimension")
  return entries + [None] * (ndim - len(entries))


def _adapter_specs(path: str, w_spec, axes: Axes) -> tuple[PartitionSpec, PartitionSpec]:
  """The specs of LoRA's ``a`` and ``b`` on a base sharded as ``w_spec`` (rank axis replicated)."""
  e = _spec_entries(path, w_spec, len(axes.order))
  return tuple(P(*[None if i is None else e[i] for i in lay]) for lay in factor_layouts(axes))


def _node_spec(path: str, node, spec):
  """The spec (tree) for one entry, given its base spec or a spec node."""
  if node is None:
    return None
  if is_adapted(node):
    given = spec if isinstance(spec, Adapter) else None
    w_spec = given.w if given is not None else spec
    w_spec = P() if w_spec is None else w_spec
    if isinstance(w_spec, QuantizedArray):  # a spec tree built by tree_specs: use it as it is
      return node.replace(**{n: (None if getattr(node, n) is None else getattr(given, n))
                             for n in node.children()})
    e = _spec_entries(path, w_spec, node.ndim)
    out = {"w": _quant_specs(path, node.w, w_spec) if is_quantized(node.w) else w_spec}
    for name, layout in node.layouts().items():
      kept = getattr(given, name, None) if given is not None else None
      out[name] = kept if kept is not None else P(*[None if i is None else e[i] for i in layout])
    return node.replace(**{n: (None if getattr(node, n) is None else out.get(n, P()))
                           for n in node.children()})
  if isinstance(spec, Adapter):
    raise ShardingError(f"{path!r}: the spec tree holds an adapter here but the tree a plain leaf")
  if is_quantized(node):
    return _quant_specs(path, node, spec)
  return P() if spec is None else spec


def _is_path_mapping(specs: Mapping) -> bool:
  return bool(specs) and all(
      isinstance(k, (str, re.Pattern)) and (v is None or isinstance(v, PartitionSpec))
      for k, v in specs.items())


def _mapping_specs(entries, specs: Mapping) -> list:
  paths = [p for p, _ in entries]
  compiled = [(k.pattern if isinstance(k, re.Pattern) else k, compile_pattern(k), v)
              for k, v in specs.items()]
  used = set()
  out = []
  for path in paths:
    spec = None
    for name, regex, v in compiled:
      if regex.fullmatch(path):
        spec = v
        used.add(name)
        break
    out.append(spec)
  for name, regex, _ in compiled:
    if name not in used:
      if any(regex.fullmatch(p) for p in paths):
        continue  # matched, but an earlier key took every leaf it matches
      raise ShardingError(
          f"a spec is given for the path {name!r}, which is not in the tree; closest paths: "
          f"{closest_paths(name, paths)}. Keys are the base leaves' '/'-joined paths (or globs), "
          "e.g. 'layers/self_attn/q_proj/kernel', not the adapters' '.../a' and '.../b'")
  return out


def _pytree_specs(entries, specs) -> list:
  is_leaf = lambda x: x is None or isinstance(x, PartitionSpec) or is_whole(x)  # noqa: E731
  try:
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_leaf)[0]
  except Exception as e:  # pragma: no cover - exotic containers
    raise ShardingError(f"cannot read the specs {type(specs).__name__} as a pytree: {e}") from None
  spec_paths = [path_str(kp) for kp, _ in flat]
  paths = [p for p, _ in entries]
  if spec_paths != paths:
    extra = [p for p in spec_paths if p not in set(paths)]
    missing = [p for p in paths if p not in set(spec_paths)]
    if extra:
      raise ShardingError(
          f"a spec is given for the path {extra[0]!r}, which is not in the tree; closest paths: "
          f"{closest_paths(extra[0], paths)}")
    if missing:
      raise ShardingError(
          f"the spec tree has no entry for the leaf {missing[0]!r}; give the spec tree the "
          "params' structure (None or P() for replicated), or pass a {path: spec} mapping")
    raise ShardingError("the spec tree lists the tree's leaves in another order; build it with "
                        "jax.tree.map over the params")
  for (path, node), (_, s) in zip(entries, flat):
    if s is not None and not isinstance(s, (PartitionSpec, Adapter, QuantizedArray)):
      raise ShardingError(
          f"{path!r}: the spec {s!r} is not a jax.sharding.PartitionSpec; write e.g. P(None, 'model')")
  return [s for _, s in flat]


def _logical_specs(entries, rules: ShardingRules, mesh: Mesh | None) -> list:
  if not rules.logical:  # nothing is sharded (e.g. "dp"): any tree will do
    return [None if _base_shape(node) is None else P() for _, node in entries]
  table = rules.axes if rules.axes is not None else _model_axes_of_entries(entries)
  compiled = [(pattern, compile_pattern(pattern), names) for pattern, names in table]
  out = []
  for path, node in entries:
    shape = _base_shape(node)
    if shape is None:
      out.append(None)
      continue
    names = None
    for _, regex, n in compiled:
      if regex.fullmatch(path):
        names = n
        break
    if names is None:
      out.append(P())
      continue
    if len(names) != len(shape):
      raise ShardingError(
          f"{path!r} has shape {shape} ({len(shape)} dimensions) but its logical axes are "
          f"{names}; give one logical name (or None) per dimension in ShardingRules.axes")
    out.append(_resolve(path, shape, names, rules, mesh))
  return out


def _model_axes_of_entries(entries):
  paths = [p for p, _ in entries]
  for fam in _families.FAMILIES.values():
    regex = compile_pattern(fam.marker)
    if any(regex.fullmatch(p) for p in paths):
      return fam.axes
  return model_axes({p: None for p in paths})  # raises with the message


def _resolve(path: str, shape, names, rules: ShardingRules, mesh: Mesh | None) -> PartitionSpec:
  used: set[str] = set()
  entries = []
  for dim, (size, name) in enumerate(zip(shape, names)):
    choice = None
    if name is not None:
      candidates = [ax for n, ax in rules.logical if n == name]
      undivided = None
      for ax in candidates:
        if ax is None:
          choice = None
          break
        if mesh is not None:
          missing = [a for a in ax if a not in mesh.shape]
          if missing:
            raise ShardingError(
                f"{path!r}: dimension {dim} (logical axis {name!r}) maps to mesh axis "
                f"{missing[0]!r}, which the mesh {tuple(mesh.axis_names)} does not have; map "
                f"{name!r} to one of {tuple(mesh.axis_names)} or None")
        if used & set(ax):
          continue
        if mesh is not None:
          n = math.prod(mesh.shape[a] for a in ax)
          if size % n:
            undivided = (ax, n)
            continue
        choice = ax
        break
      else:
        if undivided is not None:
          ax, n = undivided
          raise ShardingError(
              f"{path!r}: dimension {dim} (logical axis {name!r}) has size {size}, which mesh "
              f"axes {ax} (size {n}) do not divide; add a fallback rule ({name!r}, None) after it, "
              "or pick a mesh shape that divides it")
    if choice is not None:
      used.update(choice)
      entries.append(choice[0] if len(choice) == 1 else choice)
    else:
      entries.append(None)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def _check_tree(tree, spec_tree, mesh: Mesh) -> None:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  specs = jax.tree.leaves(spec_tree)
  for (kp, leaf), spec in zip(leaves, specs, strict=True):
    if hasattr(leaf, "shape"):
      _check_spec(path_str(kp), tuple(leaf.shape), spec, mesh)


def _check_spec(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
  """Raises :class:`ShardingError` unless ``spec`` shards an array of ``shape`` on ``mesh``."""
  entries = _spec_entries(path, spec, len(shape))
  seen: dict[str, int] = {}
  for dim, (size, entry) in enumerate(zip(shape, entries)):
    if entry is None or entry is P.UNCONSTRAINED:
      continue
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    for name in names:
      if name not in mesh.shape:
        raise ShardingError(
            f"{path!r}: dimension {dim} (size {size}) is sharded over mesh axis {name!r}, which "
            f"the mesh {dict(mesh.shape)} does not have; use one of {tuple(mesh.axis_names)} or "
            "None")
      if name in seen:
        raise ShardingError(
            f"{path!r}: mesh axis {name!r} shards both dimension {seen[name]} and dimension "
            f"{dim}; a mesh axis may shard one dimension of a leaf")
      seen[name] = dim
    n = math.prod(mesh.shape[a] for a in names)
    if size % n:
      raise ShardingError(
          f"{path!r}: dimension {dim} has size {size}, which mesh axis "
          f"{names[0] if len(names) == 1 else names!r} (size {n}) does not divide; shard another "
          f"dimension, replicate this one (None), or use a mesh whose axis size divides {size}")


def _put(x, sharding: NamedSharding):
  if isinstance(x, jax.Array):
    if not x.is_fully_addressable or len(x.sharding.device_set) > 1:
      return jax.device_put(x, sharding)  # already spread out: reshard on the devices
    x = np.asarray(x)  # one device (a freshly loaded or initialised leaf): scatter from the host
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
