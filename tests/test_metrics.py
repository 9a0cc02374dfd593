"""Tests of jlora.metrics against independent references.

NLL / perplexity against torch's cross_entropy, classification scores and ROC
AUC against scikit-learn on random inputs, BLEU and ROUGE against brute-force
implementations written here, exact match against hand-checked cases.
"""

from __future__ import annotations

import collections
import doctest
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics as skm
import torch
from hypothesis import given
from hypothesis import strategies as st

from jlora import metrics
from jlora._errors import ConfigError, DataError
from jlora.metrics import UndefinedMetricWarning

# --------------------------------------------------------------------------- #
# NLL / perplexity
# --------------------------------------------------------------------------- #


def _torch_nll(logits, labels, valid):
  lab = np.where(valid, labels, -100)
  return torch.nn.functional.cross_entropy(
      torch.tensor(np.asarray(logits, np.float64)).reshape(-1, logits.shape[-1]),
      torch.tensor(lab.reshape(-1), dtype=torch.long), ignore_index=-100, reduction="mean").item()


@pytest.mark.parametrize("seed", range(3))
def test_nll_matches_torch_cross_entropy(seed):
  rng = np.random.default_rng(seed)
  b, t, v = rng.integers(1, 4), rng.integers(1, 9), rng.integers(2, 50)
  logits = (rng.normal(size=(b, t, v)) * 3).astype(np.float32)
  labels = rng.integers(0, v, size=(b, t))
  labels[rng.random((b, t)) < 0.2] = -100
  labels[0, 0] = 0  # at least one counted position
  mask = (rng.random((b, t)) < 0.8).astype(np.int32)
  mask[0, 0] = 1
  ref = _torch_nll(logits, labels, labels != -100)
  np.testing.assert_allclose(float(metrics.nll(logits, labels)), ref, rtol=1e-5)
  ref_m = _torch_nll(logits, labels, (labels != -100) & (mask == 1))
  np.testing.assert_allclose(float(metrics.nll(logits, labels, mask)), ref_m, rtol=1e-5)
  np.testing.assert_allclose(float(metrics.perplexity(logits, labels, mask)), math.exp(ref_m),
                             rtol=1e-5)
  # sum / none, and under jit
  valid = (labels != -100) & (mask == 1)
  np.testing.assert_allclose(float(metrics.nll(logits, labels, mask, reduction="sum")),
                             ref_m * valid.sum(), rtol=1e-5)
  per = np.asarray(metrics.nll(logits, labels, mask, reduction="none"))
  assert per.shape == labels.shape and np.all(per[~valid] == 0)
  jitted = jax.jit(lambda lg, lb, m: metrics.nll(lg, lb, m))
  np.testing.assert_allclose(float(jitted(logits, labels, mask)), ref_m, rtol=1e-5)


def test_nll_shift_equals_manual_shift_and_hf_convention():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
  ids = rng.integers(0, 11, size=(2, 6))
  ids[1, 4:] = -100
  ref = _torch_nll(logits[:, :-1], ids[:, 1:], ids[:, 1:] != -100)
  np.testing.assert_allclose(float(metrics.nll(logits, ids, shift=True)), ref, rtol=1e-5)
  np.testing.assert_allclose(float(metrics.nll(logits[:, :-1], ids[:, 1:])), ref, rtol=1e-5)


def test_nll_bfloat16_logits_are_scored_in_float32():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(4, 40)) * 4, dtype=jnp.bfloat16)
  labels = rng.integers(0, 40, size=4)
  ref = _torch_nll(np.asarray(logits.astype(jnp.float32)), labels, np.ones(4, bool))
  out = metrics.nll(logits, labels)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(float(out), ref, rtol=1e-5)


