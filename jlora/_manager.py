"""Crash-safe, resumable training checkpoints on ``orbax.checkpoint.CheckpointManager``.

Each step directory holds two Orbax items:

* ``arrays``: the adapter arrays (never the base), the optimizer state's leaves
  and the RNG key's data, as host copies;
* ``meta``: JSON with the step, the adapters' realised specs (as in
  :func:`jlora.save_adapters`), a fingerprint of the base, the shapes, dtypes and
  sha256 of every array, the RNG key's implementation, the data position, the
  metrics and the user's metadata.

Orbax writes a step into a temporary directory and renames it into place when
complete, so a process killed at any moment (SIGKILL included) leaves either a
whole step or a temporary directory that the next manager removes. Old steps are
first renamed into a trash folder and only then deleted, so a kill during
cleanup never leaves a half-deleted step that looks complete. Every restored
array is checked against its recorded sha256.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._checkpoint import (
    _check_json,
    _dtype_name,
    _host,
    _sha256,
    _short,
    apply_restore,
    check_fingerprint,
    collect_adapters,
    fingerprint,
    jlora_version,
    plan_restore,
    spec_labels,
    validate_entry,
    verify_arrays,
)
from jlora._errors import CheckpointError
from jlora._adapter import is_adapted

__all__ = ["CheckpointManager", "Restored"]

FORMAT = "jlora.train"
FORMAT_VERSION = 1
_TRASH = "_deleted"
_PARTIAL = re.compile(r"\d+\.orbax-checkpoint-tmp.*")
_MODES = ("min", "max")


@dataclasses.dataclass(frozen=True)
class Restored:
  """What :meth:`CheckpointManager.restore` returns.

  Attributes:
    step: the restored step.
    tree: the wrapped tree with the saved adapters (the base from the tree
      passed to ``restore``).
    opt_state: the optimizer state (``None`` if none was saved).
    rng: the PRNG key (typed or raw, as saved), or ``None``.
    data_state: the data position as saved (any JSON value), or ``None``.
    metrics: the metrics saved with the step, or ``None``.
    metadata: the user's metadata, or ``None``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile
    >>> params = {"k": jnp.ones((4, 4))}
    >>> tree = jlora.wrap(params, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> with jlora.CheckpointManager(tempfile.mkdtemp(), async_save=False) as mgr:
    ...   _ = mgr.save(2, tree, data_state={"batch": 2}, metrics={"loss": 0.1})
    ...   r = mgr.restore(params)
    >>> r.step, r.data_state, r.metrics, r.opt_state is None
    (2, {'batch': 2}, {'loss': 0.1}, True)
  """

  step: int
  tree: Any
  opt_state: Any
  rng: Any
  data_state: Any
  metrics: dict | None
  metadata: dict | None


class CheckpointManager:
  """Saves and restores training state: adapters, optimizer state, step, RNG and data position.

  Built on ``orbax.checkpoint.CheckpointManager``: saves are asynchronous
  (``save`` copies the small adapter and optimizer arrays to the host and
  returns; Orbax writes them in the background), the last ``max_to_keep`` steps
  and the ``keep_best`` best by ``best_metric`` are kept, and ``restore``
  returns the latest complete step. A run killed at any moment, even during a
  save, restores the last complete checkpoint; a resumed run that restores the
  RNG key and the data position continues bit-identically.

  One manager (one process) writes to a directory at a time: opening one removes the
  temporary folders that a killed run left behind.

  Args:
    directory: the folder holding one sub-folder per step (created if needed).
    max_to_keep: keep the most recent N steps (``None``: keep all).
    best_metric: a key of the ``metrics`` passed to :meth:`save`; the
      ``keep_best`` best steps by it are kept too, and ``restore(best=True)``
      restores the best.
    best_mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
    keep_best: how many best steps to keep besides the latest ones.
    save_interval_steps: :meth:`save` writes only steps that are multiples of N
      (unless ``force``).
    async_save: write in the background (``False``: ``save`` returns when written).

  Raises:
    CheckpointError: ``directory`` cannot be created or used.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora, tempfile
    >>> params = {"k": jnp.ones((8, 8))}
    >>> tree = jlora.wrap(params, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> tx = jlora.optimizer(optax.adam(1e-2))
    >>> opt_state = tx.init(jlora.split(tree)[0])
    >>> with jlora.CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as mgr:
    ...   mgr.save(10, tree, opt_state, rng=jax.random.key(1), data_state={"batch": 10})
    ...   mgr.wait_until_finished()
    ...   r = mgr.restore(params, opt_state)
    True
    >>> r.step, r.data_state
    (10, {'batch': 10})
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
               best_metric: str | None = None, best_mode: str = "min", keep_best: int = 1,
               save_interval_steps: int = 1, async_save: bool = True):
    import orbax.checkpoint as ocp  # noqa: PLC0415
    from orbax.checkpoint import checkpoint_managers as cm  # noqa: PLC0415

    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise CheckpointError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
    if best_mode not in _MODES:
      raise CheckpointError(f"best_mode must be one of {_MODES}, got {best_mode!r}")
    if not isinstance(keep_best, int) or keep_best < 1:
      raise CheckpointError(f"keep_best must be a positive int, got {keep_best!r}")
    if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
      raise CheckpointError(f"save_interval_steps must be a positive int, got {save_interval_steps!r}")
    self.directory = Path(directory).absolute()
    self.best_metric, self.best_mode = best_metric, best_mode
    self.save_interval_steps = save_interval_steps
    if self.directory.exists() and not self.directory.is_dir():
      raise CheckpointError(f"{self.directory} exists and is not a directory; pass a folder for checkpoints")
    _remove_partial_steps(self.directory)
    policies = [cm.LatestN(n=max_to_keep)]
    if best_metric is not None:
      policies.append(cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                               n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies) if len(policies) > 1 else policies[0],
        cleanup_tmp_directories=True,
        todelete_subdir=_TRASH,
        enable_async_checkpointing=async_save,
        create=True,
    )
    try:
      self._mgr = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"arrays": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {_short(e)}") from None
    self._ocp = ocp
    self._fp_cache: tuple[tuple[int, ...], dict, list] | None = None
    self._purge_trash()

  # -- saving ---------------------------------------------------------------------------------

  def save(self, step: int, tree: Any, opt_state: Any = None, *, rng: Any = None,
           data_state: Any = None, metrics: dict[str, float] | None = None,
           metadata: dict | None = None, force: bool = False) -> bool:
    """Saves one step (asynchronously): adapters, optimizer state, RNG key, data position.

    Only the trainable arrays are written, never the base. Everything is
    validated and copied to the host before this returns, so the caller may
    keep training (and donate its buffers) right away.

    Args:
      step: the training step (a non-negative int, larger than any saved one).
      tree: the whole wrapped tree (``jlora.combine(trainable, frozen)``).
      opt_state: the optimizer state (any pytree of arrays), or ``None``.
      rng: a PRNG key (``jax.random.key`` or a raw ``PRNGKey``), or ``None``.
      data_state: the data position (any JSON value: a batch index, a dict).
      metrics: ``{name: number}``; must contain ``best_metric`` if one was set.
      metadata: any JSON-serialisable dict.
      force: save even if ``step`` is not on the save interval.

    Returns:
      True if a save was started, False if the interval skipped this step.

    Raises:
      CheckpointError: an invalid step (or one not after the latest saved), metrics without
        the best metric, a non-JSON ``data_state`` / ``metadata``, or a failed
        write; nothing is changed on disk then.
      TreeError: the tree has no adapters or lacks its base.

    Example:
      >>> import jax, jax.numpy as jnp, jlora, tempfile
      >>> tree = jlora.wrap({"k": jnp.ones((4, 4))}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
      >>> mgr = jlora.CheckpointManager(tempfile.mkdtemp(), async_save=False)
      >>> mgr.save(1, tree, data_state=128)
      True
      >>> mgr.latest_step()
      1
      >>> mgr.close()
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    step = int(step)
    latest = self._mgr.latest_step()  # includes a save still in flight
    if latest is not None and step <= latest:
      raise CheckpointError(
          f"step {step} is not after the latest saved step {latest} in {self.directory}; steps must "
          "increase. To branch off an earlier step, save into a new directory")
    if not force and step % self.save_interval_steps:
      return False
    metrics = self._check_metrics(metrics)
    entries, adapters = collect_adapters(tree, require_base=True)
    opt_leaves = [_host(x) for x in jax.tree.leaves(opt_state)]
    arrays: dict[str, Any] = {"adapters": adapters}
    if opt_leaves:
      arrays["opt_state"] = {f"o{i:05d}": x for i, x in enumerate(opt_leaves)}
    rng_meta = None
    if rng is not None:
      rng_meta, rng_data = _rng_to_host(rng)
      arrays["rng"] = {"data": rng_data}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "jlora_version": jlora_version(),
        "step": step, "specs": spec_labels(tree), "entries": entries,
        "fingerprint": self._fingerprint(tree),
        "opt_state": [{"shape": list(x.shape), "dtype": _dtype_name(x.dtype), "sha256": _sha256(x)}
                      for x in opt_leaves],
        "opt_state_treedef": None if opt_state is None else str(jax.tree.structure(opt_state)),
        "rng": rng_meta,
        "data_state": _check_json(data_state, "data_state"),
        "metrics": metrics,
        "metadata": _check_json(metadata, "metadata") if metadata is not None else None,
    }
    ocp = self._ocp
    self._purge_trash()
    try:
      return bool(self._mgr.save(
          step, args=ocp.args.Composite(arrays=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True))
    except Exception as e:  # noqa: BLE001 - orbax raises many types
      latest = self._mgr.latest_step()
      raise CheckpointError(
          f"could not save step {step} to {self.directory}: {_short(e)}. Checkpoints already "
          f"complete are unchanged (latest: {latest}); steps must increase, and the disk must "
          "have room") from None

  # -- restoring ------------------------------------------------------------------------------

  def restore(self, tree: Any, opt_state: Any = None, *, step: int | None = None,
              best: bool = False, check_base: bool = True) -> Restored:
    """Restores a step (default: the latest complete one) onto ``tree``.

    Args:
      tree: the base params, or a tree wrapped with the rules used for training
        (its adapters are replaced; adapters go to the devices and shardings of
        its factors, otherwise to the default device).
      opt_state: a template optimizer state (``tx.init(trainable)``), needed to
        restore a saved optimizer state; its leaves get the template's shardings.
      step: the step to restore; ``None`` for the latest (or the best with ``best``).
      best: restore the best step by ``best_metric`` instead of the latest.
      check_base: compare the base with the fingerprint saved at training time
        (``False`` skips it, as in :func:`jlora.load_adapters`).

    Returns:
      A :class:`Restored`.

    Raises:
      CheckpointError: no checkpoint, an unknown step, a corrupt step (an array
        does not match its sha256), another base, other rules, or an optimizer
        state template of another structure.

    Example:
      >>> import jax, jax.numpy as jnp, jlora, tempfile
      >>> params = {"k": jnp.ones((4, 4))}
      >>> tree = jlora.wrap(params, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
      >>> mgr = jlora.CheckpointManager(tempfile.mkdtemp(), async_save=False)
      >>> _ = mgr.save(5, tree, rng=jax.random.key(7))
      >>> r = mgr.restore(params)
      >>> r.step, bool(jnp.array_equal(r.tree["k"].a, tree["k"].a))
      (5, True)
      >>> mgr.close()
    """
    ocp = self._ocp
    self.wait_until_finished()
    if step is None:
      step = self.best_step() if best else self.latest_step()
      if step is None:
        what = f"a step with metric {self.best_metric!r}" if best else "a complete checkpoint"
        raise CheckpointError(f"{self.directory} holds no {what}; start training from scratch "
                              "(or point the manager at the right folder)")
    elif step not in self.all_steps():
      raise CheckpointError(f"step {step} is not in {self.directory}; available: {self.all_steps()}")
    where = f"{self.directory} step {step}"
    meta = self._read_meta(step)
    plan = plan_restore(meta["entries"], tree, where=where)
    if check_base:
      check_fingerprint(meta.get("fingerprint"), tree, where=where)
    saved_opt = meta["opt_state"]
    template_leaves, opt_def = [], None
    if opt_state is not None:
      template_leaves, opt_def = jax.tree.flatten(opt_state)
      if len(template_leaves) != len(saved_opt) or any(
          list(np.shape(t)) != s["shape"] or _dtype_name(jnp.result_type(t)) != s["dtype"]
          for t, s in zip(template_leaves, saved_opt)):
        raise CheckpointError(
            f"{where}: the optimizer state template does not match the saved one ({len(saved_opt)} "
            f"leaves saved, {len(template_leaves)} in the template, or their shapes/dtypes differ); "
            "build it with the optimizer and rules used for training: tx.init(trainable)")
    layout: dict[str, dict] = {"adapters": {e["key"]: e["arrays"] for e in meta["entries"]}}
    if saved_opt:
      layout["opt_state"] = {f"o{i:05d}": s for i, s in enumerate(saved_opt)}
    if meta.get("rng") is not None:
      layout["rng"] = {"data": meta["rng"]}
    restore_args = {g: {k: _np_args(ocp, v) for k, v in items.items()} if g == "adapters"
                    else {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in items}
                    for g, items in layout.items()}
    try:
      got = self._mgr.restore(step, args=ocp.args.Composite(
          arrays=ocp.args.PyTreeRestore(restore_args=restore_args)))["arrays"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{where}: the arrays cannot be read ({_short(e)}); the step is corrupt: "
                            f"restore another one (available: {self.all_steps()})") from None
    adapters = verify_arrays(got.get("adapters", {}), layout["adapters"], where=where)
    restored_tree = apply_restore(plan, adapters, place=_place)
    new_opt = None
    if saved_opt:
      flat = verify_arrays({"o": got.get("opt_state", {})}, {"o": layout["opt_state"]}, where=where)["o"]
      if opt_def is not None:
        new_opt = jax.tree.unflatten(opt_def, [_place(flat[f"o{i:05d}"], t)
                                               for i, t in enumerate(template_leaves)])
    elif opt_state is not None:
      new_opt = opt_state
    rng = None
    if meta.get("rng") is not None:
      data = verify_arrays({"r": got.get("rng", {})}, {"r": layout["rng"]}, where=where)["r"]["data"]
      rng = _rng_from_host(meta["rng"], data)
    return Restored(step=step, tree=restored_tree, opt_state=new_opt, rng=rng,
                    data_state=meta.get("data_state"), metrics=meta.get("metrics"),
                    metadata=meta.get("metadata"))

  # -- queries --------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """The complete steps on disk, ascending.

    Example:
      >>> import jlora, tempfile
      >>> jlora.CheckpointManager(tempfile.mkdtemp()).all_steps()
      []
    """
    return sorted(int(s) for s in self._mgr.all_steps())

  def latest_step(self) -> int | None:
    """The latest complete step, or ``None``.

    Example:
      >>> import jlora, tempfile
      >>> jlora.CheckpointManager(tempfile.mkdtemp()).latest_step() is None
      True
    """
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The best complete step by ``best_metric`` (ties: the latest), or ``None``.

    Example:
      >>> import jlora, tempfile
      >>> jlora.CheckpointManager(tempfile.mkdtemp(), best_metric="loss").best_step() is None
      True
    """
    if self.best_metric is None:
      raise CheckpointError("best_step needs a best_metric; pass CheckpointManager(..., best_metric='loss')")
    best, best_val = None, None
    for s in self.all_steps():
      m = self.metrics(s)
      if not m or self.best_metric not in m:
        continue
      v = float(m[self.best_metric])
      better = best_val is None or (v <= best_val if self.best_mode == "min" else v >= best_val)
      if better:
        best, best_val = s, v
    return best

  def metrics(self, step: int) -> dict | None:
    """The metrics saved with ``step``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora, tempfile
      >>> tree = jlora.wrap({"k": jnp.ones((4, 4))}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
      >>> mgr = jlora.CheckpointManager(tempfile.mkdtemp(), async_save=False)
      >>> _ = mgr.save(3, tree, metrics={"loss": 0.5})
      >>> mgr.metrics(3)
      {'loss': 0.5}
    """
    return self._read_meta(step).get("metrics")

  def wait_until_finished(self) -> None:
    """Blocks until the background save (if any) is on disk.

    Example:
      >>> import jlora, tempfile
      >>> jlora.CheckpointManager(tempfile.mkdtemp()).wait_until_finished()
    """
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"a background save to {self.directory} failed: {_short(e)}; the "
                            f"complete checkpoints are {self.all_steps()}") from None
    finally:
      self._purge_trash()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads.

    Example:
      >>> import jlora, tempfile
      >>> jlora.CheckpointManager(tempfile.mkdtemp()).close()
    """
    try:
      self.wait_until_finished()
    finally:
      self._mgr.close()
      self._purge_trash()

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- private --------------------------------------------------------------------------------

  def _check_metrics(self, metrics: dict | None) -> dict | None:
    if metrics is None:
      if self.best_metric is not None:
        raise CheckpointError(f"this manager keeps the best steps by {self.best_metric!r}; pass "
                              f"metrics={{{self.best_metric!r}: value}} to save")
      return None
    if not isinstance(metrics, dict):
      raise CheckpointError(f"metrics must be a dict of numbers, got {type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
      try:
        f = float(np.asarray(jax.device_get(v)))
      except (TypeError, ValueError):
        raise CheckpointError(f"metric {k!r} is not a number: {v!r}") from None
      if not math.isfinite(f):
        raise CheckpointError(f"metric {k!r} is {f}; only finite metrics can rank checkpoints")
      out[str(k)] = f
    if self.best_metric is not None and self.best_metric not in out:
      raise CheckpointError(f"metrics {sorted(out)} lack the best metric {self.best_metric!r}")
    return out

  def _fingerprint(self, tree: Any) -> dict:
    bases = [x.w if is_adapted(x) else x for x in jax.tree.leaves(tree, is_leaf=is_adapted)
             if not (is_adapted(x) and "w" in x.trainable)]
    ident = tuple(id(x) for x in bases)
    if self._fp_cache is None or self._fp_cache[0] != ident:
      self._fp_cache = (ident, fingerprint(tree), bases)  # keep the bases alive: ids stay unique
    return self._fp_cache[1]

  def _read_meta(self, step: int) -> dict:
    ocp = self._ocp
    where = f"{self.directory} step {step}"
    try:
      meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{where}: its metadata cannot be read ({_short(e)}); the step is "
                            f"corrupt: restore another one (available: {self.all_steps()})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      fmt = meta.get("format") if isinstance(meta, dict) else None
      raise CheckpointError(f"{where} is not a jlora training checkpoint (format {fmt!r})")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
      raise CheckpointError(f"{where}: format version {meta.get('format_version')!r} is newer than "
                            f"this jlora reads ({FORMAT_VERSION}); upgrade jlora")
    entries = meta.get("entries")
    if not isinstance(entries, list) or not entries or not isinstance(meta.get("opt_state"), list):
      raise CheckpointError(f"{where}: the metadata lacks its entries; the step is corrupt")
    for i, e in enumerate(entries):
      validate_entry(e, f"{where}: entries[{i}]")
    return meta

  def _purge_trash(self) -> None:
    trash = self.directory / _TRASH
    if not trash.is_dir():
      return
    for child in list(trash.iterdir()):
      shutil.rmtree(child, ignore_errors=True)


def _remove_partial_steps(directory: Path) -> None:
  """Removes the temporary folders of saves that never completed (a killed run), synchronously.

  Orbax removes them too, but in the background; doing it here means a manager never
  starts with a partial step on disk. One manager per directory at a time.
  """
  if not directory.is_dir():
    return
  for child in directory.iterdir():
    if _PARTIAL.fullmatch(child.name) and child.is_dir() and not child.is_symlink():
      shutil.rmtree(child, ignore_errors=True)


def _np_args(ocp, names: dict) -> dict:
  return {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names}


def _place(x: np.ndarray, like: Any) -> jax.Array:
  sharding = getattr(like, "sharding", None) if isinstance(like, jax.Array) else None
  if sharding is not None and tuple(like.shape) == tuple(x.shape):
    return jax.device_put(x, sharding)
  return jnp.asarray(x)


def _rng_to_host(rng: Any) -> tuple[dict, np.ndarray]:
  if isinstance(rng, jax.Array) and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    data = _host(jax.random.key_data(rng))
    kind, impl = "typed", str(jax.random.key_impl(rng))
  else:
    data = _host(rng)
    if data.dtype != np.uint32:
      raise CheckpointError(f"rng must be a jax.random.key or a uint32 PRNGKey array, got {data.dtype}")
    kind, impl = "raw", None
  return {"kind": kind, "impl": impl, "shape": list(data.shape), "dtype": _dtype_name(data.dtype),
          "sha256": _sha256(data)}, data


def _rng_from_host(info: dict, data: np.ndarray) -> jax.Array:
  if info.get("kind") == "typed":
    return jax.random.wrap_key_data(jnp.asarray(data), impl=info["impl"])
  return jnp.asarray(data)
