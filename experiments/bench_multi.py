"""Many adapters on one base: a mixed batch over N adapters against one merged model.

One process, the SmolLM2-135M shape (``bench_peft.py``'s: 30 layers scanned, tied embedding),
random float32 weights, LoRA r=8 on q_proj and v_proj (random non-zero factors). Sides:

* ``merged``: one adapter merged into the base (plain params): what serving one fine-tune costs;
* ``stacked-N`` for N = 1, 4, 16: ``jlora.stack_adapters`` of N adapters on the one base, the
  batch's rows spread over them (row i uses adapter i mod N), run through
  ``jlora.lora(llama_forward)(tree, ..., adapter_ids=ids)``: each row's factors are gathered
  inside every adapted contraction.

Two workloads, timed side by side with the sides interleaved (so background load hits all
alike): ``prefill`` (one forward over a batch of 16 x 128 tokens) and ``decode``
(``jlora.generate.generate``: 16 prompts of 16 tokens, 32 new tokens greedily, KV cache).
Printed: tokens/s and the ratio to ``merged``; the bytes of the N stacked adapters' tree
against N copies of the (merged) base, and against base + N x one adapter's bytes; XLA's
temporary bytes of the compiled prefill (a full-size weight per row would show up here).

Usage::

  python experiments/bench_multi.py                          # writes experiments/results/bench_multi.{txt,json}
  python experiments/bench_multi.py --layers 2 --reps 1 --out /tmp/bm   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_peft as bp  # noqa: E402

COUNTS = (1, 4, 16)
BATCH, SEQ = 16, 128
PROMPT, NEW = 16, 32


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reps", type=int, default=3, help="timed repetitions per side and workload")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--layers", type=int, default=bp.SHAPE["layers"])
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_multi"))
  args = ap.parse_args()
  bp._limit_cpus(args.threads)

  import jax
  import jax.numpy as jnp
  import numpy as np

  import jlora
  from jlora.generate import generate
  from jlora.models.llama import init_llama, llama_forward

  load_before = os.getloadavg()
  config = bp._jax_config(args.layers)
  params = init_llama(config, jax.random.key(0))
  rules = {"layers/self_attn/{q,v}_proj/kernel": jlora.LoRA(bp.RANK, alpha=16, stack_axes=1)}

  def adapter(i):
    t = jlora.wrap(params, rules, key=jax.random.key(100 + i))
    return jax.tree.map(lambda x: x.replace(b=0.02 * jax.random.normal(jax.random.key(200 + i), x.b.shape))
                        if isinstance(x, jlora.LoraWeight) else x, t, is_leaf=jlora.is_adapted)
  adapters = [adapter(i) for i in range(max(COUNTS))]
  merged = jlora.merge(adapters[0])
  trees = {n: jlora.stack_adapters(adapters[:n]) for n in COUNTS}

  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (BATCH, SEQ)), jnp.int32)
  prompts = rng.integers(0, config.vocab_size, (BATCH, PROMPT)).astype(np.int32)
  fwd_plain = jax.jit(lambda p, x: llama_forward(p, x, config))
  fwd_multi = jax.jit(lambda t, x, i: jlora.lora(llama_forward)(t, x, config, adapter_ids=i))

  sides = {"merged": (merged, None)}
  for n in COUNTS:
    sides[f"stacked-{n}"] = (trees[n], jnp.arange(BATCH, dtype=jnp.int32) % n)

  def prefill(name):
    tree, ids = sides[name]
    out = fwd_plain(tree, tokens) if ids is None else fwd_multi(tree, tokens, ids)
    return out.block_until_ready()

  def decode(name):
    tree, ids = sides[name]
    return generate(tree, config, prompts, max_new_tokens=NEW, eos_token_ids=(),
                    adapter_ids=None if ids is None else np.asarray(ids))

  report = {k: {} for k in sides}
  # correctness first: every stacked side's row 0 uses adapter 0, as the merged model does
  ref = np.asarray(prefill("merged"))
  for name in sides:
    got = np.asarray(prefill(name))
    report[name]["row0_max_abs_diff_vs_merged"] = float(np.max(np.abs(got[0] - ref[0])))
    decode(name)  # compile
  for name, (tree, ids) in sides.items():
    args_ = (tree, tokens) if ids is None else (tree, tokens, ids)
    fn = fwd_plain if ids is None else fwd_multi
    mem = fn.lower(*args_).compile().memory_analysis()
    report[name]["prefill_temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", -1))
    report[name]["tree_bytes"] = _bytes(tree)
  times = {k: {"prefill": [], "decode": []} for k in sides}
  for _ in range(args.reps):
    for name in sides:
      t0 = time.perf_counter()
      prefill(name)
      times[name]["prefill"].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      decode(name)
      times[name]["decode"].append(time.perf_counter() - t0)
  base_bytes = _bytes(params)
  one_adapter = _bytes(jlora.split(adapters[0])[0])
  for name in sides:
    for w, n_tok in (("prefill", BATCH * SEQ), ("decode", BATCH * NEW)):
      s = bp._median(times[name][w])
      report[name][f"{w}_s"] = s
      report[name][f"{w}_times_s"] = times[name][w]
      report[name][f"{w}_tokens_per_s"] = n_tok / s
  for name in sides:
    for w in ("prefill", "decode"):
      report[name][f"{w}_vs_merged"] = (report[name][f"{w}_tokens_per_s"]
                                        / report["merged"][f"{w}_tokens_per_s"])
  for n in COUNTS:
    r = report[f"stacked-{n}"]
    r["vs_n_copies_of_base"] = r["tree_bytes"] / (n * base_bytes)
    r["vs_base_plus_n_adapters"] = r["tree_bytes"] / (base_bytes + n * one_adapter)
  results = {"shape": {**bp.SHAPE, "layers": args.layers}, "batch": [BATCH, SEQ],
             "decode": {"prompt": PROMPT, "new_tokens": NEW, "rows": BATCH}, "rank": bp.RANK,
             "targets": "q_proj, v_proj", "machine": bp._machine(), "versions": bp._versions(),
             "threads": args.threads, "load_before": load_before, "load_after": os.getloadavg(),
             "reps": args.reps, "base_bytes": base_bytes, "adapter_bytes": one_adapter,
             "sides": report}
  bp._save(args.out, results, _lines(results))


def _bytes(tree) -> int:
  import jax
  return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def _lines(r: dict) -> list[str]:
  m = r["machine"]
  s = r["sides"]
  lines = [
      "bench_multi: a batch spread over N adapters on one base vs one merged model",
      f"machine: {m['cpu_model']}, {m['cpus_used']} of {m['cpus_online']} CPUs; {m.get('gpu', 'no GPU')}; "
      f"load {r['load_before'][0]:.2f} before, {r['load_after'][0]:.2f} after",
      f"versions: jax {r['versions']['jax']}",
      f"shape: SmolLM2-135M ({r['shape']['layers']} layers, hidden {r['shape']['hidden']}), float32, "
      f"LoRA r={r['rank']} on {r['targets']}",
      f"prefill: {r['batch'][0]} x {r['batch'][1]} tokens; decode: {r['decode']['rows']} prompts of "
      f"{r['decode']['prompt']} tokens, {r['decode']['new_tokens']} new; median of {r['reps']} "
      "interleaved repetitions",
      "",
      f"{'side':12s} {'prefill tok/s':>14s} {'vs merged':>10s} {'decode tok/s':>13s} {'vs merged':>10s} "
      f"{'tree MB':>9s} {'XLA temp MB':>12s} {'row0 diff':>10s}",
  ]
  for name, v in s.items():
    lines.append(f"{name:12s} {v['prefill_tokens_per_s']:14.1f} {v['prefill_vs_merged']:10.3f} "
                 f"{v['decode_tokens_per_s']:13.1f} {v['decode_vs_merged']:10.3f} "
                 f"{v['tree_bytes'] / 2**20:9.1f} {v['prefill_temp_bytes'] / 2**20:12.1f} "
                 f"{v['row0_max_abs_diff_vs_merged']:10.2e}")
  lines += ["", f"base {r['base_bytes'] / 2**20:.1f} MB, one adapter {r['adapter_bytes'] / 2**20:.3f} MB"]
  for n in COUNTS:
    v = s[f"stacked-{n}"]
    lines.append(f"N={n:2d}: stacked tree = {v['vs_n_copies_of_base']:.4f} x N copies of the base, "
                 f"{v['vs_base_plus_n_adapters']:.4f} x (base + N adapters)")
  v16 = s["stacked-16"]
  lines += ["", "targets (issue 16): 16 adapters >= 0.7x the merged model's tokens/s; memory <= base + "
            "16 x adapter bytes + 5%",
            f"  prefill {v16['prefill_vs_merged']:.3f}x, decode {v16['decode_vs_merged']:.3f}x, memory "
            f"{v16['vs_base_plus_n_adapters']:.4f}x"]
  return lines


if __name__ == "__main__":
  main()
