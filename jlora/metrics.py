"""Evaluation metrics: token NLL / perplexity, classification scores, text overlap.

Two families live here:

* :func:`nll` and :func:`perplexity` are written in ``jax.numpy``: they take
  logits and integer labels (numpy or JAX arrays) and work inside ``jax.jit``
  (value checks on labels then run only on concrete inputs).
* :func:`accuracy`, :func:`precision`, :func:`recall`, :func:`f1` and
  :func:`roc_auc` take 1-D arrays (numpy, JAX or lists) and return Python floats
  (or a numpy array for ``average=None``). They follow scikit-learn's
  definitions exactly, including its ``zero_division`` rule, and the test-suite
  checks them against scikit-learn on random inputs. scikit-learn itself is not
  needed at run time.
* :func:`exact_match` is pure Python; :func:`bleu` and :func:`rouge` wrap the
  reference implementations ``sacrebleu`` and ``rouge-score``, imported lazily
  (``pip install sacrebleu rouge-score``).

Labels convention (shared with :mod:`jlora.data`): language-model labels are
already shifted, ``labels[..., t]`` is the target of ``logits[..., t]``, and
``-100`` marks a position that is not scored. Pass ``shift=True`` for
Hugging Face style unshifted labels (``labels == input_ids``).
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._errors import ConfigError, DataError

__all__ = [
    "UndefinedMetricWarning",
    "nll",
    "perplexity",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "exact_match",
    "normalize_answer",
    "bleu",
    "rouge",
]

IGNORE_INDEX = -100
_AVERAGES = ("binary", "micro", "macro", "weighted", None)


class UndefinedMetricWarning(UserWarning):
  """A precision / recall / F1 had a zero denominator and ``zero_division="warn"``."""


# --------------------------------------------------------------------------- #
# Language modelling
# --------------------------------------------------------------------------- #


def nll(
    logits: Any,
    labels: Any,
    mask: Any = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = False,
    reduction: str = "mean",
) -> jax.Array:
  """Negative log-likelihood of integer labels under softmax(logits).

  A position counts when its label is not ``ignore_index`` and, if ``mask`` is
  given, its mask is non-zero. The log-softmax is computed in float32 whatever
  the logits' dtype.

  Args:
    logits: ``[..., V]`` unnormalised scores (any float dtype).
    labels: ``[...]`` integer targets in ``[0, V)`` or ``ignore_index``.
    mask: optional ``[...]`` 0/1 (or bool) weights; 0 drops a position.
    ignore_index: label value that marks a position not scored.
    shift: False (jlora's convention): ``labels[..., t]`` is the target of
      ``logits[..., t]``. True (Hugging Face's convention, ``labels ==
      input_ids``): position ``t`` predicts ``labels[..., t + 1]``; the last
      logit and the first label (and mask entry) are dropped before scoring.
    reduction: ``"mean"`` (sum over counted positions divided by their number;
      0.0 when no position counts, so a fully padded batch adds nothing to a
      loss), ``"sum"``, or ``"none"`` (per-position loss, 0 where not counted).

  Returns:
    A float32 JAX scalar (or an array of ``labels``' shape for ``"none"``).

  Raises:
    DataError: shapes disagree, or (on concrete inputs) a counted label is
      outside ``[0, V)``.
    ConfigError: unknown ``reduction``.

  Example:
    >>> import numpy as np
    >>> logits = np.log(np.array([[0.5, 0.5], [0.25, 0.75]]))
    >>> round(float(nll(logits, np.array([0, 1]))), 4)  # (ln 2 + ln 4/3) / 2
    0.4904
    >>> round(float(nll(logits, np.array([0, -100]))), 4)
    0.6931

  For a whole evaluation set, add ``nll(..., reduction="sum")`` and the number
  of counted positions over batches, then take ``exp(total / count)``.
  """
  if reduction not in ("mean", "sum", "none"):
    raise ConfigError(f"nll: reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim < 1 or logits.shape[:-1] != labels.shape:
    raise DataError(
        f"nll: logits shape {tuple(logits.shape)} must be labels shape "
        f"{tuple(labels.shape)} plus a vocabulary axis; pass logits [..., V] "
        "and labels [...].")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise DataError(f"nll: labels must be integers, got dtype {labels.dtype}.")
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != labels.shape:
      raise DataError(
          f"nll: mask shape {tuple(mask.shape)} differs from labels shape "
          f"{tuple(labels.shape)}.")
  if shift:
    if labels.ndim < 1 or labels.shape[-1] < 2:
      raise DataError("nll: shift=True needs a time axis of length >= 2 in labels.")
    logits = logits[..., :-1, :]
    labels = labels[..., 1:]
    if mask is not None:
      mask = mask[..., 1:]
  valid = labels != ignore_index
  if mask is not None:
    valid = valid & (mask != 0)
  vocab = logits.shape[-1]
  if not isinstance(labels, jax.core.Tracer) and not isinstance(valid, jax.core.Tracer):
    _check_label_range(np.asarray(labels), np.asarray(valid), vocab)
  safe = jnp.where(valid, labels, 0)
  x = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
  per_token = jnp.where(valid, jax.nn.logsumexp(x, axis=-1) - picked, 0.0)
  if reduction == "none":
    return per_token
  total = per_token.sum()
  if reduction == "sum":
    return total
  return total / jnp.maximum(valid.sum(), 1).astype(jnp.float32)


def perplexity(
    logits: Any,
    labels: Any,
    mask: Any = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = False,
) -> jax.Array:
  """``exp(nll(logits, labels, mask))``: the per-token perplexity.

  Args:
    logits: ``[..., V]`` unnormalised scores.
    labels: ``[...]`` integer targets (``ignore_index`` not scored).
    mask: optional ``[...]`` 0/1 weights.
    ignore_index: label value that marks a position not scored.
    shift: see :func:`nll`.

  Returns:
    A float32 JAX scalar (1.0 when no position counts).

  Raises:
    DataError: as :func:`nll`.

  Example:
    >>> import numpy as np
    >>> uniform = np.zeros((3, 8))  # uniform over 8 tokens
    >>> round(float(perplexity(uniform, np.array([1, 2, 3]))), 4)
    8.0
  """
  return jnp.exp(nll(logits, labels, mask, ignore_index=ignore_index, shift=shift))


# --------------------------------------------------------------------------- #
# Classification
# --------------------------------------------------------------------------- #


def accuracy(y_true: Any, y_pred: Any) -> float:
  """Fraction of positions where ``y_pred == y_true`` (scikit-learn's accuracy_score).

  Args:
    y_true: 1-D true labels.
    y_pred: 1-D predicted labels (take ``argmax`` of logits first).

  Returns:
    A float in [0, 1].

  Raises:
    DataError: empty inputs, different lengths, not 1-D, or NaN labels.

  Example:
    >>> accuracy([0, 1, 2, 1], [0, 2, 2, 1])
    0.75
  """
  t, p = _check_pair(y_true, y_pred, "accuracy")
  return float(np.mean(t == p))


def precision(
    y_true: Any,
    y_pred: Any,
    *,
    average: str | None = "binary",
    pos_label: Any = 1,
    labels: Sequence[Any] | None = None,
    zero_division: str | float = "warn",
) -> float | np.ndarray:
  """Precision ``tp / (tp + fp)``, as scikit-learn's ``precision_score``.

  Averaging (same meaning as scikit-learn):

  * ``"binary"``: the score of ``pos_label`` only; the labels present may be at
    most two values.
  * ``"micro"``: from tp / fp / fn summed over ``labels`` (equals accuracy for
    multiclass input when all labels are used).
  * ``"macro"``: unweighted mean of the per-label scores.
  * ``"weighted"``: mean weighted by each label's support (true count).
  * ``None``: the per-label scores as a numpy array, in ``labels`` order.

  ``labels`` defaults to the sorted union of values in ``y_true`` and
  ``y_pred``; a label given there that never occurs gets zero counts.

  ``zero_division`` (scikit-learn's rule): where a denominator is 0 (no
  prediction of a label for precision, no true instance for recall, neither for
  F1) the score is set to ``zero_division``: ``0.0``, ``1.0`` or ``nan``; the
  default ``"warn"`` sets 0.0 and issues :class:`UndefinedMetricWarning`. With
  ``nan``, the ``nan`` scores are left out of macro / weighted averages (the
  result is ``nan`` only when every score is).

  Args:
    y_true: 1-D true labels (ints, bools or strings).
    y_pred: 1-D predicted labels.
    average: ``"binary"``, ``"micro"``, ``"macro"``, ``"weighted"`` or ``None``.
    pos_label: the positive label for ``average="binary"`` (ignored otherwise).
    labels: the labels to score and average over.
    zero_division: ``"warn"``, ``0.0``, ``1.0`` or ``float("nan")``.

  Returns:
    A float, or a numpy float64 array for ``average=None``.

  Raises:
    DataError: bad inputs, more than two labels with ``average="binary"``, or a
      ``pos_label`` absent from two present labels.
    ConfigError: unknown ``average`` or ``zero_division``.

  Example:
    >>> precision([0, 1, 1, 0], [1, 1, 0, 0])
    0.5
    >>> precision([0, 1, 2, 2], [0, 2, 2, 1], average="macro")  # (1 + 0 + 1/2) / 3
    0.5
  """
  return _prf(y_true, y_pred, "precision", average, pos_label, labels, zero_division)


def recall(
    y_true: Any,
    y_pred: Any,
    *,
    average: str | None = "binary",
    pos_label: Any = 1,
    labels: Sequence[Any] | None = None,
    zero_division: str | float = "warn",
) -> float | np.ndarray:
  """Recall ``tp / (tp + fn)``, as scikit-learn's ``recall_score``.

  Arguments, averaging and ``zero_division`` as in :func:`precision`.

  Args:
    y_true: 1-D true labels.
    y_pred: 1-D predicted labels.
    average: ``"binary"``, ``"micro"``, ``"macro"``, ``"weighted"`` or ``None``.
    pos_label: the positive label for ``average="binary"``.
    labels: the labels to score and average over.
    zero_division: ``"warn"``, ``0.0``, ``1.0`` or ``float("nan")``.

  Returns:
    A float, or a numpy array for ``average=None``.

  Raises:
    DataError: as :func:`precision`.
    ConfigError: as :func:`precision`.

  Example:
    >>> recall([0, 1, 1, 0], [1, 1, 0, 0])
    0.5
  """
  return _prf(y_true, y_pred, "recall", average, pos_label, labels, zero_division)


def f1(
    y_true: Any,
    y_pred: Any,
    *,
    average: str | None = "binary",
    pos_label: Any = 1,
    labels: Sequence[Any] | None = None,
    zero_division: str | float = "warn",
) -> float | np.ndarray:
  """F1 ``2 tp / (2 tp + fp + fn)``, as scikit-learn's ``f1_score``.

  The denominator is zero only when a label is neither predicted nor true;
  then ``zero_division`` applies (see :func:`precision`). Macro F1 is the mean
  of per-label F1 (not the F1 of mean precision and recall), like scikit-learn.

  Args:
    y_true: 1-D true labels.
    y_pred: 1-D predicted labels.
    average: ``"binary"``, ``"micro"``, ``"macro"``, ``"weighted"`` or ``None``.
    pos_label: the positive label for ``average="binary"``.
    labels: the labels to score and average over.
    zero_division: ``"warn"``, ``0.0``, ``1.0`` or ``float("nan")``.

  Returns:
    A float, or a numpy array for ``average=None``.

  Raises:
    DataError: as :func:`precision`.
    ConfigError: as :func:`precision`.

  Example:
    >>> f1([0, 1, 1, 0], [1, 1, 0, 0])
    0.5
    >>> f1([0, 1, 2, 2], [0, 2, 2, 2], average="micro")
    0.75
  """
  return _prf(y_true, y_pred, "f1", average, pos_label, labels, zero_division)


def roc_auc(y_true: Any, y_score: Any) -> float:
  """Area under the ROC curve of a binary problem, as scikit-learn's ``roc_auc_score``.

  Computed as the Mann-Whitney statistic: the probability that a random
  positive scores higher than a random negative, a tie counting one half. This
  equals scikit-learn's trapezoidal area over distinct thresholds, ties
  included. The positive class is the larger of the two values in ``y_true``
  (1 for 0/1 labels, True for bools).

  Args:
    y_true: 1-D labels holding exactly two distinct values.
    y_score: 1-D scores (probabilities, logits or any monotone score); higher
      means more positive.

  Returns:
    A float in [0, 1].

  Raises:
    DataError: only one class in ``y_true`` (AUC undefined), more than two,
      lengths differ, or NaN / inf scores.

  Example:
    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> roc_auc([0, 1], [0.5, 0.5])  # a tie counts one half
    0.5
  """
  t, s = _check_pair(y_true, y_score, "roc_auc")
  if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
    raise DataError(f"roc_auc: y_score must be real numbers, got dtype {s.dtype}.")
  s = s.astype(np.float64)
  if not np.all(np.isfinite(s)):
    bad = int(np.flatnonzero(~np.isfinite(s))[0])
    raise DataError(f"roc_auc: y_score[{bad}] = {s[bad]} is not finite; drop or fix it.")
  classes = np.unique(t)
  if classes.size != 2:
    raise DataError(
        f"roc_auc: y_true must hold exactly two classes, found {classes.size} "
        f"({classes[:5].tolist()}). ROC AUC is undefined with one class; for "
        "multiclass, score each class one-vs-rest.")
  pos = t == classes[1]
  n_pos = int(pos.sum())
  n_neg = t.size - n_pos
  ranks = _average_ranks(s)
  u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


# --------------------------------------------------------------------------- #
# Text
# --------------------------------------------------------------------------- #


def normalize_answer(text: str) -> str:
  """SQuAD's answer normalisation, used by :func:`exact_match`.

  Lower-cases, removes ASCII punctuation (``string.punctuation``), removes the
  English articles ``a``, ``an``, ``the`` as whole words, and collapses runs of
  whitespace to one space (stripping both ends).

  Args:
    text: any string.

  Returns:
    The normalised string.

  Example:
    >>> normalize_answer("  The  Eiffel-Tower! ")
    'eiffeltower'
  """
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCT)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    normalize: bool | Callable[[str], str] = True,
) -> float:
  """Fraction of predictions equal to (one of) their reference(s).

  Args:
    predictions: one string per example.
    references: per example, one string or a sequence of acceptable strings
      (a prediction matching any of them counts).
    normalize: True applies :func:`normalize_answer` (SQuAD rule) to both
      sides; False compares the raw strings; a callable is applied to both.

  Returns:
    A float in [0, 1].

  Raises:
    DataError: empty or unequal-length inputs, a non-string entry, or an
      example with no reference.

  Example:
    >>> exact_match(["The cat.", "dog"], ["cat", ["a hound", "Dog"]])
    1.0
    >>> exact_match(["The cat."], ["cat"], normalize=False)
    0.0
  """
  preds, refs = _check_text_pair(predictions, references, "exact_match")
  if normalize is True:
    fn: Callable[[str], str] = normalize_answer
  elif normalize is False:
    fn = lambda s: s  # noqa: E731
  elif callable(normalize):
    fn = normalize
  else:
    raise ConfigError(f"exact_match: normalize must be a bool or a callable, got {normalize!r}.")
  hits = sum(any(fn(p) == fn(r) for r in rs) for p, rs in zip(preds, refs))
  return hits / len(preds)


def bleu(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    tokenize: str = "13a",
    lowercase: bool = False,
) -> float:
  """Corpus BLEU (0-100) computed by ``sacrebleu.corpus_bleu``.

  SacreBLEU's defaults otherwise: 4-gram, ``exp`` smoothing, closest reference
  length for the brevity penalty. Inputs are detokenised text.

  Args:
    predictions: one hypothesis string per example.
    references: per example, one reference string or a sequence of them (the
      number may vary between examples).
    tokenize: sacrebleu tokenizer name (``"13a"``, ``"intl"``, ``"char"``,
      ``"none"``, ...).
    lowercase: lower-case both sides first.

  Returns:
    The BLEU score, a float in [0, 100].

  Raises:
    DataError: empty or unequal-length inputs, an example with no reference.
    ImportError: ``sacrebleu`` is not installed (``pip install sacrebleu``).

  Example:
    >>> bleu(["the cat sat on the mat"], ["the cat sat on the mat"])  # doctest: +SKIP
    100.0
  """
  preds, refs = _check_text_pair(predictions, references, "bleu")
  sacrebleu = _lazy_import("sacrebleu", "sacrebleu", "bleu")
  width = max(len(r) for r in refs)
  streams = [[rs[i] if i < len(rs) else None for rs in refs] for i in range(width)]
  score = sacrebleu.corpus_bleu(list(preds), streams, tokenize=tokenize, lowercase=lowercase)
  return float(score.score)


def rouge(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    use_stemmer: bool = False,
) -> dict[str, float]:
  """Mean ROUGE F-measures computed by Google's ``rouge-score`` package.

  Each example is scored with ``RougeScorer.score`` (several references: the
  best one, ``score_multi``); the result is the plain mean of the F-measures
  over examples (no bootstrap). Text is lower-cased and split on
  non-alphanumeric characters by rouge-score's tokenizer; ``rougeLsum`` treats
  newlines as sentence boundaries.

  Args:
    predictions: one string per example.
    references: per example, one reference string or a sequence of them.
    rouge_types: any of ``"rouge1"`` ... ``"rouge9"``, ``"rougeL"``,
      ``"rougeLsum"``.
    use_stemmer: apply the Porter stemmer first.

  Returns:
    ``{rouge_type: mean F-measure in [0, 1]}``.

  Raises:
    DataError: empty or unequal-length inputs, an example with no reference.
    ConfigError: an unknown rouge type.
    ImportError: ``rouge-score`` is not installed (``pip install rouge-score``).

  Example:
    >>> rouge(["the cat sat"], ["the cat sat down"], rouge_types=["rouge1"])  # doctest: +SKIP
    {'rouge1': 0.8571428571428571}
  """
  preds, refs = _check_text_pair(predictions, references, "rouge")
  rouge_types = list(rouge_types)
  bad = [t for t in rouge_types if not re.fullmatch(r"rouge[1-9]|rougeL|rougeLsum", t)]
  if bad or not rouge_types:
    raise ConfigError(
        f"rouge: unknown rouge types {bad or rouge_types}; use 'rouge1'..'rouge9', "
        "'rougeL' or 'rougeLsum'.")
  rouge_scorer = _lazy_import("rouge_score.rouge_scorer", "rouge-score", "rouge")
  scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer)
  totals = dict.fromkeys(rouge_types, 0.0)
  for p, rs in zip(preds, refs):
    scores = scorer.score(rs[0], p) if len(rs) == 1 else scorer.score_multi(rs, p)
    for t in rouge_types:
      totals[t] += scores[t].fmeasure
  return {t: v / len(preds) for t, v in totals.items()}


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _check_label_range(labels: np.ndarray, valid: np.ndarray, vocab: int) -> None:
  bad = valid & ((labels < 0) | (labels >= vocab))
  if bad.any():
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    raise DataError(
        f"nll: label {int(labels[pos])} at position {pos} is outside [0, {vocab}) "
        f"(the logits' last axis); mark ignored positions with the ignore_index.")


def _check_pair(a: Any, b: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a), np.asarray(b)
  if a.ndim != 1 or b.ndim != 1:
    raise DataError(f"{name}: inputs must be 1-D, got shapes {a.shape} and {b.shape}.")
  if a.size != b.size:
    raise DataError(f"{name}: inputs have different lengths {a.size} and {b.size}.")
  if a.size == 0:
    raise DataError(f"{name}: inputs are empty; pass at least one example.")
  for arr, which in ((a, "y_true"), (b, "y_pred")):
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
      if name == "roc_auc" and which == "y_pred":
        continue  # reported as a non-finite score by roc_auc
      raise DataError(f"{name}: {which} contains NaN at index {int(np.flatnonzero(np.isnan(arr))[0])}.")
  return a, b


def _prf(y_true, y_pred, metric, average, pos_label, labels, zero_division):
  if average not in _AVERAGES:
    raise ConfigError(
        f"{metric}: average must be one of 'binary', 'micro', 'macro', 'weighted' "
        f"or None, got {average!r}.")
  zd = _check_zero_division(zero_division, metric)
  t, p = _check_pair(y_true, y_pred, metric)
  try:
    present = np.unique(np.concatenate([t, p]))
  except TypeError as e:
    raise DataError(f"{metric}: labels of mixed types cannot be compared ({e}).") from None
  if average == "binary":
    if present.size > 2:
      raise DataError(
          f"{metric}: target is multiclass ({present.size} labels) but "
          "average='binary'; choose average='macro', 'micro', 'weighted' or None.")
    if pos_label not in present.tolist() and present.size == 2:
      raise DataError(
          f"{metric}: pos_label={pos_label!r} is not one of the labels present "
          f"{present.tolist()}; pass pos_label= one of them.")
    use = [pos_label]
  elif labels is None:
    use = present.tolist()
  else:
    use = list(labels)
    if not use:
      raise DataError(f"{metric}: labels is empty; pass at least one label or None.")
  tp = np.array([np.sum((t == c) & (p == c)) for c in use], dtype=np.float64)
  pred_sum = np.array([np.sum(p == c) for c in use], dtype=np.float64)
  true_sum = np.array([np.sum(t == c) for c in use], dtype=np.float64)
  if average == "micro":
    tp, pred_sum, true_sum = tp.sum(keepdims=True), pred_sum.sum(keepdims=True), true_sum.sum(
        keepdims=True)
  if metric == "precision":
    num, den, what = tp, pred_sum, "no predicted samples"
  elif metric == "recall":
    num, den, what = tp, true_sum, "no true samples"
  else:
    num, den, what = 2 * tp, true_sum + pred_sum, "neither true nor predicted samples"
  zero = den == 0
  scores = num / np.where(zero, 1.0, den)
  scores[zero] = zd
  if zero.any() and zero_division == "warn":
    warnings.warn(
        f"{metric} is ill-defined and set to 0.0 for {int(zero.sum())} label(s) with "
        f"{what}; pass zero_division=0.0, 1.0 or nan to choose the value and "
        "silence this warning.", UndefinedMetricWarning, stacklevel=3)
  if average is None:
    return scores
  weights = true_sum if average == "weighted" else None
  return _nanaverage(scores, weights)


def _check_zero_division(zero_division: Any, metric: str) -> float:
  if isinstance(zero_division, str):
    if zero_division == "warn":
      return 0.0
  elif isinstance(zero_division, (int, float)) and not isinstance(zero_division, bool):
    if zero_division in (0, 1) or math.isnan(zero_division):
      return float(zero_division)
  raise ConfigError(
      f"{metric}: zero_division must be 'warn', 0.0, 1.0 or nan, got {zero_division!r}.")


def _nanaverage(scores: np.ndarray, weights: np.ndarray | None) -> float:
  keep = ~np.isnan(scores)
  if not keep.any():
    return float("nan")
  if weights is None:
    return float(np.mean(scores[keep]))
  w = weights[keep]
  if w.sum() == 0:  # every weight zero: plain mean, as scikit-learn
    return float(np.mean(scores[keep]))
  return float(np.average(scores[keep], weights=w))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x, ties sharing the mean of their ranks."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts).astype(np.float64)
  mean_rank = ends - (counts - 1) / 2.0
  return mean_rank[inverse]


def _check_text_pair(predictions, references, name):
  if isinstance(predictions, str) or isinstance(references, str):
    raise DataError(f"{name}: pass lists of strings, not a single string.")
  preds = list(predictions)
  refs = list(references)
  if not preds:
    raise DataError(f"{name}: predictions are empty; pass at least one example.")
  if len(preds) != len(refs):
    raise DataError(
        f"{name}: {len(preds)} predictions but {len(refs)} references; pass one "
        "reference (or a list of references) per prediction.")
  out_refs = []
  for i, (p, r) in enumerate(zip(preds, refs)):
    if not isinstance(p, str):
      raise DataError(f"{name}: predictions[{i}] is {type(p).__name__}, not a string.")
    rs = [r] if isinstance(r, str) else list(r)
    if not rs:
      raise DataError(f"{name}: references[{i}] is empty; give at least one reference.")
    for j, x in enumerate(rs):
      if not isinstance(x, str):
        raise DataError(f"{name}: references[{i}][{j}] is {type(x).__name__}, not a string.")
    out_refs.append(rs)
  return preds, out_refs


def _lazy_import(module: str, package: str, fn: str):
  import importlib

  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(
        f"jlora.metrics.{fn} needs the '{package}' package, which is not installed; "
        f"run `pip install {package}`.") from e
