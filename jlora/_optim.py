"""Optax integration: update only the trainable leaves, keep state only for them; LoRA+."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import optax

from jlora._adapter import is_adapted
from jlora._errors import SpecError, TreeError
from jlora._tree import _labels

__all__ = ["optimizer"]


def optimizer(tx: optax.GradientTransformation, tree: Any = None, *,
              loraplus_ratio: float | None = None) -> optax.GradientTransformation:
  """Wraps ``tx`` so it updates only trainable leaves and holds state only for them.

  Built on ``optax.partition``: adapter factors and :class:`jlora.Full` leaves
  go to ``tx``; everything else goes to ``optax.set_to_zero()``, which keeps
  no state and zeroes the update. (``optax.masked`` alone would pass frozen
  gradients through unchanged.) Labels are read from the tree handed to
  ``init`` / ``update``, so the same transform works on the whole wrapped tree
  or on the ``trainable`` half from :func:`jlora.split`.

  LoRA+ (Hayou et al. 2024; PEFT's ``create_loraplus_optimizer``): with
  ``loraplus_ratio``, the updates of every trainable child named ``b`` (the
  zero-initialised right factor of LoRA, PiSSA / OLoRA and embedding LoRA
  alike) are multiplied by the ratio after ``tx``. For optimizers whose update
  is linear in the learning rate (sgd, momentum, adam, adamw with its
  decoupled weight decay, lion, ...) that is exactly training ``b`` with
  learning rate ``lr * ratio``; ``tx`` keeps one state over all trainable
  leaves, so a ``clip_by_global_norm`` inside it still clips the global norm.
  Unlike PEFT, embedding adapters get the ratio too (PEFT gives them a fixed
  learning rate, ``loraplus_lr_embedding=1e-6``) and 1-D ``Full`` leaves keep
  ``lr`` (PEFT moves them to ``lr * ratio``), see ``docs/method_lora_init.md``.

  Args:
    tx: any optax transformation (``optax.adamw(1e-3)``, a chain, ...).
    tree: optionally, the wrapped tree, to check that it has trainable leaves.
    loraplus_ratio: LoRA+'s ``lr_B / lr_A`` (> 0, typically 4 to 16); ``None``
      (default) trains every leaf at ``tx``'s rate.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    TreeError: ``tree`` was given and holds no trainable leaf.
    SpecError: ``loraplus_ratio`` is not a positive finite number.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> tree = jlora.wrap({"k": jnp.ones((8, 8))}, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
    >>> tx = jlora.optimizer(optax.adam(1e-2), tree)
    >>> state = tx.init(tree)
    >>> sorted({x.shape for x in jax.tree.leaves(state) if x.ndim})
    [(2, 8), (8, 2)]
    >>> plus = jlora.optimizer(optax.sgd(1.0), loraplus_ratio=16.0)
    >>> grads = jax.tree.map(jnp.ones_like, tree)
    >>> updates, _ = plus.update(grads, plus.init(tree), tree)
    >>> float(updates["k"].a[0, 0]), float(updates["k"].b[0, 0]), float(updates["k"].w[0, 0])
    (-1.0, -16.0, 0.0)
  """
  if tree is not None and not any(jax.tree.leaves(_labels(tree, True, False))):
    raise TreeError(
        "jlora.optimizer: the tree has no trainable leaves; wrap the params first "
        "(jlora.wrap(params, rules, key=...)) with at least one LoRA or Full rule")
  if loraplus_ratio is not None and (isinstance(loraplus_ratio, bool) or not isinstance(
      loraplus_ratio, numbers.Real) or not 0 < loraplus_ratio < float("inf")):
    raise SpecError(f"loraplus_ratio must be a positive finite number (LoRA+'s lr_B / lr_A, e.g. 16), "
                    f"got {loraplus_ratio!r}; pass None to train every leaf at one rate")
  partitioned = optax.partition(
      {"trainable": tx, "frozen": optax.set_to_zero()},
      lambda params: _labels(params, "trainable", "frozen"),
  )
  if loraplus_ratio is None:
    return partitioned
  return optax.chain(partitioned, optax.masked(optax.scale(float(loraplus_ratio)), _b_mask))


def _b_mask(tree: Any) -> Any:
  """True on the trainable children named ``b`` of adapted leaves (LoRA+'s faster group)."""
  def mask(x):
    if not is_adapted(x):
      return False
    return x.replace(**{n: (None if getattr(x, n) is None else (n == "b" and n in x.trainable))
                        for n in x.children()})
  return jax.tree.map(mask, tree, is_leaf=is_adapted)
