"""The training loop (jlora.train) on tiny BERT and Llama models written to disk as HF folders.

Every check compares against an independent reference: a hand-written optax
step, an uninterrupted run, a big batch without accumulation, scikit-learn /
numpy metrics computed from the model's own outputs.
"""

from __future__ import annotations

import json
import math
import signal
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import ConfigError, DataError
from jlora._checkpoint import load_adapters
from jlora.config import load_config
from jlora.train import build_rules, evaluate_run, load_run, merge_run, predict, train

POS = ["good", "great", "fine", "superb", "lovely", "fun"]
NEG = ["bad", "awful", "dull", "poor", "boring", "ugly"]
FILL = ["the", "a", "movie", "film", "plot", "was", "is", "and", "very", "quite", "story"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# --------------------------------------------------------------------------- #
# Tiny models and data (module-level helpers, also used by test_cli.py)
# --------------------------------------------------------------------------- #


def make_tokenizer(root: Path):
  from transformers import BertTokenizer
  root.mkdir(parents=True, exist_ok=True)
  words = SPECIAL + POS + NEG + FILL + [".", ","]
  tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
  assert tok("good film")["input_ids"] == [2, 5, 5 + len(POS) + len(NEG) + 3, 3]
  return tok


def make_tiny_bert(root: Path) -> Path:
  """A 2-layer BERT (H=16) with a word-level tokenizer, saved as a HF folder."""
  from jlora.models.bert import BertConfig, BertModel, save_bert_hf
  tok = make_tokenizer(root / "tok")
  cfg = BertConfig(vocab_size=len(tok.get_vocab()), hidden_size=16, num_hidden_layers=2,
                   num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
  params = BertModel(cfg).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
  return save_bert_hf(cfg, params, tok, root / "bert", overwrite=True)


def make_tiny_llama(root: Path) -> Path:
  """A 2-layer Llama (D=32) sharing the word-level tokenizer ([SEP] is EOS), saved as a HF folder."""
  from jlora.models.llama import LlamaConfig, init_llama
  from jlora.models.llama_io import save_llama
  tok = make_tokenizer(root / "tok")
  tok.eos_token = "[SEP]"
  tok.bos_token = "[CLS]"
  cfg = LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=128,
                    bos_token_id=tok.cls_token_id, eos_token_ids=(tok.sep_token_id,),
                    pad_token_id=tok.pad_token_id)
  params = init_llama(cfg, jax.random.key(0))
  return save_llama(root / "llama", params, cfg, tokenizer=tok, overwrite=True)


def sentiment_rows(n: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    label = int(rng.integers(0, 2))
    words = list(rng.choice(FILL, size=int(rng.integers(1, 4))))
    words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POS if label else NEG)))
    rows.append({"text": " ".join(words), "label": label})
  return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def tiny_cls_overrides(root: Path, bert: Path, out: str, **extra) -> list[str]:
  data = root / "data"
  if not (data / "train.jsonl").exists():
    write_jsonl(data / "train.jsonl", sentiment_rows(96, 0))
    write_jsonl(data / "validation.jsonl", sentiment_rows(40, 1))
    write_jsonl(data / "test.jsonl", sentiment_rows(40, 2))
  items = {
      "output_dir": str(root / out), "model.name": str(bert), "data.source": "files",
      "data.train_files": str(data / "train.jsonl"),
      "data.validation_files": str(data / "validation.jsonl"),
      "data.test_files": str(data / "test.jsonl"), "data.max_length": 16,
      "train.batch_size": 8, "train.max_steps": 4, "train.lr": 1e-2, "train.progress": False,
      "train.tensorboard": False, "train.log_every": 1, "method.rank": 2, "method.alpha": 4,
      "data.bucket": False, "train.eval_batch_size": 64,
  }
  items.update(extra)
  return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  return {"root": root, "bert": make_tiny_bert(root), "llama": make_tiny_llama(root)}


def _quiet(*args, **kw):
  pass


def _arrays(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------- #
# Classification
# --------------------------------------------------------------------------- #


def test_lora_learns_the_task_and_writes_the_run(tiny):
  cfg = load_config(overrides=tiny_cls_overrides(
      tiny["root"], tiny["bert"], "learn", **{"train.max_steps": 60, "train.eval_every": 30,
                                             "train.save_every": 30, "train.lr": 5e-2,
                                             "method.rank": 4}))
  res = train(cfg, log=_quiet)
  out = res.output_dir
  recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in recs if r["split"] == "train"]
  assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1  # chance level is ln 2 = 0.693
  assert [r["step"] for r in recs if r["split"] == "validation"] == [30, 60]
  assert res.metrics["test"]["accuracy"] >= 0.7  # 40 examples: P(>= 0.7 by chance) < 1%
  assert (out / "results.json").is_file() and (out / "config.yaml").is_file()
  with jlora.CheckpointManager(out / "checkpoints") as mgr:  # train.keep_last=2
    assert mgr.all_steps() == [30, 60]
  # The saved adapter, evaluated by an independent path (predict -> numpy argmax ->
  # scikit-learn), gives the accuracy the loop reported.
  from sklearn.metrics import accuracy_score, roc_auc_score
  run = load_run(out)
  rows = [json.loads(x) for x in (tiny["root"] / "data" / "test.jsonl").read_text().splitlines()]
  preds = predict(run, [r["text"] for r in rows])
  y = [r["label"] for r in rows]
  assert accuracy_score(y, [p["label"] for p in preds]) == pytest.approx(res.metrics["test"]["accuracy"])
  assert roc_auc_score(y, [p["probs"][1] for p in preds]) == pytest.approx(
      res.metrics["test"]["roc_auc"], abs=1e-6)
  assert evaluate_run(run, "test")["accuracy"] == pytest.approx(res.metrics["test"]["accuracy"])
  # The trainable-parameter count is LoRA's formula plus the head.
  L, H = 2, 16
  assert res.trainable_params == 2 * L * 4 * (H + H) + (H * 2 + 2)


