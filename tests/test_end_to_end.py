"""The same few training lines on a Flax linen MLP, a Flax NNX model and a plain jnp function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora

KEY = jax.random.key(0)


def fit(apply, params, rules, x, y, steps=40):
  """What a user writes: wrap, split, optimise the trainable half."""
  tree = jlora.wrap(params, rules, key=KEY)
  trainable, frozen = jlora.split(tree)
  tx = jlora.optimizer(optax.adam(3e-2))
  opt_state = tx.init(trainable)
  forward = jlora.lora(apply)

  @jax.jit
  def step(trainable, opt_state):
    def loss_fn(t):
      return jnp.mean((forward(jlora.combine(t, frozen), x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  losses = []
  for _ in range(steps):
    trainable, opt_state, loss = step(trainable, opt_state)
    losses.append(float(loss))
  return jlora.combine(trainable, frozen), losses


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  y = jnp.asarray(np.sin(rng.normal(size=(8, 4)).T @ np.asarray(x).T).T, jnp.float32)
  return x, y


def _check(params, tree, losses):
  assert losses[-1] < 0.7 * losses[0], losses
  # the base weights stay bit-identical
  base = jax.tree.map(lambda l: l.w if isinstance(l, jlora.LoraWeight) else l, tree,
                      is_leaf=lambda l: isinstance(l, jlora.LoraWeight))
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(4)(x)


def test_flax_linen(data):
  x, y = data
  model = LinenMLP()
  params = model.init(KEY, x)["params"]
  apply = lambda p, x: model.apply({"params": p}, x)
  tree, losses = fit(apply, params, {"Dense_*/kernel": jlora.LoRA(4)}, x, y)
  _check(params, tree, losses)
  merged = jlora.merge(tree)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_allclose(model.apply({"params": merged}, x), jlora.lora(apply)(tree, x),
                             rtol=1e-5, atol=1e-5)


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def test_flax_nnx(data):
  x, y = data
  graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
  apply = lambda s, x: nnx.merge(graphdef, s)(x)
  tree, losses = fit(apply, state, {"l{1,2}/kernel": jlora.LoRA(4)}, x, y)
  _check(state, tree, losses)
  merged_model = nnx.merge(graphdef, jlora.merge(tree))
  np.testing.assert_allclose(merged_model(x), jlora.lora(apply)(tree, x), rtol=1e-5, atol=1e-5)


def test_plain_jnp_function(data):
  x, y = data
  rng = np.random.default_rng(1)
  params = {"w1": jnp.asarray(rng.normal(size=(8, 32)) / 3, jnp.float32), "b1": jnp.zeros(32),
            "w2": jnp.asarray(rng.normal(size=(32, 4)) / 6, jnp.float32)}
  def apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
  tree, losses = fit(apply, params, {"w?": jlora.LoRA(4)}, x, y)
  _check(params, tree, losses)
  np.testing.assert_allclose(apply(jlora.merge(tree), x), jlora.lora(apply)(tree, x), rtol=1e-5, atol=1e-5)