def test_nll_edge_cases_and_errors():
  logits = np.zeros((2, 3, 5), np.float32)
  none = np.full((2, 3), -100)
  assert float(metrics.nll(logits, none)) == 0.0
  with pytest.raises(DataError, match=r"label 5 at position \(1, 2\) is outside \[0, 5\)"):
    metrics.nll(logits, np.array([[0, 1, 2], [0, 1, 5]]))
  with pytest.raises(DataError, match="labels shape"):
    metrics.nll(logits, np.zeros((2, 4), int))
  with pytest.raises(DataError, match="mask shape"):
    metrics.nll(logits, np.zeros((2, 3), int), np.ones((3, 2)))
  with pytest.raises(DataError, match="integers"):
    metrics.nll(logits, np.zeros((2, 3)))
  with pytest.raises(ConfigError, match="reduction"):
    metrics.nll(logits, np.zeros((2, 3), int), reduction="avg")
  # masked-out out-of-range labels are fine
  assert np.isfinite(float(metrics.nll(logits, np.array([[0, 1, 2], [0, 1, 9]]),
                                       np.array([[1, 1, 1], [1, 1, 0]]))))


# --------------------------------------------------------------------------- #
# Classification vs scikit-learn
# --------------------------------------------------------------------------- #


def _same(a, b):
  a, b = np.asarray(a, float), np.asarray(b, float)
  assert a.shape == b.shape
  np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


def _compare(ours, theirs, *args, **kwargs):
  """Runs both with warnings recorded; equal values, and a warning from ours iff sklearn."""
  with warnings.catch_warnings(record=True) as w_ours:
    warnings.simplefilter("always")
    a = ours(*args, **kwargs)
  with warnings.catch_warnings(record=True) as w_sk:
    warnings.simplefilter("always")
    b = theirs(*args, **kwargs)
  _same(a, b)
  ours_warned = any(issubclass(w.category, UndefinedMetricWarning) for w in w_ours)
  sk_warned = any(issubclass(w.category, skm._classification.UndefinedMetricWarning)
                  for w in w_sk)
  assert ours_warned == sk_warned


PAIRS = [(metrics.precision, skm.precision_score), (metrics.recall, skm.recall_score),
         (metrics.f1, skm.f1_score)]

labels_strategy = st.integers(1, 40).flatmap(
    lambda n: st.tuples(st.lists(st.integers(0, 4), min_size=n, max_size=n),
                        st.lists(st.integers(0, 4), min_size=n, max_size=n)))
zero_div = st.sampled_from(["warn", 0.0, 1.0, float("nan")])


@given(labels_strategy, st.sampled_from(["micro", "macro", "weighted", None]), zero_div)
def test_multiclass_prf_equals_sklearn(yy, average, zd):
  y_true, y_pred = yy
  _same(metrics.accuracy(y_true, y_pred), skm.accuracy_score(y_true, y_pred))
  for ours, theirs in PAIRS:
    _compare(ours, theirs, y_true, y_pred, average=average, zero_division=zd)


@given(labels_strategy, st.sampled_from(["micro", "macro", "weighted", None]), zero_div,
       st.lists(st.integers(0, 6), min_size=1, max_size=4, unique=True))
def test_prf_with_explicit_labels_equals_sklearn(yy, average, zd, labels):
  y_true, y_pred = yy
  for ours, theirs in PAIRS:
    _compare(ours, theirs, y_true, y_pred, average=average, zero_division=zd, labels=labels)


binary_strategy = st.integers(1, 40).flatmap(
    lambda n: st.tuples(st.lists(st.integers(0, 1), min_size=n, max_size=n),
                        st.lists(st.integers(0, 1), min_size=n, max_size=n)))


@given(binary_strategy, zero_div, st.sampled_from([0, 1]))
def test_binary_prf_equals_sklearn(yy, zd, pos_label):
  y_true, y_pred = yy
  for ours, theirs in PAIRS:
    _compare(ours, theirs, y_true, y_pred, average="binary", zero_division=zd, pos_label=pos_label)


def test_prf_seeded_loop_large_and_string_labels():
  rng = np.random.default_rng(0)
  for _ in range(20):
    k = int(rng.integers(2, 8))
    n = int(rng.integers(50, 400))
    y_true = rng.integers(0, k, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, k, n))
    for average in ("micro", "macro", "weighted", None):
      for ours, theirs in PAIRS:
        _compare(ours, theirs, y_true, y_pred, average=average, zero_division=0.0)
    names = np.array(["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"])
    for ours, theirs in PAIRS:
      _compare(ours, theirs, names[y_true], names[y_pred], average="macro", zero_division=0.0)
  yt = np.array(["neg", "pos", "pos", "neg"])
  yp = np.array(["pos", "pos", "neg", "neg"])
  _compare(metrics.f1, skm.f1_score, yt, yp, pos_label="pos")


