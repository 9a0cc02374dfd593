"""The packaged sentiment corpus of Hutto & Gilbert (ICWSM 2014), from vaderSentiment 3.3.2."""

from __future__ import annotations

import functools
import hashlib
import tarfile
from pathlib import Path

import datasets

from jlora._errors import ConfigError, DataError

__all__ = ["SENTIMENT_DOMAINS", "SPLIT_FRACTIONS", "load_sentiment", "sentiment_split_of"]

#: Domain name -> ground-truth file inside ``hutto_ICWSM_2014.tar.gz``.
SENTIMENT_DOMAINS: dict[str, str] = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}

#: (train, validation) cumulative cut points of the split hash; test is the rest.
SPLIT_FRACTIONS: tuple[float, float] = (0.8, 0.9)

_SPLITS = ("train", "validation", "test")
_ARCHIVE = Path("vaderSentiment-3.3.2") / "additional_resources" / "hutto_ICWSM_2014.tar.gz"
_MEMBER_DIR = "hutto_ICWSM_2014"


def load_sentiment(
    *,
    domain: str = "movies",
    split: str | None = None,
    binary: bool = True,
    seed: int = 0,
) -> datasets.DatasetDict | datasets.Dataset:
  """Sentence-level sentiment data with human ratings, shipped inside vaderSentiment 3.3.2.

  The corpus (Hutto & Gilbert, ICWSM 2014) comes in four domains, each a
  ground-truth file of ``id<TAB>mean rating<TAB>text`` with the mean of 10-20
  human ratings on [-4, 4]:

  ====== ====================================================== =======
  domain source                                                  rows
  ====== ====================================================== =======
  movies rotten tomatoes review sentences (Pang & Lee 2004)      10,605
  tweets tweet-like texts (4,000 from Twitter + 200 contrived)    4,200
  amazon product review sentences (Hu & Liu 2004)                 3,708
  nyt    New York Times opinion editorial sentences                5,190
  ====== ====================================================== =======

  The archive is read with ``tarfile`` straight from the pip sdist fetched
  (and sha256-checked) by :func:`jlora._fetch.fetch`; nothing else is written.
  Texts are kept verbatim (tweets keep HTML entities such as ``&amp;``).

  **Split.** Each row goes to train / validation / test by a stable hash of its
  text: ``u = int(sha256(f"{seed}:{key}")[:16], 16) / 2**64`` where ``key`` is
  the text lower-cased with whitespace runs collapsed; ``u < 0.8`` -> train,
  ``u < 0.9`` -> validation, else test (see :func:`sentiment_split_of`). The
  split depends on nothing but the text and ``seed`` (the same on every
  machine and version), duplicate sentences always land in the same split,
  and the binary and 3-class views share it. ``seed=0`` is the canonical
  split; other seeds give other equally stable splits. Sizes are therefore
  close to, not exactly, 80/10/10. Rows keep the file's order within a split.

  **Labels.** ``binary=True``: rating > 0 -> 1 (positive), rating < 0 -> 0
  (negative), rows with a mean rating of exactly 0 are dropped (movies: 37 of
  10,605; tweets 4; amazon 98; nyt 244). ``binary=False`` keeps every row with
  3 classes: 0 negative (< 0), 1 neutral (== 0), 2 positive (> 0). The
  ``label`` column is a ``datasets.ClassLabel`` so tasks can read the number
  of classes from it.

  Args:
    domain: ``"movies"``, ``"tweets"``, ``"amazon"`` or ``"nyt"``.
    split: ``None`` for a ``DatasetDict`` of ``train`` / ``validation`` /
      ``test``; one of those names for a single ``Dataset``; ``"all"`` for
      every row, unsplit, in file order.
    binary: binary labels (neutral rows dropped) or 3 classes.
    seed: salt of the split hash (0 = canonical split).

  Returns:
    A ``DatasetDict`` or ``Dataset`` with columns ``id`` (str, the corpus's
    id), ``text`` (str), ``label`` (ClassLabel) and ``rating`` (float64, the
    mean human rating).

  Raises:
    ConfigError: unknown domain or split, or a bad seed.
    FetchError: the packaged archive could not be fetched.
    DataError: the archive does not hold the expected file or a line is
      malformed.

  Example:
    >>> from jlora.data import load_sentiment
    >>> ds = load_sentiment(domain="movies")  # doctest: +SKIP
    >>> ds["train"][0]["label"], ds["train"].features["label"].names  # doctest: +SKIP
    (1, ['negative', 'positive'])
  """
  if domain not in SENTIMENT_DOMAINS:
    raise ConfigError(
        f"load_sentiment: unknown domain {domain!r}; choose one of {sorted(SENTIMENT_DOMAINS)}.")
  if split is not None and split not in (*_SPLITS, "all"):
    raise ConfigError(
        f"load_sentiment: unknown split {split!r}; choose None, 'train', 'validation', "
        "'test' or 'all'.")
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise ConfigError(f"load_sentiment: seed must be an int, got {seed!r}.")
  rows = _read_domain(domain)
  if binary:
    names = ["negative", "positive"]
    rows = [r for r in rows if r[1] != 0.0]
    label_of = lambda x: int(x > 0)  # noqa: E731
  else:
    names = ["negative", "neutral", "positive"]
    label_of = lambda x: 0 if x < 0 else (1 if x == 0 else 2)  # noqa: E731
  features = datasets.Features({
      "id": datasets.Value("string"),
      "text": datasets.Value("string"),
      "label": datasets.ClassLabel(names=names),
      "rating": datasets.Value("float64"),
  })

  def build(part: list[tuple[str, float, str]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "id": [r[0] for r in part],
            "text": [r[2] for r in part],
            "label": [label_of(r[1]) for r in part],
            "rating": [r[1] for r in part],
        },
        features=features)

  if split == "all":
    return build(rows)
  parts: dict[str, list] = {s: [] for s in _SPLITS}
  for r in rows:
    parts[sentiment_split_of(r[2], seed=seed)].append(r)
  if split is not None:
    return build(parts[split])
  return datasets.DatasetDict({s: build(parts[s]) for s in _SPLITS})


