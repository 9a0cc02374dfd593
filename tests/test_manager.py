"""Training checkpoints: keep-last-N/best, bit-exact resume, crash safety under SIGKILL, full disk."""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora._checkpoint import load_adapters
from jlora._manager import CheckpointManager

# A tiny LoRA training run. The crash trials run it in child processes that are killed with
# SIGKILL; the test imports the same file for the uninterrupted reference run and the resume.
TRAIN = textwrap.dedent('''
    import os, signal, sys
    import jax, jax.numpy as jnp, numpy as np, optax, jlora
    from jlora._manager import CheckpointManager

    STEPS = 200

    def setup():
      params = {"l1": {"kernel": jax.random.normal(jax.random.key(0), (16, 32)) * 0.3},
                "l2": {"kernel": jax.random.normal(jax.random.key(1), (32, 4)) * 0.3,
                       "bias": jnp.zeros(4)}}
      tree = jlora.wrap(params, {"**/kernel": jlora.LoRA(4, alpha=8), "l2/bias": jlora.Full()},
                        key=jax.random.key(2))
      tx = jlora.optimizer(optax.adam(1e-2))
      trainable, frozen = jlora.split(tree)
      return params, tx, trainable, frozen

    def batch(i):
      rng = np.random.default_rng(1000 + i)
      x = rng.normal(size=(8, 16)).astype(np.float32)
      return x, np.tanh(x[:, :4] * 2.0).astype(np.float32)

    def make_step(tx, frozen):
      @jax.jit
      def step(trainable, opt_state, rng, x, y):
        rng, k = jax.random.split(rng)
        def loss_fn(t):
          p = jlora.merge(jlora.combine(t, frozen))
          h = jnp.tanh(x @ p["l1"]["kernel"])
          h = h * jax.random.bernoulli(k, 0.9, h.shape) / 0.9  # dropout: the RNG state matters
          return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"] - y) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, rng, loss
      return step

    def manager(directory):
      return CheckpointManager(directory, max_to_keep=2, best_metric="loss", keep_best=1)

    def crash_hooks(spec):
      """CRASH_AT='rename:N': die before Orbax's N-th rename; 'purge:N': halfway through a delete."""
      what, n = spec.split(":")
      count = [0]
      def hit():
        count[0] += 1
        return count[0] == int(n)
      if what == "rename":
        from orbax.checkpoint._src.path import async_path
        real = async_path.rename
        async def rename(src, dst):
          if hit():
            os.kill(os.getpid(), signal.SIGKILL)
          return await real(src, dst)
        async_path.rename = rename
      elif what == "purge":
        import shutil
        real = shutil.rmtree
        def rmtree(path, *a, **k):
          if "_deleted" in str(path) and hit():
            files = sorted(p for p in __import__("pathlib").Path(path).rglob("*") if p.is_file())
            for f in files[: len(files) // 2]:
              f.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
          return real(path, *a, **k)
        shutil.rmtree = rmtree

    def main(directory):
      if os.environ.get("CRASH_AT"):
        crash_hooks(os.environ["CRASH_AT"])
      params, tx, trainable, frozen = setup()
      step = make_step(tx, frozen)
      opt_state, rng = tx.init(trainable), jax.random.key(3)
      mgr = manager(directory)
      print("ready", flush=True)
      for i in range(STEPS):
        trainable, opt_state, rng, loss = step(trainable, opt_state, rng, *batch(i))
        print("saving", i + 1, flush=True)
        mgr.save(i + 1, jlora.combine(trainable, frozen), opt_state, rng=rng,
                 data_state={"next_batch": i + 1}, metrics={"loss": float(loss)})
        if (i + 1) % 5 == 0:
          mgr.wait_until_finished()
          print("durable", i + 1, flush=True)
      mgr.close()

    if __name__ == "__main__":
      main(sys.argv[1])
''')


