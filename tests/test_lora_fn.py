"""jlora.lora(fn): the factored path equals fn(merge(tree)) in value and gradient, everywhere.

Every case runs with ``strict=True``, so a case passes only if each use of an
adapted weight was rewritten to the low-rank form (a merge would raise).
"""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora._rewrite import RewriteError

KEY = jax.random.key(0)


# -- helpers ----------------------------------------------------------------------------------

def _is_lw(x):
  return isinstance(x, jlora.LoraWeight)


def _wrap(params, rules, seed=0):
  """Wraps and gives every B a random value, so the adapters change the result."""
  tree = jlora.wrap(params, rules, key=jax.random.key(seed))
  rng = np.random.default_rng(seed)

  def fill(leaf):
    if _is_lw(leaf):
      return leaf.replace(b=jnp.asarray(rng.normal(size=leaf.b.shape) * 0.5, leaf.b.dtype))
    return leaf
  return jax.tree.map(fill, tree, is_leaf=_is_lw)


def _rnd(*shape, seed=1, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _scalar(out):
  return sum(jnp.sum(jnp.sin(o.astype(jnp.float32))) for o in jax.tree.leaves(out))


def _close(got, want, rtol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1.0, np.abs(w).max()))


def _pair(fn, tree, *args, forward_mode=False, **kwargs):
  """``(trainable, reference, lifted)``: functions of the trainable half returning (value, derivative).

  The reference runs ``fn`` on ``merge``; the lifted one runs ``lora(fn, strict=True)``,
  so any use that had to be merged raises. The derivative is the gradient of a
  scalar of the output, or with ``forward_mode`` a jvp (for loops JAX cannot
  reverse-differentiate).
  """
  trainable, frozen = jlora.split(tree)
  lifted = jlora.lora(fn, strict=True)
  ref_f = lambda t: fn(jlora.merge(jlora.combine(t, frozen)), *args, **kwargs)  # noqa: E731
  new_f = lambda t: lifted(jlora.combine(t, frozen), *args, **kwargs)  # noqa: E731
  if forward_mode:
    tangent = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(x.size).normal(size=x.shape),
                                                 x.dtype), trainable)
    deriv = lambda f: lambda t: jax.jvp(f, (t,), (tangent,))  # noqa: E731
  else:
    deriv = lambda f: lambda t: (f(t), jax.grad(lambda u: _scalar(f(u)))(t))  # noqa: E731
  return trainable, deriv(ref_f), deriv(new_f)


def _compare(ref, new, rtol=1e-5):
  (out_ref, d_ref), (out_new, d_new) = ref, new
  _close(out_new, out_ref, rtol)
  assert jax.tree.structure(d_new) == jax.tree.structure(d_ref)
  for leaf in jax.tree.leaves(d_ref):
    assert np.abs(np.asarray(leaf)).max() > 0  # every adapter is used
  _close(d_new, d_ref, rtol)


def _run(f, *args):
  """``jit(f)(*args)``, compiled without LLVM optimisation: these programs are tiny and
  compile time dominates (same math, both sides compiled alike)."""
  return jax.jit(f).lower(*args).compile(FAST_COMPILE)(*args)


FAST_COMPILE = {"xla_backend_optimization_level": 0}


def check(fn, tree, *args, rtol=1e-5, forward_mode=False, **kwargs):
  """lora(fn) == fn(merge) in value, and d/dA, d/dB agree; strict, so nothing was merged."""
  trainable, ref, new = _pair(fn, tree, *args, forward_mode=forward_mode, **kwargs)
  _compare(_run(ref, trainable), _run(new, trainable), rtol)


def _check_many(cases):
  """Runs many ``_pair``s in two compiled programs (compiling each case apart is slow)."""
  built = {name: _pair(*c[:-1], forward_mode=c[-1]) for name, c in cases.items()}
  ts = {n: b[0] for n, b in built.items()}
  ref = _run(lambda ts: {n: built[n][1](t) for n, t in ts.items()}, ts)
  new = _run(lambda ts: {n: built[n][2](t) for n, t in ts.items()}, ts)
  return {n: (ref[n], new[n]) for n in ts}


# -- Flax linen layers ------------------------------------------------------------------------

class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(jax.nn.relu(nn.Dense(7)(x)))


