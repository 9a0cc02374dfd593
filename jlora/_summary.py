"""Parameter counts: trainable vs total, per rule, and adapter bytes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from jlora._adapter import is_adapted

__all__ = ["Summary", "RuleSummary", "summary"]


@dataclasses.dataclass(frozen=True)
class RuleSummary:
  """Counts for the leaves adapted with one spec (``label``: the spec, e.g. ``LoRA(8)``).

  Rules are provenance and are not kept in the tree, so leaves are grouped by
  the spec they carry: equivalent rules give one row.
  """

  label: str
  leaves: int
  trainable: int
  base: int
  bytes: int


@dataclasses.dataclass(frozen=True)
class Summary:
  """What :func:`summary` returns. ``str()`` gives a readable table.

  Attributes:
    trainable: trainable parameters (adapter factors and Full leaves).
    total: all parameters, frozen base plus adapters (as PEFT counts them).
    adapter_bytes: bytes of the trainable arrays (what an adapter checkpoint stores).
    per_rule: a :class:`RuleSummary` for each spec in the tree.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> s = jlora.summary(jlora.wrap({"k": jnp.zeros((768, 768))}, {"k": jlora.LoRA(8)},
    ...                              key=jax.random.key(0)))
    >>> s.trainable, s.adapter_bytes
    (12288, 49152)
  """

  trainable: int
  total: int
  adapter_bytes: int
  per_rule: tuple[RuleSummary, ...]

  @property
  def trainable_percent(self) -> float:
    return 100.0 * self.trainable / self.total if self.total else 0.0

  @property
  def line(self) -> str:
    """PEFT's ``print_trainable_parameters`` line."""
    return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.trainable_percent:.4f}")

  def __str__(self) -> str:
    rows = [f"{'spec':<40} {'leaves':>6} {'trainable':>12} {'base':>14} {'bytes':>12}"]
    for r in self.per_rule:
      rows.append(f"{r.label[:40]:<40} {r.leaves:>6} {r.trainable:>12,} {r.base:>14,} {r.bytes:>12,}")
    rows.append(self.line + f" || adapter bytes: {self.adapter_bytes:,}")
    return "\n".join(rows)


def summary(tree: Any) -> Summary:
  """Counts trainable and total parameters of a wrapped tree.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> tree = jlora.wrap({"k": jnp.zeros((4096, 4096))}, {"k": jlora.LoRA(8)},
    ...                   key=jax.random.key(0))
    >>> s = jlora.summary(tree)
    >>> s.trainable, s.total
    (65536, 16842752)
    >>> print(s.line)
    trainable params: 65,536 || all params: 16,842,752 || trainable%: 0.3891
  """
  per: dict[str, list[int]] = {}
  trainable = total = nbytes = 0
  for x in jax.tree.leaves(tree, is_leaf=is_adapted):
    if not is_adapted(x):
      total += _size(x)
      continue
    t, base, b = x.trainable_count(), x.base_count(), x.trainable_bytes()
    trainable += t
    total += t + base
    nbytes += b
    row = per.setdefault(x.spec.describe(), [0, 0, 0, 0])
    row[0] += 1
    row[1] += t
    row[2] += base
    row[3] += b
  rules = tuple(RuleSummary(k, *v) for k, v in per.items())
  return Summary(trainable, total, nbytes, rules)


def _size(x) -> int:
  return 0 if x is None or not hasattr(x, "shape") else math.prod(x.shape)


def _bytes(x) -> int:
  return 0 if x is None or not hasattr(x, "dtype") else _size(x) * x.dtype.itemsize