@pytest.fixture(scope="module")
def train(tmp_path_factory):
  """The training module, and the state after every step of an uninterrupted run."""
  path = tmp_path_factory.mktemp("script") / "crash_train.py"
  path.write_text(TRAIN)
  spec = importlib.util.spec_from_file_location("crash_train", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  params, tx, trainable, frozen = mod.setup()
  step = mod.make_step(tx, frozen)
  opt_state, rng = tx.init(trainable), jax.random.key(3)
  template = opt_state
  states = {}
  for i in range(mod.STEPS):
    trainable, opt_state, rng, _ = step(trainable, opt_state, rng, *mod.batch(i))
    states[i + 1] = _snapshot(trainable, opt_state, rng)
  return mod, path, params, template, frozen, step, states


def _snapshot(trainable, opt_state, rng):
  return ([np.asarray(x) for x in jax.tree.leaves(trainable)],
          [np.asarray(x) for x in jax.tree.leaves(opt_state)],
          np.asarray(jax.random.key_data(rng)))


def _assert_same(a, b):
  for xs, ys in zip(a, b):
    xs, ys = (xs, ys) if isinstance(xs, list) else ([xs], [ys])
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def _tree(seed=0, rank=2):
  params = {"k": jax.random.normal(jax.random.key(1), (8, 6)), "b": jnp.zeros(6)}
  tree = jlora.wrap(params, {"k": jlora.LoRA(rank), "b": jlora.Full()}, key=jax.random.key(seed))
  trainable, frozen = jlora.split(tree)
  trainable = jax.tree.map(lambda x: x + 0.25 * (seed + 1), trainable)
  return params, jlora.combine(trainable, frozen)


def test_restore_round_trips_every_part(tmp_path):
  params, tree = _tree()
  tx = jlora.optimizer(optax.adamw(1e-2))
  trainable = jlora.split(tree)[0]
  opt_state = tx.init(trainable)
  _, opt_state = tx.update(jax.tree.map(jnp.ones_like, trainable), opt_state, trainable)
  with CheckpointManager(tmp_path / "run") as mgr:
    assert mgr.save(7, tree, opt_state, rng=jax.random.key(11), data_state={"epoch": 1, "batch": 7},
                    metrics={"loss": 0.25}, metadata={"note": "x"})
    assert mgr.save(8, tree, rng=jax.random.PRNGKey(5), data_state=8)
  with CheckpointManager(tmp_path / "run") as mgr:
    r = mgr.restore(params, tx.init(trainable), step=7)
    assert (r.step, r.data_state, r.metrics, r.metadata) == (7, {"epoch": 1, "batch": 7},
                                                             {"loss": 0.25}, {"note": "x"})
    _assert_same(_snapshot(jlora.split(r.tree)[0], r.opt_state, r.rng),
                 _snapshot(trainable, opt_state, jax.random.key(11)))
    assert jax.tree.structure(r.tree) == jax.tree.structure(tree)
    assert jax.random.key_impl(r.rng) == jax.random.key_impl(jax.random.key(11))
    latest = mgr.restore(tree)  # onto the wrapped tree; no optimizer state was saved at step 8
    assert latest.step == 8 and latest.opt_state is None and latest.data_state == 8
    np.testing.assert_array_equal(latest.rng, jax.random.PRNGKey(5))
    assert latest.rng.dtype == jnp.uint32


def test_keeps_the_latest_n_and_the_best(tmp_path):
  params, tree = _tree()
  losses = {1: 5.0, 2: 1.0, 3: 3.0, 4: 4.0, 5: 2.0, 6: 6.0}
  for mode, best in (("min", 2), ("max", 6)):
    with CheckpointManager(tmp_path / mode, max_to_keep=2, best_metric="loss", best_mode=mode,
                           async_save=False) as mgr:
      for s, loss in losses.items():
        _, t = _tree(seed=s)
        mgr.save(s, t, metrics={"loss": loss})
      assert mgr.all_steps() == sorted({best, 5, 6})
      assert mgr.best_step() == best
      r = mgr.restore(params, best=True)
      assert r.step == best and r.metrics == {"loss": losses[best]}
      _assert_same([np.asarray(x) for x in jax.tree.leaves(jlora.split(r.tree)[0])],
                   [np.asarray(x) for x in jax.tree.leaves(jlora.split(_tree(seed=best)[1])[0])])
    assert not any((tmp_path / mode / "_deleted").glob("*"))


def test_save_interval_and_force(tmp_path):
  _, tree = _tree()
  with CheckpointManager(tmp_path, save_interval_steps=3, async_save=False) as mgr:
    assert [mgr.save(s, tree) for s in range(1, 7)] == [False, False, True, False, False, True]
    assert mgr.save(7, tree, force=True)
    assert mgr.all_steps() == [3, 6, 7]


def test_async_save_copies_before_returning(tmp_path):
  """The caller may delete (donate) its buffers as soon as save returns."""
  params, tree = _tree()
  expected = [np.asarray(x).copy() for x in jax.tree.leaves(jlora.split(tree)[0])]
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(1, tree)
    for x in jax.tree.leaves(jlora.split(tree)[0]):
      x.delete()
    mgr.wait_until_finished()
    r = mgr.restore(params)
  _assert_same([np.asarray(x) for x in jax.tree.leaves(jlora.split(r.tree)[0])], expected)


def test_bad_saves_change_nothing(tmp_path):
  _, tree = _tree()
  with CheckpointManager(tmp_path, best_metric="loss", async_save=False) as mgr:
    mgr.save(1, tree, metrics={"loss": 1.0})
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for kwargs, msg in [
        (dict(data_state={"f": object()}, metrics={"loss": 1.0}), "JSON-serialisable"),
        (dict(metrics={"acc": 1.0}), "lack the best metric 'loss'"),
        (dict(), "pass metrics="),
        (dict(metrics={"loss": float("nan")}), "finite"),
        (dict(metrics={"loss": 1.0}, metadata={1j: 2}), "JSON-serialisable"),
    ]:
      with pytest.raises(jlora.CheckpointError, match=msg):
        mgr.save(2, tree, **kwargs)
    with pytest.raises(jlora.CheckpointError, match="not after the latest saved step 1"):
      mgr.save(1, tree, metrics={"loss": 1.0})
    with pytest.raises(jlora.CheckpointError, match="non-negative int"):
      mgr.save(-1, tree, metrics={"loss": 1.0})
    with pytest.raises(jlora.TreeError, match="combine"):
      mgr.save(2, jlora.split(tree)[0], metrics={"loss": 1.0})
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert mgr.all_steps() == [1]


def test_restore_errors(tmp_path):
  params, tree = _tree()
  tx = jlora.optimizer(optax.adam(1e-2))
  opt_state = tx.init(jlora.split(tree)[0])
  with CheckpointManager(tmp_path / "empty") as mgr:
    with pytest.raises(jlora.CheckpointError, match="no a complete checkpoint|holds no"):
      mgr.restore(params)
  with CheckpointManager(tmp_path / "run", async_save=False) as mgr:
    mgr.save(3, tree, opt_state)
    with pytest.raises(jlora.CheckpointError, match=r"step 4 is not in .*available: \[3\]"):
      mgr.restore(params, step=4)
    with pytest.raises(jlora.CheckpointError, match="other rules"):
      mgr.restore(_tree(rank=3)[1])
    other = {**params, "k": params["k"] + 1.0}
    with pytest.raises(jlora.CheckpointError, match=r"another base.*'k'.*check_base=False"):
      mgr.restore(other)
    assert mgr.restore(other, check_base=False).tree["k"].w is other["k"]
    sgd_state = jlora.optimizer(optax.sgd(0.1, momentum=0.9)).init(jlora.split(tree)[0])
    with pytest.raises(jlora.CheckpointError, match="optimizer state template does not match"):
      mgr.restore(params, sgd_state)
    # A tampered array checksum: the step is reported corrupt, with the alternatives.
    meta = next((tmp_path / "run" / "3" / "meta").glob("*"))
    m = json.loads(meta.read_text())
    m["opt_state"][1]["sha256"] = "0" * 64
    meta.write_text(json.dumps(m))
    with pytest.raises(jlora.CheckpointError, match=r"step 3.*corrupt"):
      mgr.restore(params, opt_state)


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path):
  params, tree = _tree()
  with CheckpointManager(tmp_path, async_save=False) as mgr:
    mgr.save(1, tree)
  (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()
  (tmp_path / "2.orbax-checkpoint-tmp-123" / "junk").write_text("x")
  (tmp_path / "_deleted" / "0" / "arrays").mkdir(parents=True)
  with CheckpointManager(tmp_path) as mgr:
    assert mgr.all_steps() == [1] and mgr.restore(params).step == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "_deleted"]
  assert not any((tmp_path / "_deleted").iterdir())