def test_one_step_equals_a_hand_written_optax_step(tiny):
  over = tiny_cls_overrides(tiny["root"], tiny["bert"], "onestep", **{
      "train.max_steps": 1, "train.warmup_ratio": 0, "train.clip_norm": 0.05,
      "train.weight_decay": 0.1, "data.bucket": False, "resume": False})
  cfg = load_config(overrides=over)
  res = train(cfg, log=_quiet)
  trained = load_adapters(res.adapter_dir, _base_params(cfg))
  # Reference: rebuild the same wrapped tree and first batch, take one plain optax step.
  from jlora.data import ClassificationTask, epoch_order, load_files
  from jlora.models.bert import load_bert
  model, params, tok = load_bert(tiny["bert"], task="classification", num_labels=2,
                                 pooling="mean", key=jax.random.key(cfg.train.seed))
  tree = jlora.wrap(params, build_rules(cfg, params, "bert"), key=jax.random.key(cfg.train.seed))
  t, f = jlora.split(tree)
  feats = ClassificationTask(tok, 16).encode(load_files(cfg.data.train_files))
  idx = epoch_order(len(feats["labels"]), cfg.train.seed, 0)[:8]
  b = {k: jnp.asarray(v[idx]) for k, v in feats.items()}

  def loss(t):
    p = jlora.merge(jlora.combine(t, f))
    logits = model.apply({"params": p}, b["input_ids"], b["attention_mask"], b["token_type_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

  g = jax.grad(loss)(t)
  mask = jax.tree.map(lambda x: x.ndim >= 2, g)
  tx = optax.chain(optax.clip_by_global_norm(0.05),
                   optax.adamw(1e-2, weight_decay=0.1, mask=mask))
  upd, _ = tx.update(g, tx.init(t), t)
  ref = optax.apply_updates(t, upd)
  got = jlora.split(trained)[0]
  for a, r in zip(_arrays(got), _arrays(ref)):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-7)
  assert not all(np.array_equal(a, r) for a, r in zip(_arrays(got), _arrays(t)))


def test_lora_dropout_is_applied_in_training(tiny):
  """method.dropout reaches the low-rank path: the step equals a hand-written step that
  calls jlora.lora(apply) with the documented lora_key, and differs from dropout 0."""
  from jlora.train import LORA_DROPOUT_SALT
  over = tiny_cls_overrides(tiny["root"], tiny["bert"], "dropout", **{
      "train.max_steps": 1, "train.warmup_ratio": 0, "train.clip_norm": 0, "train.weight_decay": 0,
      "method.dropout": 0.5, "resume": False, "data.pack": False})  # padded rows: masks by row
  cfg = load_config(overrides=over)
  res = train(cfg, log=_quiet)
  got = jlora.split(load_adapters(res.adapter_dir, _base_params(cfg)))[0]
  from jlora.data import ClassificationTask, epoch_order, load_files
  from jlora.models.bert import load_bert
  model, params, tok = load_bert(tiny["bert"], task="classification", num_labels=2,
                                 pooling="mean", key=jax.random.key(cfg.train.seed))
  tree = jlora.wrap(params, build_rules(cfg, params, "bert"), key=jax.random.key(cfg.train.seed))
  assert {leaf.spec.dropout for _, leaf in jlora.adapted_leaves(tree) if isinstance(leaf, jlora.LoraWeight)} == {0.5}
  t, f = jlora.split(tree)
  feats = ClassificationTask(tok, 16).encode(load_files(cfg.data.train_files))
  idx = epoch_order(len(feats["labels"]), cfg.train.seed, 0)[:8]
  b = {k: jnp.asarray(v[idx]) for k, v in feats.items()}
  micro_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.train.seed + 1), 0), 0)
  apply = jlora.lora(lambda p: model.apply({"params": p}, b["input_ids"], b["attention_mask"],
                                           b["token_type_ids"]))

  def step(lora_key):
    def loss(t):
      kw = {} if lora_key is None else {"lora_key": lora_key}
      logits = apply(jlora.combine(t, f), **kw)
      return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()
    g = jax.grad(loss)(t)
    mask = jax.tree.map(lambda x: x.ndim >= 2, g)
    tx = optax.adamw(1e-2, weight_decay=0.0, mask=mask)
    return optax.apply_updates(t, tx.update(g, tx.init(t), t)[0])

  ref = step(jax.random.fold_in(micro_key, LORA_DROPOUT_SALT))
  no_dropout = step(None)
  for a, r in zip(_arrays(got), _arrays(ref)):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-7)
  assert max(float(np.abs(a - r).max()) for a, r in zip(_arrays(got), _arrays(no_dropout))) > 1e-4


def _base_params(cfg):
  from jlora.models.bert import load_bert
  _, params, _ = load_bert(cfg.model.name, task="classification", num_labels=2,
                           pooling=cfg.model.pooling,
                           key=jax.random.key(cfg.train.seed), with_tokenizer=False)
  return params


