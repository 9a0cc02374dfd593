"""jlora vs Hugging Face PEFT: one training step of a SmolLM2-135M-shaped Llama, side by side.

Both sides train the same shape (hidden 576, 30 layers, 9 heads / 3 kv heads,
MLP 1536, vocab 49152, tied embeddings) from random init on the same batch of
4 x 128 tokens, float32, AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight
decay 0.01), next-token cross-entropy over all 128 positions' logits:

* LoRA: r=8 (alpha 8, dropout 0) on q_proj and v_proj. jlora:
  ``jlora.lora(jlora.models.llama.llama_forward)`` on a wrapped tree, optax
  AdamW through ``jlora.optimizer``; PEFT: ``get_peft_model(LlamaForCausalLM,
  LoraConfig(...))`` with ``torch.optim.AdamW`` (fused when available).
* Full fine-tuning: the same jlora step code with every leaf ``jlora.Full()``;
  torch: the plain ``LlamaForCausalLM``.

Speed: both frameworks live in one process limited to the same CPUs
(``sched_setaffinity``, ``torch.set_num_threads``), and their steps are
interleaved (jax, torch, jax, torch, ...), so background load hits both alike;
medians are reported. Compile time and peak memory come from one fresh child
process per (framework, mode), so neither pays for the other's imports.

Usage::

  python experiments/bench_peft.py                 # writes experiments/results/bench_peft.{txt,json}
  python experiments/bench_peft.py --steps 3 --layers 2 --out /tmp/bench   # a quick smoke run
  python experiments/bench_peft.py --layout stacked --donate all           # the scanned layout

The jax side runs the model with per-layer weight arrays
(``jlora.models.llama.unstack_layers``) and donates no buffers by default: on XLA:CPU
both the stacked layout under ``lax.scan`` (a copy of each layer's weights out of the
stack every step) and donating the trained state (``bench_donate.py``) cost time;
``--layout stacked --donate all`` measures that configuration.

On a machine with a CUDA GPU the torch side runs there (and jax does too when
it has a GPU backend); the device is named in the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(vocab=49152, hidden=576, inter=1536, layers=30, heads=9, kv_heads=3, eps=1e-5,
             theta=100000.0)
BATCH, SEQ = 4, 128
LR, WD, BETAS, EPS = 1e-4, 0.01, (0.9, 0.999), 1e-8
RANK = 8


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=8, help="timed steps per side and mode")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (after compiling)")
  ap.add_argument("--threads", type=int, default=2, help="CPU threads for both sides")
  ap.add_argument("--layers", type=int, default=SHAPE["layers"])
  ap.add_argument("--modes", default="lora,full")
  ap.add_argument("--layout", default="unstacked", choices=("unstacked", "stacked"),
                  help="jax params layout: per-layer arrays (a Python loop over layers) or "
                       "stacked (L, ...) arrays under lax.scan")
  ap.add_argument("--donate", default="none", choices=("none", "opt", "all"),
                  help="jax buffers donated to the step: none, the optimizer state, or params "
                       "and optimizer state (on XLA:CPU donation measured slower: "
                       "bench_donate.py)")
  ap.add_argument("--no-children", action="store_true", help="skip compile-time / memory runs")
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_peft"))
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  _limit_cpus(args.threads)
  if args.child:
    print(json.dumps(_child(args)), flush=True)
    return

  modes = args.modes.split(",")
  load_before = os.getloadavg()
  results = {"machine": _machine(), "versions": _versions(), "threads": args.threads,
             "shape": {**SHAPE, "layers": args.layers}, "batch": [BATCH, SEQ], "rank": RANK,
             "steps": args.steps, "warmup": args.warmup, "load_before": load_before,
             "jax_layout": args.layout, "jax_donate": args.donate}
  results["speed"] = _speed(args, modes)
  if not args.no_children:
    results["children"] = {}
    for mode in modes:
      for fw in ("jax", "torch"):
        results["children"][f"{fw}-{mode}"] = _run_child(args, f"{fw}-{mode}")
  results["load_after"] = os.getloadavg()
  results["gpu"] = "not measured (no GPU on this machine)" if not _cuda() else "see device fields"
  _write(results, args.out)


# -- speed: both sides in one process, interleaved -------------------------------------------

def _speed(args, modes):
  import torch
  out = {}
  tokens = _tokens()
  for mode in modes:
    jstep = _jax_setup(mode, args.layers, args.layout, args.donate)
    tstep = _torch_setup(mode, args.layers)
    jt, tt, jl, tl, jc, tc = [], [], [], [], [], []
    for i in range(args.warmup + args.steps):
      c0, t0 = time.process_time(), time.perf_counter()
      loss_j = jstep(tokens)
      c1, t1 = time.process_time(), time.perf_counter()
      loss_t = tstep(tokens)
      c2, t2 = time.process_time(), time.perf_counter()
      if i >= args.warmup:
        jt.append(t1 - t0)
        tt.append(t2 - t1)
        jc.append(c1 - c0)
        tc.append(c2 - c1)
      jl.append(loss_j)
      tl.append(loss_t)
      print(f"[{mode}] step {i}: jax {t1 - t0:.3f}s loss {loss_j:.4f} | torch {t2 - t1:.3f}s "
            f"loss {loss_t:.4f} | load {os.getloadavg()[0]:.1f}", flush=True)
    jm, tm = _median(jt), _median(tt)
    out[mode] = {
        "jax_step_s": jt, "torch_step_s": tt, "jax_median_s": jm, "torch_median_s": tm,
        "jax_tokens_per_s": BATCH * SEQ / jm, "torch_tokens_per_s": BATCH * SEQ / tm,
        "speedup": tm / jm, "jax_loss": jl, "torch_loss": tl,
        # CPU seconds of the whole process during each step (all threads): robust to other
        # processes' load, but it counts spin-waiting of idle worker threads too
        "jax_cpu_s": jc, "torch_cpu_s": tc, "jax_cpu_median_s": _median(jc),
        "torch_cpu_median_s": _median(tc), "cpu_time_ratio": _median(tc) / _median(jc),
        "jax_device": _jax_device(), "torch_device": "cuda" if _cuda() else "cpu",
    }
    del jstep, tstep
    gc.collect()
    if _cuda():
      torch.cuda.empty_cache()
  return out


def _tokens():
  import numpy as np
  return np.random.default_rng(0).integers(0, SHAPE["vocab"], (BATCH, SEQ)).astype(np.int32)


def _jax_config(layers: int):
  """The benchmarked model's ``LlamaConfig`` (SHAPE) with ``layers`` layers."""
  from jlora.models.llama import LlamaConfig
  return LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"],
                     intermediate_size=SHAPE["inter"], num_layers=layers, num_heads=SHAPE["heads"],
                     num_kv_heads=SHAPE["kv_heads"], rms_norm_eps=SHAPE["eps"],
                     rope_theta=SHAPE["theta"], tie_word_embeddings=True)


