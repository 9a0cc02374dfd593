"""One abstract Llama training step, to compile and inspect (FLOPs, HLO) without allocating it.

Shared by ``tests/test_lora_compiled.py`` and ``experiments/bench_flops.py``:
the step is ``jlora.lora``-style (``lift(llama_forward)``) or merged, a
next-token cross-entropy loss and one ``tx`` update; every argument is a
``jax.ShapeDtypeStruct``, so ``step.lower(*args).compile()`` allocates nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora._rewrite import lift
from jlora.models.llama import LlamaConfig, init_llama, llama_forward


def abstract_llama_step(cfg: LlamaConfig, rules: Any, tx: optax.GradientTransformation, *,
                        unroll: bool = False, merged: bool = False) -> tuple[Any, tuple[Any, ...]]:
  """``(step, args)``: a jitted training step on a batch of 4 x 128 tokens, and its abstract arguments.

  ``step(trainable, opt_state, frozen, tokens)`` returns the updated trainable
  leaves, optimizer state and loss; ``trainable`` and ``opt_state`` are
  donated. The parameters come from ``init_llama(cfg)`` wrapped with
  ``rules``. ``merged=True`` runs ``llama_forward`` on ``jlora.merge``-d
  weights (a materialised delta W) instead of the lifted forward; ``unroll``
  unrolls the lifted forward's layer scan.
  """
  params = jax.eval_shape(lambda: init_llama(cfg, jax.random.key(0)))
  tree = jax.eval_shape(lambda p: jlora.wrap(p, rules, key=jax.random.key(1)), params)
  trainable, frozen = jlora.split(tree)
  opt_state = jax.eval_shape(tx.init, trainable)
  if merged:
    forward = lambda t, tokens, cfg: llama_forward(jlora.merge(t), tokens, cfg)  # noqa: E731
  else:
    forward = lift(llama_forward, strict=True, unroll=unroll)

  def step(trainable, opt_state, frozen, tokens):
    def loss_fn(t):
      logits = forward(jlora.combine(t, frozen), tokens, cfg)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32)
  return jax.jit(step, donate_argnums=(0, 1)), (trainable, opt_state, frozen, tokens)
