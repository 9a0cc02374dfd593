"""The training loop behind ``jlora train``: data -> model -> method -> AdamW -> metrics, checkpoints.

:func:`train` runs one job described by a :class:`jlora.config.Config`:

1. checks the config, loads and validates the data (a missing column, an
   empty split, an out-of-range label, an unknown target module are errors
   here, before any weights are loaded or any step runs);
2. loads the base model, wraps it for the method (``lora``: LoRA on
   ``method.targets``; ``full``: every parameter; ``bitfit``: every bias; plus
   ``method.train_also`` in full) and prints the trainable-parameter summary;
3. trains with :func:`jlora.train_step.make_train_step` (on one device, or on
   the ``train.mesh`` preset over every device): AdamW, linear warmup then
   cosine decay, global-norm clipping, gradient accumulation (a ``lax.scan``
   over micro-batches inside one jitted step; the loss is the exact mean over
   all examples / tokens of the step), optional bfloat16 compute and remat, a
   progress bar with loss, tokens/s and ETA, periodic validation, metrics to
   ``metrics.jsonl`` (and TensorBoard when ``tensorboardX`` is installed),
   :class:`jlora.CheckpointManager` checkpoints every ``save_every`` steps;
4. resumes from the newest checkpoint in ``output_dir`` (same result as an
   uninterrupted run, after Ctrl-C or SIGKILL: the data order, dropout keys and
   optimiser state are all restored), and on Ctrl-C finishes the current step,
   saves a checkpoint and returns cleanly (a second Ctrl-C aborts at once);
5. evaluates on validation and test, saves the adapter with
   :func:`jlora._checkpoint.save_adapters` to ``output_dir/adapter`` and writes
   ``results.json``.

The run directory::

  output_dir/config.yaml         the resolved config
  output_dir/metrics.jsonl       one JSON object per log / eval event
  output_dir/tensorboard/        TensorBoard event files (if tensorboardX)
  output_dir/checkpoints/N/      step N (jlora.CheckpointManager: adapters, optimiser, data position)
  output_dir/adapter/            the trained adapter (jlora.load_adapters)
  output_dir/results.json        final metrics, timings, parameter counts

:func:`load_run`, :func:`evaluate_run`, :func:`merge_run` and :func:`predict`
serve ``jlora eval``, ``jlora merge`` and ``jlora generate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora import _families, distributed
from jlora._manager import CheckpointManager
from jlora.train_step import TrainState, TrainStep, make_train_step
from jlora._errors import CheckpointError, ConfigError, DataError, ModelError
from jlora._paths import compile_pattern, path_str
from jlora.config import MODEL_NAMES, Config, config_from_dict, dump_config, validate

__all__ = [
    "TrainResult",
    "Run",
    "train",
    "load_run",
    "load_runs",
    "evaluate_run",
    "merge_run",
    "predict",
    "build_rules",
]

_IGNORE = -100
_BUCKET_MULTIPLE = 16
_BUCKET_WINDOW = 64  # batches per sorting window
_UNROLL_LAYERS = 64  # encoder layers run unrolled (up to this many)
_MAX_PACKED_SHAPES = 4  # row counts a packed classification run compiles for


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns (also written to ``output_dir/results.json``).

  Attributes:
    output_dir: the run directory.
    adapter_dir: where the trained adapter was saved (None if interrupted).
    step: optimiser steps done.
    total_steps: steps planned.
    interrupted: True when Ctrl-C stopped the run (a checkpoint was saved).
    metrics: ``{"validation": {...}, "test": {...}}`` final evaluations.
    trainable_params: trainable parameter count.
    total_params: all parameters (base + adapters).
    adapter_bytes: size on disk of the saved adapter directory.
    train_seconds: wall time of the training steps (compile included).
    wall_seconds: wall time of the whole call.
  """

  output_dir: Path
  adapter_dir: Path | None
  step: int
  total_steps: int
  interrupted: bool
  metrics: dict[str, dict[str, float]]
  trainable_params: int
  total_params: int
  adapter_bytes: int
  train_seconds: float
  wall_seconds: float


@dataclasses.dataclass
class Run:
  """A loaded model with its (optional) trained adapter, as :func:`load_run` returns it.

  Attributes:
    config: the job's config.
    family: ``"bert"`` or ``"llama"``.
    tree: the wrapped params (adapters restored), or plain params for a base model.
    tokenizer: the model's tokenizer.
    model: the family-specific model handle (a Flax module or a LlamaConfig).
    forward: ``forward(params, batch, deterministic, rng) -> logits`` on plain params.
  """

  config: Config
  family: str
  tree: Any
  tokenizer: Any
  model: Any
  forward: Callable[..., jax.Array]


