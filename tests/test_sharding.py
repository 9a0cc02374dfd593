"""Sharding: adapter specs follow the base, presets, shard(), the train step on 8 fake devices.

Every sharded run is compared with the same steps on one device (the reference).
"""

from __future__ import annotations

import doctest
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

import jlora
from jlora import sharding
from jlora.models.llama import LlamaConfig, init_llama, llama_forward
from jlora.sharding import P
from jlora.train_step import make_train_step

ROOT = Path(__file__).resolve().parents[1]
MESHES = [(8,), (4, 2), (2, 4)]
# XLA's CPU backend at -O0 compiles the ~20 sharded steps here several times faster;
# it changes code generation only, not the partitioning under test.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2)
RULES = {"layers/**/kernel": jlora.LoRA(4, alpha=8, stack_axes=1),
         "embed_tokens/embedding": jlora.LoRA(4), "norm/scale": jlora.Full()}
BATCHES = np.random.default_rng(0).integers(0, 64, (3, 16, 9)).astype(np.int32)
LR = 1e-3
TOL = 1e-5

# Independent restatement of the presets: logical axis -> mesh axes, per mesh axis names.
KERNEL_AXES = {"q_proj": ("embed", "heads"), "k_proj": ("embed", "heads"),
               "v_proj": ("embed", "heads"), "o_proj": ("heads", "embed"),
               "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
               "down_proj": ("mlp", "embed")}


def _expected_logical(preset: str, names: tuple[str, ...]) -> dict:
  has = lambda a: a in names  # noqa: E731
  model = {"heads": "model", "mlp": "model", "vocab": "model"} if has("model") else {}
  everything = names[0] if len(names) == 1 else names
  return {"dp": {}, "fsdp": {"embed": everything}, "tp": model,
          "fsdp_tp": {**({"embed": "data"} if has("data") else {}), **model}}[preset]


def _fill(abstract, seed: int):
  """Random values for an abstract tree, from numpy (no XLA compile per leaf on a busy CPU)."""
  rng = np.random.default_rng(seed)

  def value(kp, s):
    x = rng.standard_normal(s.shape).astype(np.float32)
    x = 1 + 0.1 * x if "scale" in jax.tree_util.keystr(kp) else 0.05 * x
    return jnp.asarray(x)

  return jax.tree_util.tree_map_with_path(value, abstract)


def llama_params():
  return _fill(jax.eval_shape(lambda k: init_llama(CFG, k), jax.random.key(0)), 0)


def loss_fn(p, batch):
  ids = batch["ids"]
  logits = llama_forward(p, ids[:, :-1], CFG)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def run(tree, mesh=None, specs="dp", steps=3, accum_steps=1, **kw):
  step = make_train_step(loss_fn, optax.adamw(LR), mesh=mesh, specs=specs,
                         accum_steps=accum_steps, compiler_options=FAST, **kw)
  state, frozen = step.init(tree)
  losses = []
  for i in range(steps):
    state, m = step(state, frozen, {"ids": BATCHES[i]})
    losses.append(float(m["loss"]))
  return np.asarray(losses), state, frozen, step


def max_diff(t1, t2) -> float:
  l1, l2 = jax.tree.leaves(t1), jax.tree.leaves(t2)
  assert len(l1) == len(l2)
  return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(l1, l2))


@pytest.fixture(scope="module")
def tree():
  # B is random too (not zero as after wrap), so every factor has a gradient from step 1
  abstract = jax.eval_shape(lambda p: jlora.wrap(p, RULES, key=jax.random.key(1)), llama_params())
  return _fill(abstract, 1)


@pytest.fixture(scope="module")
def reference(tree):
  losses, state, _, _ = run(tree)
  return losses, jax.device_get(state.trainable)


# --- adapter specs from base specs ---------------------------------------------------------------