class _DenseGeneral(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 3), axis=-1, name="heads")(x)          # (B, 6) -> (B, 2, 3)
    return nn.DenseGeneral(4, axis=(-2, -1), name="merge")(h)      # (B, 2, 3) -> (B, 4)


class _Einsum(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Einsum((6, 2, 3), "btd,dhk->bthk")(x)


class _Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=(2, 1), padding="SAME")(x)
    return nn.Conv(2, (2,), kernel_dilation=2, name="conv1d")(x.reshape(x.shape[0], -1, 4))


class _Embed(nn.Module):
  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(11, 6)
    h = jnp.tanh(emb(ids))
    return emb.attend(h)


class _ScanStack(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return jnp.tanh(nn.Dense(h.shape[-1])(h)), None
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h, _ = stack(name="stack")(x, None)
    return h


def _linen(module, x, rules):
  params = module.init(KEY, x)["params"]
  apply = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
  return apply, _wrap(params, rules)


LINEN = {
    "dense": (_Dense(), _rnd(3, 6), {"**/kernel": jlora.LoRA(2, alpha=3)}),
    "dense_general": (_DenseGeneral(), _rnd(3, 6), [
        ("heads/kernel", jlora.LoRA(2, in_axes=(0,), out_axes=(1, 2))),
        ("merge/kernel", jlora.LoRA(2, in_axes=(0, 1), out_axes=(2,)))]),
    "einsum": (_Einsum(), _rnd(2, 3, 6), {"**/kernel": jlora.LoRA(2, in_axes=(0,), out_axes=(1, 2))}),
    "conv": (_Conv(), _rnd(2, 4, 3, 3), {"**/kernel": jlora.LoRA(2, rslora=True)}),
    "embed": (_Embed(), jnp.array([[1, 4, 10], [0, 0, 3]]), {"**/embedding": jlora.LoRA(3)}),
    "scan_stack": (_ScanStack(), _rnd(3, 5), {"**/kernel": jlora.LoRA(2, stack_axes=1)}),
}


@pytest.fixture(scope="module")
def linen_results():
  cases = {}
  for name, (module, x, rules) in LINEN.items():
    apply, tree = _linen(module, x, rules)
    cases[name] = (apply, tree, x, False)
  return _check_many(cases)


@pytest.mark.parametrize("name", sorted(LINEN))
def test_flax_linen_layers(name, linen_results):
  _compare(*linen_results[name])


def test_flax_nnx_split_merge():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(6, 8, rngs=rngs)
      self.emb = nnx.Embed(9, 6, rngs=rngs)
      self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, ids):
      return self.l2(jax.nn.gelu(self.l1(self.emb(ids))))

  graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
  apply = lambda s, ids: nnx.merge(graphdef, s)(ids)  # noqa: E731
  tree = _wrap(state, {"l?/kernel": jlora.LoRA(2), "emb/embedding": jlora.LoRA(2)})
  check(apply, tree, jnp.array([[1, 2, 8]]))


class _EqxLinear:
  """An Equinox-style module: a dataclass pytree with a ``__call__``; torch layout ``(out, in)``."""

  def __init__(self, weight, bias):
    self.weight, self.bias = weight, bias

  def __call__(self, x):
    return x @ self.weight.T + self.bias


jax.tree_util.register_dataclass(_EqxLinear, data_fields=["weight", "bias"], meta_fields=[])


def test_equinox_style_module_with_torch_layout():
  model = [_EqxLinear(_rnd(7, 5, seed=2), _rnd(7, seed=3)), _EqxLinear(_rnd(3, 7, seed=4), _rnd(3))]
  apply = lambda m, x: m[1](jnp.tanh(m[0](x)))  # noqa: E731
  tree = _wrap(model, {"*/weight": jlora.LoRA(2, in_axes=(1,), out_axes=(0,))})
  check(apply, tree, _rnd(4, 5))


# -- the base transformed before use; control flow --------------------------------------------

def _p(**shapes):
  return {k: _rnd(*s, seed=i + 10) / np.sqrt(s[-2] if len(s) > 1 else 1)
          for i, (k, s) in enumerate(shapes.items())}


