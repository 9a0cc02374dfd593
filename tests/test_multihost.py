"""Two JAX processes (4 fake CPU devices each, gloo collectives, 127.0.0.1) train like one.

A pair of processes takes 2 LoRA steps of a tiny Llama on a (4, 2) mesh spanning
both, each reading only its rows, and writes an Orbax checkpoint from both; a
fresh pair restores it and takes step 3. Everything is compared with the same
3 steps on one device in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import _multihost_worker as worker
from jlora.train_step import make_train_step

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_multihost_worker.py")
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 420


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_all(jobs) -> list[int] | None:
  """Starts every ``(argv, env, log_path, cwd)`` at once; their exit codes (None on a timeout)."""
  procs, logs = [], []
  for argv, env, log_path, cwd in jobs:
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    logs.append(log)
    procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd))
  try:
    return [p.wait(timeout=TIMEOUT) for p in procs]
  except subprocess.TimeoutExpired:
    return None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()


def _run_pair(out: Path, mode: str) -> None:
  port = _free_port()
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  codes = _run_all([([sys.executable, str(WORKER), "--port", str(port), "--process-id", str(pid),
                      "--out", str(out), "--mode", mode], env, out / f"{mode}_{pid}.log", None)
                    for pid in range(2)])
  if codes != [0, 0]:
    tails = "\n".join(
        f"--- process {pid} ---\n" + (out / f"{mode}_{pid}.log").read_text()[-3000:]
        for pid in range(2))
    pytest.fail(f"{mode} pair failed (exit codes {codes}):\n{tails}")


def _flat_npz(path: Path, prefix: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as z:
    return {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}


@pytest.fixture(scope="module")
def reference():
  """The same 3 steps on one device: losses, trainable after step 2 and after step 3."""
  _, tree, loss_fn = worker.model()
  step = make_train_step(loss_fn, optax.adamw(worker.LR), mesh=None)
  state, frozen = step.init(tree)
  losses, after = [], {}
  for s in range(3):
    state, m = step(state, frozen, {"ids": worker.rows(s, 0, worker.BATCH)})
    losses.append(float(m["loss"]))
    after[s + 1] = worker.flat(jax.device_get(state.trainable))
  return losses, after


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("multihost")
  _run_pair(out, "train")
  _run_pair(out, "restore")
  return out


def _max_diff(got: dict, want: dict) -> float:
  assert sorted(got) == sorted(want)
  return max(float(np.max(np.abs(got[k] - want[k]))) for k in want)


def test_each_process_reads_only_its_rows(runs):
  info = [json.loads((runs / f"info_train_{p}.json").read_text()) for p in range(2)]
  assert [i["rows"] for i in info] == [[0, 4], [4, 8]]


def test_two_process_steps_equal_single_process(runs, reference):
  ref_losses, ref_after = reference
  losses = _flat_npz(runs / "train.npz", "")["losses"]
  np.testing.assert_allclose(losses, ref_losses[:2], atol=1e-5, rtol=0)
  trained = _flat_npz(runs / "train.npz", "t:")
  diff = _max_diff(trained, ref_after[2])
  print(f"2 processes vs 1 device after 2 steps: max |loss diff| "
        f"{np.max(np.abs(losses - ref_losses[:2])):.2e}, max |adapter diff| {diff:.2e}")
  assert diff <= 1e-5


def test_checkpoint_saved_by_both_restores_in_a_fresh_pair(runs, reference):
  ref_losses, ref_after = reference
  trained = _flat_npz(runs / "train.npz", "t:")
  restored = _flat_npz(runs / "restore.npz", "r:")
  assert sorted(restored) == sorted(trained)
  for k in trained:
    np.testing.assert_array_equal(restored[k], trained[k], err_msg=k)
  info = [json.loads((runs / f"info_restore_{p}.json").read_text()) for p in range(2)]
  for i in info:
    assert i["restored_step"] == 2
    assert i["restored_a_spec"] == "P(None, 'data', None)"
    assert i["restored_b_spec"] == "P(None, None, 'model')"
  # the restored optimizer state is the real one: step 3 matches the uninterrupted run
  loss3 = _flat_npz(runs / "restore.npz", "")["losses"]
  diff = _max_diff(_flat_npz(runs / "restore.npz", "t:"), ref_after[3])
  print(f"restored pair, step 3 vs 1 device: |loss diff| {abs(loss3[0] - ref_losses[2]):.2e}, "
        f"max |adapter diff| {diff:.2e}")
  np.testing.assert_allclose(loss3, ref_losses[2:], atol=1e-5, rtol=0)
  assert diff <= 1e-5


# -- jlora train on two processes ---------------------------------------------------------------

def test_jlora_train_on_two_processes_equals_one_process(tmp_path):
  """`jlora train train.mesh=fsdp` as two processes (JLORA_COORDINATOR / JLORA_NUM_PROCESSES /
  JLORA_PROCESS_ID, 4 fake CPU devices each): each reads its rows of every batch, the run
  checkpoints and evaluates across both, process 0 alone writes the run directory, and the
  adapters and metrics equal the same job on one process with 8 devices."""
  from test_train import make_tiny_bert, tiny_cls_overrides

  import jlora
  from jlora.cli import main
  from jlora.config import load_config
  from jlora.train import load_run

  bert = make_tiny_bert(tmp_path)
  extra = {"train.mesh": "fsdp", "train.max_steps": 3, "train.batch_size": 16, "resume": False,
           "train.save_every": 2}
  one = tiny_cls_overrides(tmp_path, bert, "one", **extra)
  assert main(["train", *one]) == 0
  two = tiny_cls_overrides(tmp_path, bert, "two", **extra)
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             JLORA_COORDINATOR=f"127.0.0.1:{port}", JLORA_NUM_PROCESSES="2",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  codes = _run_all([([sys.executable, "-m", "jlora", "train", *two, "train.progress=false"],
                     dict(env, JLORA_PROCESS_ID=str(pid)), tmp_path / f"cli_{pid}.log", tmp_path)
                    for pid in range(2)])
  if codes != [0, 0]:
    pytest.fail(f"jlora train pair failed ({codes}):\n" + "\n".join(
        (tmp_path / f"cli_{p}.log").read_text()[-3000:] for p in range(2)))
  res = {k: json.loads((tmp_path / k / "results.json").read_text()) for k in ("one", "two")}
  assert res["two"]["processes"] == 2 and res["two"]["mesh"]["shape"] == {"data": 8}
  assert res["two"]["metrics"]["test"]["accuracy"] == res["one"]["metrics"]["test"]["accuracy"]
  assert res["two"]["metrics"]["test"]["loss"] == pytest.approx(res["one"]["metrics"]["test"]["loss"],
                                                               rel=1e-4)
  runs = {k: load_run(tmp_path / k) for k in ("one", "two")}
  a = jax.tree.leaves(jlora.split(runs["one"].tree)[0])
  b = jax.tree.leaves(jlora.split(runs["two"].tree)[0])
  assert len(a) == len(b) and a
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == \
      ["2", "3"]
  # process 1 wrote nothing of its own: one metrics file, with one line per logged step
  lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
  assert len([ln for ln in lines if '"split": "train"' in ln]) == 3
  assert load_config(tmp_path / "two" / "config.yaml").train.mesh == "fsdp"