@pytest.mark.parametrize("w_spec, axes, want_a, want_b", [
    (P("data", "model"), jlora.Axes((), (0,), (1,)), P("data", None), P(None, "model")),
    (P("data"), jlora.Axes((), (0,), (1,)), P("data", None), P(None, None)),
    (P("layers", "data", "model"), jlora.Axes((0,), (1,), (2,)),
     P("layers", "data", None), P("layers", None, "model")),
    (P(("data", "model"), None), jlora.Axes((), (0,), (1,)), P(("data", "model"), None), P(None, None)),
    # DenseGeneral (d, heads, head_dim): in (0,), out (1, 2)
    (P("data", "model", None), jlora.Axes((), (0,), (1, 2)), P("data", None), P(None, "model", None)),
    # Conv (kh, kw, in, out)
    (P(None, None, "data", "model"), jlora.Axes((), (0, 1, 2), (3,)),
     P(None, None, "data", None), P(None, "model")),
    # out axes before in axes: (out, in) kernel
    (P("model", "data"), jlora.Axes((), (1,), (0,)), P("data", None), P(None, "model")),
    (None, jlora.Axes((), (0,), (1,)), P(None, None), P(None, None)),
])
def test_adapter_specs_follow_the_base(w_spec, axes, want_a, want_b):
  a, b = sharding.adapter_specs(w_spec, axes)
  assert (a, b) == (want_a, want_b)


def test_adapter_spec_longer_than_the_kernel_is_an_error():
  with pytest.raises(jlora.ShardingError, match="3 entries but the leaf has 2"):
    sharding.adapter_specs(P("a", "b", "c"), jlora.Axes((), (0,), (1,)))


def test_tree_specs_forms_agree(tree):
  mesh = sharding.make_mesh((4, 2))
  q = "layers/self_attn/q_proj/kernel"
  mapping = {q: P(None, "data", "model"), "embed_tokens/embedding": P("model", "data")}
  by_map = sharding.tree_specs(tree, mapping, mesh=mesh)
  base = jax.tree.map(lambda _: P(), llama_params())
  base["layers"]["self_attn"]["q_proj"]["kernel"] = P(None, "data", "model")
  base["embed_tokens"]["embedding"] = P("model", "data")
  by_tree = sharding.tree_specs(tree, base, mesh=mesh)
  again = sharding.tree_specs(tree, by_map, mesh=mesh)
  for other in (by_tree, again):
    assert jax.tree.structure(other) == jax.tree.structure(by_map)
    assert jax.tree.leaves(other) == jax.tree.leaves(by_map)
  node = by_map["layers"]["self_attn"]["q_proj"]["kernel"]
  assert (node.w, node.a, node.b) == (P(None, "data", "model"), P(None, "data", None),
                                      P(None, None, "model"))
  emb = by_map["embed_tokens"]["embedding"]
  assert (emb.a, emb.b) == (P("model", None), P(None, "data"))
  assert by_map["layers"]["mlp"]["up_proj"]["kernel"].a == P(None, None, None)
  # the halves of the spec tree are the spec trees of the halves
  trainable, frozen = jlora.split(tree)
  t_specs, f_specs = jlora.split(by_map)
  assert jax.tree.leaves(sharding.tree_specs(trainable, mapping, mesh=mesh)) == jax.tree.leaves(t_specs)
  assert jax.tree.leaves(sharding.tree_specs(frozen, mapping, mesh=mesh)) == jax.tree.leaves(f_specs)


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("preset", sharding.PRESETS)
def test_preset_specs_for_llama(tree, shape, preset):
  mesh = sharding.make_mesh(shape, preset)
  specs = sharding.tree_specs(tree, preset, mesh=mesh)
  logical = _expected_logical(preset, tuple(mesh.axis_names))
  m = lambda name: logical.get(name)  # noqa: E731
  for group in ("self_attn", "mlp"):
    for name, node in specs["layers"][group].items():
      lin, lout = KERNEL_AXES[name]
      node = node["kernel"]
      assert _same(node.w, P(None, m(lin), m(lout)), 3), (name, node.w)
      assert node.a == P(None, m(lin), None), (name, node.a)
      assert node.b == P(None, None, m(lout)), (name, node.b)
  emb = specs["embed_tokens"]["embedding"]
  assert emb.a == P(m("vocab"), None) and emb.b == P(None, m("embed"))
  assert _same(specs["lm_head"]["kernel"], P(m("embed"), m("vocab")), 2)
  assert _same(specs["norm"]["scale"].w, P(), 1)  # norms are never sharded
  names = tuple(mesh.axis_names)
  everything = names[0] if len(names) == 1 else names
  data = "data" if "data" in names else None
  assert sharding.batch_spec(preset, mesh) == P(
      {"dp": everything, "fsdp": everything}.get(preset, data))