def train(cfg: Config, *, log: Callable[[str], None] = print,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
  """Runs the training job ``cfg`` to the end (or to Ctrl-C) and returns its results.

  The loop is a composition of the library's parts: the model from
  :func:`jlora.models.resolve` and its family's loader, ``jlora.wrap`` with
  :func:`build_rules`, :func:`jlora.train_step.make_train_step` (on
  ``train.mesh``), :class:`jlora.CheckpointManager` (``output_dir/checkpoints``,
  which a Python script can restore too) and ``jlora.data``'s orders and packing.

  Args:
    cfg: the job (see :mod:`jlora.config`).
    log: where human-readable lines go (the summary, evaluations, paths).
    on_step: optional callback ``(step, metrics)`` after every optimiser step.

  Returns:
    A :class:`TrainResult`.

  Raises:
    ConfigError: bad config values, an unknown target / module, a method that
      does not fit the model or task, a batch the mesh cannot split.
    DataError: a missing column, an empty dataset, out-of-range labels.
    ModelError: the model cannot be loaded.
    CheckpointError: ``output_dir`` holds a checkpoint of a different job.

  Example:
    >>> from jlora.config import load_config
    >>> from jlora.train import train
    >>> result = train(load_config())  # doctest: +SKIP
    >>> result.metrics["test"]["accuracy"]  # doctest: +SKIP
    0.83...
  """
  t_start = time.perf_counter()
  primary = distributed.is_primary()  # several processes (jax.distributed): process 0 writes
  if not primary:
    log = _silent
  if jax.process_count() > 1 and cfg.train.mesh == "none":
    raise ConfigError(
        f"this run has {jax.process_count()} processes (jax.distributed) but train.mesh=none, which "
        "trains on one device; pick a preset that spans them all: train.mesh=dp (or fsdp, tp, "
        "fsdp_tp)")
  job = _prepare(cfg)  # data first: every data error comes before any weights load
  out, tc = Path(cfg.output_dir), cfg.train
  tree = jlora.wrap(job.model.params, build_rules(cfg, job.model.params, job.family,
                                                  total_steps=job.total_steps),
                    key=jax.random.key(tc.seed))
  tree = _add_learned_input(cfg, tree, job)
  summary = jlora.summary(tree)
  mesh = _make_mesh(cfg)
  step_fn = make_train_step(_loss_fn(cfg, job.model), _make_optimizer(cfg, job.total_steps),
                            mesh=mesh, specs=tc.mesh if mesh is not None else "dp",
                            accum_steps=tc.grad_accum, lift=False)
  rows_multiple = _check_mesh_batch(cfg, step_fn)
  state, frozen = step_fn.init(tree)
  del tree
  mgr, state, pos, resumed = _open_checkpoints(cfg, out, step_fn, state, frozen)
  if primary:
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
  logger = _MetricsLogger(out, tensorboard=tc.tensorboard, append=resumed is not None,
                          enabled=primary)
  log(f"jlora train: {cfg.method.name} on {cfg.model.name} ({job.family}), task {cfg.data.task}, "
      f"data {job.data_info}")
  log(str(summary))
  log(f"{job.n_train} training rows, batch {tc.batch_size} ({tc.grad_accum} x "
      f"{tc.batch_size // tc.grad_accum}), {job.total_steps} steps "
      f"({job.total_steps / job.steps_per_epoch:.2f} epochs), lr {tc.lr:g}, output {out}"
      + (f", mesh {tc.mesh} {dict(mesh.shape)}" if mesh is not None else ""))
  if resumed is not None:
    log(f"resuming from {mgr.directory / str(resumed)} (step {resumed})")
  packer = None
  if _packs(cfg, job.family):
    packer = _Packer(cfg, job.feats["train"], job.total_steps, multiple=rows_multiple)
    log(f"packed batches: {tc.batch_size} sentences in {packer.buckets} rows of "
        f"{cfg.data.max_length} tokens ({packer.efficiency:.0%} of the positions are real "
        "tokens)")
  eval_fn = _make_eval_fn(cfg, job.model)
  t_train = time.perf_counter()
  try:
    state, pos, interrupted, last = _fit(cfg, job, step_fn, state, frozen, pos, packer, mgr,
                                         eval_fn, logger, on_step)
  except BaseException:
    mgr.close()
    logger.close()
    raise
  train_seconds = time.perf_counter() - t_train
  step = _int(state.step)
  _save(mgr, step, state, frozen, pos, force=True)
  mgr.close()  # waits for the background writes
  if interrupted:
    log(f"interrupted at step {step}/{job.total_steps}: checkpoint saved to "
        f"{mgr.directory / str(step)}; run the same command again to resume.")
    logger.close()
    return TrainResult(out, None, step, job.total_steps, True, {}, summary.trainable,
                       summary.total, 0, train_seconds, time.perf_counter() - t_start)
  results = _final_eval(cfg, job, eval_fn, state.trainable, frozen, logger, step, log)
  trained = state.trainable
  if cfg.method.name == "adalora":  # the final rank pattern into the specs (and the saved adapter)
    trained, frozen = jlora.split(jlora.apply_rank_pattern(jlora.combine(trained, frozen),
                                                           state.opt_state))
    results["adalora"] = _rank_report(trained)
    log(f"AdaLoRA: {results['adalora']['kept_ranks']} of {results['adalora']['initial_ranks']} ranks "
        f"kept (target {results['adalora']['target_ranks']})")
  adapter_dir, adapter_bytes = _save_adapter(cfg, out, trained, frozen, step, job.num_labels)
  wall = time.perf_counter() - t_start
  if not primary:
    logger.close()
    return TrainResult(out, adapter_dir, step, job.total_steps, False, results, summary.trainable,
                       summary.total, adapter_bytes, train_seconds, wall)
  (out / "results.json").write_text(json.dumps({
      "method": cfg.method.name, "model": cfg.model.name, "task": cfg.data.task,
      "steps": step, "total_steps": job.total_steps, "train_rows": job.n_train,
      "trainable_params": summary.trainable, "total_params": summary.total,
      "trainable_percent": summary.trainable_percent, "adapter_bytes": adapter_bytes,
      "train_seconds": train_seconds, "wall_seconds": wall, "tokens_seen": pos["tokens"],
      "num_labels": job.num_labels, "metrics": results, "last_train": last,
      "adapter_dir": str(adapter_dir), "resumed_from": resumed,
      "mesh": {"preset": tc.mesh, "shape": dict(mesh.shape)} if mesh is not None else None,
      "processes": jax.process_count(),
  }, indent=2) + "\n")
  logger.close()
  if "test" in results:
    key = "accuracy" if "accuracy" in results["test"] else "perplexity"
    log(f"test {key}: {results['test'][key]:.4f}")
  log(f"adapter saved to {adapter_dir} ({adapter_bytes / 1e6:.2f} MB); "
      f"trained {step} steps in {train_seconds:.0f}s, total {wall:.0f}s")
  return TrainResult(out, adapter_dir, step, job.total_steps, False, results, summary.trainable,
                     summary.total, adapter_bytes, train_seconds, wall)


@dataclasses.dataclass
class _Job:
  """What a job needs before it trains: the data (encoded, validated) and the base model."""

  family: str
  feats: dict[str, dict[str, np.ndarray]]
  num_labels: int | None
  data_info: str
  n_train: int
  steps_per_epoch: int
  total_steps: int
  model: _Model


def _prepare(cfg: Config) -> _Job:
  validate(cfg)
  family = _family_of(cfg.model.name)
  _check_family_task(family, cfg)
  tokenizer = _load_tokenizer(cfg.model.name, family)
  feats, num_labels, data_info = _encode_splits(cfg, _load_raw_data(cfg), tokenizer)
  tc = cfg.train
  n_train = len(next(iter(feats["train"].values())))
  if n_train < tc.batch_size:
    raise DataError(
        f"the training split has {n_train} rows, fewer than one batch of train.batch_size="
        f"{tc.batch_size}; lower train.batch_size or add data.")
  steps_per_epoch = n_train // tc.batch_size
  total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
  return _Job(family, feats, num_labels, data_info, n_train, steps_per_epoch, total_steps,
              _load_model(cfg, family, num_labels, tokenizer))


def _make_mesh(cfg: Config):
  if cfg.train.mesh == "none":
    return None
  from jlora import sharding  # noqa: PLC0415
  shape = cfg.train.mesh_shape or [-1]
  return sharding.make_mesh(shape, cfg.train.mesh)


def _check_mesh_batch(cfg: Config, step_fn: TrainStep) -> int:
  """The row multiple every micro-batch needs on the mesh (1 without one); bad sizes are errors."""
  if step_fn.mesh is None:
    return 1
  from jlora.train_step import _axes_size  # noqa: PLC0415
  n = _axes_size(step_fn.mesh, step_fn.batch_spec)
  tc = cfg.train
  if (tc.batch_size // tc.grad_accum) % n:
    raise ConfigError(
        f"train.mesh={tc.mesh} splits each micro-batch over {n} devices, but a micro-batch has "
        f"{tc.batch_size // tc.grad_accum} rows (train.batch_size={tc.batch_size} / "
        f"train.grad_accum={tc.grad_accum}); use a batch_size that is a multiple of "
        f"{n * tc.grad_accum}.")
  return n


def _loss_fn(cfg: Config, model: _Model) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """``loss(tree, batch, key) -> (summed loss, count)`` on the wrapped tree (the step's loss)."""
  task = cfg.data.task
  forward = jlora.lora(model.forward)
  lora_dropout = cfg.method.name in ("lora", "dora", "vera", "adalora") and cfg.method.dropout > 0

  def loss(tree, batch, key):
    # the model's own dropout uses key; LoRA dropout on the low-rank path's input gets an
    # independent key derived from it (jlora.lora applies dropout only given lora_key)
    kwargs = {"lora_key": jax.random.fold_in(key, LORA_DROPOUT_SALT)} if lora_dropout else {}
    return _loss_sum(task, forward(tree, batch, False, key, **kwargs), batch)

  return loss


def _open_checkpoints(cfg: Config, out: Path, step_fn: TrainStep, state: TrainState, frozen: Any):
  """The run's CheckpointManager and, with ``resume``, the state restored from its latest step."""
  root = out / "checkpoints"
  if not cfg.resume and root.exists() and distributed.is_primary():
    shutil.rmtree(root)
  distributed.sync("jlora-train-checkpoints")
  _refuse_old_checkpoints(root)
  mgr = CheckpointManager(root, max_to_keep=cfg.train.keep_last)
  pos = {"epoch": 0, "position": 0, "best": None, "tokens": 0}
  latest = mgr.latest_step() if cfg.resume else None
  if latest is None:
    return mgr, state, pos, None
  _check_same_job(out / "config.yaml", cfg)
  r = mgr.restore(_host_tree(jlora.combine(state.trainable, frozen)), _host_tree(state.opt_state))
  trainable = _split_any(r.tree)[0] if frozen is not None else r.tree
  trainable = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), trainable,
                           state.trainable)
  step = jax.device_put(np.int32(r.step), state.step.sharding)
  pos.update(r.data_state or {})
  return mgr, TrainState(step, trainable, r.opt_state), pos, r.step


def _refuse_old_checkpoints(root: Path) -> None:
  old = sorted(root.glob("step_*")) if root.is_dir() else []
  if old:
    raise CheckpointError(
        f"{root} holds checkpoints of jlora < 0.3 ({old[-1].name}: safetensors + state.json), "
        "which this version does not resume; use another output_dir, or resume=false to start "
        "over.")


def _save(mgr: CheckpointManager, step: int, state: TrainState, frozen: Any, pos: dict,
          force: bool = False) -> None:
  tree = state.trainable if frozen is None else jlora.combine(state.trainable, frozen)
  if force:
    mgr.wait_until_finished()
    if step in mgr.all_steps():  # a periodic save of this very step already ran
      return
  mgr.save(step, _host_tree(tree), _host_tree(state.opt_state), data_state=dict(pos), force=force)


def _host_tree(tree: Any) -> Any:
  """Several processes: every array gathered to numpy in each (the checkpoint writes host data);
  one process: the tree itself (the manager copies it to the host)."""
  return distributed.to_host(tree) if jax.process_count() > 1 else tree


def _int(x) -> int:
  return int(distributed.to_host(x)) if jax.process_count() > 1 else int(x)


def _local_rows(batch: Any, step_fn: TrainStep) -> Any:
  """Several processes: this process's rows of the global batch (the step assembles them)."""
  if jax.process_count() == 1 or step_fn.mesh is None:
    return batch
  def mine(x):  # each leaf by its own leading size (packed rows, sentence labels)
    if not np.ndim(x):
      return x
    return x[distributed.process_rows(np.shape(x)[0], step_fn.mesh, step_fn.batch_spec)]
  return jax.tree.map(mine, batch)


def _silent(*args: Any, **kwargs: Any) -> None:
  return None


