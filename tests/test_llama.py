"""The Llama-family decoder and its HF / GGUF I/O against transformers + torch on tiny random models."""

import doctest
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import jlora
from jlora import ConfigError, ModelError, TreeError
from jlora.models.llama import (LlamaConfig, init_llama, init_llama_cache, llama_forward,
                                llama_forward_cached, stack_layers, unstack_layers)
from jlora.models.llama_io import (llama_config_from_hf, llama_config_to_hf, load_llama,
                                   save_llama, save_llama_gguf)

VOCAB = 61

# name -> (HF config class, HF model class, extra config kwargs)
VARIANTS = {
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM",
                   dict(attention_bias=True, mlp_bias=True, rope_theta=500.0)),
    "llama3-tied": ("LlamaConfig", "LlamaForCausalLM",
                    dict(tie_word_embeddings=True, max_position_embeddings=64, rope_theta=5e5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM",
                     dict(rope_scaling={"rope_type": "linear", "factor": 3.0})),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=3)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
}


def _hf_model(variant, seed=0):
  cfg_cls, model_cls, extra = VARIANTS[variant]
  torch.manual_seed(seed)
  cfg = getattr(transformers, cfg_cls)(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
      pad_token_id=0, **extra)
  model = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():  # larger weights than the default init, so errors show in the logits
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  out = {}
  for name in VARIANTS:
    model = _hf_model(name)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    out[name] = (model, folder)
  return out


@pytest.fixture(scope="module")
def fwd():
  return jax.jit(llama_forward, static_argnames=("config", "remat"))


def _ids(shape, seed=0):
  return np.random.RandomState(seed).randint(3, VOCAB, shape)


def _torch_logits(model, ids, mask=None, positions=None):
  kw = {}
  if mask is not None:
    kw["attention_mask"] = torch.tensor(mask)
  if positions is not None:
    kw["position_ids"] = torch.tensor(positions)
  with torch.no_grad():
    return model(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(hf_dirs, fwd, variant):
  model, folder = hf_dirs[variant]
  config, params = load_llama(folder)
  ids = _ids((2, 11))
  ours = np.asarray(fwd(params, ids, config=config))
  ref = _torch_logits(model, ids)
  np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


def test_left_padding_matches_transformers(hf_dirs, fwd):
  model, folder = hf_dirs["llama-bias"]
  config, params = load_llama(folder)
  ids = _ids((3, 9), seed=1)
  mask = np.ones_like(ids)
  mask[0, :4] = 0
  mask[1, :1] = 0
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  ours = np.asarray(fwd(params, ids, config=config, attention_mask=mask))
  ref = _torch_logits(model, ids, mask, positions)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=2e-5, rtol=1e-4)
  # and a left-padded row predicts what the same tokens alone predict
  alone = np.asarray(fwd(params, ids[:1, 4:], config=config))
  np.testing.assert_allclose(ours[0, 4:], alone[0], atol=2e-5, rtol=1e-4)


def test_sliding_window_is_applied(hf_dirs, fwd):
  _, folder = hf_dirs["mistral-window"]
  config, params = load_llama(folder)
  assert config.sliding_window == 3
  ids = _ids((1, 11))
  windowed = np.asarray(fwd(params, ids, config=config))
  full = np.asarray(fwd(params, ids, config=config.replace(sliding_window=None)))
  np.testing.assert_allclose(windowed[:, :3], full[:, :3], atol=1e-6)
  assert np.abs(windowed[:, 4:] - full[:, 4:]).max() > 1e-3


def test_cached_decoding_equals_full_forward(hf_dirs, fwd):
  for variant in ("llama-bias", "mistral-window"):
    _, folder = hf_dirs[variant]
    config, params = load_llama(folder)
    ids = _ids((2, 10), seed=2)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    full = np.asarray(fwd(params, ids, config=config, attention_mask=mask))
    step = jax.jit(llama_forward_cached, static_argnames="config")
    cache = init_llama_cache(config, 2, 16)
    logits, cache = step(params, ids[:, :6], cache, config=config, attention_mask=mask[:, :6])
    got = [np.asarray(logits)]
    for t in range(6, 10):
      logits, cache = step(params, ids[:, t:t + 1], cache, config=config)
      got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], full[real], atol=2e-5, rtol=1e-4)
    assert int(cache["index"]) == 10
    np.testing.assert_array_equal(np.asarray(cache["pos"]), mask.sum(1))


