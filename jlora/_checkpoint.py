"""Adapter-only checkpoints: ``save_adapters`` / ``load_adapters`` on Orbax.

An adapter checkpoint is a directory::

  <path>/arrays/               an Orbax PyTree checkpoint of the adapter arrays only
  <path>/jlora_adapters.json   manifest, written last: format version, jlora version, one
                               entry per adapted leaf (path, kind, realised spec, axes, rule
                               name, shapes, dtypes, sha256 of every array), the rule names,
                               a fingerprint of the base, the size and sha256 of every file
                               under arrays/, and the user's metadata

Array keys inside ``arrays/`` are synthetic (``e00000/a``), so no name from the
params tree ever becomes a file name. Loading checks every file against the
manifest before Orbax reads it and every restored array against its sha256,
so corruption is an error, never silently wrong adapters. The base is never written: a checkpoint
costs the adapter bytes plus a few kilobytes of metadata.

The whole directory is written to a temporary sibling, fsynced and renamed into
place, so a failed or interrupted save leaves any existing checkpoint as it was
and nothing half-written under ``path``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._errors import CheckpointError, JloraError, TreeError
from jlora._quant import is_quantized, is_whole
from jlora._paths import path_str
from jlora._adapter import Axes, is_adapted, leaf_class
from jlora._adapter import spec_from_json as _spec_from_json
from jlora._adapter import spec_to_json as _spec_to_json

__all__ = ["save_adapters", "load_adapters", "fingerprint", "read_adapter_manifest"]

FORMAT = "jlora.adapters"
FORMAT_VERSION = 1
MANIFEST = "jlora_adapters.json"
ARRAYS = "arrays"
FINGERPRINT_ALGORITHM = "jlora-fingerprint-v1"
DEFAULT_SAMPLES = 64


def save_adapters(path: str | os.PathLike, tree: Any, *, metadata: dict | None = None,
                  overwrite: bool = False) -> Path:
  """Saves the adapters of a wrapped tree (never its base) as an Orbax checkpoint.

  Writes the adapter arrays (``a``/``b`` of every :class:`jlora.LoraWeight`, the
  trained array of every :class:`jlora.FullWeight`) with Orbax, plus a JSON
  manifest with each adapted path's realised spec and axes (so loading needs
  no rules object, even when the rules were a callable), the rule names, a
  :func:`fingerprint` of the frozen base, the jlora version and ``metadata``.
  The write is atomic: on any error nothing appears at ``path`` and an
  existing checkpoint there is left untouched.

  Args:
    path: the checkpoint directory to create.
    tree: the whole wrapped tree (``jlora.combine(trainable, frozen)`` if you
      hold the halves); its base is read only to fingerprint it.
    metadata: optional JSON-serialisable dict stored with the checkpoint
      (returned by :func:`read_adapter_manifest`).
    overwrite: replace an existing checkpoint at ``path`` (atomically).

  Returns:
    The checkpoint directory.

  Raises:
    TreeError: the tree has no adapters, or lacks its base (a ``split`` half).
    CheckpointError: ``path`` exists and ``overwrite`` is False, ``metadata`` is
      not JSON-serialisable, or the write failed (disk full, permissions); the
      message says what, and that nothing was changed.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile, os
    >>> params = {"dense": {"kernel": jnp.ones((16, 8))}}
    >>> tree = jlora.wrap(params, {"**/kernel": jlora.LoRA(4)}, key=jax.random.key(0))
    >>> d = jlora.save_adapters(os.path.join(tempfile.mkdtemp(), "adapters"), tree)
    >>> restored = jlora.load_adapters(d, params)
    >>> bool(jnp.array_equal(restored["dense"]["kernel"].a, tree["dense"]["kernel"].a))
    True
  """
  target = Path(path)
  entries, arrays = collect_adapters(tree, require_base=True)
  manifest = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "jlora_version": jlora_version(),
      "specs": spec_labels(tree),
      "entries": entries,
      "fingerprint": fingerprint(tree),
      "metadata": _check_json(metadata, "metadata") if metadata is not None else None,
  }

  def write(tmp: Path) -> None:
    write_orbax_arrays(tmp / ARRAYS, arrays)
    manifest["files"] = file_digests(tmp / ARRAYS)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")

  atomic_write_dir(target, write, overwrite=overwrite, what="adapter checkpoint")
  return target


def load_adapters(path: str | os.PathLike, params: Any, *, check_base: bool = True) -> Any:
  """Loads an adapter checkpoint onto ``params``: the wrapped tree, adapters restored.

  ``params`` is either the plain base params (they are wrapped with the saved
  specs and axes; no rules object is needed) or an already wrapped tree (its
  adapters are replaced; its adapted paths, specs and rules must be the
  checkpoint's). Every array is checked against the sha256 in the manifest,
  so a corrupt checkpoint is an error, never silently wrong values. Restored
  adapters are placed on the default device.

  Loading onto a different base is an error by default: the base's paths,
  shapes, dtypes and a checksum of sampled values must equal the fingerprint
  stored at save time. ``check_base=False`` is the documented override (e.g.
  to apply an adapter trained on a bf16 copy of the model to its float32
  original): then only the adapted leaves' paths and shapes must fit.

  Args:
    path: a directory written by :func:`save_adapters`.
    params: the base params, or a tree wrapped with the same rules.
    check_base: compare the base against the stored fingerprint.

  Returns:
    A wrapped tree: ``params`` with the adapted leaves as ``LoraWeight`` /
    ``FullWeight`` nodes holding the saved adapters. ``params`` is not modified.

  Raises:
    CheckpointError: the checkpoint is missing, corrupt, truncated or from a
      newer format; it was saved from another base (the first differing leaf
      is named); or, for a wrapped ``params``, with other rules or specs.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile, os
    >>> params = {"k": jnp.ones((8, 8))}
    >>> tree = jlora.wrap(params, {"k": jlora.LoRA(2, alpha=4)}, key=jax.random.key(0))
    >>> d = jlora.save_adapters(os.path.join(tempfile.mkdtemp(), "ckpt"), tree)
    >>> jlora.load_adapters(d, params)["k"].spec == tree["k"].spec
    True
  """
  root = Path(path)
  manifest = read_adapter_manifest(root)
  arrays_dir = safe_child(root, ARRAYS, what="adapter arrays")
  layout = {e["key"]: e["arrays"] for e in manifest["entries"]}
  params = _with_learned_inputs(manifest["entries"], params)  # a saved soft prompt / prefix
  plan = plan_restore(manifest["entries"], params, where=str(root))
  if check_base:
    check_fingerprint(manifest.get("fingerprint"), params, where=str(root))
  check_file_digests(arrays_dir, manifest["files"], where=str(root))
  arrays = read_orbax_arrays(arrays_dir, layout, where=str(root))
  return apply_restore(plan, arrays)


def fingerprint(tree: Any, *, samples: int = DEFAULT_SAMPLES) -> dict:
  """A fingerprint of a base: every leaf's path, shape, dtype and a checksum of sampled values.

  For a wrapped tree the base of each ``LoraWeight`` is used and ``FullWeight``
  leaves contribute their shape and dtype only (their values are trained).
  ``samples`` values per leaf are read at positions drawn from the leaf's path
  (always including the first and the last element), so computing it never
  copies a whole model to the host. Two fingerprints of the same base are equal;
  a different model, a fine-tuned or a re-quantised copy almost surely differs
  in its sampled values (and surely does in shapes or dtypes).

  Args:
    tree: plain params or a wrapped tree (with its base).
    samples: values sampled per leaf.

  Returns:
    A JSON-serialisable dict: ``{"algorithm", "samples", "digest", "leaves"}``
    where ``leaves`` lists ``{"path", "shape", "dtype", "sample"}``.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> fp = jlora.fingerprint({"k": jnp.ones((4, 4))})
    >>> fp["leaves"][0]["shape"], len(fp["digest"])
    ([4, 4], 64)
    >>> fp == jlora.fingerprint({"k": jnp.ones((4, 4))})
    True
    >>> fp["digest"] == jlora.fingerprint({"k": jnp.zeros((4, 4))})["digest"]
    False
  """
  leaves = []
  for p, x, trained in _base_leaves(tree):
    if x is None:
      raise TreeError(
          f"the tree lacks the base of {p!r} (a jlora.split half?); pass the whole tree, "
          "jlora.combine(trainable, frozen)")
    shape = [int(s) for s in x.shape]
    if is_quantized(x):  # a quantised base: its kind, and samples of its codes and scales
      sample = None if trained else (_sample_digest(p, x.data, samples)
                                     + _sample_digest(p + "#scales", x.absmax, samples))
      leaves.append({"path": p, "shape": shape, "dtype": f"{x.spec.kind}:{_dtype_name(x.dtype)}",
                     "sample": sample})
      continue
    leaves.append({"path": p, "shape": shape, "dtype": _dtype_name(x.dtype),
                   "sample": None if trained else _sample_digest(p, x, samples)})
  body = json.dumps([[e["path"], e["shape"], e["dtype"], e["sample"]] for e in leaves])
  return {"algorithm": FINGERPRINT_ALGORITHM, "samples": samples,
          "digest": hashlib.sha256(body.encode()).hexdigest(), "leaves": leaves}


def read_adapter_manifest(path: str | os.PathLike) -> dict:
  """Reads and validates the manifest of an adapter checkpoint (no arrays are read).

  Args:
    path: a directory written by :func:`save_adapters`.

  Returns:
    The manifest dict: ``jlora_version``, ``rules``, ``entries`` (path, kind,
    spec, axes, rule, array shapes and dtypes), ``fingerprint``, ``metadata``.

  Raises:
    CheckpointError: the directory or manifest is missing, unreadable, from a
      newer format, or malformed (the field is named).

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile, os
    >>> tree = jlora.wrap({"k": jnp.ones((8, 8))}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> d = jlora.save_adapters(os.path.join(tempfile.mkdtemp(), "c"), tree, metadata={"lr": 0.1})
    >>> m = jlora.read_adapter_manifest(d)
    >>> m["metadata"], m["specs"], m["entries"][0]["path"]
    ({'lr': 0.1}, ['LoRA(2)'], 'k')
  """
  root = Path(path)
  if not root.is_dir():
    raise CheckpointError(
        f"{root} is not an adapter checkpoint directory (it does not exist or is a file); "
        "pass the directory that jlora.save_adapters wrote")
  mf = safe_child(root, MANIFEST, what="manifest")
  if not mf.is_file():
    hint = (" It looks like a Hugging Face PEFT adapter; load it with jlora.load_peft."
            if (root / "adapter_config.json").exists() else "")
    raise CheckpointError(f"{root} has no {MANIFEST}, so it is not a jlora adapter checkpoint "
                          f"(or its save never completed).{hint}")
  try:
    manifest = json.loads(mf.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{mf} is unreadable or not valid JSON ({e}); the checkpoint is "
                          "corrupt: restore it from a copy or save it again") from None
  validate_manifest(manifest, str(mf))
  return manifest


# ---------------------------------------------------------------------------------------------
# Shared machinery (also used by the training checkpoint manager and the PEFT converter).


def jlora_version() -> str:
  """The installed jlora version."""
  try:
    from importlib.metadata import version  # noqa: PLC0415
    return version("jlora")
  except Exception:  # noqa: BLE001 - not installed as a distribution
    return "unknown"


def spec_labels(tree: Any) -> list[str]:
  """The distinct spec labels (``LoRA(8)``, ``Full()``) of a wrapped tree's adapted leaves, in tree order."""
  out: list[str] = []
  for _, node in _adapted(tree):
    label = node.spec.describe()
    if label not in out:
      out.append(label)
  return out


def collect_adapters(tree: Any, *, require_base: bool) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
  """The manifest entries and the host copies of a wrapped tree's adapter arrays.

  Returns ``(entries, arrays)``; ``arrays`` maps each entry's synthetic key
  (``"e00000"``) to ``{child name: numpy array}`` for the children the
  adapter kind saves (``a``/``b`` for LoRA, ``w`` for Full, ...).
  """
  adapted = _adapted(tree)
  if not adapted:
    raise TreeError("the tree holds no adapters (no adapted leaf); wrap the params "
                    "first: jlora.wrap(params, rules, key=...)")
  seen: set[str] = set()
  entries, arrays = [], {}
  for i, (p, node) in enumerate(adapted):
    if p in seen:
      raise TreeError(f"two adapted leaves share the path {p!r}; rename one of the keys")
    seen.add(p)
    key = f"e{i:05d}"
    if require_base and "w" in node.frozen and node.w is None:
      raise TreeError(
          f"the tree lacks the base of {p!r} (it looks like the trainable half of jlora.split); "
          "pass the whole tree, jlora.combine(trainable, frozen): its base is fingerprinted")
    names = node.saved_children()
    missing = [n for n in names if getattr(node, n) is None]
    if missing:
      raise TreeError(f"the adapter at {p!r} lacks {missing} (the frozen half of jlora.split?); "
                      "pass the whole tree, jlora.combine(trainable, frozen)")
    host = {n: _host(getattr(node, n)) for n in names}
    entry = {"key": key, "path": p, "kind": node.kind, "spec": _spec_to_json(node.spec),
             "axes": None if node.axes is None else axes_to_json(node.axes),
             "base": {"shape": list(node.shape),
                      "dtype": None if node.w is None else _dtype_name(node.w.dtype)}}
    entry["arrays"] = {n: {**_shape_dtype(v), "sha256": _sha256(v)} for n, v in host.items()}
    entries.append(entry)
    arrays[key] = host
  return entries, arrays


def validate_manifest(manifest: Any, where: str) -> None:
  """Checks the fields of an adapter manifest; CheckpointError names the first bad one."""
  if not isinstance(manifest, dict):
    raise CheckpointError(f"{where}: the manifest is not a JSON object; the checkpoint is corrupt")
  if manifest.get("format") != FORMAT:
    raise CheckpointError(f"{where}: format is {manifest.get('format')!r}, expected {FORMAT!r}; "
                          "this is not a jlora adapter manifest")
  version = manifest.get("format_version")
  if not isinstance(version, int) or version < 1:
    raise CheckpointError(f"{where}: format_version {version!r} is invalid; the checkpoint is corrupt")
  if version > FORMAT_VERSION:
    raise CheckpointError(
        f"{where}: written by jlora {manifest.get('jlora_version')} in format version {version}; "
        f"this jlora reads up to version {FORMAT_VERSION}: upgrade jlora")
  entries = manifest.get("entries")
  if not isinstance(entries, list) or not entries:
    raise CheckpointError(f"{where}: 'entries' is missing or empty; the checkpoint is corrupt")
  seen_keys, seen_paths = set(), set()
  for i, e in enumerate(entries):
    validate_entry(e, f"{where}: entries[{i}]")
    if e["key"] in seen_keys or e["path"] in seen_paths:
      raise CheckpointError(f"{where}: entries[{i}] repeats key {e['key']!r} or path {e['path']!r}")
    seen_keys.add(e["key"])
    seen_paths.add(e["path"])
  fp = manifest.get("fingerprint")
  if fp is not None and not (isinstance(fp, dict) and isinstance(fp.get("leaves"), list)):
    raise CheckpointError(f"{where}: 'fingerprint' is malformed; the checkpoint is corrupt")
  files = manifest.get("files")
  if not isinstance(files, dict) or not files or not all(
      isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("size"), int)
      and isinstance(v.get("sha256"), str) for k, v in files.items()):
    raise CheckpointError(f"{where}: 'files' is missing or malformed; the checkpoint is corrupt")


def validate_entry(e: Any, where: str) -> None:
  """Checks one manifest entry (key, path, kind, spec, axes, arrays)."""
  if not isinstance(e, dict):
    raise CheckpointError(f"{where} is not an object; the checkpoint is corrupt")
  for field, typ in (("key", str), ("path", str), ("kind", str), ("arrays", dict)):
    if not isinstance(e.get(field), typ):
      raise CheckpointError(f"{where} lacks a valid {field!r}; the checkpoint is corrupt")
  if not e["key"].isalnum():
    raise CheckpointError(f"{where}: array key {e['key']!r} is not alphanumeric; the checkpoint "
                          "is corrupt or was tampered with")
  cls = leaf_class(e["kind"])
  names = set(cls.saved_children())
  if set(e["arrays"]) != names:
    raise CheckpointError(f"{where}: arrays {sorted(e['arrays'])}, expected {sorted(names)}")
  for n, info in e["arrays"].items():
    if not (isinstance(info, dict) and _is_shape(info.get("shape")) and isinstance(info.get("dtype"), str)
            and isinstance(info.get("sha256"), str)):
      raise CheckpointError(f"{where}: array {n!r} lacks shape/dtype/sha256; the checkpoint is corrupt")
    _parse_dtype(info["dtype"], where)
  _spec_from_json(cls.spec_type, e.get("spec", {}), where)
  if e.get("axes") is not None:
    axes_from_json(e["axes"], where)


def plan_restore(entries: list[dict], params: Any, *, where: str) -> dict:
  """Matches manifest entries to the leaves of ``params`` (plain or wrapped); checks shapes and specs.

  Returns a plan for :func:`apply_restore`. Raises CheckpointError on any mismatch.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_whole)
  paths = [path_str(kp) for kp, _ in flat]
  leaves = [x for _, x in flat]
  index = {p: i for i, p in enumerate(paths)}
  wrapped = any(is_adapted(x) for x in leaves)
  by_path = {e["path"]: e for e in entries}
  if wrapped:
    have = {p: x for p, x in zip(paths, leaves) if is_adapted(x)}
    missing = [p for p in by_path if p not in have]
    extra = [p for p in have if p not in by_path]
    if missing or extra:
      raise CheckpointError(
          f"{where} was saved with other rules than the wrapped tree passed in: "
          f"{_diff_text(missing, extra)}. Pass the plain base params to rebuild the saved "
          "adapters, or wrap with the rules used at save time")
  else:
    missing = [p for p in by_path if p not in index]
    if missing:
      raise CheckpointError(
          f"{where} holds adapters for {_fmt(missing)}, which the params do not have; the "
          "checkpoint is for another model (paths are '/'-joined keys)")
  plan = {"treedef": treedef, "leaves": leaves, "index": index, "entries": entries}
  for e in entries:
    p = e["path"]
    leaf = leaves[index[p]]
    base = leaf.w if is_adapted(leaf) else leaf
    if base is None or not hasattr(base, "shape"):
      raise CheckpointError(f"{where}: params leaf {p!r} is not an array; pass the whole base params")
    cls = leaf_class(e["kind"])
    spec = _spec_from_json(cls.spec_type, e.get("spec", {}), f"{where}: entry {p!r}")
    axes = None if e.get("axes") is None else axes_from_json(e["axes"], f"{where}: entry {p!r}")
    _check_layout(p, base, cls, spec, axes, e["arrays"], where)
    if wrapped and (type(leaf) is not cls or leaf.spec != spec or leaf.axes != axes):
      got = f"{type(leaf).__name__}({getattr(leaf, 'spec', None)})"
      raise CheckpointError(
          f"{where} was saved with other rules than the wrapped tree passed in: at {p!r} the "
          f"checkpoint has {cls.__name__}({spec}), the tree {got}. Pass the plain base params "
          "instead, or wrap with the rules used at save time")
  return plan


def apply_restore(plan: dict, arrays: dict[str, dict[str, np.ndarray]],
                  place: Callable[[np.ndarray, Any], Any] | None = None) -> Any:
  """Builds the wrapped tree from a :func:`plan_restore` plan and restored host arrays."""
  leaves = list(plan["leaves"])
  put = place or (lambda x, like: jnp.asarray(x))
  for e in plan["entries"]:
    i = plan["index"][e["path"]]
    leaf = leaves[i]
    got = arrays[e["key"]]
    cls = leaf_class(e["kind"])
    spec = _spec_from_json(cls.spec_type, e.get("spec", {}), e["path"])
    axes = None if e.get("axes") is None else axes_from_json(e["axes"], e["path"])
    if is_adapted(leaf):
      new = {n: put(v, getattr(leaf, n)) for n, v in got.items()}
      leaves[i] = leaf.replace(**new)
    else:
      new = {n: put(v, leaf if n == "w" else None) for n, v in got.items()}
      leaves[i] = cls.restore(e["path"], leaf, spec, axes, new)
  return jax.tree_util.tree_unflatten(plan["treedef"], leaves)


def check_fingerprint(stored: dict | None, params: Any, *, where: str) -> None:
  """Raises CheckpointError when ``params``' base differs from a stored fingerprint."""
  if stored is None:
    return
  if stored.get("algorithm") != FINGERPRINT_ALGORITHM:
    raise CheckpointError(f"{where}: unknown fingerprint algorithm {stored.get('algorithm')!r}; "
                          "load with check_base=False to skip the base check")
  samples = int(stored.get("samples", DEFAULT_SAMPLES))
  current = fingerprint(params, samples=samples)
  if current["digest"] == stored.get("digest"):
    return
  old = {e.get("path"): e for e in stored["leaves"] if isinstance(e, dict)}
  new = {e["path"]: e for e in current["leaves"]}
  override = ("If you mean to apply these adapters to this base anyway, pass check_base=False")
  missing = [p for p in old if p not in new]
  extra = [p for p in new if p not in old]
  if missing or extra:
    raise CheckpointError(
        f"{where} was saved from another base: the params {_diff_text(missing, extra, 'base')}. "
        f"Load it onto the model it was trained on. {override}")
  for p, n in new.items():
    o = old[p]
    if list(o.get("shape", [])) != n["shape"] or o.get("dtype") != n["dtype"]:
      raise CheckpointError(
          f"{where} was saved from another base: leaf {p!r} was {o.get('dtype')}{o.get('shape')} "
          f"and is {n['dtype']}{n['shape']} now. {override}")
  for p, n in new.items():
    o = old[p]
    if o.get("sample") is not None and n["sample"] is not None and o["sample"] != n["sample"]:
      raise CheckpointError(
          f"{where} was saved from another base: the values of leaf {p!r} differ from the base "
          f"the adapters were trained on (checksum of {samples} sampled values). Load it onto "
          f"the model it was trained on. {override}")


def file_digests(root: Path) -> dict[str, dict]:
  """``{relative path: {"size", "sha256"}}`` of every file under ``root``."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      full = Path(dirpath) / f
      out[full.relative_to(root).as_posix()] = {"size": full.stat().st_size, "sha256": _file_sha256(full)}
  return dict(sorted(out.items()))


def check_file_digests(root: Path, files: dict[str, dict], *, where: str) -> None:
  """Raises CheckpointError unless every recorded file under ``root`` has its recorded size and sha256."""
  if not root.is_dir():
    raise CheckpointError(f"{where}: the array directory {root} is missing; the checkpoint is "
                          "incomplete or corrupt: restore it from a copy or save it again")
  real_root = os.path.realpath(root)
  for rel, info in files.items():
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or not parts:
      raise CheckpointError(f"{where}: the manifest names file {rel!r}, which would escape {root}; "
                            "the checkpoint was tampered with")
    f = root.joinpath(*parts)
    if os.path.commonpath([real_root, os.path.realpath(f)]) != real_root:
      raise CheckpointError(f"{where}: {f} points outside {root}; refusing to read it")
    if not f.is_file():
      raise CheckpointError(f"{where}: {f} is missing; the checkpoint is incomplete or corrupt: "
                            "restore it from a copy or save it again")
    if f.stat().st_size != info["size"] or _file_sha256(f) != info["sha256"]:
      raise CheckpointError(f"{where}: {f} is truncated or corrupt (its size or sha256 differs from "
                            "the manifest): restore the checkpoint from a copy or save it again")


def _this_process_only(ocp) -> dict:
  """Orbax options for a save / restore by this process alone (host arrays, no barriers), so
  that under ``jax.distributed`` one process writes an adapter while the others wait."""
  import jax  # noqa: PLC0415
  if jax.process_count() == 1:
    return {}
  me = jax.process_index()
  return {"multiprocessing_options": ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"jlora-p{me}")}


def write_orbax_arrays(path: Path, arrays: dict) -> None:
  """Writes a dict of host arrays as an Orbax PyTree checkpoint (synchronously)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  opts = _this_process_only(ocp)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**opts), **opts) as ck:
    ck.save(os.path.abspath(path), args=ocp.args.PyTreeSave(arrays))


