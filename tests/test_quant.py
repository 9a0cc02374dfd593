"""QLoRA's quantised bases (``jlora.quantize``) against bitsandbytes 0.50 on CPU, and LoRA on them.

bitsandbytes quantises a torch ``(out, in)`` weight row by row; a jlora kernel
is ``(in, out)``, so every comparison transposes. The packed 4-bit codes, the
absmax scales and the dequantised values must match bitsandbytes exactly.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jlora
from jlora import _quant

torch = pytest.importorskip("torch")
bnbF = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(48, 128), (96, 512), (200, 64)]  # (out, in); (96, 512) has 768 scales: 3 second-level blocks


def _weight(shape, seed=0, scale=0.05):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _ours(wt, spec):
  return jlora.quantize({"k": jnp.asarray(wt.T)}, {"k": spec})["k"]


def _nearest_code(x):
  code = _quant.dynamic_map()
  return np.abs(x[:, None] - code[None, :]).argmin(-1)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_4bit_without_double_quant_is_bitsandbytes_bit_for_bit(kind, shape):
  wt = _weight(shape)
  packed, state = bnbF.quantize_4bit(torch.from_numpy(wt), blocksize=64, compress_statistics=False,
                                     quant_type=kind)
  ref = bnbF.dequantize_4bit(packed, state).numpy()
  spec = (jlora.NF4 if kind == "nf4" else jlora.FP4)(double_quant=False)
  q = _ours(wt, spec)
  np.testing.assert_array_equal(np.asarray(q.data).ravel(), packed.numpy().ravel())
  np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
  np.testing.assert_array_equal(np.asarray(q.dequantize()).T, ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_double_quant_dequantises_bitsandbytes_state_exactly(shape):
  """bitsandbytes' own NF4+DQ state, read into a QuantizedArray, dequantises to bitsandbytes' values."""
  wt = _weight(shape, seed=1)
  packed, st = bnbF.quantize_4bit(torch.from_numpy(wt), blocksize=64, compress_statistics=True,
                                  quant_type="nf4")
  ref = bnbF.dequantize_4bit(packed, st).numpy()
  assert st.state2.blocksize == 256
  np.testing.assert_array_equal(st.state2.code.numpy()[1:], _quant.dynamic_map()[1:])
  out_, in_ = shape
  q = jlora.QuantizedArray(
      jnp.asarray(packed.numpy().ravel()), jnp.asarray(st.absmax.numpy()),
      jnp.asarray(st.state2.absmax.numpy()), jnp.asarray(st.offset.numpy(), jnp.float32),
      spec=jlora.NF4(), axes=jlora.Axes((), (0,), (1,)), shape=(in_, out_), dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(q.dequantize()).T, ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_double_quant_matches_bitsandbytes(shape):
  """jlora's own NF4+DQ: same 4-bit codes, same offset and second-level scales as bitsandbytes.

  The 8-bit codes of the absmax scales are the nearest dynamic-map entries.
  bitsandbytes 0.50's CPU kernel picks the second-nearest for a few scales
  that lie close to the midpoint of two entries (measured: 19 of 13,824 on a
  SmolLM2 MLP weight); where the two differ, jlora's is never the farther.
  """
  wt = _weight(shape, seed=2)
  packed, st = bnbF.quantize_4bit(torch.from_numpy(wt), blocksize=64, compress_statistics=True,
                                  quant_type="nf4")
  ref = bnbF.dequantize_4bit(packed, st).numpy()
  q = _ours(wt, jlora.NF4())
  np.testing.assert_array_equal(np.asarray(q.data).ravel(), packed.numpy().ravel())
  # the mean of the scales: torch sums float32 in its own order, jlora in float64 (1 ulp apart at most)
  np.testing.assert_allclose(np.asarray(q.offset), st.offset.item(), rtol=2.5e-7)
  np.testing.assert_allclose(np.asarray(q.absmax2), st.state2.absmax.numpy(), rtol=1e-6)
  ours, theirs = np.asarray(q.absmax).astype(int), st.absmax.numpy().astype(int)
  differ = np.nonzero(ours != theirs)[0]
  assert len(differ) <= max(1, len(ours) // 200), (len(differ), len(ours))
  # the normalised scales, as both quantisers see them
  am = np.abs(wt.reshape(-1, 64)).max(-1)
  am2 = np.repeat(np.asarray(q.absmax2), 256)[:len(am)]
  normed = ((am - np.asarray(q.offset)) / am2).astype(np.float32)
  np.testing.assert_array_equal(ours, _nearest_code(normed))
  code = _quant.dynamic_map()
  assert np.all(np.abs(normed[differ] - code[ours[differ]]) <= np.abs(normed[differ] - code[theirs[differ]]))
  mine = np.asarray(q.dequantize()).T
  if len(differ) == 0:
    np.testing.assert_allclose(mine, ref, rtol=1e-6, atol=1e-9)  # the offset ulp, carried
  # either way, jlora's reconstruction is as close to the weight as bitsandbytes' (to rounding)
  assert np.abs(mine - wt).mean() <= np.abs(ref - wt).mean() * (1 + 1e-4)


@pytest.mark.parametrize("shape", [(48, 128), (200, 64)])
def test_int8_is_bitsandbytes_vectorwise(shape):
  wt = _weight(shape, seed=3)
  cb, stats, _ = bnbF.int8_vectorwise_quant(torch.from_numpy(wt))
  ref = bnbF.int8_vectorwise_dequant(cb, stats).numpy()
  q = _ours(wt, jlora.Int8())
  np.testing.assert_array_equal(np.asarray(q.data), cb.numpy())
  np.testing.assert_array_equal(np.asarray(q.absmax), stats.numpy())
  np.testing.assert_array_equal(np.asarray(q.dequantize()).T, ref)


def test_storage_and_leaf_interface():
  w = jnp.asarray(_weight((64, 576)).T)
  q = jlora.quantize({"k": w}, {"k": jlora.NF4()})["k"]
  assert q.shape == (576, 64) and q.dtype == jnp.float32 and q.data.dtype == jnp.uint8
  assert q.bits_per_weight() <= 4.2  # 4 + 8/64 + 32/(64*256) = 4.127
  assert jlora.quantize({"k": w}, {"k": jlora.NF4(double_quant=False)})["k"].bits_per_weight() == 4.5
  assert jlora.quantize({"k": w}, {"k": jlora.Int8()})["k"].bits_per_weight() == pytest.approx(8 + 32 / 576)
  bf = jlora.quantize({"k": w.astype(jnp.bfloat16)}, {"k": jlora.NF4()})["k"]
  assert bf.dequantize().dtype == jnp.bfloat16
  # a stacked kernel: each layer quantised on its own, as one bitsandbytes weight
  stack = jnp.stack([w, 2 * w])
  qs = jlora.quantize({"k": stack}, {"k": jlora.NF4(stack_axes=1)})["k"]
  np.testing.assert_array_equal(np.asarray(qs.dequantize()[0]), np.asarray(q.dequantize()))
  # jit / tree_map carry it as a pytree
  back = jax.jit(lambda t: t)(q)
  assert jlora.is_quantized(back) and back.shape == q.shape


# -- LoRA on a quantised base -------------------------------------------------------------------

def _model():
  ks = jax.random.split(jax.random.key(0), 4)
  params = {"layers": {"w": jax.random.normal(ks[0], (3, 64, 32)) * 0.1,
                       "v": jax.random.normal(ks[1], (3, 32, 64)) * 0.1},
            "head": jax.random.normal(ks[2], (64, 10)) * 0.1}

  def fn(p, x):
    def layer(h, lp):
      return h + jnp.tanh(h @ lp["w"]) @ lp["v"], None
    h, _ = jax.lax.scan(layer, x, p["layers"])
    return jnp.sum(jnp.sin(h @ p["head"]))

  q_rules = {"layers/w": jlora.NF4(stack_axes=1), "layers/v": jlora.NF4(block_size=32, stack_axes=1),
             "head": jlora.Int8()}
  return params, fn, q_rules, ks[3]


@pytest.fixture(scope="module")
def qlora():
  params, fn, q_rules, key = _model()
  q = jlora.quantize(params, q_rules)
  tree = jlora.wrap(q, {"layers/*": jlora.LoRA(4, stack_axes=1)}, key=key)
  for name in ("w", "v"):  # nonzero B, so the delta is in play
    leaf = tree["layers"][name]
    tree["layers"][name] = leaf.replace(b=jax.random.normal(jax.random.key(7), leaf.b.shape) * 0.1)
  # the reference: the same adapters on the dequantised (float) base
  ref = jax.tree.map(lambda x: x.dequantize() if jlora.is_quantized(x) else x, tree,
                     is_leaf=jlora.is_quantized)
  return fn, tree, ref


def _value_and_grads(fn, tree, x):
  trainable, frozen = jlora.split(tree)
  f = jlora.lora(fn)
  loss = lambda tr, x: f(jlora.combine(tr, frozen), x)  # noqa: E731
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(trainable, x)


def test_lora_on_quantised_base_equals_dequantised_base(qlora):
  fn, tree, ref = qlora
  assert jlora.is_quantized(tree["layers"]["w"].w) and jlora.is_quantized(tree["head"])
  x = jax.random.normal(jax.random.key(1), (5, 64))
  v1, (g1, gx1) = _value_and_grads(fn, tree, x)
  v2, (g2, gx2) = _value_and_grads(fn, ref, x)
  # and the brute-force reference: fn on the merged float params
  v3 = fn(jlora.merge(ref), x)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  np.testing.assert_allclose(v1, v3, rtol=1e-5)
  for name in ("w", "v"):
    for f in ("a", "b"):
      np.testing.assert_allclose(getattr(g1["layers"][name], f), getattr(g2["layers"][name], f),
                                 rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gx1, gx2, rtol=1e-4, atol=1e-6)
  # no gradient reaches the base: the trainable half holds only the factors
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(g1))
  assert sum(l.size for l in jax.tree.leaves(g1)) == 3 * 4 * (64 + 32) * 2


def test_dequantised_one_layer_at_a_time(qlora):
  """Inside the scan only one layer's float kernel exists: no stacked float32 (3, 64, 32) array."""
  fn, tree, _ = qlora
  trainable, frozen = jlora.split(tree)
  f = jlora.lora(fn)
  x = jnp.ones((5, 64))
  step = jax.jit(jax.grad(lambda tr: f(jlora.combine(tr, frozen), x)))
  text = step.lower(trainable).compile().as_text()
  assert "f32[3,64,32]" not in text and "f32[3,32,64]" not in text
  assert "f32[64,32]" in text  # the per-layer dequantised weight
  # the dense reference does hold the stacked float weights
  _, _, ref = qlora
  tr2, fr2 = jlora.split(ref)
  text2 = jax.jit(jax.grad(lambda tr: f(jlora.combine(tr, fr2), x))).lower(tr2).compile().as_text()
  assert "f32[3,64,32]" in text2