def sentiment_split_of(text: str, *, seed: int = 0) -> str:
  """The split (``"train"``, ``"validation"`` or ``"test"``) :func:`load_sentiment` gives a text.

  Args:
    text: a sentence of the corpus (or any string).
    seed: the split salt (0 = canonical).

  Returns:
    The split name.

  Example:
    >>> sentiment_split_of("Effective but too tepid biopic")
    'train'
  """
  key = " ".join(text.lower().split())
  u = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16) / 2.0**64
  if u < SPLIT_FRACTIONS[0]:
    return "train"
  if u < SPLIT_FRACTIONS[1]:
    return "validation"
  return "test"


@functools.lru_cache(maxsize=None)
def _read_domain(domain: str) -> tuple[tuple[str, float, str], ...]:
  """(id, mean rating, text) rows of one domain, in file order."""
  from jlora._fetch import fetch

  archive = fetch("vadersentiment") / _ARCHIVE
  if not archive.is_file():
    raise DataError(
        f"load_sentiment: {archive} is missing from the fetched vaderSentiment sdist; "
        "delete that cache directory and retry.")
  member = f"{_MEMBER_DIR}/{SENTIMENT_DOMAINS[domain]}"
  with tarfile.open(archive, "r:gz") as tar:
    try:
      f = tar.extractfile(member)
    except KeyError:
      f = None
    if f is None:
      raise DataError(f"load_sentiment: {archive.name} holds no file {member!r}.")
    raw = f.read()
  return _parse_ground_truth(raw, member)


def _parse_ground_truth(raw: bytes, name: str) -> tuple[tuple[str, float, str], ...]:
  text = raw.decode("utf-8-sig")
  lines = text.replace("\r\n", "\n").split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  rows = []
  seen = set()
  for n, line in enumerate(lines, 1):
    parts = line.split("\t", 2)
    if len(parts) != 3:
      raise DataError(f"load_sentiment: {name} line {n} has {len(parts)} tab fields, not 3.")
    rid, rating, sentence = parts
    try:
      value = float(rating)
    except ValueError:
      raise DataError(f"load_sentiment: {name} line {n}: rating {rating!r} is not a number.") from None
    if rid in seen:
      raise DataError(f"load_sentiment: {name} line {n}: duplicate id {rid!r}.")
    seen.add(rid)
    rows.append((rid, value, sentence))
  return tuple(rows)
