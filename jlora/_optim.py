"""Optax integration: update only the trainable leaves, keep state only for them."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jlora._errors import TreeError
from jlora._tree import _labels

__all__ = ["optimizer"]


def optimizer(tx: optax.GradientTransformation, tree: Any = None) -> optax.GradientTransformation:
  """Wraps ``tx`` so it updates only trainable leaves and holds state only for them.

  Built on ``optax.partition``: adapter factors and :class:`jlora.Full` leaves
  go to ``tx``; everything else goes to ``optax.set_to_zero()``, which keeps
  no state and zeroes the update. (``optax.masked`` alone would pass frozen
  gradients through unchanged.) Labels are read from the tree handed to
  ``init`` / ``update``, so the same transform works on the whole wrapped tree
  or on the ``trainable`` half from :func:`jlora.split`.

  Args:
    tx: any optax transformation (``optax.adamw(1e-3)``, a chain, ...).
    tree: optionally, the wrapped tree, to check that it has trainable leaves.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    TreeError: ``tree`` was given and holds no trainable leaf.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> tree = jlora.wrap({"k": jnp.ones((8, 8))}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> tx = jlora.optimizer(optax.adam(1e-2), tree)
    >>> state = tx.init(tree)
    >>> sorted({x.shape for x in jax.tree.leaves(state) if x.ndim})
    [(2, 8), (8, 2)]
  """
  if tree is not None and not any(jax.tree.leaves(_labels(tree, True, False))):
    raise TreeError(
        "jlora.optimizer: the tree has no trainable leaves; wrap the params first "
        "(jlora.wrap(params, rules, key=...)) with at least one LoRA or Full rule")
  return optax.partition(
      {"trainable": tx, "frozen": optax.set_to_zero()},
      lambda params: _labels(params, "trainable", "frozen"),
  )