def test_train_step_on_quantised_base(qlora):
  """make_train_step on the quantised tree follows the same steps as on its dequantised twin."""
  import optax  # noqa: PLC0415

  fn, tree, ref = qlora
  x = jax.random.normal(jax.random.key(2), (5, 64))
  runs = []
  for t in (tree, ref):
    step = jlora.make_train_step(lambda p, b: fn(p, b) ** 2 / 100, optax.adam(1e-3))
    state, frozen = step.init(t)
    losses = []
    for _ in range(4):
      state, metrics = step(state, frozen, x)
      losses.append(float(metrics["loss"]))
    runs.append((losses, state, frozen))
  (lq, sq, fq), (lr, sr, _) = runs
  assert jlora.is_quantized(fq["layers"]["w"].w)  # the base is placed packed
  assert lq[-1] < lq[0]
  np.testing.assert_allclose(lq, lr, rtol=1e-4)
  np.testing.assert_allclose(sq.trainable["layers"]["w"].a, sr.trainable["layers"]["w"].a,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(fq["layers"]["w"].w.data),
                                np.asarray(tree["layers"]["w"].w.data))


@pytest.mark.parametrize("spec", [jlora.LoRA(4), jlora.DoRA(4), jlora.IA3(), jlora.IA3(feedforward=True),
                                  jlora.VeRA(16), jlora.LoRA(4, init="pissa")], ids=str)