def test_save_roundtrip_loads_in_transformers(hf_dirs, fwd, tmp_path):
  for variant in ("llama-bias", "llama3-tied", "qwen2"):
    model, folder = hf_dirs[variant]
    config, params = load_llama(folder)
    out = save_llama(tmp_path / variant, params, config)
    reloaded = type(model).from_pretrained(out).eval()
    ids = _ids((2, 7))
    np.testing.assert_allclose(_torch_logits(reloaded, ids), _torch_logits(model, ids), atol=1e-6)
    config2, params2 = load_llama(out)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_save_sharded_and_bfloat16(hf_dirs, tmp_path):
  model, folder = hf_dirs["llama-bias"]
  config, params = load_llama(folder)
  out = save_llama(tmp_path / "sharded", params, config, max_shard_bytes=20_000,
                   dtype=jnp.bfloat16)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (out / "model.safetensors").exists()
  config2, params2 = load_llama(out)
  assert params2["layers"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  reloaded = type(model).from_pretrained(out, dtype=torch.float32).eval()
  ids = _ids((1, 6))
  ours = np.asarray(llama_forward(jax.tree.map(lambda a: a.astype(jnp.float32), params2), ids,
                                  config2))
  np.testing.assert_allclose(ours, _torch_logits(reloaded, ids), atol=2e-4, rtol=1e-3)
  # bfloat16 rounding really happened (the test would not notice a float32 save otherwise)
  assert np.abs(ours - _torch_logits(model, ids)).max() > 1e-5
  # a float32 checkpoint loaded as bfloat16 runs in bfloat16 and stays close
  _, p16 = load_llama(folder, dtype=jnp.bfloat16)
  assert {a.dtype for a in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_allclose(np.asarray(llama_forward(p16, ids, config)),
                             _torch_logits(model, ids), atol=0.1)


def test_save_refuses_existing_and_keeps_it(hf_dirs, tmp_path):
  _, folder = hf_dirs["llama-bias"]
  config, params = load_llama(folder)
  target = tmp_path / "exists"
  target.mkdir()
  (target / "keep.txt").write_text("x")
  with pytest.raises(ModelError, match="already exists"):
    save_llama(target, params, config)
  bad = dict(params)
  bad["norm"] = {"scale": jnp.ones(7)}
  with pytest.raises(ModelError, match="norm/scale"):
    save_llama(target, bad, config, overwrite=True)
  assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
  save_llama(target, params, config, overwrite=True)
  assert (target / "config.json").exists() and not (target / "keep.txt").exists()


def test_load_errors_name_the_problem(hf_dirs, tmp_path):
  from safetensors.numpy import load_file, save_file

  _, folder = hf_dirs["llama-bias"]
  with pytest.raises(ModelError, match="does not exist"):
    load_llama(tmp_path / "nope")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ModelError, match="no config.json"):
    load_llama(empty)
  (empty / "config.json").write_text((folder / "config.json").read_text())
  (empty / "pytorch_model.bin").write_bytes(b"\x80")
  with pytest.raises(ModelError, match="pickle"):
    load_llama(empty)
  tensors = load_file(str(folder / "model.safetensors"))
  missing = dict(tensors)
  del missing["model.layers.1.mlp.up_proj.weight"]
  save_file(missing, str(empty / "model.safetensors"))
  with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    load_llama(empty)
  wrong = dict(tensors)
  wrong["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
  save_file(wrong, str(empty / "model.safetensors"))
  with pytest.raises(ModelError, match=r"k_proj.*\(8, 32\)"):
    load_llama(empty)
  hf = json.loads((folder / "config.json").read_text())
  hf["attention_bias"] = False
  (empty / "config.json").write_text(json.dumps(hf))
  save_file(tensors, str(empty / "model.safetensors"))
  with pytest.raises(ModelError, match="attention_bias"):
    load_llama(empty)
  with pytest.raises(ModelError, match="gemma"):
    llama_config_from_hf({**hf, "model_type": "gemma"})
  with pytest.raises(ModelError, match="yarn"):
    llama_config_from_hf({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_config_validation_and_hf_roundtrip():
  with pytest.raises(ConfigError, match="num_kv_heads"):
    LlamaConfig(VOCAB, 32, 48, 2, 4, 3)
  with pytest.raises(ConfigError, match="num_layers"):
    LlamaConfig(VOCAB, 32, 48, 0, 4, 2)
  with pytest.raises(ConfigError, match="rope_type"):
    LlamaConfig(VOCAB, 32, 48, 2, 4, 2, rope_type="yarn")
  with pytest.raises(ConfigError, match="eos"):
    LlamaConfig(VOCAB, 32, 48, 2, 4, 2, eos_token_ids=(VOCAB,))
  cfg = LlamaConfig(VOCAB, 32, 48, 2, 4, 2, rope_type="llama3", rope_factor=8.0,
                    eos_token_ids=(2, 5), model_type="llama")
  assert llama_config_from_hf(llama_config_to_hf(cfg)) == cfg
  hf = transformers.LlamaConfig(**llama_config_to_hf(cfg))
  assert hf.rope_parameters["rope_type"] == "llama3" and hf.num_key_value_heads == 2


def test_bad_tokens_and_masks(fwd):
  cfg = LlamaConfig(VOCAB, 32, 48, 1, 4, 2)
  params = init_llama(cfg, jax.random.key(0))
  with pytest.raises(TreeError, match="token ids"):
    llama_forward(params, np.array([[1, VOCAB]]), cfg)
  with pytest.raises(TreeError, match="batch, length"):
    llama_forward(params, np.array([1, 2]), cfg)
  with pytest.raises(TreeError, match="attention_mask"):
    llama_forward(params, np.array([[1, 2]]), cfg, attention_mask=np.ones((1, 3)))
  with pytest.raises(TreeError, match="Llama params"):
    llama_forward({"dense": {}}, np.array([[1, 2]]), cfg)


def test_gguf_roundtrip_read_by_transformers(hf_dirs, fwd, tmp_path):
  for variant in ("llama-bias", "qwen2"):
    model, folder = hf_dirs[variant]
    config, params = load_llama(folder)
    f = save_llama_gguf(tmp_path / f"{variant}.gguf", params, config, dtype="f32")
    config2, params2 = load_llama(f)
    assert config2.replace(rms_norm_eps=config.rms_norm_eps) == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    if variant == "llama-bias":  # transformers' GGUF reader drops llama biases: compare without
      config = config.replace(attention_bias=False, attention_out_bias=False, mlp_bias=False)
      params = jax.tree.map(lambda x: x, params)
      for group in ("self_attn", "mlp"):
        for module in params["layers"][group].values():
          del module["bias"]
      f = save_llama_gguf(tmp_path / f"{variant}.gguf", params, config, dtype="f32",
                          overwrite=True)
    # transformers' own GGUF reader (it un-permutes q/k itself) sees the same model
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f.name)
    ids = _ids((2, 8))
    ours = np.asarray(fwd(params, ids, config=config))
    np.testing.assert_allclose(ours, _torch_logits(ref_model.eval(), ids), atol=2e-5, rtol=1e-4)
    f16 = save_llama_gguf(tmp_path / f"{variant}-16.gguf", params, config)
    _, params16 = load_llama(f16)
    err = np.abs(np.asarray(fwd(params16, ids, config=config)) - ours).max()
    assert 0 < err < 2e-2


def test_gguf_llama3_rope_freqs(hf_dirs, fwd, tmp_path):
  """llama3 RoPE scaling travels as llama.cpp's rope_freqs tensor and comes back."""
  # non-standard llama3 settings (original context 16) come back as free-form factors
  model, folder = hf_dirs["llama3-tied"]
  config, params = load_llama(folder)
  f = save_llama_gguf(tmp_path / "l3.gguf", params, config, dtype="f32")
  config2, params2 = load_llama(f)
  assert config2.rope_type == "default" and config2.rope_freq_factors is not None
  ids = _ids((2, 12))
  ref = _torch_logits(model, ids)
  np.testing.assert_allclose(np.asarray(fwd(params2, ids, config=config2)), ref, atol=2e-5,
                             rtol=1e-4)
  plain = np.asarray(fwd(params2, ids, config=config2.replace(rope_freq_factors=None)))
  assert np.abs(plain - ref).max() > 1e-3  # the factors matter at these positions
  with pytest.raises(ConfigError, match="rope_freq_factors"):
    save_llama(tmp_path / "hf", params2, config2)
  # Llama 3.1's own settings are recognised as llama3 scaling
  standard = config.replace(rope_original_max_positions=8192, max_position_embeddings=131072)
  f = save_llama_gguf(tmp_path / "l31.gguf", params, standard, dtype="f32")
  config3, _ = load_llama(f)
  assert config3.replace(rms_norm_eps=standard.rms_norm_eps) == standard


def test_gguf_errors(tmp_path, hf_dirs):
  _, folder = hf_dirs["llama-bias"]
  config, params = load_llama(folder)
  bogus = tmp_path / "x.gguf"
  bogus.write_bytes(b"not a gguf at all")
  with pytest.raises(ModelError, match="not a readable GGUF"):
    load_llama(bogus)
  with pytest.raises(ModelError, match="not a .gguf"):
    load_llama(folder / "config.json")
  with pytest.raises(ConfigError, match="f16"):
    save_llama_gguf(tmp_path / "y.gguf", params, config, dtype="q4_0")
  with pytest.raises(ModelError, match="not a readable GGUF"):
    save_llama_gguf(tmp_path / "y.gguf", params, config, tokenizer_from=bogus)
  assert not (tmp_path / "y.gguf").exists()


def test_lora_finetune_merge_save_reload(hf_dirs, tmp_path):
  """LoRA on stacked q/v kernels trains, and the merged model reloads in transformers."""
  model, folder = hf_dirs["llama-bias"]
  config, params = load_llama(folder)
  rules = {"layers/self_attn/{q_proj,v_proj}/kernel": jlora.LoRA(4, stack_axes=1)}
  tree = jlora.wrap(params, rules, key=jax.random.key(0))
  trainable, frozen = jlora.split(tree)
  tx = jlora.optimizer(optax.adam(5e-2))
  opt_state = tx.init(trainable)
  forward = jlora.lora(llama_forward)
  ids = jnp.asarray(_ids((4, 12), seed=3))

  @jax.jit
  def step(trainable, opt_state):
    def loss_fn(t):
      logits = forward(jlora.combine(t, frozen), ids[:, :-1], config, remat=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  losses = []
  for _ in range(15):
    trainable, opt_state, loss = step(trainable, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.2, losses
  merged = jlora.merge(jlora.combine(trainable, frozen))
  base = np.asarray(llama_forward(params, ids, config))
  out = save_llama(tmp_path / "tuned", merged, config)
  reloaded = type(model).from_pretrained(out).eval()
  ours = np.asarray(llama_forward(merged, ids, config))
  np.testing.assert_allclose(ours, _torch_logits(reloaded, np.asarray(ids)), atol=3e-5, rtol=1e-4)
  assert np.abs(ours - base).max() > 0.1  # the saved model is the tuned one, not the base
  # unmerged adapters cannot be saved by mistake
  with pytest.raises(ModelError, match="merge"):
    save_llama(tmp_path / "bad", jlora.combine(trainable, frozen), config)


def test_remat_gradients_equal():
  cfg = LlamaConfig(VOCAB, 32, 48, 2, 4, 2)
  params = init_llama(cfg, jax.random.key(1))
  ids = jnp.asarray(_ids((2, 6)))

  def loss(p, remat):
    return llama_forward(p, ids, cfg, remat=remat).mean()

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g1 = grad(params, False)
  g2 = grad(params, True)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(g1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_rope_tables_built_on_the_host_agree_with_the_computed_ones():
  # default positions and mask-derived positions use host-built constant tables; explicit
  # positions compute cos/sin in the program: all three must give the same logits
  cfg = LlamaConfig(VOCAB, 32, 48, 2, 4, 2, rope_theta=500.0, rope_type="llama3",
                    rope_factor=8.0, rope_original_max_positions=4, sliding_window=5)
  params = init_llama(cfg, jax.random.key(3))
  ids = jnp.asarray(_ids((2, 12), seed=4))
  run = jax.jit(llama_forward, static_argnames="config")
  default = np.asarray(run(params, ids, config=cfg))
  explicit = np.asarray(run(params, ids, config=cfg, positions=jnp.tile(jnp.arange(12), (2, 1))))
  np.testing.assert_allclose(default, explicit, atol=1e-5, rtol=1e-5)
  mask = np.ones((2, 12), np.int32)
  mask[1, :5] = 0
  masked = np.asarray(run(params, ids, config=cfg, attention_mask=mask))
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  masked_explicit = np.asarray(run(params, ids, config=cfg, attention_mask=mask, positions=pos))
  np.testing.assert_allclose(masked, masked_explicit, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(masked[0], default[0], atol=1e-5, rtol=1e-5)
  # the point of the host tables: the compiled training step holds no cos/sin of its own
  def hlo(**kw):
    loss = lambda p: llama_forward(p, ids, cfg, **kw).mean()
    return jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  assert " cosine(" not in hlo() and " sine(" not in hlo(attention_mask=mask)
  assert " cosine(" in hlo(positions=jnp.asarray(pos))  # the check can see them


def test_unstacked_layout_matches_transformers_and_the_stacked_lora_gradients(hf_dirs, fwd, tmp_path):
  model, folder = hf_dirs["llama-bias"]
  config, params = load_llama(folder)
  flat = unstack_layers(params)
  assert isinstance(flat["layers"], list) and len(flat["layers"]) == config.num_layers
  assert flat["layers"][1]["self_attn"]["q_proj"]["kernel"].shape == (32, 32)
  jax.tree.map(np.testing.assert_array_equal, stack_layers(flat), params)  # exact inverse
  save_llama(tmp_path / "flat", flat, config)  # the saver takes the per-layer layout too
  jax.tree.map(np.testing.assert_array_equal, load_llama(tmp_path / "flat")[1], params)
  ids = _ids((2, 9), seed=3)
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  real = mask.astype(bool)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  ref = _torch_logits(model, ids, mask, positions)
  got = np.asarray(fwd(flat, ids, config=config, attention_mask=mask))
  np.testing.assert_allclose(got[real], ref[real], atol=2e-5, rtol=1e-4)
  # cached decoding in the unstacked layout gives the same logits
  step = jax.jit(llama_forward_cached, static_argnames="config")
  cache = init_llama_cache(config, 2, 12)
  first, cache = step(flat, ids[:, :7], cache, config=config, attention_mask=mask[:, :7])
  last, cache = step(flat, ids[:, 7:], cache, config=config)
  cached = np.concatenate([np.asarray(first), np.asarray(last)], axis=1)
  np.testing.assert_allclose(cached[real], got[real], atol=2e-5, rtol=1e-4)
  # LoRA through jlora.lora: per-layer rules on the unstacked tree give the gradients of a
  # stacked tree whose adapters hold the same per-layer factors
  stacked = jlora.wrap(params, {"layers/self_attn/{q,v}_proj/kernel": jlora.LoRA(2, stack_axes=1)},
                       key=jax.random.key(0))
  for n, name in enumerate(("q_proj", "v_proj")):  # nonzero B, so A gets a gradient too
    leaf = stacked["layers"]["self_attn"][name]["kernel"]
    b = 0.1 * jax.random.normal(jax.random.key(n), leaf.b.shape)
    stacked["layers"]["self_attn"][name]["kernel"] = leaf.replace(b=b)
  per_layer = jlora.wrap(flat, {"layers/*/self_attn/{q,v}_proj/kernel": jlora.LoRA(2)},
                         key=jax.random.key(0))

  def copy_factors(i, leaf, name):
    src = stacked["layers"]["self_attn"][name]["kernel"]
    return leaf.replace(a=src.a[i], b=src.b[i])

  for i, layer in enumerate(per_layer["layers"]):
    for name in ("q_proj", "v_proj"):
      layer["self_attn"][name]["kernel"] = copy_factors(i, layer["self_attn"][name]["kernel"], name)
  forward = jlora.lora(llama_forward)

  def loss(tree):
    t, f = jlora.split(tree)
    return jax.grad(lambda t: forward(jlora.combine(t, f), jnp.asarray(ids), config).std())(t)

  g_stacked, g_flat = loss(stacked), loss(per_layer)
  for i in range(config.num_layers):
    for name in ("q_proj", "v_proj"):
      a = g_stacked["layers"]["self_attn"][name]["kernel"]
      b = g_flat["layers"][i]["self_attn"][name]["kernel"]
      assert np.abs(np.asarray(a.b[i])).max() > 0 and np.abs(np.asarray(a.a[i])).max() > 0
      np.testing.assert_allclose(np.asarray(b.a), np.asarray(a.a[i]), rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(np.asarray(b.b), np.asarray(a.b[i]), rtol=1e-5, atol=1e-7)
  with pytest.raises(TreeError, match="num_layers"):
    llama_forward({**flat, "layers": flat["layers"][:1]}, ids, config)


@pytest.mark.parametrize("name", ["jlora.models.llama", "jlora.models.llama_io", "jlora.generate"])
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0
  assert result.attempted > 0
  for public in module.__all__:
    obj = getattr(module, public)
    if callable(obj):
      assert "Example" in (obj.__doc__ or ""), public
