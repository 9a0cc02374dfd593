"""``jlora.lora(fn)``: run an unmodified function on a tree with LoRA leaves."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jlora._tree import merge

__all__ = ["lora"]


def lora(fn: Callable[..., Any], *, strict: bool = False) -> Callable[..., Any]:
  """Lifts ``fn`` so it accepts trees with LoRA leaves anywhere in its arguments.

  The lifted function computes exactly ``fn`` on the merged params. This
  version merges every adapter before calling ``fn`` (exact, and gradients flow
  to ``A`` and ``B`` only); the factored path that never forms ``W + BA`` keeps
  this signature.

  Args:
    fn: any JAX function, e.g. a Flax ``model.apply``.
    strict: reserved for the factored path (raise instead of merging a leaf it
      cannot rewrite); merging is always exact here.

  Returns:
    A function with ``fn``'s signature.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> f = lambda p, x: x @ p["k"]
    >>> tree = jlora.wrap({"k": jnp.eye(3)}, {"k": jlora.LoRA(1)}, key=jax.random.key(0))
    >>> jlora.lora(f)(tree, jnp.ones((2, 3))).shape
    (2, 3)
  """
  del strict

  @functools.wraps(fn)
  def lifted(*args, **kwargs):
    args, kwargs = merge((args, kwargs))
    return fn(*args, **kwargs)

  return lifted