def test_every_method_on_a_quantised_base(spec):
  """Each adapter kind on an NF4 base computes what it computes on the dequantised base."""
  w = jax.random.normal(jax.random.key(0), (64, 32)) * 0.1
  q = jlora.quantize({"k": w}, {"k": jlora.NF4()})
  x = jax.random.normal(jax.random.key(1), (3, 64))
  f = lambda p, x: jnp.sum(jnp.tanh(x @ p["k"]))  # noqa: E731
  tree = jlora.wrap(q, {"k": spec}, key=jax.random.key(2))
  dense = jax.tree.map(lambda z: z.dequantize() if jlora.is_quantized(z) else z, tree,
                       is_leaf=jlora.is_quantized)
  trainable, frozen = jlora.split(tree)
  _, frozen_d = jlora.split(dense)
  loss = lambda tr, fr: jlora.lora(f)(jlora.combine(tr, fr), x)  # noqa: E731
  v1, g1 = jax.value_and_grad(loss)(trainable, frozen)
  v2, g2 = jax.value_and_grad(loss)(trainable, frozen_d)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  np.testing.assert_allclose(v1, f(jlora.merge(dense), x), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_full_on_a_quantised_leaf_is_an_error():
  q = jlora.quantize({"k": jnp.ones((64, 8))}, {"k": jlora.NF4()})
  with pytest.raises(jlora.QuantizationError, match="trains 'k' in full.*frozen"):
    jlora.wrap(q, {"k": jlora.Full()}, key=jax.random.key(0))


# -- merge / unmerge ------------------------------------------------------------------------------

def test_merge_onto_quantised_base(qlora):
  _, tree, ref = qlora
  merged = jlora.merge(tree)
  want = jlora.merge(ref)
  for k in ("w", "v"):
    np.testing.assert_allclose(merged["layers"][k], want["layers"][k], rtol=0, atol=1e-6)
  assert not jlora.is_quantized(merged["head"])
  assert jlora.merge(tree, dtype=jnp.bfloat16)["layers"]["w"].dtype == jnp.bfloat16
  rq = jlora.merge(tree, requantize=True)
  w = rq["layers"]["w"]
  assert jlora.is_quantized(w) and w.spec == tree["layers"]["w"].w.spec
  assert jlora.is_quantized(rq["head"])
  # requantising costs one more NF4 rounding: at most half a code step of each block's scale
  # (here one block is a whole input column: 64 inputs, block_size 64)
  m = np.asarray(want["layers"]["w"])
  err = np.abs(np.asarray(w.dequantize()) - m)
  gap = np.diff(np.sort(_quant.NF4_VALUES)).max()  # 0.304, from -1 to -0.696
  block_absmax = np.abs(m).max(axis=1, keepdims=True)
  assert np.all(err <= 0.5 * gap * block_absmax * (1 + 1e-2))  # 1%: the 8-bit scale's rounding
  assert err.mean() <= 0.05 * np.abs(m).mean() * 2
  # unmerge recovers the (dequantised) base, float or quantised again
  base = jlora.unmerge(merged, tree)
  np.testing.assert_allclose(base["layers"]["w"], ref["layers"]["w"].w, rtol=0, atol=1e-6)
  again = jlora.unmerge(merged, tree, requantize=True)["layers"]["w"]
  np.testing.assert_array_equal(np.asarray(again.data), np.asarray(tree["layers"]["w"].w.data))


# -- bad input --------------------------------------------------------------------------------------

def test_bad_input_errors_and_nothing_modified():
  params = {"k": jnp.ones((48, 8)), "ids": jnp.arange(8), "bias": jnp.ones(8)}
  before = jax.tree.map(np.asarray, params)
  with pytest.raises(jlora.QuantizationError, match="int32.*only floating-point"):
    jlora.quantize(params, {"ids": jlora.NF4()})
  with pytest.raises(jlora.QuantizationError, match="1-D"):
    jlora.quantize(params, {"bias": jlora.Int8()})
  with pytest.raises(jlora.QuantizationError, match="input size 48 .* not a multiple.*e.g. 16"):
    jlora.quantize(params, {"k": jlora.NF4(block_size=32)})
  with pytest.raises(jlora.SpecError, match="block_size"):
    jlora.NF4(block_size=7)
  with pytest.raises(jlora.SpecError, match="jlora.quantize takes"):
    jlora.quantize(params, {"k": jlora.LoRA(2)})
  q = jlora.quantize(params, {"k": jlora.NF4(block_size=16)})
  with pytest.raises(jlora.QuantizationError, match="already a QuantizedArray"):
    jlora.quantize(q, {"k": jlora.NF4(block_size=16)})
  tree = jlora.wrap(q, {"k": jlora.LoRA(2)}, key=jax.random.key(0))
  with pytest.raises(jlora.QuantizationError, match="dtype=.*int8.*floating-point"):
    jlora.merge(tree, dtype=jnp.int8)
  with pytest.raises(jlora.RuleError):
    jlora.quantize(params, {"nothing/here": jlora.NF4()})
  for k, v in before.items():
    np.testing.assert_array_equal(np.asarray(params[k]), v)


@pytest.mark.parametrize("spec", [jlora.NF4(), jlora.Int8(), jlora.Q4_1(), jlora.Q8_0()], ids=str)
def test_tied_output_projection_in_row_chunks(spec, monkeypatch):
  """``h @ E^T`` over a large quantised embedding runs in row chunks (values and input gradient as
  on the dequantised table), and a lookup decodes only its rows."""
  from jlora import _rewrite
  monkeypatch.setattr(_rewrite, "_CHUNK_BYTES", 1000)
  monkeypatch.setattr(_rewrite, "_CHUNK_TARGET", 20000)
  assert _rewrite._row_chunks(512, 128) == 16
  emb = jax.random.normal(jax.random.key(0), (512, 128)) * 0.1
  q = jlora.quantize({"e": {"embedding": emb}}, {"e/embedding": spec})
  assert q["e"]["embedding"].axes == jlora.Axes((), (1,), (0,))  # row by row, blocks along features
  d = {"e": {"embedding": q["e"]["embedding"].dequantize()}}
  ids = jnp.array([[3, 511, 0], [7, 7, 100]])

  def g(p, h):
    e = p["e"]["embedding"]
    return jnp.sum(jnp.sin(jnp.einsum("btd,vd->btv", h + e[ids], e)))
  h = jax.random.normal(jax.random.key(1), (2, 3, 128))
  a, ga = jax.value_and_grad(lambda h: jlora.lora(g)(q, h))(h)
  b, gb = jax.value_and_grad(lambda h: g(d, h))(h)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-5)
  text = jax.jit(jax.grad(lambda h: jlora.lora(g)(q, h))).lower(h).compile().as_text()
  assert "f32[512,128]" not in text and "f32[32,128]" in text  # chunks of 32 rows, never the table