def _fit(cfg, job, step_fn, state, frozen, pos, packer, mgr, eval_fn, logger, on_step):
  """The loop: batches -> step -> logs, evaluations, checkpoints; stops at the end or Ctrl-C."""
  tc = cfg.train
  schedule = _schedule(cfg, job.total_steps)
  step = start = _int(state.step)
  bar = None
  last: dict[str, float] = {}
  interrupted = False
  with _Stopper() as stopper:
    try:
      if tc.progress:
        from tqdm.auto import tqdm  # noqa: PLC0415
        bar = tqdm(total=job.total_steps, initial=start, desc="train", unit="step",
                   dynamic_ncols=True, file=sys.stderr)
      rate_t, rate_tokens = time.perf_counter(), 0
      while step < job.total_steps and not stopper.requested:
        it = _train_batches(cfg, job.feats["train"], pos["epoch"], pos["position"],
                            packed=packer is not None)
        for batch in it:
          n_tok = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
          rng = jax.random.fold_in(jax.random.key(tc.seed + 1), step)
          state, m = step_fn(state, frozen, _local_rows(packer(batch) if packer is not None else batch,
                                                        step_fn), rng)
          step += 1
          pos["position"] = it.position
          pos["tokens"] += n_tok
          rate_tokens += n_tok
          if step % tc.log_every == 0 or step == job.total_steps or step == start + 1:
            now = time.perf_counter()
            m = {k: float(v) for k, v in distributed.to_host(m).items() if k != "weight"}
            m.update(lr=float(schedule(step - 1)),
                     tokens_per_s=rate_tokens / max(now - rate_t, 1e-9),
                     epoch=pos["epoch"] + pos["position"] / max(it.num_batches, 1))
            rate_t, rate_tokens = now, 0
            last = m
            logger.write(step, "train", m)
            if bar is not None:
              bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
          if on_step is not None:
            on_step(step, {k: float(v) for k, v in distributed.to_host(m).items()})
          if bar is not None:
            bar.update(1)
          if tc.eval_every and step % tc.eval_every == 0 and step < job.total_steps:
            metrics = _evaluate(eval_fn, state.trainable, frozen, job.feats["validation"], cfg)
            logger.write(step, "validation", metrics)
            pos["best"] = _better(pos["best"], metrics, cfg)
          if tc.save_every and step % tc.save_every == 0 and step < job.total_steps:
            _save(mgr, step, state, frozen, pos)
          if stopper.requested or step >= job.total_steps:
            break
        if pos["position"] >= it.num_batches:
          pos["epoch"], pos["position"] = pos["epoch"] + 1, 0
      interrupted = stopper.requested and step < job.total_steps
    except KeyboardInterrupt:  # a second Ctrl-C: stop now (the state is the last step's)
      interrupted = True
    finally:
      if bar is not None:
        bar.close()
  return state, pos, interrupted, last


def _final_eval(cfg, job, eval_fn, trainable, frozen, logger, step, log) -> dict:
  results: dict[str, dict[str, float]] = {}
  for split in ("validation", "test"):
    if split in job.feats:
      t0 = time.perf_counter()
      results[split] = _evaluate(eval_fn, trainable, frozen, job.feats[split], cfg)
      results[split]["eval_seconds"] = time.perf_counter() - t0
      logger.write(step, split, results[split])
      log(f"{split}: " + _fmt_metrics(results[split]))
  return results


def _save_adapter(cfg, out, trainable, frozen, step, num_labels) -> tuple[Path, int]:
  from jlora._checkpoint import save_adapters  # noqa: PLC0415
  adapter_dir = out / "adapter"
  tree = trainable if frozen is None else jlora.combine(trainable, frozen)
  host_tree = distributed.to_host(tree)  # numpy: fast fingerprint (gathered across processes)
  if distributed.is_primary():
    save_adapters(adapter_dir, host_tree, overwrite=True,
                  metadata={"method": cfg.method.name, "model": cfg.model.name, "step": step,
                            "num_labels": num_labels})
  distributed.sync("jlora-train-adapter")
  return adapter_dir, _dir_bytes(adapter_dir)


def _add_learned_input(cfg: Config, tree: Any, job: _Job) -> Any:
  """``method=prompt|prefix``: the soft prompt / prefix put in the (wrapped) tree."""
  me, key = cfg.method, jax.random.fold_in(jax.random.key(cfg.train.seed), 0x50)
  if me.name == "prompt":
    return jlora.add_prompt(tree, jlora.PromptTuning(me.num_virtual_tokens), key=key)
  if me.name == "prefix":
    spec = jlora.PrefixTuning(me.num_virtual_tokens, projection=me.prefix_projection or None)
    return jlora.add_prefix(tree, spec, key=key, config=job.model.handle)
  return tree


def _rank_report(tree: Any) -> dict:
  """AdaLoRA's final budget: kept / initial / target ranks, and the kept ranks per module."""
  per, initial, target = {}, 0, 0
  for path, x in jlora.adapted_leaves(tree):
    if isinstance(x, jlora.AdaLoraWeight):
      rows = x.spec.rank_pattern or ((True,) * x.rank,) * max(int(np.prod(x.e.shape[:-1])), 1)
      per[path] = [int(sum(r)) for r in rows]
      initial += x.rank * len(rows)
      target += x.spec.target_r * len(rows)
  return {"kept_ranks": sum(map(sum, per.values())), "initial_ranks": initial,
          "target_ranks": target, "per_module": per}


def build_rules(cfg: Config, params: Any, family: str, *,
                total_steps: int | None = None) -> list[tuple[str, Any]]:
  """The ``jlora.wrap`` rules for ``cfg.method`` on ``params``.

  ``lora`` / ``dora`` / ``vera`` / ``ia3`` / ``adalora`` / ``adapter``: that method's spec for every
  ``kernel`` whose module matches a target (stacked layers get
  ``stack_axes=1``; for ``ia3`` the ``method.feedforward`` targets scale their
  inputs); ``full``: ``Full`` on every float
  leaf; ``bitfit``: ``Full`` on every ``bias``. ``method.train_also`` modules
  are trained in full with any method.

  Args:
    cfg: the job.
    params: the base params.
    family: ``"bert"`` or ``"llama"``.
    total_steps: the run's optimizer steps (AdaLoRA's schedule needs them;
      ``None``: an AdaLoRA spec without a schedule, for inference).

  Returns:
    A list of ``(pattern, spec)`` rules.

  Raises:
    ConfigError: a target or train_also entry matches no module (the message
      lists the closest module names), or BitFit on a model without biases.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.config import Config, apply_overrides
    >>> params = {"layers": {"query": {"kernel": jnp.zeros((2, 4, 4))},
    ...                      "value": {"kernel": jnp.zeros((2, 4, 4))}},
    ...           "classifier": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)}}
    >>> [r for r, _ in build_rules(Config(), params, "bert")]
    ['layers/query/kernel', 'layers/value/kernel', 'classifier/bias', 'classifier/kernel']
  """
  me = cfg.method
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=jlora.is_quantized)[0]
  paths = [path_str(kp) for kp, _ in flat]
  leaves = dict(zip(paths, (x for _, x in flat)))
  modules = sorted({p.rsplit("/", 1)[0] for p in paths if "/" in p})
  rules: list[tuple[str, Any]] = []
  also = _train_also(cfg)
  also_paths: list[str] = []
  for name in also:
    hit = [p for p in paths if "/" in p and _module_matches(name, p.rsplit("/", 1)[0])]
    if not hit:
      _no_module("method.train_also", name, modules)
    also_paths += [p for p in hit if p not in also_paths]
  if me.name in ADAPTER_METHODS:
    targets = me.targets if me.targets is not None else _default_targets(family, me.name, me.placement)
    feedforward = me.feedforward if me.feedforward is not None else _default_feedforward(family)
    for name in targets:
      hit = [p for p in paths if p.endswith("/kernel")
             and _module_matches(name, p.rsplit("/", 1)[0]) and p not in also_paths]
      if not hit:
        _no_module("method.targets", name, [m for m in modules if m + "/kernel" in leaves])
      for p in hit:
        stack = 1 if p.startswith("layers/") else None
        ff = any(_module_matches(f, p.rsplit("/", 1)[0]) for f in feedforward)
        spec = _method_spec(me, stack, ff, total_steps)
        if p not in (r for r, _ in rules):
          rules.append((p, spec))
  elif me.name in ("prompt", "prefix"):  # no kernel rules: train() adds the prompt / prefix
    pass
  elif me.name == "full":
    rules += [(p, jlora.Full()) for p in paths
              if p not in also_paths and jnp.issubdtype(leaves[p].dtype, jnp.floating)]
  elif me.name == "bitfit":
    biases = [p for p in paths if p.endswith("/bias") and p not in also_paths]
    if not biases:
      raise ConfigError(
          f"method.name=bitfit trains biases, but {cfg.model.name} has no bias parameters; "
          "use method.name=lora or full.")
    rules += [(p, jlora.Full()) for p in biases]
  rules += [(p, jlora.Full()) for p in also_paths]
  return [(_literal(p), s) for p, s in rules]


