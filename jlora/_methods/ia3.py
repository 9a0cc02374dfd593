"""(IA)^3: a frozen kernel whose outputs (or inputs) are scaled by a trained vector ``l``.

``IA3()`` stands for ``W * l`` along the kernel's output axes, so ``x @ (W * l) = (x @ W) * l``
(PEFT's IA3 on a module not in ``feedforward_modules``); ``IA3(feedforward=True)`` scales the
input axes instead, ``(x * l) @ W`` (PEFT's ``feedforward_modules``). ``l`` starts at ones, so
wrapping changes nothing. :func:`jlora.lora` never forms ``W * l``: the contraction runs on the
frozen ``W`` and ``l`` scales its output (or its input).

PEFT's format (``peft_type: "IA3"``): per adapted torch Linear ``M`` one tensor
``base_model.model.M.ia3_l``, of shape ``(out, 1)``, or ``(1, in)`` for a feed-forward module.
PEFT scales a Linear's whole output, bias included; jlora's bias is its own leaf, so
:func:`jlora.load_peft` gives the bias of an output-scaled module its own IA3 leaf (a vector
scaled along its outputs: ``IA3(in_axes=(), out_axes=(-1,))``) holding a copy of ``l``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _peft
from jlora._adapter import (
    Adapter, AdapterSpec, Axes, acc_dtype, group_shapes, infer_axes, is_adapted, register,
    vector_to_kernel,
)
from jlora._errors import AxesError, CheckpointError, SpecError, TreeError
from jlora._lazy import from_kernel
from jlora._methods.lora import adapter_dtype, check_float, is_array

__all__ = ["IA3", "IA3Weight"]

#: Added to ``l`` before dividing in :meth:`IA3Weight.unmerged`, as PEFT's ``unmerge`` does.
EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class IA3(AdapterSpec):
  """The spec of (IA)^3: a trained vector ``l`` scaling a frozen kernel's outputs or inputs.

  ``IA3()`` on a kernel ``W`` computes ``y = (x @ W) * l`` with ``l`` of shape
  ``stack + out``; ``IA3(feedforward=True)`` computes ``y = (x * l) @ W`` with
  ``l`` of shape ``stack + in``. ``l`` starts at ones (PEFT's
  ``init_ia3_weights=True``), so a freshly wrapped tree computes what the
  original did.

  Attributes:
    feedforward: scale the kernel's inputs instead of its outputs (PEFT's
      ``feedforward_modules``, e.g. Llama's ``down_proj``).
    dtype: ``l``'s dtype; default float32 (float64 for a float64 base).
    stack_axes: how many leading kernel axes are stacked layers (scanned
      models keep ``(L, in, out)`` kernels); each layer gets its own vector.
    in_axes: the kernel axes contracted with the input (DenseGeneral / Einsum);
      inferred for 2-D kernels. ``()`` (with ``out_axes``) scales a leaf that
      has no input axes, e.g. a bias along its outputs, as PEFT's IA3 scales a
      Linear's bias with its output.
    out_axes: the kernel axes produced, e.g. ``(1, 2)`` for a
      ``(d, heads, head_dim)`` kernel.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((4, 3))}, "mlp": {"kernel": jnp.ones((3, 2))}}
    >>> tree = jlora.wrap(params, {"dense/kernel": jlora.IA3(),
    ...                            "mlp/kernel": jlora.IA3(feedforward=True)}, key=jax.random.key(0))
    >>> tree["dense"]["kernel"].l.shape, tree["mlp"]["kernel"].l.shape
    ((3,), (3,))
  """

  feedforward: bool = False
  dtype: Any = None
  stack_axes: int | None = None
  in_axes: tuple[int, ...] | None = None
  out_axes: tuple[int, ...] | None = None

  def __post_init__(self):
    if not isinstance(self.feedforward, (bool, np.bool_)):
      raise SpecError(f"IA3 feedforward must be True or False, got {self.feedforward!r}")
    object.__setattr__(self, "feedforward", bool(self.feedforward))
    if self.dtype is not None:
      dt = np.dtype(self.dtype)
      if not np.issubdtype(dt, np.floating) and dt.name != "bfloat16":
        raise SpecError(f"IA3 dtype must be a floating dtype, got {dt}")
      object.__setattr__(self, "dtype", dt.name)
    if self.stack_axes is not None and (isinstance(self.stack_axes, bool) or not isinstance(
        self.stack_axes, int) or self.stack_axes < 0):
      raise SpecError(f"IA3 stack_axes must be a non-negative int, got {self.stack_axes!r}")
    for name in ("in_axes", "out_axes"):
      v = getattr(self, name)
      if v is not None:
        object.__setattr__(self, name, (v,) if isinstance(v, int) else tuple(int(x) for x in v))
    if (self.in_axes is None) != (self.out_axes is None):
      raise SpecError("give IA3 in_axes and out_axes together (or neither, to infer them)")
    if self.out_axes == ():
      raise SpecError("IA3 out_axes must name at least one axis")
    if self.in_axes == () and self.feedforward:
      raise SpecError("IA3(feedforward=True) scales the kernel's inputs, so in_axes cannot be empty")

  def adapt(self, path: str, leaf: Any, key: jax.Array) -> Any:
    if not is_array(leaf):
      return leaf
    check_float(path, leaf, "IA3")
    shape = tuple(leaf.shape)
    if self.in_axes is None and len(shape) - (self.stack_axes or 0) < 2:
      raise SpecError(
          f"IA3 rule targets {path!r}, a leaf of shape {shape} with no input and output axes; IA3 "
          "scales a kernel's outputs (or inputs, feedforward=True). Narrow the rule's pattern "
          "(e.g. '**/kernel'), or, to scale a bias as PEFT scales a Linear's bias with its output, "
          "ask for it explicitly: IA3(in_axes=(), out_axes=(-1,))")
    axes = infer_axes(path, shape, self)
    side = axes.inputs if self.feedforward else axes.outputs
    l_shape = tuple(shape[i] for i in axes.stack + side)
    return IA3Weight(leaf, jnp.ones(l_shape, adapter_dtype(self, leaf.dtype)), spec=self, axes=axes)


@register
class IA3Weight(Adapter):
  """A frozen base ``w`` and a trainable vector ``l`` that scales its outputs (or inputs).

  ``l`` has shape ``stack + out`` (``stack + in`` with ``feedforward=True``),
  its axes in the order of the kernel :class:`jlora.Axes`. A leaf without input
  axes (a bias, ``IA3(in_axes=(), out_axes=(-1,))``) is simply ``w * l``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.ones((2, 3))}, {"k": jlora.IA3()}, key=jax.random.key(0))
    >>> tree["k"] = tree["k"].replace(l=jnp.array([1.0, 2.0, 3.0]))
    >>> jlora.merge(tree)["k"]
    Array([[1., 2., 3.],
           [1., 2., 3.]], dtype=float32)
    >>> x = jnp.ones((1, 2))
    >>> jlora.lora(lambda p, x: x @ p["k"])(tree, x)
    Array([[2., 4., 6.]], dtype=float32)
  """

  kind = "ia3"
  spec_type = IA3
  frozen = ("w",)
  trainable = ("l",)

  def __init__(self, w=None, l=None, *, spec: IA3, axes: Axes, shape=None):  # noqa: E741
    super().__init__(w=w, l=l, spec=spec, axes=axes, shape=shape)

  @property
  def feedforward(self) -> bool:
    return self.spec.feedforward

  def _side(self) -> tuple[int, ...]:
    return self.axes.inputs if self.feedforward else self.axes.outputs

  def scaling(self) -> jax.Array:
    """``l`` reshaped to broadcast against the kernel."""
    self.require("scaling", "l")
    return vector_to_kernel(self.l, self.axes, "in" if self.feedforward else "out", self.ndim)

  def layouts(self):
    return {"l": self.axes.stack + self._side()}

  def merged(self):
    """``w * l`` along the output (or input) axes, in float32 (float64), cast to ``w``'s dtype."""
    self.require("merge")
    w = jax.lax.stop_gradient(self.w)
    acc = jnp.promote_types(acc_dtype(w.dtype), acc_dtype(self.l.dtype))
    return (w.astype(acc) * self.scaling().astype(acc)).astype(w.dtype)

  def unmerged(self, merged):
    """``merged / (l + 1e-8)``: PEFT's ``unmerge`` adds 1e-8 so a zero in ``l`` gives no inf
    (a base row or column that ``l`` zeroed cannot come back: it is lost in the merge)."""
    acc = jnp.promote_types(acc_dtype(merged.dtype), acc_dtype(self.l.dtype))
    return (merged.astype(acc) / (self.scaling().astype(acc) + EPS)).astype(merged.dtype)

  def lazy(self, path):
    if not self.axes.inputs:
      return None  # a bias is added, not contracted: its value is w * l itself
    if self.feedforward:
      return from_kernel(self.w, self.axes, [], u=self.l, path=path)
    return from_kernel(self.w, self.axes, [], v=self.l, path=path)


