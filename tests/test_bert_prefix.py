"""Prefix tuning on the shipped BERT: a numpy BERT with the prefix's keys and values concatenated
in every layer (the reference), the PEFT format both ways, training from the CLI, errors.

PEFT 0.21 runs prefix tuning on BERT only with transformers 4 (transformers 5's BertModel takes
no ``past_key_values``: PEFT raises "Model does not support past key values"), so PEFT itself
is the reference in experiments/check_bert_prefix.py, run in a transformers 4.57 venv
(experiments/results/bert_prefix_parity.txt); here the reference is written out in numpy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models.bert import BertConfig, BertForSequenceClassification, BertModel

CFG = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=24, max_position_embeddings=24, num_labels=3, pooling="cls")
N = 3


def _np_bert(p, ids, mask, kv):
  """BERT (transformers' definition) in numpy; ``kv`` ``(N, L, 2, heads, hd)`` prefix keys/values."""
  c = CFG
  f = lambda x: np.asarray(getattr(x, "w", x), np.float64)  # noqa: E731
  erf = np.vectorize(math.erf)

  def ln(x, g):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + c.layer_norm_eps) * f(g["scale"]) + f(g["bias"])
  b, t = ids.shape
  n = kv.shape[0]
  e = p["embeddings"]
  x = (f(e["word_embeddings"]["embedding"])[ids] + f(e["token_type_embeddings"]["embedding"])[0]
       + f(e["position_embeddings"]["embedding"])[n:n + t])
  x = ln(x, e["LayerNorm"])
  keep = np.concatenate([np.ones((b, n), bool), mask.astype(bool)], 1)
  L = p["layers"]
  h, d = c.num_attention_heads, c.head_dim
  for i in range(c.num_hidden_layers):
    def dense(y, m):
      return y @ f(m["kernel"])[i] + f(m["bias"])[i]
    s = L["attention"]["self"]
    q = dense(x, s["query"]).reshape(b, t, h, d)
    k = np.concatenate([np.broadcast_to(kv[:, i, 0], (b, n, h, d)), dense(x, s["key"]).reshape(b, t, h, d)], 1)
    v = np.concatenate([np.broadcast_to(kv[:, i, 1], (b, n, h, d)), dense(x, s["value"]).reshape(b, t, h, d)], 1)
    sc = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    sc = np.where(keep[:, None, None, :], sc, -1e30)
    pr = np.exp(sc - sc.max(-1, keepdims=True))
    pr = pr / pr.sum(-1, keepdims=True)
    ctx = np.einsum("bhqk,bkhd->bqhd", pr, v).reshape(b, t, h * d)
    a = ln(dense(ctx, L["attention"]["output"]["dense"]) + x,
           {k2: f(v2)[i] for k2, v2 in L["attention"]["output"]["LayerNorm"].items()})
    inter = dense(a, L["intermediate"]["dense"])
    inter = 0.5 * inter * (1 + erf(inter / np.sqrt(2)))
    x = ln(dense(inter, L["output"]["dense"]) + a,
           {k2: f(v2)[i] for k2, v2 in L["output"]["LayerNorm"].items()})
  return x


@pytest.fixture(scope="module")
def setup():
  model = BertForSequenceClassification(CFG)
  ids = np.random.default_rng(0).integers(1, 40, (3, 7)).astype(np.int32)
  mask = np.ones((3, 7), np.int32)
  mask[1, 4:] = 0
  params = model.init(jax.random.key(0), jnp.asarray(ids))["params"]
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), params)
  return model, params, ids, mask


@pytest.mark.parametrize("projection", [None, 12])
def test_bert_prefix_equals_a_numpy_bert_with_the_keys_and_values_concatenated(setup, projection):
  model, params, ids, mask = setup
  tree = jlora.add_prefix(params, jlora.PrefixTuning(N, projection=projection), key=jax.random.key(2),
                          config=CFG)
  kv = np.asarray(jlora.project_prefix(tree["prefix"]), np.float64)
  assert kv.shape == (N, 2, 2, 2, 8)
  base = BertModel(CFG)
  got = np.asarray(jlora.lora(lambda p, i, m: base.apply({"params": p}, i, m)[0])(tree, ids, mask))
  want = _np_bert(params, ids, mask, kv)
  keep = mask.astype(bool)
  plain = np.asarray(base.apply({"params": params}, ids, mask)[0])
  diff = np.abs(got - want)[keep].max()
  print(f"prefix (projection={projection}): max |jlora - numpy| = {diff:.2e}, effect "
        f"{np.abs(plain - want)[keep].max():.2f}")
  assert diff < 2e-4 and np.abs(plain - want)[keep].max() > 0.05
  # the classifier reads the real [CLS] (position 0 of the tokens), and its gradient reaches the prefix
  logits = jlora.lora(lambda p: model.apply({"params": p}, ids, mask))(tree)
  assert logits.shape == (3, 3)
  trainable, frozen = jlora.split(tree)
  g = jax.grad(lambda t: jnp.sum(jlora.lora(lambda p: model.apply({"params": p}, ids, mask))(
      jlora.combine(t, frozen)) ** 2))(trainable)
  assert float(jnp.abs(g["prefix"]["embedding"].w).max()) > 0


def test_bert_prefix_round_trips_through_peft_files(setup, tmp_path):
  model, params, ids, mask = setup
  tree = jlora.add_prefix(params, jlora.PrefixTuning(N, projection=10), key=jax.random.key(3), config=CFG)
  tree["classifier"] = {k: jlora.FullWeight(v) for k, v in tree["classifier"].items()}
  out = jlora.save_peft(tmp_path / "adapter", tree)
  cfg = jlora.read_peft_config(out)
  assert (cfg["peft_type"], cfg["task_type"], cfg["prefix_projection"]) == ("PREFIX_TUNING", "SEQ_CLS", True)
  assert cfg["modules_to_save"] == ["classifier"] and cfg["num_attention_heads"] == 2
  back = jlora.load_peft(out, params)
  assert "projection" not in back["prefix"]  # PEFT's file holds the projected keys and values
  run = jlora.lora(lambda p: model.apply({"params": p}, ids, mask))
  np.testing.assert_allclose(run(back), run(tree), rtol=1e-5, atol=1e-5)


def test_bert_prefix_errors(setup):
  model, params, ids, mask = setup
  tree = jlora.add_prefix(params, jlora.PrefixTuning(N), key=jax.random.key(2), config=CFG)
  with pytest.raises(jlora.ModelError, match="packed rows"):
    jlora.lora(lambda p: model.apply({"params": p}, ids, segment_ids=mask,
                                     pool=np.ones((3, 3, 7), np.float32)))(tree)
  long_ids = np.ones((1, CFG.max_position_embeddings - N + 1), np.int32)
  with pytest.raises(jlora.ModelError, match="prefix positions"):
    jlora.lora(lambda p: model.apply({"params": p}, long_ids))(tree)
  with pytest.raises(jlora.TreeError, match="already hold"):
    jlora.add_prefix(tree, jlora.PrefixTuning(2), key=jax.random.key(0), config=CFG)