def _same(s1, s2, ndim) -> bool:
  pad = lambda s: tuple(s) + (None,) * (ndim - len(s))  # noqa: E731
  return pad(s1) == pad(s2)


def test_preset_specs_for_bert():
  from jlora.models.bert import BertConfig, BertForSequenceClassification

  # 30522 is BERT's vocabulary: a 4-way model axis does not divide it, so it stays replicated
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=16, num_labels=3)
  params = jax.eval_shape(BertForSequenceClassification(cfg).init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32))["params"]
  tree = jlora.wrap(params, {"layers/**/{query,value}/kernel": jlora.LoRA(2, stack_axes=1)},
                    key=jax.random.key(0))
  mesh = sharding.make_mesh((2, 4))
  want = {"dp": (None, None), "fsdp": (("data", "model"), None), "tp": (None, "model"),
          "fsdp_tp": ("data", "model")}
  for preset, (embed, heads) in want.items():
    specs = sharding.tree_specs(tree, preset, mesh=mesh)
    q = specs["layers"]["attention"]["self"]["query"]["kernel"]
    assert q.a == P(None, embed, None) and q.b == P(None, None, heads), preset
    assert _same(specs["embeddings"]["word_embeddings"]["embedding"], P(None, embed), 2), preset
    assert _same(specs["classifier"]["kernel"], P(embed, None), 2), preset


# --- the training step on every mesh and preset ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("preset", sharding.PRESETS)
def test_sharded_lora_steps_equal_single_device(tree, reference, shape, preset):
  ref_losses, ref_trainable = reference
  mesh = sharding.make_mesh(shape, preset)
  losses, state, frozen, step = run(tree, mesh, preset)
  loss_diff = float(np.max(np.abs(losses - ref_losses)))
  diff = max_diff(state.trainable, ref_trainable)
  per_dev = sharding.per_device_bytes(frozen)
  print(f"\n{shape} {preset}: max |loss diff| {loss_diff:.2e}, max |adapter diff| {diff:.2e}, "
        f"frozen bytes per device {sorted(set(per_dev.values()))}")
  assert loss_diff <= TOL and diff <= TOL

  # every adapter array (and its optimizer moments) sits where the spec says
  expected = sharding.tree_specs(tree, preset, mesh=mesh)
  t_specs, f_specs = jlora.split(expected)
  _assert_placed(state.trainable, t_specs, mesh)
  _assert_placed(frozen, f_specs, mesh)
  logical = _expected_logical(preset, tuple(mesh.axis_names))
  q = state.trainable["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.a.sharding.is_equivalent_to(NamedSharding(mesh, P(None, logical.get("embed"), None)), 3)
  assert q.b.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, logical.get("heads"))), 3)
  adam = state.opt_state[0]
  _assert_placed(adam.mu, t_specs, mesh)
  _assert_placed(adam.nu, t_specs, mesh)


def _assert_placed(tree, spec_tree, mesh):
  arrays = jax.tree_util.tree_flatten_with_path(tree)[0]
  specs = jax.tree.leaves(spec_tree)
  assert len(arrays) == len(specs)
  for (kp, x), spec in zip(arrays, specs):
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (
        jax.tree_util.keystr(kp), x.sharding, spec)


