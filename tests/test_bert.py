"""BERT / MiniLM: parity with transformers (torch CPU, float32), conversion, save, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jlora._errors import ConfigError, ModelError  # noqa: E402
from jlora.models.bert import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    bert_params_from_hf,
    bert_params_to_hf,
    load_bert,
    load_minilm,
    save_bert_hf,
)

TOL = 1e-4
VOCAB = 99
BATCH, SEQ = 3, 12

EXPECTED_PATHS = {
    "embeddings/word_embeddings/embedding",
    "embeddings/position_embeddings/embedding",
    "embeddings/token_type_embeddings/embedding",
    "embeddings/LayerNorm/scale", "embeddings/LayerNorm/bias",
    *(f"layers/attention/self/{m}/{p}" for m in ("query", "key", "value") for p in ("kernel", "bias")),
    "layers/attention/output/dense/kernel", "layers/attention/output/dense/bias",
    "layers/attention/output/LayerNorm/scale", "layers/attention/output/LayerNorm/bias",
    "layers/intermediate/dense/kernel", "layers/intermediate/dense/bias",
    "layers/output/dense/kernel", "layers/output/dense/bias",
    "layers/output/LayerNorm/scale", "layers/output/LayerNorm/bias",
    "pooler/dense/kernel", "pooler/dense/bias",
    "classifier/kernel", "classifier/bias",
}


def _paths(tree):
  return {"/".join(str(k.key) for k in kp) for kp, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _perturb(hf_model, seed):
  """Random non-trivial weights (HF init leaves LayerNorms at 1/0 and biases at 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.2
      p.copy_(1.0 + noise if name.endswith("LayerNorm.weight") else noise)
  return hf_model.eval()


def _tokenizer():
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
  return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, VOCAB, (BATCH, SEQ)).astype(np.int32)
  types = rng.integers(0, 3, (BATCH, SEQ)).astype(np.int32)
  mask = np.ones((BATCH, SEQ), np.int32)
  mask[1, 8:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = 0
  return ids, mask, types


def _torch(hf_model, batch):
  ids, mask, types = (torch.tensor(a, dtype=torch.long) for a in batch)
  with torch.no_grad():
    return hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types)


@pytest.fixture(scope="module")
def cls_ckpt(tmp_path_factory):
  """A tiny BertForSequenceClassification (exact gelu, 3 token types, 3 labels) with a tokenizer."""
  cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=37,
                                max_position_embeddings=24, type_vocab_size=3, num_labels=3,
                                hidden_act="gelu")
  torch.manual_seed(0)
  hf = _perturb(transformers.BertForSequenceClassification(cfg), 1)
  d = tmp_path_factory.mktemp("cls") / "ckpt"
  hf.save_pretrained(d)
  _tokenizer().save_pretrained(d)
  return d, hf


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
  """A tiny BertModel (tanh gelu), saved as a sharded safetensors checkpoint, no tokenizer."""
  cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=3,
                                num_attention_heads=3, intermediate_size=40,
                                max_position_embeddings=16, type_vocab_size=3,
                                hidden_act="gelu_new", layer_norm_eps=1e-7)
  torch.manual_seed(0)
  hf = _perturb(transformers.BertModel(cfg), 2)
  d = tmp_path_factory.mktemp("base") / "ckpt"
  hf.save_pretrained(d, max_shard_size="20KB")
  return d, hf


@pytest.fixture(scope="module")
def cls_loaded(cls_ckpt):
  model, params, tok = load_bert(cls_ckpt[0], task="classification")
  return model, params, tok, jax.jit(model.apply)


def test_classification_logits_match_transformers(cls_ckpt, cls_loaded, batch):
  _, hf = cls_ckpt
  model, params, tok, apply = cls_loaded
  assert isinstance(model, BertForSequenceClassification) and model.config.num_labels == 3
  ref = _torch(hf, batch).logits.numpy()
  got = np.asarray(apply({"params": params}, *batch))
  diff = np.abs(got - ref).max()
  print(f"classification logits max|diff| = {diff:.3g} (|logits| up to {np.abs(ref).max():.3g})")
  assert got.shape == (BATCH, 3) and diff <= TOL
  assert isinstance(tok, transformers.PreTrainedTokenizerBase)


def test_base_hidden_and_pooler_match_transformers_sharded(base_ckpt, batch):
  d, hf = base_ckpt
  assert (d / "model.safetensors.index.json").is_file()  # really sharded
  model, params, tok = load_bert(d, task="base", with_tokenizer=False)
  assert isinstance(model, BertModel) and tok is None
  hidden, pooled = jax.jit(model.apply)({"params": params}, *batch)
  ref = _torch(hf, batch)
  dh = np.abs(np.asarray(hidden) - ref.last_hidden_state.numpy()).max()
  dp = np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max()
  print(f"base last_hidden max|diff| = {dh:.3g} (padded positions included), pooled = {dp:.3g}")
  assert dh <= TOL and dp <= TOL