def test_peft_and_orbax_adapters_round_trip_on_a_quantised_base(tmp_path):
  """QLoRA adapters are ordinary LoRA adapters: save_peft / load_peft and save_adapters /
  load_adapters work on a quantised tree and give back the same model."""
  from jlora.models.llama import LlamaConfig, init_llama, llama_forward

  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2)
  q = jlora.quantize(init_llama(cfg, jax.random.key(0)),
                     {"layers/**/kernel": jlora.NF4(block_size=32, stack_axes=1)})
  tree = jlora.wrap(q, {"layers/self_attn/{q_proj,v_proj}/kernel": jlora.LoRA(4, stack_axes=1)},
                    key=jax.random.key(1))
  for n in ("q_proj", "v_proj"):
    leaf = tree["layers"]["self_attn"][n]["kernel"]
    tree["layers"]["self_attn"][n]["kernel"] = leaf.replace(b=jnp.full(leaf.b.shape, 0.05))
  f = jlora.lora(lambda p, i: llama_forward(p, i, cfg))
  ids = jnp.array([[1, 2, 3, 4]])
  want = f(tree, ids)
  back = jlora.load_peft(jlora.save_peft(tmp_path / "peft", tree, mapping="llama"), q, mapping="llama")
  assert jlora.is_quantized(back["layers"]["self_attn"]["q_proj"]["kernel"].w)
  np.testing.assert_array_equal(f(back, ids), want)
  jlora.save_adapters(tmp_path / "orbax", tree)
  np.testing.assert_array_equal(f(jlora.load_adapters(tmp_path / "orbax", q), ids), want)
  # the fingerprint knows the base is quantised: the float base is another base
  with pytest.raises(jlora.CheckpointError):
    jlora.load_adapters(tmp_path / "orbax", jlora.merge(q))  # merge: the dequantised base
