"""FLOPs of one compiled training step, LoRA vs full fine-tuning, from XLA's cost analysis.

SmolLM2-135M shape (hidden 576, 30 layers, 9 / 3 heads, MLP 1536, vocab 49152,
tied embeddings), batch 4 x 128, float32, AdamW; LoRA r=16 on every linear
layer (q, k, v, o, gate, up, down). Both steps are the same code
(``jlora.lora(llama_forward)``, a ``jlora.optimizer(optax.adamw)`` update);
full fine-tuning wraps every leaf in ``jlora.Full()``.

XLA's cost analysis counts a ``while`` body once, whatever its trip count, so
the scanned step's own number covers one layer. The script therefore compiles
the step with the layer scan fully unrolled (``jlora._rewrite.lift(...,
unroll=True)``) at 30 layers, and at 1, 2 and 3 layers to show the count is
linear in depth (the unit test extrapolates from 1 and 2). It also scans the
real (scanned, 30-layer) compiled LoRA step's HLO for dots that produce an
array of a targeted kernel's full shape (a materialised delta W or a weight
gradient): there must be none; the full fine-tuning step has them.

Usage: python experiments/bench_flops.py   # writes experiments/results/bench_peft_flops.{txt,json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import jax
import optax

import jlora
from jlora._hlo import abstract_llama_step
from jlora._rewrite import full_size_dots
from jlora.models.llama import LlamaConfig

LINEAR = "layers/{self_attn/{q,k,v,o}_proj,mlp/{gate,up,down}_proj}/kernel"
KERNELS = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
RULES = {"lora": {LINEAR: jlora.LoRA(16, stack_axes=1)}, "full": {"**": jlora.Full()}}


def compiled_step(layers: int, kind: str, *, unroll: bool):
  cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=layers,
                    num_heads=9, num_kv_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True)
  tx = jlora.optimizer(optax.adamw(1e-4, weight_decay=0.01))
  step, args = abstract_llama_step(cfg, RULES[kind], tx, unroll=unroll)
  t0 = time.perf_counter()
  c = step.lower(*args).compile()
  return c, time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_peft_flops"))
  ap.add_argument("--layers", type=int, default=30)
  args = ap.parse_args()
  res: dict = {"machine": _machine(), "jax": jax.__version__, "load_before": os.getloadavg(),
               "unrolled": {}, "scanned": {}}
  for layers in (1, 2, 3, args.layers):
    for kind in ("lora", "full"):
      c, secs = compiled_step(layers, kind, unroll=True)
      res["unrolled"][f"{kind}-{layers}"] = {"flops": c.cost_analysis()["flops"], "compile_s": secs}
      print(kind, layers, res["unrolled"][f"{kind}-{layers}"], flush=True)
  for kind in ("lora", "full"):
    c, secs = compiled_step(args.layers, kind, unroll=False)
    text = c.as_text()
    res["scanned"][kind] = {"flops_as_reported": c.cost_analysis()["flops"], "compile_s": secs,
                            "full_size_dots": len(full_size_dots(text, KERNELS)),
                            "examples": full_size_dots(text, KERNELS)[:3]}
    print(kind, "scanned", res["scanned"][kind]["full_size_dots"], flush=True)
  u = res["unrolled"]
  n = args.layers
  for kind in ("lora", "full"):
    f1, f2, f3 = (u[f"{kind}-{k}"]["flops"] for k in (1, 2, 3))
    res[f"{kind}_per_layer"] = f2 - f1
    res[f"{kind}_linear_check"] = (f3 - f2) / (f2 - f1)
    res[f"{kind}_extrapolated"] = f1 + (n - 1) * (f2 - f1)
  ratio = u[f"lora-{n}"]["flops"] / u[f"full-{n}"]["flops"]
  res["ratio"] = ratio
  res["ratio_extrapolated"] = res["lora_extrapolated"] / res["full_extrapolated"]
  res["load_after"] = os.getloadavg()
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(res, indent=1))
  n_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
  lines = [
      f"FLOPs of one compiled training step (XLA cost analysis), SmolLM2-135M shape, {n} layers, "
      "batch 4 x 128, float32, AdamW; LoRA r=16 on q,k,v,o,gate,up,down",
      f"machine: {res['machine']['cpu_model']} ({res['machine']['cpus']} CPUs); jax {jax.__version__}; "
      f"load {res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}",
      "",
      f"unrolled {n}-layer step: LoRA {u[f'lora-{n}']['flops'] / 1e9:.1f} GFLOP, full "
      f"{u[f'full-{n}']['flops'] / 1e9:.1f} GFLOP -> LoRA / full = {ratio:.4f} "
      f"(target <= 0.70: {'met' if ratio <= 0.70 else 'NOT met'})",
      f"per layer: LoRA {res['lora_per_layer'] / 1e9:.2f} GFLOP = "
      f"{res['lora_per_layer'] / (n_layer * 512):.2f} N/token, full {res['full_per_layer'] / 1e9:.2f} "
      f"GFLOP = {res['full_per_layer'] / (n_layer * 512):.2f} N/token (N = {n_layer:,} weights per layer)",
      f"extrapolated from 1 and 2 layers: ratio {res['ratio_extrapolated']:.4f}; linearity "
      f"(layer 3 / layer 2 increment): LoRA {res['lora_linear_check']:.4f}, full "
      f"{res['full_linear_check']:.4f}",
      f"compile time of the unrolled steps: LoRA {u[f'lora-{n}']['compile_s']:.1f} s, full "
      f"{u[f'full-{n}']['compile_s']:.1f} s",
      "",
      f"scanned (real) {n}-layer step: XLA reports LoRA "
      f"{res['scanned']['lora']['flops_as_reported'] / 1e9:.1f}, full "
      f"{res['scanned']['full']['flops_as_reported'] / 1e9:.1f} GFLOP (loop body counted once: "
      "not the step's cost)",
      f"dots producing a targeted kernel's full shape (delta W or weight gradient) in the scanned "
      f"compiled step: LoRA {res['scanned']['lora']['full_size_dots']}, full "
      f"{res['scanned']['full']['full_size_dots']}",
  ]
  text = "\n".join(lines) + "\n"
  out.with_suffix(".txt").write_text(text)
  print(text)


def _machine() -> dict:
  model = ""
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
      if line.startswith("Model name:"):
        model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  return {"cpu_model": model, "cpus": os.cpu_count(), "platform": platform.platform()}


if __name__ == "__main__":
  main()
