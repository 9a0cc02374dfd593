"""Data for fine-tuning: corpora, local files, tasks and deterministic batches.

* :func:`load_sentiment`: the sentiment corpus packaged in vaderSentiment 3.3.2
  (movie reviews, tweets, Amazon reviews, NYT editorials) with a stable split.
* :func:`load_files` / :func:`load_hub`: local json / jsonl / csv / parquet /
  text files, or the Hugging Face hub, through ``datasets.load_dataset``.
* :class:`ClassificationTask`, :class:`CausalLMTask`, :class:`InstructionTask`:
  validate a dataset and turn it into fixed-shape int32 numpy features.
* :func:`pack_rows`: several short sequences per row with segment ids, for
  classification batches that spend no compute on padding.
* :func:`batches`: a seeded, per-epoch, multi-process-sharded, resumable
  iterator of numpy batches over those features.

Example:
  >>> import numpy as np
  >>> from jlora.data import batches
  >>> [b["x"].tolist() for b in batches({"x": np.arange(4)}, 2, shuffle=False)]
  [[0, 1], [2, 3]]
"""

from jlora.data._batches import Batches, batches, epoch_order
from jlora.data._corpus import SENTIMENT_DOMAINS, SPLIT_FRACTIONS, load_sentiment, sentiment_split_of
from jlora.data._pack import pack_rows, packed_rows_needed, row_buckets
from jlora.data._files import FILE_FORMATS, load_files, load_hub
from jlora.data._tasks import (
    IGNORE_INDEX,
    CausalLMTask,
    ClassificationTask,
    InstructionTask,
    TruncationWarning,
)

__all__ = [
    "IGNORE_INDEX",
    "FILE_FORMATS",
    "SENTIMENT_DOMAINS",
    "SPLIT_FRACTIONS",
    "Batches",
    "CausalLMTask",
    "ClassificationTask",
    "InstructionTask",
    "TruncationWarning",
    "batches",
    "epoch_order",
    "load_files",
    "load_hub",
    "load_sentiment",
    "pack_rows",
    "packed_rows_needed",
    "row_buckets",
    "sentiment_split_of",
]