def test_prf_jax_inputs_and_errors():
  yt, yp = jnp.array([0, 1, 1, 0, 1]), jnp.array([0, 1, 0, 0, 1])
  _same(metrics.f1(yt, yp), skm.f1_score(np.asarray(yt), np.asarray(yp)))
  with pytest.raises(DataError, match="multiclass .* but average='binary'"):
    metrics.f1([0, 1, 2], [0, 1, 1])
  with pytest.raises(DataError, match="pos_label=2 is not one of"):
    metrics.precision([0, 1], [1, 0], pos_label=2)
  with pytest.raises(DataError, match="different lengths"):
    metrics.recall([0, 1], [1])
  with pytest.raises(DataError, match="empty"):
    metrics.accuracy([], [])
  with pytest.raises(ConfigError, match="average must be"):
    metrics.f1([0, 1], [0, 1], average="samples")
  with pytest.raises(ConfigError, match="zero_division"):
    metrics.f1([0, 1], [0, 1], zero_division=0.5)
  with pytest.warns(UndefinedMetricWarning, match="precision is ill-defined"):
    assert metrics.precision([1, 1], [0, 0]) == 0.0


@given(st.integers(2, 60).flatmap(
    lambda n: st.tuples(st.lists(st.integers(0, 1), min_size=n, max_size=n),
                        st.lists(st.integers(0, 5), min_size=n, max_size=n))))
def test_roc_auc_with_ties_equals_sklearn(data):
  y, s = data
  if len(set(y)) < 2:
    with pytest.raises(DataError, match="exactly two classes"):
      metrics.roc_auc(y, s)
    return
  _same(metrics.roc_auc(y, s), skm.roc_auc_score(y, s))


def test_roc_auc_seeded_loop_and_label_kinds():
  rng = np.random.default_rng(3)
  for _ in range(20):
    n = int(rng.integers(10, 500))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.normal(size=n) + y * rng.random()
    s = np.round(s, int(rng.integers(0, 3)))  # many ties
    _same(metrics.roc_auc(y, s), skm.roc_auc_score(y, s))
    _same(metrics.roc_auc(y.astype(bool), s), skm.roc_auc_score(y.astype(bool), s))
    _same(metrics.roc_auc(np.where(y == 1, 1, -1), s), skm.roc_auc_score(np.where(y == 1, 1, -1), s))
    _same(metrics.roc_auc(jnp.asarray(y), jnp.asarray(s, jnp.float32)),
          skm.roc_auc_score(y, np.asarray(jnp.asarray(s, jnp.float32))))
  with pytest.raises(DataError, match="not finite"):
    metrics.roc_auc([0, 1], [0.1, float("nan")])
  with pytest.raises(DataError, match="exactly two classes, found 3"):
    metrics.roc_auc([0, 1, 2], [0.1, 0.2, 0.3])


# --------------------------------------------------------------------------- #
# Text metrics
# --------------------------------------------------------------------------- #


def test_exact_match_cases():
  assert metrics.exact_match(["Paris"], ["paris"]) == 1.0
  assert metrics.exact_match(["the  Eiffel tower."], ["Eiffel Tower"]) == 1.0
  assert metrics.exact_match(["an apple"], ["apple pie"]) == 0.0
  assert metrics.exact_match(["theatre"], ["atre"]) == 0.0  # articles only as whole words
  assert metrics.exact_match(["x", "y", "z", "w"], ["x", ["q", "Y!"], "zz", "w"]) == 0.75
  assert metrics.exact_match(["Paris"], ["paris"], normalize=False) == 0.0
  assert metrics.exact_match(["Paris"], ["PARIS"], normalize=str.lower) == 1.0
  with pytest.raises(DataError, match="2 predictions but 1 references"):
    metrics.exact_match(["a", "b"], ["a"])
  with pytest.raises(DataError, match=r"references\[0\] is empty"):
    metrics.exact_match(["a"], [[]])
  with pytest.raises(DataError, match="not a single string"):
    metrics.exact_match("abc", "abc")