# ---------------------------------------------------------------------------------------------
# PEFT's IA3 format.

_KEY = "ia3_l"
# Config fields that change what the adapter computes and that jlora does not implement.
_UNSUPPORTED = {"fan_in_fan_out": (False, None)}


def _validate(config: dict, f: str) -> None:
  if "target_modules" not in config:
    raise CheckpointError(f"{f} lacks the required field(s) ['target_modules']; re-save the adapter "
                          "with PEFT, or add it")
  for field in ("target_modules", "feedforward_modules"):
    v = config.get(field)
    names = isinstance(v, list) and all(isinstance(t, str) for t in v)
    if not (v is None or isinstance(v, str) or names):
      raise CheckpointError(f"{f}: {field} must be a list of names, a regex string or null, got {v!r}")
  tm, ff = config.get("target_modules"), config.get("feedforward_modules")
  if isinstance(tm, list) and isinstance(ff, list) and not set(ff) <= set(tm):
    raise CheckpointError(f"{f}: feedforward_modules {ff} must be a subset of target_modules {tm} "
                          "(as PEFT requires)")
  if isinstance(ff, str):
    try:
      re.compile(ff)
    except re.error as e:
      raise CheckpointError(f"{f}: feedforward_modules {ff!r} is not a valid regex: {e}") from None
  for field, ok in _UNSUPPORTED.items():
    if field in config and config[field] not in ok:
      raise CheckpointError(f"{f}: {field}={config[field]!r} is not supported by jlora (it reads IA3 "
                            f"on torch Linear layers: {field} must be {ok[0]!r})")
  init = config.get("init_ia3_weights", True)
  if not isinstance(init, bool):
    raise CheckpointError(f"{f}: init_ia3_weights must be true or false, got {init!r}")
  mts = config.get("modules_to_save")
  if mts is not None and not (isinstance(mts, list) and all(isinstance(x, str) for x in mts)):
    raise CheckpointError(f"{f}: modules_to_save must be a list of module names or null, got {mts!r}")