@pytest.mark.parametrize("shape", MESHES)
def test_fsdp_puts_an_eighth_of_the_base_on_each_device(tree, shape):
  _, frozen = jlora.split(tree)
  total = sum(x.nbytes for x in jax.tree.leaves(frozen))
  norms = sum(x.nbytes for kp, x in jax.tree_util.tree_flatten_with_path(frozen)[0]
              if "layernorm" in jax.tree_util.keystr(kp))
  rows = {}
  for preset in sharding.PRESETS:
    placed = sharding.shard(frozen, sharding.make_mesh(shape, preset), preset)
    rows[preset] = max(sharding.per_device_bytes(placed).values())
  print(f"\nmesh {shape}: base {total} B; max bytes per device: "
        + ", ".join(f"{p} {b} ({b / total:.3f})" for p, b in rows.items()))
  assert total / 8 <= rows["fsdp"] <= total / 8 + norms  # only the (L, D) norm scales replicate
  assert rows["fsdp"] / total < 0.13
  assert rows["dp"] == total


@pytest.mark.slow
def test_gradient_accumulation_sharded_equals_one_big_batch(tree, reference):
  ref_losses, ref_trainable = reference
  # two micro-batches of 8 rows, each spread over the 4 'data' devices, give the 16-row batch's
  # mean loss and gradient (test_weighted_loss_* checks the weighting on its own)
  mesh = sharding.make_mesh((4, 2))
  losses, state, _, step = run(tree, mesh, "fsdp_tp", accum_steps=2)
  np.testing.assert_allclose(losses, ref_losses, atol=TOL, rtol=0)
  assert max_diff(state.trainable, ref_trainable) <= TOL
  assert "while" in step.lower(state, _, {"ids": BATCHES[0]}).as_text()  # a scan over micro-batches


@pytest.mark.slow
def test_full_fine_tuning_sharded_equals_single_device():
  params = llama_params()
  ref_losses, ref_state, _, step = run(params, steps=2)
  assert step.full
  mesh = sharding.make_mesh((2, 4))
  losses, state, frozen, step = run(params, mesh, "fsdp_tp", steps=2)
  assert frozen is None and step.full
  np.testing.assert_allclose(losses, ref_losses, atol=TOL, rtol=0)
  assert max_diff(state.trainable, ref_state.trainable) <= TOL
  assert state.trainable["layers"]["mlp"]["up_proj"]["kernel"].sharding.is_equivalent_to(
      NamedSharding(mesh, P(None, "data", "model")), 3)


@pytest.mark.slow
def test_donation_and_frozen_base_untouched(tree):
  mesh = sharding.make_mesh((4, 2))
  step = make_train_step(loss_fn, optax.adamw(LR), mesh=mesh, specs="fsdp", donate=True,
                         compiler_options=FAST)
  state, frozen = step.init(tree)
  old = jax.tree.leaves(state)
  new, _ = step(state, frozen, {"ids": BATCHES[0]})
  assert all(x.is_deleted() for x in old)  # the state's buffers were donated
  assert not any(x.is_deleted() for x in jax.tree.leaves(tree))  # init copied the user's tree
  assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))
  _, frozen_tree = jlora.split(tree)
  assert max_diff(frozen, frozen_tree) == 0.0
  assert int(new.step) == 1


def test_default_donation_is_off_on_cpu_and_explicit_donation_deletes_the_old_state():
  w = {"w": jnp.arange(4.0)}
  lossf = lambda p, b: jnp.sum((p["w"] * b["x"]) ** 2)  # noqa: E731
  batch = {"x": np.ones((8, 4), np.float32)}
  for mesh in (None, sharding.make_mesh((8,))):
    default = make_train_step(lossf, optax.sgd(0.1), mesh=mesh)
    assert default.donate is False  # every device here is a CPU
    state, frozen = default.init(w)
    old = jax.tree.leaves(state)
    new, _ = default(state, frozen, batch)
    assert not any(x.is_deleted() for x in old)
    donated = make_train_step(lossf, optax.sgd(0.1), mesh=mesh, donate=True)
    state2, frozen2 = donated.init(w)
    old2 = jax.tree.leaves(state2)
    new2, _ = donated(state2, frozen2, batch)
    assert all(x.is_deleted() for x in old2)
    assert max_diff(new.trainable, new2.trainable) == 0.0