def test_gradient_accumulation_equals_one_big_batch(tiny):
  outs = []
  for accum in (1, 4):
    cfg = load_config(overrides=tiny_cls_overrides(
        tiny["root"], tiny["bert"], f"accum{accum}", **{
            "train.grad_accum": accum, "train.max_steps": 3, "resume": False}))
    res = train(cfg, log=_quiet)
    outs.append(jlora.split(load_adapters(res.adapter_dir, _base_params(cfg)))[0])
  for a, b in zip(_arrays(outs[0]), _arrays(outs[1])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_batches_train_and_evaluate_as_padded_rows(tiny, pooling):
  """data.pack (several sentences per row, segment ids) gives the padded run's adapters and
  metrics: packing changes where tokens sit, not what the model computes."""
  outs, metrics = [], []
  for pack in (False, True):
    cfg = load_config(overrides=tiny_cls_overrides(
        tiny["root"], tiny["bert"], f"pack{pack}{pooling}", **{
            "data.pack": pack, "train.max_steps": 3, "train.grad_accum": 2,
            "model.pooling": pooling, "resume": False}))
    logs = []
    res = train(cfg, log=logs.append)
    assert any("packed batches" in line for line in logs) == pack
    outs.append(jlora.split(load_adapters(res.adapter_dir, _base_params(cfg)))[0])
    metrics.append(res.metrics["test"])
  for a, b in zip(_arrays(outs[0]), _arrays(outs[1])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  assert metrics[0]["accuracy"] == metrics[1]["accuracy"]
  assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-5)


def test_pack_rows_places_every_token_once_and_fits_the_buckets():
  from jlora.data import pack_rows, packed_rows_needed, row_buckets
  rng = np.random.default_rng(3)
  lengths = rng.integers(1, 17, size=40)
  mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask, rng.integers(1, 999, size=(40, 16)), 0)
  batch = {"input_ids": ids, "attention_mask": mask, "labels": np.arange(40)}
  need = packed_rows_needed(batch, 16)
  assert need >= -(-lengths.sum() // 16)  # never fewer rows than the tokens need
  p = pack_rows(batch, 16, rows=need + 2)
  assert p["input_ids"].shape == (need + 2, 16) and p["pool"].shape == (40, need + 2, 16)
  np.testing.assert_allclose(p["pool"].sum((1, 2)), 1.0, rtol=1e-6)  # mean weights sum to 1
  for i in range(40):  # each sentence's tokens, in order, where its pool weights are
    where = p["pool"][i] > 0
    assert where.sum() == lengths[i]
    assert p["input_ids"][where].tolist() == ids[i, :lengths[i]].tolist()
    assert p["position_ids"][where].tolist() == list(range(lengths[i]))
    assert len(set(p["segment_ids"][where].tolist())) == 1
  assert (p["segment_ids"] > 0).sum() == lengths.sum()
  with pytest.raises(jlora.DataError, match="more than rows"):
    pack_rows(batch, 16, rows=need - 1)
  with pytest.raises(jlora.DataError, match="does not fit"):
    pack_rows(batch, 8)
  assert row_buckets([3, 9, 10, 11, 12, 25], max_shapes=3) == [4, 12, 28]  # step 4
  assert all(b >= n for n in [3, 9, 25] for b in [min(x for x in row_buckets([3, 9, 25]) if x >= n)])


def test_ctrl_c_saves_and_resume_equals_an_uninterrupted_run(tiny):
  common = {"train.max_steps": 17, "train.save_every": 5, "train.batch_size": 16}
  ref = train(load_config(overrides=tiny_cls_overrides(
      tiny["root"], tiny["bert"], "straight", **common, resume=False)), log=_quiet)
  over = tiny_cls_overrides(tiny["root"], tiny["bert"], "resumed", **common)

  def interrupt(step, metrics):
    if step == 8:  # mid-epoch (6 batches per epoch), between two checkpoints
      signal.raise_signal(signal.SIGINT)

  before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup / a background shell job
  first = train(load_config(overrides=over + ["resume=false"]), log=_quiet, on_step=interrupt)
  assert first.interrupted and first.step == 8 and first.adapter_dir is None
  with jlora.CheckpointManager(first.output_dir / "checkpoints") as mgr:
    assert mgr.latest_step() == 8
  assert signal.getsignal(signal.SIGINT) is before  # the loop restores the caller's handler
  second = train(load_config(overrides=over), log=_quiet)
  assert not second.interrupted and second.step == 17
  a = load_adapters(ref.adapter_dir, _base_params(load_config(overrides=over)))
  b = load_adapters(second.adapter_dir, _base_params(load_config(overrides=over)))
  for x, y in zip(_arrays(jlora.split(a)[0]), _arrays(jlora.split(b)[0])):
    np.testing.assert_array_equal(x, y)
  for split in ("validation", "test"):
    second.metrics[split].pop("eval_seconds")
    ref.metrics[split].pop("eval_seconds")
    assert second.metrics[split] == pytest.approx(ref.metrics[split], rel=1e-6)
  steps = [json.loads(x)["step"] for x in (second.output_dir / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["split"] == "train"]
  assert steps[-1] == 17 and 8 in steps


def test_resume_refuses_a_different_job(tiny):
  over = tiny_cls_overrides(tiny["root"], tiny["bert"], "refuse", **{"train.max_steps": 1})
  train(load_config(overrides=over + ["resume=false"]), log=_quiet)
  with pytest.raises(jlora.CheckpointError, match="method.rank"):
    train(load_config(overrides=over + ["method.rank=3"]), log=_quiet)


@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_full_and_bitfit_count_and_train(tiny, method):
  cfg = load_config(overrides=tiny_cls_overrides(
      tiny["root"], tiny["bert"], method, **{"method.name": method, "resume": False,
                                             "train.max_steps": 2}))
  res = train(cfg, log=_quiet)
  params = _base_params(cfg)
  sizes = {jax.tree_util.keystr(k): int(np.size(v)) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  total = sum(sizes.values())
  if method == "full":
    assert res.trainable_params == total == res.total_params
  else:
    biases = sum(v for k, v in sizes.items() if k.endswith("['bias']"))
    head = sizes["['classifier']['kernel']"]
    assert res.trainable_params == biases + head
    tree = load_adapters(res.adapter_dir, params)
    trained = {p for p, _ in jlora.adapted_leaves(tree)}
    assert all(p.endswith("/bias") or p.startswith("classifier/") for p in trained)
  assert math.isfinite(res.metrics["test"]["loss"])


@pytest.mark.parametrize("method,init", [("dora", "kaiming"), ("ia3", "kaiming"), ("vera", "kaiming"),
                                         ("lora", "pissa")])
def test_protocol_methods_train_count_and_reload(tiny, method, init):
  """method=dora|ia3|vera and init=pissa run end to end: counts from the shapes, the adapter reloads."""
  cfg = load_config(overrides=tiny_cls_overrides(
      tiny["root"], tiny["bert"], f"{method}_{init}", **{"method.name": method, "method.init": init,
                                                         "resume": False, "train.max_steps": 2}))
  res = train(cfg, log=_quiet)
  params = _base_params(cfg)
  tree = load_adapters(res.adapter_dir, params)
  leaves = dict(jlora.adapted_leaves(tree))
  kind = {"dora": jlora.DoraWeight, "ia3": jlora.IA3Weight, "vera": jlora.VeraWeight,
          "lora": jlora.LoraInitWeight}[method]
  adapted = {p: x for p, x in leaves.items() if not p.startswith("classifier/")}
  assert adapted and all(isinstance(x, kind) for x in adapted.values())
  head = sum(int(np.size(x.w)) for p, x in leaves.items() if p.startswith("classifier/"))
  r = cfg.method.rank
  want = 0
  for p, x in adapted.items():
    n_layers, n_in, n_out = x.shape
    if method == "ia3":  # output/dense is feed-forward: one scale per input
      want += n_layers * (n_in if p.endswith("output/dense/kernel") and "attention" not in p else n_out)
    elif method == "vera":  # lambda_d (r) and lambda_b (out) per layer; the projections are frozen
      want += n_layers * (r + n_out)
    else:
      want += n_layers * (r * (n_in + n_out) + (n_out if method == "dora" else 0))
  assert res.trainable_params == want + head
  moved = any(float(np.abs(np.asarray(x.merged()) - np.asarray(x.w)).max()) > 0 for x in adapted.values())
  assert moved and math.isfinite(res.metrics["test"]["loss"])


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_bottleneck_adapter_runs_count_reload_and_refuse_merging(tiny, placement):
  """method=adapter: bottleneck adapters on the placement's modules (plus the head) train, the
  count follows the shapes, the run reloads and evaluates (through jlora.lora, never merged) to
  the training run's metrics, and merging is refused."""
  cfg = load_config(overrides=tiny_cls_overrides(
      tiny["root"], tiny["bert"], f"adapter_{placement}", **{
          "method.name": "adapter", "method.placement": placement, "method.reduction_factor": 4,
          "resume": False, "train.max_steps": 3}))
  res = train(cfg, log=_quiet)
  run = load_run(res.output_dir)
  leaves = dict(jlora.adapted_leaves(run.tree))
  adapted = {p: x for p, x in leaves.items() if not p.startswith("classifier/")}
  want_paths = {"layers/output/dense/kernel"} | (
      {"layers/attention/output/dense/kernel"} if placement == "houlsby" else set())
  assert set(adapted) == want_paths and all(isinstance(x, jlora.BottleneckWeight) for x in adapted.values())
  assert {x.spec.non_linearity for x in adapted.values()} == {"swish" if placement == "houlsby" else "relu"}
  head = sum(int(np.size(x.w)) for p, x in leaves.items() if p.startswith("classifier/"))
  want = 0
  for x in adapted.values():
    n_layers, _, d = x.shape
    m = d // 4
    want += n_layers * (2 * d * m + m + d)
  assert res.trainable_params == want + head
  assert any(float(np.abs(np.asarray(x.up)).max()) > 0 for x in adapted.values())
  again = evaluate_run(run, "test")
  assert again["accuracy"] == res.metrics["test"]["accuracy"]
  assert again["loss"] == pytest.approx(res.metrics["test"]["loss"], rel=1e-5)
  probs = predict(run, ["a fine film"])[0]["probs"]
  assert abs(sum(probs) - 1) < 1e-5
  with pytest.raises(jlora.TreeError, match="cannot be merged"):
    merge_run(run, tiny["root"] / f"adapter-{placement}-merged", overwrite=True)


def test_adalora_run_ends_at_the_target_budget_and_reloads(tiny):
  """method=adalora: the allocator runs inside the step, the run ends at the target budget, the
  saved adapter carries the rank pattern (masked ranks are zero and stay masked when reloaded)."""
  cfg = load_config(overrides=tiny_cls_overrides(
      tiny["root"], tiny["bert"], "adalora", **{"method.name": "adalora", "method.rank": 3,
                                                "method.target_rank": 1, "method.delta_t": 1,
                                                "resume": False, "train.max_steps": 10}))
  res = train(cfg, log=_quiet)
  rep = res.metrics["adalora"]
  modules = 2 * 2  # query and value in 2 layers
  assert (rep["initial_ranks"], rep["target_ranks"]) == (3 * modules, 1 * modules)
  assert rep["kept_ranks"] <= rep["target_ranks"]
  tree = load_adapters(res.adapter_dir, _base_params(cfg))
  ada = {p: x for p, x in jlora.adapted_leaves(tree) if isinstance(x, jlora.AdaLoraWeight)}
  assert len(ada) == 2
  for p, x in ada.items():
    keep = np.asarray(x.spec.rank_pattern, bool).reshape(x.e.shape)
    assert [int(k.sum()) for k in keep] == rep["per_module"][p]
    assert np.all(np.asarray(x.e)[~keep] == 0) and np.all(np.asarray(x.a).swapaxes(-1, -2)[~keep] == 0)
    assert (x.spec.total_step, x.spec.tinit, x.spec.tfinal) == (10, 1, 2)
  assert math.isfinite(res.metrics["test"]["loss"])


def test_build_rules_picks_each_methods_spec_and_ia3_targets():
  params = {"layers": {m: {"kernel": jnp.zeros((2, 4, 4))} for m in ("q_proj", "k_proj", "v_proj", "down_proj")}}
  rules = dict(build_rules(load_config(overrides=["method.name=ia3", "method.train_also=[]"]), params, "llama"))
  assert sorted(rules) == ["layers/down_proj/kernel", "layers/k_proj/kernel", "layers/v_proj/kernel"]
  assert rules["layers/down_proj/kernel"] == jlora.IA3(feedforward=True, stack_axes=1)
  assert rules["layers/k_proj/kernel"] == jlora.IA3(stack_axes=1)
  rules = dict(build_rules(load_config(overrides=["method.name=dora", "method.rank=2", "method.train_also=[]"]), params, "llama"))
  assert set(rules) == {"layers/q_proj/kernel", "layers/v_proj/kernel"}
  assert all(isinstance(s, jlora.DoRA) and s.rank == 2 for s in rules.values())
  rules = dict(build_rules(load_config(overrides=["method.name=vera", "method.rank=16", "method.train_also=[]"]), params, "llama"))
  assert rules == {"layers/q_proj/kernel": jlora.VeRA(16, stack_axes=1), "layers/v_proj/kernel": jlora.VeRA(16, stack_axes=1)}
  rules = dict(build_rules(load_config(overrides=["method.init=olora", "method.train_also=[]"]), params, "llama"))
  assert {s.init for s in rules.values()} == {"olora"}
  with pytest.raises(ConfigError, match="DoRA takes kaiming or gaussian"):
    build_rules(load_config(overrides=["method.name=dora", "method.init=pissa", "method.train_also=[]"]), params, "llama")
  with pytest.raises(ConfigError, match="VeRA draws fixed Kaiming-uniform"):
    build_rules(load_config(overrides=["method.name=vera", "method.init=gaussian", "method.train_also=[]"]), params, "llama")


def test_bf16_and_remat_match_float32(tiny):
  losses = {}
  for name, extra in {"f32": {}, "bf16": {"model.dtype": "bfloat16"},
                      "remat": {"model.remat": True}}.items():
    res = train(load_config(overrides=tiny_cls_overrides(
        tiny["root"], tiny["bert"], f"prec-{name}", **extra, resume=False,
        **{"train.max_steps": 2})), log=_quiet)
    losses[name] = res.metrics["validation"]["loss"]
  assert losses["remat"] == pytest.approx(losses["f32"], rel=1e-5)
  assert losses["bf16"] == pytest.approx(losses["f32"], rel=3e-2)


# --------------------------------------------------------------------------- #
# Bad input: clear errors before any compute
# --------------------------------------------------------------------------- #


@pytest.fixture()
def no_model_load(monkeypatch):
  import jlora.train as T

  def boom(*a, **k):
    raise AssertionError("the model was loaded before the bad input was reported")

  monkeypatch.setattr(T, "_load_model", boom)


def _bad(tiny, name, rows, **extra):
  path = write_jsonl(tiny["root"] / "bad" / f"{name}.jsonl", rows)
  return load_config(overrides=tiny_cls_overrides(
      tiny["root"], tiny["bert"], f"bad-{name}", **{"data.train_files": str(path),
                                                   "data.validation_files": str(path),
                                                   "data.test_files": str(path), **extra}))


def test_missing_label_column_is_a_data_error(tiny, no_model_load):
  cfg = _bad(tiny, "nolabel", [{"text": "good", "rating": 1}] * 10)
  with pytest.raises(DataError, match=r"no column\(s\) \['label'\].*'rating'"):
    train(cfg, log=_quiet)
  assert not Path(cfg.output_dir).exists()


def test_missing_text_column_is_a_data_error(tiny, no_model_load):
  cfg = _bad(tiny, "notext", [{"sentence": "good", "label": 1}] * 10)
  with pytest.raises(DataError, match=r"\['text'\]"):
    train(cfg, log=_quiet)


def test_empty_dataset_is_a_data_error(tiny, no_model_load):
  path = tiny["root"] / "bad" / "empty.jsonl"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("")
  cfg = _bad(tiny, "x", [{"text": "a", "label": 0}] * 10, **{"data.train_files": str(path)})
  with pytest.raises(DataError, match="empty|no rows|0 rows"):
    train(cfg, log=_quiet)


def test_labels_out_of_range_is_a_data_error(tiny, no_model_load):
  rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "meh", "label": 5}] * 4
  cfg = _bad(tiny, "range", rows, **{"data.num_labels": 2})
  with pytest.raises(DataError, match=r"label 5 .* outside \[0, 2\)"):
    train(cfg, log=_quiet)


def test_unknown_method_and_config_typo_are_config_errors(tiny):
  with pytest.raises(ConfigError, match="did you mean 'lora'"):
    load_config(overrides=["method.name=lroa"])
  with pytest.raises(ConfigError, match="train.lr"):
    load_config(overrides=["train.lrate=1e-3"])


def test_unknown_target_module_names_the_closest(tiny):
  cfg = load_config(overrides=tiny_cls_overrides(tiny["root"], tiny["bert"], "badtarget", **{
      "method.targets": "qeury,value"}))
  with pytest.raises(ConfigError, match=r"'qeury' matches no module.*'query'"):
    train(cfg, log=_quiet)
  assert not (Path(cfg.output_dir) / "metrics.jsonl").exists()


def test_bitfit_on_a_model_without_biases_is_a_config_error(tiny):
  with pytest.raises(ConfigError, match="no bias"):
    build_rules(load_config(overrides=["method.name=bitfit", "method.train_also=[]"]),
                {"layers": {"q_proj": {"kernel": jnp.zeros((2, 4, 4))}}}, "llama")


def test_overlong_text_is_truncated_with_one_warning(tiny):
  rows = sentiment_rows(40, 5)
  rows[3]["text"] = " ".join(["good"] * 50)
  rows[7]["text"] = " ".join(["bad"] * 60)
  cfg = _bad(tiny, "long", rows, **{"train.max_steps": 1, "resume": False})
  from jlora.data import TruncationWarning
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    res = train(cfg, log=_quiet)
  trunc = [w for w in caught if issubclass(w.category, TruncationWarning)]
  assert len(trunc) == 1 and "2 of 40" in str(trunc[0].message)
  assert res.step == 1


# --------------------------------------------------------------------------- #
# Causal LM on a tiny Llama
# --------------------------------------------------------------------------- #


def _lm_overrides(tiny, out, **extra):
  data = tiny["root"] / "lmdata"
  if not data.exists():
    rng = np.random.default_rng(3)
    lines = [" ".join(rng.choice(["the", "movie", "was", "good", "and", "fun", "."], 8))
             for _ in range(200)]
    data.mkdir()
    (data / "train.txt").write_text("\n".join(lines[:160]) + "\n")
    (data / "test.txt").write_text("\n".join(lines[160:]) + "\n")
  items = {"output_dir": str(tiny["root"] / out), "model.name": str(tiny["llama"]),
           "data.task": "causal_lm", "data.source": "files",
           "data.train_files": str(data / "train.txt"), "data.test_files": str(data / "test.txt"),
           "data.max_length": 16, "train.batch_size": 4, "train.max_steps": 30, "train.lr": 1e-2,
           "train.progress": False, "train.tensorboard": False, "method.rank": 4, "resume": False,
           "method.train_also": "lm_head"}
  items.update(extra)
  return [f"{k}={v}" for k, v in items.items()]


def test_causal_lm_lowers_perplexity_and_merges(tiny):
  cfg = load_config(overrides=_lm_overrides(tiny, "lm"))
  base = evaluate_run(load_run(cfg=cfg, base=True), "test")
  res = train(cfg, log=_quiet)
  assert res.metrics["test"]["perplexity"] < 0.5 * base["perplexity"]
  run = load_run(res.output_dir)
  # Independent reference for the reported perplexity: numpy log-softmax over
  # llama_forward logits of the merged params, on the same packed test blocks.
  from jlora.data import CausalLMTask, load_files
  from jlora.models.llama import llama_forward
  task = CausalLMTask(run.tokenizer, 16, remainder="pad")
  feats = task.encode(load_files(cfg.data.test_files))
  merged = jlora.merge(run.tree)
  logits = np.asarray(llama_forward(merged, jnp.asarray(feats["input_ids"]), run.model,
                                    attention_mask=jnp.asarray(feats["attention_mask"])), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  lab = feats["labels"]
  ok = lab != -100
  nll = -np.take_along_axis(logp, np.where(ok, lab, 0)[..., None], -1)[..., 0][ok].mean()
  assert res.metrics["test"]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
  assert res.metrics["test"]["tokens"] == ok.sum()
  # merge -> HF folder -> load_llama gives the adapted model's logits.
  out = merge_run(run, tiny["root"] / "lm-merged", overwrite=True)
  from jlora.models.llama_io import load_llama
  _, params = load_llama(out)
  again = np.asarray(llama_forward(params, jnp.asarray(feats["input_ids"][:2]), run.model))
  np.testing.assert_allclose(again, logits[:2], rtol=1e-4, atol=1e-4)
  texts = predict(run, ["the movie"], max_new_tokens=5, chat=False)
  assert isinstance(texts[0]["output"], str)


@pytest.mark.parametrize("method, projection", [("prompt", 0), ("prefix", 0), ("prefix", 6)],
                         ids=["prompt", "prefix", "prefix-projection"])
def test_prompt_and_prefix_runs_lower_perplexity_and_reload(tiny, method, projection):
  """method=prompt|prefix: only the soft prompt / prefix (with method.prefix_projection: its
  embeddings and MLP) trains; the run reloads for eval and generation (the saved adapter holds
  it), refuses merging, and is an error on BERT."""
  name = f"lm-{method}{projection or ''}"
  cfg = load_config(overrides=_lm_overrides(tiny, name, **{
      "method.name": method, "method.num_virtual_tokens": 4, "method.train_also": "[]",
      "method.prefix_projection": projection, "train.lr": 5e-2}))
  base = evaluate_run(load_run(cfg=cfg, base=True), "test")
  res = train(cfg, log=_quiet)
  key = "prompt" if method == "prompt" else "prefix"
  assert res.metrics["test"]["perplexity"] < base["perplexity"]
  run = load_run(res.output_dir)
  trained = [p for p, _ in jlora.adapted_leaves(run.tree)]
  kv = run.model.num_kv_heads * run.model.head_dim
  if projection:  # embeddings (4, K*hd), Linear(K*hd, 6), Linear(6, L*2*K*hd)
    assert trained == [f"{key}/embedding"] + [f"{key}/projection/{k}" for k in ("b1", "b2", "w1", "w2")]
    assert res.trainable_params == 4 * kv + (kv * 6 + 6) + (6 + 1) * 2 * 2 * kv
  else:
    assert trained == [f"{key}/embedding"]
    assert res.trainable_params == 4 * (32 if method == "prompt" else 2 * 2 * kv)
  assert evaluate_run(run, "test")["perplexity"] == pytest.approx(res.metrics["test"]["perplexity"],
                                                                  rel=1e-5)
  assert isinstance(predict(run, ["the movie"], max_new_tokens=3, chat=False)[0]["output"], str)
  with pytest.raises(jlora.ConfigError, match="cannot be merged"):
    merge_run(run, tiny["root"] / f"{name}-merged", overwrite=True)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_tuning_on_bert_trains_unpacked_reloads_and_evaluates_equal(tiny, method):
  """method=prompt|prefix on the tiny BERT: the soft prompt / prefix and the head train on
  unpacked rows (every sentence needs its own, though data.pack is on), and the saved run
  evaluates equal."""
  lines = []
  cfg = load_config(overrides=tiny_cls_overrides(tiny["root"], tiny["bert"], f"bert-{method}", **{
      "method.name": method, "method.num_virtual_tokens": 4, "train.max_steps": 40,
      "train.lr": 5e-2, "data.pack": True}))
  res = train(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
  assert not any("packed batches" in line for line in lines)
  recs = [json.loads(line) for line in (res.output_dir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in recs if r["split"] == "train"]
  assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05
  run = load_run(res.output_dir)
  assert [p for p, _ in jlora.adapted_leaves(run.tree)] == ["classifier/bias", "classifier/kernel",
                                                            f"{method}/embedding"]
  # a prompt: 4 embeddings of 16; a prefix: 4 keys and values for 2 layers x 2 heads x 8
  assert res.trainable_params == 4 * (16 if method == "prompt" else 2 * 2 * 16) + (16 * 2 + 2)
  again = evaluate_run(run, "test")
  for k in ("loss", "accuracy"):
    assert again[k] == pytest.approx(res.metrics["test"][k], rel=1e-5)
  assert predict(run, ["good film"])[0]["label"] in (0, 1)


def test_grad_accum_with_token_weighting_on_lm(tiny):
  """Token-mean loss over unevenly padded micro-batches: accumulation equals one big batch."""
  outs = []
  for accum in (1, 2):
    res = train(load_config(overrides=_lm_overrides(
        tiny, f"lm-acc{accum}", **{"data.pack": False, "train.grad_accum": accum,
                                   "train.max_steps": 2})), log=_quiet)
    outs.append(res.metrics["test"]["loss"])
  assert outs[0] == pytest.approx(outs[1], rel=1e-5)


def test_classification_task_on_a_decoder_is_a_config_error(tiny):
  cfg = load_config(overrides=[f"model.name={tiny['llama']}"])
  with pytest.raises(ConfigError, match="needs an encoder"):
    train(cfg, log=_quiet)


def test_instruction_tuning_scores_only_the_response(tiny):
  data = tiny["root"] / "sft"
  rows = [{"prompt": f"the movie was {w} .", "response": "good" if w in POS else "bad"}
          for w in POS + NEG] * 4
  write_jsonl(data / "train.jsonl", rows)
  cfg = load_config(overrides=_lm_overrides(tiny, "sft", **{
      "data.task": "instruction", "data.train_files": str(data / "train.jsonl"),
      "data.test_files": str(data / "train.jsonl"), "data.max_length": 16,
      "train.max_steps": 20}))
  res = train(cfg, log=_quiet)
  # Scored tokens per example: the response word plus EOS ([SEP]) = 2, over 48 rows.
  assert res.metrics["test"]["tokens"] == 2 * len(rows)
  assert res.metrics["test"]["perplexity"] < 2.5  # the response is a function of the prompt


def test_causal_lm_on_a_quantised_base(tiny):
  """model.quantize: the base is stored quantised, LoRA trains on it, and the run's reported
  perplexity is what the saved adapters give on the same quantised base."""
  cfg = load_config(overrides=_lm_overrides(tiny, "lm-q8", **{"model.quantize": "q8_0"}))
  base = evaluate_run(load_run(cfg=cfg, base=True), "test")
  res = train(cfg, log=_quiet)
  assert res.metrics["test"]["perplexity"] < 0.5 * base["perplexity"]
  run = load_run(res.output_dir)
  kernel = run.tree["layers"]["self_attn"]["q_proj"]["kernel"]
  assert jlora.is_quantized(kernel.w) and kernel.w.spec.kind == "q8_0"
  again = evaluate_run(run, "test")
  assert again["perplexity"] == pytest.approx(res.metrics["test"]["perplexity"], rel=1e-5)
  with pytest.raises(ConfigError, match="model.quantize=gguf keeps a GGUF file"):
    train(load_config(overrides=_lm_overrides(tiny, "lm-gg", **{"model.quantize": "gguf"})), log=_quiet)
  with pytest.raises(ConfigError, match="model.quantize"):
    load_config(overrides=_lm_overrides(tiny, "lm-x", **{"model.quantize": "nf5"}))


# --------------------------------------------------------------------------- #
# Resume after SIGKILL, and the mesh
# --------------------------------------------------------------------------- #

_SLOW_TRAIN = """
import sys, time
from jlora.config import load_config
from jlora.train import train
# a slow step, so the parent can SIGKILL the process between (and during) checkpoint writes
train(load_config(overrides=sys.argv[1:]), log=lambda *_: None,
      on_step=lambda step, m: time.sleep(0.25))
"""


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_runs_adapters(tiny):
  """A process killed with SIGKILL mid-run resumes, from the CLI, to the same final adapters
  (bit-identical); its checkpoints restore from Python to the reference run's state."""
  import os
  import subprocess
  import sys
  import time
  from jlora.cli import main
  common = {"train.max_steps": 30, "train.save_every": 3, "train.keep_last": 30,
            "train.batch_size": 16, "method.dropout": 0.1}
  ref = train(load_config(overrides=tiny_cls_overrides(
      tiny["root"], tiny["bert"], "kill-ref", **common, resume=False)), log=_quiet)
  over = tiny_cls_overrides(tiny["root"], tiny["bert"], "killed", **common, resume=False)
  root = tiny["root"] / "killed" / "checkpoints"
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_TRAIN, *over],
                          env=dict(os.environ, PYTHONUNBUFFERED="1"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if root.is_dir() and len([p for p in root.iterdir() if p.name.isdigit()]) >= 3:
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()[0]  # still training when killed
  proc.kill()  # SIGKILL: no handler runs, a checkpoint write may be cut short
  proc.communicate(timeout=60)
  base = _base_params(load_config(overrides=over))
  with jlora.CheckpointManager(root) as mgr, \
       jlora.CheckpointManager(ref.output_dir / "checkpoints") as ref_mgr:
    killed_at = mgr.latest_step()
    assert killed_at is not None and 6 <= killed_at < 30
    got, want = mgr.restore(base), ref_mgr.restore(base, step=killed_at)
    assert got.data_state == want.data_state
    for x, y in zip(_arrays(jlora.split(got.tree)[0]), _arrays(jlora.split(want.tree)[0])):
      np.testing.assert_array_equal(x, y)
  # resume from the CLI (resume=true is the default)
  assert main(["train", *[o for o in over if o != "resume=False"]]) == 0
  a = load_adapters(ref.adapter_dir, base)
  b = load_adapters(tiny["root"] / "killed" / "adapter", base)
  for x, y in zip(_arrays(jlora.split(a)[0]), _arrays(jlora.split(b)[0])):
    np.testing.assert_array_equal(x, y)
  res = json.loads((tiny["root"] / "killed" / "results.json").read_text())
  assert res["resumed_from"] == killed_at and res["steps"] == 30


def test_cli_trains_on_8_devices_with_fsdp_as_on_one(tiny):
  """`jlora train train.mesh=fsdp` on the 8 fake CPU devices: the base and the adapters are
  sharded over the data axis, each batch split 8 ways; the adapters equal a 1-device run's."""
  from jlora.cli import main
  assert len(jax.devices()) == 8
  outs = {}
  for mesh in ("none", "fsdp"):
    over = tiny_cls_overrides(tiny["root"], tiny["bert"], f"mesh-{mesh}", **{
        "train.mesh": mesh, "train.max_steps": 3, "train.grad_accum": 2,
        "train.batch_size": 16, "resume": False})
    assert main(["train", *over]) == 0
    res = json.loads((tiny["root"] / f"mesh-{mesh}" / "results.json").read_text())
    outs[mesh] = (load_adapters(tiny["root"] / f"mesh-{mesh}" / "adapter",
                                _base_params(load_config(overrides=over))), res)
  assert outs["fsdp"][1]["mesh"] == {"preset": "fsdp", "shape": {"data": 8}}
  assert outs["none"][1]["mesh"] is None
  for x, y in zip(_arrays(jlora.split(outs["none"][0])[0]), _arrays(jlora.split(outs["fsdp"][0])[0])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  assert outs["fsdp"][1]["metrics"]["test"]["accuracy"] == outs["none"][1]["metrics"]["test"]["accuracy"]


def test_a_batch_the_mesh_cannot_split_is_a_config_error(tiny):
  over = tiny_cls_overrides(tiny["root"], tiny["bert"], "mesh-bad", **{
      "train.mesh": "fsdp", "train.batch_size": 12, "resume": False})
  with pytest.raises(ConfigError, match="multiple of 8"):
    train(load_config(overrides=over), log=_quiet)