def _feedforward_by_config(config: dict, torch_module: str) -> bool | None:
  """Whether PEFT treats ``torch_module`` as feed-forward (as IA3Model matches), None if unsaid."""
  ff = config.get("feedforward_modules")
  if ff is None:
    return None
  if isinstance(ff, str):
    return re.fullmatch(ff, torch_module) is not None
  return any(torch_module.endswith(t) for t in ff)


def _leaf_named(m, module: str, index, pname: str, transpose: bool | None = None) -> str | None:
  """The leaf of ``module`` that the mapping gives torch parameter ``pname``, if the params have it."""
  for k, (pn, tr) in m.leaves.items():
    path = f"{module}/{k}" if module else k
    if pn == pname and transpose in (None, tr) and path in index:
      return path
  return None


def _load(config, tensors, params, m, where):
  leaves, treedef, index = _peft._plain_leaves(params)
  adapter, full = _peft._sort_tensors(where, config, tensors, m, index, (_KEY,))
  if not adapter:
    raise CheckpointError(f"{where} holds no {_KEY} tensors")
  by_module: dict[str, dict] = {}
  for torch_module, _, module, layer, value in adapter:
    slot = by_module.setdefault(module, {"torch": torch_module, "layers": {}})
    slot["layers"][layer] = (torch_module, value)
  out = list(leaves)
  adapted = set()
  for module, slot in by_module.items():
    path = _leaf_named(m, module, index, "weight", True)
    if path is None:
      other = _leaf_named(m, module, index, "weight")
      what = (f"an Embedding ({other!r})" if other else "no kernel leaf the params have")
      raise CheckpointError(
          f"{where}: PEFT's IA3 on torch module {slot['torch']!r} maps to jlora module {module!r}, "
          f"which has {what}; jlora reads IA3 on Linear layers (kernel leaves) only: is the adapter "
          "for this model (mapping=...)?")
    w = leaves[index[path]]
    stacked = m.stacked(module)
    try:
      axes = infer_axes(path, tuple(w.shape), IA3(stack_axes=1 if stacked else None))
    except AxesError as e:
      raise CheckpointError(
          f"{where}: cannot place the IA3 vector of {slot['torch']!r} on {path!r}: {e}") from None
    stack, ins, outs = group_shapes(tuple(w.shape), axes)
    n_in, n_out = math.prod(ins), math.prod(outs)
    ffs = set()
    for layer, (name, value) in slot["layers"].items():
      shape = tuple(value.shape)
      fits = [ff for ff, want in ((False, (n_out, 1)), (True, (1, n_in))) if shape == want]
      if not fits:
        raise CheckpointError(
            f"{where}: {name}.{_KEY} has shape {shape}, but {path!r} of shape "
            f"{tuple(w.shape)} needs ({n_out}, 1), or (1, {n_in}) in feedforward_modules (a Conv "
            "or Embedding IA3, which jlora does not read, has other shapes); is the adapter for "
            "this model?")
      said = _feedforward_by_config(config, name)
      ff = fits[0] if len(fits) == 1 else bool(said)
      if said is not None and said != ff:
        raise CheckpointError(
            f"{where}: {name}.{_KEY} has shape {shape} ({'' if ff else 'not '}feed-forward) but "
            f"feedforward_modules {config.get('feedforward_modules')!r} says it is"
            f"{'' if said else ' not'}; the file and {_peft.CONFIG_NAME} disagree")
      if stacked and not 0 <= layer < stack[0]:
        raise CheckpointError(f"{where}: layer {layer} of {slot['torch']!r} is outside the params' "
                              f"{stack[0]} layers; is the adapter for this model?")
      ffs.add(ff)
    if len(ffs) > 1:
      raise CheckpointError(f"{where}: the layers of {slot['torch']!r} mix feed-forward and output "
                            "IA3 vectors; jlora keeps one kind per stacked module")
    ff = ffs.pop()
    dtype = jnp.result_type(next(iter(slot["layers"].values()))[1].dtype)
    spec_dtype = None if dtype == adapter_dtype(IA3(), w.dtype) else jnp.dtype(dtype).name
    side = ins if ff else outs
    l = np.ones(stack + side, dtype)  # noqa: E741 - layers PEFT left out scale by one
    for layer, (_, value) in slot["layers"].items():
      l[(layer,) if stacked else ()] = value.astype(dtype).reshape(side)
    spec = IA3(feedforward=ff, dtype=spec_dtype, stack_axes=1 if stacked else None)
    out[index[path]] = IA3Weight(w, jnp.asarray(l), spec=spec, axes=axes)
    adapted.add(path)
    bias = None if ff else _leaf_named(m, module, index, "bias")
    if bias is not None:  # PEFT scales the Linear's bias with its output
      b = leaves[index[bias]]
      if tuple(b.shape) != stack + outs:
        raise CheckpointError(f"{where}: bias {bias!r} of shape {tuple(b.shape)} does not fit the "
                              f"outputs {stack + outs} of {path!r}")
      bspec = IA3(dtype=spec_dtype, in_axes=(), out_axes=tuple(range(-len(outs), 0)))
      baxes = infer_axes(bias, tuple(b.shape), bspec)
      out[index[bias]] = IA3Weight(b, jnp.asarray(l.copy()), spec=bspec, axes=baxes)
      adapted.add(bias)
  _peft._place_full(where, full, m, leaves, index, out, adapted)
  return jax.tree_util.tree_unflatten(treedef, out)


