"""The value :func:`jlora.lora` contracts in place of an adapted weight: a frozen base plus terms.

A :class:`Lazy` stands for

    V = (u * base + sum_k scale_k * a_k (x) b_k) * v

where ``base`` is the frozen weight (``stop_gradient``-ed), each term is a
low-rank product summed over its own rank axis (LoRA has one, stacked
adapters several, VeRA one with frozen factors scaled by trainable vectors),
``u`` is an optional per-row scaling of the base alone (IA3 on a feed-forward
input) and ``v`` an optional per-column scaling of everything (IA3 on an
output, DoRA's magnitude over its column norm).

Layout: ``sides[i]`` says which factors carry value axis ``i``: ``"L"`` (the
left ones: every ``a`` and ``u``), ``"R"`` (the right ones: every ``b`` and
``v``) or ``"S"`` (both: stacked layers). A left tensor has the value's
``L``/``S`` axes in value order and then its rank axis; a right tensor its
``R``/``S`` axes and then its rank axis. ``u`` and ``v`` are left / right
tensors of rank 1. Shape-only operations act on every tensor of a side alike,
so a method never has to teach the interpreter anything new.

``post`` (a :class:`Post`, bottleneck adapters) is a small network applied to
the *output* of each contraction with the value, ``y -> y + s * up(act(down(y) +
bias_down)) + s * bias_up``: its ``down``, ``up`` and ``bias_up`` are right
tensors (their trailing axis is the bottleneck width, 1 for ``bias_up``) and
``bias_down`` a *stack* tensor: the value's ``S`` axes and then the width. A
value with a ``post`` cannot be materialised into one weight.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jlora._adapter import Axes

__all__ = ["Term", "Post", "ACTIVATIONS", "Lazy", "from_kernel", "is_routed"]


class Term(NamedTuple):
  """One low-rank term ``scale * a (x) b``; ``dropout`` applies to its input only.

  A *routed* term (``route`` set: ``(batch,)`` int adapter ids, ``groups`` = N)
  holds N adapters side by side on its rank axis (``N * r`` wide, adapter-major)
  and gives each example (the leading axis of the contracted activation) the
  ``r`` columns of its own adapter; ``scale`` and ``dropout`` are then
  N-tuples, and an id of ``-1`` means the base alone.
  """

  a: Any
  b: Any
  scale: Any = 1.0
  dropout: Any = 0.0
  route: Any = None
  groups: int = 0


#: the non-linearities a :class:`Post` may name (``act``), by name
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


class Post(NamedTuple):
  """A bottleneck on a contraction's output: ``y + scale * (up(act(down(y) + bias_down)) + bias_up)``.

  ``down`` / ``up`` are right tensors (the value's ``R``/``S`` axes, then the
  width ``m``), ``bias_up`` a right tensor of width 1, ``bias_down`` the
  value's ``S`` axes then ``m``; ``act`` names the non-linearity (a key of
  :data:`ACTIVATIONS`).
  """

  down: Any
  up: Any
  bias_down: Any
  bias_up: Any
  act: str = "relu"
  scale: float = 1.0


class Lazy:
  """See the module docstring."""

  __slots__ = ("base", "sides", "terms", "u", "v", "path", "post")

  def __init__(self, base, sides, terms=(), u=None, v=None, path: str = "", post=None):
    self.base, self.sides = base, tuple(sides)
    self.terms, self.u, self.v, self.path, self.post = tuple(terms), u, v, path, post

  def replace(self, **kw) -> Lazy:
    f = {s: getattr(self, s) for s in self.__slots__}
    f.update(kw)
    return Lazy(**f)

  @property
  def shape(self):
    return tuple(self.base.shape)

  @property
  def ndim(self) -> int:
    return len(self.sides)

  def lefts(self) -> list:
    return [t.a for t in self.terms] + ([] if self.u is None else [self.u])

  def rights(self) -> list:
    p = [] if self.post is None else [self.post.down, self.post.up, self.post.bias_up]
    return [t.b for t in self.terms] + ([] if self.v is None else [self.v]) + p

  def stacks(self) -> list:
    return [] if self.post is None else [self.post.bias_down]

  def map_sides(self, per, **kw) -> Lazy:
    """Applies ``per("a")`` to every left tensor, ``per("b")`` to every right one and
    ``per("s")`` to every stack tensor."""
    left, right = per("a"), per("b")
    stack = per("s") if self.post is not None else None
    return self.with_sides([left(x) for x in self.lefts()], [right(x) for x in self.rights()],
                           [stack(x) for x in self.stacks()], **kw)

  def with_sides(self, lefts: list, rights: list, stacks: list = (), **kw) -> Lazy:
    """Rebuilds from new tensor lists (in :meth:`lefts` / :meth:`rights` / :meth:`stacks` order)."""
    n = len(self.terms)
    terms = tuple(t._replace(a=lefts[k], b=rights[k]) for k, t in enumerate(self.terms))
    u = lefts[n] if self.u is not None else None
    nv = n + (self.v is not None)
    v = rights[n] if self.v is not None else None
    post = self.post
    if post is not None:
      post = post._replace(down=rights[nv], up=rights[nv + 1], bias_up=rights[nv + 2],
                           bias_down=stacks[0] if stacks else post.bias_down)
    return self.replace(terms=terms, u=u, v=v, post=post, **kw)


def _post_children(p):
  return None if p is None else (p.down, p.up, p.bias_down, p.bias_up)


def _post_of(children, aux):
  return None if children is None else Post(*children, *aux)


jax.tree_util.register_pytree_node(
    Lazy,
    lambda z: ((z.base, tuple(t.a for t in z.terms), tuple(t.b for t in z.terms), z.u, z.v,
                tuple(t.route for t in z.terms), _post_children(z.post)),
               (z.sides, tuple((t.scale, t.dropout, t.groups) for t in z.terms), z.path,
                None if z.post is None else (z.post.act, z.post.scale))),
    lambda aux, ch: Lazy(ch[0], aux[0], tuple(Term(a, b, s, d, r, g) for a, b, r, (s, d, g)
                                              in zip(ch[1], ch[2], ch[5], aux[1])),
                         ch[3], ch[4], aux[2], _post_of(ch[6], aux[3])),
)


def from_kernel(w, axes: Axes, terms=(), *, u=None, v=None, post: Post | None = None,
                path: str = "") -> Lazy:
  """The :class:`Lazy` of a kernel ``w`` with :class:`jlora.Axes` ``axes``.

  ``terms`` are :class:`Term` s whose ``a`` is ``stack + in + (k,)`` and ``b``
  ``stack + (k,) + out`` (the adapters' storage layout, in/out axes in
  ``axes``' order); ``u`` is ``stack + in`` and ``v`` ``stack + out``; a
  ``post`` holds ``down`` ``stack + out + (m,)``, ``up`` ``stack + (m,) + out``,
  ``bias_down`` ``stack + (m,)`` and ``bias_up`` ``stack + out``. The base is
  wrapped in ``stop_gradient`` here, so no gradient reaches it.
  """
  ndim = len(w.shape)
  sides = ["S"] * ndim
  for i in axes.inputs:
    sides[i] = "L"
  for i in axes.outputs:
    sides[i] = "R"
  ns = len(axes.stack)
  a_perm = list(range(ns)) + [ns + axes.inputs.index(i) for i in sorted(axes.inputs)]
  b_perm = list(range(ns)) + [ns + 1 + axes.outputs.index(i) for i in sorted(axes.outputs)]

  def left(a):  # stack + inputs (spec order) + k  ->  stack + sorted(inputs) + k
    perm = a_perm + [a.ndim - 1]
    return a if perm == list(range(a.ndim)) else jnp.transpose(a, perm)

  def right(b):  # stack + k + outputs (spec order)  ->  stack + sorted(outputs) + k
    perm = b_perm + [ns]
    return b if perm == list(range(b.ndim)) else jnp.transpose(b, perm)

  out_terms = tuple(Term(left(t.a), right(t.b), _num(t.scale), _num(t.dropout), t.route, t.groups)
                    for t in terms)
  lu = None if u is None else left(u[..., None])
  rv = None if v is None else right(jnp.expand_dims(v, ns))
  if post is not None:  # down is stored stack + out + (m,): put m where a right factor has it
    post = post._replace(down=right(jnp.moveaxis(post.down, -1, ns)), up=right(post.up),
                         bias_up=right(jnp.expand_dims(post.bias_up, ns)), scale=float(post.scale))
  return Lazy(lax.stop_gradient(w), sides, out_terms, lu, rv, path, post)


def _num(x):
  return tuple(float(v) for v in x) if isinstance(x, (tuple, list)) else float(x)


def is_routed(lz: Lazy) -> bool:
  """True when one of ``lz``'s terms routes adapters per example (a mixed-adapter batch)."""
  return any(t.route is not None for t in lz.terms)
