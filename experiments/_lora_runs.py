"""Shared by run_rank_sweep.py and run_weight_types.py: run (or reuse) one default-job variant.

A variant is the default job (experiments/configs/minilm_sentiment.yaml: all-MiniLM-L6-v2,
movie-review sentences, batch 32) at one epoch (the sweeps were measured so; the default job
trains two since 2026-12-08) plus a few overrides. Each one trains
into runs/<name> under the repository root; a directory that already holds results.json and
the same resolved config is read back instead of trained again (delete it to re-run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from jlora.config import load_config

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "runs"


def cfg_key(cfg) -> dict:
  """The parts of a resolved config that decide the result (not where it is written)."""
  d = dataclasses.asdict(cfg)
  d.pop("output_dir")
  d["train"].pop("progress")
  d["resume"] = None
  return d


def make_cfg(name: str, overrides: list[str]):
  # the sweeps were measured at one epoch (the default job's until it became two)
  return load_config(overrides=[f"output_dir={RUNS / name}", "train.progress=false",
                                "resume=false", "train.epochs=1", *overrides])


def run_or_load(name: str, overrides: list[str], *, train_missing: bool = True) -> dict | None:
  """Trains variant ``name`` (or reads its finished run) and returns one result row.

  With ``train_missing=False`` a variant without a finished run returns None (report only
  what exists).
  """
  cfg = make_cfg(name, overrides)
  run_dir = RUNS / name
  res_path = run_dir / "results.json"
  if res_path.exists():
    saved = load_config(run_dir / "config.yaml")
    if cfg_key(saved) != cfg_key(cfg):
      raise SystemExit(f"{run_dir} holds a different config; delete it to re-run")
    print(f"{name}: already done ({run_dir})", flush=True)
    r = json.loads(res_path.read_text())
    load = json.loads((run_dir / "load.json").read_text()) if (run_dir / "load.json").exists() else {}
  elif not train_missing:
    print(f"{name}: not run yet (skipped: --only-finished)", flush=True)
    return None
  else:
    from jlora.train import train  # noqa: PLC0415
    print(f"{name}: training ({' '.join(overrides) or 'defaults'})", flush=True)
    load = {"load_average_at_start": os.getloadavg()[0]}
    res = train(cfg)
    load["load_average_at_end"] = os.getloadavg()[0]
    (run_dir / "load.json").write_text(json.dumps(load) + "\n")
    r = json.loads(res_path.read_text())
  m = r["metrics"]
  return {
      "run_dir": str(run_dir.relative_to(REPO)),
      "rank": cfg.method.rank, "alpha": cfg.method.alpha, "targets": list(cfg.method.targets or []),
      "trainable_params": r["trainable_params"], "total_params": r["total_params"],
      "validation_accuracy": m["validation"]["accuracy"], "test_accuracy": m["test"]["accuracy"],
      "test_f1": m["test"].get("f1"), "steps": r["steps"],
      "train_seconds": r["train_seconds"], "wall_seconds": r["wall_seconds"],
      "adapter_bytes": r["adapter_bytes"], **load,
  }


def machine() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
  except Exception:  # noqa: BLE001
    model = platform.processor() or platform.machine()
  return f"{model}, {os.cpu_count()} CPUs visible, no GPU (JAX CPU backend)"


def today() -> str:
  return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
