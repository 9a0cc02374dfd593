"""The main job, jlora vs the PEFT + torch reference, back to back on this machine.

The job is the README's first command: ``jlora train`` on its defaults
(all-MiniLM-L6-v2 with mean pooling, LoRA on query/value plus a trainable
classifier head, the movie-review sentiment sentences, one epoch). The
reference does the same work with Hugging Face PEFT 0.21 on torch (CPU):

* the same rows (``jlora.data.load_sentiment``: the same train / validation /
  test split), the same tokenizer and ``max_length``, truncation, and dynamic
  padding (each batch padded to its longest row by ``tokenizer.pad``);
* the same model: transformers' ``BertModel`` (no pooler) from the same
  safetensors, masked mean pooling, a ``Linear(hidden, num_labels)`` head
  initialised ``N(0, 0.02)``, no dropout (``jlora train`` trains with the
  model's dropout off by default, ``model.dropout=false``);
* the same method: ``LoraConfig(r, lora_alpha, target_modules=["query",
  "value"], modules_to_save=["classifier"])``;
* the same optimisation: AdamW (``weight_decay``, betas, eps 1e-8 as optax),
  linear warmup then cosine decay to 0 over the same step counts, global-norm
  clipping, the same batch size and epochs;
* the same finish: validation and test evaluation, the adapter saved.

Both run as fresh subprocesses, timed from process start to exit (imports,
model and data loading, compilation, training, evaluation and saving all
count). jlora runs twice: once with an empty persistent compilation cache
("cold", what a first run on a fresh machine costs) and once more with the
cache it left ("warm", every later run). Run on a quiet machine:

  python experiments/bench_main_job.py                  # prints the table, saves results
  python experiments/bench_main_job.py --reference-only # just the PEFT run

The hyper-parameters come from ``jlora.config.Config()`` so a change of the
defaults changes both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _reference(out_dir: str) -> dict:
  """The PEFT + torch run of the default job (runs in its own process)."""
  t0 = time.perf_counter()
  import math

  import numpy as np
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import AutoModel, AutoTokenizer, get_cosine_schedule_with_warmup

  from jlora.config import Config
  from jlora.data import load_sentiment
  from jlora.models import resolve

  cfg = Config()
  tc, me, dc = cfg.train, cfg.method, cfg.data
  torch.manual_seed(tc.seed)
  path, _ = resolve(cfg.model.name)
  tok = AutoTokenizer.from_pretrained(str(path))
  dd = load_sentiment(domain=dc.domain, binary=dc.binary, seed=dc.split_seed)
  enc = {s: tok(list(dd[s]["text"]), truncation=True, max_length=dc.max_length)
         for s in ("train", "validation", "test")}
  labels = {s: np.asarray(dd[s]["label"], np.int64) for s in enc}
  num_labels = int(max(labels["train"].max(), 1) + 1)

  class Classifier(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.bert = AutoModel.from_pretrained(str(path), add_pooling_layer=False)
      h = self.bert.config.hidden_size
      self.classifier = torch.nn.Linear(h, num_labels)
      torch.nn.init.normal_(self.classifier.weight, std=0.02)
      torch.nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
      hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
      m = attention_mask.unsqueeze(-1).to(hidden.dtype)
      pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
      return self.classifier(pooled)

  alpha = me.alpha if me.alpha > 0 else me.rank
  lcfg = LoraConfig(r=me.rank, lora_alpha=alpha, lora_dropout=me.dropout,
                    target_modules=list(me.targets or ["query", "value"]),
                    modules_to_save=["classifier"])
  model = get_peft_model(Classifier(), lcfg)
  model.eval()  # jlora's default trains without the model's dropout
  params = [p for p in model.parameters() if p.requires_grad]
  n_train = len(labels["train"])
  steps_per_epoch = n_train // tc.batch_size
  total = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
  warmup = int(round(tc.warmup_ratio * total))
  decay = [p for p in params if p.ndim >= 2]
  no_decay = [p for p in params if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=tc.lr, betas=(tc.adam_b1, tc.adam_b2), eps=1e-8)
  sched = get_cosine_schedule_with_warmup(opt, warmup, max(total, warmup + 1))

  def batch_of(split, idx):
    feats = [{k: enc[split][k][i] for k in enc[split].keys()} for i in idx]
    b = tok.pad(feats, return_tensors="pt")
    return b, torch.as_tensor(labels[split][idx])

  rng = np.random.default_rng(tc.seed)
  t_train = time.perf_counter()
  step, epoch, last_loss = 0, 0, float("nan")
  while step < total:
    order = rng.permutation(n_train)
    for lo in range(0, steps_per_epoch * tc.batch_size, tc.batch_size):
      b, y = batch_of("train", order[lo:lo + tc.batch_size])
      logits = model(**b)
      loss = torch.nn.functional.cross_entropy(logits.float(), y)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      if tc.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, tc.clip_norm)
      opt.step()
      sched.step()
      step += 1
      last_loss = float(loss)
      if step >= total:
        break
    epoch += 1
  train_s = time.perf_counter() - t_train

  res = {}
  with torch.no_grad():
    for split in ("validation", "test"):
      n = len(labels[split])
      lengths = np.asarray([len(x) for x in enc[split]["input_ids"]])
      order = np.argsort(-lengths, kind="stable")  # as jlora's evaluation: length-sorted
      preds = np.empty(n, np.int64)
      for lo in range(0, n, tc.eval_batch_size):
        idx = order[lo:lo + tc.eval_batch_size]
        b, _ = batch_of(split, idx)
        preds[idx] = model(**b).argmax(-1).numpy()
      res[split] = {"accuracy": float((preds == labels[split]).mean())}
  model.save_pretrained(out_dir)
  return {"steps": step, "train_seconds": train_s, "last_loss": last_loss,
          "metrics": res, "inner_seconds": time.perf_counter() - t0,
          "torch_threads": torch.get_num_threads()}


def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
  t0 = time.perf_counter()
  p = subprocess.run(cmd, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if p.returncode:
    sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
    raise SystemExit(f"{cmd} failed with exit code {p.returncode}")
  return wall, p.stdout + p.stderr


def _jlora_run(tmp: Path, cache: Path, tag: str, overrides: list[str]) -> dict:
  out = tmp / f"jlora-{tag}"
  env = dict(os.environ, JLORA_COMPILATION_CACHE=str(cache))
  wall, log = _timed([sys.executable, "-m", "jlora", "train", f"output_dir={out}",
                      "train.progress=false", *overrides], env)
  rec = json.loads((out / "results.json").read_text())
  return {"wall_seconds": wall, "train_seconds": rec["train_seconds"],
          "steps": rec["steps"], "metrics": {s: {"accuracy": m["accuracy"]}
                                             for s, m in rec["metrics"].items()},
          "log_tail": log.strip().splitlines()[-3:]}


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} CPUs, no GPU used"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reference-only", action="store_true")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  ap.add_argument("--no-save", action="store_true", help="print only, do not write results/")
  args = ap.parse_args()
  if args.worker:
    rec = _reference(args.worker)
    Path(args.worker, "reference.json").write_text(json.dumps(rec))
    return
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as d:
    tmp = Path(d)
    ref_dir = tmp / "peft"
    ref_dir.mkdir()
    wall, _ = _timed([sys.executable, __file__, "--worker", str(ref_dir)], dict(os.environ))
    ref = json.loads((ref_dir / "reference.json").read_text())
    ref["wall_seconds"] = wall
    print(f"PEFT + torch: {wall:.1f} s wall, train {ref['train_seconds']:.1f} s, test accuracy "
          f"{ref['metrics']['test']['accuracy']:.4f}", flush=True)
    if args.reference_only:
      return
    cache = tmp / "xla-cache"
    cold = _jlora_run(tmp, cache, "cold", [])
    print(f"jlora (cold cache): {cold['wall_seconds']:.1f} s wall, test accuracy "
          f"{cold['metrics']['test']['accuracy']:.4f}", flush=True)
    warm = _jlora_run(tmp, cache, "warm", [])
    print(f"jlora (warm cache): {warm['wall_seconds']:.1f} s wall, test accuracy "
          f"{warm['metrics']['test']['accuracy']:.4f}", flush=True)
  from jlora.config import Config
  c = Config()
  rec = {
      "machine": _machine(), "load_average_before": load_before,
      "date": time.strftime("%Y-%m-%d"),
      "job": {"model": c.model.name, "method": c.method.name, "rank": c.method.rank,
              "alpha": c.method.alpha or float(c.method.rank), "targets": c.method.targets or ["query", "value"],
              "batch_size": c.train.batch_size, "epochs": c.train.epochs, "lr": c.train.lr,
              "max_length": c.data.max_length},
      "peft": ref, "jlora_cold": cold, "jlora_warm": warm,
      "ratio_cold": cold["wall_seconds"] / ref["wall_seconds"],
      "ratio_warm": warm["wall_seconds"] / ref["wall_seconds"],
  }
  lines = [
      f"main job: jlora train (defaults) vs PEFT 0.21 + torch (CPU), same data and hyper-parameters",
      f"machine: {rec['machine']}; load average before {load_before:.2f}; {rec['date']}",
      f"job: {json.dumps(rec['job'])}",
      "",
      f"{'run':<20}{'wall s':>8}{'train s':>9}{'val acc':>9}{'test acc':>9}",
  ]
  for name, r in (("PEFT + torch", ref), ("jlora, cold cache", cold), ("jlora, warm cache", warm)):
    lines.append(f"{name:<20}{r['wall_seconds']:>8.1f}{r['train_seconds']:>9.1f}"
                 f"{r['metrics']['validation']['accuracy']:>9.4f}"
                 f"{r['metrics']['test']['accuracy']:>9.4f}")
  lines += ["", f"wall ratio jlora / PEFT: cold cache {rec['ratio_cold']:.3f}x, warm cache "
                f"{rec['ratio_warm']:.3f}x (target <= 0.77x)",
            f"test accuracy: jlora {cold['metrics']['test']['accuracy']:.4f} (cold), "
            f"{warm['metrics']['test']['accuracy']:.4f} (warm) vs PEFT "
            f"{ref['metrics']['test']['accuracy']:.4f}"]
  text = "\n".join(lines)
  print(text)
  if not args.no_save:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_main_job.txt").write_text(text + "\n")
    (RESULTS / "bench_main_job.json").write_text(json.dumps(rec, indent=2) + "\n")


if __name__ == "__main__":
  main()