def load_run(run_dir: str | os.PathLike | None = None, *, cfg: Config | None = None,
             base: bool = False) -> Run:
  """Loads a finished run's base model and adapter (or only the base model).

  Args:
    run_dir: a directory written by :func:`train` (``config.yaml`` + ``adapter/``).
    cfg: a config instead of a run directory (then ``base`` must be True, or the
      config's ``output_dir`` must hold an adapter).
    base: load the base model without the adapter.

  Returns:
    A :class:`Run`.

  Raises:
    CheckpointError: no config or adapter in ``run_dir``.
    ModelError: the base model cannot be loaded.

  Example:
    >>> from jlora.train import load_run
    >>> run = load_run("runs/minilm-sentiment")  # doctest: +SKIP
  """
  if cfg is None:
    if run_dir is None:
      raise ConfigError("load_run needs a run directory or a config.")
    cfg = _run_config(Path(run_dir))
  elif run_dir is None:
    run_dir = cfg.output_dir
  family = _family_of(cfg.model.name)
  num_labels = None
  adapter = Path(run_dir) / "adapter"
  if not base:
    if not (adapter / "jlora_adapters.json").exists():
      raise CheckpointError(
          f"{adapter} holds no adapter; train first (jlora train) or pass --base to use the "
          "base model alone.")
    from jlora._checkpoint import read_adapter_manifest  # noqa: PLC0415
    meta = read_adapter_manifest(adapter).get("metadata") or {}
    num_labels = meta.get("num_labels")
  if cfg.data.task == "classification" and num_labels is None:
    num_labels = cfg.data.num_labels or 2
  model = _load_model(cfg, family, num_labels)
  if base:
    tree = model.params
  else:
    from jlora._checkpoint import load_adapters  # noqa: PLC0415
    tree = load_adapters(adapter, jax.tree.map(np.asarray, model.params))
  return Run(cfg, family, tree, model.tokenizer, model.handle, model.forward)


def load_runs(run_dirs: list[str | os.PathLike], *, names: list[str] | None = None) -> Run:
  """Loads several finished runs of one base model as one :class:`Run` with stacked adapters.

  The runs must share the model and the task; their adapters are stacked with
  :func:`jlora.stack_adapters` (named after the run folders unless ``names`` is
  given), so :func:`predict` and :func:`evaluate_run` can route each row to its
  own adapter (``adapter_ids``) in one batch. Leaves trained in full (a
  classifier head) must be equal in every run: a mixed batch routes only LoRA
  factors.

  Raises:
    ConfigError: fewer than two runs, or runs of different models or tasks.
    TreeError: the adapters cannot be stacked (different rules, different heads).

  Example:
    >>> from jlora.train import load_runs, predict
    >>> run = load_runs(["runs/a", "runs/b"])  # doctest: +SKIP
    >>> predict(run, ["hi", "hello"], adapter_ids=[0, 1])  # doctest: +SKIP
  """
  dirs = [Path(d) for d in run_dirs]
  if len(dirs) < 2:
    raise ConfigError("load_runs needs at least two run directories (use load_run for one).")
  first = load_run(dirs[0])
  trees = [first.tree]
  for d in dirs[1:]:
    cfg = _run_config(d)
    if (cfg.model.name, cfg.data.task) != (first.config.model.name, first.config.data.task):
      raise ConfigError(
          f"{d} trained {cfg.model.name} for {cfg.data.task}, but {dirs[0]} trained "
          f"{first.config.model.name} for {first.config.data.task}; several adapters share one "
          "base model and task")
    from jlora._checkpoint import load_adapters  # noqa: PLC0415
    trees.append(load_adapters(d / "adapter", _base_of(first.tree)))
  if names is None:
    names = [d.resolve().name for d in dirs]
    if len(set(names)) != len(names):
      names = [f"{n}-{i}" for i, n in enumerate(names)]
  first.tree = jlora.stack_adapters(trees, names=names)
  return first


def _base_of(tree: Any) -> Any:
  """The plain base params of a wrapped tree (each adapted leaf's ``w``)."""
  return jax.tree.map(lambda x: x.w if jlora.is_adapted(x) else x, tree, is_leaf=jlora.is_adapted)


def _stacked(run: Run) -> bool:
  return any(isinstance(x, jlora.StackedLoraWeight)
             for x in jax.tree.leaves(run.tree, is_leaf=jlora.is_adapted))


def _adapter_index(run: Run, ids: Any, what: str) -> np.ndarray:
  """Adapter ids as ints: indices, run / adapter names, or -1 / "base" for the base alone."""
  names = jlora.adapter_names(run.tree)
  out = []
  for v in ids:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
      out.append(int(v))
    elif str(v).strip() in names:
      out.append(names.index(str(v).strip()))
    elif str(v).strip() in ("base", "-1"):
      out.append(-1)
    elif str(v).strip().isdigit():
      out.append(int(str(v).strip()))
    else:
      raise DataError(f"{what}: {v!r} names no adapter; use an index 0..{len(names) - 1}, one of "
                      f"{list(names)}, or -1 / 'base' for the base model alone")
  arr = np.asarray(out, np.int32)
  bad = (arr < -1) | (arr >= len(names))
  if bad.any():
    raise DataError(f"{what}: adapter ids {arr[bad][:5].tolist()} are out of range for the "
                    f"{len(names)} adapters {list(names)}")
  return arr


def evaluate_run(run: Run, split: str = "test", *, data_overrides: Mapping[str, Any] | None = None,
                 adapter_column: str | None = None, adapter: int | str | None = None
                 ) -> dict[str, float]:
  """Evaluates a loaded run on one split of its data (or other data).

  Args:
    run: from :func:`load_run` (or :func:`load_runs`: stacked adapters).
    split: ``"train"``, ``"validation"`` or ``"test"``.
    data_overrides: replace ``data`` config keys (e.g. ``{"domain": "nyt"}``) to
      evaluate on other data with the same task.
    adapter_column: stacked runs: the data column naming each row's adapter (an
      index, an adapter name, or -1 / ``base``); the rows are routed in one pass.
    adapter: stacked runs without ``adapter_column``: the adapter every row uses.

  Returns:
    Classification: ``loss``, ``accuracy``, ``f1``, ``roc_auc`` (binary);
    language modelling: ``loss`` (mean token NLL), ``perplexity``, ``tokens``.

  Raises:
    ConfigError: unknown split or data key.
    DataError: the split is missing or bad.

  Example:
    >>> from jlora.train import load_run, evaluate_run
    >>> evaluate_run(load_run("runs/minilm-sentiment"))["accuracy"]  # doctest: +SKIP
    0.81...
  """
  if split not in ("train", "validation", "test"):
    raise ConfigError(f"split must be train, validation or test, got {split!r}.")
  cfg = run.config
  if data_overrides:
    d = dataclasses.asdict(cfg)
    d["data"].update(data_overrides)
    cfg = config_from_dict(d)
  raw = _load_raw_data(cfg, splits=(split,))
  feats, _, _ = _encode_splits(cfg, raw, run.tokenizer, splits=(split,))
  if split not in feats:
    raise DataError(f"the data has no {split!r} split.")
  if _stacked(run):
    n = len(next(iter(feats[split].values())))
    if adapter_column is not None:
      ds = raw[split]
      if adapter_column not in ds.column_names:
        raise DataError(f"the {split} data has no column {adapter_column!r} (its columns: "
                        f"{ds.column_names})")
      if len(ds) != n or cfg.data.max_eval_examples:
        raise ConfigError(
            f"the adapter column needs one encoded row per data row; the {cfg.data.task} encoding "
            f"gave {n} rows for {len(ds)} (set data.pack=false and data.max_eval_examples=0)")
      ids = _adapter_index(run, list(ds[adapter_column]), f"column {adapter_column!r}")
    else:
      if adapter is None:
        raise ConfigError(f"the run holds adapters {list(jlora.adapter_names(run.tree))}: pass "
                          "adapter_column (a data column) or adapter (one for every row)")
      ids = np.full((n,), _adapter_index(run, [adapter], "adapter")[0], np.int32)
    feats[split] = {**feats[split], "adapter_ids": ids}
  elif adapter_column is not None or adapter is not None:
    raise ConfigError("adapter_column / adapter need a run with several adapters (load_runs)")
  model = _Model(run.family, None, run.tokenizer, run.model, run.forward)
  eval_fn = _make_eval_fn(cfg, model)
  trainable, frozen = _split_any(run.tree)
  return _evaluate(eval_fn, trainable, frozen, feats[split], cfg)


