"""Forgetting: SmolLM2-135M-Instruct as a causal LM on movie-review sentences, LoRA vs full fine-tuning.

  python experiments/run_forgetting.py [KEY=VALUE ...]

Measures held-out perplexity in-domain (movie-review sentences, test split) and
out-of-domain (New York Times editorial sentences, test split) for the base
model, then for LoRA and for full fine-tuning trained on the same movie
sentences with the same steps and batch (experiments/configs/smollm2_causal_lm.yaml).
Writes experiments/results/forgetting.{json,md,png}. Partial results are
written after every stage; a finished stage is not repeated (delete
experiments/results/forgetting.json to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from jlora.config import load_config
from jlora.train import evaluate_run, load_run, train

ROOT = Path(__file__).resolve().parent
CONFIG = ROOT / "configs" / "smollm2_causal_lm.yaml"
OUT = ROOT / "results" / "forgetting.json"
METHODS = {
    "lora": ["method.name=lora", "train.lr=1e-3"],
    "full": ["method.name=full", "train.lr=1e-4"],
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides for every run")
  args = ap.parse_args()
  res = json.loads(OUT.read_text()) if OUT.exists() else {}
  base_cfg = load_config(CONFIG, ["train.progress=false", *args.overrides])
  res.setdefault("setup", {
      "model": base_cfg.model.name, "block_tokens": base_cfg.data.max_length,
      "eval_sentences_per_domain": base_cfg.data.max_eval_examples,
      "steps": base_cfg.train.max_steps, "batch_size": base_cfg.train.batch_size,
      "in_domain": "movies (test split)", "out_of_domain": "nyt (test split)"})
  if "base" not in res:
    run = load_run(cfg=base_cfg, base=True)
    t0 = time.perf_counter()
    res["base"] = {"movies": evaluate_run(run, "test"),
                   "nyt": evaluate_run(run, "test", data_overrides={"domain": "nyt"})}
    res["base"]["eval_seconds"] = time.perf_counter() - t0
    save(res)
  for name, extra in METHODS.items():
    if name in res:
      continue
    cfg = load_config(CONFIG, [f"output_dir=runs/forgetting-{name}", "resume=false",
                               "train.progress=false", *extra, *args.overrides])
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    out = train(cfg)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    run = load_run(out.output_dir)
    nyt = evaluate_run(run, "test", data_overrides={"domain": "nyt"})
    res[name] = {
        "movies": out.metrics["test"], "movies_validation": out.metrics["validation"],
        "nyt": nyt, "lr": cfg.train.lr, "trainable_params": out.trainable_params,
        "total_params": out.total_params, "train_seconds": out.train_seconds,
        "cpu_seconds": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
        "saved_bytes": out.adapter_bytes, "steps": out.step,
    }
    save(res)
  save(res)


def save(res: dict) -> None:
  OUT.parent.mkdir(parents=True, exist_ok=True)
  res["load_average"] = os.getloadavg()
  OUT.write_text(json.dumps(res, indent=2) + "\n")
  lines = [
      "# Forgetting: SmolLM2-135M-Instruct, LoRA vs full fine-tuning on movie-review sentences",
      "",
      f"Setup: {json.dumps(res.get('setup', {}))}. Produced by "
      "`python experiments/run_forgetting.py`.",
      "",
      "| model | trainable params | movies ppl (in-domain) | change | NYT ppl (out-of-domain) | "
      "change | train s | CPU s |",
      "|---|---|---|---|---|---|---|---|",
  ]
  base = res.get("base")
  for name in ("base", "lora", "full"):
    if name not in res:
      continue
    r = res[name]
    mv, ny = r["movies"]["perplexity"], r["nyt"]["perplexity"]
    dm = dn = ""
    if base and name != "base":
      dm = f"{100 * (mv / base['movies']['perplexity'] - 1):+.1f}%"
      dn = f"{100 * (ny / base['nyt']['perplexity'] - 1):+.1f}%"
    lines.append(
        f"| {name} | {r.get('trainable_params', 0):,} | {mv:.2f} | {dm} | {ny:.2f} | {dn} | "
        f"{r.get('train_seconds', 0):.0f} | {r.get('cpu_seconds', 0):.0f} |")
  lines += [
      "",
      "Perplexity is exp(mean token NLL) under SmolLM2's tokenizer over packed 64-token blocks "
      f"of a seeded random subset of {res.get('setup', {}).get('eval_sentences_per_domain')} "
      "sentences of each domain's test split (the last partial block kept, so every token is "
      "scored). The same blocks are scored for every model. The packaged base is the Q4_1 "
      "GGUF dequantised to float32. Times are on a shared 2-core machine (the CPU column is "
      "the CPU time the run itself used).",
      "",
  ]
  OUT.with_suffix(".md").write_text("\n".join(lines))
  plot(res)


def plot(res: dict) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed; skipping the plot (pip install matplotlib)")
    return
  names = [n for n in ("base", "lora", "full") if n in res]
  fig, ax = plt.subplots(figsize=(6, 3.6))
  width = 0.38
  for i, dom in enumerate(("movies", "nyt")):
    vals = [res[n][dom]["perplexity"] for n in names]
    xs = [j + (i - 0.5) * width for j in range(len(names))]
    bars = ax.bar(xs, vals, width, label={"movies": "movies (in-domain)",
                                          "nyt": "NYT editorials (out-of-domain)"}[dom])
    for b, v in zip(bars, vals):
      ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                  fontsize=8)
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels({"base": "base", "lora": "LoRA", "full": "full FT"}[n] for n in names)
  ax.set_ylabel("held-out perplexity")
  ax.set_title("SmolLM2-135M-Instruct fine-tuned on movie sentences")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(OUT.with_suffix(".png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
