"""Core transform: wrap / split / combine / merge / unmerge / optimizer / summary."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

import jlora

KEY = jax.random.key(0)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@st.composite
def kernels(draw):
  n_in = draw(st.integers(1, 24))
  n_out = draw(st.integers(1, 24))
  rank = draw(st.integers(1, min(n_in, n_out)))
  dtype = draw(st.sampled_from(sorted(DTYPES)))
  alpha = draw(st.floats(0.25, 64.0))
  rslora = draw(st.booleans())
  init = draw(st.sampled_from(["kaiming", "gaussian"]))
  seed = draw(st.integers(0, 2**16))
  return n_in, n_out, rank, dtype, alpha, rslora, init, seed


def _random_tree(n_in, n_out, dtype, seed):
  rng = np.random.default_rng(seed)
  return {
      "layer": {"kernel": jnp.asarray(rng.normal(size=(n_in, n_out)), DTYPES[dtype]),
                "bias": jnp.asarray(rng.normal(size=(n_out,)), DTYPES[dtype])},
  }


@given(kernels())
def test_fresh_wrap_merges_to_the_original(case):
  n_in, n_out, rank, dtype, alpha, rslora, init, seed = case
  params = _random_tree(n_in, n_out, dtype, seed)
  spec = jlora.LoRA(rank, alpha=alpha, rslora=rslora, init=init)
  tree = jlora.wrap(params, {"**/kernel": spec}, key=jax.random.key(seed))
  merged = jlora.merge(tree)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@given(kernels())
def test_merge_equals_numpy_reference(case):
  n_in, n_out, rank, dtype, alpha, rslora, init, seed = case
  params = _random_tree(n_in, n_out, dtype, seed)
  spec = jlora.LoRA(rank, alpha=alpha, rslora=rslora, init=init)
  tree = jlora.wrap(params, {"**/kernel": spec}, key=jax.random.key(seed))
  rng = np.random.default_rng(seed + 1)
  leaf = tree["layer"]["kernel"]
  b = jnp.asarray(rng.normal(size=leaf.b.shape), leaf.b.dtype)
  tree["layer"]["kernel"] = leaf.replace(b=b)
  merged = jlora.merge(tree)["layer"]["kernel"]
  scale = alpha / (math.sqrt(rank) if rslora else rank)
  w = np.asarray(params["layer"]["kernel"], np.float64)
  ref = w + scale * np.asarray(leaf.a, np.float64) @ np.asarray(b, np.float64)
  tol = {"float32": 1e-5, "bfloat16": 2**-7, "float16": 2**-10}[dtype]
  np.testing.assert_allclose(np.asarray(merged, np.float64), ref, rtol=tol, atol=tol * (1 + np.abs(ref).max()))
  assert merged.dtype == params["layer"]["kernel"].dtype


@given(kernels())
def test_unmerge_recovers_the_base_within_documented_tolerance(case):
  n_in, n_out, rank, dtype, alpha, rslora, init, seed = case
  params = _random_tree(n_in, n_out, dtype, seed)
  tree = jlora.wrap(params, {"**/kernel": jlora.LoRA(rank, alpha=alpha, rslora=rslora, init=init)},
                    key=jax.random.key(seed))
  leaf = tree["layer"]["kernel"]
  tree["layer"]["kernel"] = leaf.replace(b=jnp.full(leaf.b.shape, 0.1, leaf.b.dtype))
  base = jlora.unmerge(jlora.merge(tree), tree)
  w = np.asarray(params["layer"]["kernel"], np.float64)
  delta = np.abs(np.asarray(tree["layer"]["kernel"].delta(), np.float64))
  rel = {"float32": 2**-21, "bfloat16": 2**-7, "float16": 2**-10}[dtype]
  err = np.abs(np.asarray(base["layer"]["kernel"], np.float64) - w)
  assert np.all(err <= rel * (np.abs(w) + delta) + 1e-30), err.max()
  np.testing.assert_array_equal(np.asarray(base["layer"]["bias"]), np.asarray(params["layer"]["bias"]))


def test_wrap_does_not_touch_its_input_and_init_is_a_no_op_for_the_forward():
  params = _random_tree(5, 7, "float32", 0)
  before = jax.tree.map(np.array, params)
  tree = jlora.wrap(params, {"**/kernel": jlora.LoRA(2)}, key=KEY)
  f = lambda p, x: x @ p["layer"]["kernel"] + p["layer"]["bias"]
  x = jnp.ones((3, 5))
  np.testing.assert_array_equal(jlora.lora(f)(tree, x), f(params, x))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_init_distributions_follow_peft():
  w = jnp.zeros((400, 300))
  t = jlora.wrap({"k": w}, {"k": jlora.LoRA(16)}, key=KEY)["k"]
  bound = 1 / math.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) on (r, in) weight
  assert float(jnp.abs(t.a).max()) <= bound
  assert float(jnp.abs(t.a).max()) > 0.95 * bound
  assert float(jnp.abs(t.b).max()) == 0.0
  g = jlora.wrap({"k": w}, {"k": jlora.LoRA(16, init="gaussian")}, key=KEY)["k"]
  np.testing.assert_allclose(float(jnp.std(g.a)), 1 / 16, rtol=0.05)
  assert float(jnp.abs(g.b).max()) == 0.0


def test_per_leaf_keys_do_not_depend_on_other_rules():
  p = {"x": jnp.ones((6, 6)), "y": jnp.ones((6, 6))}
  one = jlora.wrap(p, {"x": jlora.LoRA(2)}, key=KEY)
  two = jlora.wrap(p, {"{x,y}": jlora.LoRA(2)}, key=KEY)
  np.testing.assert_array_equal(one["x"].a, two["x"].a)
  assert not np.array_equal(two["x"].a, two["y"].a)


# -- rules ------------------------------------------------------------------

def test_rules_list_is_first_match_wins_and_none_excludes():
  p = {"attn": {"q": {"kernel": jnp.ones((4, 4))}, "k": {"kernel": jnp.ones((4, 4))}}}
  tree = jlora.wrap(p, [("attn/k/kernel", None), ("**/kernel", jlora.LoRA(2))], key=KEY)
  assert isinstance(tree["attn"]["q"]["kernel"], jlora.LoraWeight)
  assert not isinstance(tree["attn"]["k"]["kernel"], jlora.LoraWeight)
  tree = jlora.wrap(p, [("attn/q/kernel", jlora.LoRA(1)), ("**/kernel", jlora.LoRA(3))], key=KEY)
  assert tree["attn"]["q"]["kernel"].rank == 1 and tree["attn"]["k"]["kernel"].rank == 3


def test_glob_regex_and_callable_rules():
  p = {"layers": [{"attn": {"q_proj": {"kernel": jnp.ones((4, 4))},
                            "v_proj": {"kernel": jnp.ones((4, 4))},
                            "o_proj": {"kernel": jnp.ones((4, 4))}}} for _ in range(2)]}
  def adapted(tree):
    return sorted(path for path, _ in jlora.adapted_leaves(tree))
  want = [f"layers/{i}/attn/{m}_proj/kernel" for i in range(2) for m in "qv"]
  assert adapted(jlora.wrap(p, {"layers/*/attn/{q,v}_proj/kernel": jlora.LoRA(2)}, key=KEY)) == want
  assert adapted(jlora.wrap(p, {r"re:layers/\d+/attn/[qv]_proj/kernel": jlora.LoRA(2)}, key=KEY)) == want
  fn = lambda path, leaf: jlora.LoRA(2) if path.split("/")[-2] in ("q_proj", "v_proj") else None
  assert adapted(jlora.wrap(p, fn, key=KEY)) == want


def test_biases_and_norms_are_never_wrapped_by_a_broad_rule():
  p = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}, "norm": {"scale": jnp.ones(4)}}
  tree = jlora.wrap(p, {"**": jlora.LoRA(2)}, key=KEY)
  assert [path for path, _ in jlora.adapted_leaves(tree)] == ["dense/kernel"]


def test_full_rule_marks_leaves_trainable_bitfit():
  p = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
  tree = jlora.wrap(p, {"**/bias": jlora.Full()}, key=KEY)
  trainable, frozen = jlora.split(tree)
  assert [x.shape for x in jax.tree.leaves(trainable)] == [(4,)]
  s = jlora.summary(tree)
  assert (s.trainable, s.total) == (4, 20)


# -- N-D kernels ---------------------------------------------------------------

ND_CASES = {
    # name: (shape, spec, contraction for x @ W as an einsum over the *merged* kernel)
    "dense_general_out": ((6, 2, 3), jlora.LoRA(2, in_axes=(0,), out_axes=(1, 2))),
    "dense_general_in": ((2, 3, 6), jlora.LoRA(2, in_axes=(0, 1), out_axes=(2,))),
    "stacked": ((3, 6, 5), jlora.LoRA(2, stack_axes=1)),
    "stacked_two": ((2, 3, 6, 5), jlora.LoRA(2, stack_axes=2)),
    "conv": ((3, 3, 4, 5), jlora.LoRA(2)),
    "out_first": ((5, 6), jlora.LoRA(2, in_axes=(1,), out_axes=(0,))),
}


@pytest.mark.parametrize("name", sorted(ND_CASES))
def test_nd_kernels_merge_to_a_brute_force_reference(name):
  shape, spec = ND_CASES[name]
  path = "Conv_0/kernel" if name == "conv" else "w/kernel"
  top, leafname = path.split("/")
  rng = np.random.default_rng(1)
  params = {top: {leafname: jnp.asarray(rng.normal(size=shape), jnp.float32)}}
  tree = jlora.wrap(params, {path: spec}, key=KEY)
  leaf = tree[top][leafname]
  leaf = leaf.replace(b=jnp.asarray(rng.normal(size=leaf.b.shape), jnp.float32))
  ax = leaf.axes
  # brute force: element by element over all kernel indices
  a, b = np.asarray(leaf.a, np.float64), np.asarray(leaf.b, np.float64)
  ref = np.asarray(params[top][leafname], np.float64).copy()
  for idx in np.ndindex(*shape):
    s = tuple(idx[i] for i in ax.stack)
    i = tuple(idx[j] for j in ax.inputs)
    o = tuple(idx[j] for j in ax.outputs)
    ref[idx] += spec.scale * sum(a[s + i + (r,)] * b[s + (r,) + o] for r in range(spec.rank))
  got = jlora.merge({top: {leafname: leaf}})[top][leafname]
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
  n_stack = len(ax.stack)
  assert leaf.a.shape[:n_stack] == tuple(shape[i] for i in ax.stack)


def test_stacked_layers_get_independent_adapters():
  params = {"layers": {"kernel": jnp.zeros((3, 8, 8))}}
  tree = jlora.wrap(params, {"layers/kernel": jlora.LoRA(2, stack_axes=1)}, key=KEY)
  leaf = tree["layers"]["kernel"]
  assert leaf.a.shape == (3, 8, 2) and leaf.b.shape == (3, 2, 8)
  b = leaf.b.at[1].set(1.0)
  merged = jlora.merge({"k": leaf.replace(b=b)})["k"]
  assert float(jnp.abs(merged[0]).max()) == 0 and float(jnp.abs(merged[2]).max()) == 0
  assert float(jnp.abs(merged[1]).max()) > 0


def test_embedding_table():
  params = {"embed": {"embedding": jnp.ones((50, 8))}}
  tree = jlora.wrap(params, {"embed/embedding": jlora.LoRA(4)}, key=KEY)
  leaf = tree["embed"]["embedding"]
  assert leaf.a.shape == (50, 4) and leaf.b.shape == (4, 8)


# -- gradients, optimizer, transforms --------------------------------------------

def _mlp_tree():
  rng = np.random.default_rng(0)
  params = {"l1": {"kernel": jnp.asarray(rng.normal(size=(6, 16)), jnp.float32), "bias": jnp.zeros(16)},
            "l2": {"kernel": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32), "bias": jnp.zeros(3)}}
  return params, jlora.wrap(params, {"**/kernel": jlora.LoRA(2)}, key=KEY)


def _mlp(p, x):
  h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  return h @ p["l2"]["kernel"] + p["l2"]["bias"]


def test_gradients_exist_only_for_trainable_leaves():
  _, tree = _mlp_tree()
  trainable, frozen = jlora.split(tree)
  x = jnp.ones((4, 6))
  loss = lambda t: jnp.sum(jlora.lora(_mlp)(jlora.combine(t, frozen), x) ** 2)
  grads = jax.grad(loss)(trainable)
  shapes = sorted(g.shape for g in jax.tree.leaves(grads))
  assert shapes == sorted([(6, 2), (2, 16), (16, 2), (2, 3)])
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  # b starts at zero, so only b gets a non-zero gradient at init
  assert float(jnp.abs(grads["l1"]["kernel"].b).sum()) > 0
  # gradient through the whole tree: the frozen base's gradient is exactly zero (stop_gradient)
  full = jax.grad(lambda t: jnp.sum(jlora.lora(_mlp)(t, x) ** 2))(tree)
  assert float(jnp.abs(full["l1"]["kernel"].w).max()) == 0.0


def test_optimizer_state_holds_only_adapter_sized_arrays_and_frozen_updates_are_zero():
  _, tree = _mlp_tree()
  tx = jlora.optimizer(optax.adam(1e-2), tree)
  state = tx.init(tree)
  shapes = sorted(x.shape for x in jax.tree.leaves(state) if x.ndim)
  assert shapes == sorted([(6, 2), (2, 16), (16, 2), (2, 3)] * 2)  # mu and nu
  x = jnp.ones((4, 6))
  grads = jax.grad(lambda t: jnp.sum(jlora.lora(_mlp)(t, x) ** 2))(tree)
  grads = jax.tree.map(lambda g: g + 1.0, grads)  # frozen grads non-zero on purpose
  updates, _ = tx.update(grads, state, tree)
  assert float(jnp.abs(updates["l1"]["kernel"].w).max()) == 0.0
  assert float(jnp.abs(updates["l1"]["bias"]).max()) == 0.0
  assert float(jnp.abs(updates["l1"]["kernel"].b).max()) > 0.0


def test_compose_with_jit_grad_vmap():
  params, tree = _mlp_tree()
  tree = jax.tree.map(lambda x: x, tree)
  leaf = tree["l1"]["kernel"]
  tree["l1"]["kernel"] = leaf.replace(b=jnp.full(leaf.b.shape, 0.3))
  xs = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4, 6)), jnp.float32)
  f = jlora.lora(_mlp)
  eager = jnp.stack([f(tree, x) for x in xs])
  np.testing.assert_allclose(jax.vmap(f, in_axes=(None, 0))(tree, xs), eager, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(f)(tree, xs[0]), eager[0], rtol=1e-5, atol=1e-5)
  merged = jax.jit(jlora.merge)(tree)
  np.testing.assert_allclose(_mlp(merged, xs[0]), eager[0], rtol=1e-5, atol=1e-5)
  g_jit = jax.jit(jax.grad(lambda t: jnp.sum(f(t, xs[0]))))(tree)
  g = jax.grad(lambda t: jnp.sum(f(t, xs[0])))(tree)
  for a, b in zip(jax.tree.leaves(g_jit), jax.tree.leaves(g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # vmap over a batch of adapters (per-example adapters)
  bs = jnp.stack([leaf.b, leaf.b + 1])
  per = jax.vmap(lambda b: jlora.merge({"k": leaf.replace(b=b)})["k"])(bs)
  assert per.shape == (2, 6, 16)


# -- counts -----------------------------------------------------------------------

@pytest.mark.parametrize("n,rank,want", [(4096, 8, 65_536), (768, 8, 12_288)], ids=["4096", "768"])
def test_summary_counts(n, rank, want):
  params = {"k": jax.ShapeDtypeStruct((n, n), jnp.float32)}
  params = {"k": jnp.zeros((n, n), jnp.float32)}
  s = jlora.summary(jlora.wrap(params, {"k": jlora.LoRA(rank)}, key=KEY))
  assert s.trainable == want == 2 * n * rank
  assert s.total == n * n + want
  assert s.adapter_bytes == 4 * want
  assert f"trainable params: {want:,}" in str(s)
  assert s.per_rule[0].label == f"LoRA({rank})" and s.per_rule[0].leaves == 1


# -- bad input ---------------------------------------------------------------------

def _params():
  return {"layers": {"attn": {"q_proj": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)}}},
          "step": jnp.zeros((2, 2), jnp.int32), "flag": jnp.zeros((2, 2), bool)}


def _snapshot(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]


def _unchanged(tree, snap):
  return all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(tree), snap))


def test_error_rule_matches_nothing_lists_closest_paths():
  p = _params()
  snap = _snapshot(p)
  with pytest.raises(jlora.RuleError, match=r"q_prj.*layers/attn/q_proj/kernel"):
    jlora.wrap(p, {"layers/attn/q_prj/kernel": jlora.LoRA(2)}, key=KEY)
  assert _unchanged(p, snap)


@pytest.mark.parametrize("rank", [0, -1, 9], ids=["zero", "negative", "too_big"])
def test_error_bad_rank(rank):
  p = _params()
  snap = _snapshot(p)
  with pytest.raises(jlora.SpecError, match="rank"):
    jlora.wrap(p, {"layers/attn/q_proj/kernel": jlora.LoRA(rank)}, key=KEY)
  assert _unchanged(p, snap)


def test_error_too_big_rank_names_the_path():
  with pytest.raises(jlora.SpecError, match=r"layers/attn/q_proj/kernel.*rank <= 8"):
    jlora.wrap(_params(), {"layers/attn/q_proj/kernel": jlora.LoRA(9)}, key=KEY)


@pytest.mark.parametrize("alpha", [0, -2.0, float("nan")], ids=["zero", "negative", "nan"])
def test_error_bad_alpha(alpha):
  with pytest.raises(jlora.SpecError, match="alpha"):
    jlora.LoRA(4, alpha=alpha)


@pytest.mark.parametrize("leaf", ["step", "flag"])
def test_error_integer_or_bool_leaf(leaf):
  p = _params()
  snap = _snapshot(p)
  with pytest.raises(jlora.SpecError, match=rf"{leaf}.*floating"):
    jlora.wrap(p, {leaf: jlora.LoRA(1)}, key=KEY)
  assert _unchanged(p, snap)


def test_error_already_wrapped():
  tree = jlora.wrap(_params(), {"layers/attn/q_proj/kernel": jlora.LoRA(2)}, key=KEY)
  with pytest.raises(jlora.TreeError, match="already wrapped.*merge"):
    jlora.wrap(tree, {"layers/attn/q_proj/kernel": jlora.LoRA(2)}, key=KEY)


def test_error_combine_mismatched_trees():
  p = _params()
  t1, _ = jlora.split(jlora.wrap(p, {"layers/attn/q_proj/kernel": jlora.LoRA(2)}, key=KEY))
  _, f2 = jlora.split(jlora.wrap(p, {"layers/attn/q_proj/kernel": jlora.LoRA(4)}, key=KEY))
  with pytest.raises(jlora.TreeError, match="do not fit"):
    jlora.combine(t1, f2)
  _, f3 = jlora.split(jlora.wrap({"other": jnp.ones((8, 8))}, {"other": jlora.LoRA(2)}, key=KEY))
  with pytest.raises(jlora.TreeError, match="do not fit"):
    jlora.combine(t1, f3)


def test_error_axes_cannot_be_inferred():
  p = {"attn": {"qkv": {"kernel": jnp.ones((8, 2, 4))}}}
  snap = _snapshot(p)
  with pytest.raises(jlora.AxesError, match=r"attn/qkv/kernel.*\(8, 2, 4\).*stack_axes.*in_axes"):
    jlora.wrap(p, {"**/kernel": jlora.LoRA(2)}, key=KEY)
  assert _unchanged(p, snap)


def test_error_optimizer_without_trainable_leaves():
  with pytest.raises(jlora.TreeError, match="no trainable leaves"):
    jlora.optimizer(optax.sgd(0.1), {"k": jnp.ones((2, 2))})


def test_error_messages_are_jlora_errors():
  assert issubclass(jlora.RuleError, jlora.JloraError)
  assert issubclass(jlora.SpecError, ValueError)
