"""Bottleneck adapters (jlora.Bottleneck): a brute-force reference, a torch BERT with the adapters
as forward hooks (AdapterHub's Houlsby / Pfeiffer forms), training, errors.

AdapterHub itself (the ``adapters`` package) needs transformers 4.x and cannot be installed beside
the transformers 5 of the test extra; experiments/check_adapterhub.py runs it in its own venv
on MiniLM (result: experiments/results/adapterhub_parity.txt). Here the reference is a torch
``BertModel`` of transformers 5 whose ``attention.output.dense`` / ``output.dense`` layers get
``y -> y + up(act(down(y)))`` as forward hooks, written from AdapterHub's definition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

KEY = jax.random.key(0)


def _randomise(tree, scale=0.2, seed=0):
  rng = np.random.default_rng(seed)

  def go(x):
    if not isinstance(x, jlora.BottleneckWeight):
      return x
    return x.replace(**{n: jnp.asarray(scale * rng.normal(size=getattr(x, n).shape), jnp.float32)
                        for n in x.trainable})
  return jax.tree.map(go, tree, is_leaf=jlora.is_adapted)


def test_dense_general_kernel_and_bfloat16_equal_a_brute_force():
  """A (in, heads, head_dim) kernel: the adapter spans both output axes (numpy reference)."""
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(6, 2, 4)), jnp.float32)
  tree = jlora.wrap({"k": w}, {"k": jlora.Bottleneck(width=3, non_linearity="gelu", scaling=0.5,
                                                    in_axes=(0,), out_axes=(1, 2))}, key=KEY)
  tree = _randomise(tree)
  leaf = tree["k"]
  assert leaf.down.shape == (2, 4, 3) and leaf.up.shape == (3, 2, 4) and leaf.bias_up.shape == (2, 4)
  x = rng.normal(size=(5, 6)).astype(np.float32)
  got = jlora.lora(lambda p, x: jnp.einsum("bi,ihd->bhd", x, p["k"]), strict=True)(tree, x)
  import math
  z = np.einsum("bi,ihd->bhd", x, np.asarray(w)).reshape(5, 8)
  pre = z @ np.asarray(leaf.down).reshape(8, 3) + np.asarray(leaf.bias_down)
  act = 0.5 * pre * (1 + np.vectorize(math.erf)(pre / np.sqrt(2)))
  ref = z + 0.5 * (act @ np.asarray(leaf.up).reshape(3, 8) + np.asarray(leaf.bias_up).reshape(8))
  np.testing.assert_allclose(np.asarray(got).reshape(5, 8), ref, rtol=1e-5, atol=1e-5)
  # a bfloat16 base: the adapter runs in float32 (its dtype) and the output keeps the base's dtype
  tb = jlora.wrap({"k": w.astype(jnp.bfloat16)}, {"k": jlora.Bottleneck(
      width=3, in_axes=(0,), out_axes=(1, 2))}, key=KEY)
  assert tb["k"].down.dtype == jnp.float32
  out = jlora.lora(lambda p, x: jnp.einsum("bi,ihd->bhd", x, p["k"]))(tb, x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16


# -- a torch BERT with hook adapters ------------------------------------------------------------

def _torch_act(name):
  return {"swish": torch.nn.functional.silu, "relu": torch.relu}[name]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=48,
                                max_position_embeddings=16, hidden_act="gelu")
  torch.manual_seed(0)
  hf = transformers.BertModel(cfg).eval()
  g = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for n, p in hf.named_parameters():  # nonzero biases: the fold of the layer bias matters
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  d = tmp_path_factory.mktemp("bn_bert") / "ckpt"
  hf.save_pretrained(d)
  model, params, _ = jlora.models.load(d, task="base", with_tokenizer=False)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 60, (3, 10)).astype(np.int32)
  mask = np.ones((3, 10), np.int32)
  mask[1, 6:] = 0
  return hf, model, params, ids, mask


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_bert_adapters_equal_torch_hooks_with_the_same_weights(tiny_bert, placement):
  hf, model, params, ids, mask = tiny_bert
  rules = jlora.adapter_rules("bert", placement, reduction_factor=4)
  act = rules[0][1].non_linearity
  tree = jlora.wrap(params, rules, key=KEY)
  g = torch.Generator().manual_seed(7)
  hooks = []
  for i, layer in enumerate(hf.encoder.layer):
    targets = [("layers/output/dense", layer.output.dense)]
    if placement == "houlsby":
      targets.insert(0, ("layers/attention/output/dense", layer.attention.output.dense))
    for module, lin in targets:
      d = lin.out_features
      m = d // 4
      dw, db = 0.2 * torch.randn(m, d, generator=g), 0.2 * torch.randn(m, generator=g)
      uw, ub = 0.2 * torch.randn(d, m, generator=g), 0.2 * torch.randn(d, generator=g)

      def hook(mod, inp, y, dw=dw, db=db, uw=uw, ub=ub):  # AdapterHub: y + up(act(down(y)))
        return y + (_torch_act(act)(y @ dw.T + db) @ uw.T + ub)
      hooks.append(lin.register_forward_hook(hook))
      node = tree
      for part in module.split("/"):
        node = node[part]
      node["kernel"] = jlora.from_adapterhub(node["kernel"], dw.numpy(), db.numpy(), uw.numpy(),
                                             ub.numpy(), lin.bias.detach().numpy(), layer=i)
  try:
    with torch.no_grad():
      ref = hf(input_ids=torch.tensor(ids, dtype=torch.long),
               attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
  finally:
    for h in hooks:
      h.remove()
  got = np.asarray(jax.jit(jlora.lora(lambda p, i, m: model.apply({"params": p}, i, m)[0],
                                      strict=True))(tree, ids, mask))
  base = np.asarray(model.apply({"params": params}, ids, mask)[0])
  keep = mask.astype(bool)
  diff = np.abs(got - ref)[keep].max()
  print(f"{placement}: max|jlora - torch hooks| = {diff:.2e}, adapter effect {np.abs(base - ref)[keep].max():.2f}")
  assert diff < 2e-4
  assert np.abs(base - ref)[keep].max() > 0.1  # the adapters really act


def test_adapter_rules_count_and_training_moves_only_the_adapters(tiny_bert):
  _, model, params, ids, mask = tiny_bert
  tree = jlora.wrap(params, jlora.adapter_rules("bert", "houlsby", reduction_factor=4, init="zero"),
                    key=KEY)
  s = jlora.summary(tree)
  # 2 layers x 2 places x (32*8 + 8*32 + 8 + 32)
  assert s.trainable == 2 * 2 * (32 * 8 * 2 + 8 + 32)
  lifted = jlora.lora(lambda p, i, m: model.apply({"params": p}, i, m)[0])
  np.testing.assert_allclose(lifted(tree, ids, mask), model.apply({"params": params}, ids, mask)[0],
                             rtol=1e-5, atol=1e-6)  # init="zero": the base (up to op order)
  trainable, frozen = jlora.split(tree)
  opt = jlora.optimizer(optax.adam(1e-2))
  state = opt.init(trainable)
  target = jnp.asarray(np.random.default_rng(0).normal(size=(3, 10, 32)), jnp.float32)

  @jax.jit
  def step(t, st):
    loss, g = jax.value_and_grad(lambda t: jnp.mean((lifted(jlora.combine(t, frozen), ids, mask)
                                                     - target) ** 2))(t)
    up, st = opt.update(g, st, t)
    return optax.apply_updates(t, up), st, loss
  losses = []
  for _ in range(5):
    trainable, state, loss = step(trainable, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  moved = jlora.combine(trainable, frozen)
  for a, b in zip(jax.tree.leaves(jlora.split(moved)[1]), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, b)  # the frozen half is untouched


def test_bad_input_gives_clear_errors():
  w = jnp.ones((8, 8))
  with pytest.raises(jlora.SpecError, match="non_linearity"):
    jlora.Bottleneck(non_linearity="mish")
  with pytest.raises(jlora.SpecError, match="reduction_factor"):
    jlora.Bottleneck(reduction_factor=0)
  with pytest.raises(jlora.SpecError, match="init"):
    jlora.Bottleneck(init="xavier")
  with pytest.raises(jlora.SpecError, match="no input and output axes"):
    jlora.wrap({"b": jnp.ones(8)}, {"b": jlora.Bottleneck(width=2)}, key=KEY)
  with pytest.raises(jlora.SpecError, match="placement"):
    jlora.adapter_rules("bert", "parallel")
  tree = jlora.wrap({"k": w}, {"k": jlora.Bottleneck(width=2)}, key=KEY)
  with pytest.raises(jlora.TreeError, match="cannot be merged"):
    jlora.merge(tree)
  # a use other than a contraction (here: an embedding lookup) cannot carry the adapter
  with pytest.raises(jlora.RewriteError, match="bottleneck"):
    jlora.lora(lambda p, i: jnp.take(p["k"], i, axis=0))(tree, jnp.array([1, 2]))
  with pytest.raises(jlora.SpecError, match="shape"):
    jlora.from_adapterhub(tree["k"], np.ones((3, 8)), np.ones(3), np.ones((8, 3)), np.ones(8))