def _ngrams(toks, n):
  return collections.Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))


def _brute_bleu(hyps, refs):
  """Papineni et al. corpus BLEU on whitespace tokens, closest reference length."""
  match = [0] * 4
  total = [0] * 4
  c = r = 0
  for h, rs in zip(hyps, refs):
    ht = h.split()
    rts = [x.split() for x in rs]
    c += len(ht)
    r += min((abs(len(x) - len(ht)), len(x)) for x in rts)[1]
    for n in range(1, 5):
      hc = _ngrams(ht, n)
      best = collections.Counter()
      for x in rts:
        best |= _ngrams(x, n)
      match[n - 1] += sum(min(v, best[g]) for g, v in hc.items())
      total[n - 1] += max(len(ht) - n + 1, 0)
  bp = 1.0 if c > r else math.exp(1 - r / c)
  return 100 * bp * math.exp(sum(math.log(m / t) for m, t in zip(match, total)) / 4)


def test_bleu_equals_brute_force():
  pytest.importorskip("sacrebleu")
  hyps = ["the cat sat on the mat today", "a quick brown fox jumps over the lazy dog",
          "we love fine tuning models with small adapters"]
  refs = [["the cat sat on a mat"], ["the quick brown fox jumped over the lazy dog", "a fast fox"],
          ["we love tuning large models with low rank adapters"]]
  _same(round(metrics.bleu(hyps, refs), 10), round(_brute_bleu(hyps, refs), 10))
  short = ["the cat sat on the", "a quick brown fox jumps over"]
  _same(round(metrics.bleu(short, refs[:2]), 10), round(_brute_bleu(short, refs[:2]), 10))
  assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)


def _rouge_tokens(text):
  return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _f(p_hits, p_len, r_len):
  if p_hits == 0:
    return 0.0
  p, r = p_hits / p_len, p_hits / r_len
  return 2 * p * r / (p + r)


def _lcs(a, b):
  dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
  return dp[-1][-1]


def test_rouge_equals_brute_force():
  pytest.importorskip("rouge_score")
  preds = ["The cat sat on the mat.", "police killed the gunman", "a b c d e"]
  refs = ["the cat was sitting on the mat", "the gunman was shot dead by police", "e d c b a"]
  got = metrics.rouge(preds, refs, rouge_types=["rouge1", "rouge2", "rougeL"])
  want = collections.defaultdict(float)
  for p, r in zip(preds, refs):
    pt, rt = _rouge_tokens(p), _rouge_tokens(r)
    for n in (1, 2):
      hits = sum((_ngrams(pt, n) & _ngrams(rt, n)).values())
      want[f"rouge{n}"] += _f(hits, max(len(pt) - n + 1, 1), max(len(rt) - n + 1, 1)) / len(preds)
    want["rougeL"] += _f(_lcs(pt, rt), len(pt), len(rt)) / len(preds)
  assert set(got) == set(want)
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-12), k
  multi = metrics.rouge(["the cat"], [["a dog", "the cat"]], rouge_types=["rouge1"])
  assert multi["rouge1"] == pytest.approx(1.0)
  with pytest.raises(ConfigError, match="unknown rouge types"):
    metrics.rouge(["a"], ["a"], rouge_types=["rougeX"])


def test_missing_package_error(monkeypatch):
  import builtins

  real = builtins.__import__

  def fake(name, *a, **k):
    if name.startswith("sacrebleu"):
      raise ImportError("no sacrebleu")
    return real(name, *a, **k)

  monkeypatch.setattr(builtins, "__import__", fake)
  import importlib

  monkeypatch.setattr(importlib, "import_module", lambda n: fake(n))
  with pytest.raises(ImportError, match="pip install sacrebleu"):
    metrics.bleu(["a"], ["a"])


def test_doctests():
  res = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
  assert res.failed == 0 and res.attempted > 10
