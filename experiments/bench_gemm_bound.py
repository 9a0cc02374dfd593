"""What bounds jlora's LoRA step against PEFT's on this machine: the step's matmuls, XLA:CPU vs torch.

``experiments/bench_peft.py`` compares jlora's LoRA step with Hugging Face PEFT's. This
script measures how much of each step is matrix multiplication, and how fast each library
multiplies the step's matrices. It compiles bench_peft's jax LoRA step (SmolLM2-135M shape,
per-layer weights, batch 4 x 128, float32, r=8 on q_proj/v_proj, AdamW) and reads every
``dot`` out of the compiled HLO (top level and inside fusions), grouped by signature
(operand shapes, contracting and batch dimensions) with its count per step. Then, in one
process limited to the same CPUs and threads for both libraries:

* per signature, a jitted ``lax.dot_general`` (XLA:CPU) and the same contraction as
  ``torch.einsum`` (torch hands strided 2-d and batched operands to its GEMM without a
  copy) alternate, each timed alone over several rounds: the table of speeds by shape;
* rounds of four runs, interleaved so machine drift hits all alike: the jlora step, the
  PEFT step, **all of the step's dots in one XLA program** (every dot on its own random
  operands, so XLA merges none; each signature's results joined by elementwise maxima,
  which adds a little work) and **the same dots as torch calls**, one after another as
  torch runs a step's matmuls.

The report gives each step's time, the dots' time on each library, and the step time 1.3x
PEFT's speed would need, with the matmul speed (GFLOP/s over the step's dots, nothing else
counted) that time implies. A single isolated dot is slower on XLA:CPU than inside a
program (the program runs independent dots side by side on the two threads), so the
per-shape table shows shapes, not the step's matmul time.

Usage::

  python experiments/bench_gemm_bound.py           # writes experiments/results/bench_gemm_bound.{txt,json}
  python experiments/bench_gemm_bound.py --layers 2 --rounds 2 --steps 2 --out /tmp/gemm   # smoke run
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_peft as bp  # noqa: E402  (shape, tokens, step builders, CPU limits, machine, versions)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rounds", type=int, default=5, help="timed rounds over all signatures")
  ap.add_argument("--min-time", type=float, default=0.05,
                  help="seconds of calls per signature, side and round")
  ap.add_argument("--steps", type=int, default=6, help="interleaved jlora / PEFT steps")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--layers", type=int, default=bp.SHAPE["layers"])
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_gemm_bound"))
  args = ap.parse_args()
  bp._limit_cpus(args.threads)
  import numpy as np

  keep: dict = {}
  jstep = bp._jax_setup("lora", args.layers, "unstacked", "none", keep=keep)
  sigs = dots_in_hlo(keep["compiled"].as_text())
  print(f"{sum(sigs.values())} dots in {len(sigs)} signatures", flush=True)

  timers = {sig: (_jax_timer(sig), _torch_timer(sig)) for sig in sigs}
  per = {sig: ([], []) for sig in sigs}
  for r in range(args.rounds + 1):  # round 0 warms up (compiles, first touches)
    for sig, (jt, tt) in timers.items():
      a, b = jt(args.min_time), tt(args.min_time)
      if r:
        per[sig][0].append(a)
        per[sig][1].append(b)
    print(f"round {r} done", flush=True)

  rows = []
  for sig, count in sorted(sigs.items(), key=lambda kv: -kv[1] * _flops(kv[0])):
    j, t = float(np.median(per[sig][0])), float(np.median(per[sig][1]))
    rows.append({"signature": _describe(sig), "count": count, "gflop_each": _flops(sig) / 1e9,
                 "xla_s": j, "torch_s": t, "xla_gflops": _flops(sig) / j / 1e9,
                 "torch_gflops": _flops(sig) / t / 1e9})

  tokens = bp._tokens()
  tstep = bp._torch_setup("lora", args.layers)
  runs = {"jlora step": lambda: jstep(tokens), "PEFT step": lambda: tstep(tokens),
          "XLA dots": _xla_all_dots(sigs), "torch dots": _torch_all_dots(sigs)}
  times = {name: [] for name in runs}
  for i in range(args.steps + 2):  # two warm-up rounds
    line = []
    for name, run in runs.items():
      t0 = time.perf_counter()
      run()
      dt = time.perf_counter() - t0
      line.append(f"{name} {dt:.3f} s")
      if i >= 2:
        times[name].append(dt)
    print(f"round {i}: " + ", ".join(line), flush=True)

  results = {"machine": bp._machine(), "versions": bp._versions(), "threads": args.threads,
             "layers": args.layers, "rounds": args.rounds, "min_time": args.min_time,
             "dots": rows, "step_rounds": args.steps, "times_s": times}
  _write(results, args.out)


# -- the dots of a compiled step -------------------------------------------------------------

_DOT = re.compile(r"= f32\[[\d,]*\]\S* dot\(%(\S+), %(\S+)\), ([^\n]*)")
_SHAPE = re.compile(r"%(\S+) = f32\[([\d,]*)\]")


def dots_in_hlo(text: str) -> collections.Counter:
  """Counts the float32 dots of a compiled HLO module by (lhs, rhs, contracting, batch) dims.

  Every dot is counted once per place it appears in the module; the benchmarked step has
  no loops (per-layer weights, Python loop over layers), so that is once per step.
  """
  shapes = {name: tuple(int(d) for d in dims.split(",") if d) for name, dims in _SHAPE.findall(text)}
  params = {}
  for comp in re.finditer(r"\n(?:ENTRY )?%\S+ \((.*?)\) -> ", text):
    for name, dims in re.findall(r"(\S+): f32\[([\d,]*)\]", comp.group(1)):
      params[name] = tuple(int(d) for d in dims.split(",") if d)
  out = collections.Counter()
  for lhs, rhs, attrs in _DOT.findall(text):
    def dims(key):
      m = re.search(key + r"=\{([\d,]*)\}", attrs)
      return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()
    ls, rs = shapes.get(lhs, params.get(lhs)), shapes.get(rhs, params.get(rhs))
    if ls is None or rs is None:
      raise ValueError(f"dot operand shape not found in the HLO: {lhs}, {rhs}")
    out[(ls, rs, dims("lhs_contracting_dims"), dims("rhs_contracting_dims"),
         dims("lhs_batch_dims"), dims("rhs_batch_dims"))] += 1
  return out


def _flops(sig) -> float:
  ls, rs, lc, rc, lb, rb = sig
  free_l = [d for i, d in enumerate(ls) if i not in lc and i not in lb]
  free_r = [d for i, d in enumerate(rs) if i not in rc and i not in rb]
  return 2.0 * math.prod(ls[i] for i in lb) * math.prod(free_l) * math.prod(free_r) * math.prod(
      ls[i] for i in lc)


def _describe(sig) -> str:
  ls, rs, lc, rc, lb, rb = sig
  batch = f" batch {list(lb)}/{list(rb)}" if lb else ""
  return f"{list(ls)} x {list(rs)} contract {list(lc)}/{list(rc)}{batch}"


def _einsum(sig) -> str:
  ls, rs, lc, rc, lb, rb = sig
  letters = iter(string.ascii_lowercase)
  lhs = [next(letters) for _ in ls]
  rhs = [None] * len(rs)
  for i, j in zip(lc, rc):
    rhs[j] = lhs[i]
  for i, j in zip(lb, rb):
    rhs[j] = lhs[i]
  rhs = [c if c is not None else next(letters) for c in rhs]
  out = [lhs[i] for i in lb] + [c for i, c in enumerate(lhs) if i not in lc and i not in lb]
  out += [c for j, c in enumerate(rhs) if j not in rc and j not in rb]
  return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


def _calls(fn, min_time: float) -> float:
  """Mean seconds per call of ``fn`` over at least ``min_time`` seconds (at least 3 calls)."""
  n, t0 = 0, time.perf_counter()
  while True:
    fn()
    n += 1
    dt = time.perf_counter() - t0
    if n >= 3 and dt >= min_time:
      return dt / n


def _jax_timer(sig):
  import jax
  import numpy as np
  ls, rs, lc, rc, lb, rb = sig
  rng = np.random.default_rng(0)
  a = jax.numpy.asarray(rng.standard_normal(ls, dtype=np.float32))
  b = jax.numpy.asarray(rng.standard_normal(rs, dtype=np.float32))
  f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, ((lc, rc), (lb, rb))))
  return lambda min_time: _calls(lambda: f(a, b).block_until_ready(), min_time)


def _torch_timer(sig):
  import numpy as np
  import torch
  rng = np.random.default_rng(0)
  a = torch.from_numpy(rng.standard_normal(sig[0], dtype=np.float32))
  b = torch.from_numpy(rng.standard_normal(sig[1], dtype=np.float32))
  eq = _einsum(sig)

  def run():
    with torch.no_grad():
      torch.einsum(eq, a, b)
  return lambda min_time: _calls(run, min_time)


def _xla_all_dots(sigs):
  """One jitted program with every dot of ``sigs`` (count times each) on distinct operands."""
  import jax
  import jax.numpy as jnp

  operands = {}
  key = jax.random.key(0)
  for n, (sig, count) in enumerate(sigs.items()):
    keys = jax.random.split(jax.random.fold_in(key, n), 2 * count)
    operands[str(n)] = [(jax.random.normal(keys[2 * i], sig[0], jnp.float32),
                         jax.random.normal(keys[2 * i + 1], sig[1], jnp.float32))
                        for i in range(count)]
  dims = {str(n): ((sig[2], sig[3]), (sig[4], sig[5])) for n, sig in enumerate(sigs)}

  @jax.jit
  def program(operands):
    out = {}
    for n, pairs in operands.items():
      acc = None
      for a, b in pairs:
        y = jax.lax.dot_general(a, b, dims[n])
        acc = y if acc is None else jnp.maximum(acc, y)
      out[n] = acc
    return out

  compiled = program.lower(operands).compile()
  return lambda: jax.block_until_ready(compiled(operands))


def _torch_all_dots(sigs):
  """The dots of ``sigs`` (count times each, on distinct operands) as ``torch.einsum`` calls."""
  import numpy as np
  import torch

  rng = np.random.default_rng(0)
  calls = [(_einsum(sig), [(torch.from_numpy(rng.standard_normal(sig[0], dtype=np.float32)),
                            torch.from_numpy(rng.standard_normal(sig[1], dtype=np.float32)))
                           for _ in range(count)])
           for sig, count in sigs.items()]

  def run():
    with torch.no_grad():
      for eq, operands in calls:
        for a, b in operands:
          torch.einsum(eq, a, b)
  return run


# -- report ----------------------------------------------------------------------------------

def _write(results: dict, out: str) -> None:
  import numpy as np
  m = results["machine"]
  rows = results["dots"]
  xla = sum(r["xla_s"] * r["count"] for r in rows)
  tor = sum(r["torch_s"] * r["count"] for r in rows)
  flop = sum(r["gflop_each"] * r["count"] for r in rows)
  med = {name: float(np.median(ts)) for name, ts in results["times_s"].items()}
  js, ps, xd, td = med["jlora step"], med["PEFT step"], med["XLA dots"], med["torch dots"]
  need = ps / 1.3
  best = max(max(r["xla_gflops"], r["torch_gflops"]) for r in rows)
  lines = [
      "What bounds jlora's LoRA step against PEFT's: the matmuls of jlora's step (bench_peft.py's "
      f"jax LoRA step: SmolLM2-135M shape, {results['layers']} layers, batch {bp.BATCH} x {bp.SEQ}, "
      f"r={bp.RANK} on q/v, float32), XLA:CPU vs torch, in one process",
      f"machine: {m['cpu_model']}, {m['cpus_used']} of {m['cpus_online']} CPUs, threads "
      f"{results['threads']}",
      "versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
      "",
      f"each dot alone ({results['rounds']} rounds; per signature, side and round: mean of calls "
      f"over >= {results['min_time']} s; median over rounds):",
      f"  {'count':>5s} {'GFLOP':>7s} {'XLA ms':>8s} {'GF/s':>6s} {'torch ms':>8s} {'GF/s':>6s}  dot",
  ]
  for r in rows:
    lines.append(f"  {r['count']:5d} {r['gflop_each'] * r['count']:7.2f} {r['xla_s'] * 1e3:8.3f} "
                 f"{r['xla_gflops']:6.1f} {r['torch_s'] * 1e3:8.3f} {r['torch_gflops']:6.1f}  "
                 f"{r['signature']}")
  lines += [
      f"  sum over the step's {sum(r['count'] for r in rows)} dots ({flop:.1f} GFLOP), each alone: "
      f"XLA {xla:.3f} s ({flop / xla:.1f} GFLOP/s), torch {tor:.3f} s ({flop / tor:.1f} GFLOP/s); "
      f"fastest single signature on either side: {best:.1f} GFLOP/s",
      "",
      f"interleaved rounds (median of {results['step_rounds']} after 2 warm-up):",
  ]
  for name, ts in results["times_s"].items():
    lines.append(f"  {name:10s} median {med[name]:.3f} s   " + ", ".join(f"{t:.2f}" for t in ts))
  lines += [
      f"  the step's dots: {flop / xd:.1f} GFLOP/s in one XLA program, {flop / td:.1f} GFLOP/s as "
      f"torch calls",
      f"  jlora speed / PEFT speed: {ps / js:.3f}x",
      f"  jlora step: its dots (XLA program) take {xd / js:.0%} of it; PEFT step: the same dots "
      f"(torch calls) take {td / ps:.0%} of it",
      f"  1.3x PEFT's speed needs a jlora step of {need:.3f} s, i.e. {flop / need:.1f} GFLOP/s over "
      f"the step's dots with nothing else in the step. With nothing outside its matmuls jlora "
      f"would reach {ps / xd:.2f}x at XLA's measured matmul speed ({ps / td:.2f}x at torch's).",
  ]
  bp._save(out, results, lines)


if __name__ == "__main__":
  main()