PLAIN = {
    # transposed / torch layout
    "transpose": (lambda p, x: x @ p["w"].T, _p(w=(5, 6)), {"w": jlora.LoRA(2)}),
    # a fused qkv kernel reshaped and sliced
    "reshape_slice": (lambda p, x: sum(x @ p["qkv"].reshape(6, 3, 4)[:, i] for i in range(3)),
                      _p(qkv=(6, 12)), {"qkv": jlora.LoRA(2)}),
    "slice_cols": (lambda p, x: jnp.tanh(x @ p["w"][:, 1:4]) @ p["w"][:3, ::2].T,
                   _p(w=(6, 5)), {"w": jlora.LoRA(2)}),
    "broadcast_batched_matmul": (
        lambda p, x: jnp.einsum("bi,bio->bo", x, jnp.broadcast_to(p["w"], (x.shape[0], 6, 5)))
        + (x[:, None, :] @ p["w"][None])[:, 0], _p(w=(6, 5)), {"w": jlora.LoRA(2)}),
    "scaled_and_shifted": (
        lambda p, x: x @ (p["w"] * 0.5 + p["c"]) + x @ (-(p["w"] / 3.0)) + x @ (p["c"] - p["w"]),
        _p(w=(6, 5), c=(6, 5)), {"w": jlora.LoRA(2)}),
    "weight_on_the_left": (lambda p, x: (p["w"].T @ x.T).T + jnp.einsum("io,bi->ob", p["w"], x).T,
                           _p(w=(6, 5)), {"w": jlora.LoRA(2)}),
    "vmap_inside": (lambda p, x: jax.vmap(lambda xi: xi @ p["w"])(x), _p(w=(6, 5)), {"w": jlora.LoRA(2)}),
    "cast_f32": (lambda p, x: x @ p["w"].astype(jnp.float32), _p(w=(6, 5)), {"w": jlora.LoRA(2)}),
    "lax_scan": (lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), h.sum()), x, p["ws"]),
                 _p(ws=(3, 6, 6)), {"ws": jlora.LoRA(2, stack_axes=1)}),
    "lax_scan_reverse_with_consts": (
        lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w @ p["u"]), None), x, p["ws"],
                                  reverse=True)[0],
        _p(ws=(3, 6, 6), u=(6, 6)), {"ws": jlora.LoRA(2, stack_axes=1), "u": jlora.LoRA(1)}),
    "fori_loop_dynamic_index": (
        lambda p, x: jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["ws"][i]), x),
        _p(ws=(3, 6, 6)), {"ws": jlora.LoRA(2, stack_axes=1)}),
    "gather_stacked_layers": (
        lambda p, x: jnp.einsum("bi,lio->lbo", x, p["ws"][jnp.array([2, 0])]),
        _p(ws=(3, 6, 5)), {"ws": jlora.LoRA(2, stack_axes=1)}),
    "weight_in_loop_carry": (
        lambda p, x: jax.lax.fori_loop(0, (jnp.abs(x) >= 0).sum() // 8,  # traced bound: a while
                                       lambda i, c: (c[0], jnp.tanh(c[1] @ c[0])), (p["w"], x))[1],
        _p(w=(6, 6)), {"w": jlora.LoRA(2)}),
    "while_loop_const": (
        lambda p, x: jax.lax.while_loop(lambda c: c[0] < 3,
                                        lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])), (0, x))[1],
        _p(w=(6, 6)), {"w": jlora.LoRA(2)}),
    "cond": (lambda p, x: jax.lax.cond(x.sum() > 0, lambda: x @ p["w"], lambda: -(x @ p["w"]) * 2),
             _p(w=(6, 5)), {"w": jlora.LoRA(2)}),
    "switch": (lambda p, x: jax.lax.switch(1, [lambda x: x @ p["w"], lambda x: jnp.sin(x) @ p["w"]], x),
               _p(w=(6, 5)), {"w": jlora.LoRA(2)}),
    "remat": (lambda p, x: jax.checkpoint(lambda x, w: jnp.tanh(x @ w) @ w.T)(x, p["w"]),
              _p(w=(6, 5)), {"w": jlora.LoRA(2)}),
    "remat_policy": (
        lambda p, x: jax.checkpoint(lambda x: jnp.tanh(x @ p["w"]),
                                    policy=jax.checkpoint_policies.nothing_saveable)(x),
        _p(w=(6, 5)), {"w": jlora.LoRA(2)}),
    "inner_jit": (lambda p, x: jax.jit(lambda x, w: jnp.tanh(x @ w))(x, p["w"]), _p(w=(6, 5)),
                  {"w": jlora.LoRA(2)}),
    "embedding_take_and_tied_head": (
        lambda p, ids: jnp.einsum("btd,vd->btv", jnp.take(p["e"], ids, axis=0), p["e"]),
        _p(e=(11, 6)), {"e": jlora.LoRA(3)}),
    "embedding_index_clip": (lambda p, ids: p["e"].at[ids].get(mode="clip") @ p["e"].T,
                             _p(e=(11, 6)), {"e": jlora.LoRA(3)}),
}


