"""``jlora.lora(fn)``: run an unmodified function on a tree with LoRA leaves, low-rank."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jlora._rewrite import RewriteError, lift

__all__ = ["lora", "RewriteError"]


def lora(fn: Callable[..., Any], *, strict: bool = False, checked: bool = False) -> Callable[..., Any]:
  """Lifts ``fn`` so it accepts trees with LoRA leaves anywhere in its arguments.

  The lifted function computes ``fn`` on the merged params without ever
  forming ``W + s * A @ B``: ``fn`` is traced once with each adapted base as an
  input, and every contraction that consumes a base (``x @ W``, ``einsum``,
  ``dot_general``, ``conv_general_dilated``, an embedding ``take``/``gather``)
  becomes ``x @ W + s * (x @ A) @ B`` with the same dimension numbers. This
  also holds when the base is cast, transposed, reshaped, squeezed, broadcast,
  sliced or indexed first, and inside ``lax.scan`` (a stacked ``(L, in, out)``
  kernel scanned over layers), ``fori_loop`` / ``while_loop``, ``cond`` /
  ``switch``, ``jax.checkpoint``, ``jit`` and ``custom_jvp`` / ``custom_vjp``
  functions (their bodies are rewritten and differentiated by JAX; the custom
  rule is kept where no adapted weight enters). Works on a Flax linen
  ``apply``, an NNX ``merge(graphdef, state)`` call, Equinox-style modules and
  plain functions, and on ``jlora.llama`` / ``jlora.models.bert``.

  The base is wrapped in ``stop_gradient``, so ``jax.grad`` through the lifted
  function never computes a weight gradient for it: a training step costs
  about ``4 N`` FLOPs per token instead of ``6 N``.

  A use of an adapted weight that cannot stay low-rank (an elementwise op on
  the weight itself, a reduction over it, returning it) forms ``W + s A B`` for
  that use only: exact, and logged at DEBUG level on
  ``logging.getLogger("jlora")`` with the primitive and the leaf's path. With
  ``strict=True`` such a use raises :class:`jlora.RewriteError` instead.

  LoRA dropout (``jlora.LoRA(r, dropout=p)``) is applied to the input of the
  low-rank path only, as PEFT does, and only when the lifted function gets a
  PRNG key: ``lora(fn)(tree, x, lora_key=key)``. Without ``lora_key`` the
  path is deterministic (evaluation). Each use of an adapted weight (and each
  scanned layer) draws its own mask from that key.

  A tree from :func:`jlora.stack_adapters` holds one base and N adapters; it
  needs ``adapter_ids`` (an int array, one id per batch row, ``-1`` for the base
  alone): each row is routed to its own adapter inside every rewritten
  contraction (a gather of that row's factors, so the cost is one adapter's
  whatever N is). Concrete ids are range-checked at once; under ``jit`` the
  check runs on the device only with ``checked=True`` (a host callback).

  Non-array leaves of the arguments (Python numbers, strings, configs) are
  passed to ``fn`` unchanged, as static values. ``fn`` must return arrays.

  Args:
    fn: any JAX function, e.g. a Flax ``model.apply`` or ``jlora.llama.llama_forward``.
    strict: raise :class:`jlora.RewriteError` instead of merging a use that
      cannot be rewritten.
    checked: range-check traced ``adapter_ids`` at run time (under ``jit``).

  Returns:
    ``lifted(*args, lora_key=None, adapter_ids=None, **kwargs)`` with ``fn``'s signature plus
    the keyword-only ``lora_key`` (a PRNG key for LoRA dropout; ``None`` = off) and
    ``adapter_ids`` (per-row adapter ids for a stacked tree).

  Raises:
    TreeError: a LoRA leaf lacks its base or factors (a half of ``split``).
    RewriteError: with ``strict=True``, a use that cannot stay low-rank.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> f = lambda p, x: x @ p["k"]
    >>> tree = jlora.wrap({"k": jnp.eye(3)}, {"k": jlora.LoRA(1)}, key=jax.random.key(0))
    >>> jlora.lora(f)(tree, jnp.ones((2, 3))).shape
    (2, 3)
    >>> bad = lambda p, x: x @ jnp.tanh(p["k"])   # tanh of the weight itself
    >>> jlora.lora(bad, strict=True)(tree, jnp.ones((2, 3)))
    Traceback (most recent call last):
    ...
    jlora._rewrite.RewriteError: jlora.lora: the primitive 'tanh' uses the adapted weight 'k' ...
  """
  lifted = lift(fn, strict=strict, checked=checked)
  return functools.wraps(fn)(lifted)
