"""The adapter protocol's conformance suite: every registered method passes the same properties.

A new method registers its leaf (``jlora._adapter.register``) and adds one entry to ``CASES``:
a function ``stacked -> spec`` giving the spec for a Dense kernel (``stacked=False``) and for a
stacked ``(L, in, out)`` kernel scanned over layers (``stacked=True``). Then every test below
runs on it; ``test_every_registered_kind_has_a_case`` fails until the entry exists.

References are independent of the code under test where it matters: ``lora(fn)`` is compared
with ``fn`` on ``merge(tree)`` (plain JAX on merged arrays), gradients with ``jax.grad`` of
that merged computation, sharded runs with the single-device run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import jlora
from jlora import _adapter
from jlora import sharding

KEY = jax.random.key(0)

CASES = {
    "lora": lambda stacked: jlora.LoRA(2, alpha=4, stack_axes=1 if stacked else None),
    "full": lambda stacked: jlora.Full(),
    "dora": lambda stacked: jlora.DoRA(2, alpha=4, stack_axes=1 if stacked else None),
    "lora_init": lambda stacked: jlora.LoRA(2, alpha=4, init="pissa", stack_axes=1 if stacked else None),
    "ia3": lambda stacked: jlora.IA3(feedforward=stacked, stack_axes=1 if stacked else None),
    "vera": lambda stacked: jlora.VeRA(3, stack_axes=1 if stacked else None),
    "adalora": lambda stacked: jlora.AdaLoRA(3, 2, total_step=10, stack_axes=1 if stacked else None),
    "bottleneck": lambda stacked: jlora.Bottleneck(width=3, non_linearity="swish", init="zero",
                                                   stack_axes=1 if stacked else None),
}


def _bottleneck_reference(tree, x):
  """``_fn`` written out by hand with a bottleneck on each contraction's output (plain JAX)."""
  def adapted(h, leaf, layer=None):
    take = (lambda a: a) if layer is None else (lambda a: a[layer])
    w, down, up, bd, bu = (take(getattr(leaf, n)) for n in ("w", "down", "up", "bias_down", "bias_up"))
    z = h @ w
    return z + jax.nn.silu(z @ down + bd) @ up + bu
  d, s = tree["dense"]["kernel"], tree["stack"]["kernel"]
  h = jnp.tanh(adapted(x, d) + tree["dense"]["bias"])
  return sum(jnp.tanh(adapted(h, s, i)) for i in range(s.w.shape[0]))


# Kinds that are not a change of the weight (a network on a layer's output): merge must refuse
# them, and lora(fn) is checked against a hand-written reference instead of fn on merge(tree).
UNMERGEABLE = {"bottleneck": _bottleneck_reference}


def _params():
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 8)) / 3, jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32)},
          "stack": {"kernel": jnp.asarray(rng.normal(size=(2, 8, 4)) / 3, jnp.float32)}}


def _fn(p, x):
  h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])

  def body(c, w):
    return c, jnp.tanh(c @ w)
  _, ys = lax.scan(body, h, p["stack"]["kernel"])
  return ys.sum(0)


def _rules(kind):
  make = CASES[kind]
  return {"dense/kernel": make(False), "stack/kernel": make(True)}


def _randomised(tree, seed=1):
  """Every trainable child replaced by random values (so that no factor is zero)."""
  rng = np.random.default_rng(seed)

  def go(x):
    if not jlora.is_adapted(x):
      return x
    return x.replace(**{n: jnp.asarray(np.asarray(getattr(x, n)) + 0.3 * rng.normal(size=getattr(x, n).shape),
                                       getattr(x, n).dtype) for n in x.trainable})
  return jax.tree.map(go, tree, is_leaf=jlora.is_adapted)


X = jnp.asarray(np.random.default_rng(2).normal(size=(4, 8)), jnp.float32)

# Routed kinds stand for N weights at once (jlora.stack_adapters): merge, unmerge and a plain
# lora(fn) call do not apply, so they have their own suite against PEFT (tests/test_multi.py).
ROUTED = {"stacked_lora": "tests/test_multi.py"}
KINDS = sorted(k for k in _adapter.kinds() if not _adapter.leaf_class(k).routed)


@pytest.fixture(scope="module", params=KINDS)
def case(request):
  kind = request.param
  if kind not in CASES:
    pytest.fail(f"adapter kind {kind!r} is registered but has no entry in CASES")
  params = _params()
  tree = jlora.wrap(params, _rules(kind), key=KEY)
  return kind, params, tree, _randomised(tree)


def test_every_registered_kind_has_a_case():
  assert set(KINDS) <= set(CASES), sorted(set(KINDS) - set(CASES))
  routed = {k for k in _adapter.kinds() if _adapter.leaf_class(k).routed}
  assert routed == set(ROUTED), sorted(routed ^ set(ROUTED))