@pytest.mark.parametrize("mesh_shape", [None, (8,)])
@pytest.mark.parametrize("donate", [False, True])
def test_the_step_compiles_once_over_several_calls(mesh_shape, donate):
  # the state init returns must match the state the step returns (committed to the same
  # device / sharding), or the second call compiles the step again
  tree = jlora.wrap({"w": jnp.ones((4, 3))}, {"w": jlora.LoRA(2)}, key=jax.random.key(0))
  lossf = lambda p, b: jnp.sum((b["x"] @ p["w"]) ** 2)  # noqa: E731
  mesh = None if mesh_shape is None else sharding.make_mesh(mesh_shape)
  step = make_train_step(lossf, optax.adamw(0.1), mesh=mesh, donate=donate)
  state, frozen = step.init(tree)
  for i in range(3):
    state, _ = step(state, frozen, {"x": np.full((8, 4), i, np.float32)})
  (jitted,) = step._jitted.values()
  assert jitted._cache_size() == 1


# --- errors --------------------------------------------------------------------------------------


def test_error_mesh_axis_that_does_not_exist(tree):
  mesh = sharding.make_mesh((4, 2))
  with pytest.raises(jlora.ShardingError) as e:
    sharding.tree_specs(tree, {"layers/mlp/up_proj/kernel": P(None, "fsdp")}, mesh=mesh)
  msg = str(e.value)
  assert "layers/mlp/up_proj/kernel/w" in msg and "'fsdp'" in msg and "dimension 1" in msg
  rules = sharding.ShardingRules(logical=(("mlp", "tensor"),))
  with pytest.raises(jlora.ShardingError, match=r"layers/mlp/down_proj/kernel.*'mlp'.*'tensor'"):
    sharding.tree_specs(tree, rules, mesh=mesh)
  with pytest.raises(jlora.ShardingError, match="'model'"):
    sharding.preset("tp", sharding.make_mesh((8,), "dp"))
  with pytest.raises(jlora.ShardingError, match="batch.*'rows'"):
    sharding.batch_spec(sharding.ShardingRules(batch="rows"), mesh)


