"""Donating the training state to ``jlora.train_step.make_train_step``'s step: speed with and without.

Donation lets XLA write the new params and optimizer state into the old ones' buffers,
which saves a copy of the state's memory on accelerators. This script measures what it
costs on the machine at hand: ``make_train_step(..., donate=True)`` against
``donate=False``, interleaved in one process, for full
fine-tuning and for LoRA, on the SmolLM2-135M shape (fewer layers by default, to compile
quickly), batch 4 x 128, float32, AdamW, one device.

Beside them runs ``bench_peft.py``'s own jax step for the same mode (a plain ``jax.jit``
of loss, gradient and AdamW update, not donated): it tells what ``make_train_step`` itself
costs (its metrics, the gradient norm, the step counter) against a bare step.

The six steps are compiled first, then run in turn for several rounds, so machine drift
hits all alike; each speed ratio is the median over rounds of the ratio of the two step
times within the round.

Usage::

  python experiments/bench_donate.py                # 8 layers: experiments/results/bench_donate.{txt,json}
  python experiments/bench_donate.py --layers 30 --rounds 6 --out experiments/results/bench_donate_30
  python experiments/bench_donate.py --layers 2 --rounds 2 --out /tmp/donate   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_peft as bp  # noqa: E402  (shape, tokens, CPU limits, machine, versions, _save)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rounds", type=int, default=8)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_donate"))
  args = ap.parse_args()
  bp._limit_cpus(args.threads)
  import jax
  import numpy as np

  import jlora
  from jlora.models.llama import init_llama, llama_forward, unstack_layers
  from jlora.train_step import make_train_step

  cfg = bp._jax_config(args.layers)
  params = unstack_layers(init_llama(cfg, jax.random.key(0)))

  def loss_fn(p, batch):
    return bp.next_token_loss(llama_forward(p, batch["ids"], cfg), batch["ids"])

  trees = {"full": params,
           "lora": jlora.wrap(params, {"layers/*/self_attn/{q,v}_proj/kernel": jlora.LoRA(bp.RANK)},
                              key=jax.random.key(1))}
  batch = {"ids": bp._tokens()}
  runs, losses = {}, {}
  for mode, tree in trees.items():
    for donate in (True, False):
      name = f"{mode} {'donated' if donate else 'not donated'}"
      step = make_train_step(loss_fn, bp._adamw(), donate=donate)
      state, frozen = step.init(tree)
      t0 = time.perf_counter()
      state, metrics = step(state, frozen, batch)  # compiles
      jax.block_until_ready(state)
      print(f"{name}: first step (with compile) {time.perf_counter() - t0:.1f} s", flush=True)
      runs[name] = _runner(step, frozen, state, batch)
      losses[name] = [float(metrics["loss"])]
    name = f"{mode} bench_peft step"
    bare = bp._jax_setup(mode, args.layers, "unstacked", "none")
    runs[name] = lambda bare=bare: bare(batch["ids"])
    losses[name] = [runs[name]()]

  times = {name: [] for name in runs}
  for r in range(args.rounds + 1):  # round 0 warms up
    for name, run in runs.items():
      t0 = time.perf_counter()
      loss = run()
      dt = time.perf_counter() - t0
      losses[name].append(loss)
      if r:
        times[name].append(dt)
    print(f"round {r}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items() if t), flush=True)

  results = {"machine": bp._machine(), "versions": bp._versions(), "threads": args.threads,
             "layers": args.layers, "rounds": args.rounds, "device": str(jax.devices()[0]),
             "times_s": times, "losses": losses, "ratios": {}}
  for mode in trees:
    d, n = np.array(times[f"{mode} donated"]), np.array(times[f"{mode} not donated"])
    b = np.array(times[f"{mode} bench_peft step"])
    results["ratios"][mode] = float(np.median(n / d))  # speed donated / speed not donated
    results["ratios"][f"{mode} make_train_step vs bare"] = float(np.median(b / n))
  _write(results, args.out)


def _runner(step, frozen, state, batch):
  """``run() -> loss``: one step of ``step`` on its own state, waited for."""
  import jax
  box = {"state": state}

  def run():
    box["state"], metrics = step(box["state"], frozen, batch)
    jax.block_until_ready(box["state"])
    return float(metrics["loss"])
  return run


def _write(results: dict, out: str) -> None:
  import numpy as np
  m = results["machine"]
  lines = [
      "make_train_step(donate=True) vs donate=False: SmolLM2-135M shape with "
      f"{results['layers']} layers, batch {bp.BATCH} x {bp.SEQ}, float32, AdamW, one device "
      f"({results['device']}); LoRA r={bp.RANK} on q/v",
      f"machine: {m['cpu_model']}, {m['cpus_used']} of {m['cpus_online']} CPUs, threads "
      f"{results['threads']}",
      "versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
      f"{results['rounds']} rounds after 1 warm-up, the six steps in turn in each round",
      "",
  ]
  for name, ts in results["times_s"].items():
    ref = results["losses"][name.split()[0] + " not donated"]
    mine = results["losses"][name]
    agree = np.max(np.abs(np.array(mine) - np.array(ref)))
    lines.append(f"  {name:22s} median {np.median(ts):.3f} s/step   " + ", ".join(f"{t:.2f}" for t in ts)
                 + f"   losses vs not donated: max difference {agree:.2g}")
  for key, ratio in results["ratios"].items():
    if key.endswith("vs bare"):
      lines.append(f"  {key.split()[0]}: speed make_train_step (not donated) / bench_peft step = "
                   f"{ratio:.3f}x (median over rounds)")
    else:
      lines.append(f"  {key}: speed donated / not donated = {ratio:.3f}x (median over rounds)")
  bp._save(out, results, lines)


if __name__ == "__main__":
  main()