def test_param_layout_mirrors_hf_names(cls_ckpt, cls_loaded):
  _, hf = cls_ckpt
  model, params, _, _ = cls_loaded
  assert _paths(params) == EXPECTED_PATHS
  # Same structure and shapes as the module's own init.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)))
  sd = hf.state_dict()
  q = params["layers"]["attention"]["self"]["query"]["kernel"]
  assert q.shape == (2, 32, 32)
  np.testing.assert_array_equal(q[1], sd["bert.encoder.layer.1.attention.self.query.weight"].numpy().T)
  np.testing.assert_array_equal(params["layers"]["intermediate"]["dense"]["kernel"][0],
                                sd["bert.encoder.layer.0.intermediate.dense.weight"].numpy().T)
  np.testing.assert_array_equal(params["classifier"]["kernel"], sd["classifier.weight"].numpy().T)


def test_hf_conversion_round_trip_is_exact(cls_ckpt):
  _, hf = cls_ckpt
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  cfg = BertConfig.from_hf(hf.config)
  back = bert_params_to_hf(bert_params_from_hf(sd, cfg), cfg)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  # Without the "bert." prefix and with the legacy gamma/beta names.
  legacy = {k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
            .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in sd.items()}
  again = bert_params_to_hf(bert_params_from_hf(legacy, cfg), cfg, prefix="")
  np.testing.assert_array_equal(again["embeddings.LayerNorm.weight"], sd["bert.embeddings.LayerNorm.weight"])


def test_fresh_head_and_mean_pooling_match_torch(base_ckpt, batch):
  d, hf = base_ckpt
  ref = _torch(hf, batch)
  model, params, _ = load_bert(d, task="classification", num_labels=4, with_tokenizer=False,
                               key=jax.random.key(7))
  again = load_bert(d, task="classification", num_labels=4, with_tokenizer=False,
                    key=jax.random.key(7))[1]
  other = load_bert(d, task="classification", num_labels=4, with_tokenizer=False,
                    key=jax.random.key(8))[1]
  k, b = params["classifier"]["kernel"], params["classifier"]["bias"]
  assert k.shape == (24, 4) and not np.any(np.asarray(b))
  assert 0.01 < float(jnp.std(k)) < 0.03
  np.testing.assert_array_equal(k, again["classifier"]["kernel"])
  assert not np.allclose(k, other["classifier"]["kernel"])
  got = np.asarray(jax.jit(model.apply)({"params": params}, *batch))
  want = ref.pooler_output.numpy() @ np.asarray(k)  # HF's pooler, our fresh head
  assert np.abs(got - want).max() <= TOL

  mmodel, mparams, _ = load_bert(d, task="classification", num_labels=4, pooling="mean",
                                 with_tokenizer=False, key=jax.random.key(7))
  assert "pooler" not in mparams
  mask = torch.tensor(batch[1], dtype=torch.float32)[..., None]
  pooled = (ref.last_hidden_state * mask).sum(1) / mask.sum(1)
  want = pooled.numpy() @ np.asarray(mparams["classifier"]["kernel"])
  got = np.asarray(jax.jit(mmodel.apply)({"params": mparams}, *batch))
  print(f"mean-pooled logits max|diff| = {np.abs(got - want).max():.3g}")
  assert np.abs(got - want).max() <= TOL


