"""Deterministic, shardable, resumable numpy batch iteration."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import datasets
import numpy as np

from jlora._errors import ConfigError, DataError

__all__ = ["Batches", "batches", "epoch_order"]

_M64 = (1 << 64) - 1


def batches(
    dataset_or_features: datasets.Dataset | Mapping[str, Any],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    start: int = 0,
) -> Batches:
  """Iterates one epoch of numpy batches, deterministically.

  **Order.** Without ``shuffle`` the rows are taken in order. With it, the
  epoch's order is :func:`epoch_order` ``(n, seed, epoch)``: a permutation
  computed from ``(seed, epoch)`` alone with a fixed 64-bit hash (splitmix64),
  so it is identical across runs, machines and numpy versions, and differs
  between epochs.

  **Global batches and processes.** ``batch_size`` is the GLOBAL batch size.
  Global batch ``b`` holds rows ``order[b*B:(b+1)*B]``; process ``p`` of
  ``P`` yields the contiguous slice ``[p*B/P, (p+1)*B/P)`` of it, so every
  process reads only its own rows, the processes together cover each global
  batch exactly once, and the global batch (hence training) does not depend
  on the number of processes. ``B`` must be divisible by ``P``. Pass
  ``jax.process_index()`` / ``jax.process_count()`` and assemble with
  ``jax.make_array_from_process_local_data``.

  **Remainder.** ``drop_remainder=True`` yields ``n // B`` full batches (the
  last ``n % B`` rows of the epoch's order are skipped; with shuffling they
  differ per epoch). ``False`` yields ``ceil(n / B)`` batches, the last one
  padded with zero rows to the full size, and adds a boolean
  ``"example_mask"`` ``[B/P]`` to EVERY batch (True for real rows): weight
  losses and metrics by it. Shapes never change, so ``jax.jit`` compiles once.

  **Resume.** ``start=k`` begins at global batch ``k`` of the epoch: the
  batches yielded are exactly those an iterator started at 0 yields after its
  first ``k``. :attr:`Batches.position` is the index of the next batch, the
  value to checkpoint.

  Args:
    dataset_or_features: a mapping of equal-length arrays (a task's output) or
      a ``datasets.Dataset`` (its columns as numpy arrays).
    batch_size: global batch size B.
    shuffle: shuffle the rows (per epoch) or keep their order.
    seed: shuffling seed, a non-negative int.
    epoch: epoch number, a non-negative int (changes the order when shuffling).
    drop_remainder: drop the last partial batch, or pad it (see above).
    process_index: this process's index in ``[0, process_count)``.
    process_count: number of processes sharing each global batch.
    start: global batch to begin at, in ``[0, num_batches]``.

  Returns:
    A :class:`Batches` iterator of ``dict[str, np.ndarray]`` with leading
    dimension ``B / process_count``; ``len()`` gives the batches left.

  Raises:
    DataError: no rows, columns of different lengths, or fewer rows than one
      batch with ``drop_remainder=True``.
    ConfigError: bad batch_size / seed / epoch / process_index /
      process_count / start.

  Example:
    >>> import numpy as np
    >>> feats = {"x": np.arange(10)}
    >>> [b["x"].tolist() for b in batches(feats, 4, shuffle=False)]
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> [b["x"].tolist() for b in batches(feats, 4, shuffle=False, process_index=1,
    ...                                   process_count=2)]
    [[2, 3], [6, 7]]
    >>> it = batches(feats, 4, shuffle=False, drop_remainder=False, start=2)
    >>> b = next(it); b["x"].tolist(), b["example_mask"].tolist()
    ([8, 9, 0, 0], [True, True, False, False])
  """
  for name, v in (("batch_size", batch_size), ("process_count", process_count)):
    if not _is_int(v) or v < 1:
      raise ConfigError(f"batches: {name} must be a positive int, got {v!r}.")
  for name, v in (("seed", seed), ("epoch", epoch), ("start", start),
                  ("process_index", process_index)):
    if not _is_int(v) or v < 0:
      raise ConfigError(f"batches: {name} must be a non-negative int, got {v!r}.")
  if seed > _M64 or epoch > _M64:
    raise ConfigError("batches: seed and epoch must be below 2**64.")
  if process_index >= process_count:
    raise ConfigError(
        f"batches: process_index={process_index} is not in [0, process_count={process_count}).")
  if batch_size % process_count:
    raise ConfigError(
        f"batches: batch_size={batch_size} is the global batch and must be divisible by "
        f"process_count={process_count}; use a multiple of {process_count}.")
  arrays = _as_arrays(dataset_or_features)
  if not drop_remainder and "example_mask" in arrays:
    raise DataError(
        "batches: the data already has an 'example_mask' column, which drop_remainder=False "
        "adds; rename it.")
  n = next(iter(arrays.values())).shape[0]
  if drop_remainder and n < batch_size:
    raise DataError(
        f"batches: the data has {n} rows, fewer than one batch of {batch_size}; lower "
        "batch_size or pass drop_remainder=False.")
  num = n // batch_size if drop_remainder else -(-n // batch_size)
  if start > num:
    raise ConfigError(
        f"batches: start={start} is past the end of the epoch ({num} batches); reset it to "
        "0 and advance the epoch.")
  order = epoch_order(n, seed, epoch) if shuffle else np.arange(n, dtype=np.int64)
  return Batches(arrays, order, batch_size, process_index, process_count, num, start,
                 pad=not drop_remainder)


class Batches(Iterator[dict[str, np.ndarray]]):
  """The iterator :func:`batches` returns.

  Attributes:
    num_batches: global batches in the epoch.
    position: index of the next global batch (checkpoint it; pass as ``start``).
    local_batch_size: rows per yielded batch (``batch_size / process_count``).

  Example:
    >>> import numpy as np
    >>> it = batches({"x": np.arange(6)}, 2, shuffle=False)
    >>> len(it), next(it)["x"].tolist(), it.position, len(it)
    (3, [0, 1], 1, 2)
  """

  def __init__(self, arrays: dict[str, np.ndarray], order: np.ndarray, batch_size: int,
               process_index: int, process_count: int, num_batches: int, start: int, *,
               pad: bool) -> None:
    """Internal; use :func:`batches`."""
    self._arrays = arrays
    self._order = order
    self._batch_size = batch_size
    self._pad = pad
    self.local_batch_size = batch_size // process_count
    self._offset = process_index * self.local_batch_size
    self.num_batches = num_batches
    self.position = start

  def __len__(self) -> int:
    return self.num_batches - self.position

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.position >= self.num_batches:
      raise StopIteration
    b = self.position
    lo = b * self._batch_size + self._offset
    idx = self._order[lo:lo + self.local_batch_size]
    self.position += 1
    if not self._pad:
      return {k: v[idx] for k, v in self._arrays.items()}
    valid = np.zeros(self.local_batch_size, dtype=bool)
    valid[:idx.size] = True
    take = np.zeros(self.local_batch_size, dtype=np.int64)
    take[:idx.size] = idx
    out = {}
    for k, v in self._arrays.items():
      x = v[take]
      if idx.size < self.local_batch_size:
        x[idx.size:] = np.zeros((), dtype=v.dtype)
      out[k] = x
    out["example_mask"] = valid
    return out


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The row order :func:`batches` uses for ``shuffle=True``.

  ``argsort(splitmix64(arange(n) XOR key))`` with ``key = splitmix64(
  splitmix64(seed) XOR epoch)``; splitmix64 is a bijection of 64-bit integers,
  so the sort keys are distinct and the result is a permutation, the same on
  every machine.

  Args:
    n: number of rows.
    seed: non-negative int.
    epoch: non-negative int.

  Returns:
    An int64 permutation of ``range(n)``.

  Example:
    >>> sorted(epoch_order(5, seed=0, epoch=0).tolist())
    [0, 1, 2, 3, 4]
  """
  key = _splitmix64_int(_splitmix64_int(seed & _M64) ^ (epoch & _M64))
  x = np.arange(n, dtype=np.uint64) ^ np.uint64(key)
  return np.argsort(_splitmix64_np(x), kind="stable").astype(np.int64)


def _splitmix64_int(x: int) -> int:
  x = (x + 0x9E3779B97F4A7C15) & _M64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
  return x ^ (x >> 31)


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _as_arrays(data: Any) -> dict[str, np.ndarray]:
  if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
    raise DataError(
        f"batches: got a DatasetDict with splits {list(data)}; pass one split, e.g. "
        "data['train'].")
  if isinstance(data, datasets.Dataset):
    if len(data) == 0:
      raise DataError("batches: the dataset is empty (0 rows).")
    data = data.with_format("numpy")[:]
  if not isinstance(data, Mapping):
    raise DataError(
        f"batches: expected a mapping of arrays or a datasets.Dataset, got {type(data).__name__}.")
  if not data:
    raise DataError("batches: no columns given.")
  arrays = {}
  for k, v in data.items():
    a = np.asarray(v)
    if a.ndim == 0:
      raise DataError(f"batches: column {k!r} is a scalar; every column needs a leading row axis.")
    arrays[str(k)] = a
  sizes = {k: a.shape[0] for k, a in arrays.items()}
  if len(set(sizes.values())) > 1:
    raise DataError(f"batches: columns have different numbers of rows {sizes}.")
  if not next(iter(sizes.values())):
    raise DataError("batches: the data has 0 rows.")
  return arrays