def _adamw():
  """The benchmarked optimizer: optax AdamW with the torch side's settings."""
  import optax
  return optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)


def next_token_loss(logits, tokens):
  """Mean next-token cross-entropy over the T-1 predicting positions of ``(B, T, V)`` logits.

  The targets are shifted instead of the logits sliced (a 100 MB copy at the benchmark's
  shape), and the last position weighted 0, as transformers' loss does.
  """
  import jax.numpy as jnp
  import optax
  labels = jnp.roll(tokens, -1, axis=1)
  weight = (jnp.arange(tokens.shape[1]) < tokens.shape[1] - 1).astype(jnp.float32)
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return (per_token * weight).sum() / (weight.sum() * tokens.shape[0])


def _jax_setup(mode: str, layers: int, layout: str, donate: str = "none", *, report=None,
               keep=None):
  """Builds params, optimizer and the compiled step; returns ``step(tokens) -> loss``.

  ``keep``, a dict, receives the compiled step under ``"compiled"``.
  """
  import jax
  import jax.numpy as jnp
  import optax

  import jlora
  from jlora.models.llama import init_llama, llama_forward, unstack_layers

  cfg = _jax_config(layers)
  params = init_llama(cfg, jax.random.key(0))
  if layout == "unstacked":
    params = unstack_layers(params)  # per-layer arrays: no weight slice copies under scan
  if mode == "lora" and layout == "unstacked":
    rules = {"layers/*/self_attn/{q,v}_proj/kernel": jlora.LoRA(RANK, alpha=RANK)}
  elif mode == "lora":
    rules = {"layers/self_attn/{q,v}_proj/kernel": jlora.LoRA(RANK, alpha=RANK, stack_axes=1)}
  else:
    rules = {"**": jlora.Full()}
  tree = jlora.wrap(params, rules, key=jax.random.key(1))
  del params
  trainable, frozen = jlora.split(tree)
  del tree
  tx = jlora.optimizer(_adamw())
  opt_state = tx.init(trainable)
  forward = jlora.lora(llama_forward)

  def train_step(trainable, opt_state, frozen, tokens):
    def loss_fn(t):
      return next_token_loss(forward(jlora.combine(t, frozen), tokens, cfg), tokens)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  tok = jnp.asarray(_tokens())
  t0, p0 = time.perf_counter(), time.process_time()
  donate = {"none": (), "opt": (1,), "all": (0, 1)}[donate]
  lowered = jax.jit(train_step, donate_argnums=donate).lower(trainable, opt_state, frozen, tok)
  t1, p1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t2, p2 = time.perf_counter(), time.process_time()
  if keep is not None:
    keep["compiled"] = compiled
  if report is not None:
    report["trace_lower_s"] = t1 - t0
    report["compile_s"] = t2 - t1
    report["trace_lower_compile_s"] = t2 - t0
    report["trace_lower_compile_cpu_s"] = p2 - p0
    try:
      mem = compiled.memory_analysis()
      report["xla_temp_bytes"] = int(mem.temp_size_in_bytes)
      report["xla_argument_bytes"] = int(mem.argument_size_in_bytes)
      report["xla_output_bytes"] = int(mem.output_size_in_bytes)
    except Exception as e:  # noqa: BLE001 - informational only
      report["xla_memory_analysis"] = repr(e)
  state = {"t": trainable, "o": opt_state}

  def step(tokens):
    state["t"], state["o"], loss = compiled(state["t"], state["o"], frozen, jnp.asarray(tokens))
    return float(loss)
  return step


