"""LoRA vs full fine-tuning vs BitFit on the default job (all-MiniLM-L6-v2, movie-review sentiment).

  python experiments/run_methods.py [--methods lora,full,bitfit] [KEY=VALUE ...]

Each method runs the default config (same data, split, steps, batch, seed) with
its own customary learning rate; overrides apply to all three. Writes
experiments/results/methods.json and methods.md with trainable parameters,
validation / test accuracy, wall and CPU time, and the saved adapter size.
Runs go to runs/methods-<method> (a finished run is not repeated; delete it to
re-run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

from jlora.config import load_config
from jlora.train import train

ROOT = Path(__file__).resolve().parent
#: method -> its own overrides (customary learning rates: LoRA and BitFit train few
#: parameters and take large steps; full fine-tuning of a pretrained encoder a small one).
METHODS = {
    "lora": ["method.name=lora", "train.lr=1e-3"],
    "full": ["method.name=full", "train.lr=1e-4"],
    "bitfit": ["method.name=bitfit", "train.lr=2e-3"],
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--methods", default="lora,full,bitfit")
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args()
  out_json = ROOT / "results" / "methods.json"
  rows = json.loads(out_json.read_text())["runs"] if out_json.exists() else {}
  for name in args.methods.split(","):
    run_dir = Path("runs") / f"methods-{name}"
    cfg = load_config(overrides=[f"output_dir={run_dir}", "train.progress=false", "resume=false",
                                 *METHODS[name], *args.overrides])
    if (run_dir / "results.json").exists() and name in rows and rows[name].get("config") == cfg_key(cfg):
      print(f"{name}: already done ({run_dir}); delete it to re-run")
      continue
    cpu0 = time.process_time()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    res = train(cfg)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    rows[name] = {
        "method": name,
        "lr": cfg.train.lr,
        "trainable_params": res.trainable_params,
        "total_params": res.total_params,
        "trainable_percent": 100.0 * res.trainable_params / res.total_params,
        "validation_accuracy": res.metrics["validation"]["accuracy"],
        "test_accuracy": res.metrics["test"]["accuracy"],
        "test_f1": res.metrics["test"]["f1"],
        "test_roc_auc": res.metrics["test"]["roc_auc"],
        "steps": res.step,
        "train_seconds": res.train_seconds,
        "wall_seconds": res.wall_seconds,
        "cpu_seconds": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
        "process_cpu_seconds": time.process_time() - cpu0,
        "saved_bytes": res.adapter_bytes,
        "config": cfg_key(cfg),
    }
    write(rows, out_json)


def cfg_key(cfg) -> dict:
  import dataclasses
  d = dataclasses.asdict(cfg)
  d.pop("output_dir")
  d["train"].pop("progress")
  return d


def write(rows: dict, out_json: Path) -> None:
  meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
          "load_average_at_end": os.getloadavg(),
          "note": "wall times were measured on a shared machine; cpu_seconds is the CPU time "
                  "the run itself used (all threads)."}
  out_json.parent.mkdir(parents=True, exist_ok=True)
  out_json.write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
  lines = [
      "# LoRA vs full fine-tuning vs BitFit: all-MiniLM-L6-v2 on movie-review sentiment",
      "",
      "Same data (the packaged movie-review sentences, canonical split: 8,513 train / "
      "1,042 validation / 1,013 test), same steps, batch and seed; each method with its "
      "customary learning rate. Produced by `python experiments/run_methods.py`.",
      "",
      "| method | lr | trainable params | trainable % | val acc | test acc | test F1 | "
      "test ROC-AUC | train s (wall) | CPU s | saved size |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows.values():
    lines.append(
        f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} | "
        f"{r['trainable_percent']:.3f} | {r['validation_accuracy']:.4f} | "
        f"{r['test_accuracy']:.4f} | {r['test_f1']:.4f} | {r['test_roc_auc']:.4f} | "
        f"{r['train_seconds']:.0f} | {r['cpu_seconds']:.0f} | {r['saved_bytes'] / 1e6:.2f} MB |")
  lines += ["", f"Machine: {meta['machine']}; load average at the end {meta['load_average_at_end']}. "
            + meta["note"], ""]
  out_json.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
  main()
