"""The jlora command line: help, config errors, and train -> eval -> generate -> merge on a tiny model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jlora.cli import main
from jlora.config import describe_fields

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_tiny_bert, tiny_cls_overrides  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  return {"root": root, "bert": make_tiny_bert(root)}


def test_train_help_explains_every_config_key(capsys):
  with pytest.raises(SystemExit) as e:
    main(["train", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for key, _, doc in describe_fields():
    assert f"  {key} = " in out, key
  assert "--print-config" in out and "Ctrl-C" in out


@pytest.mark.parametrize("cmd", ["eval", "generate", "merge", "fetch"])
def test_every_command_has_help(cmd, capsys):
  with pytest.raises(SystemExit) as e:
    main([cmd, "--help"])
  assert e.value.code == 0
  assert "usage: jlora " + cmd in capsys.readouterr().out


def test_print_config_applies_yaml_and_overrides(tmp_path, capsys):
  f = tmp_path / "c.yaml"
  f.write_text("method:\n  rank: 4\n")
  assert main(["train", "--print-config", str(f), "train.lr=3e-4", "--set", "method.alpha=8"]) == 0
  import yaml
  cfg = yaml.safe_load(capsys.readouterr().out)
  assert (cfg["method"]["rank"], cfg["method"]["alpha"], cfg["train"]["lr"]) == (4, 8.0, 3e-4)


@pytest.mark.parametrize("argv,pattern", [
    (["train", "trian.lr=1"], "unknown config key 'trian.lr'. Did you mean 'train.lr'"),
    (["train", "missing.yaml"], "does not exist"),
    (["train", "method.name=lorra"], "did you mean 'lora'"),
    (["fetch", "minilm"], "unknown resource 'minilm'"),
    (["eval", "runs/none", "method.rank=2"], "only data"),
    (["generate", "-p", "hi"], "needs a run directory"),
])
def test_errors_exit_2_with_the_fix(argv, pattern, capsys):
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert pattern in err and "Traceback" not in err


def test_fetch_packaged_data_offline_from_cache(capsys):
  assert main(["fetch", "sentiment"]) == 0
  assert "vadersentiment-3.3.2" in capsys.readouterr().out


def test_train_eval_generate_merge(tiny, capsys):
  run = tiny["root"] / "run"
  over = tiny_cls_overrides(tiny["root"], tiny["bert"], "run", **{
      "train.max_steps": 60, "train.lr": 5e-2, "method.rank": 4})
  assert main(["train", *over]) == 0
  out = capsys.readouterr().out
  assert "trainable params:" in out and "test accuracy:" in out
  assert f"adapter saved to {run / 'adapter'}" in out
  results = json.loads((run / "results.json").read_text())

  assert main(["eval", str(run), "--json"]) == 0
  metrics = json.loads(capsys.readouterr().out)
  assert metrics["accuracy"] == pytest.approx(results["metrics"]["test"]["accuracy"])
  assert main(["eval", str(run), "--split", "validation", "--base"]) == 0
  assert "base model on validation" in capsys.readouterr().out

  assert main(["generate", str(run), "-p", "a great fun movie", "-p", "an awful dull plot"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  p_pos = [float(re.search(r"probs \[([-0-9.e]+), ([-0-9.e]+)\]", x).group(2)) for x in lines]
  assert len(p_pos) == 2 and p_pos[0] > p_pos[1]  # the trained head ranks the positive text higher

  merged = tiny["root"] / "merged"
  assert main(["merge", str(run), str(merged)]) == 0
  assert main(["merge", str(run), str(merged)]) == 2  # exists, no --overwrite
  capsys.readouterr()
  # Independent reference: transformers (torch) runs the merged encoder; mean pooling and
  # the exported head give the probabilities jlora predicted.
  import torch
  from safetensors.numpy import load_file
  from transformers import AutoTokenizer, BertModel
  from jlora.train import load_run, predict
  texts = ["a great fun movie", "an awful dull plot", "the film was quite boring"]
  tok = AutoTokenizer.from_pretrained(merged)
  enc = tok(texts, return_tensors="pt", padding=True)
  with torch.no_grad():
    h = BertModel.from_pretrained(merged).eval()(**enc).last_hidden_state.numpy()
  m = enc["attention_mask"].numpy()[..., None]
  pooled = (h * m).sum(1) / m.sum(1)
  head = load_file(str(merged / "classifier.safetensors"))
  logits = pooled @ head["kernel"] + head["bias"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ours = np.array([p["probs"] for p in predict(load_run(run), texts)])
  np.testing.assert_allclose(probs, ours, atol=1e-4)


@pytest.mark.slow
def test_ctrl_c_in_a_real_process_saves_and_exits_130(tiny):
  over = tiny_cls_overrides(tiny["root"], tiny["bert"], "sigint", **{
      "train.max_steps": 100000, "resume": False})
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen([sys.executable, "-m", "jlora.cli", "train", *over], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = tiny["root"] / "sigint" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 130, out
  assert "checkpoint saved to" in out
  import jlora
  with jlora.CheckpointManager(tiny["root"] / "sigint" / "checkpoints") as mgr:
    assert len(mgr.all_steps()) == 1 and mgr.latest_step() >= 3


@pytest.mark.slow
def test_default_job_runs_end_to_end_on_the_real_model(tmp_path, capsys):
  """`jlora train` on the packaged MiniLM and movie sentences, shortened to a few steps."""
  assert main(["train", f"output_dir={tmp_path / 'run'}", "train.max_steps=4",
               "data.max_train_examples=256", "data.max_eval_examples=96",
               "train.progress=false"]) == 0
  out = capsys.readouterr().out
  assert "trainable params: 74,498 || all params: 22,639,874" in out
  assert "test accuracy:" in out and "adapter saved to" in out
  res = json.loads((tmp_path / "run" / "results.json").read_text())
  assert res["metrics"]["test"]["examples"] == 96


def test_several_runs_share_one_base_in_generate_and_eval(tiny, tmp_path, capsys):
  """Two decoder runs stacked on one base: routed generation and evaluation equal each run alone."""
  from test_train import _lm_overrides, make_tiny_llama
  from jlora.train import evaluate_run, load_run, predict
  env = {"root": tiny["root"], "llama": tiny.get("llama") or make_tiny_llama(tiny["root"])}
  tiny["llama"] = env["llama"]
  runs = []
  for name, seed in (("lm-a", 0), ("lm-b", 1)):
    over = _lm_overrides(env, name, **{"train.max_steps": 12, "train.seed": seed,
                                       "method.train_also": "[]"})
    assert main(["train", *over]) == 0
    runs.append(tiny["root"] / name)
  capsys.readouterr()
  prompts = ["the movie was", "fun and"]
  assert main(["generate", str(runs[0]), str(runs[1]), "-p", prompts[0], "-p", prompts[1],
               "--adapter-ids", "1,lm-a", "--max-new-tokens", "6"]) == 0
  out = capsys.readouterr().out
  got = [b.split("\n", 1)[1].strip() for b in out.strip().split(">>> ")[1:]]
  want = [predict(load_run(runs[1]), [prompts[0]], max_new_tokens=6)[0]["output"].strip(),
          predict(load_run(runs[0]), [prompts[1]], max_new_tokens=6)[0]["output"].strip()]
  assert got == want

  # every adapter on every row, then rows routed by a data column
  rows = [{"text": " ".join(["the", "movie", "was", "good"][: 2 + i % 3]), "adapter": ["lm-a", "lm-b"][i % 2]}
          for i in range(12)]
  data = tmp_path / "mixed.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  for r in rows:
    r["adapter"] = "lm-b"
  only_b = tmp_path / "only_b.jsonl"
  only_b.write_text("".join(json.dumps(r) + "\n" for r in rows))
  common = [f"data.test_files={data}", "data.pack=false"]
  assert main(["eval", str(runs[0]), str(runs[1]), *common, "--json"]) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  assert [x["adapter"] for x in lines] == ["lm-a", "lm-b"]
  for x, r in zip(lines, runs):
    alone = evaluate_run(load_run(r), "test", data_overrides={"test_files": str(data), "pack": False})
    assert x["loss"] == pytest.approx(alone["loss"], rel=1e-5)
  assert main(["eval", str(runs[0]), str(runs[1]), f"data.test_files={only_b}", "data.pack=false",
               "--adapter-column", "adapter", "--json"]) == 0
  routed_b = json.loads(capsys.readouterr().out)
  assert routed_b["loss"] == pytest.approx(lines[1]["loss"], rel=1e-5)
  assert main(["eval", str(runs[0]), str(runs[1]), *common, "--adapter-column", "adapter",
               "--json"]) == 0
  mixed = json.loads(capsys.readouterr().out)
  assert min(lines[0]["loss"], lines[1]["loss"]) < mixed["loss"] < max(lines[0]["loss"], lines[1]["loss"])
  # bad input: no ids for several runs, an unknown adapter name
  assert main(["generate", str(runs[0]), str(runs[1]), "-p", "x"]) == 2
  assert "--adapter-ids" in capsys.readouterr().err
  assert main(["generate", str(runs[0]), str(runs[1]), "-p", "x", "--adapter-ids", "zzz"]) == 2
  assert "names no adapter" in capsys.readouterr().err


def test_compilation_cache_stores_compiled_programs(tmp_path):
  """The jlora command's persistent compilation cache writes the compiled program to its folder
  (a second process would load it instead of compiling), and =off turns it off."""
  import subprocess
  import sys
  code = (
      "import jax, jax.numpy as jnp\n"
      "from jlora.cli import enable_compilation_cache\n"
      f"assert enable_compilation_cache({str(tmp_path / 'xla')!r}) == {str(tmp_path / 'xla')!r}\n"
      "def f(x):\n"
      "  for i in range(300):\n"
      "    x = jnp.sin(x @ x.T) + i\n"
      "  return x\n"
      "jax.jit(f)(jnp.ones((8, 8))).block_until_ready()\n")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
  assert any((tmp_path / "xla").iterdir())
  from jlora.cli import enable_compilation_cache
  import os
  old = os.environ.get("JLORA_COMPILATION_CACHE")
  os.environ["JLORA_COMPILATION_CACHE"] = "off"
  try:
    assert enable_compilation_cache() is None
  finally:
    if old is None:
      del os.environ["JLORA_COMPILATION_CACHE"]
    else:
      os.environ["JLORA_COMPILATION_CACHE"] = old


def test_the_core_imports_nothing_of_the_models_extra():
  """`import jlora` (transforms, optax masks, sharding, the train step, checkpoints, the model
  registry) loads none of the jlora[models] extra; the commands that need it say how to get it."""
  code = ("import sys, jlora, jlora.sharding, jlora.train_step, jlora.models, jlora.config\n"
          "from jlora.cli import MODELS_EXTRA\n"
          "print(sorted(m for m in MODELS_EXTRA if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       check=True).stdout
  assert out.strip() == "[]"


def test_a_missing_models_extra_is_an_error_naming_the_install(monkeypatch, capsys):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "datasets" else real(name, *a))
  assert main(["train", "train.max_steps=1"]) == 2
  err = capsys.readouterr().err
  assert "datasets" in err and "pip install 'jlora[models]'" in err


@pytest.mark.slow
def test_a_second_run_of_the_same_job_compiles_nothing(tiny, tmp_path):
  """`jlora train` twice (the console path: the persistent cache on): the first run compiles,
  the second loads every one of its programs from the cache."""
  over = tiny_cls_overrides(tiny["root"], tiny["bert"], "cache-run", **{"resume": False})
  code = ("import sys, jax\n"
          "jax.config.update('jax_log_compiles', True)\n"
          "from jlora.cli import main\n"
          "sys.argv = ['jlora', 'train', *sys.argv[1:]]\n"
          "sys.exit(main())\n")  # argv=None: the console command, which turns the cache on
  env = dict(os.environ, JLORA_COMPILATION_CACHE=str(tmp_path / "xla"))
  logs = []
  for _ in range(2):
    proc = subprocess.run([sys.executable, "-c", code, *over], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs.append(proc.stderr)
  # jax logs "Finished XLA compilation" for every program, loaded or compiled; a loaded one
  # also logs a persistent cache hit
  programs = [len(re.findall(r"Finished XLA compilation of", log)) for log in logs]
  hits = [len(re.findall(r"Persistent compilation cache hit", log)) for log in logs]
  assert programs[0] > 0 and hits[0] == 0, (programs, hits)
  assert hits[1] == programs[1] == programs[0], (programs, hits)
