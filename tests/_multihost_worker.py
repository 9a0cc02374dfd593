"""One of the two JAX processes that tests/test_multihost.py starts (4 fake CPU devices each).

Usage: python tests/_multihost_worker.py --port P --process-id I --out DIR --mode train|restore

``train``: 2 LoRA steps of a tiny Llama on a (4, 2) mesh over both processes, then an
Orbax checkpoint written by both. ``restore``: a fresh pair restores it and takes step 3.
Process 0 writes the results as ``.npz`` (no pickle). Each process reads only its own
rows of every global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

BATCH = 8
SEQ = 8
PRESET = "fsdp_tp"
MESH = (4, 2)
LR = 1e-3


def model():
  """The tiny Llama, its LoRA tree and the loss, identical in every process."""
  import jax
  import jax.numpy as jnp

  import jlora
  from jlora.models.llama import LlamaConfig, init_llama, llama_forward

  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2)
  params = init_llama(cfg, jax.random.key(0))
  tree = jlora.wrap(params, {"layers/**/kernel": jlora.LoRA(4, alpha=8, stack_axes=1)},
                    key=jax.random.key(1))

  def loss_fn(p, batch):
    ids = batch["ids"]
    logits = llama_forward(p, ids[:, :-1], cfg)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

  return cfg, tree, loss_fn


def row(i: int) -> np.ndarray:
  """Row ``i`` of the data set, computed on its own (a process reads only its rows)."""
  return np.random.default_rng(1000 + i).integers(0, 64, SEQ + 1).astype(np.int32)


def rows(step: int, lo: int, hi: int) -> np.ndarray:
  return np.stack([row(step * BATCH + i) for i in range(lo, hi)])


def flat(tree) -> dict[str, np.ndarray]:
  import jax

  from jlora._paths import path_str
  return {path_str(kp): np.asarray(x) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--port", type=int, required=True)
  ap.add_argument("--process-id", type=int, required=True)
  ap.add_argument("--out", type=Path, required=True)
  ap.add_argument("--mode", choices=("train", "restore"), required=True)
  args = ap.parse_args()

  from jlora import distributed
  distributed.initialize(f"127.0.0.1:{args.port}", 2, args.process_id, cpu_collectives="gloo")

  import jax
  import optax
  import orbax.checkpoint as ocp

  from jlora import sharding
  from jlora.data import batches
  from jlora.train_step import make_train_step

  assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
  mesh = sharding.make_mesh(MESH, PRESET)
  _, tree, loss_fn = model()
  # XLA -O0: compiles faster on a busy CPU; code generation only, not the partitioning
  step = make_train_step(loss_fn, optax.adamw(LR), mesh=mesh, specs=PRESET,
                         compiler_options={"xla_backend_optimization_level": 0,
                                           "xla_llvm_disable_expensive_passes": True})
  state, frozen = step.init(tree)

  sl = distributed.process_rows(BATCH, mesh, step.batch_spec)
  # jlora.data.batches gives each process the same rows.
  index = next(iter(batches({"i": np.arange(BATCH)}, BATCH, shuffle=False,
                            process_index=jax.process_index(), process_count=2)))["i"]
  assert index.tolist() == list(range(sl.start, sl.stop)), (index, sl)

  ckpt = (args.out / "ckpt").resolve()
  checkpointer = ocp.StandardCheckpointer()
  info = {"process": jax.process_index(), "rows": [sl.start, sl.stop]}
  if args.mode == "restore":
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state = checkpointer.restore(ckpt / "2", abstract)
    restored = flat(distributed.to_host(state.trainable))
    info["restored_step"] = int(distributed.to_host(state.step))
    info["restored_opt_leaves"] = len(jax.tree.leaves(state.opt_state))
    q = state.trainable["layers"]["self_attn"]["q_proj"]["kernel"]
    info["restored_a_spec"] = str(q.a.sharding.spec)
    info["restored_b_spec"] = str(q.b.sharding.spec)
    steps = [2]
  else:
    restored = {}
    steps = [0, 1]

  losses = []
  for s in steps:
    local = {"ids": rows(s, sl.start, sl.stop)}
    state, metrics = step(state, frozen, local)
    losses.append(float(distributed.to_host(metrics["loss"])))
  trainable = flat(distributed.to_host(state.trainable))

  if args.mode == "train":
    checkpointer.save(ckpt / "2", state)
    checkpointer.wait_until_finished()
  distributed.sync("written")
  info["losses"] = losses
  (args.out / f"info_{args.mode}_{jax.process_index()}.json").write_text(json.dumps(info))
  if distributed.is_primary():
    np.savez(args.out / f"{args.mode}.npz", losses=np.asarray(losses),
             **{"t:" + k: v for k, v in trainable.items()},
             **{"r:" + k: v for k, v in restored.items()})
  distributed.sync("done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