def read_orbax_arrays(path: Path, layout: dict[str, dict[str, dict]], *, where: str) -> dict:
  """Reads an Orbax PyTree of host arrays and checks each against ``layout`` (shape, dtype, sha256)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  if not path.is_dir():
    raise CheckpointError(f"{where}: the array directory {path} is missing; the checkpoint is "
                          "incomplete or corrupt: restore it from a copy or save it again")
  args = {k: {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in v} for k, v in layout.items()}
  try:
    opts = _this_process_only(ocp)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**opts), **opts) as ck:
      got = ck.restore(os.path.abspath(path), args=ocp.args.PyTreeRestore(restore_args=args))
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
    raise CheckpointError(f"{where}: the adapter arrays in {path} cannot be read ({_short(e)}); "
                          "the checkpoint is truncated or corrupt: restore it from a copy or "
                          "save it again") from None
  return verify_arrays(got, layout, where=where)


def verify_arrays(got: Any, layout: dict[str, dict[str, dict]], *, where: str) -> dict:
  """Checks restored host arrays against the manifest's shapes, dtypes and sha256 digests."""
  out = {}
  for k, names in layout.items():
    entry = got.get(k) if isinstance(got, dict) else None
    if not isinstance(entry, dict):
      raise CheckpointError(f"{where}: array group {k!r} is missing from the checkpoint; it is corrupt")
    out[k] = {}
    for n, info in names.items():
      x = entry.get(n)
      if x is None:
        raise CheckpointError(f"{where}: array {k}/{n} is missing; the checkpoint is corrupt")
      x = np.asarray(x)
      if list(x.shape) != list(info["shape"]) or _dtype_name(x.dtype) != info["dtype"] or (
          _sha256(x) != info["sha256"]):
        raise CheckpointError(
            f"{where}: array {k}/{n} does not match its recorded shape, dtype or sha256 "
            f"({_dtype_name(x.dtype)}{list(x.shape)} vs {info['dtype']}{info['shape']}); the "
            "checkpoint is corrupt: restore it from a copy or save it again")
      out[k][n] = x
  return out


