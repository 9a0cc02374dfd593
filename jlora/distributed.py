"""Multi-host training with JAX's multi-controller runtime.

Every process runs the same program. :func:`initialize` connects them
(``jax.distributed.initialize``; on Cloud TPU and SLURM clusters the arguments
are detected). Each process then reads only its own rows of every global
batch (:func:`process_rows`, or ``jlora.data.batches(..., process_index=,
process_count=)``, which gives the same rows) and :func:`global_batch` turns
them into global ``jax.Array`` s with ``jax.make_array_from_process_local_data``.
In one process these helpers are no-ops, so the same script runs on a laptop.

Example:
  >>> import jax, numpy as np
  >>> from jlora import distributed, sharding
  >>> mesh = sharding.make_mesh((len(jax.devices()),))
  >>> rows = distributed.process_rows(16, mesh, sharding.P("data"))
  >>> rows
  slice(0, 16, None)
  >>> x = distributed.global_batch({"x": np.zeros((16, 3), np.int32)[rows]}, mesh, sharding.P("data"))
  >>> x["x"].shape
  (16, 3)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora._errors import ConfigError, ShardingError

__all__ = ["initialize", "process_rows", "global_batch", "is_primary", "sync", "to_host"]


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: int | Sequence[int] | None = None,
               cpu_collectives: str | None = "gloo", **kwargs: Any) -> None:
  """Connects this process to the others (``jax.distributed.initialize``); idempotent.

  Call it before anything else touches JAX devices (JAX refuses afterwards).
  With no arguments the cluster is detected (Cloud TPU, SLURM, Open MPI); the
  ``JLORA_COORDINATOR``, ``JLORA_NUM_PROCESSES`` and ``JLORA_PROCESS_ID``
  environment variables fill in the arguments left out. A single process
  without a coordinator is left alone.

  Args:
    coordinator_address: ``"host:port"`` of process 0's coordinator.
    num_processes: how many processes take part.
    process_id: this process's index.
    local_device_ids: the local devices this process uses (GPU clusters).
    cpu_collectives: collectives for the CPU backend (``"gloo"``; ``None``
      leaves JAX's default). Only the CPU backend reads it.
    **kwargs: passed to ``jax.distributed.initialize``.

  Raises:
    ConfigError: half-given arguments (a coordinator without a process count).

  Example:
    >>> from jlora import distributed
    >>> distributed.initialize("127.0.0.1:1234")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    jlora._errors.ConfigError: distributed.initialize: give coordinator_address, num_processes ...
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  coordinator_address = coordinator_address or env.get("JLORA_COORDINATOR")
  if num_processes is None and env.get("JLORA_NUM_PROCESSES"):
    num_processes = int(env["JLORA_NUM_PROCESSES"])
  if process_id is None and env.get("JLORA_PROCESS_ID"):
    process_id = int(env["JLORA_PROCESS_ID"])
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if explicit and (coordinator_address is None or num_processes is None or process_id is None):
    raise ConfigError(
        "distributed.initialize: give coordinator_address, num_processes and process_id together "
        f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}), or none of them on a "
        "cluster JAX detects (Cloud TPU, SLURM)")
  if not explicit:
    try:  # JAX's own cluster detection (Cloud TPU, SLURM, Open MPI, ...)
      jax.distributed.initialize(local_device_ids=local_device_ids, **kwargs)
    except ValueError as e:
      if "coordinator_address" in str(e):
        return  # no cluster around: a lone process
      raise
    return
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             local_device_ids=local_device_ids, **kwargs)


def process_rows(global_batch_size: int, mesh: Mesh, spec: PartitionSpec) -> slice:
  """The rows of each global batch that this process's devices hold (and so must read).

  With the mesh made by :func:`jlora.sharding.make_mesh` (processes own
  consecutive devices) this is ``[p * B / P, (p + 1) * B / P)``, the slice
  ``jlora.data.batches(..., process_index=p, process_count=P)`` yields. A batch
  the mesh does not split across processes is read whole by every process.

  Args:
    global_batch_size: B, the rows of one global batch.
    mesh: the mesh.
    spec: the batch's spec (its first entry splits the rows).

  Returns:
    A ``slice`` of rows.

  Raises:
    ShardingError: the mesh does not divide B, or gives this process rows that
      are not contiguous (reorder the mesh's devices).

  Example:
    >>> import jax
    >>> from jlora import distributed, sharding
    >>> mesh = sharding.make_mesh((len(jax.devices()),))
    >>> distributed.process_rows(8, mesh, sharding.P("data"))
    slice(0, 8, None)
  """
  spec = PartitionSpec(*tuple(spec)[:1])
  _check_axes(mesh, spec)
  sharding = NamedSharding(mesh, spec)
  _check_leaf("batch", (global_batch_size,), sharding)
  pid = jax.process_index()
  index_map = sharding.devices_indices_map((global_batch_size,))
  rows = set()
  for device, (idx,) in index_map.items():
    if device.process_index == pid:
      rows.update(range(*idx.indices(global_batch_size)))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ShardingError(
        f"process {pid} holds rows {sorted(rows)[:8]}... of the batch, which are not contiguous; "
        "build the mesh with jlora.sharding.make_mesh so each process owns consecutive devices")
  return slice(lo, hi)