def _torch_setup(mode: str, layers: int):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  cfg = LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"],
                    intermediate_size=SHAPE["inter"], num_hidden_layers=layers,
                    num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["kv_heads"],
                    rms_norm_eps=SHAPE["eps"], rope_theta=SHAPE["theta"], tie_word_embeddings=True,
                    max_position_embeddings=2048)
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  device = "cuda" if _cuda() else "cpu"
  model = LlamaForCausalLM(cfg).to(device)
  if mode == "lora":
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  try:
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
  except (RuntimeError, TypeError, ValueError):
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=True)

  def step(tokens):
    ids = torch.from_numpy(tokens).long().to(device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()
    return float(loss.detach())
  return step


# -- compile time and peak memory: one fresh process per (framework, mode) -------------------

def _run_child(args, which: str) -> dict:
  cmd = [sys.executable, __file__, "--child", which, "--steps", "3", "--warmup", "0",
         "--threads", str(args.threads), "--layers", str(args.layers), "--layout", args.layout,
         "--donate", args.donate]
  print("child:", which, flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    return {"error": proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(args) -> dict:
  fw, mode = args.child.split("-")
  rss_start = _rss_mb()
  report: dict = {"rss_after_start_mb": rss_start}
  if fw == "jax":
    import jax  # noqa: F401
    report["rss_after_import_mb"] = _rss_mb()
    step = _jax_setup(mode, args.layers, args.layout, args.donate, report=report)
  else:
    import torch  # noqa: F401
    report["rss_after_import_mb"] = _rss_mb()
    t0 = time.perf_counter()
    step = _torch_setup(mode, args.layers)
    report["setup_s"] = time.perf_counter() - t0
  tokens = _tokens()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step(tokens)
    times.append(time.perf_counter() - t0)
  report["step_s"] = times
  report["peak_rss_mb"] = _status_mb("VmHWM")  # ru_maxrss would carry the parent's peak over fork
  report["load"] = os.getloadavg()
  return report


# -- environment and output ------------------------------------------------------------------

def _limit_cpus(n: int) -> None:
  cpus = sorted(os.sched_getaffinity(0))[:n]
  os.sched_setaffinity(0, cpus)
  os.environ.setdefault("OMP_NUM_THREADS", str(n))
  os.environ.setdefault("MKL_NUM_THREADS", str(n))


def _cuda() -> bool:
  if "torch" not in sys.modules:
    return False
  try:
    import torch
    return torch.cuda.is_available()
  except ImportError:
    return False


def _jax_device() -> str:
  import jax
  d = jax.devices()[0]
  return f"{d.platform}: {getattr(d, 'device_kind', '')}"


def _machine() -> dict:
  model = ""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  info = {"cpu_model": model, "cpus_online": os.cpu_count(), "cpus_used": len(os.sched_getaffinity(0)),
          "platform": platform.platform(), "python": platform.python_version()}
  try:
    import torch  # noqa: F401 - the main process runs torch anyway
  except ImportError:
    pass
  if _cuda():
    import torch
    info["gpu"] = torch.cuda.get_device_name(0)
  return info


def _versions() -> dict:
  import importlib.metadata as md
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "numpy"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


def _ok(children: dict, *names: str) -> bool:
  return all(n in children and "error" not in children[n] for n in names)


def _median(xs):
  s = sorted(xs)
  n = len(s)
  return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _rss_mb() -> float:
  return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _save(out: str, results: dict, lines: list[str]) -> None:
  """Writes ``results`` to ``<out>.json`` and ``lines`` to ``<out>.txt``, and prints them."""
  out_path = Path(out)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.with_suffix(".json").write_text(json.dumps(results, indent=1))
  text = "\n".join(lines) + "\n"
  out_path.with_suffix(".txt").write_text(text)
  print(text)


def _write(results: dict, out: str) -> None:
  lines = [
      "jlora vs Hugging Face PEFT: one training step, SmolLM2-135M shape "
      f"({results['shape']['layers']} layers), batch {BATCH} x {SEQ}, float32, AdamW",
      f"machine: {results['machine']['cpu_model']}, {results['machine']['cpus_used']} of "
      f"{results['machine']['cpus_online']} CPUs, threads {results['threads']}; "
      f"load average before {results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f}",
      "versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
      f"GPU: {results['gpu']}",
      f"jax side: params layout {results['jax_layout']}, donated buffers: {results['jax_donate']}; "
      "loss: mean next-token cross-entropy over the 127 predicting positions on both sides",
      "",
      "speed (interleaved in one process; median of "
      f"{results['steps']} steps after {results['warmup']} warm-up):",
  ]
  target = {"lora": 1.3, "full": 1.0}
  for mode, r in results["speed"].items():
    ok = r["speedup"] >= target[mode]
    lines.append(
        f"  {mode:4s}: jax {r['jax_median_s']:.3f} s/step = {r['jax_tokens_per_s']:.0f} tok/s "
        f"[{r['jax_device']}] | torch{'+peft' if mode == 'lora' else ''} {r['torch_median_s']:.3f} "
        f"s/step = {r['torch_tokens_per_s']:.0f} tok/s [{r['torch_device']}] | jax/torch "
        f"{r['speedup']:.2f}x (target >= {target[mode]}x: {'met' if ok else 'NOT met'})")
    lines.append(f"        CPU time per step (process, all threads): jax {r['jax_cpu_median_s']:.3f} s, "
                 f"torch {r['torch_cpu_median_s']:.3f} s -> torch/jax {r['cpu_time_ratio']:.2f}x")
    lines.append(f"        wall times jax: " + ", ".join(f"{t:.2f}" for t in r["jax_step_s"])
                 + " | torch: " + ", ".join(f"{t:.2f}" for t in r["torch_step_s"]))
    lines.append(f"        first losses: jax {r['jax_loss'][0]:.4f}, torch {r['torch_loss'][0]:.4f}")
  ch = results.get("children")
  if ch:
    lines.append("")
    lines.append("fresh process per side (compile time; peak RSS = VmHWM of the process):")
    for name, r in ch.items():
      if "error" in r:
        lines.append(f"  {name}: ERROR {r['error'][-300:]}")
        continue
      comp = (f"trace+lower {r['trace_lower_s']:.1f} s, compile {r['compile_s']:.1f} s "
              f"(CPU {r['trace_lower_compile_cpu_s']:.1f} s), "
              if "compile_s" in r else f"setup {r.get('setup_s', 0):.1f} s, ")
      lines.append(f"  {name:10s}: {comp}peak RSS {r['peak_rss_mb']:.0f} MB (after import "
                   f"{r['rss_after_import_mb']:.0f} MB), steps "
                   + ", ".join(f"{t:.2f}" for t in r["step_s"]) + " s")
    if _ok(ch, "jax-lora", "jax-full"):
      jl, jf = ch["jax-lora"], ch["jax-full"]
      c = jl["trace_lower_compile_s"] / jf["trace_lower_compile_s"]
      cc = jl["trace_lower_compile_cpu_s"] / jf["trace_lower_compile_cpu_s"]
      m = jl["peak_rss_mb"] / jf["peak_rss_mb"]
      lines.append(f"  jax LoRA / full: trace+lower+compile wall {c:.2f}x, CPU {cc:.2f}x (target <= "
                   f"1.2x: {'met' if max(c, cc) <= 1.2 else 'NOT met' if min(c, cc) > 1.2 else 'mixed'})"
                   f", peak RSS {m:.2f}x (target <= 0.6x: {'met' if m <= 0.6 else 'NOT met'})")
    if _ok(ch, "torch-lora", "torch-full"):
      m = ch["torch-lora"]["peak_rss_mb"] / ch["torch-full"]["peak_rss_mb"]
      lines.append(f"  torch LoRA / full: peak RSS {m:.2f}x (reference)")
  _save(out, results, lines)


if __name__ == "__main__":
  main()