@jax.custom_vjp
def _cvjp_dense(x, w):
  return jnp.tanh(x @ w)


_cvjp_dense.defvjp(lambda x, w: (_cvjp_dense(x, w), (x, w)),
                   lambda res, g: ((g * (1 - jnp.tanh(res[0] @ res[1]) ** 2)) @ res[1].T,
                                   res[0].T @ (g * (1 - jnp.tanh(res[0] @ res[1]) ** 2))))


@jax.custom_jvp
def _cjvp_dense(x, w):
  return x @ w


_cjvp_dense.defjvp(lambda p, t: (_cjvp_dense(*p), t[0] @ p[1] + p[0] @ t[1]))

PLAIN["custom_vjp"] = (lambda p, x: _cvjp_dense(x, p["w"]), _p(w=(6, 5)), {"w": jlora.LoRA(2)})
PLAIN["custom_jvp"] = (lambda p, x: _cjvp_dense(x, p["w"]), _p(w=(6, 5)), {"w": jlora.LoRA(2)})


@pytest.fixture(scope="module")
def plain_results():
  cases = {}
  for name, (fn, params, rules) in PLAIN.items():
    x = jnp.array([[1, 4, 10], [0, 7, 3]]) if name.startswith("embedding") else _rnd(4, 6, seed=5)
    cases[name] = (fn, _wrap(params, rules), x, name in ("weight_in_loop_carry", "while_loop_const"))
  return _check_many(cases)


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_functions(name, plain_results):
  _compare(*plain_results[name])


# -- jlora's models -----------------------------------------------------------------------------

def test_llama_scanned_layers_and_tied_embedding():
  from jlora.models.llama import LlamaConfig, init_llama, llama_forward
  cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                    num_kv_heads=2, tie_word_embeddings=True)
  params = init_llama(cfg, KEY)
  # every kernel, and the embedding: looked up (gather) and used as the output head (einsum)
  rules = {"layers/**/kernel": jlora.LoRA(2, stack_axes=1, alpha=4),
           "embed_tokens/embedding": jlora.LoRA(2)}
  ids = jnp.array([[1, 5, 7, 39, 2], [3, 3, 0, 11, 12]])
  check(lambda p, ids: llama_forward(p, ids, cfg, attention_mask=jnp.array([[1] * 5, [0, 1, 1, 1, 1]])),
        _wrap(params, rules), ids)


def test_bert_scanned_remat_layers():
  from jlora.models.bert import BertConfig, BertForSequenceClassification
  cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=24, max_position_embeddings=16, num_labels=3,
                   remat_policy="nothing_saveable")
  model = BertForSequenceClassification(cfg)
  ids = jnp.array([[2, 5, 7, 29], [1, 3, 0, 0]])
  params = model.init(KEY, ids)["params"]
  rules = {"layers/**/kernel": jlora.LoRA(2, stack_axes=1), "embeddings/word_embeddings/embedding":
           jlora.LoRA(2), "{pooler/dense,classifier}/kernel": jlora.LoRA(2)}
  check(lambda p, ids: model.apply({"params": p}, ids, jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])),
        _wrap(params, rules), ids)


# -- dtypes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("base,adapter", [("bfloat16", None), ("bfloat16", "bfloat16"),
                                          ("float32", "bfloat16")])
