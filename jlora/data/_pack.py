"""Packing a batch of short sequences into a few full rows, with segment ids.

A batch of sentences padded to its longest one spends compute on padding; one
packed the jlora way puts several sentences in each row of ``width`` tokens
(first-fit decreasing), so nearly every position is a real token. The model
keeps them apart: attention only within a segment (``segment_ids``), positions
restarting at 0 in each, and the pooling of each sentence read from its own
tokens (``pool``). :class:`jlora.models.bert.BertForSequenceClassification`
takes these arrays and returns the same logits as the unpacked batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from jlora._errors import DataError

__all__ = ["pack_rows", "packed_rows_needed", "row_buckets"]


def _lengths(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  if "attention_mask" not in batch:
    raise DataError("packing needs an attention_mask (1 for real tokens) in the batch")
  mask = np.asarray(batch["attention_mask"])
  lengths = mask.sum(-1).astype(np.int64)
  if (lengths < 1).any():
    raise DataError("packing: a row has no real tokens (attention_mask all 0)")
  # real tokens must come first (right padding), as tokenizers pad for BERT
  if ((np.arange(mask.shape[-1])[None, :] < lengths[:, None]) != (mask != 0)).any():
    raise DataError("packing needs right-padded rows (real tokens first, then padding)")
  return lengths


def _first_fit_decreasing(lengths: np.ndarray, width: int) -> list[list[int]]:
  """Bins (lists of row indices) of total length <= width, longest rows placed first."""
  bins: list[list[int]] = []
  room: list[int] = []
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    for b, r in enumerate(room):
      if n <= r:
        bins[b].append(int(i))
        room[b] -= n
        break
    else:
      bins.append([int(i)])
      room.append(width - n)
  return bins


def packed_rows_needed(batch: Mapping[str, np.ndarray], width: int) -> int:
  """How many rows of ``width`` tokens :func:`pack_rows` fills with this batch.

  Example:
    >>> import numpy as np
    >>> mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    >>> packed_rows_needed({"attention_mask": mask}, 4)
    2
  """
  return len(_first_fit_decreasing(_lengths(batch), width))


def row_buckets(needed: Sequence[int], *, max_shapes: int = 4) -> list[int]:
  """A few row counts covering ``needed`` (each rounded up to the next bucket).

  The buckets are the smallest multiples of a common step (the smallest step
  that gives at most ``max_shapes`` distinct counts) that cover every value, so
  a run compiles at most ``max_shapes`` step shapes.

  Example:
    >>> row_buckets([11, 12, 14, 15, 17, 18])
    [12, 14, 16, 18]
  """
  needed = np.asarray(list(needed), np.int64)
  if needed.size == 0:
    raise DataError("row_buckets needs at least one row count")
  for step in range(1, int(needed.max()) + 1):
    buckets = sorted({int(-(-n // step) * step) for n in needed})
    if len(buckets) <= max_shapes:
      return buckets
  return [int(needed.max())]


def pack_rows(batch: Mapping[str, np.ndarray], width: int, *, rows: int | None = None,
              pooling: str = "mean", keep: Sequence[str] = ("labels",)) -> dict[str, np.ndarray]:
  """Packs a padded batch of ``N`` sequences into ``rows`` rows of ``width`` tokens.

  Args:
    batch: ``input_ids`` and ``attention_mask`` ``(N, L)`` (right-padded, ``L <=
      width``), optionally ``token_type_ids``, and per-sequence leaves named in ``keep``.
    width: tokens per packed row (at least the longest sequence).
    rows: pad the packing to this many rows (default: as many as it needs).
    pooling: ``"mean"`` (``pool`` weights ``1/len`` on each sequence's tokens) or
      ``"cls"`` (1 on its first token).
    keep: per-sequence leaves copied unchanged (labels, example masks).

  Returns:
    ``input_ids``, ``token_type_ids``, ``position_ids``, ``segment_ids`` (int32
    ``(rows, width)``; segment 0 is padding), ``pool`` (float32 ``(N, rows,
    width)``) and the ``keep`` leaves, in the original sequence order.

  Raises:
    DataError: a sequence longer than ``width``, or ``rows`` too few.

  Example:
    >>> import numpy as np
    >>> b = {"input_ids": np.array([[5, 6, 7, 0], [8, 9, 0, 0], [4, 0, 0, 0]]),
    ...      "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]),
    ...      "labels": np.array([0, 1, 1])}
    >>> p = pack_rows(b, 4)
    >>> p["input_ids"].tolist(), p["segment_ids"].tolist(), p["position_ids"].tolist()
    ([[5, 6, 7, 4], [8, 9, 0, 0]], [[1, 1, 1, 2], [1, 1, 0, 0]], [[0, 1, 2, 0], [0, 1, 0, 0]])
    >>> p["pool"][2].tolist()
    [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
  """
  if pooling not in ("mean", "cls"):
    raise DataError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
  lengths = _lengths(batch)
  n = lengths.size
  if lengths.max() > width:
    raise DataError(f"a sequence of {int(lengths.max())} tokens does not fit a packed row of "
                    f"{width}; raise the width or truncate (data.max_length)")
  bins = _first_fit_decreasing(lengths, width)
  if rows is None:
    rows = len(bins)
  if len(bins) > rows:
    raise DataError(f"the batch needs {len(bins)} packed rows of {width} tokens, more than "
                    f"rows={rows}")
  ids = np.asarray(batch["input_ids"])
  types = np.asarray(batch["token_type_ids"]) if "token_type_ids" in batch else None
  out_ids = np.zeros((rows, width), np.int32)
  out_types = np.zeros((rows, width), np.int32)
  out_pos = np.zeros((rows, width), np.int32)
  out_seg = np.zeros((rows, width), np.int32)
  pool = np.zeros((n, rows, width), np.float32)
  for r, members in enumerate(bins):
    at = 0
    for s, i in enumerate(members, start=1):
      k = int(lengths[i])
      out_ids[r, at:at + k] = ids[i, :k]
      if types is not None:
        out_types[r, at:at + k] = types[i, :k]
      out_pos[r, at:at + k] = np.arange(k)
      out_seg[r, at:at + k] = s
      if pooling == "mean":
        pool[i, r, at:at + k] = 1.0 / k
      else:
        pool[i, r, at] = 1.0
      at += k
  out = {"input_ids": out_ids, "token_type_ids": out_types, "position_ids": out_pos,
         "segment_ids": out_seg, "pool": pool}
  for k in keep:
    if k in batch:
      out[k] = np.asarray(batch[k])
  return out