def test_error_dimension_the_mesh_does_not_divide(tree):
  mesh = sharding.make_mesh((4, 2))
  with pytest.raises(jlora.ShardingError) as e:
    sharding.tree_specs({"w": jnp.zeros((6, 4))}, {"w": P("data")}, mesh=mesh)
  assert "'w'" in str(e.value) and "dimension 0 has size 6" in str(e.value) and "'data'" in str(e.value)
  odd = jlora.wrap({"k": jnp.zeros((8, 12))}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
  with pytest.raises(jlora.ShardingError, match=r"'k/w': dimension 1 has size 12.*\('data', 'model'\)"):
    sharding.tree_specs(odd, {"k": P(None, ("data", "model"))}, mesh=mesh)
  rules = sharding.ShardingRules(logical=(("mlp", "data"),),
                                 axes=(("k", ("embed", "mlp")),))
  with pytest.raises(jlora.ShardingError, match=r"'k'.*dimension 1.*'mlp'.*size 12.*fallback"):
    sharding.tree_specs(odd, rules, mesh=sharding.make_mesh((8,)))
  with pytest.raises(jlora.ShardingError, match="20 rows"):
    from jlora import distributed
    distributed.global_batch({"ids": np.zeros((20, 3))}, mesh, P(("data", "model")))


def test_error_spec_for_a_path_not_in_the_tree(tree):
  mesh = sharding.make_mesh((4, 2))
  with pytest.raises(jlora.ShardingError) as e:
    sharding.tree_specs(tree, {"layers/self_attn/qproj/kernel": P(None, "data")}, mesh=mesh)
  msg = str(e.value)
  assert "'layers/self_attn/qproj/kernel'" in msg and "not in the tree" in msg
  assert "layers/self_attn/q_proj/kernel" in msg  # the closest path is suggested
  base = jax.tree.map(lambda _: P(), llama_params())
  base["layers"]["extra"] = {"kernel": P()}
  with pytest.raises(jlora.ShardingError, match="'layers/extra/kernel', which is not in the tree"):
    sharding.tree_specs(tree, base, mesh=mesh)
  del base["layers"]["extra"], base["norm"]
  with pytest.raises(jlora.ShardingError, match="no entry for the leaf 'norm/scale'"):
    sharding.tree_specs(tree, base, mesh=mesh)


def test_error_bad_inputs_leave_nothing_half_done(tree):
  with pytest.raises(jlora.ShardingError, match="unknown sharding preset 'zero3'"):
    sharding.tree_specs(tree, "zero3", mesh=sharding.make_mesh((8,)))
  with pytest.raises(jlora.ShardingError, match="needs 6 devices"):
    sharding.make_mesh((3, 2))
  with pytest.raises(jlora.ShardingError, match="cannot tell which model"):
    sharding.tree_specs({"w": jnp.zeros((8, 8))}, "fsdp", mesh=sharding.make_mesh((8,)))
  with pytest.raises(jlora.ShardingError, match=r"\('data', 'model'\) are not Auto"):
    make_train_step(loss_fn, optax.sgd(0.1), mesh=jax.make_mesh((4, 2), ("data", "model")))
  # "dp" shards no weight, so it needs no logical axes and fits any tree
  assert sharding.tree_specs({"w": jnp.zeros((8, 8))}, "dp", mesh=sharding.make_mesh((8,))) == {"w": P()}


# --- docs and the TPU script ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jlora.sharding", "jlora.train_step", "jlora.distributed"])
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted and result.failed == 0
  for public in module.__all__:
    obj = getattr(module, public)
    if callable(obj) and not isinstance(obj, type(P)):
      assert ">>>" in (obj.__doc__ or ""), f"{name}.{public} has no example"


@pytest.mark.slow
def test_train_tpu_script_runs_smollm2_on_a_fake_mesh(tmp_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  out = tmp_path / "result.txt"
  cmd = [sys.executable, str(ROOT / "experiments" / "train_tpu.py"), "--model", "smollm2",
         "--mesh", "4,2", "--preset", "fsdp_tp", "--steps", "3", "--batch", "8", "--seq", "16",
         "--fast-compile", "--out", str(out)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = proc.stdout
  print(text)
  tps = re.search(r"tokens/s: ([0-9.]+)", text)
  assert tps and float(tps.group(1)) > 0
  losses = [float(x) for x in re.findall(r"step \d+ loss ([0-9.]+)", text)]
  assert len(losses) == 3 and all(np.isfinite(losses)) and 0 < losses[0] < 20
  assert "devices: 8" in text and "mesh: (4, 2)" in text
  assert all(line in text for line in out.read_text().splitlines())


# --- weighted losses and dropout keys (a tiny linear model: cheap to compile) --------------------


def _linear_case():
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.standard_normal((4, 5)).astype(np.float32))}
  x = rng.standard_normal((16, 4)).astype(np.float32)
  y = rng.integers(0, 5, 16).astype(np.int32)
  y[[0, 2, 4, 6, 8, 1]] = -1  # micro-batch 0 (even rows) keeps 3 rows, micro-batch 1 keeps 7
  return params, {"x": x, "y": y}


def _ce_sum(p, b):
  logp = jax.nn.log_softmax(b["x"] @ p["w"])
  valid = b["y"] >= 0
  nll = -jnp.take_along_axis(logp, jnp.maximum(b["y"], 0)[:, None], axis=1)[:, 0]
  return jnp.sum(nll * valid), jnp.sum(valid)


@pytest.mark.parametrize("shape", [None, (4, 2)])
def test_weighted_loss_is_exact_across_micro_batches(shape):
  params, batch = _linear_case()
  mean = lambda p: _ce_sum(p, batch)[0] / _ce_sum(p, batch)[1]  # noqa: E731
  want_loss, grad = jax.value_and_grad(mean)(params)
  mesh = None if shape is None else sharding.make_mesh(shape)
  step = make_train_step(_ce_sum, optax.sgd(0.5), mesh=mesh, specs={"w": P("model")},
                         accum_steps=2)
  state, frozen = step.init(params)
  state, m = step(state, frozen, batch)
  assert float(m["weight"]) == 10.0
  np.testing.assert_allclose(float(m["loss"]), float(want_loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.trainable["w"]),
                             np.asarray(params["w"] - 0.5 * grad["w"]), atol=1e-6)
  if mesh is not None:
    assert state.trainable["w"].sharding.is_equivalent_to(NamedSharding(mesh, P("model")), 2)


def test_dropout_keys_are_per_micro_batch_and_the_same_sharded():
  params, batch = _linear_case()

  def noisy(p, b, key):
    keep = jax.random.bernoulli(key, 0.5, b["x"].shape)
    return _ce_sum(p, {"x": b["x"] * keep * 2.0, "y": b["y"]})

  def run_once(mesh, key):
    step = make_train_step(noisy, optax.sgd(0.5), mesh=mesh, specs={"w": P()}, accum_steps=2)
    state, frozen = step.init(params)
    state, m = step(state, frozen, batch, jax.random.key(key))
    return float(m["loss"]), np.asarray(state.trainable["w"])

  l1, w1 = run_once(None, 0)
  l2, w2 = run_once(sharding.make_mesh((8,)), 0)
  l3, _ = run_once(None, 1)
  assert abs(l1 - l2) < 1e-6 and np.max(np.abs(w1 - w2)) < 1e-6
  assert l1 != l3
  # the two micro-batches get different keys: fold_in(key, 0) and fold_in(key, 1)
  k = jax.random.key(0)
  evens, odds = ({n: v[i::2] for n, v in batch.items()} for i in (0, 1))
  t0, c0 = noisy(params, evens, jax.random.fold_in(k, 0))
  t1, c1 = noisy(params, odds, jax.random.fold_in(k, 1))
  np.testing.assert_allclose(l1, float((t0 + t1) / (c0 + c1)), rtol=1e-6)


# --- a quantised base (QLoRA) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def qtree():
  q = jlora.quantize(llama_params(), {"layers/**/kernel": jlora.NF4(block_size=32, stack_axes=1),
                                      "embed_tokens/embedding": jlora.Q8_0()})
  tree = jlora.wrap(q, {"layers/self_attn/{q_proj,v_proj}/kernel": jlora.LoRA(4, stack_axes=1)},
                    key=jax.random.key(1))
  for name in ("q_proj", "v_proj"):
    leaf = tree["layers"]["self_attn"][name]["kernel"]
    tree["layers"]["self_attn"][name]["kernel"] = leaf.replace(b=jnp.full(leaf.b.shape, 0.05))
  return tree


@pytest.mark.parametrize("shape, preset", [((4, 2), "fsdp_tp"), ((8,), "tp")])
def test_quantised_base_shards_with_its_kernel_and_steps_equal_single_device(qtree, shape, preset):
  mesh = sharding.make_mesh(shape, preset)
  specs = sharding.tree_specs(qtree, preset, mesh=mesh)
  model = "model" if "model" in mesh.axis_names else None
  q = specs["layers"]["self_attn"]["q_proj"]["kernel"]
  assert jlora.is_quantized(q.w)
  # q_proj's outputs (heads) shard over the model axis: its packed rows and scales follow them
  assert q.w.data == P(None, model) and q.w.absmax == P(None, model)
  assert q.w.absmax2 == P(None, None) and q.w.offset == P(None)
  up = specs["layers"]["mlp"]["up_proj"]["kernel"]
  assert up.data == P(None, model)
  emb = specs["embed_tokens"]["embedding"]  # rows are vocabulary entries
  assert emb.data == P(model) and emb.absmax == P(model)
  ref_losses, ref_state, _, _ = run(qtree)
  losses, state, frozen, _ = run(qtree, mesh, preset)
  np.testing.assert_allclose(losses, ref_losses, atol=TOL)
  assert max_diff(state.trainable, jax.device_get(ref_state.trainable)) <= TOL
  t_specs, f_specs = jlora.split(specs)
  _assert_placed(frozen, f_specs, mesh)
  per_dev = sharding.per_device_bytes(frozen)
  total = sum(x.nbytes for x in jax.tree.leaves(frozen))
  assert max(per_dev.values()) < total  # the packed base is spread out, not replicated
