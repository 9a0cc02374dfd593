"""Where the time of jlora's LoRA training step goes: variants of one step, interleaved in one process.

The step is ``experiments/bench_peft.py``'s jax LoRA step (SmolLM2-135M shape, 30 layers,
per-layer weights, batch 4 x 128, float32, r=8 on q_proj/v_proj, AdamW, next-token
cross-entropy). Every variant is compiled once, then the variants' steps run in turn
(current, variant 1, variant 2, ..., current, ...), so machine drift hits all alike; each
variant's speed is reported as the median over rounds of (current step time / variant step
time) within the round.

Variants:

* ``rope+mask in program``: the RoPE cos/sin tables and the causal mask computed inside the
  program (what the model did before they became trace-time constants).
* ``einsum attention``: attention as the five-index einsum the model used before the
  head-major batched matmuls.
* ``no attention`` / ``no rope`` / ``no rmsnorm`` / ``no silu`` / ``no cross-entropy`` /
  ``all removed``: stripped copies of the step (not the same function: they show what each
  part costs). ``no attention`` passes q through and adds k and v, so the k/v matmuls stay.
* ``hand-written lora``: LoRA written into the model by hand (``x @ W + s (x @ A) @ B`` on
  plain arrays, optax AdamW on the factors) instead of ``jlora.lora``.
* ``matmul only``: a program holding only the step's matmuls (30 layers' forward and
  input-gradient matmuls plus the tied head's forward and input gradient), weights passed as
  arguments, joined by elementwise maxima; XLA's FLOP count of it is printed.

Usage::

  python experiments/bench_llama_ablation.py            # writes experiments/results/bench_llama_ablation.{txt,json}
  python experiments/bench_llama_ablation.py --layers 2 --steps 2 --out /tmp/ablation   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_peft as bp  # noqa: E402  (shape, tokens, CPU limits, machine and versions)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=6, help="timed rounds (one step of every variant each)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (at least 1)")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--layers", type=int, default=bp.SHAPE["layers"])
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_llama_ablation"))
  args = ap.parse_args()
  bp._limit_cpus(args.threads)
  import numpy as np

  runs = _build_all(args.layers)
  names = list(runs)
  first_loss = {n: r() for n, r in runs.items()}  # the variants that keep the math keep the loss
  for _ in range(args.warmup - 1):
    for r in runs.values():
      r()
  times = {n: [] for n in names}
  for i in range(args.steps):
    for n in names:
      t0 = time.perf_counter()
      runs[n]()
      times[n].append(time.perf_counter() - t0)
    print(f"round {i}: " + ", ".join(f"{n} {times[n][-1]:.2f}" for n in names), flush=True)
  base = np.array(times["current"])
  rows = {n: {"median_s": float(np.median(times[n])), "step_s": times[n], "first_loss": first_loss[n],
              "speed_vs_current": float(np.median(base / np.array(times[n])))} for n in names}
  results = {"machine": bp._machine(), "versions": bp._versions(), "threads": args.threads,
             "layers": args.layers, "steps": args.steps, "warmup": args.warmup, "variants": rows,
             "matmul_only_xla_gflop": _MATMUL_ONLY_FLOPS[0] / 1e9}
  _write(results, args.out)


# -- the variants ------------------------------------------------------------------------------

def _build_all(layers: int) -> dict:
  import jax
  import jax.numpy as jnp

  import jlora
  from jlora.models import llama

  cfg = bp._jax_config(layers)
  params = llama.unstack_layers(llama.init_llama(cfg, jax.random.key(0)))
  tree = jlora.wrap(params, {"layers/*/self_attn/{q,v}_proj/kernel": jlora.LoRA(bp.RANK, alpha=bp.RANK)},
                    key=jax.random.key(1))
  tokens = jnp.asarray(bp._tokens())

  allowed_in_program = llama._attention_allowed
  stripped = {
      "no attention": [("_attention", _no_attention)],
      "no rope": [("_apply_rope", lambda x, cos, sin: x)],
      "no rmsnorm": [("_rms_norm", lambda x, scale, eps: scale * x)],
      "no silu": [("jax.nn.silu", lambda x: x)],
  }
  variants = {
      "current": ([], False),
      "rope+mask in program": ([
          ("_ROPE_TABLE_MAX", 0),
          ("_attention_allowed", lambda key_mask, q_slots, n, c: allowed_in_program(
              key_mask, jnp.arange(key_mask.shape[1], dtype=jnp.int32) if q_slots is None else q_slots,
              n, c))], False),
      "einsum attention": ([("_attention", _einsum_attention)], False),
      **{name: (patches, False) for name, patches in stripped.items()},
      "no cross-entropy": ([], True),
      "all removed": ([p for ps in stripped.values() for p in ps], True),
  }
  runs = {}
  for name, (patches, plain_loss) in variants.items():
    print(f"compiling: {name}", flush=True)
    with _patched(llama, patches):
      runs[name] = _lora_step(llama, cfg, tree, tokens, plain_loss=plain_loss)
  print("compiling: hand-written lora", flush=True)
  runs["hand-written lora"] = _hand_written_step(llama, cfg, params, tokens)
  print("compiling: matmul only", flush=True)
  runs["matmul only"] = _matmul_only(params, cfg)
  return runs


@contextlib.contextmanager
def _patched(llama, patches):
  """Replaces module attributes of ``jlora.models.llama`` (or ``jax.nn.silu``) while tracing."""
  import jax
  saved = []
  for name, value in patches:
    owner, attr = (jax.nn, "silu") if name == "jax.nn.silu" else (llama, name)
    saved.append((owner, attr, getattr(owner, attr)))
    setattr(owner, attr, value)
  jax.clear_caches()  # the model's inner jit must be traced again under the patches
  try:
    yield
  finally:
    for owner, attr, value in reversed(saved):
      setattr(owner, attr, value)
    jax.clear_caches()


def _loss(logits, tokens, plain_loss):
  return logits.mean() if plain_loss else bp.next_token_loss(logits, tokens)


def _compiled(step, trainable, opt_state, *rest):
  import jax
  compiled = jax.jit(step).lower(trainable, opt_state, *rest).compile()
  state = {"t": trainable, "o": opt_state}

  def run():
    state["t"], state["o"], loss = compiled(state["t"], state["o"], *rest)
    return float(loss)
  return run


def _lora_step(llama, cfg, tree, tokens, *, plain_loss):
  import jax
  import optax

  import jlora
  trainable, frozen = jlora.split(tree)
  tx = jlora.optimizer(bp._adamw())
  forward = jlora.lora(llama.llama_forward)

  def step(trainable, opt_state, frozen, tokens):
    loss, grads = jax.value_and_grad(
        lambda t: _loss(forward(jlora.combine(t, frozen), tokens, cfg), tokens, plain_loss))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss
  return _compiled(step, trainable, tx.init(trainable), frozen, tokens)


def _hand_written_step(llama, cfg, params, tokens):
  """LoRA in the model by hand: ``_dense`` adds ``scale (x @ A) @ B`` where a layer has factors."""
  import jax
  import jax.numpy as jnp
  import optax

  plain_dense = llama._dense

  def dense(x, p):
    y = plain_dense(x, p)
    return y + (x @ p["lora_a"]) @ p["lora_b"] * p["lora_scale"] if "lora_a" in p else y

  key = jax.random.key(2)
  factors = []
  for _ in range(cfg.num_layers):
    layer = {}
    for name in ("q_proj", "v_proj"):
      key, sub = jax.random.split(key)
      out = params["layers"][0]["self_attn"][name]["kernel"].shape[1]
      layer[name] = {"lora_a": jax.random.normal(sub, (cfg.hidden_size, bp.RANK)) / math.sqrt(bp.RANK),
                     "lora_b": jnp.zeros((bp.RANK, out))}
    factors.append(layer)
  tx = bp._adamw()

  def with_factors(params, factors):
    out = dict(params)
    out["layers"] = [
        {**lp, "self_attn": {**lp["self_attn"], **{n: {**lp["self_attn"][n], **f, "lora_scale": 1.0}
                                                  for n, f in fl.items()}}}
        for lp, fl in zip(params["layers"], factors)]
    return out

  def step(factors, opt_state, params, tokens):
    loss, grads = jax.value_and_grad(
        lambda f: _loss(llama.llama_forward(with_factors(params, f), tokens, cfg), tokens, False))(factors)
    updates, opt_state = tx.update(grads, opt_state, factors)
    return optax.apply_updates(factors, updates), opt_state, loss

  with _patched(llama, [("_dense", dense)]):
    return _compiled(step, factors, tx.init(factors), params, tokens)


def _matmul_only(params, cfg):
  """The step's matmuls alone: forward and input gradients of 30 layers' 7 kernels and the head."""
  import jax
  import jax.numpy as jnp

  group = cfg.num_heads // cfg.num_kv_heads
  weights = [{"q": lp["self_attn"]["q_proj"]["kernel"], "k": lp["self_attn"]["k_proj"]["kernel"],
              "v": lp["self_attn"]["v_proj"]["kernel"], "o": lp["self_attn"]["o_proj"]["kernel"],
              "g": lp["mlp"]["gate_proj"]["kernel"], "u": lp["mlp"]["up_proj"]["kernel"],
              "d": lp["mlp"]["down_proj"]["kernel"]} for lp in params["layers"]]
  embedding = params["embed_tokens"]["embedding"]
  h0 = jax.random.normal(jax.random.key(3), (bp.BATCH * bp.SEQ, cfg.hidden_size))
  cot = jax.random.normal(jax.random.key(4), (bp.BATCH * bp.SEQ, cfg.vocab_size))

  def f(h, weights, embedding):
    # elementwise maxima join the matmuls: values stay finite (a product of the MLP halves
    # overflows to inf/nan over 30 layers, and inf/nan arithmetic ran twice as slow), and XLA
    # cannot factor them the way it may factor a sum h @ a + h @ b into h @ (a + b)
    for w in weights:
      kv = jnp.tile(jnp.maximum(h @ w["k"], h @ w["v"]), (1, group))
      h = h + jnp.maximum(h @ w["q"], kv) @ w["o"]
      h = h + jnp.maximum(h @ w["g"], h @ w["u"]) @ w["d"]
    return jnp.sum((h @ embedding.T) * cot)

  # value and gradient, as a training step needs: the head's forward matmul is kept
  compiled = jax.jit(jax.value_and_grad(f)).lower(h0, weights, embedding).compile()
  _MATMUL_ONLY_FLOPS[0] = float(compiled.cost_analysis()["flops"])
  return lambda: float(compiled(h0, weights, embedding)[0])


#: XLA's FLOP count of the matmul-only program (set when it is compiled).
_MATMUL_ONLY_FLOPS = [float("nan")]


def _no_attention(q, k, v, allowed, config):
  import jax.numpy as jnp
  b, t, h, hd = q.shape
  kv = (k + v).reshape(b, t, -1)
  return q.reshape(b, t, h * hd) + jnp.repeat(kv, h // k.shape[2], axis=-1)


def _einsum_attention(q, k, v, allowed, config):
  """The attention the model had before the head-major matmuls (same math)."""
  import jax
  import jax.numpy as jnp
  batch, length, heads, hd = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / math.sqrt(hd))
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(batch, length, heads * hd)


def _write(results: dict, out: str) -> None:
  m = results["machine"]
  lines = [
      "Variants of jlora's LoRA training step (bench_peft.py's jax LoRA step: SmolLM2-135M shape, "
      f"{results['layers']} layers, batch {bp.BATCH} x {bp.SEQ}, r={bp.RANK} on q/v, float32, AdamW), "
      "interleaved in one process",
      f"machine: {m['cpu_model']}, {m['cpus_used']} of {m['cpus_online']} CPUs, threads "
      f"{results['threads']}",
      "versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
      f"{results['steps']} rounds after {results['warmup']} warm-up; speed vs current = median over "
      "rounds of (current step time / variant step time) in the same round",
      "",
  ]
  for name, r in results["variants"].items():
    lines.append(f"  {name:22s} median {r['median_s']:.3f} s/step   speed vs current "
                 f"{r['speed_vs_current']:.3f}x   first loss {r['first_loss']:.6g}   steps "
                 + ", ".join(f"{t:.2f}" for t in r["step_s"]))
  lines.append(f"  (matmul only: XLA counts {results['matmul_only_xla_gflop']:.1f} GFLOP in that program)")
  bp._save(out, results, lines)


if __name__ == "__main__":
  main()