def test_low_precision_bases_and_adapters(base, adapter):
  params = {"w1": _rnd(16, 12, dtype=base) / 4, "w2": _rnd(12, 8, dtype=base) / 4}
  fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
  tree = _wrap(params, {"w?": jlora.LoRA(4, dtype=adapter)})
  x = _rnd(5, 16, dtype=base)
  out = jlora.lora(fn, strict=True)(tree, x)
  assert out.dtype == jnp.dtype(base)
  # reference in float64 numpy: x (W1 + s A1 B1) -> tanh -> (W2 + s A2 B2)
  def dense(h, leaf):
    return h @ (np.asarray(leaf.w, np.float64)
                + leaf.scale * np.asarray(leaf.a, np.float64) @ np.asarray(leaf.b, np.float64))
  ref = dense(np.tanh(dense(np.asarray(x, np.float64), tree["w1"])), tree["w2"])
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=0.03, atol=0.03 * np.abs(ref).max())
  # and about as close as the merged computation (which rounds W + s A B to the base dtype)
  merged = np.asarray(fn(jlora.merge(tree), x), np.float64)
  err, merged_err = np.abs(np.asarray(out, np.float64) - ref).max(), np.abs(merged - ref).max()
  assert err <= 2 * merged_err + 1e-5 * np.abs(ref).max()
  grads = jax.grad(lambda t: _scalar(jlora.lora(fn)(t, x)))(tree)
  assert grads["w1"].a.dtype == tree["w1"].a.dtype
  assert np.isfinite(np.asarray(grads["w1"].a, np.float32)).all()


# -- dropout ---------------------------------------------------------------------------------------

def _identity_adapter(p):
  """W = 0 and s A B = I, so the output is exactly the low-rank path's (dropped-out) input."""
  n = 64
  tree = jlora.wrap({"w": jnp.zeros((n, n))}, {"w": jlora.LoRA(n, dropout=p)}, key=KEY)
  leaf = tree["w"]
  return {"w": leaf.replace(a=jnp.eye(n), b=jnp.eye(n))}


def test_dropout_is_applied_to_the_low_rank_input_only_with_a_key():
  p = 0.25
  tree = _identity_adapter(p)
  x = jnp.ones((8, 64))
  f = jlora.lora(lambda t, x: x @ t["w"])
  np.testing.assert_array_equal(f(tree, x), x)                    # no key: evaluation
  y = np.asarray(f(tree, x, lora_key=jax.random.key(1)))
  kept = y != 0
  np.testing.assert_allclose(y[kept], 1 / (1 - p), rtol=1e-6)      # inverted dropout scaling
  assert 0.6 < kept.mean() < 0.9                                   # about 1 - p kept
  y2 = np.asarray(f(tree, x, lora_key=jax.random.key(2)))
  assert (y2 != y).any()                                           # the key decides the mask
  np.testing.assert_array_equal(y, np.asarray(f(tree, x, lora_key=jax.random.key(1))))
  # the frozen path is not dropped: with W = I and B = 0, output == x whatever the key
  tree0 = {"w": tree["w"].replace(w=jnp.eye(64), b=jnp.zeros((64, 64)))}
  np.testing.assert_array_equal(f(tree0, x, lora_key=jax.random.key(1)), x)


def test_dropout_masks_differ_per_use_and_per_scanned_layer():
  p = 0.5
  n = 32
  tree = jlora.wrap({"ws": jnp.zeros((3, n, n))}, {"ws": jlora.LoRA(n, dropout=p, stack_axes=1)},
                    key=KEY)
  leaf = tree["ws"]
  tree = {"ws": leaf.replace(a=jnp.broadcast_to(jnp.eye(n), (3, n, n)),
                             b=jnp.broadcast_to(jnp.eye(n), (3, n, n)))}
  x = jnp.ones((4, n))
  fn = lambda t, x: jax.lax.scan(lambda c, w: (c, x @ w), 0.0, t["ws"])[1]  # noqa: E731
  ys = np.asarray(jax.jit(jlora.lora(fn))(tree, x, lora_key=jax.random.key(3)))
  assert not np.array_equal(ys[0] != 0, ys[1] != 0) and not np.array_equal(ys[1] != 0, ys[2] != 0)
  two = lambda t, x: (x @ t["ws"][0], x @ t["ws"][0])  # noqa: E731
  y1, y2 = jlora.lora(two)(tree, x, lora_key=jax.random.key(3))
  assert not np.array_equal(np.asarray(y1) != 0, np.asarray(y2) != 0)


def test_dropout_expectation_matches_the_merged_model():
  tree = _wrap(_p(w=(6, 5)), {"w": jlora.LoRA(2, dropout=0.3)})
  x = _rnd(4, 6)
  f = jax.jit(jax.vmap(lambda k: jlora.lora(lambda t, x: x @ t["w"])(tree, x, lora_key=k)))
  mean = f(jax.random.split(jax.random.key(0), 4000)).mean(0)
  ref = x @ jlora.merge(tree)["w"]
  np.testing.assert_allclose(mean, ref, atol=0.08 * float(jnp.abs(ref).max()))


