"""The PEFT methods side by side on the default job (all-MiniLM-L6-v2, movie-review sentiment).

  python experiments/run_methods.py [--methods lora,dora,ia3,vera,pissa,adalora,full,bitfit] [KEY=VALUE ...]

Each method runs the default config (same data, split, steps, batch, seed) with
its own customary learning rate (not tuned here); overrides apply to all. Writes
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
import sys
import time
from pathlib import Path

from jlora.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lora_runs import cfg_key  # noqa: E402  (the config fields that decide a result)
from jlora.train import train

ROOT = Path(__file__).resolve().parent
#: method -> its own overrides (customary learning rates: LoRA and BitFit train few
#: parameters and take large steps; full fine-tuning of a pretrained encoder a small one).
METHODS = {
    # alpha 16 at r=8 (scale 2), the CLI default when methods.md was measured
    "lora": ["method.name=lora", "method.alpha=16", "train.lr=1e-3"],
    "dora": ["method.name=dora", "method.alpha=16", "train.lr=1e-3"],
    "pissa": ["method.name=lora", "method.init=pissa", "method.alpha=16", "train.lr=1e-3"],
    "ia3": ["method.name=ia3", "train.lr=3e-3"],
    "vera": ["method.name=vera", "method.rank=256", "train.lr=4e-3"],
    # init_r 12 -> target_r 8 (PEFT's defaults): it ends at LoRA r=8's budget; the CLI's lr 4e-3
    "adalora": ["method.name=adalora", "method.rank=12", "method.target_rank=8"],
    "full": ["method.name=full", "train.lr=1e-4"],
    "bitfit": ["method.name=bitfit", "train.lr=2e-3"],
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--reuse", action="append", default=[], metavar="METHOD=RUN_DIR",
                  help="take a method's numbers from a finished run directory whose config is "
                       "the one this script would run (checked), instead of training again")
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args()
  out_json = ROOT / "results" / "methods.json"
  rows = json.loads(out_json.read_text())["runs"] if out_json.exists() else {}
  for item in args.reuse:
    name, run_dir = item.split("=", 1)
    cfg = load_config(overrides=[f"output_dir={run_dir}", *METHODS[name], *args.overrides])
    saved = load_config(Path(run_dir) / "config.yaml")
    if cfg_key(saved) != cfg_key(cfg):
      raise SystemExit(f"--reuse {item}: its config.yaml is not the {name} config of this script")
    r = json.loads((Path(run_dir) / "results.json").read_text())
    rows[name] = row(name, cfg, r["trainable_params"], r["total_params"], r["metrics"], r["steps"],
                     r["train_seconds"], r["wall_seconds"], None, r["adapter_bytes"])
    rows[name]["reused_run"] = str(run_dir)
    write(rows, out_json)
  for name in args.methods.split(","):
    if not name or name in {i.split("=", 1)[0] for i in args.reuse}:
      continue
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
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    rows[name] = row(name, cfg, res.trainable_params, res.total_params, res.metrics, res.step,
                     res.train_seconds, res.wall_seconds, cpu, res.adapter_bytes)
    rows[name]["process_cpu_seconds"] = time.process_time() - cpu0
    rows[name]["load_average_at_end"] = os.getloadavg()[0]
    write(rows, out_json)


def row(name, cfg, trainable, total, metrics, steps, train_s, wall_s, cpu_s, saved) -> dict:
  return {
      "method": name,
      "lr": cfg.train.lr,
      "trainable_params": trainable,
      "total_params": total,
      "trainable_percent": 100.0 * trainable / total,
      "validation_accuracy": metrics["validation"]["accuracy"],
      "test_accuracy": metrics["test"]["accuracy"],
      "test_f1": metrics["test"]["f1"],
      "test_roc_auc": metrics["test"]["roc_auc"],
      "steps": steps,
      "step_ms": 1000.0 * train_s / max(steps, 1),
      "train_seconds": train_s,
      "wall_seconds": wall_s,
      "cpu_seconds": cpu_s,
      "saved_bytes": saved,
      "config": cfg_key(cfg),
  }




_NOTE = (
    "Step times compare only between rows measured at a similar load (the `load at end` column: "
    "the machine's 1-minute load average when the run ended, on 2 CPUs). Rows with `n/a` there "
    "(full, bitfit) were run on a machine shared with up to 8 other jobs (load ~10), so their wall "
    "times are several times what they take alone; their CPU seconds are the run's own. The LoRA "
    "default job rerun alone from a fresh clone: `default_job.txt`. VeRA's saved size holds its "
    "frozen projections too (rank * (in + out) numbers per adapted kernel, so that an adapter read "
    "from PEFT restores exactly), besides the trained vectors. AdaLoRA (init_r 12 -> target_r 8, "
    "lr 4e-3, tinit/tfinal 10%/20% of the steps, deltaT 10) trains 1.5x LoRA r=8's parameters "
    "until its allocator prunes them back to r=8's budget; the run ended at exactly its target (96 "
    "of 144 ranks), giving the value projections 9-11 ranks per layer and the queries 5-8; its saved "
    "size is the pruned adapter. Its wall time was measured while other tests shared the machine "
    "(load not recorded), so its step time is an upper bound.")


def _load(r: dict) -> str:
  v = r.get("load_average_at_end")
  return "n/a" if v is None else f"{v:.1f}"


def write(rows: dict, out_json: Path) -> None:
  meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
          "load_average_at_end": os.getloadavg(),
          "note": "wall times were measured on a shared machine; cpu_seconds is the CPU time "
                  "the run itself used (all threads)."}
  out_json.parent.mkdir(parents=True, exist_ok=True)
  out_json.write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
  lines = [
      "# PEFT methods side by side: all-MiniLM-L6-v2 on movie-review sentiment",
      "",
      "Same data (the packaged movie-review sentences, canonical split: 8,513 train / "
      "1,042 validation / 1,013 test), same steps, batch and seed; each method with its "
      "customary learning rate. Produced by `python experiments/run_methods.py`.",
      "",
      "| method | lr | trainable params | trainable % | val acc | test acc | test F1 | "
      "test ROC-AUC | train s (wall) | ms/step (train s / steps: compile and eval included) | CPU s | "
      "load at end | saved size |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows.values():
    lines.append(
        f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} | "
        f"{r['trainable_percent']:.3f} | {r['validation_accuracy']:.4f} | "
        f"{r['test_accuracy']:.4f} | {r['test_f1']:.4f} | {r['test_roc_auc']:.4f} | "
        f"{r['train_seconds']:.0f} | {r.get('step_ms', 1000.0 * r['train_seconds'] / r['steps']):.0f} | "
        f"{_num(r['cpu_seconds'])} | {_load(r)} | {r['saved_bytes'] / 1e6:.2f} MB |")
  lines += ["", f"Machine: {meta['machine']}; load average at the end {meta['load_average_at_end']}. "
            + meta["note"], "", _NOTE, ""]
  out_json.with_suffix(".md").write_text("\n".join(lines))


def _num(x) -> str:
  return "n/a" if x is None else f"{x:.0f}"


if __name__ == "__main__":
  main()
