"""QLoRA vs LoRA on the real SmolLM2-135M-Instruct: held-out perplexity of the same job.

  python experiments/run_qlora.py [--sides lora,qlora-nf4,qlora-gguf] [KEY=VALUE ...]

Every side runs experiments/configs/smollm2_causal_lm.yaml: LoRA r=8 on every projection,
the movie-review sentences as a causal LM, 40 steps, the same data, split, seed and learning
rate. The sides differ only in how the frozen base is stored:

* ``lora``: float32 (the packaged Q4_1 GGUF dequantised on load);
* ``qlora-nf4``: requantised to NF4 with double quantisation (``model.quantize=nf4``);
* ``qlora-gguf``: the file's own Q4_1 / Q8_0 blocks (``model.quantize=gguf``, no
  requantisation, so its base is the float side's base exactly).

Writes experiments/results/qlora.json and qlora.md: the base's and the trained model's test
perplexity, the ratio to the float LoRA run, and wall time. Runs go to runs/qlora-<side>.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from jlora.config import load_config
from jlora.train import evaluate_run, load_run, train

ROOT = Path(__file__).resolve().parent
SIDES = {"lora": [], "qlora-nf4": ["model.quantize=nf4"], "qlora-gguf": ["model.quantize=gguf"]}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sides", default=",".join(SIDES))
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args()
  rows = {}
  for side in args.sides.split(","):
    cfg = load_config(ROOT / "configs" / "smollm2_causal_lm.yaml",
                      overrides=[f"output_dir=runs/qlora-{side}", "resume=false", "train.progress=false",
                                 *SIDES[side], *args.overrides])
    t0 = time.perf_counter()
    base = evaluate_run(load_run(cfg=cfg, base=True), "test")
    res = train(cfg, log=lambda *a, **k: None)
    rows[side] = {"base_test_perplexity": base["perplexity"],
                  "test_perplexity": res.metrics["test"]["perplexity"],
                  "validation_perplexity": res.metrics.get("validation", {}).get("perplexity"),
                  "tokens": res.metrics["test"]["tokens"], "wall_s": time.perf_counter() - t0,
                  "overrides": SIDES[side] + args.overrides}
    print(side, json.dumps(rows[side]))
  machine = f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs"
  (ROOT / "results").mkdir(exist_ok=True)
  (ROOT / "results" / "qlora.json").write_text(json.dumps({"machine": machine, "sides": rows}, indent=1))
  ref = rows.get("lora", {}).get("test_perplexity")
  lines = ["# QLoRA vs LoRA on SmolLM2-135M-Instruct (movie-review sentences as a causal LM)", "",
           "`python experiments/run_qlora.py`: the job of `experiments/configs/smollm2_causal_lm.yaml` "
           "(LoRA r=8, alpha 16 on all seven projections, 40 steps of 8 x 64 tokens, lr 1e-3); only "
           f"the frozen base's storage differs. Machine: {machine}, no GPU.", "",
           "| side | base | base test ppl | trained test ppl | / LoRA float | wall s |",
           "|---|---|---|---|---|---|"]
  what = {"lora": "float32", "qlora-nf4": "NF4 + double quant", "qlora-gguf": "the GGUF's Q4_1 / Q8_0"}
  for side, r in rows.items():
    ratio = f"{r['test_perplexity'] / ref:.4f}" if ref else "n/a"
    lines.append(f"| {side} | {what[side]} | {r['base_test_perplexity']:.3f} | {r['test_perplexity']:.3f} "
                 f"| {ratio} | {r['wall_s']:.0f} |")
  (ROOT / "results" / "qlora.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