def merge_run(run: Run, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
  """Folds the adapter into the base weights and writes a Hugging Face model directory.

  BERT runs are written with :func:`jlora.models.bert.save_bert_hf`
  (``pooling=cls`` classifiers load as transformers' BertForSequenceClassification;
  a ``pooling=mean`` classifier has no transformers class, so its encoder is
  written as BertModel and the head as ``classifier.safetensors`` beside it),
  Llama runs with :func:`jlora.models.llama_io.save_llama`.

  Args:
    run: from :func:`load_run`.
    out_dir: the directory to write.
    overwrite: replace an existing directory.

  Returns:
    The written directory.

  Raises:
    ModelError: ``out_dir`` exists (without ``overwrite``) or the params do not fit.

  Example:
    >>> from jlora.train import load_run, merge_run
    >>> merge_run(load_run("runs/minilm-sentiment"), "merged/")  # doctest: +SKIP
  """
  out = Path(out_dir)
  merged = jlora.merge(run.tree)
  if isinstance(merged, dict) and ({"prompt", "prefix"} & set(merged)):
    raise ConfigError("a soft prompt / prefix is an input, not a weight: it cannot be merged into "
                      "the model. Use the run as it is (jlora eval / generate), or export it with "
                      "jlora.save_peft for PEFT.")
  merged = jax.tree.map(np.asarray, merged)
  if run.family == "bert":
    from jlora.models.bert import save_bert_hf  # noqa: PLC0415
    if "classifier" in merged and run.model.config.pooling != "cls":
      head = merged.pop("classifier")
      save_bert_hf(run.model.config, merged, run.tokenizer, out, overwrite=overwrite)
      from safetensors.numpy import save_file  # noqa: PLC0415
      save_file({"kernel": np.ascontiguousarray(head["kernel"]), "bias": head["bias"]},
                str(out / "classifier.safetensors"),
                metadata={"pooling": "mean", "note": "logits = mean_pool(hidden) @ kernel + bias"})
    else:
      save_bert_hf(run.model.config, merged, run.tokenizer, out, overwrite=overwrite)
  else:
    save_llama = _llama_io().save_llama
    save_llama(out, merged, run.model, tokenizer=run.tokenizer, overwrite=overwrite)
  return out


def predict(run: Run, texts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
            top_p: float | None = None, chat: bool | None = None, seed: int = 0,
            adapter_ids: list[int | str] | None = None) -> list[dict[str, Any]]:
  """Runs a loaded model on texts: class probabilities (classifier) or generated text (decoder).

  Args:
    run: from :func:`load_run`.
    texts: the inputs.
    max_new_tokens: decoder: tokens to generate at most.
    temperature: decoder: 0 for greedy decoding.
    top_p: decoder: nucleus sampling threshold.
    chat: decoder: wrap each text in the chat template (None: for instruction
      runs and instruct models with a template).
    seed: sampling seed.
    adapter_ids: stacked runs (:func:`load_runs`): each text's adapter (index, name, or
      -1 / ``base``), all run in one batch.

  Returns:
    One dict per text: ``{"text", "label", "probs"}`` or ``{"text", "output"}``.

  Example:
    >>> from jlora.train import load_run, predict
    >>> predict(load_run("runs/minilm-sentiment"), ["a gem"])[0]["label"]  # doctest: +SKIP
    1
  """
  if not texts:
    raise DataError("predict got no texts.")
  ids = None
  if _stacked(run):
    if adapter_ids is None or len(adapter_ids) != len(texts):
      raise DataError(f"the run holds adapters {list(jlora.adapter_names(run.tree))}: give one "
                      f"adapter id per text ({len(texts)} texts, "
                      f"{0 if adapter_ids is None else len(adapter_ids)} ids)")
    ids = _adapter_index(run, adapter_ids, "adapter_ids")
    params = run.tree  # run through jlora.lora, each row with its own adapter
  elif adapter_ids is not None:
    raise DataError("adapter_ids needs a run with several adapters (load_runs)")
  elif _unmergeable(run.tree):
    params = run.tree  # bottleneck adapters: run through jlora.lora, never merged
  else:
    params = jlora.merge(run.tree)
  if run.family == "bert" and run.config.data.task == "classification":
    enc = run.tokenizer(list(texts), truncation=True, max_length=run.config.data.max_length,
                        padding=True, return_tensors="np")
    batch = {k: jnp.asarray(v) for k, v in enc.items()}
    if params is run.tree:  # stacked or bottleneck adapters: through jlora.lora, unmerged
      kw = {} if ids is None else {"adapter_ids": jnp.asarray(ids)}
      logits = jlora.lora(run.forward)(params, batch, True, None, **kw)
    else:
      logits = run.forward(params, batch, True, None)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    return [{"text": t, "label": int(p.argmax()), "probs": [float(x) for x in p]}
            for t, p in zip(texts, probs)]
  if run.family != "llama":
    raise ConfigError("generation needs a decoder (Llama-family) model.")
  from jlora.generate import generate_text  # noqa: PLC0415
  if chat is None:
    chat = bool(getattr(run.tokenizer, "chat_template", None)) and (
        run.config.data.task == "instruction" or "instruct" in run.config.model.name.lower())
  outs = generate_text(params, run.model, run.tokenizer, list(texts),
                       max_new_tokens=max_new_tokens, chat=chat, temperature=temperature,
                       top_p=top_p, seed=seed, adapter_ids=ids)
  return [{"text": t, "output": o} for t, o in zip(texts, outs)]


# =========================================================================== #
# Private: models
# =========================================================================== #


@dataclasses.dataclass
class _Model:
  family: str
  params: Any
  tokenizer: Any
  handle: Any  # flax module (bert) or LlamaConfig (llama)
  forward: Callable[..., jax.Array]


def _llama_modules():
  try:
    from jlora.models import llama  # noqa: PLC0415
  except ImportError:  # older layout
    from jlora import llama  # noqa: PLC0415
  return llama


def _llama_io():
  try:
    from jlora.models import llama_io  # noqa: PLC0415
  except ImportError:
    from jlora import llama_io  # noqa: PLC0415
  return llama_io


def _resolve_model_path(name: str) -> tuple[str, Path]:
  """(family, path) of a packaged name, a HF folder, a .gguf file or a hub id (no weights read)."""
  from jlora.models import resolve  # noqa: PLC0415
  key = name.lower()
  p = Path(name).expanduser()
  hub_id = "/" in name and not name.startswith((".", "/", "~")) and len(name.split("/")) == 2
  if key not in MODEL_NAMES and not p.exists() and not hub_id:
    close = difflib.get_close_matches(key, list(MODEL_NAMES), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"model.name {name!r} is neither a packaged model ({', '.join(MODEL_NAMES)}) nor an "
        f"existing path.{hint}")
  try:
    path, family = resolve(name)
  except ModelError as e:
    raise ConfigError(f"model.name {name!r}: {e}") from None
  return family, path


def _family_of(name: str) -> str:
  return _resolve_model_path(name)[0]


def _check_family_task(family: str, cfg: Config) -> None:
  task, fam = cfg.data.task, _families.family(family)
  if task not in fam.tasks:
    if family == "bert":
      raise ConfigError(
          f"data.task={task} needs a decoder model; {cfg.model.name} is a BERT encoder "
          "(use model.name=smollm2-135m-instruct or another Llama-family model).")
    raise ConfigError(
        f"data.task={task} needs an encoder; {cfg.model.name} is a decoder. Use "
        "model.name=all-minilm-l6-v2 (or a BERT folder), or data.task=instruction with the "
        "label as the response.")
  if family == "bert" and cfg.model.quantize != "none":
    raise ConfigError(
        f"model.quantize={cfg.model.quantize} quantises a decoder's base; {cfg.model.name} is an "
        "encoder (22M parameters: it fits in float32). Leave model.quantize at none, or use "
        "model.name=smollm2-135m-instruct.")


def _load_tokenizer(name: str, family: str) -> Any:
  _, path = _resolve_model_path(name)
  if family == "llama":
    return _llama_io().load_llama_tokenizer(path)
  from transformers import AutoTokenizer  # noqa: PLC0415
  try:
    return AutoTokenizer.from_pretrained(str(path))
  except Exception as e:  # noqa: BLE001 - transformers raises many kinds
    raise ModelError(f"could not load the tokenizer of {path}: {type(e).__name__}: {e}") from e


def _load_model(cfg: Config, family: str, num_labels: int | None, tokenizer: Any = None) -> _Model:
  """The base model through ``jlora.models.load`` and its forward (``tokenizer``: one already
  loaded for this model, else it is loaded here)."""
  _, path = _resolve_model_path(cfg.model.name)
  dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
  if tokenizer is None:
    tokenizer = _load_tokenizer(cfg.model.name, family)
  from jlora import models  # noqa: PLC0415
  if family == "bert":
    # the layers run unrolled: on XLA:CPU the scanned loop's per-layer weight slices and
    # stacked residual buffers showed up in a profile of the MiniLM step
    kw: dict[str, Any] = dict(param_dtype=jnp.float32, with_tokenizer=False,
                              remat_policy="nothing_saveable" if cfg.model.remat else None,
                              scan_unroll=_UNROLL_LAYERS)
    if cfg.data.task == "classification":
      kw.update(task="classification", num_labels=num_labels, pooling=cfg.model.pooling)
    else:
      kw.update(task="base")
    module, params, _ = models.load(path, dtype=dtype, key=jax.random.key(cfg.train.seed), **kw)
    use_dropout = cfg.model.dropout

    def forward(p, batch, deterministic, rng):
      det = deterministic or not use_dropout
      kwargs = {} if det else {"rngs": {"dropout": rng}}
      if "segment_ids" in batch:  # packed rows (data.pack): one logit row per sequence
        return module.apply({"params": p}, batch["input_ids"], None, batch["token_type_ids"],
                            batch["position_ids"], deterministic=det,
                            segment_ids=batch["segment_ids"], pool=batch["pool"], **kwargs)
      return module.apply({"params": p}, batch["input_ids"], batch.get("attention_mask"),
                          batch.get("token_type_ids"), deterministic=det, **kwargs)

    return _Model("bert", params, tokenizer, module, forward)
  llama = _llama_modules()
  config, params = _load_llama_params(path, cfg.model.quantize)
  remat = cfg.model.remat

  def forward(p, batch, deterministic, rng):
    del deterministic, rng
    if dtype != jnp.float32:
      p = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, p,
                       is_leaf=jlora.is_quantized)
    return llama.llama_forward(p, batch["input_ids"], config,
                               attention_mask=batch.get("attention_mask"), remat=remat)

  return _Model("llama", params, tokenizer, config, forward)


