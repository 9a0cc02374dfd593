"""Many adapters on one base: stacking, mixed-adapter batches and weighted merges, against PEFT 0.21."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import jlora
from jlora import _multi
from jlora.generate import generate
from jlora.models.llama import llama_forward

TOL = 2e-4
IDS = np.array([[1, 5, 7, 9, 2, 3, 60, 0, 11, 42], [4, 4, 8, 15, 16, 23, 42, 63, 1, 2]])
TARGETS = ["q_proj", "v_proj"]
PEFT_NAMES = {"a": "sql", "b": "chat", "c": "code", "__base__": "__base__"}  # PEFT warns on "a" ("lora_")
QV = ("layers/self_attn/q_proj/kernel", "layers/self_attn/v_proj/kernel")


def _diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def llama(tiny_llama, tmp_path_factory):
  """The tiny Llama of tests/conftest.py with PEFT adapters "a", "b" (r=4) and "c" (r=2)."""
  base_dir, config, params = tiny_llama
  d = tmp_path_factory.mktemp("multi")
  torch.manual_seed(1)
  base = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
  pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                 init_lora_weights=False), adapter_name="sql")
  pm.add_adapter("chat", peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS,
                                      init_lora_weights=False))
  pm.add_adapter("code", peft.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS,
                                      init_lora_weights=False))
  pm.eval()
  pm.save_pretrained(d / "adapters")
  trees = {n: jlora.load_peft(d / "adapters", params, adapter_name=PEFT_NAMES[n]) for n in "abc"}
  return d, config, params, pm, trees


def _peft_logits(pm, adapter=None, names=None):
  with torch.no_grad():
    if names is not None:
      return pm(torch.tensor(IDS), adapter_names=[PEFT_NAMES[n] for n in names]).logits.numpy()
    pm.set_adapter(PEFT_NAMES.get(adapter, adapter))
    return pm(torch.tensor(IDS)).logits.numpy()


def _logits(tree, config, ids=None):
  return np.asarray(jlora.lora(llama_forward)(tree, jnp.asarray(IDS), config, adapter_ids=ids))


def test_mixed_batch_equals_peft_adapter_names(llama):
  _, config, _, pm, trees = llama
  multi = jlora.stack_adapters([trees["a"], trees["b"], trees["c"]], names=["a", "b", "c"])
  leaf = multi["layers"]["self_attn"]["q_proj"]["kernel"]
  assert leaf.a.shape == (3, 2, 32, 4) and leaf.spec.ranks == (4, 4, 2)
  assert leaf.w is trees["a"]["layers"]["self_attn"]["q_proj"]["kernel"].w  # the base, not a copy
  for names in (["a", "b"], ["b", "c"], ["c", "__base__"]):
    ids = jnp.array([multi_index(multi, n) for n in names])
    got = _logits(multi, config, ids)
    want = _peft_logits(pm, names=names)
    assert _diff(got, want) < TOL, names
    # and each row equals that adapter alone
    for row, n in enumerate(names):
      if n != "__base__":
        assert _diff(got[row], _peft_logits(pm, adapter=n)[row]) < TOL


def multi_index(multi, name):
  return -1 if name == "__base__" else jlora.adapter_names(multi).index(name)


def test_mixed_batch_under_jit_scan_and_remat_and_gradients_reach_only_used_adapters(llama):
  _, config, _, _, trees = llama
  multi = jlora.stack_adapters([trees[n] for n in "abc"], names=list("abc"))
  ids = jnp.array([2, 0])
  f = jax.jit(lambda t, x, i: jlora.lora(llama_forward)(t, x, config, adapter_ids=i, remat=True))
  eager = _logits(multi, config, ids)
  assert _diff(f(multi, jnp.asarray(IDS), ids), eager) < 1e-5
  trainable, frozen = jlora.split(multi)

  def loss(t):
    logits = jlora.lora(llama_forward)(jlora.combine(t, frozen), jnp.asarray(IDS), config,
                                       adapter_ids=ids, remat=True)
    return jnp.mean(logits ** 2)
  g = jax.jit(jax.grad(loss))(trainable)
  for path in QV:
    node = g
    for k in path.split("/"):
      node = node[k]
    norms = [float(jnp.abs(node.a[i]).sum() + jnp.abs(node.b[i]).sum()) for i in range(3)]
    assert norms[1] == 0.0 and norms[0] > 0 and norms[2] > 0, (path, norms)
    # the padded columns of "c" (rank 2 of 4) get no gradient and stay zero
    assert float(jnp.abs(node.a[2][..., 2:]).sum()) == 0.0
  # the per-example gradient equals each adapter's own gradient on its rows
  sel = jlora.select_adapter(multi, "c")
  tc, fc = jlora.split(sel)
  gc = jax.grad(lambda t: jnp.mean(jlora.lora(llama_forward)(jlora.combine(t, fc), jnp.asarray(IDS[:1]),
                                                             config) ** 2) / 2)(tc)
  want = gc["layers"]["self_attn"]["q_proj"]["kernel"].b
  got = g["layers"]["self_attn"]["q_proj"]["kernel"].b[2][:, :2]
  assert _diff(got, want) < 1e-6


def test_training_a_mixed_batch_updates_each_adapter_from_its_rows(llama):
  _, config, params, _, trees = llama
  multi = jlora.stack_adapters([trees["a"], trees["b"]], names=["a", "b"])
  trainable, frozen = jlora.split(multi)
  tx = jlora.optimizer(optax.sgd(0.1))
  state = tx.init(trainable)
  ids = jnp.array([0, 0])  # only "a" is used: "b" must not move

  @jax.jit
  def step(t, s):
    def loss(t):
      logits = jlora.lora(llama_forward)(jlora.combine(t, frozen), jnp.asarray(IDS), config,
                                         adapter_ids=ids)
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 3])
    g = jax.grad(loss)(t)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s
  t2, _ = step(trainable, state)
  q0 = trainable["layers"]["self_attn"]["q_proj"]["kernel"]
  q1 = t2["layers"]["self_attn"]["q_proj"]["kernel"]
  assert bool(jnp.array_equal(q0.a[1], q1.a[1])) and bool(jnp.array_equal(q0.b[1], q1.b[1]))
  assert not bool(jnp.array_equal(q0.b[0], q1.b[0]))


def test_select_add_delete_and_ranks(llama):
  _, config, params, _, trees = llama
  multi = jlora.stack_adapters([trees["a"], trees["c"]], names=["a", "c"])
  back = jlora.select_adapter(multi, "c")
  assert jax.tree.structure(back) == jax.tree.structure(trees["c"])
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trees["c"])):
    assert bool(jnp.array_equal(x, y))
  grown = jlora.add_adapter(multi, trees["b"], "b")
  assert jlora.adapter_names(grown) == ("a", "c", "b")
  got = _logits(grown, config, jnp.array([2, 1]))
  assert _diff(got[0], _logits(trees["b"], config)[0]) < 1e-5
  assert _diff(got[1], _logits(trees["c"], config)[1]) < 1e-5
  smaller = jlora.delete_adapter(grown, "a")
  assert jlora.adapter_names(smaller) == ("c", "b")
  assert _diff(_logits(smaller, config, jnp.array([1, 0]))[0], got[0]) < 1e-5


def _retrained(tree, factor):
  """The same adapter spec with other values (as a retrained adapter would be)."""
  return jax.tree.map(lambda x: x.replace(a=x.a * factor, b=x.b - factor) if isinstance(x, jlora.LoraWeight)
                      else x, tree, is_leaf=jlora.is_adapted)


def test_hot_swap_never_recompiles_a_step_or_generate(llama):
  _, config, _, _, trees = llama
  multi = jlora.stack_adapters([trees["a"], trees["b"]], names=["a", "b"])
  fwd = jax.jit(lambda t, x, i: jlora.lora(llama_forward)(t, x, config, adapter_ids=i))
  ids = jnp.array([0, 1])
  fwd(multi, jnp.asarray(IDS), ids)
  new_b = _retrained(trees["b"], 1.7)
  swapped = jlora.add_adapter(multi, new_b, "b", replace=True)
  out = fwd(swapped, jnp.asarray(IDS), ids)
  assert fwd._cache_size() == 1
  assert _diff(out[1], _logits(new_b, config)[1]) < 1e-5
  assert _diff(out[0], _logits(trees["a"], config)[0]) < 1e-5
  from jlora import generate as gen_mod
  prompts = [[1, 5, 7], [4, 8]]
  gen_mod._generate_jit.clear_cache()
  generate(multi, config, prompts, max_new_tokens=4, adapter_ids=[0, 1])
  n = gen_mod._generate_jit._cache_size()
  generate(swapped, config, prompts, max_new_tokens=4, adapter_ids=[1, 0])
  assert gen_mod._generate_jit._cache_size() == n == 1


def test_generation_with_mixed_adapters_equals_each_adapter_alone(llama):
  _, config, _, pm, trees = llama
  multi = jlora.stack_adapters([trees[n] for n in "abc"], names=list("abc"))
  prompts = [[1, 5, 7, 9], [4, 8, 15], [2, 3]]
  got = generate(multi, config, prompts, max_new_tokens=6, adapter_ids=[2, 0, -1], eos_token_ids=())
  for row, (p, name) in enumerate(zip(prompts, ["c", "a", None])):
    with torch.no_grad():
      if name is None:
        with pm.disable_adapter():
          ref = pm.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
      else:
        pm.set_adapter(PEFT_NAMES[name])
        ref = pm.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert got[row].tolist() == ref[0, len(p):].tolist(), (row, name)


@pytest.mark.parametrize("method,kw", [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"rank": 2}), ("ties", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.4}), ("ties_svd", {"density": 0.6}),
    ("dare_linear", {"density": 0.7}), ("dare_ties", {"density": 0.5}),
])
def test_weighted_merge_equals_peft_add_weighted_adapter(llama, method, kw, monkeypatch):
  _, config, _, pm, trees = llama
  weights = [0.7, -0.4]
  key = jax.random.key(3)
  name = f"m_{method}_{len(kw)}"
  peft_kw = dict(kw)
  if "rank" in peft_kw:
    peft_kw["svd_rank"] = peft_kw.pop("rank")
  if method.startswith("dare"):  # PEFT's masks come from torch's RNG: feed it jlora's masks
    monkeypatch.setattr(torch, "bernoulli", _jlora_masks(trees, key, kw["density"]))
  pm.add_weighted_adapter(["sql", "chat"], weights, name, combination_type=method, **peft_kw)
  monkeypatch.undo()
  want = _peft_logits(pm, adapter=name)
  merged = jlora.weighted_merge([trees["a"], trees["b"]], weights, method=method, key=key, **kw)
  got = _logits(merged, config)
  base = _logits(jlora.select_adapter(jlora.stack_adapters([trees["a"]]), 0), config)
  assert _diff(want, base) > 1e-2  # the merge changes the model, so the comparison means something
  assert _diff(got, want) < TOL, method


def _jlora_masks(trees, key, density):
  """A torch.bernoulli stand-in returning jlora's dare masks in PEFT's call order: per module
  (layer-major, q then v), A of every adapter, then B of every adapter."""
  masks = []
  for layer in range(2):
    for path in QV:
      leaf = trees["a"]
      for k in path.split("/"):
        leaf = leaf[k]
      for side, shape in (("a", leaf.a.shape), ("b", leaf.b.shape)):
        for i in range(2):
          m = np.asarray(_multi.dare_mask(key, path, side, i, shape, density))[layer].T
          masks.append(torch.tensor(m, dtype=torch.float32))
  it = iter(masks)

  def fake(probs, *a, **k):
    m = next(it)
    assert tuple(m.shape) == tuple(probs.shape)
    return m
  return fake


def test_weighted_merge_of_different_ranks_cat_and_svd(llama):
  _, config, _, pm, trees = llama
  for method in ("cat", "svd"):
    name = f"ac_{method}"
    pm.add_weighted_adapter(["sql", "code"], [0.5, 1.5], name, combination_type=method)
    merged = jlora.weighted_merge([trees["a"], trees["c"]], [0.5, 1.5], method=method)
    assert _diff(_logits(merged, config), _peft_logits(pm, adapter=name)) < TOL, method
  # cat is exact: equal to running both adapters' updates, weighted
  merged = jlora.weighted_merge([trees["a"], trees["c"]], [0.5, 1.5], method="cat")
  q = merged["layers"]["self_attn"]["q_proj"]["kernel"]
  qa, qc = (trees[n]["layers"]["self_attn"]["q_proj"]["kernel"] for n in "ac")
  assert q.rank == 6 and _diff(q.delta(), 0.5 * qa.delta() + 1.5 * qc.delta()) < 1e-5


def test_stacked_checkpoint_and_peft_export_hold_every_adapter(llama, tiny_llama, tmp_path):
  d, config, params, pm, trees = llama
  multi = jlora.stack_adapters([trees[n] for n in "abc"], names=["sql", "chat", "code"])
  jlora.save_adapters(tmp_path / "ckpt", multi)
  manifest = jlora.read_adapter_manifest(tmp_path / "ckpt")
  assert manifest["fingerprint"] is not None  # one base fingerprint for the N adapters
  assert {e["kind"] for e in manifest["entries"]} == {"stacked_lora"}
  assert manifest["entries"][0]["spec"]["names"] == ["sql", "chat", "code"]
  back = jlora.load_adapters(tmp_path / "ckpt", params)
  assert jlora.adapter_names(back) == ("sql", "chat", "code")
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(multi)):
    assert bool(jnp.array_equal(x, y))
  out = jlora.save_peft(tmp_path / "peft", multi, mapping="llama")
  assert sorted(p.name for p in out.iterdir()) == ["chat", "code", "sql"]
  base = transformers.LlamaForCausalLM.from_pretrained(tiny_llama[0]).eval()
  loaded = peft.PeftModel.from_pretrained(base, out / "sql", adapter_name="sql")
  loaded.load_adapter(out / "code", adapter_name="code")
  with torch.no_grad():
    got = loaded(torch.tensor(IDS), adapter_names=["code", "sql"]).logits.numpy()
  assert _diff(got, _logits(multi, config, jnp.array([2, 0]))) < TOL
  again = jlora.load_peft(tmp_path / "peft", params, adapter_name=("sql", "chat", "code"))
  assert jlora.adapter_names(again) == ("sql", "chat", "code")
  assert _diff(_logits(again, config, jnp.array([1, 2])), _logits(multi, config, jnp.array([1, 2]))) < 1e-6


def test_bad_input_is_a_clear_error(llama):
  _, config, params, _, trees = llama
  multi = jlora.stack_adapters([trees["a"], trees["b"]], names=["a", "b"])
  fwd = jlora.lora(llama_forward)
  x = jnp.asarray(IDS)
  with pytest.raises(jlora.TreeError, match="out of range"):
    fwd(multi, x, config, adapter_ids=jnp.array([0, 2]))
  with pytest.raises(jlora.TreeError, match="1-D int array"):
    fwd(multi, x, config, adapter_ids=jnp.array([[0, 1]]))
  with pytest.raises(jlora.TreeError, match="1-D int array"):
    fwd(multi, x, config, adapter_ids=jnp.array([0.0, 1.0]))
  with pytest.raises(jlora.RewriteError, match="adapter_ids has 3 entries"):
    fwd(multi, x, config, adapter_ids=jnp.array([0, 1, 1]))
  with pytest.raises(jlora.TreeError, match="pass adapter_ids"):
    fwd(multi, x, config)
  with pytest.raises(jlora.TreeError, match="no stacked adapters"):
    fwd(trees["a"], x, config, adapter_ids=jnp.array([0, 1]))
  checked = jax.jit(lambda t, i: jlora.lora(llama_forward, checked=True)(t, x, config, adapter_ids=i))
  checked(multi, jnp.array([1, -1])).block_until_ready()
  with pytest.raises(Exception, match="out of range"):
    checked(multi, jnp.array([0, 7])).block_until_ready()
  other = jlora.wrap(params, {"layers/self_attn/k_proj/kernel": jlora.LoRA(2, stack_axes=1)},
                     key=jax.random.key(0))
  with pytest.raises(jlora.TreeError, match="different structure|differently"):
    jlora.stack_adapters([trees["a"], other])
  moved = jax.tree.map(lambda v: v, params)
  moved["norm"]["scale"] = params["norm"]["scale"] + 1
  shifted = jlora.load_peft(llama[0] / "adapters", moved, adapter_name="chat")
  with pytest.raises(jlora.TreeError, match="different base"):
    jlora.stack_adapters([trees["a"], shifted])
  with pytest.raises(jlora.TreeError, match="2 trees but 1 names"):
    jlora.stack_adapters([trees["a"], trees["b"]], names=["x"])
  with pytest.raises(jlora.SpecError, match="repeat"):
    jlora.stack_adapters([trees["a"], trees["b"]], names=["x", "x"])
  with pytest.raises(jlora.TreeError, match="2 adapters and 3 weights"):
    jlora.weighted_merge([trees["a"], trees["b"]], [1, 2, 3])
  with pytest.raises(jlora.TreeError, match="equal rank"):
    jlora.weighted_merge([trees["a"], trees["c"]], [1, 1], method="linear")
  with pytest.raises(jlora.SpecError, match="needs density"):
    jlora.weighted_merge([trees["a"], trees["b"]], [1, 1], method="ties")
  with pytest.raises(jlora.SpecError, match="key="):
    jlora.weighted_merge([trees["a"], trees["b"]], [1, 1], method="dare_linear", density=0.5)
  with pytest.raises(jlora.SpecError, match="unknown combination"):
    jlora.weighted_merge([trees["a"], trees["b"]], [1, 1], method="mean")
  with pytest.raises(jlora.TreeError, match="not one weight"):
    jlora.merge(multi)
  with pytest.raises(jlora.TreeError, match="no adapter named"):
    jlora.select_adapter(multi, "zzz")
  with pytest.raises(jlora.TreeError, match="already in the tree"):
    jlora.add_adapter(multi, trees["c"], "a")
  with pytest.raises(Exception, match="adapter_ids has 1 entries for 2 prompts"):
    generate(multi, config, [[1], [2]], max_new_tokens=2, adapter_ids=[0])
  # nothing was mutated
  assert jlora.adapter_names(multi) == ("a", "b")


@pytest.mark.parametrize("preset", ["fsdp", "tp"])
def test_stacked_adapters_shard_with_their_kernels_and_route_the_same(llama, preset):
  """8 fake devices: each adapter's factors follow the base kernel's spec (the adapter axis is
  replicated); a sharded, jitted mixed batch equals the single-device one."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jlora import sharding
  _, config, _, _, trees = llama
  multi = jlora.stack_adapters([trees[n] for n in "abc"], names=list("abc"))
  mesh = sharding.make_mesh((2, 4), preset)
  specs = sharding.tree_specs(multi, preset, mesh=mesh)
  placed = sharding.shard(multi, mesh, specs)
  q = placed["layers"]["self_attn"]["q_proj"]["kernel"]
  qs = specs["layers"]["self_attn"]["q_proj"]["kernel"]
  assert qs.a == P(None, *sharding.adapter_specs(qs.w, q.axes)[0])
  assert q.a.sharding.is_equivalent_to(NamedSharding(mesh, qs.a), 4)
  ids = jnp.array([2, 0])
  fwd = jax.jit(lambda t, x, i: jlora.lora(llama_forward)(t, x, config, adapter_ids=i))
  assert _diff(fwd(placed, jnp.asarray(IDS), ids), _logits(multi, config, ids)) < 1e-5
