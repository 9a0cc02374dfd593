"""DoRA and IA3 against LoRA in jlora, and jlora's DoRA against PEFT's DoRA: one training step each.

The shape, batch, loss and optimizer are ``bench_peft.py``'s (SmolLM2-135M shape, 4 x 128 tokens,
float32, AdamW). Per method:

* LoRA: r=8, alpha 8 on q_proj, v_proj (jlora.LoRA / PEFT LoraConfig);
* DoRA: the same with the magnitude (jlora.DoRA / PEFT LoraConfig(use_dora=True));
* IA3: PEFT's Llama defaults, k_proj, v_proj, down_proj with down_proj feed-forward
  (jlora.IA3 / PEFT IA3Config).

Printed side by side from one process: the median step time of every side, interleaved step by
step (so background load hits all alike), XLA's FLOP count of each jlora step (the layers run
unstacked, so no loop body is counted once for many layers), and the ratios DoRA/LoRA, IA3/LoRA
and jlora-DoRA/PEFT-DoRA.

Usage::

  python experiments/bench_methods.py                       # writes experiments/results/bench_methods.{txt,json}
  python experiments/bench_methods.py --layers 2 --steps 2 --out /tmp/bm   # a smoke run
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

METHODS = ("lora", "dora", "ia3")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=6, help="timed steps per side")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (after compiling)")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--layers", type=int, default=bp.SHAPE["layers"])
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--no-torch", action="store_true", help="jlora sides only")
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_methods"))
  args = ap.parse_args()
  bp._limit_cpus(args.threads)
  methods = args.methods.split(",")
  tokens = bp._tokens()
  sides, flops = {}, {}
  for m in methods:
    report: dict = {}
    sides[f"jlora-{m}"] = _jax_setup(m, args.layers, report)
    flops[m] = report["flops"]
    if not args.no_torch:
      sides[f"peft-{m}"] = _torch_setup(m, args.layers)
  times = {k: [] for k in sides}
  losses = {k: [] for k in sides}
  for i in range(args.warmup + args.steps):
    line = []
    for name, step in sides.items():
      t0 = time.perf_counter()
      loss = step(tokens)
      dt = time.perf_counter() - t0
      if i >= args.warmup:
        times[name].append(dt)
      losses[name].append(loss)
      line.append(f"{name} {dt:.2f}s ({loss:.4f})")
    print(f"step {i}: " + " | ".join(line), flush=True)
  med = {k: bp._median(v) for k, v in times.items()}
  results = {"machine": bp._machine(), "versions": bp._versions(), "layers": args.layers,
             "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
             "median_s": med, "step_s": times, "loss": losses, "xla_flops": flops}
  lines = [
      f"jlora methods, one AdamW training step, SmolLM2-135M shape ({args.layers} layers), "
      f"batch {bp.BATCH} x {bp.SEQ}, float32",
      f"machine: {results['machine']['cpu_model']}, {results['machine']['cpus_used']} of "
      f"{results['machine']['cpus_online']} CPUs; GPU: {results['machine'].get('gpu')}",
      "versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
      f"median of {args.steps} interleaved steps after {args.warmup} warm-up:",
  ]
  for name in sides:
    m = name.split("-", 1)[1]
    extra = f", XLA {flops[m] / 1e9:.1f} GFLOP" if name.startswith("jlora") else ""
    lines.append(f"  {name:12s} {med[name]:.3f} s/step = {bp.BATCH * bp.SEQ / med[name]:.0f} tok/s"
                 f"{extra}; first loss {losses[name][0]:.4f}")
  if "lora" in flops:
    for m in methods:
      if m != "lora":
        lines.append(f"  jlora {m}/lora: time {med[f'jlora-{m}'] / med['jlora-lora']:.2f}x, "
                     f"XLA FLOPs {flops[m] / flops['lora']:.3f}x")
  for m in methods:
    if f"peft-{m}" in med:
      lines.append(f"  {m}: jlora/PEFT speed {med[f'peft-{m}'] / med[f'jlora-{m}']:.2f}x "
                   "(> 1: jlora faster)")
  bp._save(args.out, results, lines)


def _rules(method: str):
  import jlora
  qv = "layers/*/self_attn/{q,v}_proj/kernel"
  if method == "lora":
    return {qv: jlora.LoRA(bp.RANK, alpha=bp.RANK)}
  if method == "dora":
    return {qv: jlora.DoRA(bp.RANK, alpha=bp.RANK)}
  if method == "ia3":
    return {"layers/*/self_attn/{k,v}_proj/kernel": jlora.IA3(),
            "layers/*/mlp/down_proj/kernel": jlora.IA3(feedforward=True)}
  raise ValueError(method)


def _jax_setup(method: str, layers: int, report: dict):
  import jax
  import jax.numpy as jnp
  import optax

  import jlora
  from jlora.models.llama import init_llama, llama_forward, unstack_layers

  cfg = bp._jax_config(layers)
  params = unstack_layers(init_llama(cfg, jax.random.key(0)))
  tree = jlora.wrap(params, _rules(method), key=jax.random.key(1))
  del params
  trainable, frozen = jlora.split(tree)
  tx = jlora.optimizer(bp._adamw())
  opt_state = tx.init(trainable)
  forward = jlora.lora(llama_forward)

  def train_step(trainable, opt_state, frozen, tokens):
    def loss_fn(t):
      return bp.next_token_loss(forward(jlora.combine(t, frozen), tokens, cfg), tokens)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  compiled = jax.jit(train_step).lower(trainable, opt_state, frozen, jnp.asarray(bp._tokens())).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  report["flops"] = float(cost["flops"])
  state = {"t": trainable, "o": opt_state}

  def step(tokens):
    state["t"], state["o"], loss = compiled(state["t"], state["o"], frozen, jnp.asarray(tokens))
    return float(loss)
  gc.collect()
  return step


def _torch_setup(method: str, layers: int):
  import torch
  from peft import IA3Config, LoraConfig, get_peft_model
  from transformers import LlamaConfig, LlamaForCausalLM

  s = bp.SHAPE
  cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                    num_hidden_layers=layers, num_attention_heads=s["heads"],
                    num_key_value_heads=s["kv_heads"], rms_norm_eps=s["eps"], rope_theta=s["theta"],
                    tie_word_embeddings=True, max_position_embeddings=2048)
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  model = LlamaForCausalLM(cfg)
  if method == "ia3":
    pc = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
  else:
    pc = LoraConfig(r=bp.RANK, lora_alpha=bp.RANK, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                    use_dora=method == "dora")
  model = get_peft_model(model, pc)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=bp.LR, betas=bp.BETAS, eps=bp.EPS, weight_decay=bp.WD, foreach=True)

  def step(tokens):
    ids = torch.from_numpy(tokens).long()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())
  return step


if __name__ == "__main__":
  main()