# -- what cannot be rewritten ----------------------------------------------------------------------

def test_unrewritable_use_merges_that_use_logs_it_and_strict_raises(caplog):
  tree = _wrap({"enc": {"w": _rnd(6, 6)}, "v": _rnd(6, 4)}, {"enc/w": jlora.LoRA(2), "v": jlora.LoRA(2)})
  fn = lambda p, x: (x @ jnp.tanh(p["enc"]["w"])) @ p["v"]  # noqa: E731
  x = _rnd(3, 6)
  with caplog.at_level(logging.DEBUG, logger="jlora"):
    out = jlora.lora(fn)(tree, x)
  _close(out, fn(jlora.merge(tree), x))
  assert any("'tanh'" in r.message and "'enc/w'" in r.message for r in caplog.records)
  assert not any("'v'" in r.message for r in caplog.records)   # the other leaf stayed low-rank
  with pytest.raises(RewriteError, match=r"'tanh'.*'enc/w'"):
    jlora.lora(fn, strict=True)(tree, x)
  assert issubclass(RewriteError, jlora.JloraError)
  # returning the weight is a use too
  with pytest.raises(RewriteError, match="returning"):
    jlora.lora(lambda p: p["v"], strict=True)(tree)
  np.testing.assert_allclose(jlora.lora(lambda p: p["v"])(tree), jlora.merge(tree)["v"], rtol=1e-6)


def test_a_half_of_split_is_rejected():
  tree = _wrap({"w": _rnd(6, 5)}, {"w": jlora.LoRA(2)})
  trainable, _ = jlora.split(tree)
  with pytest.raises(jlora.TreeError, match="combine"):
    jlora.lora(lambda p, x: x @ p["w"])(trainable, _rnd(2, 6))


def test_static_arguments_and_keyword_arguments_pass_through():
  tree = _wrap({"w": _rnd(6, 5)}, {"w": jlora.LoRA(2)})

  def fn(p, x, *, mode="relu", scale=2.0):
    return getattr(jax.nn, mode)(x @ p["w"]) * scale
  x = _rnd(2, 6)
  _close(jlora.lora(fn, strict=True)(tree, x, mode="tanh", scale=3.0),
         fn(jlora.merge(tree), x, mode="tanh", scale=3.0))
  _close(jlora.lora(lambda x, p: x @ p["w"], strict=True)(x, p=tree), x @ jlora.merge(tree)["w"])


# -- compiled programs -----------------------------------------------------------------------------

def test_swapping_adapters_does_not_recompile():
  tree = _wrap({"w": _rnd(6, 5), "v": _rnd(5, 3)}, {"*": jlora.LoRA(2)})
  trainable, frozen = jlora.split(tree)
  traces = []

  @jax.jit
  def loss(t, x):
    traces.append(1)
    return jnp.sum(jlora.lora(lambda p, x: x @ p["w"] @ p["v"])(jlora.combine(t, frozen), x))
  x = _rnd(2, 6)
  loss(trainable, x)
  other = jlora.split(_wrap({"w": _rnd(6, 5), "v": _rnd(5, 3)}, {"*": jlora.LoRA(2)}, seed=7))[0]
  v1, v2 = loss(trainable, x), loss(other, x)
  assert float(v1) != float(v2)
  assert len(traces) == 1 and loss._cache_size() == 1


def test_unrolled_mode_used_for_flop_counts_computes_the_same():
  from jlora._rewrite import lift
  fn, params, rules = PLAIN["lax_scan_reverse_with_consts"]
  tree = _wrap(params, rules)
  x = _rnd(4, 6, seed=5)
  unrolled = jax.jit(lift(fn, strict=True, unroll=True))
  _close(unrolled(tree, x), jlora.lora(fn)(tree, x))
  text = unrolled.lower(tree, x).as_text()
  assert "while" not in text
  # without adapters it still unrolls (the full fine-tuning side of the comparison)
  plain = jax.jit(lift(fn, strict=True, unroll=True)).lower(jlora.merge(tree), x).as_text()
  assert "while" not in plain
