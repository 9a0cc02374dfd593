"""LoRA+ (``jlora.optimizer(tx, loraplus_ratio=...)``) against torch's optimizers and PEFT 0.21's
``create_loraplus_optimizer`` (torch CPU): scaling ``b``'s update after ``tx`` is training ``b`` at
``lr * ratio``.

The comparisons with torch run in float64 (``jax.enable_x64``): in float32, optax's bias correction
``1 - b2**t`` is computed in float32 (relative error ~1e-5 at t=1) and torch's in Python floats, a
difference of ~3e-6 after 5 steps at lr 0.16 that has nothing to do with LoRA+.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from test_peft_interop import _Net, _jax_net

import jlora
from jlora import _peft

RATIO, LR, WD, STEPS = 16.0, 1e-2, 0.1, 5


def _tree(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), dtype),
                      "bias": jnp.asarray(rng.normal(size=(6,)), dtype)},
            "emb": {"embedding": jnp.asarray(rng.normal(size=(10, 4)), dtype)}}
  tree = jlora.wrap(params, {"dense/kernel": jlora.LoRA(2), "dense/bias": jlora.Full(),
                             "emb/embedding": jlora.LoRA(2, init="pissa")}, key=jax.random.key(0))
  trainable, frozen = jlora.split(tree)
  trainable = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), x.dtype), trainable)
  return jlora.combine(trainable, frozen)


def _grads(tree, step):
  """Fixed pseudo-random gradients (large enough that clipping acts)."""
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda x: jnp.asarray(3 * rng.normal(size=x.shape), x.dtype), jlora.split(tree)[0])


def _is_b(path):
  return path.endswith("/b")


TORCH = {
    "adamw": (lambda: optax.adamw(LR, weight_decay=WD),
              lambda groups: torch.optim.AdamW(groups, lr=LR, weight_decay=WD), None),
    "adamw_clipped": (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=WD)),
                      lambda groups: torch.optim.AdamW(groups, lr=LR, weight_decay=WD), 1.0),
    "sgd_momentum": (lambda: optax.sgd(LR, momentum=0.9),
                     lambda groups: torch.optim.SGD(groups, lr=LR, momentum=0.9), None),
}


@pytest.mark.parametrize("name", sorted(TORCH))
def test_loraplus_equals_torch_with_two_param_groups(name):
  """b at lr * ratio, every other trainable array (a, a Full bias, an embedding's a) at lr."""
  with jax.enable_x64(True):
    _against_torch(name, *TORCH[name])


def _against_torch(name, make_tx, make_torch, clip):
  tree = _tree(jnp.float64)
  trainable, frozen = jlora.split(tree)
  tx = jlora.optimizer(make_tx(), tree, loraplus_ratio=RATIO)
  state = tx.init(trainable)
  flat = [(jax.tree_util.keystr(k, simple=True, separator="/"), v)
          for k, v in jax.tree_util.tree_leaves_with_path(trainable)]
  tparams = {p: torch.tensor(np.asarray(v), requires_grad=True) for p, v in flat}
  assert sorted(p for p in tparams if _is_b(p)) == ["dense/kernel/b", "emb/embedding/b"]
  opt = make_torch([{"params": [t for p, t in tparams.items() if not _is_b(p)], "lr": LR},
                    {"params": [t for p, t in tparams.items() if _is_b(p)], "lr": LR * RATIO}])
  update = jax.jit(tx.update)
  for step in range(STEPS):
    grads = _grads(tree, step)
    updates, state = update(grads, state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    for (p, g) in [(jax.tree_util.keystr(k, simple=True, separator="/"), v)
                   for k, v in jax.tree_util.tree_leaves_with_path(grads)]:
      tparams[p].grad = torch.tensor(np.asarray(g))
    if clip is not None:
      # one global norm over both groups, as optax's inside tx (torch divides by norm + 1e-6: ~1e-9)
      torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip)
    opt.step()
  worst = max(float(np.abs(np.asarray(v) - tparams[p].detach().numpy()).max())
              for p, v in [(jax.tree_util.keystr(k, simple=True, separator="/"), v)
                           for k, v in jax.tree_util.tree_leaves_with_path(trainable)])
  b0 = jlora.split(tree)[0]["dense"]["kernel"].b
  moved = float(np.abs(np.asarray(trainable["dense"]["kernel"].b - b0)).max())
  print(f"\n{name}: max |jlora - torch two groups| after {STEPS} steps = {worst:.1e} (b moved {moved:.2f})")
  assert trainable["dense"]["kernel"].b.dtype == jnp.float64
  assert worst <= (1e-8 if clip else 1e-12) and moved > 0.1


def test_loraplus_matches_peft_create_loraplus_optimizer(tmp_path):
  """PEFT's LoRA+ AdamW on a small torch model and jlora's on the same model, each with its own grads."""
  with jax.enable_x64(True):
    _against_peft(tmp_path)


def _against_peft(tmp_path):
  torch.manual_seed(5)
  net = _Net().double()
  sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  params = {"enc": {"fc1": {"kernel": jnp.asarray(sd["encoder.fc1.weight"].T),
                            "bias": jnp.asarray(sd["encoder.fc1.bias"])}},
            "out": {"kernel": jnp.asarray(sd["head.weight"].T), "bias": jnp.asarray(sd["head.bias"])}}
  pm = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "head"],
                                                init_lora_weights=False))
  pm.save_pretrained(tmp_path / "a")
  tree = jlora.load_peft(tmp_path / "a", params, mapping=_peft.PeftMapping({"enc/fc1": "encoder.fc1",
                                                                          "out": "head"}))
  opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                  loraplus_weight_decay=WD)
  assert sorted(g["lr"] for g in opt.param_groups if g["params"]) == [LR, LR * RATIO]
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(7, 6)), rng.normal(size=(7, 3))
  trainable, frozen = jlora.split(tree)
  tx = jlora.optimizer(optax.adamw(LR, weight_decay=WD), loraplus_ratio=RATIO)
  state = tx.init(trainable)
  loss = lambda t: jnp.mean((jlora.lora(_jax_net)(jlora.combine(t, frozen), x) - y) ** 2)  # noqa: E731
  step = jax.jit(lambda t, s: tx.update(jax.grad(loss)(t), s, t))
  for _ in range(STEPS):
    opt.zero_grad()
    torch.mean((pm(torch.tensor(x)) - torch.tensor(y)) ** 2).backward()
    opt.step()
    updates, state = step(trainable, state)
    trainable = optax.apply_updates(trainable, updates)
  leaves = dict(jlora.adapted_leaves(jlora.combine(trainable, frozen)))
  worst = 0.0
  for path, mod in (("enc/fc1/kernel", pm.base_model.model.encoder["fc1"]),
                    ("out/kernel", pm.base_model.model.head)):
    for ours, theirs in ((leaves[path].a, mod.lora_A), (leaves[path].b, mod.lora_B)):
      worst = max(worst, float(np.abs(np.asarray(ours).T - theirs["default"].weight.detach().numpy()).max()))
  plain = jlora.optimizer(optax.adamw(LR, weight_decay=WD))  # without LoRA+, b would differ
  t2, s2 = jlora.split(tree)[0], plain.init(jlora.split(tree)[0])
  for _ in range(STEPS):
    u, s2 = plain.update(jax.grad(loss)(t2), s2, t2)
    t2 = optax.apply_updates(t2, u)
  gap = float(np.abs(np.asarray(t2["out"]["kernel"].b) - np.asarray(trainable["out"]["kernel"].b)).max())
  print(f"\nPEFT create_loraplus_optimizer vs jlora: max |factor difference| {worst:.1e} "
        f"(without LoRA+ b would differ by {gap:.2f})")
  assert worst <= 1e-12 and gap > 1e-2