def test_wrapping_changes_nothing_at_init(case):
  kind, params, tree, _ = case
  if kind in UNMERGEABLE:
    np.testing.assert_array_equal(jlora.lora(_fn)(tree, X), _fn(params, X))
    return
  merged = jlora.merge(tree)
  for path in ("dense/kernel", "stack/kernel"):
    a, b = path.split("/")
    np.testing.assert_allclose(merged[a][b], params[a][b], rtol=1e-5, atol=1e-6, err_msg=kind)
  node = tree["dense"]["kernel"]
  assert node.kind == kind and node.shape == (8, 8)


def test_lora_fn_equals_fn_on_the_merged_tree_values_and_gradients(case):
  kind, _, _, tree = case
  trainable, frozen = jlora.split(tree)
  lifted = jlora.lora(_fn, strict=True)

  def loss_lora(t):
    return jnp.sum(lifted(jlora.combine(t, frozen), X) ** 2)

  def loss_ref(t):
    if kind in UNMERGEABLE:
      return jnp.sum(UNMERGEABLE[kind](jlora.combine(t, frozen), X) ** 2)
    return jnp.sum(_fn(jlora.merge(jlora.combine(t, frozen)), X) ** 2)
  (v1, g1), (v2, g2) = jax.value_and_grad(loss_lora)(trainable), jax.value_and_grad(loss_ref)(trainable)
  np.testing.assert_allclose(v1, v2, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g1))


def test_unmerge_of_merge_restores_the_base(case):
  kind, params, _, tree = case
  if kind in UNMERGEABLE:
    with pytest.raises(jlora.TreeError, match="cannot be merged"):
      jlora.merge(tree)
    return
  back = jlora.unmerge(jlora.merge(tree), tree)
  for path in ("dense/kernel", "stack/kernel"):
    a, b = path.split("/")
    if "w" in tree[a][b].trainable:
      continue  # a leaf trained in full has no separate base to restore
    np.testing.assert_allclose(back[a][b], tree[a][b].w, rtol=1e-5, atol=1e-5, err_msg=kind)


def test_gradients_reach_only_trainable_children(case):
  _, _, _, tree = case
  lifted = jlora.lora(_fn)
  grads = jax.grad(lambda t: jnp.sum(lifted(t, X) ** 2))(tree)
  for node, g in zip(jax.tree.leaves(tree, is_leaf=jlora.is_adapted),
                     jax.tree.leaves(grads, is_leaf=jlora.is_adapted)):
    if not jlora.is_adapted(node):
      continue
    for n in node.frozen:
      assert float(jnp.abs(getattr(g, n)).max()) == 0.0, (node.kind, n)
    assert any(float(jnp.abs(getattr(g, n)).max()) > 0 for n in node.trainable), node.kind


def test_split_combine_optimizer_and_summary(case):
  _, _, _, tree = case
  trainable, frozen = jlora.split(tree)
  assert jax.tree.structure(jlora.combine(trainable, frozen)) == jax.tree.structure(tree)
  want = sorted(tuple(getattr(x, n).shape) for x in jax.tree.leaves(tree, is_leaf=jlora.is_adapted)
                if jlora.is_adapted(x) for n in x.trainable)
  got = sorted(tuple(x.shape) for x in jax.tree.leaves(trainable))
  assert got == want
  state = jlora.optimizer(optax.adam(1e-2)).init(trainable)  # adam: mu and nu per trainable array
  assert sorted(tuple(x.shape) for x in jax.tree.leaves(state) if x.ndim) == sorted(want + want)
  s = jlora.summary(tree)
  assert s.trainable == sum(int(np.prod(shape)) for shape in want)


def test_save_load_is_bit_exact(case, tmp_path):
  _, params, _, tree = case
  restored = jlora.load_adapters(jlora.save_adapters(tmp_path / "c", tree), params)
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_equivalent_rules_give_the_same_structure(case):
  kind, params, tree, _ = case
  other = jlora.wrap(params, [("re:dense/kernel", CASES[kind](False)),
                              ("stack/*", CASES[kind](True))], key=KEY)
  assert jax.tree.structure(other) == jax.tree.structure(tree)
  jlora.combine(jlora.split(other)[0], jlora.split(tree)[1])  # no TreeError


def test_sharded_equals_unsharded_on_8_devices(case):
  _, _, _, tree = case
  mesh = sharding.make_mesh((2, 4))
  placed = sharding.shard(tree, mesh, {"dense/kernel": P("data", "model"),
                                       "stack/kernel": P(None, "data", "model")})
  lifted = jax.jit(jlora.lora(_fn))
  ref = lifted(tree, X)
  got = lifted(placed, X)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  for node in jax.tree.leaves(placed, is_leaf=jlora.is_adapted):
    if jlora.is_adapted(node):
      assert all(len(getattr(node, n).sharding.device_set) == 8 for n in node.children())
      # the trainable children follow the base's layout: some of them are split, not copied
      assert any(not getattr(node, n).sharding.is_fully_replicated for n in node.trainable), node


def test_swapping_adapters_does_not_recompile(case):
  _, _, tree0, tree1 = case
  traces = []

  @jax.jit
  def run(t, x):
    traces.append(1)
    return jlora.lora(_fn)(t, x)
  run(tree0, X)
  run(tree1, X)
  run(_randomised(tree0, seed=5), X)
  assert len(traces) == 1
