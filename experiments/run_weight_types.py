"""Which weights to adapt under a fixed LoRA parameter budget (in the spirit of the LoRA paper's Table 5).

  python experiments/run_weight_types.py

The budget is the default job's adapter: rank 8 on two 384x384 matrices per layer
(query and value), 2 * 8 * (384 + 384) = 12,288 LoRA parameters per layer, 73,728 over the
6 layers of all-MiniLM-L6-v2. Every entry spends (about) that budget differently:

  q r=16 | v r=16 | q,v r=8 | q,k,v,o r=4 (o = attention/output/dense) |
  all linear: q,k,v,o + intermediate/dense (384x1536) + output/dense (1536x384), rank chosen
  so the count is as close as possible to the budget (computed below; rank 2, 12.5% over;
  rank 1 would be 44% under)

Everything else is the default job (packaged movie-review sentences, 1 epoch, batch 32,
lr 2e-3, seed 0, classifier head trained in full: 770 parameters shared by all entries) and
alpha = 2 * rank (scale alpha / r = 2, as in run_rank_sweep.py). The q,v r=8 entry is the
rank sweep's r=8 run (runs/rank-qv-r8, the same resolved config) when it exists, so it is
not trained twice. Runs go to runs/wt-<entry>; finished runs are read back.

Writes experiments/results/weight_types.json, weight_types.md and weight_types.png
(the figure needs matplotlib: ``pip install matplotlib``; not a jlora dependency).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lora_runs import RUNS, cfg_key, machine, make_cfg, run_or_load, today  # noqa: E402

ROOT = Path(__file__).resolve().parent
H, I, L = 384, 1536, 6  # all-MiniLM-L6-v2: hidden, intermediate, layers
HEAD = H * 2 + 2  # the classifier kernel and bias, trained in full by every entry
#: short name -> (module targets, (d_in, d_out) of each)
MODULES = {
    "q": ("query", (H, H)), "k": ("key", (H, H)), "v": ("value", (H, H)),
    "o": ("attention/output/dense", (H, H)),
    "ffn_in": ("intermediate/dense", (H, I)), "ffn_out": ("layers/output/dense", (I, H)),
}
BUDGET = L * 2 * 8 * (H + H)  # q,v at r=8


def lora_params(mods: list[str], rank: int) -> int:
  return L * rank * sum(sum(MODULES[m][1]) for m in mods)


def closest_rank(mods: list[str], budget: int = BUDGET) -> int:
  per_rank = lora_params(mods, 1)
  lo = max(1, budget // per_rank)
  return min((lo, lo + 1), key=lambda r: (abs(lora_params(mods, r) - budget), r))


ALL = ["q", "k", "v", "o", "ffn_in", "ffn_out"]
ENTRIES = [  # (label, modules, rank)
    ("q r=16", ["q"], 16),
    ("v r=16", ["v"], 16),
    ("q,v r=8", ["q", "v"], 8),
    ("q,k,v,o r=4", ["q", "k", "v", "o"], 4),
    (f"all linear r={closest_rank(ALL)}", ALL, closest_rank(ALL)),
]


def overrides(mods: list[str], rank: int) -> list[str]:
  return [f"method.targets={','.join(MODULES[m][0] for m in mods)}", f"method.rank={rank}",
          f"method.alpha={2 * rank}", "train.lr=2e-3"]  # the default job's lr when measured (now 4e-3 at alpha = r)


def slug(label: str) -> str:
  return "wt-" + label.replace(" r=", "-r").replace(",", "").replace(" ", "-")


def main() -> None:
  import argparse  # noqa: PLC0415
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only-finished", action="store_true",
                  help="train nothing: report the entries whose runs have finished")
  args = ap.parse_args()
  rows, missing = [], []
  for label, mods, rank in ENTRIES:
    ov = overrides(mods, rank)
    name = slug(label)
    reuse = RUNS / f"rank-qv-r{rank}"
    if mods == ["q", "v"] and (reuse / "results.json").exists():
      from jlora.config import load_config  # noqa: PLC0415
      if cfg_key(load_config(reuse / "config.yaml")) == cfg_key(make_cfg(name, ov)):
        name = reuse.name  # the rank sweep's run, same config: read back, not re-trained
    row = run_or_load(name, ov, train_missing=not args.only_finished)
    if row is None:
      missing.append(label)
      continue
    row.update(entry=label, modules=[MODULES[m][0] for m in mods],
               lora_params=lora_params(mods, rank), lora_params_measured=row["trainable_params"] - HEAD,
               budget_ratio=lora_params(mods, rank) / BUDGET)
    if row["lora_params"] != row["lora_params_measured"]:
      print(f"warning: {label}: computed {row['lora_params']:,} LoRA params, the run counted "
            f"{row['lora_params_measured']:,}")
    rows.append(row)
    print(json.dumps(row), flush=True)
  write(rows, missing)


def binom_std(p: float, n: int) -> float:
  return math.sqrt(p * (1 - p) / n)


def write(rows: list[dict], missing: list[str] = ()) -> None:
  res = ROOT / "results"
  res.mkdir(parents=True, exist_ok=True)
  n_val, n_test = 1042, 1013
  alt = {r: lora_params(ALL, r) for r in (1, 2)}
  meta = {"machine": machine(), "date": today(), "budget_lora_params": BUDGET, "head_params": HEAD,
          "alpha": "2 * rank", "all_linear_rank_options": alt,
          "script": "experiments/run_weight_types.py",
          "entries_not_run": list(missing)}
  (res / "weight_types.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
  sv = binom_std(sum(r["test_accuracy"] for r in rows) / len(rows), n_test)
  L_ = [
      "# LoRA under a fixed parameter budget: which weights to adapt (all-MiniLM-L6-v2, sentiment)", "",
      f"Produced by `python experiments/run_weight_types.py` on {meta['date']}; machine: "
      f"{meta['machine']}.", "",
      "Setup: the default job (packaged movie-review sentences, canonical split 8,513 train / "
      "1,042 validation / 1,013 test; 1 epoch = 266 steps of batch 32, lr 2e-3, seed 0; "
      f"classifier head, {HEAD} parameters, trained in full by every entry), with the LoRA "
      f"targets and rank changed so the adapters cost about the default job's {BUDGET:,} LoRA "
      "parameters (rank 8 on query and value of 6 layers). **alpha = 2 x rank** everywhere. "
      "q/k/v = attention query/key/value (384x384), o = attention/output/dense (384x384), "
      "ffn = intermediate/dense (384x1536) and output/dense (1536x384). For all six linear "
      f"kernels one rank costs {lora_params(ALL, 1):,} parameters, so rank 2 "
      f"({alt[2]:,}, {100 * (alt[2] / BUDGET - 1):+.1f}%) is the closest to the budget (rank 1: "
      f"{alt[1]:,}, {100 * (alt[1] / BUDGET - 1):+.1f}%). One run (one seed) per entry. `train s` "
      "is the training steps' wall time on a machine shared with another process: a rough cost "
      "indicator only.", "",
      "| entry | rank | LoRA params (no head) | vs budget | trainable incl. head | val acc | test acc | "
      "train s | run |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    L_.append(f"| {r['entry']} | {r['rank']} | {r['lora_params_measured']:,} | "
              f"{100 * (r['lora_params_measured'] / BUDGET - 1):+.1f}% | {r['trainable_params']:,} | "
              f"{r['validation_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['train_seconds']:.0f} | "
              f"`{r['run_dir']}` |")
  if missing:
    L_ += ["", f"Not run (out of time on the shared machine): {'; '.join(missing)}."]
  accs = [r["test_accuracy"] for r in rows]
  best_v = max(rows, key=lambda r: r["validation_accuracy"])
  best_t = max(rows, key=lambda r: r["test_accuracy"])
  worst_t = min(rows, key=lambda r: r["test_accuracy"])
  spread = max(accs) - min(accs)
  sd_diff = math.sqrt(2) * sv
  verdict = ("within about two standard errors of a difference between two runs "
             f"({100 * 2 * sd_diff:.1f} points), so these entries are not distinguishable here"
             if spread <= 2 * sd_diff else
             f"larger than two standard errors of a difference ({100 * 2 * sd_diff:.1f} points) "
             f"between the best and the worst entry, though still one seed each")
  L_ += ["", f"Noise: one test accuracy has a binomial standard error of about {100 * sv:.1f} "
         f"points (1,013 sentences); a difference of two such numbers about {100 * sd_diff:.1f}.", "",
         "**Reading.** "
         f"Best validation accuracy: {best_v['entry']} ({best_v['validation_accuracy']:.4f}); best "
         f"test accuracy: {best_t['entry']} ({best_t['test_accuracy']:.4f}); worst test: "
         f"{worst_t['entry']} ({worst_t['test_accuracy']:.4f}). The test spread, "
         f"{100 * spread:.1f} points, is {verdict}. In the LoRA paper's version (GPT-3 175B on "
         "WikiSQL and MultiNLI, attention matrices only) a single query or key matrix at the "
         "higher rank did worst, and q,v or all four attention matrices at a lower rank did "
         "best; compare that ordering with the table, but treat any ordering inside the noise "
         "band as unresolved: it would need several seeds per entry. "
         + (f"Read with that caveat, the ordering points the paper's way: the query alone at "
            f"r=16 is lowest on both validation and test, and spreading the budget over "
            f"more matrices at lower rank ({best_v['entry']}) is highest on both; the gap between "
            f"them is {100 * (best_t['test_accuracy'] - worst_t['test_accuracy']):.1f} test / "
            f"{100 * (best_v['validation_accuracy'] - min(r['validation_accuracy'] for r in rows)):.1f} "
            "validation points, suggestive, not established. "
            if worst_t["entry"].startswith("q r=") and best_v is best_t
            and len(best_t["modules"]) > 1 else "")
         + ("The all-linear entry also has 12.5% more adapter parameters than the others (no "
            "integer rank hits the budget exactly). " if any(r["entry"].startswith("all") for r in rows)
            else ""), "",
         "Figure: `weight_types.png` (val/test accuracy per entry with +-1 binomial standard "
         "error bars).", ""]
  (res / "weight_types.md").write_text("\n".join(L_))
  plot(rows, res / "weight_types.png", n_val, n_test)


def plot(rows, path, n_val, n_test) -> None:
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    print("matplotlib is not installed: no figure (pip install matplotlib)")
    return
  import numpy as np  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(8, 4.2))
  x = np.arange(len(rows))
  for off, key, n, label in ((-0.18, "validation_accuracy", n_val, "validation"),
                             (0.18, "test_accuracy", n_test, "test")):
    y = [r[key] for r in rows]
    ax.bar(x + off, y, width=0.36, yerr=[binom_std(v, n) for v in y], capsize=3, label=label)
  ax.set_xticks(x, [f"{r['entry']}\n{r['lora_params_measured']:,} params" for r in rows], fontsize=8)
  lo = min(min(r["validation_accuracy"], r["test_accuracy"]) for r in rows)
  ax.set_ylim(lo - 0.04, None)
  ax.set_ylabel("accuracy")
  ax.set_title(f"LoRA at a fixed budget (~{BUDGET:,} params, alpha = 2r), MiniLM sentiment")
  ax.legend(loc="lower right")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