def test_no_ratio_is_todays_optimizer_and_state_is_trainable_only():
  tree = _tree()
  trainable, _ = jlora.split(tree)
  reference = optax.partition({"trainable": optax.adam(LR), "frozen": optax.set_to_zero()},
                              lambda t: jax.tree.map(lambda m: "trainable" if m else "frozen",
                                                     jlora.trainable_mask(t)))
  for t in (tree, trainable):
    for tx in (jlora.optimizer(optax.adam(LR)), jlora.optimizer(optax.adam(LR), loraplus_ratio=None)):
      s, s_ref = tx.init(t), reference.init(t)
      assert jax.tree.structure(s) == jax.tree.structure(s_ref)
      u, _ = tx.update(_grads(tree, 0) if t is trainable else jax.tree.map(jnp.ones_like, t), s, t)
      u_ref, _ = reference.update(_grads(tree, 0) if t is trainable else jax.tree.map(jnp.ones_like, t),
                                  s_ref, t)
      for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
        np.testing.assert_array_equal(a, b)
  plus = jlora.optimizer(optax.adam(LR), loraplus_ratio=RATIO)
  shapes = lambda s: sorted(x.shape for x in jax.tree.leaves(s) if x.ndim)  # noqa: E731
  assert shapes(plus.init(tree)) == shapes(jlora.optimizer(optax.adam(LR)).init(tree))  # no more state
  u, _ = plus.update(jax.tree.map(jnp.ones_like, tree), plus.init(tree), tree)
  emb = u["emb"]["embedding"]  # a PiSSA leaf: b scaled, frozen a0 / b0 / w zero
  assert not np.any(emb.w) and not np.any(emb.a0) and not np.any(emb.b0)
  one = jlora.optimizer(optax.adam(LR), loraplus_ratio=1)
  u1, _ = one.update(jax.tree.map(jnp.ones_like, tree), one.init(tree), tree)
  u0, _ = jlora.optimizer(optax.adam(LR)).update(jax.tree.map(jnp.ones_like, tree),
                                                 jlora.optimizer(optax.adam(LR)).init(tree), tree)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u0)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("ratio", [0, -2.0, float("inf"), float("nan"), True, "16"])
def test_bad_ratio_is_a_spec_error(ratio):
  with pytest.raises(jlora.SpecError, match="loraplus_ratio must be a positive finite number"):
    jlora.optimizer(optax.adam(LR), loraplus_ratio=ratio)
