"""Quickstart: LoRA-fine-tune a Flax linen MLP in a dozen lines (runs in seconds on a CPU).

  python experiments/quickstart.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(256)(x))
    x = nn.gelu(nn.Dense(256)(x))
    return nn.Dense(10)(x)


def main():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(512, 64)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=512))
  model = MLP()
  params = model.init(jax.random.key(0), x)["params"]

  tree = jlora.wrap(params, {"Dense_*/kernel": jlora.LoRA(8, alpha=16)}, key=jax.random.key(1))
  print(jlora.summary(tree))
  trainable, frozen = jlora.split(tree)
  tx = jlora.optimizer(optax.adamw(3e-3))
  opt_state = tx.init(trainable)
  forward = jlora.lora(lambda p, x: model.apply({"params": p}, x))

  @jax.jit
  def step(trainable, opt_state):
    def loss_fn(t):
      logits = forward(jlora.combine(t, frozen), x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  for i in range(201):
    trainable, opt_state, loss = step(trainable, opt_state)
    if i % 50 == 0:
      print(f"step {i:4d}  loss {float(loss):.4f}")
  merged = jlora.merge(jlora.combine(trainable, frozen))
  acc = float((model.apply({"params": merged}, x).argmax(-1) == y).mean())
  print(f"train accuracy of the merged model: {acc:.3f}")


if __name__ == "__main__":
  main()
