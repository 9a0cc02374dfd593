"""The configuration of a jlora job: a typed dataclass schema, YAML files and overrides.

A job is described by :class:`Config`, four sections plus a few top-level
keys::

  model:   which base model and how to run it (dtype, remat, pooling)
  data:    which data, which task, how long the rows are
  method:  lora | dora | ia3 | vera | full | bitfit, and the adapters' hyper-parameters
  train:   the optimiser, schedule, batch sizes, evaluation and checkpoints

Every value has a default, so an empty config is the default job (LoRA r=8 on
all-MiniLM-L6-v2's query and value plus the classifier head, on the movie
review sentiment split). A YAML file and then ``section.key=value``
overrides are applied on top of it. Unknown keys (a typo anywhere) and bad
values raise :class:`jlora.ConfigError` naming the key and the closest valid
keys, before anything is loaded or computed.

Values given as strings (command-line overrides, or YAML's ``3e-4`` which
YAML 1.1 reads as a string) are converted to the field's type: ``int``,
``float``, ``bool`` (``true/false/yes/no/1/0``), ``null``/``none`` for
optional fields, and comma-separated or YAML-list values for lists.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jlora import _families
from jlora._errors import ConfigError
from jlora._spec import INITS as _INITS

__all__ = [
    "Config",
    "ModelConfig",
    "DataConfig",
    "MethodConfig",
    "TrainConfig",
    "MODEL_NAMES",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "describe_fields",
]

#: Packaged model names (``jlora fetch`` downloads them) -> the packaged resource.
MODEL_NAMES: dict[str, str] = {name: res for name, (res, _, _) in _families.packaged().items()}

_TASKS = ("classification", "causal_lm", "instruction")
_SOURCES = ("sentiment", "files", "hub")
_METHODS = ("lora", "dora", "ia3", "vera", "adalora", "adapter", "prompt", "prefix", "full", "bitfit")
_PLACEMENTS = ("houlsby", "pfeiffer")
_DTYPES = ("float32", "bfloat16")
_POOLING = ("mean", "cls")
_QUANTIZE = ("none", "nf4", "fp4", "int8", "q4_0", "q4_1", "q8_0", "gguf")
_MESHES = ("none", "dp", "fsdp", "tp", "fsdp_tp")
_DOMAINS = ("movies", "tweets", "amazon", "nyt")
_FORMATS = ("json", "csv", "parquet", "text")


@dataclasses.dataclass
class ModelConfig:
  """The base model.

  Attributes:
    name: a packaged model (``all-minilm-l6-v2``, ``smollm2-135m-instruct``), a
      Hugging Face checkpoint folder (BERT or Llama-family, safetensors) or a
      ``.gguf`` file (Llama-family).
    dtype: compute dtype, ``float32`` or ``bfloat16`` (bfloat16: matmuls run in
      bfloat16; weights and optimizer state stay float32; the loss is float32).
    remat: recompute each layer's activations in the backward pass (less memory,
      about a third more compute).
    pooling: BERT classification head input: ``mean`` (masked mean of the last
      hidden states, as sentence-transformers trains all-MiniLM-L6-v2) or ``cls``
      (transformers' tanh pooler on the first token; exports as
      BertForSequenceClassification).
    dropout: train with the model's own dropout (BERT hidden/attention dropout
      from its config); False runs the model deterministically.
    quantize: decoders: the frozen base's storage (QLoRA). ``none`` keeps float32;
      ``nf4`` / ``fp4`` / ``int8`` / ``q4_0`` / ``q4_1`` / ``q8_0`` quantise every layer
      kernel and the token embedding with that :func:`jlora.quantize` spec after loading;
      ``gguf`` keeps a GGUF file's own Q4_0 / Q4_1 / Q8_0 blocks (no requantisation).
      Adapters and optimizer state stay float32.
  """

  name: str = "all-minilm-l6-v2"
  dtype: str = "float32"
  remat: bool = False
  pooling: str = "mean"
  dropout: bool = False
  quantize: str = "none"


@dataclasses.dataclass
class DataConfig:
  """The data and the task built from it.

  Attributes:
    task: ``classification`` (text -> label), ``causal_lm`` (next-token
      prediction on packed text) or ``instruction`` (prompt -> response, loss on
      the response only, through the tokenizer's chat template; with the
      sentiment source each sentence becomes a "positive or negative?" prompt
      whose response is the label word).
    source: ``sentiment`` (the packaged corpus from vaderSentiment 3.3.2),
      ``files`` (local json / jsonl / csv / parquet / text files) or ``hub``
      (a Hugging Face hub dataset; needs network, not tested here).
    domain: sentiment corpus domain: ``movies``, ``tweets``, ``amazon``, ``nyt``.
    binary: sentiment labels: binary (neutral rows dropped) or 3 classes.
    split_seed: salt of the sentiment corpus's deterministic split (0 = canonical).
    train_files: files source: path or glob of the training rows.
    validation_files: files source: validation rows (empty: carve
      ``validation_fraction`` of the training rows off, deterministically).
    test_files: files source: test rows (empty: no test evaluation).
    format: files source: ``json``, ``csv``, ``parquet`` or ``text``; empty:
      inferred from the extensions.
    hub_name: hub source: the dataset id (e.g. ``imdb``).
    hub_config: hub source: the configuration name, if any.
    validation_fraction: share of the training rows held out for validation when
      no validation split exists.
    text_column: column with the text (classification, causal_lm).
    label_column: column with the integer class (classification).
    prompt_column: column with the prompt (instruction).
    response_column: column with the response (instruction).
    num_labels: number of classes (0: inferred from the data).
    max_length: tokens per row (classification, instruction) or per packed block
      (causal_lm); longer texts are truncated with one warning.
    pack: causal_lm: pack texts into full blocks (True) or one padded row per text.
      classification (BERT): pack each batch's sentences into rows of max_length
      tokens, several per row with segment ids (attention stays inside each
      sentence, positions restart, each is pooled alone: the same logits as
      padded rows, with far fewer padding positions: the run logs its share); the
      batches hold the same sentences as unpacked ones. False: one padded row
      per sentence (cut to the batch's longest with ``bucket``). ``method.name=prompt``
      never packs classification rows: every sentence needs its own soft prompt.
    chat_template: instruction: format with the tokenizer's chat template.
    max_train_examples: use at most this many training rows (0: all).
    max_eval_examples: use at most this many validation / test rows (0: all).
    bucket: sort each shuffled window of rows by length and cut every batch to
      its longest row (rounded up to a multiple of 16) to skip padding
      (instruction, and classification with pack=false; a few shapes get compiled).
  """

  task: str = "classification"
  source: str = "sentiment"
  domain: str = "movies"
  binary: bool = True
  split_seed: int = 0
  train_files: str = ""
  validation_files: str = ""
  test_files: str = ""
  format: str = ""
  hub_name: str = ""
  hub_config: str = ""
  validation_fraction: float = 0.1
  text_column: str = "text"
  label_column: str = "label"
  prompt_column: str = "prompt"
  response_column: str = "response"
  num_labels: int = 0
  max_length: int = 64
  pack: bool = True
  chat_template: bool = True
  max_train_examples: int = 0
  max_eval_examples: int = 0
  bucket: bool = True


@dataclasses.dataclass
class MethodConfig:
  """What is trained.

  Attributes:
    name: ``lora`` (low-rank adapters on ``targets``), ``dora`` (LoRA with a
      learned magnitude, :class:`jlora.DoRA`), ``ia3`` (learned output / input
      scalings, :class:`jlora.IA3`), ``vera`` (shared random projections with
      learned vectors, :class:`jlora.VeRA`), ``adalora`` (SVD-form LoRA whose
      rank budget is re-allocated during training, :class:`jlora.AdaLoRA`),
      ``adapter`` (bottleneck adapters on the layers' outputs, :class:`jlora.Bottleneck`),
      ``prompt`` / ``prefix`` (a trained soft prompt / per-layer prefix of
      ``num_virtual_tokens``, :func:`jlora.add_prompt` / :func:`jlora.add_prefix`;
      Llama and BERT, whose classification runs unpacked rows then), ``full`` (every parameter) or ``bitfit`` (every bias).
    rank: LoRA rank r (AdaLoRA: the initial rank of every module, ``init_r``).
    alpha: LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with
      rslora). 0 (default) means alpha = r, a scale of 1: the default of
      :class:`jlora.LoRA` (and PEFT's ``lora_alpha=8`` at its default r=8), so a
      run and a library call with the same rank train the same update.
    dropout: LoRA dropout on the adapter input (see the notes in docs/cli.md).
    rslora: rank-stabilised scaling alpha / sqrt(r).
    init: LoRA / DoRA init: ``kaiming`` (PEFT's default), ``gaussian``, or
      ``pissa`` / ``olora`` (LoRA only: initial factors from the base's SVD / QR,
      see docs/method_lora_init.md).
    targets: module names (the path component above ``kernel``, e.g.
      ``query``, ``v_proj``) or globs over module paths (``attention/self/*``).
      null (auto): the attention query and value projections (``query,value``
      for BERT, ``q_proj,v_proj`` for Llama); for ``ia3`` PEFT's defaults
      (``key,value,output/dense`` for BERT, ``k_proj,v_proj,down_proj`` for Llama).
    feedforward: ``ia3`` only: the targets whose inputs are scaled (PEFT's
      ``feedforward_modules``). null (auto): ``output/dense`` for BERT,
      ``down_proj`` for Llama.
    target_rank: ``adalora`` only: the average rank per module at the end
      (``target_r``); 0 (default): two thirds of ``rank`` (PEFT's 12 -> 8).
    tinit_ratio: ``adalora`` only: the share of the steps trained at the full
      budget before pruning starts (``tinit``).
    tfinal_ratio: ``adalora`` only: the share of the steps at the end trained
      with the final rank pattern fixed (``tfinal``).
    delta_t: ``adalora`` only: steps between re-allocations (``deltaT``).
    num_virtual_tokens: ``prompt`` / ``prefix`` only: the soft prompt's / prefix's length.
    placement: ``adapter`` only: ``houlsby`` (after the attention output and after the
      feed-forward output of every layer) or ``pfeiffer`` (after the feed-forward output);
      ``method.targets`` overrides the modules.
    reduction_factor: ``adapter`` only: bottleneck width = hidden size / reduction_factor.
    non_linearity: ``adapter`` only: the bottleneck's activation; null (auto): ``swish``
      for houlsby, ``relu`` for pfeiffer (AdapterHub's configs).
    prefix_projection: ``prefix`` only: the hidden size ``H`` of PEFT's prefix
      projection (``prefix_projection=True``, ``encoder_hidden_size=H``: the
      prefix is an MLP's output, :class:`jlora.PrefixTuning`); 0 (default):
      the keys and values train directly.
    train_also: modules trained in full besides the method's own parameters
      (PEFT's ``modules_to_save``); any method. null (auto): the
      classification head (``classifier``) for classification, none otherwise.
  """

  name: str = "lora"
  rank: int = 8
  alpha: float = 0.0
  dropout: float = 0.0
  rslora: bool = False
  init: str = "kaiming"
  targets: list[str] | None = None
  feedforward: list[str] | None = None
  target_rank: int = 0
  tinit_ratio: float = 0.1
  tfinal_ratio: float = 0.2
  delta_t: int = 10
  num_virtual_tokens: int = 20
  placement: str = "houlsby"
  reduction_factor: float = 16.0
  non_linearity: str | None = None
  prefix_projection: int = 0
  train_also: list[str] | None = None


@dataclasses.dataclass
class TrainConfig:
  """The training loop.

  Attributes:
    epochs: passes over the training rows (fractions allowed).
    max_steps: stop after this many optimiser steps (0: from ``epochs``).
    batch_size: examples per optimiser step (all micro-batches together).
    grad_accum: micro-batches per step (batch_size must be divisible by it).
    lr: peak learning rate (AdamW).
    weight_decay: AdamW decoupled weight decay on matrices (not on biases/norms).
    warmup_ratio: linear warmup over this share of the steps, then cosine decay.
    min_lr_ratio: the cosine decays to lr * min_lr_ratio.
    clip_norm: clip the global gradient norm to this (0: no clipping).
    adam_b1: AdamW beta1.
    adam_b2: AdamW beta2.
    seed: seed of adapter init, shuffling and dropout.
    log_every: steps between log lines in metrics.jsonl.
    eval_every: steps between validation runs (0: only at the end).
    eval_batch_size: rows per evaluation batch.
    save_every: steps between checkpoints (0: only at the end and on Ctrl-C).
    keep_last: checkpoints kept (the newest ones).
    progress: show a progress bar (loss, tokens/s, ETA).
    tensorboard: also write TensorBoard event files (needs tensorboardX).
    mesh: ``none`` (one device) or a sharding preset of :mod:`jlora.sharding`
      (``dp``, ``fsdp``, ``tp``, ``fsdp_tp``): the step runs on a mesh of every
      device (every process's, under ``jax.distributed``), the base and adapters
      sharded as the preset says and each batch split over the data axis.
    mesh_shape: the mesh's shape, e.g. ``[4, 2]`` for ``fsdp_tp`` (null: one axis
      of every device; ``fsdp_tp`` needs two). One entry may be -1.
  """

  epochs: float = 2.0
  max_steps: int = 0
  batch_size: int = 32
  grad_accum: int = 1
  lr: float = 4e-3
  weight_decay: float = 0.0
  warmup_ratio: float = 0.06
  min_lr_ratio: float = 0.0
  clip_norm: float = 1.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0
  eval_batch_size: int = 64
  save_every: int = 0
  keep_last: int = 2
  progress: bool = True
  tensorboard: bool = True
  mesh: str = "none"
  mesh_shape: list[int] | None = None


@dataclasses.dataclass
class Config:
  """A whole job.

  Attributes:
    output_dir: where the run writes metrics, checkpoints and the adapter.
    resume: continue from the newest checkpoint in ``output_dir`` if there is one.
    model: :class:`ModelConfig`.
    data: :class:`DataConfig`.
    method: :class:`MethodConfig`.
    train: :class:`TrainConfig`.

  Example:
    >>> from jlora.config import Config, apply_overrides
    >>> cfg = apply_overrides(Config(), ["train.lr=3e-4", "method.targets=query,key"])
    >>> cfg.train.lr, cfg.method.targets
    (0.0003, ['query', 'key'])
  """

  output_dir: str = "runs/minilm-sentiment"
  resume: bool = True
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

  def __post_init__(self) -> None:
    validate(self)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
  """Builds a :class:`Config` from defaults, an optional YAML file and overrides.

  Args:
    path: a YAML file whose mapping mirrors :class:`Config` (any subset of keys),
      or None for the defaults.
    overrides: ``"section.key=value"`` strings applied after the file.

  Returns:
    The validated config.

  Raises:
    ConfigError: the file is missing or not a mapping, a key is unknown (the
      message lists the closest valid keys), or a value has the wrong type or
      is out of range.

  Example:
    >>> from jlora.config import load_config
    >>> load_config(overrides=["method.rank=4"]).method.rank
    4
  """
  data: dict[str, Any] = {}
  if path is not None:
    p = Path(path)
    if not p.is_file():
      raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file path.")
    try:
      loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
      raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if loaded is None:
      loaded = {}
    if not isinstance(loaded, Mapping):
      raise ConfigError(
          f"config file {str(p)!r} must hold a mapping of sections (model:, data:, method:, "
          f"train:), got a {type(loaded).__name__}.")
    data = dict(loaded)
  cfg = config_from_dict(data, source=str(path) if path is not None else "config")
  return apply_overrides(cfg, overrides)


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> Config:
  """Builds a :class:`Config` from a nested mapping (e.g. parsed YAML).

  Args:
    data: ``{"train": {"lr": 3e-4}, ...}``; missing keys keep their defaults.
    source: a name for error messages (the file name).

  Returns:
    The validated config.

  Raises:
    ConfigError: unknown key, wrong type or bad value.

  Example:
    >>> from jlora.config import config_from_dict
    >>> config_from_dict({"method": {"name": "full"}}).method.name
    'full'
  """
  return _build(Config, data, prefix="", source=source)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
  """Applies ``"section.key=value"`` overrides (a leading ``--`` is allowed) to a copy.

  Args:
    cfg: the config to start from (not modified).
    overrides: strings like ``train.lr=3e-4``, ``method.targets=query,value``,
      ``method.targets=[q_proj, v_proj]``, ``model.remat=true``, ``output_dir=runs/x``.

  Returns:
    A new validated config.

  Raises:
    ConfigError: a string without ``=``, an unknown key, or a bad value.

  Example:
    >>> from jlora.config import Config, apply_overrides
    >>> apply_overrides(Config(), ["--train.batch_size=16"]).train.batch_size
    16
  """
  data = config_to_dict(cfg)
  for item in overrides:
    if not isinstance(item, str) or "=" not in item:
      raise ConfigError(
          f"override {item!r} is not of the form section.key=value (e.g. train.lr=3e-4).")
    key, value = item.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_") if key.strip().startswith("--") else key.strip()
    parts = key.split(".")
    node: dict[str, Any] = data
    cls: type = Config
    for i, part in enumerate(parts):
      fields = {f.name: f for f in dataclasses.fields(cls)}
      if part not in fields:
        _unknown(key, [_join(parts[:i], n) for n in fields], "override")
      f = fields[part]
      sub = _dataclass_type(cls, f.name)
      if i == len(parts) - 1:
        if sub is not None:
          raise ConfigError(
              f"override {key!r} names a whole section; set one of its keys, e.g. "
              f"{key}.{dataclasses.fields(sub)[0].name}=...")
        node[part] = value
      else:
        if sub is None:
          raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])!r} is a value, not a section.")
        node = node.setdefault(part, {})
        cls = sub
  return config_from_dict(data, source="override")


def config_to_dict(cfg: Config) -> dict[str, Any]:
  """The config as a plain nested dict (lists copied).

  Example:
    >>> from jlora.config import Config, config_to_dict
    >>> config_to_dict(Config())["method"]["rank"]
    8
  """
  return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
  """The config as YAML text; also written to ``path`` when given.

  Example:
    >>> from jlora.config import Config, dump_config, load_config
    >>> "rank: 8" in dump_config(Config())
    True
  """
  text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
  if path is not None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
  return text


def describe_fields() -> list[tuple[str, str, str]]:
  """``(dotted key, default, description)`` for every config key, for ``--help``.

  Example:
    >>> from jlora.config import describe_fields
    >>> [k for k, _, _ in describe_fields()][:2]
    ['output_dir', 'resume']
  """
  out = []

  def walk(cls: type, prefix: str, instance: Any) -> None:
    docs = _attribute_docs(cls)
    for f in dataclasses.fields(cls):
      sub = _dataclass_type(cls, f.name)
      value = getattr(instance, f.name)
      if sub is not None:
        walk(sub, _join([prefix] if prefix else [], f.name), value)
      else:
        shown = (",".join(value) if isinstance(value, list) else "''" if value == ""
                 else "auto" if value is None else str(value))
        out.append((_join([prefix] if prefix else [], f.name), shown, docs.get(f.name, "")))

  walk(Config, "", Config())
  return out


def validate(cfg: Config) -> None:
  """Checks values and their combinations; raises ConfigError naming the key and the fix.

  Example:
    >>> from jlora.config import Config, validate
    >>> validate(Config())
  """
  def choice(key: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
      close = difflib.get_close_matches(str(value), options, n=3, cutoff=0.4)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"{key}: {value!r} is not one of {list(options)}{hint}.")

  def positive(key: str, value: float, *, zero: bool = False) -> None:
    if value < 0 or (value == 0 and not zero):
      raise ConfigError(f"{key} must be {'>= 0' if zero else '> 0'}, got {value!r}.")

  m, d, me, t = cfg.model, cfg.data, cfg.method, cfg.train
  if not m.name:
    raise ConfigError(f"model.name is empty; use one of {sorted(MODEL_NAMES)} or a model path.")
  choice("model.dtype", m.dtype, _DTYPES)
  choice("model.pooling", m.pooling, _POOLING)
  choice("model.quantize", m.quantize, _QUANTIZE)
  choice("data.task", d.task, _TASKS)
  choice("data.source", d.source, _SOURCES)
  choice("data.domain", d.domain, _DOMAINS)
  if d.format:
    choice("data.format", d.format, _FORMATS)
  if d.source == "files" and not d.train_files:
    raise ConfigError("data.source=files needs data.train_files (a path or glob).")
  if d.source == "hub" and not d.hub_name:
    raise ConfigError("data.source=hub needs data.hub_name (e.g. imdb).")
  if not 0 < d.validation_fraction < 1:
    raise ConfigError(f"data.validation_fraction must be in (0, 1), got {d.validation_fraction}.")
  positive("data.max_length", d.max_length)
  if d.max_length < 4:
    raise ConfigError(f"data.max_length must be at least 4 tokens, got {d.max_length}.")
  for k in ("num_labels", "max_train_examples", "max_eval_examples", "split_seed"):
    positive(f"data.{k}", getattr(d, k), zero=True)
  if d.num_labels == 1:
    raise ConfigError("data.num_labels must be >= 2 (or 0 to infer it).")
  choice("method.name", me.name, _METHODS)
  choice("method.init", me.init, _INITS)
  positive("method.rank", me.rank)
  positive("method.alpha", me.alpha, zero=True)
  if not 0 <= me.dropout < 1:
    raise ConfigError(f"method.dropout must be in [0, 1), got {me.dropout}.")
  positive("method.target_rank", me.target_rank, zero=True)
  if me.target_rank > me.rank:
    raise ConfigError(f"method.target_rank={me.target_rank} exceeds method.rank={me.rank}: AdaLoRA's "
                      "budget only shrinks from rank to target_rank; lower target_rank or raise rank.")
  positive("method.delta_t", me.delta_t)
  positive("method.num_virtual_tokens", me.num_virtual_tokens)
  choice("method.placement", me.placement, _PLACEMENTS)
  positive("method.reduction_factor", me.reduction_factor)
  if me.non_linearity is not None:
    from jlora._methods.bottleneck import _ACTS  # noqa: PLC0415
    choice("method.non_linearity", me.non_linearity, _ACTS)
  positive("method.prefix_projection", me.prefix_projection, zero=True)
  if me.prefix_projection and me.name != "prefix":
    raise ConfigError(f"method.prefix_projection={me.prefix_projection} is the hidden size of a prefix's "
                      f"MLP; it is for method.name=prefix, not {me.name}: drop it or set method.name=prefix.")
  for k in ("tinit_ratio", "tfinal_ratio"):
    if not 0 <= getattr(me, k) < 1:
      raise ConfigError(f"method.{k} must be in [0, 1), got {getattr(me, k)}.")
  if me.tinit_ratio + me.tfinal_ratio >= 1:
    raise ConfigError(f"method.tinit_ratio + method.tfinal_ratio = {me.tinit_ratio + me.tfinal_ratio:g} "
                      "leaves AdaLoRA no steps to prune in; keep their sum below 1 (e.g. 0.1 and 0.2).")
  if me.name not in ("full", "bitfit") and me.targets is not None and not me.targets:
    raise ConfigError(f"method.targets is empty; {me.name} needs at least one module, e.g. query,value.")
  for k in ("epochs", "batch_size", "grad_accum", "lr", "eval_batch_size", "keep_last",
            "log_every"):
    positive(f"train.{k}", getattr(t, k))
  for k in ("max_steps", "weight_decay", "warmup_ratio", "min_lr_ratio", "clip_norm",
            "eval_every", "save_every", "seed"):
    positive(f"train.{k}", getattr(t, k), zero=True)
  if t.batch_size % t.grad_accum:
    raise ConfigError(
        f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum} "
        f"(each step is grad_accum micro-batches of batch_size / grad_accum rows).")
  choice("train.mesh", t.mesh, _MESHES)
  if t.mesh_shape is not None:
    if t.mesh == "none":
      raise ConfigError("train.mesh_shape is set but train.mesh=none; pick a preset (train.mesh="
                        "dp|fsdp|tp|fsdp_tp) or drop train.mesh_shape.")
    if not t.mesh_shape or any(s == 0 or s < -1 for s in t.mesh_shape) or t.mesh_shape.count(-1) > 1:
      raise ConfigError(f"train.mesh_shape must hold positive sizes (at most one -1), got "
                        f"{t.mesh_shape}.")
  if t.mesh == "fsdp_tp" and (t.mesh_shape is None or len(t.mesh_shape) != 2):
    raise ConfigError("train.mesh=fsdp_tp shards over a (data, model) mesh; set train.mesh_shape="
                      "[data, model], e.g. [4,2] on 8 devices.")
  if t.warmup_ratio >= 1:
    raise ConfigError(f"train.warmup_ratio must be < 1, got {t.warmup_ratio}.")
  if t.min_lr_ratio > 1:
    raise ConfigError(f"train.min_lr_ratio must be <= 1, got {t.min_lr_ratio}.")
  for k in ("adam_b1", "adam_b2"):
    if not 0 <= getattr(t, k) < 1:
      raise ConfigError(f"train.{k} must be in [0, 1), got {getattr(t, k)}.")


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _build(cls: type, data: Any, *, prefix: str, source: str) -> Any:
  if not isinstance(data, Mapping):
    raise ConfigError(
        f"{source}: {prefix or 'the config'} must be a mapping of keys, got "
        f"{type(data).__name__} ({data!r:.60}).")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  for key in data:
    if key not in fields:
      _unknown(_join([prefix] if prefix else [], str(key)),
               [_join([prefix] if prefix else [], n) for n in fields], source,
               everything=_all_keys())
  kwargs = {}
  hints = typing.get_type_hints(cls)
  for name, value in data.items():
    sub = _dataclass_type(cls, name)
    key = _join([prefix] if prefix else [], name)
    if sub is not None:
      kwargs[name] = _build(sub, value if value is not None else {}, prefix=key, source=source)
    else:
      kwargs[name] = _coerce(value, hints[name], key, source)
  if cls is Config:
    return _construct_config(kwargs)
  return cls(**kwargs)


def _construct_config(kwargs: dict[str, Any]) -> Config:
  return Config(**kwargs)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    non_none = [a for a in args if a is not type(None)]
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
      if type(None) in args:
        return None
    return _coerce(value, non_none[0], key, source)
  if origin is list:
    (item_tp,) = args
    if isinstance(value, str):
      text = value.strip()
      if text.startswith("["):
        try:
          value = yaml.safe_load(text)
        except yaml.YAMLError:
          raise ConfigError(f"{source}: {key}: {value!r} is not a valid list.") from None
      else:
        value = [v.strip() for v in text.split(",") if v.strip()] if text else []
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{source}: {key} must be a list, got {value!r}.")
    return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
  if tp is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
      return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
      return False
    if isinstance(value, int) and value in (0, 1):
      return bool(value)
    raise ConfigError(f"{source}: {key} must be true or false, got {value!r}.")
  if tp is int:
    if isinstance(value, bool):
      raise ConfigError(f"{source}: {key} must be an integer, got {value!r}.")
    if isinstance(value, int):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    if isinstance(value, str):
      try:
        f = float(value.strip().replace("_", ""))
      except ValueError:
        pass
      else:
        if f.is_integer():
          return int(f)
    raise ConfigError(f"{source}: {key} must be an integer, got {value!r}.")
  if tp is float:
    if isinstance(value, bool):
      raise ConfigError(f"{source}: {key} must be a number, got {value!r}.")
    if isinstance(value, (int, float)):
      return float(value)
    if isinstance(value, str):
      try:
        return float(value.strip())
      except ValueError:
        pass
    raise ConfigError(f"{source}: {key} must be a number, got {value!r}.")
  if tp is str:
    if value is None:
      return ""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
      return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
      return ",".join(value)
    raise ConfigError(f"{source}: {key} must be a string, got {value!r}.")
  raise ConfigError(f"{source}: {key}: unsupported field type {tp!r}.")  # pragma: no cover


def _dataclass_type(cls: type, name: str) -> type | None:
  tp = typing.get_type_hints(cls)[name]
  return tp if dataclasses.is_dataclass(tp) else None


def _join(parts: Sequence[str], name: str) -> str:
  return ".".join([*parts, name]) if parts else name


def _all_keys() -> list[str]:
  return [k for k, _, _ in describe_fields()]


def _unknown(key: str, siblings: list[str], source: str, *, everything: list[str] | None = None) -> None:
  candidates = list(dict.fromkeys(siblings + (everything or _all_keys())))
  close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
  leaf = key.rsplit(".", 1)[-1]
  for k in candidates:  # the same key name in another section (train.rank -> method.rank)
    if k.rsplit(".", 1)[-1] == leaf and k not in close:
      close.insert(0, k)
  hint = f" Did you mean {', '.join(repr(c) for c in close[:3])}?" if close else ""
  raise ConfigError(
      f"{source}: unknown config key {key!r}.{hint} Valid keys here: "
      f"{', '.join(sorted(siblings))}. (`jlora train --help` lists every key.)")


def _attribute_docs(cls: type) -> dict[str, str]:
  """Parses the ``Attributes:`` block of a dataclass docstring."""
  doc = cls.__doc__ or ""
  out: dict[str, str] = {}
  current = None
  in_attrs = False
  for line in doc.splitlines():
    stripped = line.strip()
    if stripped == "Attributes:":
      in_attrs = True
      continue
    if not in_attrs:
      continue
    if not stripped:
      current = None
      continue
    indent = len(line) - len(line.lstrip())
    if indent <= 4 and ":" in stripped and not stripped.startswith(("-", "(")):
      name, _, rest = stripped.partition(":")
      if name.isidentifier():
        current = name
        out[name] = rest.strip()
        continue
    if current is not None:
      out[current] += " " + stripped
  return out