_QUANT_SPECS = {"nf4": "NF4", "fp4": "FP4", "int8": "Int8", "q4_0": "Q4_0", "q4_1": "Q4_1",
                "q8_0": "Q8_0"}


def _load_llama_params(path, quantize: str):
  """A decoder's config and params, the frozen base stored as ``model.quantize`` says."""
  from jlora import models  # noqa: PLC0415
  if quantize == "gguf" and Path(path).suffix.lower() != ".gguf":
    raise ConfigError(f"model.quantize=gguf keeps a GGUF file's blocks, but {path} is not a "
                      ".gguf file; use model.quantize=nf4 (or q4_1, int8, ...) to quantise it")
  model, params, _ = models.load(path, dtype=jnp.float32, keep_quantized=quantize == "gguf",
                                 with_tokenizer=False)  # the trainer loads it once, itself
  config = model.config
  if quantize in ("none", "gguf"):
    return config, params
  spec = getattr(jlora, _QUANT_SPECS[quantize])
  # an untied lm_head stays float, as transformers' bitsandbytes integration keeps it
  rules = {"layers/**/kernel": spec(stack_axes=1), "embed_tokens/embedding": spec()}
  return config, jlora.quantize(params, rules)


#: the ``method.name`` values that put an adapter on each target kernel
ADAPTER_METHODS = ("lora", "dora", "ia3", "vera", "adalora", "adapter")


def _method_spec(me: Any, stack_axes: int | None, feedforward: bool,
                 total_steps: int | None = None) -> Any:
  """The spec of ``method.name`` for one target kernel."""
  alpha = me.alpha if me.alpha > 0 else None
  if me.name == "adalora":
    if me.init != "kaiming" or me.rslora:
      raise ConfigError("method.init / method.rslora are LoRA options; AdaLoRA starts e at 0 and a, b "
                        "at N(0, 0.02) and scales by alpha / rank: leave them at their defaults.")
    target = me.target_rank or max(1, round(me.rank * 2 / 3))
    sched = {}
    if total_steps is not None:
      tinit, tfinal = int(round(me.tinit_ratio * total_steps)), int(round(me.tfinal_ratio * total_steps))
      if tinit >= total_steps - tfinal:
        raise ConfigError(
            f"AdaLoRA needs steps to prune in: {total_steps} steps with method.tinit_ratio="
            f"{me.tinit_ratio:g} and method.tfinal_ratio={me.tfinal_ratio:g} leave none; train longer "
            "or lower the ratios.")
      sched = dict(tinit=tinit, tfinal=tfinal, deltaT=me.delta_t, total_step=total_steps)
    return jlora.AdaLoRA(me.rank, target, alpha=alpha, dropout=me.dropout, stack_axes=stack_axes,
                         **sched)
  if me.name == "ia3":
    return jlora.IA3(feedforward=feedforward, stack_axes=stack_axes)
  if me.name == "adapter":
    act = me.non_linearity or ("swish" if me.placement == "houlsby" else "relu")
    return jlora.Bottleneck(me.reduction_factor, non_linearity=act, stack_axes=stack_axes)
  if me.name == "vera":
    if me.init != "kaiming":
      raise ConfigError(f"method.init={me.init} is a LoRA init; VeRA draws fixed Kaiming-uniform "
                        "projections and trains vectors: leave method.init at kaiming.")
    return jlora.VeRA(me.rank, dropout=me.dropout, stack_axes=stack_axes)
  if me.name == "dora":
    if me.init not in ("kaiming", "gaussian"):
      raise ConfigError(f"method.init={me.init} is a LoRA init; DoRA takes kaiming or gaussian.")
    return jlora.DoRA(me.rank, alpha=alpha, dropout=me.dropout, init=me.init, rslora=me.rslora,
                      stack_axes=stack_axes)
  return jlora.LoRA(me.rank, alpha=alpha, dropout=me.dropout, init=me.init, rslora=me.rslora,
                    stack_axes=stack_axes)


def _default_targets(family: str, method: str = "lora", placement: str = "houlsby") -> list[str]:
  fam = _families.family(family)
  if method == "adapter":
    return list(fam.adapter_targets[placement])
  return list(fam.ia3_targets if method == "ia3" else fam.lora_targets)


def _default_feedforward(family: str) -> list[str]:
  return list(_families.family(family).feedforward)


def _train_also(cfg: Config) -> list[str]:
  if cfg.method.train_also is not None:
    return list(cfg.method.train_also)
  return ["classifier"] if cfg.data.task == "classification" else []


def _module_matches(target: str, module: str) -> bool:
  if module == target or module.endswith("/" + target):
    return True
  if any(c in target for c in "*?[{"):
    try:
      return bool(compile_pattern(target).fullmatch(module) or
                  compile_pattern("**/" + target).fullmatch(module))
    except jlora.RuleError:
      return False
  return False


def _no_module(key: str, name: str, modules: list[str]) -> None:
  names = sorted({m.rsplit("/", 1)[-1] for m in modules})
  close = difflib.get_close_matches(name, names + modules, n=3, cutoff=0.5)
  hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
  raise ConfigError(
      f"{key}: {name!r} matches no module of the model.{hint} Module names: "
      f"{', '.join(names)}.")


def _literal(path: str) -> str:
  """A glob that matches exactly ``path``."""
  return "".join(f"[{c}]" if c in "*?[]{},\\" else c for c in path)


def _split_any(tree: Any) -> tuple[Any, Any]:
  if _has_adapters(tree):
    return jlora.split(tree)
  return None, tree


def _has_adapters(tree: Any) -> bool:
  return any(jlora.adapted_leaves(tree)) if tree is not None else False


# =========================================================================== #
# Private: data
# =========================================================================== #


def _load_raw_data(cfg: Config, splits: tuple[str, ...] = ("train", "validation", "test")) -> dict:
  """{split: datasets.Dataset} for the requested splits that exist."""
  import datasets  # noqa: PLC0415
  d = cfg.data
  if d.source == "sentiment":
    from jlora.data import load_sentiment  # noqa: PLC0415
    dd = load_sentiment(domain=d.domain, binary=d.binary, seed=d.split_seed)
    out = {s: dd[s] for s in splits}
    if d.task == "instruction":
      out = {s: _sentiment_instructions(ds) for s, ds in out.items()}
    return out
  if d.source == "files":
    from jlora.data import load_files as _load_files  # noqa: PLC0415
    files = {"train": d.train_files, "validation": d.validation_files, "test": d.test_files}
    kw = {"format": d.format} if d.format else {}

    def load_files(spec, **kw):
      try:
        ds = _load_files(spec, **kw)
      except (StopIteration, datasets.exceptions.DatasetGenerationError) as e:
        # datasets' json reader raises StopIteration on an empty file
        raise DataError(f"could not read any rows from {spec!r} ({type(e).__name__}: {e}); "
                        "is the file empty or malformed?") from None
      if len(ds) == 0:
        raise DataError(f"{spec!r} holds no rows (the dataset is empty).")
      return ds

    out = {}
    need_train = "train" in splits or ("validation" in splits and not d.validation_files)
    train_ds = load_files(d.train_files, **kw) if need_train else None
    for s in splits:
      if files[s]:
        out[s] = load_files(files[s], **kw) if s != "train" else train_ds
    if not d.validation_files and train_ds is not None:
      if len(train_ds) == 0:
        raise DataError(f"data.train_files {d.train_files!r} holds no rows.")
      parts = train_ds.train_test_split(test_size=d.validation_fraction, seed=d.split_seed,
                                        shuffle=True)
      if "train" in splits:
        out["train"] = parts["train"]
      if "validation" in splits:
        out["validation"] = parts["test"]
    return out
  from jlora.data import load_hub  # noqa: PLC0415
  dd = load_hub(d.hub_name, d.hub_config or None)
  out = {}
  for s in splits:
    if s in dd:
      out[s] = dd[s]
  if "validation" in splits and "validation" not in dd and "train" in dd:
    parts = dd["train"].train_test_split(test_size=d.validation_fraction, seed=d.split_seed)
    out["validation"] = parts["test"]
    if "train" in splits:
      out["train"] = parts["train"]
  return out


