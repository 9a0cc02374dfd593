"""QLoRA against LoRA and full fine-tuning in jlora: base bytes, XLA memory and time of one step.

One process, the SmolLM2-135M shape (``bench_peft.py``'s: 30 layers scanned, batch 4 x 128 tokens,
AdamW, next-token loss), random weights. Sides:

* ``full``: every weight trained, float32;
* ``lora-f32`` / ``lora-bf16``: LoRA r=8 on q_proj, v_proj, frozen float32 / bfloat16 base;
* ``qlora-nf4``: the same LoRA on an NF4 base (double quantisation, blocks of 64, every kernel
  and the tied embedding), dequantised to float32 where it is used;
* ``qlora-q4_1``: the same on llama.cpp's Q4_1 (what ``load(..., keep_quantized=True)`` gives
  for the packaged SmolLM2 file, whose embedding is Q8_0; here everything is Q4_1).

Printed side by side: the frozen base's bytes, XLA's ``compiled.memory_analysis()`` of the
compiled step (arguments, temporaries, their sum: the step's peak as XLA plans it), and the
median step time, steps interleaved across sides so background load hits all alike.

Usage::

  python experiments/bench_qlora.py                      # writes experiments/results/bench_qlora.{txt,json}
  python experiments/bench_qlora.py --remat --out experiments/results/bench_qlora_remat
  python experiments/bench_qlora.py --layers 2 --steps 1 --out /tmp/bq   # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_peft as bp  # noqa: E402

SIDES = ("full", "lora-f32", "lora-bf16", "qlora-nf4", "qlora-q4_1")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=3, help="timed steps per side")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--layers", type=int, default=bp.SHAPE["layers"])
  ap.add_argument("--sides", default=",".join(SIDES))
  ap.add_argument("--remat", action="store_true",
                  help="recompute each layer in the backward pass (QLoRA's gradient checkpointing)")
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_qlora"))
  args = ap.parse_args()
  bp._limit_cpus(args.threads)
  load_before = os.getloadavg()
  sides, reports = {}, {}
  for name in args.sides.split(","):
    reports[name] = {}
    sides[name] = _setup(name, args.layers, reports[name], remat=args.remat)
    gc.collect()
  tokens = bp._tokens()
  times = {k: [] for k in sides}
  for name, step in sides.items():  # one untimed step each
    reports[name]["first_loss"] = step(tokens)
  for _ in range(args.steps):
    for name, step in sides.items():
      t0 = time.perf_counter()
      step(tokens)
      times[name].append(time.perf_counter() - t0)
  results = {"shape": {**bp.SHAPE, "layers": args.layers}, "batch": [bp.BATCH, bp.SEQ], "remat": args.remat,
             "machine": bp._machine(), "versions": bp._versions(), "threads": args.threads,
             "load_before": load_before, "load_after": os.getloadavg(), "steps": args.steps,
             "sides": {k: {**reports[k], "step_s": bp._median(v), "times_s": v} for k, v in times.items()}}
  bp._save(args.out, results, _lines(results))


def _rules_q(kind: str):
  import jlora
  if kind == "nf4":
    return {"layers/**/kernel": jlora.NF4(stack_axes=1), "embed_tokens/embedding": jlora.NF4()}
  return {"layers/**/kernel": jlora.Q4_1(stack_axes=1), "embed_tokens/embedding": jlora.Q4_1()}


def _setup(name: str, layers: int, report: dict, *, remat: bool = False):
  import jax
  import jax.numpy as jnp
  import optax

  import jlora
  from jlora.models.llama import init_llama, llama_forward

  cfg = bp._jax_config(layers)
  params = init_llama(cfg, jax.random.key(0))
  lora_rules = {f"layers/self_attn/{n}/kernel": jlora.LoRA(bp.RANK, alpha=bp.RANK, stack_axes=1)
                for n in ("q_proj", "v_proj")}
  if name == "lora-bf16":
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  if name.startswith("qlora"):
    params = jlora.quantize(params, _rules_q(name.split("-")[1]))
  report["base_bytes"] = sum(
      x.nbytes() if jlora.is_quantized(x) else x.nbytes
      for x in jax.tree.leaves(params, is_leaf=jlora.is_quantized))
  if name == "full":
    trainable, frozen = params, None
    tx = bp._adamw()
    forward = llama_forward
  else:
    tree = jlora.wrap(params, lora_rules, key=jax.random.key(1))
    trainable, frozen = jlora.split(tree)
    tx = jlora.optimizer(bp._adamw())
    forward = jlora.lora(llama_forward)
  del params
  opt_state = tx.init(trainable)

  def train_step(trainable, opt_state, frozen, tokens):
    def loss_fn(t):
      p = t if frozen is None else jlora.combine(t, frozen)
      logits = forward(p, tokens, cfg, remat=remat)
      return bp.next_token_loss(logits.astype(jnp.float32), tokens)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  t0 = time.perf_counter()
  compiled = jax.jit(train_step).lower(trainable, opt_state, frozen, jnp.asarray(bp._tokens())).compile()
  report["compile_s"] = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  report["argument_bytes"] = int(mem.argument_size_in_bytes)
  report["temp_bytes"] = int(mem.temp_size_in_bytes)
  report["output_bytes"] = int(mem.output_size_in_bytes)
  report["alias_bytes"] = int(mem.alias_size_in_bytes)
  report["arg_plus_temp_bytes"] = report["argument_bytes"] + report["temp_bytes"]
  report["trainable_params"] = sum(x.size for x in jax.tree.leaves(trainable))
  state = {"t": trainable, "o": opt_state}

  def step(tokens):
    state["t"], state["o"], loss = compiled(state["t"], state["o"], frozen, jnp.asarray(tokens))
    return float(loss)
  return step


def _lines(r: dict) -> list[str]:
  mb = lambda b: f"{b / 2**20:9.1f}"  # noqa: E731
  m = r["machine"]
  out = [
      "QLoRA vs LoRA vs full fine-tuning in jlora: one training step, SmolLM2-135M shape "
      f"({r['shape']['layers']} layers, scanned{', remat' if r.get('remat') else ''}), batch "
      f"{r['batch'][0]} x {r['batch'][1]}, AdamW",
      f"machine: {m['cpu_model']}, {m['cpus_used']} of {m['cpus_online']} CPUs, threads {r['threads']}"
      + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; jax {r['versions']['jax']}; "
      f"load average before {r['load_before'][0]:.2f}, after {r['load_after'][0]:.2f}",
      "",
      f"{'side':12s} {'base MB':>9s} {'args MB':>9s} {'temp MB':>9s} {'args+temp':>9s} "
      f"{'step s':>7s} {'trainable':>11s} {'first loss':>10s}",
  ]
  s = r["sides"]
  for k, v in s.items():
    out.append(f"{k:12s} {mb(v['base_bytes'])} {mb(v['argument_bytes'])} {mb(v['temp_bytes'])} "
               f"{mb(v['arg_plus_temp_bytes'])} {v['step_s']:7.2f} {v['trainable_params']:11,d} "
               f"{v['first_loss']:10.4f}")
  ref = s.get("lora-f32") or s.get("full")
  base_ref = (s.get("full") or s.get("lora-f32"))["base_bytes"]
  out.append("")
  for k in ("qlora-nf4", "qlora-q4_1", "lora-bf16"):
    if k in s and ref is not None:
      out.append(f"{k} / lora-f32: base bytes {s[k]['base_bytes'] / base_ref:.3f}x, args+temp "
                 f"{s[k]['arg_plus_temp_bytes'] / ref['arg_plus_temp_bytes']:.3f}x, step time "
                 f"{s[k]['step_s'] / ref['step_s']:.2f}x")
  if "full" in s and ref is not None and "lora-f32" in s:
    out.append(f"lora-f32 / full: args+temp {s['lora-f32']['arg_plus_temp_bytes'] / s['full']['arg_plus_temp_bytes']:.3f}x, "
               f"step time {s['lora-f32']['step_s'] / s['full']['step_s']:.2f}x")
  return out


if __name__ == "__main__":
  main()