def atomic_write_dir(target: Path, write: Callable[[Path], None], *, overwrite: bool, what: str) -> None:
  """Runs ``write(tmp)`` on a fresh temporary sibling of ``target``, fsyncs it and renames it into place.

  On any failure the temporary directory is removed and ``target`` is untouched.
  """
  target = Path(target)
  if target.exists() or target.is_symlink():
    if not overwrite:
      raise CheckpointError(f"{target} already exists; pass overwrite=True to replace the {what} "
                            "(atomically) or choose a new path")
    if not target.is_dir() or target.is_symlink():
      raise CheckpointError(f"{target} exists and is not a directory; refusing to replace it")
  parent = target.parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
  except OSError as e:
    raise CheckpointError(f"cannot create the {what} at {target}: {e}; nothing was written") from None
  try:
    write(tmp)
    fsync_tree(tmp)
    replace_dir(tmp, target)
    _fsync_dir(parent)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, JloraError) or not isinstance(e, Exception):
      raise
    raise CheckpointError(
        f"could not write the {what} at {target}: {_short(e)}{_disk_hint(e)}. Nothing was "
        f"written{' and the existing one is unchanged' if target.exists() else ''}") from e


def replace_dir(tmp: Path, target: Path) -> None:
  """Renames the finished directory ``tmp`` over ``target`` (a sibling of it, or absent).

  An existing ``target`` is first moved aside and put back if the final rename fails, so
  ``target`` is either the old directory or the new one; errors propagate unchanged.
  """
  if target.exists():
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "d")
    try:
      os.replace(tmp, target)
    except BaseException:
      os.replace(old / "d", target)
      raise
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, target)