def _sentiment_instructions(ds: Any) -> Any:
  names = ds.features["label"].names
  prompts = [f"Is the sentiment of this sentence positive or negative? "
             f"Answer with one word.\n\n{t}" for t in ds["text"]]
  responses = [names[int(y)] for y in ds["label"]]
  import datasets  # noqa: PLC0415
  return datasets.Dataset.from_dict({"prompt": prompts, "response": responses})


def _encode_splits(cfg: Config, raw: dict, tokenizer: Any,
                   splits: tuple[str, ...] = ("train", "validation", "test")
                   ) -> tuple[dict[str, dict[str, np.ndarray]], int | None, str]:
  from jlora.data import CausalLMTask, ClassificationTask, InstructionTask  # noqa: PLC0415
  d = cfg.data
  if "train" in splits and "train" not in raw:
    raise DataError("the data has no training split.")
  if d.task == "classification":
    task = ClassificationTask(tokenizer, d.max_length, d.text_column, d.label_column,
                              d.num_labels or None)
  elif d.task == "causal_lm":
    task = CausalLMTask(tokenizer, d.max_length, d.text_column, pack=d.pack)
  else:
    task = InstructionTask(tokenizer, d.max_length, d.prompt_column, d.response_column,
                           chat_template=d.chat_template)
  feats = {}
  for split in splits:
    if split not in raw:
      continue
    ds = raw[split]
    limit = d.max_train_examples if split == "train" else d.max_eval_examples
    if limit and len(ds) > limit:  # a seeded random subset (files are often sorted by label)
      keep = np.sort(np.random.default_rng(d.split_seed).permutation(len(ds))[:limit])
      ds = ds.select(keep.tolist())
    if d.task == "causal_lm" and split != "train":
      task.remainder = "pad"  # score every held-out token
    elif d.task == "causal_lm":
      task.remainder = "drop"
    feats[split] = task.encode(ds)
  num_labels = getattr(task, "num_labels", None)
  info = ", ".join(f"{s}={len(next(iter(f.values())))}" for s, f in feats.items())
  src = d.domain if d.source == "sentiment" else (d.train_files or d.hub_name)
  return feats, num_labels, f"{d.source}:{src} ({info} rows)"


class _BucketBatches:
  """Shuffled batches; with bucketing, rows of similar length share a batch, cut to fit.

  The order depends only on (seed, epoch) and ``position`` is the index of the
  next batch, so a resumed run sees exactly the batches it would have seen.
  """

  def __init__(self, feats: dict[str, np.ndarray], batch_size: int, seed: int, epoch: int,
               start: int, bucket: bool, max_len: int):
    from jlora.data import epoch_order  # noqa: PLC0415
    n = len(next(iter(feats.values())))
    self.num_batches = n // batch_size
    order = epoch_order(n, seed, epoch)[: self.num_batches * batch_size]
    self._bucket = bucket and "attention_mask" in feats
    if self._bucket:
      lengths = feats["attention_mask"].sum(-1)
      window = batch_size * _BUCKET_WINDOW
      chunks = [order[i:i + window] for i in range(0, order.size, window)]
      order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
      batch_order = epoch_order(self.num_batches, seed + 7919, epoch)
      order = order.reshape(self.num_batches, batch_size)[batch_order].reshape(-1)
    self._order = order
    self._feats = feats
    self._batch = batch_size
    self._max_len = max_len
    self.position = start

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.position >= self.num_batches:
      raise StopIteration
    idx = self._order[self.position * self._batch:(self.position + 1) * self._batch]
    self.position += 1
    out = {k: v[idx] for k, v in self._feats.items()}
    if self._bucket:
      out = _trim(out, self._max_len)
    return out