def test_save_round_trip_loads_in_transformers(tmp_path, batch):
  cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=24, max_position_embeddings=SEQ, type_vocab_size=3,
                   num_labels=2, hidden_act="gelu_new")
  model = BertForSequenceClassification(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"]
  # Random everything (LayerNorms and biases too) so a swapped name would show.
  rng = np.random.default_rng(4)
  params = jax.tree_util.tree_map_with_path(
      lambda kp, s: (kp[-1].key == "scale") + 0.2 * rng.standard_normal(s.shape, np.float32), shapes)
  tok = _tokenizer()
  out = save_bert_hf(model, params, tok, tmp_path / "saved")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temp dir left
  hf = transformers.BertForSequenceClassification.from_pretrained(out).eval()
  ref = _torch(hf, batch).logits.numpy()
  got = np.asarray(jax.jit(model.apply)({"params": params}, *batch))
  diff = np.abs(got - ref).max()
  print(f"save round trip: logits max|diff| = {diff:.3g}")
  assert diff <= TOL
  tok2 = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  assert tok2("w1 w2 w50")["input_ids"] == tok("w1 w2 w50")["input_ids"]
  # Back into jlora: bit-identical params.
  _, params2, _ = load_bert(out, task="classification")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)
  # An existing, non-empty directory is kept unless overwrite=True.
  before = (out / "model.safetensors").read_bytes()
  with pytest.raises(ModelError, match="not empty"):
    save_bert_hf(model, params2, None, out)
  assert (out / "model.safetensors").read_bytes() == before
  save_bert_hf(cfg, params2, None, out, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_lora_on_bert_merges_and_saves_for_transformers(cls_loaded, batch, tmp_path):
  import jlora

  model, params, _, apply = cls_loaded
  rules = {"layers/attention/self/{query,value}/kernel": jlora.LoRA(4, stack_axes=1),
           "classifier/*": jlora.Full()}
  tree = jlora.wrap(params, rules, key=jax.random.key(0))
  trainable, frozen = jlora.split(tree)
  q = trainable["layers"]["attention"]["self"]["query"]["kernel"]
  assert q.a.shape == (2, 32, 4) and q.b.shape == (2, 4, 32)  # one adapter per layer
  rng = np.random.default_rng(5)
  trainable = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32), trainable)
  tree = jlora.combine(trainable, frozen)
  forward = jax.jit(jlora.lora(lambda p, *a: model.apply({"params": p}, *a)))
  got = np.asarray(forward(tree, *batch))
  out = save_bert_hf(model, jlora.merge(tree), None, tmp_path / "merged")
  hf = transformers.BertForSequenceClassification.from_pretrained(out).eval()
  ref = _torch(hf, batch).logits.numpy()
  before = np.asarray(apply({"params": params}, *batch))
  print(f"LoRA forward vs transformers on merged save: max|diff| = {np.abs(got - ref).max():.3g}")
  assert np.abs(got - ref).max() <= TOL and np.abs(got - before).max() > 1e-2


def test_remat_grads_match_torch_and_dropout(cls_ckpt, cls_loaded, batch):
  _, hf = cls_ckpt
  model, params, _, _ = cls_loaded
  remat = BertForSequenceClassification(dataclasses.replace(model.config, remat_policy="nothing_saveable"))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(remat.apply({"params": p}, *batch) ** 2)))(params)
  hf.zero_grad()
  ids, mask, types = (torch.tensor(a, dtype=torch.long) for a in batch)
  (hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits ** 2).sum().backward()
  sd = dict(hf.named_parameters())
  pairs = [(grads["layers"]["attention"]["self"]["query"]["kernel"][1],
            sd["bert.encoder.layer.1.attention.self.query.weight"].grad.numpy().T),
           (grads["layers"]["output"]["LayerNorm"]["scale"][0],
            sd["bert.encoder.layer.0.output.LayerNorm.weight"].grad.numpy()),
           (grads["embeddings"]["word_embeddings"]["embedding"],
            sd["bert.embeddings.word_embeddings.weight"].grad.numpy()),
           (grads["classifier"]["kernel"], sd["classifier.weight"].grad.numpy().T)]
  hf.zero_grad()
  diffs = [float(np.abs(np.asarray(g) - t).max() / max(np.abs(t).max(), 1e-6)) for g, t in pairs]
  print(f"remat grads vs torch: max relative diff {max(diffs):.3g}")
  assert max(diffs) <= 1e-4
  drop = jax.jit(lambda p, r: model.apply({"params": p}, *batch, deterministic=False, rngs={"dropout": r}))
  assert not np.allclose(drop(params, jax.random.key(0)), drop(params, jax.random.key(1)))


# ----------------------------------------------------------------------------- bad input


def _listing(d):
  return sorted((p.name, p.stat().st_size) for p in d.iterdir())


