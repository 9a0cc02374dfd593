"""Local data files (json, jsonl, csv, parquet, text) and the Hugging Face hub."""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from jlora._errors import ConfigError, DataError

__all__ = ["FILE_FORMATS", "load_files", "load_hub"]

#: File extension -> ``datasets`` packaged builder.
FILE_FORMATS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}
_BUILDERS = ("json", "csv", "parquet", "text")


def load_files(
    paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike]
    | Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
    *,
    format: str | None = None,  # noqa: A002
    **kwargs: Any,
) -> datasets.Dataset | datasets.DatasetDict:
  """Loads local files through ``datasets.load_dataset(<builder>, data_files=...)``.

  Formats: ``json`` (a JSON array / object of columns, or JSON lines: ``.json``
  and ``.jsonl``), ``csv`` (``.csv``; ``.tsv`` is read as csv with
  ``delimiter="\\t"``), ``parquet`` and ``text`` (``.txt``: one row per line in
  a ``text`` column). Without ``format`` it is inferred from the extensions,
  which must then agree. Globs (``*``, ``?``, ``[``) are expanded here and
  every path is checked to exist before ``datasets`` is called. ``datasets``
  caches the converted Arrow files in its cache directory (``HF_DATASETS_CACHE``
  or ``cache_dir=``) as usual.

  Args:
    paths_or_glob: a path, a glob, a list of them (one ``Dataset``), or a
      mapping ``{split: path(s) or glob}`` (a ``DatasetDict``).
    format: ``"json"``, ``"csv"``, ``"parquet"`` or ``"text"``; inferred when None.
    **kwargs: passed on to ``datasets.load_dataset`` (``delimiter=``,
      ``field=``, ``cache_dir=``, ...).

  Returns:
    A ``Dataset`` (the rows of all files, in the order given, globs sorted),
    or a ``DatasetDict`` when a mapping was given.

  Raises:
    DataError: no file matches, a path is missing, or an extension is unknown /
      the extensions disagree (pass ``format=``).
    ConfigError: unknown ``format``.

  Example:
    >>> import json, pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.jsonl").write_text(json.dumps({"text": "hi", "label": 1}) + "\\n")
    >>> load_files(str(d / "*.jsonl"))["text"][:]  # doctest: +SKIP
    ['hi']
  """
  if format is not None and format not in _BUILDERS:
    raise ConfigError(f"load_files: unknown format {format!r}; choose one of {list(_BUILDERS)}.")
  if isinstance(paths_or_glob, Mapping):
    if not paths_or_glob:
      raise DataError("load_files: the mapping of splits is empty.")
    files = {str(k): _expand(v) for k, v in paths_or_glob.items()}
    every = [p for v in files.values() for p in v]
  else:
    files = _expand(paths_or_glob)
    every = files
  builder = format or _infer_format(every)
  if builder == "csv" and "delimiter" not in kwargs and "sep" not in kwargs:
    if all(p.lower().endswith(".tsv") for p in every):
      kwargs["delimiter"] = "\t"
  if isinstance(files, dict):
    return datasets.load_dataset(builder, data_files=files, **kwargs)
  return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)


def load_hub(name: str, *args: Any, **kwargs: Any) -> Any:
  """``datasets.load_dataset(name, *args, **kwargs)``, for data on the Hugging Face hub.

  A thin pass-through so user code can stay inside ``jlora.data``; it needs
  network access (or a filled hub cache) and is not exercised by jlora's tests.

  Args:
    name: the hub dataset id (``"imdb"``, ``"glue"``) or a builder name.
    *args: passed on (for instance a configuration name, ``"sst2"``).
    **kwargs: passed on (``split=``, ``revision=``, ``streaming=`` ...).

  Returns:
    Whatever ``datasets.load_dataset`` returns.

  Raises:
    ConfigError: ``name`` is not a non-empty string.

  Example:
    >>> sst2 = load_hub("glue", "sst2", split="train")  # doctest: +SKIP
  """
  if not isinstance(name, str) or not name:
    raise ConfigError(f"load_hub: name must be a non-empty string, got {name!r}.")
  return datasets.load_dataset(name, *args, **kwargs)


def _expand(spec: Any) -> list[str]:
  items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
  if not items:
    raise DataError("load_files: no paths given.")
  out: list[str] = []
  for item in items:
    s = os.fspath(item)
    if any(c in s for c in "*?["):
      hits = sorted(_glob.glob(s, recursive=True))
      hits = [h for h in hits if Path(h).is_file()]
      if not hits:
        raise DataError(f"load_files: no file matches {s!r}; check the pattern and directory.")
      out.extend(hits)
    else:
      if not Path(s).is_file():
        raise DataError(f"load_files: {s!r} does not exist or is not a file.")
      out.append(s)
  return out


def _infer_format(paths: list[str]) -> str:
  kinds = {}
  for p in paths:
    ext = Path(p).suffix.lower()
    if ext not in FILE_FORMATS:
      raise DataError(
          f"load_files: cannot infer the format of {p!r} (extension {ext!r}); known "
          f"extensions {sorted(FILE_FORMATS)}; pass format='json'|'csv'|'parquet'|'text'.")
    kinds.setdefault(FILE_FORMATS[ext], p)
  if len(kinds) > 1:
    raise DataError(
        f"load_files: files of different formats {sorted(kinds)} (e.g. {list(kinds.values())}); "
        "load them separately or pass format=.")
  return next(iter(kinds))