def global_batch(local_batch: Any, mesh: Mesh, spec: PartitionSpec) -> Any:
  """Assembles every process's rows into global ``jax.Array`` s sharded by ``spec``.

  Each array leaf holds this process's rows (:func:`process_rows`; in one
  process, the whole batch); its leading dimension is split as ``spec``
  says. Scalars are replicated. ``jax.Array`` leaves already sharded on the
  mesh pass through.

  Args:
    local_batch: a pytree of numpy (or jax) arrays, this process's rows.
    mesh: the mesh.
    spec: the batch's spec, e.g. ``P("data")`` or ``P(("data", "model"))``.

  Returns:
    The same pytree of global arrays.

  Raises:
    ShardingError: a leaf whose rows the mesh cannot split (the message names it).

  Example:
    >>> import jax, numpy as np
    >>> from jlora import distributed, sharding
    >>> mesh = sharding.make_mesh((len(jax.devices()),))
    >>> b = distributed.global_batch({"ids": np.ones((8, 4), np.int32)}, mesh, sharding.P("data"))
    >>> b["ids"].sharding.spec
    P('data',)
  """
  spec = PartitionSpec(*tuple(spec)[:1])
  _check_axes(mesh, spec)

  def place(kp, x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    name = jax.tree_util.keystr(kp)
    target = NamedSharding(mesh, spec if np.ndim(x) else PartitionSpec())
    if isinstance(x, jax.Array) and jax.process_count() == 1:
      _check_leaf(name, x.shape, target)
      return x if x.sharding == target else jax.device_put(x, target)
    host = np.asarray(x)
    if not host.ndim:
      return jax.make_array_from_process_local_data(target, host, ())
    total, mine = _row_blocks(target)
    if host.shape[0] % mine:
      raise ShardingError(
          f"batch leaf {name}: this process holds {host.shape[0]} rows, which its {mine} "
          f"devices' row blocks do not divide; use a global batch that is a multiple of {total}")
    global_shape = (host.shape[0] * total // mine,) + host.shape[1:]
    _check_leaf(name, global_shape, target)
    return jax.make_array_from_process_local_data(target, host, global_shape)

  return jax.tree_util.tree_map_with_path(place, local_batch)


def is_primary() -> bool:
  """True in process 0 (the one that prints and writes summaries).

  Example:
    >>> from jlora import distributed
    >>> distributed.is_primary()
    True
  """
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier: returns once every process has reached ``sync(name)``.

  Example:
    >>> from jlora import distributed
    >>> distributed.sync("start")
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
  """Every process gets the full value of each (sharded) array as numpy.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora import distributed
    >>> distributed.to_host({"x": jnp.arange(3)})["x"].tolist()
    [0, 1, 2]
  """
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)


# ----------------------------------------------------------------------------------------------
# Private helpers.


def _check_axes(mesh: Mesh, spec: PartitionSpec) -> None:
  if not len(spec) or spec[0] is None:
    return
  axes = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
  for ax in axes:
    if ax not in mesh.shape:
      raise ShardingError(
          f"the batch (dimension 0) is split over mesh axis {ax!r}, which the mesh "
          f"{tuple(mesh.axis_names)} does not have; use one of its axes or None")


def _check_leaf(name: str, shape, sharding: NamedSharding) -> None:
  spec = sharding.spec
  if not shape or not len(spec) or spec[0] is None:
    return
  axes = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
  n = int(np.prod([sharding.mesh.shape[a] for a in axes]))
  if shape[0] % n:
    raise ShardingError(
        f"batch leaf {name}: dimension 0 has {shape[0]} rows, which mesh axes {axes} "
        f"(size {n}) do not divide; use a global batch that is a multiple of {n}")


def _row_blocks(sharding: NamedSharding) -> tuple[int, int]:
  """(row blocks of the global batch, how many of them this process's devices hold)."""
  spec = sharding.spec
  if not len(spec) or spec[0] is None:
    return 1, 1
  axes = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
  total = int(np.prod([sharding.mesh.shape[a] for a in axes]))
  pid = jax.process_index()
  mine = {idx[0].indices(total)[0] for device, idx in
          sharding.devices_indices_map((total,)).items() if device.process_index == pid}
  return total, len(mine)