def _save(tree, m):
  tensors: dict[str, np.ndarray] = {}
  kernels: dict[str, tuple[str, IA3Weight]] = {}  # jlora module -> (path, kernel leaf)
  vectors: dict[str, tuple[str, IA3Weight]] = {}  # jlora module -> (path, bias leaf)
  full_modules: list[str] = []
  for path, node in _peft._adapted(tree):
    module, leaf = _peft._split_path(path)
    if module not in m.modules:
      raise CheckpointError(
          f"the mapping has no torch name for jlora module {module!r} (of adapted leaf {path!r}); "
          f"add it: PeftMapping({{{module!r}: 'torch.module.name', ...}})")
    if node.kind == "full":
      if module not in full_modules:
        full_modules.append(module)
      continue
    if node.kind != "ia3":
      raise SpecError(f"{path!r} is a {type(node).__name__}; PEFT's IA3 format holds IA3 vectors "
                      "and modules_to_save only")
    if node.l is None:
      raise TreeError(f"the IA3 leaf at {path!r} lacks its vector l; pass the whole tree")
    pname, transpose = m.leaves.get(leaf, (None, None))
    if not node.axes.inputs:
      if pname != "bias":
        raise SpecError(f"IA3 on {path!r} (a leaf without input axes) has no place in PEFT's IA3 "
                        "format, which scales Linear layers; only a Linear's bias follows its output")
      vectors[module] = (path, node)
      continue
    if (pname, transpose) != ("weight", True):
      raise SpecError(f"IA3 on {path!r}: jlora writes PEFT IA3 for torch Linear weights ('kernel' "
                      "leaves) only; name the leaf in PeftMapping.leaves")
    stacked = m.stacked(module)
    if len(node.axes.stack) != (1 if stacked else 0):
      raise SpecError(
          f"IA3 on {path!r} has {len(node.axes.stack)} stacked axes but the mapping names it "
          f"{m.modules[module]!r} ({'one layer axis' if stacked else 'no layer axis'}); wrap it with "
          f"stack_axes={1 if stacked else 'None'} or fix the mapping")
    if module in kernels:
      raise SpecError(f"two IA3 kernels under torch module {m.modules[module]!r}; PEFT has one "
                      "per module")
    kernels[module] = (path, node)
    for i, part in _peft._layers(_peft._host(node.l), stacked):
      vec = part.reshape((1, -1) if node.feedforward else (-1, 1))
      tensors[f"{_peft._PREFIX}{m.to_torch(module, i)}.{_KEY}"] = np.ascontiguousarray(vec)
  leaves_by_module = _peft._leaves_by_module(tree)
  _check_biases(kernels, vectors, leaves_by_module, m)
  if not kernels:
    raise SpecError("PEFT's IA3 format needs at least one IA3 kernel (target_modules)")
  clash = sorted(set(kernels) & set(full_modules))
  if clash:
    raise SpecError(f"module {clash[0]!r} is both IA3-adapted and trained in full; PEFT cannot "
                    "save a module in target_modules and modules_to_save at once")
  _peft._full_tensors(full_modules, m, leaves_by_module, tensors)
  short = _peft._short_names(m, leaves_by_module)
  ff = {mod for mod, (_, node) in kernels.items() if node.feedforward}
  config = {
      "peft_type": "IA3",
      "target_modules": _peft._target_modules(set(kernels), m, short),
      "feedforward_modules": _feedforward_modules(ff, m, short),
      "modules_to_save": _peft._modules_to_save(full_modules, m, leaves_by_module),
      "init_ia3_weights": True,
      "fan_in_fan_out": False,
      "inference_mode": True,
      "exclude_modules": None,
  }
  return config, tensors