def _run_child(script, directory, crash_at=None):
  env = dict(os.environ)
  if crash_at:
    env["CRASH_AT"] = crash_at
  return subprocess.Popen([sys.executable, str(script), str(directory)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, env=env)


def _collect(proc, lines, ready):
  for line in proc.stdout:
    if not line.endswith("\n"):  # the child was SIGKILLed halfway through writing this line
      break
    lines.append(line.split())
    if line.startswith("saving 3"):
      ready.set()
  ready.set()


@pytest.mark.slow
def test_sigkill_during_saves_restores_the_last_complete_step_and_resumes_bit_exactly(train, tmp_path):
  mod, script, params, template, frozen, step, states = train
  rnd = random.Random(int(os.environ.get("JLORA_CRASH_SEED", time.time_ns() % 10**6)))
  # Random moments (external SIGKILL), and kills just before Orbax's final rename of a step
  # and halfway through deleting an old step.
  trials = [("random", None), ("random", None), ("random", None),
            ("rename", f"rename:{rnd.randint(4, 12)}"), ("purge", f"purge:{rnd.randint(1, 6)}")]
  procs = []
  for n, (kind, crash_at) in enumerate(trials):
    d = tmp_path / f"trial{n}"
    proc = _run_child(script, d, crash_at)
    lines, ready = [], threading.Event()
    threading.Thread(target=_collect, args=(proc, lines, ready), daemon=True).start()
    procs.append((kind, crash_at, d, proc, lines, ready))
  for kind, crash_at, d, proc, lines, ready in procs:
    assert ready.wait(240), f"trial {kind} never started saving"
    if kind == "random":  # a random moment after the third save started
      threading.Timer(rnd.uniform(0.0, 2.0), proc.send_signal, (signal.SIGKILL,)).start()
  report = []
  for kind, crash_at, d, proc, lines, ready in procs:
    proc.wait(240)
    assert proc.returncode == -signal.SIGKILL, (kind, proc.returncode)
    time.sleep(0.2)  # let the reader thread drain stdout
    proc.stdout.close()
    started = [int(x[1]) for x in lines if x[0] == "saving"]
    durable = [int(x[1]) for x in lines if x[0] == "durable"]
    partial = [p.name for p in d.iterdir() if "tmp" in p.name]
    with mod.manager(d) as mgr:
      assert not [p.name for p in d.iterdir() if "tmp" in p.name]  # leftovers removed
      latest = mgr.latest_step()
      assert latest is not None and latest <= max(started)
      assert latest >= max(durable, default=0)
      for s in mgr.all_steps():  # every step on disk is complete and exactly the reference's
        r = mgr.restore(params, template, step=s)
        _assert_same(_snapshot(jlora.split(r.tree)[0], r.opt_state, r.rng), states[s])
        assert r.data_state == {"next_batch": s}
      r = mgr.restore(params, template)
      assert r.step == latest
      # Resume from the restored state to the end: bit-identical to the uninterrupted run.
      trainable, opt_state, rng = jlora.split(r.tree)[0], r.opt_state, r.rng
      for i in range(r.data_state["next_batch"], mod.STEPS):
        trainable, opt_state, rng, loss = step(trainable, opt_state, rng, *mod.batch(i))
      _assert_same(_snapshot(trainable, opt_state, rng), states[mod.STEPS])
      assert mgr.save(mod.STEPS, jlora.combine(trainable, frozen), opt_state, rng=rng,
                      data_state={"next_batch": mod.STEPS}, metrics={"loss": float(loss)})
    report.append(f"{kind}{'(' + crash_at + ')' if crash_at else ''}: killed after starting "
                  f"{max(started)} saves ({max(durable, default=0)} known durable, partial "
                  f"write left: {bool(partial)}), restored step {latest}")
  print("\n" + "\n".join(report))


DISK_FULL = textwrap.dedent('''
    import resource, signal, sys
    import jax, jax.numpy as jnp, jlora
    from jlora._checkpoint import save_adapters
    from jlora._manager import CheckpointManager

    root = sys.argv[1]
    params = {"k": jax.random.normal(jax.random.key(1), (64, 64))}
    tree = jlora.wrap(params, {"k": jlora.LoRA(4)}, key=jax.random.key(0))
    mgr = CheckpointManager(root + "/run")
    mgr.save(1, tree)
    mgr.wait_until_finished()
    save_adapters(root + "/adapters", tree)
    # From here on no file may grow beyond 64 KiB, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    big = {"blob": "x" * 300_000}
    try:
      save_adapters(root + "/adapters", tree, metadata=big, overwrite=True)
      print("adapters: no error")
    except jlora.CheckpointError as e:
      print("adapters:", e)
    try:
      mgr.save(2, tree, metadata=big)
      mgr.wait_until_finished()
      print("manager: no error")
    except jlora.CheckpointError as e:
      print("manager:", e)
    print("steps:", mgr.all_steps())
''')


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoints(tmp_path):
  script = tmp_path / "disk_full.py"
  script.write_text(DISK_FULL)
  out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
  lines = {ln.split(":", 1)[0]: ln.split(":", 1)[1].strip() for ln in out.stdout.splitlines() if ":" in ln}
  assert "adapters" in lines and "manager" in lines, out.stdout + out.stderr[-3000:]
  assert "the disk is full" in lines["adapters"] and "unchanged" in lines["adapters"]
  assert lines["manager"] != "no error"
  assert "could not save step 2" in lines["manager"] or "background save" in lines["manager"]
  assert lines["steps"] == "[1]"
  params = {"k": jax.random.normal(jax.random.key(1), (64, 64))}
  tree = jlora.wrap(params, {"k": jlora.LoRA(4)}, key=jax.random.key(0))
  assert load_adapters(tmp_path / "adapters", params)["k"].rank == 4  # the old one, intact
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapters")]
  with CheckpointManager(tmp_path / "run") as mgr:
    assert mgr.all_steps() == [1]
    np.testing.assert_array_equal(mgr.restore(params).tree["k"].a, tree["k"].a)
    assert not [p for p in (tmp_path / "run").iterdir() if "tmp" in p.name]
