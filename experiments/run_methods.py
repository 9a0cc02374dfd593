"""The PEFT methods side by side on the default job (all-MiniLM-L6-v2, movie-review sentiment).

  python experiments/run_methods.py [--methods lora,dora,...] [KEY=VALUE ...]
  python experiments/run_methods.py --memory [--methods ...]   # peak memory of 20-step runs
  python experiments/run_methods.py --lm [--methods lora,ia3,prompt,prefix,...]  # SmolLM2 perplexity
  python experiments/run_methods.py --plot                      # methods.png from the saved rows

Each method runs the default config (same data, split, steps, batch, seed) with
its own customary learning rate (not tuned here); overrides apply to all. Every
run is a child process of this script, so its peak resident memory (the whole
process: the frozen model, the optimizer state, XLA's buffers and compiled code)
is its own. Writes experiments/results/methods.json and methods.md with trainable
parameters, validation / test accuracy, wall and CPU time, the saved adapter
size and peak memory. ``--memory`` runs each method for 20 steps only and records
just its peak memory (the steady state is reached within the first steps), so the
column exists for rows whose full run predates it. ``--lm`` trains the generative
methods on SmolLM2-135M-Instruct as a causal LM on the same sentences
(experiments/configs/smollm2_causal_lm.yaml, 40 steps) and records test
perplexity. Runs go to runs/methods-<method> (runs/methods-lm-<method>; a
finished run is not repeated; delete it to re-run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
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
    # AdapterHub's configs: reduction factor 16, swish (Houlsby) / relu (Pfeiffer)
    "adapter_houlsby": ["method.name=adapter", "method.placement=houlsby", "train.lr=1e-3"],
    "adapter_pfeiffer": ["method.name=adapter", "method.placement=pfeiffer", "train.lr=1e-3"],
    # a 20-token soft prompt before each sentence (BERT: the classifier reads the first one)
    "prompt": ["method.name=prompt", "method.num_virtual_tokens=20", "train.lr=3e-2"],
    # 20 trained keys and values per layer (P-tuning v2's direct prefix on a classifier)
    "prefix": ["method.name=prefix", "method.num_virtual_tokens=20", "train.lr=1e-2"],
}

#: the MiniLM table was measured at one epoch (266 steps), the default job's until it became two
ONE_EPOCH = ["train.epochs=1"]
LM_CONFIG = ROOT / "configs" / "smollm2_causal_lm.yaml"
#: the generative methods on SmolLM2 (the config's own targets are LoRA's: every linear layer;
#: the other methods take their own defaults, method.targets=null)
LM_METHODS = {
    "lora": [],
    "ia3": ["method.name=ia3", "method.targets=null", "train.lr=3e-3"],
    "adapter_houlsby": ["method.name=adapter", "method.targets=null", "method.placement=houlsby"],
    "adapter_pfeiffer": ["method.name=adapter", "method.targets=null", "method.placement=pfeiffer"],
    "prompt": ["method.name=prompt", "method.num_virtual_tokens=20", "train.lr=3e-2"],
    "prefix": ["method.name=prefix", "method.num_virtual_tokens=20", "train.lr=1e-2"],
    # Li & Liang's reparameterisation: the prefix is an MLP's output (PEFT's prefix_projection)
    "prefix_projection": ["method.name=prefix", "method.num_virtual_tokens=20",
                          "method.prefix_projection=512", "train.lr=1e-3"],
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--methods", default=None, help="comma-separated (default: every method of the mode)")
  ap.add_argument("--memory", action="store_true", help="20-step runs: peak memory only")
  ap.add_argument("--lm", action="store_true", help="SmolLM2 causal-LM perplexity of the generative methods")
  ap.add_argument("--plot", action="store_true", help="draw methods.png from the saved rows and exit")
  ap.add_argument("--reuse", action="append", default=[], metavar="METHOD=RUN_DIR",
                  help="take a method's numbers from a finished run directory whose config is "
                       "the one this script would run (checked), instead of training again")
  ap.add_argument("--child", nargs=2, metavar=("CONFIG_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args()
  if args.child:
    _child(*args.child)
    return
  out_json = ROOT / "results" / "methods.json"
  saved = json.loads(out_json.read_text()) if out_json.exists() else {}
  rows, memory, lm = saved.get("runs", {}), saved.get("memory", {}), saved.get("lm_runs", {})
  if args.plot:
    plot(rows, lm, memory, out_json.with_suffix(".png"))
    return
  for item in args.reuse:
    name, run_dir = item.split("=", 1)
    cfg = load_config(overrides=[f"output_dir={run_dir}", *ONE_EPOCH, *METHODS[name], *args.overrides])
    saved_cfg = load_config(Path(run_dir) / "config.yaml")
    if cfg_key(saved_cfg) != cfg_key(cfg):
      raise SystemExit(f"--reuse {item}: its config.yaml is not the {name} config of this script")
    r = json.loads((Path(run_dir) / "results.json").read_text())
    rows[name] = row(name, cfg, r["trainable_params"], r["total_params"], r["metrics"], r["steps"],
                     r["train_seconds"], r["wall_seconds"], None, r["adapter_bytes"])
    rows[name]["reused_run"] = str(run_dir)
    write(rows, memory, lm, out_json)
  table = LM_METHODS if args.lm else METHODS
  names = args.methods.split(",") if args.methods else list(table)
  if args.lm and "base" not in lm:
    cfg = load_config(LM_CONFIG, overrides=["output_dir=runs/methods-lm-base", *args.overrides])
    r = _run_child(cfg, base=True)
    lm["base"] = {"method": "base (no adapter)", "test_perplexity": r["test"]["perplexity"],
                  "validation_perplexity": r["validation"]["perplexity"]}
    write(rows, memory, lm, out_json)
  for name in names:
    if not name or name in {i.split("=", 1)[0] for i in args.reuse}:
      continue
    if name not in table:
      raise SystemExit(f"unknown method {name!r} for this mode; known: {', '.join(table)}")
    if args.lm:
      run_dir = Path("runs") / f"methods-lm-{name}"
      cfg = load_config(LM_CONFIG, overrides=[f"output_dir={run_dir}", "train.progress=false",
                                              "resume=false", *table[name], *args.overrides])
      if name in lm and lm[name].get("config") == cfg_key(cfg):
        print(f"{name}: already done ({run_dir}); delete its row to re-run")
        continue
      r = _run_child(cfg)
      lm[name] = {"method": name, "lr": cfg.train.lr, "trainable_params": r["trainable_params"],
                  "test_perplexity": r["metrics"]["test"]["perplexity"],
                  "validation_perplexity": r["metrics"]["validation"]["perplexity"],
                  "steps": r["steps"], "train_seconds": r["train_seconds"],
                  "saved_bytes": r["adapter_bytes"], "peak_rss_mb": r["peak_rss_mb"],
                  "load_average_at_end": os.getloadavg()[0], "config": cfg_key(cfg)}
    elif args.memory:
      run_dir = Path("runs") / f"methods-mem-{name}"
      cfg = load_config(overrides=[f"output_dir={run_dir}", "train.progress=false", "resume=false",
                                   *ONE_EPOCH, *table[name], "train.max_steps=20", *args.overrides])
      r = _run_child(cfg)
      memory[name] = {"peak_rss_mb": r["peak_rss_mb"], "steps": r["steps"], "config": cfg_key(cfg)}
    else:
      run_dir = Path("runs") / f"methods-{name}"
      cfg = load_config(overrides=[f"output_dir={run_dir}", "train.progress=false", "resume=false",
                                   *ONE_EPOCH, *table[name], *args.overrides])
      if (run_dir / "results.json").exists() and name in rows and rows[name].get("config") == cfg_key(cfg):
        print(f"{name}: already done ({run_dir}); delete it to re-run")
        continue
      r = _run_child(cfg)
      rows[name] = row(name, cfg, r["trainable_params"], r["total_params"], r["metrics"], r["steps"],
                       r["train_seconds"], r["wall_seconds"], r["cpu_seconds"], r["adapter_bytes"])
      rows[name]["peak_rss_mb"] = r["peak_rss_mb"]
      rows[name]["load_average_at_end"] = os.getloadavg()[0]
    write(rows, memory, lm, out_json)


def _run_child(cfg, base: bool = False) -> dict:
  """Runs ``cfg`` (training, or a base evaluation) in a child process; its results and peak RSS."""
  with tempfile.TemporaryDirectory() as tmp:
    cfg_file, out = Path(tmp) / "cfg.json", Path(tmp) / "out.json"
    cfg_file.write_text(json.dumps({"config": dataclasses.asdict(cfg), "base": base}))
    p = subprocess.Popen([sys.executable, __file__, "--child", str(cfg_file), str(out)])
    _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
      raise SystemExit(f"the run of {cfg.output_dir} failed (status {status})")
    r = json.loads(out.read_text())
  r["peak_rss_mb"] = ru.ru_maxrss / 1024.0  # Linux: kilobytes
  r["cpu_seconds"] = ru.ru_utime + ru.ru_stime
  return r


def _child(cfg_file: str, out: str) -> None:
  from jlora.config import Config, apply_overrides  # noqa: F401
  from jlora.train import evaluate_run, load_run

  spec = json.loads(Path(cfg_file).read_text())
  cfg = _config_from_dict(spec["config"])
  if spec["base"]:
    run = load_run(cfg=cfg, base=True)
    result = {s: evaluate_run(run, s) for s in ("validation", "test")}
  else:
    res = train(cfg)
    result = {"trainable_params": res.trainable_params, "total_params": res.total_params,
              "metrics": res.metrics, "steps": res.step, "train_seconds": res.train_seconds,
              "wall_seconds": res.wall_seconds, "adapter_bytes": res.adapter_bytes}
  Path(out).write_text(json.dumps(result))


def _config_from_dict(d: dict):
  from jlora.config import Config, DataConfig, MethodConfig, ModelConfig, TrainConfig
  parts = {"model": ModelConfig, "data": DataConfig, "method": MethodConfig, "train": TrainConfig}
  return Config(**{k: (parts[k](**v) if k in parts else v) for k, v in d.items()})


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
    "(load not recorded), so its step time is an upper bound. The bottleneck-adapter, prompt and "
    "prefix rows ran while the test suite shared the machine (load 4.7-7.2 at the end), so their "
    "times are upper bounds too; prompt and prefix run unpacked rows (every sentence needs its own "
    "virtual tokens), the others packed ones.")


_MEMORY_NOTE = (
    "Peak memory is the peak resident set of the run's own process (the frozen model, optimizer "
    "state, XLA's buffers and compiled code, the tokenizer and data), from 20-step runs "
    "(`--memory`) where measured, else from the full run. Full fine-tuning holds Adam's two moments "
    "for every weight; the PEFT methods only for their few parameters.")

_LM_NOTE = (
    "40 steps is a short run on a shared 2-core CPU: the ranking says which methods adapt the "
    "model fast at these learning rates, not where each would end. The bottleneck adapters sit "
    "after o_proj and down_proj (Houlsby) or down_proj (Pfeiffer) with reduction factor 16; IA3 on "
    "PEFT's default k_proj, v_proj, down_proj. The prefix trained directly (its keys and values "
    "themselves, lr 1e-2) diverged: its perplexity ends above the base model's; through the "
    "projection MLP (Li & Liang's reparameterisation, the reason they give for it) at lr 1e-3 it "
    "trains. Reported as measured, one seed each.")


def _load(r: dict) -> str:
  v = r.get("load_average_at_end")
  return "n/a" if v is None else f"{v:.1f}"


def _mem(name: str, r: dict | None, memory: dict) -> str:
  m = memory.get(name, {}).get("peak_rss_mb") or (r or {}).get("peak_rss_mb")
  return "n/a" if m is None else f"{m / 1024:.2f} GB"


def write(rows: dict, memory: dict, lm: dict, out_json: Path) -> None:
  meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
          "load_average_at_end": os.getloadavg(),
          "note": "wall times were measured on a shared machine; cpu_seconds is the CPU time "
                  "the run itself used (all threads)."}
  out_json.parent.mkdir(parents=True, exist_ok=True)
  out_json.write_text(json.dumps({"meta": meta, "runs": rows, "memory": memory, "lm_runs": lm},
                                 indent=2) + "\n")
  lines = [
      "# PEFT methods side by side: all-MiniLM-L6-v2 on movie-review sentiment",
      "",
      "Same data (the packaged movie-review sentences, canonical split: 8,513 train / "
      "1,042 validation / 1,013 test), same steps (one epoch, 266 steps of 32), batch and seed; "
      "each method with its customary learning rate. Produced by `python experiments/run_methods.py` "
      "(peak memory: `--memory`; SmolLM2: `--lm`; plot: `--plot`).",
      "",
      "| method | lr | trainable params | trainable % | val acc | test acc | test F1 | "
      "test ROC-AUC | train s (wall) | ms/step (train s / steps: compile and eval included) | CPU s | "
      "load at end | saved size | peak memory |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    lines.append(
        f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} | "
        f"{r['trainable_percent']:.3f} | {r['validation_accuracy']:.4f} | "
        f"{r['test_accuracy']:.4f} | {r['test_f1']:.4f} | {r['test_roc_auc']:.4f} | "
        f"{r['train_seconds']:.0f} | {r.get('step_ms', 1000.0 * r['train_seconds'] / r['steps']):.0f} | "
        f"{_num(r['cpu_seconds'])} | {_load(r)} | {r['saved_bytes'] / 1e6:.2f} MB | "
        f"{_mem(name, r, memory)} |")
  lines += ["", f"Machine: {meta['machine']}; load average at the end {meta['load_average_at_end']}. "
            + meta["note"], "", _NOTE, "", _MEMORY_NOTE, ""]
  if lm:
    base = lm.get("base", {})
    lines += [
        "## SmolLM2-135M-Instruct as a causal LM (the generative methods)",
        "",
        "`experiments/configs/smollm2_causal_lm.yaml`: the same movie-review sentences packed into "
        "64-token blocks, 40 steps of batch 8, 200 held-out sentences per split; LoRA r=8 on every "
        "linear layer (the config's targets), the others with their own defaults. "
        f"The base model's test perplexity: {base.get('test_perplexity', float('nan')):.1f}.",
        "",
        "| method | lr | trainable params | val perplexity | test perplexity | train s (wall) | "
        "load at end | saved size | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in lm.items():
      if name == "base":
        continue
      lines.append(
          f"| {name} | {r['lr']:g} | {r['trainable_params']:,} | {r['validation_perplexity']:.1f} | "
          f"{r['test_perplexity']:.1f} | {r['train_seconds']:.0f} | {_load(r)} | "
          f"{r['saved_bytes'] / 1e6:.2f} MB | {r['peak_rss_mb'] / 1024:.2f} GB |")
    lines += ["", _LM_NOTE, ""]
  out_json.with_suffix(".md").write_text("\n".join(lines))


def plot(rows: dict, lm: dict, memory: dict, out: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3 if lm else 2, figsize=(16 if lm else 11, 4.6))
  ax = axes[0]
  for name, r in rows.items():
    ax.scatter(r["trainable_params"], r["test_accuracy"], s=30)
    ax.annotate(name, (r["trainable_params"], r["test_accuracy"]), textcoords="offset points",
                xytext=(4, 3), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters (log)")
  ax.set_ylabel("test accuracy")
  ax.set_title("MiniLM sentiment: accuracy vs trainable parameters")
  ax.grid(alpha=0.3)
  ax = axes[1]
  names = [n for n in rows if _mem(n, rows[n], memory) != "n/a"]
  vals = [(memory.get(n, {}).get("peak_rss_mb") or rows[n]["peak_rss_mb"]) / 1024 for n in names]
  ax.barh(names, vals)
  ax.set_xlabel("peak process memory, GB")
  ax.set_title("MiniLM: peak memory (20-step runs)")
  ax.grid(alpha=0.3, axis="x")
  if lm:
    ax = axes[2]
    names = [n for n in lm if n != "base"]
    ax.barh(names, [lm[n]["test_perplexity"] for n in names])
    if "base" in lm:
      ax.axvline(lm["base"]["test_perplexity"], color="k", ls="--", label="base model")
      ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("test perplexity (log; lower is better)")
    ax.set_title("SmolLM2-135M, 40 steps")
    ax.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  print(f"wrote {out}")


def _num(x) -> str:
  return "n/a" if x is None else f"{x:.0f}"


if __name__ == "__main__":
  main()