def _check_biases(kernels: dict, vectors: dict, leaves_by_module: dict, m) -> None:
  """PEFT scales an output-scaled Linear's bias by the same ``l``: the tree must do the same."""
  for module, (bpath, b) in vectors.items():
    if module not in kernels or kernels[module][1].feedforward:
      raise SpecError(
          f"IA3 on the bias {bpath!r} without an output-scaled IA3 kernel beside it: PEFT scales a "
          "bias only with its Linear's output; remove the bias rule or add IA3() on the kernel")
    kpath, k = kernels[module]
    if tuple(b.l.shape) != tuple(k.l.shape) or not np.array_equal(_peft._host(b.l), _peft._host(k.l)):
      raise SpecError(
          f"the IA3 vector of the bias {bpath!r} differs from its kernel's {kpath!r}: PEFT holds one "
          "vector per Linear that scales both, jlora trains them as two (load_peft makes them equal, "
          "training moves them apart). Set both to one value (e.g. the kernel's), or export the "
          "merged model with jlora.export_merged")
  for module, (kpath, k) in kernels.items():
    if k.feedforward or module in vectors:
      continue
    for leaf, x in leaves_by_module[module]:
      if m.leaves.get(leaf, ("",))[0] == "bias" and not is_adapted(x) and np.any(_peft._host(x)):
        raise SpecError(
            f"IA3 on {kpath!r} scales x @ W only, but PEFT's IA3 scales the Linear's whole output, "
            f"its bias {module}/{leaf} included, so PeftModel would compute something else. Wrap the "
            "bias too, with IA3(in_axes=(), out_axes=(-1,)) (its vector must equal the kernel's "
            "when saving), or export the merged model with jlora.export_merged")


def _feedforward_modules(chosen: set[str], m, short: dict[str, str]) -> list[str] | str:
  """PEFT's ``feedforward_modules`` (matched by plain suffix): short names when they select
  exactly ``chosen`` among the tree's known modules, else a full-match regular expression."""
  wanted = {short[c] for c in chosen}
  names = {mod: m.modules[mod].replace("{i}", "0") for mod in short}
  if {mod for mod, n in names.items() if any(n.endswith(s) for s in wanted)} == set(chosen):
    return sorted(wanted)
  return "|".join(f"(?:{m.regex(c)})" for c in sorted(chosen))


_peft.register_codec(_peft.PeftCodec("IA3", ("ia3",), _validate, _load, _save))
