"""jlora.config: schema, YAML files, overrides, type coercion and the errors for typos."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from jlora import ConfigError
from jlora.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe_fields,
    dump_config,
    load_config,
)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "experiments" / "configs").glob("*.yaml"))


def test_defaults_are_the_default_job():
  c = Config()
  assert (c.model.name, c.data.task, c.data.source, c.data.domain) == (
      "all-minilm-l6-v2", "classification", "sentiment", "movies")
  assert (c.method.name, c.method.rank, c.method.targets, c.method.train_also) == ("lora", 8, None, None)
  assert load_config() == c


def test_yaml_then_overrides_in_order(tmp_path):
  f = tmp_path / "c.yaml"
  f.write_text("train:\n  lr: 3e-4\n  batch_size: 16\nmethod:\n  targets: [q_proj, v_proj]\n")
  c = load_config(f, ["train.batch_size=8", "--method.rank=4", "train.lr=1e-3", "train.lr=2e-3"])
  assert c.train.lr == 2e-3 and isinstance(c.train.lr, float)  # YAML 1.1 reads 3e-4 as a string
  assert c.train.batch_size == 8 and c.method.rank == 4
  assert c.method.targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize("text,expected", [
    ("method.targets=query,value", ["query", "value"]),
    ("method.targets=[q_proj, v_proj]", ["q_proj", "v_proj"]),
    ("method.targets=null", None),
    ("method.train_also=[]", []),
])
def test_list_values(text, expected):
  key = text.split("=")[0].split(".")[1]
  assert getattr(load_config(overrides=[text]).method, key) == expected


@pytest.mark.parametrize("text,field,expected", [
    ("model.remat=true", ("model", "remat"), True),
    ("model.remat=no", ("model", "remat"), False),
    ("train.max_steps=1e3", ("train", "max_steps"), 1000),
    ("train.epochs=2", ("train", "epochs"), 2.0),
    ("output_dir=runs/x=y", ("output_dir",), "runs/x=y"),
])
def test_value_coercion(text, field, expected):
  c = load_config(overrides=[text])
  v = c
  for f in field:
    v = getattr(v, f)
  assert v == expected and type(v) is type(expected)


@pytest.mark.parametrize("override,pattern", [
    ("train.lrr=1e-3", r"unknown config key 'train.lrr'.*'train.lr'"),
    ("trian.lr=1e-3", r"unknown config key 'trian.lr'.*'train.lr'"),
    ("train.rank=4", r"unknown config key 'train.rank'.*'method.rank'"),
    ("method.name=lroa", r"method.name: 'lroa' is not one of .*did you mean 'lora'"),
    ("data.task=clasification", r"did you mean 'classification'"),
    ("train.batch_size=big", r"train.batch_size must be an integer, got 'big'"),
    ("train.batch_size=2.5", r"must be an integer"),
    ("model.remat=maybe", r"model.remat must be true or false"),
    ("train.lr=-1", r"train.lr must be > 0"),
    ("method.dropout=1.5", r"method.dropout must be in \[0, 1\)"),
    ("train.grad_accum=3", r"divisible by train.grad_accum=3"),
    ("train=3", r"names a whole section"),
    ("train.lr", r"not of the form section.key=value"),
    ("model.name.x=1", r"'model.name' is a value, not a section"),
    ("data.source=files", r"needs data.train_files"),
])
def test_bad_overrides_are_config_errors(override, pattern):
  with pytest.raises(ConfigError, match=pattern):
    load_config(overrides=[override])


def test_yaml_typos_name_the_key_and_file(tmp_path):
  f = tmp_path / "bad.yaml"
  f.write_text("model:\n  nmae: x\n")
  with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.nmae'.*'model.name'"):
    load_config(f)
  f.write_text("- a\n- b\n")
  with pytest.raises(ConfigError, match="must hold a mapping"):
    load_config(f)
  f.write_text("train: 5\n")
  with pytest.raises(ConfigError, match="train must be a mapping"):
    load_config(f)
  f.write_text("train: [\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_config(f)
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(tmp_path / "missing.yaml")


def test_empty_yaml_is_the_default(tmp_path):
  f = tmp_path / "e.yaml"
  f.write_text("")
  assert load_config(f) == Config()


def test_dump_and_load_round_trip(tmp_path):
  c = load_config(overrides=["method.targets=a,b", "train.lr=3e-4", "model.dtype=bfloat16"])
  dump_config(c, tmp_path / "c.yaml")
  assert load_config(tmp_path / "c.yaml") == c
  assert config_from_dict(config_to_dict(c)) == c
  assert yaml.safe_load(dump_config(c))["train"]["lr"] == 3e-4


def test_overrides_do_not_modify_the_input():
  c = Config()
  d = apply_overrides(c, ["method.rank=2"])
  assert c.method.rank == 8 and d.method.rank == 2


def test_every_field_is_documented():
  fields = describe_fields()
  n = sum(len(dataclasses.fields(t)) for t in (
      type(Config().model), type(Config().data), type(Config().method), type(Config().train))) + 2
  assert len(fields) == n
  undocumented = [k for k, _, doc in fields if len(doc) < 10]
  assert not undocumented


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
  c = load_config(path)
  assert c.output_dir.startswith("runs/")


def test_the_minilm_config_is_the_default_job():
  c = load_config(Path(CONFIGS[0]).parent / "minilm_sentiment.yaml")
  d = Config()
  assert (c.model, c.data, c.train, c.output_dir) == (d.model, d.data, d.train, d.output_dir)
  assert c.method.targets == ["query", "value"] and c.method.train_also == ["classifier"]
  assert (c.method.name, c.method.rank, c.method.alpha) == (d.method.name, d.method.rank, d.method.alpha)