def fsync_tree(root: Path) -> None:
  """fsyncs every file and directory under ``root`` (so a rename after it is durable)."""
  for dirpath, _, files in os.walk(root):
    for f in files:
      fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    _fsync_dir(Path(dirpath))


def safe_child(root: Path, name: str, *, what: str) -> Path:
  """``root / name``, refusing a name (or a symlink) that would lead outside ``root``."""
  if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
      or "\x00" in name or os.path.isabs(name):
    raise CheckpointError(
        f"{what} name {name!r} would escape the directory {root}; use a plain name without "
        "'/', '\\' or '..'")
  child = Path(root) / name
  if child.is_symlink() or child.exists():
    real_root = os.path.realpath(root)
    real = os.path.realpath(child)
    if os.path.commonpath([real_root, real]) != real_root:
      raise CheckpointError(f"{child} points outside {root} (to {real}); refusing to follow it")
  return child


def axes_to_json(axes: Axes) -> dict:
  """An :class:`jlora.Axes` as JSON."""
  return {"stack": list(axes.stack), "inputs": list(axes.inputs), "outputs": list(axes.outputs)}


def axes_from_json(d: Any, where: str) -> Axes:
  """Rebuilds :class:`jlora.Axes` from :func:`axes_to_json`'s dict."""
  try:
    return Axes(*(tuple(int(i) for i in d[k]) for k in ("stack", "inputs", "outputs")))
  except (KeyError, TypeError, ValueError):
    raise CheckpointError(f"{where}: the kernel axes {d!r} are malformed") from None