def _trim(batch: dict[str, np.ndarray], max_len: int) -> dict[str, np.ndarray]:
  longest = int(batch["attention_mask"].sum(-1).max())
  width = min(max_len, max(_BUCKET_MULTIPLE, -(-longest // _BUCKET_MULTIPLE) * _BUCKET_MULTIPLE))
  return {k: (v[:, :width] if v.ndim == 2 and v.shape[1] == max_len else v) for k, v in batch.items()}


def _train_batches(cfg: Config, feats: dict[str, np.ndarray], epoch: int, start: int,
                   packed: bool = False) -> Any:
  """One epoch's shuffled batches from ``start``: ``jlora.data.batches``, or length-bucketed."""
  if cfg.data.bucket and cfg.data.task != "causal_lm" and not packed:
    return _BucketBatches(feats, cfg.train.batch_size, cfg.train.seed, epoch, start, True,
                          cfg.data.max_length)
  from jlora.data import batches  # noqa: PLC0415
  return batches(feats, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed, epoch=epoch,
                 start=start)


def _packs(cfg: Config, family: str) -> bool:
  """Classification on an encoder with data.pack: sentences packed into full rows (not with a
  soft prompt or prefix: every sentence needs its own, so method=prompt|prefix runs one padded
  row per sentence)."""
  return (cfg.data.pack and cfg.data.task == "classification" and family == "bert"
          and cfg.method.name not in ("prompt", "prefix"))


class _Packer:
  """Packs each training batch's micro-batches into a few fixed row counts (segment ids).

  The row counts (at most ``_MAX_PACKED_SHAPES``, so the step compiles that many
  times) are chosen from every micro-batch of the run before it starts; the
  batches themselves are the plain shuffled ones, the same rows a padded run sees.
  """

  def __init__(self, cfg: Config, feats: dict[str, np.ndarray], total_steps: int, *,
               multiple: int = 1):
    from jlora.data import packed_rows_needed, row_buckets  # noqa: PLC0415
    tc = cfg.train
    self._width = cfg.data.max_length
    self._accum = tc.grad_accum
    self._pooling = cfg.model.pooling
    n_batches = len(next(iter(feats.values()))) // tc.batch_size
    needed, real = [], 0
    for epoch in range(-(-total_steps // max(n_batches, 1))):
      for batch in _train_batches(cfg, {"attention_mask": feats["attention_mask"]}, epoch, 0,
                                  packed=True):
        for m in self._micro(batch):
          needed.append(packed_rows_needed(m, self._width))
          real += int(m["attention_mask"].sum())
    self._multiple = multiple  # rows per micro-batch: a multiple of the mesh's batch devices
    self.buckets = sorted({self._round(b) for b in row_buckets(needed, max_shapes=_MAX_PACKED_SHAPES)})
    rows = sum(self._round(_bucket_for(self.buckets, n)) for n in needed)
    self.efficiency = float(real / max(rows * self._width, 1))

  def _round(self, rows: int) -> int:
    return -(-rows // self._multiple) * self._multiple

  def _micro(self, batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    size = len(next(iter(batch.values()))) // self._accum
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(self._accum)]

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from jlora.data import pack_rows, packed_rows_needed  # noqa: PLC0415
    micro = self._micro(batch)
    need = max(packed_rows_needed(m, self._width) for m in micro)
    rows = self._round(_bucket_for(self.buckets, need))
    packed = [pack_rows(m, self._width, rows=rows, pooling=self._pooling,
                        keep=("labels", "example_mask")) for m in micro]
    # interleaved: row i of every leaf belongs to micro-batch i % grad_accum, as the train step
    # (jlora.train_step) cuts its batches
    return {k: _interleave([p[k] for p in packed]) for k in packed[0]}


def _interleave(parts: list[np.ndarray]) -> np.ndarray:
  x = np.stack(parts, axis=1)
  return x.reshape((-1,) + x.shape[2:])


def _eval_batches(feats: dict[str, np.ndarray], batch_size: int, max_len: int,
                  bucket: bool) -> Iterator[dict[str, np.ndarray]]:
  """Every row once, in length order when bucketing, the last batch padded with masked rows."""
  n = len(next(iter(feats.values())))
  order = np.arange(n)
  if bucket and "attention_mask" in feats:
    order = np.argsort(-feats["attention_mask"].sum(-1), kind="stable")
  for lo in range(0, n, batch_size):
    idx = order[lo:lo + batch_size]
    real = idx.size
    if real < batch_size:
      idx = np.concatenate([idx, np.repeat(idx[-1:], batch_size - real)])
    batch = {k: v[idx] for k, v in feats.items()}
    mask = np.zeros(batch_size, bool)
    mask[:real] = True
    batch["example_mask"] = mask
    if bucket and "attention_mask" in feats:
      batch = _trim(batch, max_len)
    yield batch


def _packed_eval_batches(feats: dict[str, np.ndarray], batch_size: int, width: int,
                         pooling: str) -> Iterator[dict[str, np.ndarray]]:
  """:func:`_eval_batches` (length-sorted) with each batch packed into a few row counts."""
  from jlora.data import pack_rows, packed_rows_needed, row_buckets  # noqa: PLC0415
  plain = list(_eval_batches(feats, batch_size, width, bucket=True))  # length-sorted
  needed = [packed_rows_needed(b, width) for b in plain]
  buckets = row_buckets(needed, max_shapes=_MAX_PACKED_SHAPES)
  for b, need in zip(plain, needed):
    yield pack_rows(b, width, rows=_bucket_for(buckets, need), pooling=pooling,
                    keep=("labels", "example_mask"))


def _bucket_for(buckets: list[int], need: int) -> int:
  """The smallest row bucket that holds ``need`` rows (``need`` itself beyond the largest:
  a later epoch's batch can need more rows than any the buckets were chosen from)."""
  return next((b for b in buckets if b >= need), need)


# =========================================================================== #
# Private: optimisation and evaluation
# =========================================================================== #


def _make_optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
  tc = cfg.train
  schedule = _schedule(cfg, total_steps)

  def decay_mask(p):
    return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, p)

  parts = []
  if tc.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(tc.clip_norm))
  parts.append(optax.adamw(schedule, b1=tc.adam_b1, b2=tc.adam_b2,
                           weight_decay=tc.weight_decay, mask=decay_mask))
  tx = jlora.optimizer(optax.chain(*parts))
  # AdaLoRA: its regulariser and rank allocation run around the optimizer (state in opt_state)
  return jlora.rank_allocator(tx) if cfg.method.name == "adalora" else tx


def _schedule(cfg: Config, total_steps: int) -> Callable[[int], Any]:
  tc = cfg.train
  warmup = int(round(tc.warmup_ratio * total_steps))
  return optax.warmup_cosine_decay_schedule(
      0.0, tc.lr, warmup, max(total_steps, warmup + 1), end_value=tc.lr * tc.min_lr_ratio)


#: ``lora_key = fold_in(micro_batch_key, LORA_DROPOUT_SALT)``, where the micro-batch key is
#: ``fold_in(fold_in(key(seed + 1), step), micro_batch_index)``.
LORA_DROPOUT_SALT = 0x10A


def _loss_sum(task: str, logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(sum of per-example / per-token losses, number counted)."""
  labels = batch["labels"]
  if task == "classification":
    per = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    w = batch["example_mask"].astype(jnp.float32) if "example_mask" in batch else jnp.ones_like(per)
    return (per * w).sum(), w.sum()
  from jlora.metrics import nll  # noqa: PLC0415
  valid = labels != _IGNORE
  if "example_mask" in batch:
    valid = valid & batch["example_mask"][:, None]
    labels = jnp.where(valid, labels, _IGNORE)
  return nll(logits, labels, reduction="sum"), valid.sum().astype(jnp.float32)


def _unmergeable(tree: Any) -> bool:
  """True when the tree holds adapters that have no merged weight (bottleneck adapters)."""
  return any(jlora.is_adapted(x) and not type(x).mergeable
             for x in jax.tree.leaves(tree, is_leaf=jlora.is_adapted))


def _make_eval_fn(cfg: Config, model: _Model):
  task = cfg.data.task

  @jax.jit
  def run(trainable, frozen, batch):
    tree = jlora.combine(trainable, frozen) if trainable is not None else frozen
    if "adapter_ids" in batch:  # stacked adapters: each row routed to its own
      logits = jlora.lora(model.forward)(tree, batch, True, None, adapter_ids=batch["adapter_ids"])
    elif _unmergeable(tree):  # bottleneck adapters run beside the frozen weights
      logits = jlora.lora(model.forward)(tree, batch, True, None)
    else:
      params = jlora.merge(tree)  # also dequantises a quantised base (model.quantize)
      logits = model.forward(params, batch, True, None)
    loss, count = _loss_sum(task, logits, batch)
    if task == "classification":
      return loss, count, jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return loss, count, jnp.zeros(())

  return run


def _evaluate(eval_fn, trainable, frozen, feats: dict[str, np.ndarray], cfg: Config) -> dict[str, float]:
  from jlora import metrics as M  # noqa: PLC0415
  task = cfg.data.task
  bucket = cfg.data.bucket and task != "causal_lm"
  loss_sum, count = 0.0, 0.0
  probs, labels = [], []
  if _packs(cfg, "bert") and "adapter_ids" not in feats:  # classification is BERT's task
    it = _packed_eval_batches(feats, cfg.train.eval_batch_size, cfg.data.max_length,
                              cfg.model.pooling)
  else:
    it = _eval_batches(feats, cfg.train.eval_batch_size, cfg.data.max_length, bucket)
  replicated = None
  if jax.process_count() > 1:  # every process passes the same rows: a replicated global batch
    mesh = jax.tree.leaves(trainable)[0].sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  for batch in it:
    if replicated is None:
      jb = {k: jnp.asarray(v) for k, v in batch.items()}
    else:
      jb = {k: jax.make_array_from_process_local_data(replicated, np.asarray(v), np.shape(v))
            for k, v in batch.items()}
    loss, n, p = distributed.to_host(eval_fn(trainable, frozen, jb))
    loss_sum += float(loss)
    count += float(n)
    if task == "classification":
      keep = batch["example_mask"]
      probs.append(np.asarray(p)[keep])
      labels.append(batch["labels"][keep])
  out: dict[str, float] = {"loss": loss_sum / max(count, 1.0)}
  if task == "classification":
    P = np.concatenate(probs)
    y = np.concatenate(labels)
    pred = P.argmax(-1)
    out["accuracy"] = M.accuracy(y, pred)
    if P.shape[1] == 2:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["f1"] = float(M.f1(y, pred))
        if len(np.unique(y)) == 2:
          out["roc_auc"] = M.roc_auc(y, P[:, 1])
    else:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["f1_macro"] = float(M.f1(y, pred, average="macro"))
    out["examples"] = float(y.size)
  else:
    out["perplexity"] = float(math.exp(min(out["loss"], 50.0)))
    out["tokens"] = count
  return out


def _better(best: dict | None, metrics: dict[str, float], cfg: Config) -> dict:
  key = "accuracy" if cfg.data.task == "classification" else "loss"
  sign = 1 if key == "accuracy" else -1
  if best is None or sign * metrics[key] > sign * best["value"]:
    return {"metric": key, "value": metrics[key]}
  return best


def _fmt_metrics(m: Mapping[str, float]) -> str:
  return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) and not float(v).is_integer()
                   else f"{k} {int(v)}" for k, v in m.items())


# =========================================================================== #
# Private: checkpoints (training state), logging, Ctrl-C
# =========================================================================== #


def _check_same_job(saved: Path, cfg: Config) -> None:
  if not saved.is_file():
    return
  import yaml  # noqa: PLC0415
  old = yaml.safe_load(saved.read_text()) or {}
  new = dataclasses.asdict(cfg)
  for section in ("model", "data", "method"):
    if old.get(section) != new[section]:
      diff = [k for k in new[section] if (old.get(section) or {}).get(k) != new[section][k]]
      raise CheckpointError(
          f"{saved.parent} holds checkpoints of a different job ({section}.{diff[0] if diff else '?'} "
          f"differs); use another output_dir, or resume=false to start over.")
  for key in ("batch_size", "grad_accum", "seed"):
    if (old.get("train") or {}).get(key) != getattr(cfg.train, key):
      raise CheckpointError(
          f"{saved.parent} holds checkpoints made with train.{key}="
          f"{(old.get('train') or {}).get(key)}; resuming with {getattr(cfg.train, key)} would "
          "change the run. Use another output_dir, or resume=false to start over.")


def _dir_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class _MetricsLogger:
  """metrics.jsonl (always) and TensorBoard (when tensorboardX imports)."""

  def __init__(self, out: Path, *, tensorboard: bool, append: bool, enabled: bool = True):
    self._file = open(out / "metrics.jsonl", "a" if append else "w") if enabled else None  # noqa: SIM115
    self._tb = None
    if tensorboard and enabled:
      try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
      except ImportError:
        self._tb = None
      else:
        self._tb = SummaryWriter(str(out / "tensorboard"))
    self._t0 = time.time()

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if self._file is None:
      return
    rec = {"step": step, "split": split, "time": round(time.time() - self._t0, 3)}
    rec.update({k: float(v) for k, v in metrics.items()})
    self._file.write(json.dumps(rec) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), step)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


class _Stopper:
  """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.getsignal(signal.SIGINT)
      signal.signal(signal.SIGINT, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort)",
          file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGINT, self._old)
    return False


def _run_config(run_dir: Path) -> Config:
  from jlora.config import load_config  # noqa: PLC0415
  f = run_dir / "config.yaml"
  if not f.is_file():
    raise CheckpointError(f"{run_dir} has no config.yaml; pass a directory written by jlora train.")
  return load_config(f)