def test_missing_and_truncated_safetensors(cls_ckpt, tmp_path):
  src, _ = cls_ckpt
  d = tmp_path / "ckpt"
  shutil.copytree(src, d)
  (d / "model.safetensors").unlink()
  before = _listing(d)
  with pytest.raises(ModelError, match=r"model\.safetensors is missing"):
    load_bert(d)
  assert _listing(d) == before
  size = (src / "model.safetensors").stat().st_size
  with open(src / "model.safetensors", "rb") as f, open(d / "model.safetensors", "wb") as g:
    g.write(f.read(size // 2))
  before = _listing(d)
  with pytest.raises(ModelError, match=r"model\.safetensors.*truncated or corrupt"):
    load_bert(d)
  assert _listing(d) == before


def test_missing_shard(base_ckpt, tmp_path):
  src, _ = base_ckpt
  d = tmp_path / "ckpt"
  shutil.copytree(src, d)
  shard = sorted(d.glob("model-*.safetensors"))[0]
  shard.unlink()
  with pytest.raises(ModelError, match=shard.name):
    load_bert(d, task="base", with_tokenizer=False)


def test_config_and_weights_disagree(cls_ckpt, tmp_path):
  src, _ = cls_ckpt
  d = tmp_path / "ckpt"
  shutil.copytree(src, d)
  cfg = json.loads((d / "config.json").read_text())
  cfg["intermediate_size"] = 64
  (d / "config.json").write_text(json.dumps(cfg))
  shapes = r"encoder\.layer\.0\.intermediate\.dense\.weight.*\(37, 32\).*\(64, 32\)"
  with pytest.raises(ModelError, match=shapes):
    load_bert(d, task="classification")
  cfg["intermediate_size"], cfg["num_hidden_layers"] = 37, 3
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelError, match=r"lacks tensor 'encoder\.layer\.2\."):
    load_bert(d, task="classification")
  cfg["num_hidden_layers"] = 1
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelError, match=r"unexpected tensors 'bert\.encoder\.layer\.1\."):
    load_bert(d, task="classification")
  with pytest.raises(ModelError, match="classifier with 3 labels"):
    load_bert(src, task="classification", num_labels=5)
  (d / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
  with pytest.raises(ModelError, match="roberta"):
    load_bert(d)
  assert {p.name for p in d.iterdir()} == {p.name for p in src.iterdir()}


def test_save_rejects_bad_params_and_writes_nothing(cls_loaded, tmp_path):
  model, params, _, _ = cls_loaded
  bad = jax.tree.map(lambda x: x, params)
  bad["layers"]["output"]["dense"]["kernel"] = jnp.zeros((2, 37, 31))
  with pytest.raises(ModelError, match=r"layers/output/dense/kernel.*\(2, 37, 31\).*\(2, 37, 32\)"):
    save_bert_hf(model, bad, None, tmp_path / "out")
  lora = jax.tree.map(lambda x: x, params)
  lora["layers"]["attention"]["self"]["query"]["lora_a"] = jnp.zeros((2, 32, 4))
  with pytest.raises(ModelError, match="lora_a"):
    save_bert_hf(model, lora, None, tmp_path / "out")
  with pytest.raises(ModelError, match="without a pooler"):
    save_bert_hf(model, {k: v for k, v in params.items() if k != "pooler"}, None, tmp_path / "out")
  assert list(tmp_path.iterdir()) == []


def test_config_validation():
  with pytest.raises(ConfigError, match="not a multiple"):
    BertConfig(hidden_size=30, num_attention_heads=4)
  with pytest.raises(ConfigError, match="hidden_act"):
    BertConfig(hidden_act="mish")
  with pytest.raises(ModelError, match="relative_key"):
    BertConfig.from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
  hf = transformers.BertConfig(hidden_size=32, num_attention_heads=4, hidden_act="gelu_new", num_labels=5)
  c = BertConfig.from_hf(hf, dtype=jnp.bfloat16)
  assert (c.hidden_act, c.num_labels, c.dtype, c.layer_norm_eps) == ("gelu_new", 5, jnp.bfloat16, 1e-12)


# ----------------------------------------------------------------------------- real model


SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome, I loved every minute of it!",
    "Quantum field theory unifies special relativity and quantum mechanics.",
    "short",
]


@pytest.mark.slow
def test_minilm_sentence_embeddings_match_transformers():
  model, params, tok = load_minilm()
  assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
  b = tok(SENTENCES, padding=True, return_tensors="np")
  assert b["attention_mask"].min() == 0  # padding really present
  root = tok.name_or_path
  hf = transformers.BertModel.from_pretrained(root, local_files_only=True).eval()
  with torch.no_grad():
    tb = {k: torch.tensor(v) for k, v in b.items()}
    h = hf(**tb).last_hidden_state
    m = tb["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1).numpy()
  emb = np.asarray(jax.jit(model.apply)({"params": params}, b["input_ids"], b["attention_mask"],
                                        b["token_type_ids"]))
  cos = (emb * ref).sum(-1) / (np.linalg.norm(emb, axis=-1) * np.linalg.norm(ref, axis=-1))
  print(f"all-MiniLM-L6-v2 float32: min cosine = {cos.min():.8f}, max|diff| = {np.abs(emb - ref).max():.3g}")
  assert cos.min() >= 0.9999
  assert np.allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  # bfloat16 compute (and weights): looser, reported.
  m16, p16, _ = load_minilm(dtype=jnp.bfloat16)
  e16 = np.asarray(jax.jit(m16.apply)({"params": p16}, b["input_ids"], b["attention_mask"],
                                      b["token_type_ids"]))
  cos16 = (e16 * ref).sum(-1) / (np.linalg.norm(e16, axis=-1) * np.linalg.norm(ref, axis=-1))
  print(f"all-MiniLM-L6-v2 bfloat16: min cosine = {cos16.min():.6f}")
  assert cos16.min() >= 0.99