# ---------------------------------------------------------------------------------------------
# Private helpers.


def _adapted(tree: Any) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapted)
  return [(path_str(kp), x) for kp, x in flat if is_adapted(x)]


#: params entries that jlora.add_prompt / add_prefix create: trained inputs, not base weights
_LEARNED_INPUTS = ("prompt", "prefix")


def _with_learned_inputs(entries: list[dict], params: Any) -> Any:
  """``params`` plus placeholders for a saved soft prompt / prefix the plain base lacks.

  Every saved leaf under ``prompt/`` or ``prefix/`` (the embedding, and a prefix projection's
  ``projection/w1`` ... ``b2``) gets a zero array of its saved shape and dtype at its nested path.
  """
  if not isinstance(params, dict):
    return params
  add: dict = {}
  for e in entries:
    top, _, rest = e["path"].partition("/")
    if top in _LEARNED_INPUTS and rest and top not in params and e.get("kind") == "full":
      info = e.get("arrays", {}).get("w", {})
      node = add.setdefault(top, {})
      *parents, leaf = rest.split("/")
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = np.zeros(tuple(info.get("shape", ())), _parse_dtype(info.get("dtype", "float32"),
                                                                         e["path"]))
  return {**params, **add} if add else params


def _base_leaves(tree: Any) -> list[tuple[str, Any, bool]]:
  """(path, base array, trained?) for every array leaf of plain params or a wrapped tree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_whole)
  out = []
  for kp, x in flat:
    p = path_str(kp)
    if p.split("/", 1)[0] in _LEARNED_INPUTS:  # a soft prompt / prefix is never part of the base
      continue
    if is_adapted(x):
      out.append((p, x.w, "w" in x.trainable))
    elif hasattr(x, "shape") and hasattr(x, "dtype"):
      out.append((p, x, False))
  return out


def _sample_digest(path: str, x: Any, samples: int) -> str:
  n = int(np.prod(x.shape)) if len(x.shape) else 1
  if n == 0:
    return hashlib.sha256(b"").hexdigest()[:32]
  rng = np.random.default_rng(zlib.crc32(path.encode()))
  idx = np.unique(np.concatenate([[0, n - 1], rng.integers(0, n, size=min(samples, n))]))
  coords = np.unravel_index(idx, x.shape) if len(x.shape) else ()
  if not isinstance(x, jax.Array):
    vals = np.asarray(x)[coords]
  elif x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices()):
    vals = np.asarray(x)[coords]  # a view of host memory: no copy, nothing to compile
  else:
    vals = np.asarray(jax.device_get(x[coords]))  # gather on device: never copy a whole model
  vals = _contiguous(np.asarray(vals))
  return hashlib.sha256(_dtype_name(vals.dtype).encode() + vals.tobytes()).hexdigest()[:32]


def _check_layout(p: str, base, cls, spec, axes, arrays: dict, where: str) -> None:
  """The saved children must have the shapes ``spec`` gives on this base leaf (and its axes)."""
  like = jax.ShapeDtypeStruct(tuple(base.shape), base.dtype)
  try:
    template = jax.eval_shape(lambda w: spec.adapt(p, w, jax.random.key(0)), like)
  except JloraError as e:
    raise CheckpointError(f"{where}: the saved spec at {p!r} does not fit the params leaf of shape "
                          f"{tuple(base.shape)}: {e}; the checkpoint is for another model") from None
  if type(template) is not cls:
    raise CheckpointError(f"{where}: the saved {cls.__name__} spec at {p!r} does not adapt a params "
                          f"leaf of shape {tuple(base.shape)}; the checkpoint is for another model")
  if template.axes != axes:
    raise CheckpointError(f"{where}: the saved axes {axes} at {p!r} do not fit a kernel of shape "
                          f"{tuple(base.shape)}")
  want = {n: tuple(getattr(template, n).shape) for n in arrays}
  got = {n: tuple(info["shape"]) for n, info in arrays.items()}
  if want != got:
    fmt = lambda d: " ".join(f"{n}{list(s)}" for n, s in sorted(d.items()))  # noqa: E731
    raise CheckpointError(
        f"{where}: the adapter at {p!r} has {fmt(got)} but the params leaf of shape "
        f"{tuple(base.shape)} needs {fmt(want)}; the checkpoint is for another model")


def _host(x: Any) -> np.ndarray:
  return _contiguous(np.asarray(jax.device_get(x)))


def _contiguous(x: np.ndarray) -> np.ndarray:
  """A C-contiguous copy if needed (``np.ascontiguousarray`` would turn 0-d into 1-d)."""
  return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _shape_dtype(x: Any) -> dict:
  return {"shape": [int(s) for s in x.shape], "dtype": _dtype_name(x.dtype)}


def _dtype_name(dtype: Any) -> str:
  return jnp.dtype(dtype).name


def _parse_dtype(name: str, where: str) -> np.dtype:
  try:
    return jnp.dtype(name)
  except TypeError:
    raise CheckpointError(f"{where}: unknown dtype {name!r}; the checkpoint is corrupt") from None


def _sha256(x: np.ndarray) -> str:
  x = _contiguous(np.asarray(x))
  h = hashlib.sha256(f"{_dtype_name(x.dtype)}{list(x.shape)}".encode())
  h.update(x.tobytes())
  return h.hexdigest()


def _file_sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _is_shape(s: Any) -> bool:
  return isinstance(s, list) and all(isinstance(i, int) and i >= 0 for i in s)


def _check_json(value: Any, what: str) -> Any:
  try:
    return json.loads(json.dumps(value, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{what} must be JSON-serialisable (dicts, lists, str, finite numbers, "
                          f"bool, None): {e}; nothing was written") from None


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _fsync_dir(d: Path) -> None:
  try:
    fd = os.open(d, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _diff_text(missing: list[str], extra: list[str], noun: str = "adapted") -> str:
  parts = []
  if missing:
    parts.append(f"lack {noun} leaves {_fmt(missing)} that the checkpoint has" if noun == "base"
                 else f"the checkpoint adapts {_fmt(missing)}, the tree does not")
  if extra:
    parts.append(f"have {noun} leaves {_fmt(extra)} that the checkpoint lacks" if noun == "base"
                 else f"the tree adapts {_fmt(extra)}, the checkpoint does not")
  return "; ".join(parts)


def _fmt(paths: list[str], n: int = 4) -> str:
  shown = ", ".join(repr(p) for p in paths[:n])
  return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _short(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  first = text[0] if text else ""
  return f"{type(e).__name__}: {first[:300]}"


def _disk_hint(e: BaseException) -> str:
  err = getattr(e, "errno", None)
  text = str(e).lower()
  if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "no space" in text or "too large" in text \
      or "quota" in text:
    return " (the disk is full or over quota: free space and save again)"
  return ""
