"""Hugging Face PEFT LoRA adapters both ways, and merged export.

PEFT stores a LoRA adapter as ``adapter_config.json`` plus
``adapter_model.safetensors`` with, per adapted torch module ``M``:

* ``base_model.model.M.lora_A.weight`` of shape ``(r, in)`` and
  ``base_model.model.M.lora_B.weight`` of shape ``(out, r)`` for a Linear
  (``lora_embedding_A`` ``(r, vocab)`` / ``lora_embedding_B`` ``(d, r)`` for an
  Embedding), with ``delta W = scale * B @ A`` in torch's ``(out, in)`` layout;
* ``base_model.model.M.<param>`` for every parameter of a module in
  ``modules_to_save`` (trained in full).

jlora's ``a`` is ``stack + in + (r,)`` and ``b`` is ``stack + (r,) + out`` in
Flax's ``(in, out)`` layout, so for layer ``i`` of a stacked kernel
``lora_A = a[i].T`` and ``lora_B = b[i].T``. Which torch module a jlora path
is, is data: a :class:`PeftMapping` from jlora module paths (a leaf's path
without its last component) to torch module names, with ``{i}`` standing for
the layer index of leaves stacked on a leading layer axis. Mappings for
jlora's Llama and BERT models are built in; pass your own for other models.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _families
from jlora._checkpoint import _short, atomic_write_dir, safe_child
from jlora._errors import CheckpointError, ModelError, SpecError, TreeError
from jlora._quant import is_whole
from jlora._paths import path_str
from jlora._methods.dora import DoRA, DoraWeight
from jlora._spec import LoRA
from jlora._tree import FullWeight, LoraWeight, _adapter_dtype, infer_axes, is_adapted

__all__ = [
    "PeftMapping", "save_peft", "load_peft", "peft_mapping", "export_merged", "PEFT_MAPPINGS",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."

#: jlora leaf name -> (torch parameter name, whether a 2-D value is transposed).
DEFAULT_LEAVES: dict[str, tuple[str, bool]] = {
    "kernel": ("weight", True),
    "embedding": ("weight", False),
    "scale": ("weight", False),
    "bias": ("bias", False),
}
# The config fields jlora reads; a PEFT file without them is rejected.
_REQUIRED = ("peft_type", "r", "lora_alpha", "target_modules")
# Fields that change what the adapter computes and that jlora does not implement.
_UNSUPPORTED = {
    "fan_in_fan_out": (False, None), "bias": ("none", None),
    "lora_bias": (False, None), "layer_replication": (None,), "use_qalora": (False, None),
    "trainable_token_indices": (None,), "target_parameters": (None, []),
    "alora_invocation_tokens": (None,), "use_bdlora": (None, False),
}


@dataclasses.dataclass(frozen=True)
class PeftCodec:
  """How one PEFT ``peft_type`` maps to jlora adapters (the format's half of a method).

  Attributes:
    peft_type: PEFT's name (``"LORA"``, ``"IA3"``, ...).
    kinds: the jlora leaf kinds it writes (``Full`` leaves are written by every
      codec as ``modules_to_save``).
    validate: ``validate(config, where)`` checks an ``adapter_config.json``
      (CheckpointError naming the field).
    load: ``load(config, tensors, params, mapping, where)`` returns the wrapped tree.
    save: ``save(tree, mapping)`` returns ``(config, tensors)``.
  """

  peft_type: str
  kinds: tuple[str, ...]
  validate: Any
  load: Any
  save: Any


PEFT_CODECS: dict[str, PeftCodec] = {}


def register_codec(codec: PeftCodec) -> PeftCodec:
  """Registers a :class:`PeftCodec` (one per ``peft_type``)."""
  PEFT_CODECS[codec.peft_type] = codec
  return codec


def _linear_kernels(tree: Any, m: PeftMapping, kind: str, label: str,
                    leaf_cls: Any) -> tuple[dict[str, tuple[str, Any]], list[str]]:
  """A method's leaves on torch Linear weights, ``{jlora module: (path, leaf)}``, and the modules
  trained in full (``modules_to_save``), for a codec's ``save``.

  Raises CheckpointError for a module the mapping does not name, SpecError for another adapter
  kind, a non-``kernel`` leaf, a stacking that disagrees with the mapping, no kernel at all, or a
  module both adapted and trained in full, TreeError for a leaf missing saved children.
  """
  kernels: dict[str, tuple[str, Any]] = {}
  full_modules: list[str] = []
  for path, node in _adapted(tree):
    module, leaf = _split_path(path)
    if module not in m.modules:
      raise CheckpointError(
          f"the mapping has no torch name for jlora module {module!r} (of adapted leaf {path!r}); "
          f"add it: PeftMapping({{{module!r}: 'torch.module.name', ...}})")
    if node.kind == "full":
      if module not in full_modules:
        full_modules.append(module)
      continue
    if node.kind != kind:
      raise SpecError(f"{path!r} is a {type(node).__name__}; PEFT's {label} format holds {label} "
                      "adapters and modules_to_save only")
    missing = [n for n in leaf_cls.saved_children() if getattr(node, n) is None]
    if missing:
      raise TreeError(f"the {label} leaf at {path!r} lacks {missing}; pass the whole tree")
    if m.leaves.get(leaf) != ("weight", True):
      raise SpecError(f"{label} on {path!r}: jlora writes PEFT {label} for torch Linear weights "
                      "('kernel' leaves) only; name the leaf in PeftMapping.leaves")
    stacked = m.stacked(module)
    if len(node.axes.stack) != (1 if stacked else 0):
      raise SpecError(
          f"{label} on {path!r} has {len(node.axes.stack)} stacked axes but the mapping names it "
          f"{m.modules[module]!r} ({'one layer axis' if stacked else 'no layer axis'}); wrap it with "
          f"stack_axes={1 if stacked else 'None'} or fix the mapping")
    kernels[module] = (path, node)
  if not kernels:
    raise SpecError(f"PEFT's {label} format needs at least one {label} kernel (target_modules)")
  clash = sorted(set(kernels) & set(full_modules))
  if clash:
    raise SpecError(f"module {clash[0]!r} is both {label}-adapted and trained in full; PEFT cannot "
                    "save a module in target_modules and modules_to_save at once")
  return kernels, full_modules


def _is_prompt_only(tree: Any) -> str | None:
  """``"PROMPT_TUNING"`` / ``"PREFIX_TUNING"`` for a tree that trains only a soft prompt / prefix."""
  from jlora._methods.prompt import PREFIX_KEY, PROMPT_KEY  # noqa: PLC0415 - a cycle

  key = next((k for k in (PROMPT_KEY, PREFIX_KEY) if isinstance(tree, dict) and k in tree), None)
  if key is None:
    return None
  # a soft prompt / prefix trains with a classification head: PEFT's SEQ_CLS modules_to_save
  head = [p for p, x in _adapted(tree) if p.startswith("classifier/") and x.kind == "full"]
  others = [p for p, _ in _adapted(tree) if not p.startswith(key + "/") and p not in head]
  if others:
    raise SpecError(f"the tree trains a soft {key} and {others[:3]}; PEFT stores one method per "
                    f"adapter ({key} tuning holds the {key} alone): save the {key} and the other "
                    "adapters as two adapters")
  return "PROMPT_TUNING" if key == PROMPT_KEY else "PREFIX_TUNING"


def _codec_for_tree(tree: Any) -> PeftCodec:
  kinds = {x.kind for _, x in _adapted(tree) if x.kind != "full"}
  if not kinds:
    raise SpecError("PEFT's formats need at least one adapted module (target_modules); the tree "
                    "only trains leaves in full")
  for codec in PEFT_CODECS.values():
    if kinds <= set(codec.kinds):
      return codec
  raise SpecError(f"the tree mixes adapter kinds {sorted(kinds)} that no single PEFT format holds "
                  "(PEFT stores one peft_type per adapter); save each kind as its own adapter")


@dataclasses.dataclass(frozen=True)
class PeftMapping:
  """Which torch module each jlora module is: the naming and layout contract with PEFT.

  Attributes:
    modules: jlora module path (a leaf's ``/``-joined path without its last
      component, e.g. ``"layers/self_attn/q_proj"``) -> torch module name
      (``"model.layers.{i}.self_attn.q_proj"``). ``{i}`` marks a module whose
      leaves are stacked on a leading layer axis (``LoRA(r, stack_axes=1)``):
      layer ``i`` of the stack is torch module ``...layers.{i}...``.
    leaves: jlora leaf name -> ``(torch parameter name, transpose)``; the
      default maps ``kernel`` to a Linear's ``weight`` (transposed, ``(in, out)``
      vs ``(out, in)``), ``embedding`` / ``scale`` to ``weight`` and ``bias`` to
      ``bias``. LoRA is exported for ``kernel`` (PEFT ``lora_A`` / ``lora_B``)
      and ``embedding`` leaves (``lora_embedding_A`` / ``_B``).

  Example:
    >>> import jlora
    >>> m = jlora.PeftMapping({"encoder/{i}/attn/q": "encoder.layers.{i}.attn.q_proj",
    ...                        "head": "lm_head"})
    >>> m.to_torch("head"), m.from_torch("lm_head")
    ('lm_head', ('head', None))
    >>> m = jlora.PeftMapping({"layers/attn/q": "blocks.{i}.attn.q"})
    >>> m.to_torch("layers/attn/q", 3), m.from_torch("blocks.3.attn.q")
    ('blocks.3.attn.q', ('layers/attn/q', 3))
  """

  modules: Mapping[str, str]
  leaves: Mapping[str, tuple[str, bool]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_LEAVES))

  def __post_init__(self):
    if not isinstance(self.modules, Mapping) or not self.modules:
      raise CheckpointError("PeftMapping.modules must be a non-empty dict {jlora module path: torch name}")
    for k, v in self.modules.items():
      if not isinstance(k, str) or not isinstance(v, str) or not v or v.count("{i}") > 1:
        raise CheckpointError(f"PeftMapping entry {k!r} -> {v!r} is invalid: both must be strings and "
                              "the torch name may hold '{i}' at most once")
      rest = v.replace("{i}", "")
      if "{" in rest or "}" in rest:
        raise CheckpointError(f"PeftMapping entry {k!r} -> {v!r}: only '{{i}}' may be a placeholder")
    regexes = []
    for k, v in self.modules.items():
      pattern = re.escape(v).replace(re.escape("{i}"), r"(\d+)")
      regexes.append((re.compile(pattern), k, "{i}" in v))
    object.__setattr__(self, "_regexes", tuple(regexes))

  def stacked(self, module: str) -> bool:
    """True if ``module``'s leaves carry a leading layer axis."""
    return "{i}" in self.modules[module]

  def to_torch(self, module: str, layer: int | None = None) -> str | None:
    """The torch module name of a jlora module (and layer), or None if unmapped."""
    t = self.modules.get(module)
    if t is None:
      return None
    if "{i}" in t:
      if layer is None:
        raise CheckpointError(f"jlora module {module!r} is stacked ({t!r}); pass its layer index")
      return t.replace("{i}", str(int(layer)))
    return t

  def from_torch(self, name: str) -> tuple[str, int | None] | None:
    """``(jlora module path, layer index or None)`` of a torch module name, or None if unmapped."""
    for regex, module, stacked in self._regexes:  # type: ignore[attr-defined]
      m = regex.fullmatch(name)
      if m:
        return module, (int(m.group(1)) if stacked else None)
    return None

  def regex(self, module: str) -> str:
    """A regular expression that full-matches the torch names of ``module`` (all layers)."""
    return re.escape(self.modules[module]).replace(re.escape("{i}"), r"\d+")


def _family_modules(name: str, head: bool) -> dict[str, str]:
  """A family's torch module names (:mod:`jlora._families`), with its task head's prefix."""
  fam = _families.family(name)
  prefix = fam.peft_head_prefix if head else ""
  mods = {k: prefix + v for k, v in fam.peft_modules.items()}
  if head:
    mods.update(fam.peft_head_modules)
  return mods


#: The built-in mappings: jlora's Llama family (``jlora.models.llama``, as
#: ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``) and BERT
#: (``jlora.models.bert``; ``"bert"`` names modules as ``BertModel`` does, or as
#: ``BertForSequenceClassification`` when the tree has a ``classifier``).
PEFT_MAPPINGS: dict[str, PeftMapping] = {
    "llama": PeftMapping(_family_modules("llama", head=False)),
    "bert-base": PeftMapping(_family_modules("bert", head=False)),
    "bert-classification": PeftMapping(_family_modules("bert", head=True)),
}


def peft_mapping(name: str, tree: Any = None) -> PeftMapping:
  """A built-in :class:`PeftMapping`: ``"llama"``, ``"bert"``, ``"bert-base"`` or ``"bert-classification"``.

  Args:
    name: the mapping's name.
    tree: for ``"bert"``, the params or wrapped tree: with a top-level
      ``classifier`` the torch names are ``BertForSequenceClassification``'s
      (``bert.encoder.layer.{i}...``), otherwise ``BertModel``'s.

  Returns:
    The mapping.

  Raises:
    CheckpointError: an unknown name.

  Example:
    >>> import jlora
    >>> jlora.peft_mapping("llama").to_torch("layers/self_attn/q_proj", 2)
    'model.layers.2.self_attn.q_proj'
    >>> jlora.peft_mapping("bert", {"classifier": {}}).to_torch("layers/attention/self/query", 0)
    'bert.encoder.layer.0.attention.self.query'
  """
  if name == "bert":
    has_cls = isinstance(tree, Mapping) and "classifier" in tree
    return PEFT_MAPPINGS["bert-classification" if has_cls else "bert-base"]
  if name not in PEFT_MAPPINGS:
    raise CheckpointError(f"unknown PEFT mapping {name!r}; built in: {['bert', *sorted(PEFT_MAPPINGS)]}, "
                          "or pass a jlora.PeftMapping / a dict {jlora module path: torch module name}")
  return PEFT_MAPPINGS[name]


def save_peft(directory: str | os.PathLike, tree: Any, *, mapping: str | Mapping | PeftMapping | None = None,
              base_model_name_or_path: str | None = None, task_type: str | None = None,
              adapter_name: str = "default", overwrite: bool = False) -> Path:
  """Writes a wrapped tree's adapters as a Hugging Face PEFT LoRA adapter.

  Writes ``adapter_config.json`` and ``adapter_model.safetensors`` that
  ``peft.PeftModel.from_pretrained(model, directory)`` loads onto the
  transformers model. Ranks and alphas that differ between modules become
  ``rank_pattern`` / ``alpha_pattern``; ``rslora``, ``dropout`` and ``init``
  become ``use_rslora``, ``lora_dropout`` and ``init_lora_weights``;
  :class:`jlora.Full` leaves become ``modules_to_save`` (their whole torch
  module is written). ``target_modules`` lists short names (``["q_proj",
  "v_proj"]``) when they select exactly the adapted modules among those the
  mapping knows, and a full-match regular expression otherwise. The write is
  atomic.

  Args:
    directory: the output folder (PEFT writes a non-default adapter to
      ``directory/adapter_name``, and so does this).
    tree: the wrapped tree (the whole tree: modules_to_save need their
      frozen parameters too).
    mapping: ``"llama"``, ``"bert"``, a :class:`PeftMapping` or a dict
      ``{jlora module path: torch module name}``; ``None`` picks the built-in
      one that names every adapted module.
    base_model_name_or_path: recorded in the config (e.g. the hub id).
    task_type: PEFT's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...) or None.
    adapter_name: PEFT's adapter name.
    overwrite: replace an existing adapter folder.

  A stacked tree (:func:`jlora.stack_adapters`) writes every adapter in PEFT's
  multi-adapter layout, in one atomic write: an adapter named ``default`` at
  ``directory``, each other one in ``directory/<name>``.

  Returns:
    The folder written.

  Raises:
    TreeError: no adapters, or the tree lacks the parameters of a
      modules_to_save module.
    SpecError: the adapters cannot be expressed in PEFT's format (modules with
      different ``rslora`` or ``dropout``, LoRA on a leaf PEFT has no layer for,
      a module both LoRA-adapted and in modules_to_save).
    CheckpointError: a jlora path the mapping does not name, an
      ``adapter_name`` that would escape ``directory``, an existing folder
      without ``overwrite``, or a failed write (nothing is written then).

  Example:
    >>> import jax, jlora
    >>> from jlora.models.llama_io import load_llama
    >>> config, params = load_llama("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> tree = jlora.wrap(params, {"layers/self_attn/{q,v}_proj/kernel": jlora.LoRA(8, stack_axes=1)},
    ...                   key=jax.random.key(0))  # doctest: +SKIP
    >>> jlora.save_peft("my-adapter", tree, mapping="llama")  # doctest: +SKIP
    >>> # then: peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(...), "my-adapter")
  """
  from jlora._multi import _has_stacked, adapter_names, select_adapter  # noqa: PLC0415 - a cycle

  if _has_stacked(tree):  # every adapter in PEFT's layout: "default" at the root, others in <name>/
    folder = Path(directory)
    names = adapter_names(tree)
    parts = [(n, select_adapter(tree, n)) for n in names]
  else:
    folder = _adapter_folder(directory, adapter_name)
    parts = [(None, tree)]
  if (folder.exists() or folder.is_symlink()) and not overwrite:
    raise CheckpointError(f"{folder} already exists; pass overwrite=True to replace the PEFT adapter "
                          "(atomically) or choose a new folder")
  files = []
  for name, one in parts:
    learned = _is_prompt_only(one)
    if learned:  # prompt / prefix tuning: one tensor, no torch module names to map
      config, tensors = PEFT_CODECS[learned].save(one, None)
    else:
      m = _resolve_mapping(mapping, one)
      config, tensors = _codec_for_tree(one).save(one, m)
    config["base_model_name_or_path"] = base_model_name_or_path
    if task_type is not None or "task_type" not in config:  # prompt tuning picks CAUSAL_LM itself
      config["task_type"] = task_type
    sub = "" if name in (None, "default") else name
    files.append((sub, json.dumps(config, indent=2, sort_keys=True) + "\n", tensors))

  def write(tmp: Path) -> None:
    from safetensors.numpy import save_file  # noqa: PLC0415

    for sub, text, tensors in files:
      d = tmp / sub if sub else tmp
      d.mkdir(exist_ok=True)
      (d / CONFIG_NAME).write_text(text)
      save_file(tensors, str(d / WEIGHTS_NAME), metadata={"format": "pt"})

  atomic_write_dir(folder, write, overwrite=overwrite, what="PEFT adapter")
  return folder


def load_peft(directory: str | os.PathLike, params: Any, *,
              mapping: str | Mapping | PeftMapping | None = None,
              adapter_name: str | Sequence[str] = "default") -> Any:
  """Reads a Hugging Face PEFT LoRA adapter onto jlora params: the wrapped tree.

  Every ``lora_A`` / ``lora_B`` pair becomes a :class:`jlora.LoraWeight` on
  the mapped leaf (layers of a stacked kernel gathered into one adapter with
  ``stack_axes=1``; a layer PEFT left out gets a zero adapter), with rank and
  alpha from ``r`` / ``lora_alpha`` / ``rank_pattern`` / ``alpha_pattern``,
  scale as ``use_rslora`` says, ``lora_dropout`` as dropout and
  ``init_lora_weights="gaussian"`` as ``init``; every ``modules_to_save``
  parameter becomes a :class:`jlora.FullWeight`. The result computes what
  ``PeftModel`` computes. ``params`` is not modified.

  Args:
    directory: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
      (a non-default adapter in its ``adapter_name`` sub-folder).
    params: the plain base params of the model the adapter was trained on.
    mapping: as in :func:`save_peft` (``None``: the built-in mapping that names
      every tensor).
    adapter_name: PEFT's adapter name, or a list of names: the adapters stacked
      into one tree (:func:`jlora.stack_adapters`, in that order).

  Returns:
    The wrapped tree.

  Raises:
    CheckpointError: a missing, truncated or corrupt file; ``adapter_config.json``
      with an unknown ``peft_type``, missing fields or features jlora does not
      implement (``fan_in_fan_out``, LoRA biases, DoRA embeddings, ...); a pickled
      ``adapter_model.bin`` only; tensor names the mapping does not know; shapes
      that do not fit the params or the config's ranks.

  Example:
    >>> import jlora
    >>> tree = jlora.load_peft("path/to/peft-adapter", params, mapping="llama")  # doctest: +SKIP
  """
  if isinstance(adapter_name, (tuple, list)):  # several adapters: one stacked tree
    from jlora._multi import stack_adapters  # noqa: PLC0415 - a cycle

    return stack_adapters([load_peft(directory, params, mapping=mapping, adapter_name=n)
                           for n in adapter_name], names=list(adapter_name))
  folder = _adapter_folder(directory, adapter_name)
  config = read_peft_config(folder)
  tensors = _read_tensors(folder)
  if config["peft_type"] in ("PROMPT_TUNING", "PREFIX_TUNING"):  # one tensor, no module names
    return PEFT_CODECS[config["peft_type"]].load(config, tensors, params, None,
                                                 str(folder / WEIGHTS_NAME))
  m = _resolve_mapping(mapping, params, torch_names=list(tensors))
  return PEFT_CODECS[config["peft_type"]].load(config, tensors, params, m, str(folder / WEIGHTS_NAME))


def read_peft_config(directory: str | os.PathLike) -> dict:
  """Reads and validates a PEFT ``adapter_config.json`` (LoRA only).

  Args:
    directory: the adapter folder.

  Returns:
    The config dict.

  Raises:
    CheckpointError: missing or invalid JSON, an unknown ``peft_type``, a missing
      required field (``r``, ``lora_alpha``, ``target_modules``, ``peft_type``),
      an invalid value, or a feature jlora does not implement.

  Example:
    >>> import jlora
    >>> jlora.read_peft_config("path/to/peft-adapter")["r"]  # doctest: +SKIP
    8
  """
  folder = Path(directory)
  if not folder.is_dir():
    raise CheckpointError(f"{folder} is not a directory; pass the folder holding {CONFIG_NAME} "
                          f"and {WEIGHTS_NAME}")
  f = safe_child(folder, CONFIG_NAME, what="PEFT config")
  if not f.is_file():
    raise CheckpointError(f"{folder} has no {CONFIG_NAME}; is it a PEFT adapter folder?")
  try:
    config = json.loads(f.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{f} is unreadable or not valid JSON: {e}") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{f} must hold a JSON object, got {type(config).__name__}")
  if "peft_type" not in config:
    raise CheckpointError(f"{f} lacks the required field(s) ['peft_type']; re-save the adapter with "
                          "PEFT, or add it")
  peft_type = config["peft_type"]
  if peft_type not in PEFT_CODECS:
    raise CheckpointError(f"{f}: peft_type {peft_type!r} is not supported; jlora reads "
                          f"{sorted(PEFT_CODECS)}")
  PEFT_CODECS[peft_type].validate(config, str(f))
  return config


def export_merged(directory: str | os.PathLike, tree: Any, config: Any, *, tokenizer: Any = None,
                  overwrite: bool = False, dtype: Any = None) -> Path:
  """Merges the adapters into the base and writes a plain Hugging Face model folder.

  ``jlora.merge(tree)`` then the model's own exporter: ``jlora.models.llama_io.save_llama``
  for a :class:`jlora.models.llama.LlamaConfig`, ``jlora.models.bert.save_bert_hf`` for a
  :class:`jlora.models.bert.BertConfig`. transformers loads the folder without PEFT.

  Args:
    directory: the output folder.
    tree: the wrapped tree.
    config: the model's config (``LlamaConfig`` or ``BertConfig``).
    tokenizer: a transformers tokenizer to save alongside, or None.
    overwrite: replace an existing folder.
    dtype: Llama only: the saved dtype (None keeps the params').

  Returns:
    The folder written.

  Raises:
    ModelError: a config type without an exporter, or the exporter's own errors.

  Example:
    >>> import jlora
    >>> jlora.export_merged("out/merged", tree, cfg)  # doctest: +SKIP
  """
  merged = _merge(tree)
  cls = type(config).__name__
  if cls == "LlamaConfig":
    from jlora.models.llama_io import save_llama  # noqa: PLC0415
    return Path(save_llama(directory, merged, config, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite))
  if cls == "BertConfig" and type(config).__module__.startswith("jlora"):
    from jlora.models.bert import save_bert_hf  # noqa: PLC0415
    if dtype is not None:
      merged = jax.tree.map(lambda x: jnp.asarray(x, dtype), merged)
    return Path(save_bert_hf(config, merged, tokenizer, directory, overwrite=overwrite))
  raise ModelError(f"export_merged has no exporter for {type(config).__module__}.{cls}; call "
                   "jlora.merge(tree) and write the plain params with your model's own exporter")


# ---------------------------------------------------------------------------------------------
# Private helpers.


def _merge(tree: Any) -> Any:
  from jlora._tree import merge  # noqa: PLC0415
  return merge(tree)


def _adapter_folder(directory: str | os.PathLike, adapter_name: str) -> Path:
  root = Path(directory)
  if adapter_name == "default":
    return root
  return safe_child(root, adapter_name, what="adapter")


def _resolve_mapping(mapping: Any, tree: Any, torch_names: list[str] | None = None) -> PeftMapping:
  if isinstance(mapping, PeftMapping):
    return mapping
  if isinstance(mapping, str):
    return peft_mapping(mapping, tree)
  if isinstance(mapping, Mapping):
    return PeftMapping(dict(mapping))
  if mapping is not None:
    raise CheckpointError(f"mapping must be a name, a dict or a jlora.PeftMapping, got "
                          f"{type(mapping).__name__}")
  candidates = [peft_mapping("llama"), peft_mapping("bert", tree)]
  if torch_names is not None:
    names = [_split_name(n)[0] for n in torch_names if n.startswith(_PREFIX)]
    for m in candidates:
      if names and all(m.from_torch(n) is not None for n in names):
        return m
    raise CheckpointError(
        "no built-in mapping names every tensor of this adapter (e.g. "
        f"{torch_names[:3]}); pass mapping=jlora.PeftMapping({{jlora module path: torch module name}})")
  modules = {p.rsplit("/", 1)[0] if "/" in p else "" for p, _ in _adapted(tree)}
  for m in candidates:
    if modules and all(mod in m.modules for mod in modules):
      return m
  raise CheckpointError(
      f"no built-in mapping names the adapted modules {sorted(modules)[:4]}; pass "
      "mapping=jlora.PeftMapping({jlora module path: torch module name, ...}) ('{i}' for the layer index)")


def _adapted(tree: Any) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapted)
  return [(path_str(kp), x) for kp, x in flat if is_adapted(x)]


def _split_path(path: str) -> tuple[str, str]:
  if "/" not in path:
    return "", path
  module, leaf = path.rsplit("/", 1)
  return module, leaf


def _split_name(key: str) -> tuple[str, str]:
  """``base_model.model.M.lora_A.weight`` -> (``M``, ``lora_A.weight``)."""
  name = key[len(_PREFIX):]
  for suffix in ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B",
                 "lora_magnitude_vector", "base_layer.weight", "base_layer.bias"):
    if name.endswith("." + suffix):
      return name[: -len(suffix) - 1], suffix
  module, _, param = name.rpartition(".")
  return module, param


def _host(x: Any) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _layers(x: np.ndarray, stacked: bool) -> list[tuple[int | None, np.ndarray]]:
  return [(i, x[i]) for i in range(x.shape[0])] if stacked else [(None, x)]


def _export(tree: Any, m: PeftMapping) -> tuple[dict, dict[str, np.ndarray]]:
  adapted = _adapted(tree)
  if not adapted:
    raise TreeError("the tree holds no adapters; wrap the params first: jlora.wrap(params, rules, key=...)")
  tensors: dict[str, np.ndarray] = {}
  lora_modules: dict[str, tuple[LoRA, list[str]]] = {}  # jlora module -> (spec, torch names)
  full_modules: list[str] = []
  for path, node in adapted:
    module, leaf = _split_path(path)
    if module not in m.modules:
      raise CheckpointError(
          f"the mapping has no torch name for jlora module {module!r} (of adapted leaf {path!r}); "
          f"add it: PeftMapping({{{module!r}: 'torch.module.name', ...}})")
    stacked = m.stacked(module)
    if node.kind == "full":
      if module not in full_modules:
        full_modules.append(module)
      continue
    if node.kind == "lora_init":  # PiSSA / OLoRA: PEFT's conversion to plain LoRA on the original base
      node = node.as_lora()
    if node.kind not in ("lora", "dora"):
      raise SpecError(f"{path!r} is a {type(node).__name__}; PEFT's LoRA format holds LoRA / DoRA "
                      "adapters and modules_to_save only")
    pname, linear = m.leaves.get(leaf, (None, None))
    if pname != "weight":
      raise SpecError(f"LoRA on {path!r}: PEFT has LoRA layers for Linear weights ('kernel' leaves) "
                      "and embeddings ('embedding' leaves) only; name the leaf in PeftMapping.leaves")
    if node.a is None or node.b is None:
      raise TreeError(f"the adapter at {path!r} lacks its factors; pass the whole tree")
    n_stack = len(node.axes.stack)
    if n_stack != (1 if stacked else 0):
      raise SpecError(
          f"LoRA on {path!r} has {n_stack} stacked axes but the mapping names it "
          f"{m.modules[module]!r} ({'one layer axis' if stacked else 'no layer axis'}); wrap it with "
          f"stack_axes={1 if stacked else 'None'} or fix the mapping")
    a, b = _host(node.a), _host(node.b)
    r = node.rank
    names = []
    for (i, al), (_, bl) in zip(_layers(a, stacked), _layers(b, stacked)):
      torch_name = m.to_torch(module, i)
      names.append(torch_name)
      ka, kb = (("lora_A.weight", "lora_B.weight") if linear
                else ("lora_embedding_A", "lora_embedding_B"))
      tensors[f"{_PREFIX}{torch_name}.{ka}"] = np.ascontiguousarray(al.reshape(-1, r).T)
      tensors[f"{_PREFIX}{torch_name}.{kb}"] = np.ascontiguousarray(bl.reshape(r, -1).T)
    if node.kind == "dora":
      if not linear:
        raise SpecError(f"DoRA on {path!r}: jlora writes DoRA for Linear weights ('kernel' leaves) "
                        "only; use jlora.LoRA for embeddings")
      if node.m is None:
        raise TreeError(f"the adapter at {path!r} lacks its magnitude 'm'; pass the whole tree")
      for name, (_, ml) in zip(names, _layers(_host(node.m), stacked)):
        tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(ml.reshape(-1))
    if module in lora_modules:
      raise SpecError(f"two LoRA leaves under torch module {m.modules[module]!r}; PEFT has one per module")
    lora_modules[module] = (node.spec, names)
  clash = sorted(set(lora_modules) & set(full_modules))
  if clash:
    raise SpecError(f"module {clash[0]!r} is both LoRA-adapted and trained in full; PEFT cannot "
                    "save a module in target_modules and modules_to_save at once")
  leaves_by_module = _leaves_by_module(tree)
  _full_tensors(full_modules, m, leaves_by_module, tensors)
  kinds = {"lora" if node.kind == "lora_init" else node.kind for _, node in adapted if node.kind != "full"}
  if len(kinds) > 1:
    raise SpecError("the tree mixes LoRA and DoRA adapters; PEFT stores one use_dora per adapter: "
                    "wrap every module with jlora.DoRA, or every one with jlora.LoRA")
  config = _config_for(lora_modules, full_modules, m, leaves_by_module)
  config["use_dora"] = kinds == {"dora"}
  return config, tensors


def _config_for(lora_modules: dict, full_modules: list[str], m: PeftMapping, leaves_by_module) -> dict:
  if not lora_modules:
    raise SpecError("PEFT's LoRA format needs at least one LoRA module (target_modules); the tree "
                    "only trains leaves in full")
  specs = [s for s, _ in lora_modules.values()]
  for field in ("rslora", "dropout"):
    values = {getattr(s, field) for s in specs}
    if len(values) > 1:
      raise SpecError(f"the adapters use different {field} values {sorted(values)}; PEFT stores one "
                      f"{'use_rslora' if field == 'rslora' else 'lora_dropout'} per adapter: use one value")
  ranks = collections.Counter(s.rank for s in specs)
  alphas = collections.Counter(_num(s.effective_alpha) for s in specs)
  r = ranks.most_common(1)[0][0]
  alpha = alphas.most_common(1)[0][0]
  short = _short_names(m, leaves_by_module)
  target_modules = _target_modules(set(lora_modules), m, short)

  def pattern(field_of, default) -> dict:
    # PEFT matches a key K against a module name N with re.match(rf"(.*\.)?({K})$", N), first key
    # first: a short name is safe when every LoRA module with that name has the same value.
    out = {}
    groups = collections.defaultdict(list)
    for mod in lora_modules:
      groups[short[mod]].append(mod)
    for name, mods in sorted(groups.items()):
      vals = {field_of(lora_modules[x][0]) for x in mods}
      if len(vals) == 1:
        v = vals.pop()
        if v != default:
          out[name] = v
        continue
      for x in sorted(mods):
        v = field_of(lora_modules[x][0])
        if v != default:
          out[m.regex(x)] = v
    return out

  rank_pattern = pattern(lambda s: s.rank, r)
  alpha_pattern = pattern(lambda s: _num(s.effective_alpha), alpha)
  inits = {s.init for s in specs}
  modules_to_save = _modules_to_save(full_modules, m, leaves_by_module)
  return {
      "peft_type": "LORA",
      "r": int(r),
      "lora_alpha": alpha,
      "target_modules": target_modules,
      "rank_pattern": rank_pattern,
      "alpha_pattern": alpha_pattern,
      "use_rslora": bool(specs[0].rslora),
      "lora_dropout": float(specs[0].dropout),
      "init_lora_weights": "gaussian" if inits == {"gaussian"} else True,
      "modules_to_save": modules_to_save,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_dora": False,
      "inference_mode": True,
      "layers_to_transform": None,
      "layers_pattern": None,
  }


def _leaves_by_module(tree: Any) -> dict[str, list[tuple[str, Any]]]:
  """jlora module path -> ``[(leaf name, leaf or adapter)]`` for every leaf of the tree."""
  out = collections.defaultdict(list)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_whole)
  for kp, x in flat:
    module, leaf = _split_path(path_str(kp))
    out[module].append((leaf, x))
  return out


def _full_tensors(full_modules: list[str], m: PeftMapping, leaves_by_module: dict,
                  tensors: dict[str, np.ndarray]) -> None:
  """Adds every parameter of each modules_to_save module to ``tensors`` (PEFT saves a whole copy)."""
  for module in full_modules:
    stacked = m.stacked(module)
    for leaf, x in leaves_by_module[module]:
      value = x.w if is_adapted(x) else x
      if (is_adapted(x) and x.kind != "full") or value is None or not hasattr(value, "shape"):
        raise TreeError(f"module {module!r} is in modules_to_save but its leaf {leaf!r} is "
                        f"{type(x).__name__ if value is not None else 'missing'}; pass the whole tree")
      if leaf not in m.leaves:
        raise CheckpointError(f"the mapping has no torch parameter name for leaf {leaf!r} of {module!r}; "
                              "add it to PeftMapping.leaves")
      pname, transpose = m.leaves[leaf]
      arr = _host(value)
      for i, part in _layers(arr, stacked):
        if transpose:
          if part.ndim != 2:
            raise SpecError(f"cannot export {module}/{leaf} of shape {arr.shape} as a torch Linear weight")
          part = part.T
        tensors[f"{_PREFIX}{m.to_torch(module, i)}.{pname}"] = np.ascontiguousarray(part)


def _short_names(m: PeftMapping, leaves_by_module: dict) -> dict[str, str]:
  """Every jlora module of the tree the mapping knows -> the last part of its torch name."""
  return {mod: m.modules[mod].rsplit(".", 1)[-1] for mod in leaves_by_module if mod in m.modules}


def _target_modules(chosen: set[str], m: PeftMapping, short: dict[str, str]) -> list[str] | str:
  """PEFT's ``target_modules`` for the jlora modules ``chosen``: short names when they select
  exactly those among the tree's known modules, else a full-match regular expression."""
  wanted = {short[c] for c in chosen}
  if {mod for mod, s in short.items() if s in wanted} == set(chosen):
    return sorted(wanted)
  return "|".join(f"(?:{m.regex(c)})" for c in sorted(chosen))


def _modules_to_save(full_modules: list[str], m: PeftMapping, leaves_by_module: dict) -> list[str] | None:
  """PEFT's ``modules_to_save`` for the modules trained in full (None when there are none)."""
  if not full_modules:
    return None
  # PEFT matches modules_to_save by plain suffix (name.endswith(entry)): a short name when no
  # other known module ends with it, else the full name of each module (each layer if stacked).
  known = [mod for mod in leaves_by_module if mod in m.modules]
  out = []
  for mod in full_modules:
    s = m.modules[mod].rsplit(".", 1)[-1]
    others = [m.modules[o].replace("{i}", "0") for o in known if o != mod]
    if m.stacked(mod):
      out += [m.to_torch(mod, i) for i in range(_layer_count(leaves_by_module[mod]))]
    elif any(o.endswith(s) for o in others):
      out.append(m.modules[mod])
    else:
      out.append(s)
  return out


def _layer_count(leaves: list) -> int:
  for _, x in leaves:
    v = x.w if is_adapted(x) else x
    if v is not None and hasattr(v, "shape") and len(v.shape):
      return int(v.shape[0])
  return 0


def _num(x: float) -> int | float:
  """An int when the value is integral (as PEFT writes alphas), else the float."""
  return int(x) if float(x).is_integer() else float(x)


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # noqa: PLC0415

  f = safe_child(folder, WEIGHTS_NAME, what="PEFT weights")
  if not f.is_file():
    if (folder / "adapter_model.bin").exists():
      raise CheckpointError(
          f"{folder} holds only adapter_model.bin, a pickle, which jlora never loads (it can run "
          "code); re-save the adapter with PEFT's save_pretrained(safe_serialization=True)")
    raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")
  out = {}
  try:
    with safe_open(str(f), framework="np") as h:
      for k in h.keys():
        out[k] = h.get_tensor(k)
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
    raise CheckpointError(f"{f} is truncated or corrupt ({_short(e)}); download or save the "
                          "adapter again") from None
  if not out:
    raise CheckpointError(f"{f} holds no tensors")
  return out


def _pattern_value(patterns: dict, name: str, default):
  for key, v in patterns.items():
    try:
      if re.match(rf"(.*\.)?({key})$", name):
        return v
    except re.error as e:
      raise CheckpointError(f"rank_pattern/alpha_pattern key {key!r} is not a valid regex: {e}") from None
  return default


def _plain_leaves(params: Any) -> tuple[list, Any, dict[str, int]]:
  """``(leaves, treedef, {path: position})`` of plain params (TreeError for a wrapped tree)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_whole)
  leaves = [x for _, x in flat]
  if any(is_adapted(x) for x in leaves):
    raise TreeError("load_peft needs the plain base params, not a wrapped tree; pass the params "
                    "you wrapped (or jlora.merge(tree) to stack a PEFT adapter on merged weights)")
  return leaves, treedef, {path_str(kp): i for i, (kp, _) in enumerate(flat)}


def _sort_tensors(where: str, config: dict, tensors: dict[str, np.ndarray], m: PeftMapping,
                  index: dict[str, int], kinds: tuple[str, ...]) -> tuple[list, dict]:
  """Splits a PEFT file's tensors into the method's and the modules_to_save parameters.

  Returns ``(adapter, full)``: ``adapter`` lists ``(torch module, kind, jlora module, layer,
  value)`` for every tensor whose kind (``_split_name``'s second part) is in ``kinds``; ``full``
  maps a jlora leaf path to ``{layer: (value, transpose)}``. PEFT's copies of a targeted base
  (``base_layer.*``) are skipped. Raises CheckpointError for a key without PEFT's prefix, names
  the mapping does not know, and full parameters of a module not in ``modules_to_save``.
  """
  modules_to_save = config.get("modules_to_save") or []
  adapter: list[tuple] = []
  full: dict[str, dict] = {}
  unknown = []
  for key, value in tensors.items():
    if not key.startswith(_PREFIX):
      raise CheckpointError(f"{where}: tensor {key!r} does not start with {_PREFIX!r}; it is not a "
                            "PEFT adapter file")
    torch_module, kind = _split_name(key)
    found = m.from_torch(torch_module)
    if found is None:
      unknown.append(key)
      continue
    module, layer = found
    if kind in kinds:
      adapter.append((torch_module, kind, module, layer, value))
    elif kind.startswith("base_layer."):
      continue  # PEFT's copy of a targeted embedding's base; see _check_base_layers
    else:
      leaf = next((k for k, (pn, _) in m.leaves.items() if pn == kind and
                   (f"{module}/{k}" if module else k) in index), None)
      if leaf is None:
        unknown.append(key)
        continue
      if not any(torch_module.endswith(t) for t in modules_to_save):
        raise CheckpointError(f"{where}: tensor {key!r} is a full parameter of {torch_module!r}, "
                              f"which is not in modules_to_save {modules_to_save}; the file and "
                              f"{CONFIG_NAME} disagree")
      path = f"{module}/{leaf}" if module else leaf
      full.setdefault(path, {})[layer] = (value, m.leaves[leaf][1])
  if unknown:
    raise CheckpointError(
        f"{where}: tensors {unknown[:3]}{' ...' if len(unknown) > 3 else ''} name torch modules the "
        "mapping does not know; pass mapping= for this model (jlora.PeftMapping({jlora module "
        "path: torch module name}))")
  return adapter, full


def _place_full(where: str, full: dict, m: PeftMapping, leaves: list, index: dict, out: list,
                adapted) -> None:
  """Puts :func:`_sort_tensors`' modules_to_save parameters into ``out`` as FullWeight leaves."""
  for path, layers in full.items():
    w = leaves[index[path]]
    if path in adapted:
      raise CheckpointError(f"{where}: {path!r} is both adapted and in modules_to_save")
    module, _ = _split_path(path)
    stacked = m.stacked(module)
    base = _host(w)
    value = base.copy()
    for layer, (arr, transpose) in layers.items():
      arr = arr.T if transpose and arr.ndim == 2 else arr
      tgt = base[layer] if stacked else base
      if arr.shape != tgt.shape:
        raise CheckpointError(f"{where}: modules_to_save tensor for {path!r} (layer {layer}) has shape "
                              f"{tuple(arr.shape)}, the params {tuple(tgt.shape)}")
      if stacked:
        value[layer] = arr.astype(base.dtype)
      else:
        value = arr.astype(base.dtype)
    out[index[path]] = FullWeight(jnp.asarray(value))


_LORA_KINDS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B",
               "lora_magnitude_vector")


def _import(where: str, config: dict, tensors: dict[str, np.ndarray], params: Any,
            m: PeftMapping) -> Any:
  leaves, treedef, index = _plain_leaves(params)
  adapter, full = _sort_tensors(where, config, tensors, m, index, _LORA_KINDS)
  lora: dict[str, dict] = {}  # jlora leaf path -> {"A": {layer: arr}, "B": {...}, "module", "torch"}
  for torch_module, kind, module, layer, value in adapter:
    if kind == "lora_magnitude_vector":  # DoRA: a Linear's magnitude, shape (out,)
      leaf = next((k for k, (pn, tr) in m.leaves.items() if pn == "weight" and tr and
                   (f"{module}/{k}" if module else k) in index), "kernel")
      path = f"{module}/{leaf}" if module else leaf
      slot = lora.setdefault(path, {"A": {}, "B": {}, "module": module, "torch": torch_module})
      slot.setdefault("M", {})[layer] = value
      continue
    linear = kind in ("lora_A.weight", "lora_B.weight")
    leaf = next((k for k, (pn, tr) in m.leaves.items() if pn == "weight" and tr == linear and
                 (f"{module}/{k}" if module else k) in index), "kernel" if linear else "embedding")
    path = f"{module}/{leaf}" if module else leaf
    slot = lora.setdefault(path, {"A": {}, "B": {}, "module": module, "torch": torch_module})
    slot["A" if kind in ("lora_A.weight", "lora_embedding_A") else "B"][layer] = value
  if not lora:
    raise CheckpointError(f"{where} holds no lora_A / lora_B tensors")
  rank_pattern = config.get("rank_pattern") or {}
  alpha_pattern = config.get("alpha_pattern") or {}
  use_dora = bool(config.get("use_dora", False))
  for path, slot in lora.items():
    got = set(slot.get("M", {}))
    if use_dora and got != set(slot["A"]):
      raise CheckpointError(
          f"{where}: {CONFIG_NAME} says use_dora=true but {slot['torch']!r} has lora_magnitude_vector "
          f"for layers {sorted(got, key=str)} and lora_A for {sorted(slot['A'], key=str)}; the file is "
          "incomplete")
    if not use_dora and got:
      raise CheckpointError(
          f"{where}: {slot['torch']!r} has a lora_magnitude_vector (a DoRA tensor) but {CONFIG_NAME} "
          "says use_dora=false; the config and the weights disagree")
  out = list(leaves)
  for path, slot in lora.items():
    if path not in index:
      raise CheckpointError(f"{where}: PEFT module {slot['torch']!r} maps to {path!r}, which the "
                            "params do not have; is the adapter for this model?")
    w = leaves[index[path]]
    if not hasattr(w, "shape"):
      raise CheckpointError(f"{where}: params leaf {path!r} is not an array")
    module = slot["module"]
    stacked = m.stacked(module)
    if set(slot["A"]) != set(slot["B"]):
      raise CheckpointError(f"{where}: {slot['torch']!r} has lora_A for layers {sorted(slot['A'], key=str)} "
                            f"but lora_B for {sorted(slot['B'], key=str)}; the file is incomplete")
    example = next(iter(slot["A"].values()))
    rank = int(example.shape[0]) if example.ndim == 2 else -1
    torch_name = m.to_torch(module, 0 if stacked else None)
    want_rank = _pattern_value(rank_pattern, torch_name, config["r"])
    alpha = float(_pattern_value(alpha_pattern, torch_name, config["lora_alpha"]))
    if rank != want_rank:
      raise CheckpointError(f"{where}: {slot['torch']}.lora_A has rank {rank} but {CONFIG_NAME} says "
                            f"{want_rank} (r / rank_pattern); the config and the weights disagree")
    dtype = jnp.result_type(example.dtype)
    spec_dtype = None if dtype == _adapter_dtype(LoRA(rank), w.dtype) else jnp.dtype(dtype).name
    if use_dora and not m.leaves.get(path.rpartition("/")[2], ("", False))[1]:
      raise CheckpointError(f"{where}: {slot['torch']!r} is a DoRA embedding, which jlora does not "
                            "read (DoRA is supported on Linear weights); convert it with PEFT's "
                            "merge_and_unload first")
    try:
      spec = (DoRA if use_dora else LoRA)(
          rank, alpha=None if alpha == rank else alpha, dropout=config.get("lora_dropout", 0.0),
                  init="gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming",
                  rslora=bool(config.get("use_rslora", False)), dtype=spec_dtype,
                  stack_axes=1 if stacked else None)
      axes = infer_axes(path, tuple(w.shape), spec)
    except (SpecError, ValueError) as e:
      raise CheckpointError(
          f"{where}: cannot place the adapter of {slot['torch']!r} on {path!r}: {e}") from None
    shape = tuple(w.shape)
    n_layers = shape[0] if stacked else 1
    in_shape = tuple(shape[i] for i in axes.inputs)
    out_shape = tuple(shape[i] for i in axes.outputs)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    a = np.zeros(((n_layers,) if stacked else ()) + in_shape + (rank,), dtype)
    b = np.zeros(((n_layers,) if stacked else ()) + (rank,) + out_shape, dtype)
    for layer in slot["A"]:
      A, B = slot["A"][layer], slot["B"][layer]
      if A.shape != (rank, n_in) or B.shape != (n_out, rank):
        raise CheckpointError(
            f"{where}: {m.to_torch(module, layer)} has lora_A {tuple(A.shape)} and lora_B "
            f"{tuple(B.shape)}, but {path!r} of shape {shape} needs ({rank}, {n_in}) and ({n_out}, {rank})")
      if stacked and not 0 <= layer < n_layers:
        raise CheckpointError(f"{where}: layer {layer} of {slot['torch']!r} is outside the params' "
                              f"{n_layers} layers; is the adapter for this model?")
      A = A.astype(dtype)
      B = B.astype(dtype)
      tgt = (layer,) if stacked else ()
      a[tgt] = A.T.reshape(in_shape + (rank,))
      b[tgt] = B.T.reshape((rank,) + out_shape)
    if not use_dora:
      out[index[path]] = LoraWeight(w, jnp.asarray(a), jnp.asarray(b), spec=spec, axes=axes)
      continue
    mag = np.zeros(((n_layers,) if stacked else ()) + out_shape, dtype)
    for layer, M in slot["M"].items():
      if M.shape != (n_out,):
        raise CheckpointError(f"{where}: {m.to_torch(module, layer)}.lora_magnitude_vector has shape "
                              f"{tuple(M.shape)}, but {path!r} of shape {shape} needs ({n_out},)")
      mag[(layer,) if stacked else ()] = M.astype(dtype).reshape(out_shape)
    out[index[path]] = DoraWeight(w=w, a=jnp.asarray(a), b=jnp.asarray(b), m=jnp.asarray(mag), spec=spec,
                                  axes=axes, shape=shape)
  _place_full(where, full, m, leaves, index, out, lora)
  _check_base_layers(tensors, m, leaves, index, where)
  return jax.tree_util.tree_unflatten(treedef, out)


def _check_base_layers(tensors: dict, m: PeftMapping, leaves: list, index: dict, where: str) -> None:
  """PEFT saves a targeted embedding's base too; it must be the params' (else it was resized)."""
  for key, value in tensors.items():
    torch_module, kind = _split_name(key)
    if not kind.startswith("base_layer."):
      continue
    found = m.from_torch(torch_module)
    if found is None:
      continue
    module, layer = found
    param = kind.split(".", 1)[1]
    leaf = next((k for k, (pn, _) in m.leaves.items() if pn == param and
                 (f"{module}/{k}" if module else k) in index), None)
    if leaf is None:
      continue
    base = _host(leaves[index[f"{module}/{leaf}" if module else leaf]])
    if layer is not None:
      base = base[layer]
    if m.leaves[leaf][1] and base.ndim == 2:
      base = base.T
    if base.shape != value.shape or not np.array_equal(base.astype(np.float32), value.astype(np.float32)):
      raise CheckpointError(
          f"{where}: {key} (PEFT's saved copy of the base weight) differs from the params' "
          f"{module}/{leaf}: the adapter was trained on another base or with a resized vocabulary")


# ---------------------------------------------------------------------------------------------
# The LoRA codec.


def _validate_lora(config: dict, f: str) -> None:
  missing = [k for k in _REQUIRED if k not in config]
  if missing:
    raise CheckpointError(f"{f} lacks the required field(s) {missing}; a PEFT LoRA config needs "
                          f"{list(_REQUIRED)}: re-save the adapter with PEFT, or add them")
  r = config["r"]
  if isinstance(r, bool) or not isinstance(r, int) or r < 1:
    raise CheckpointError(f"{f}: r must be a positive int, got {r!r}")
  if isinstance(config["lora_alpha"], bool) or not isinstance(config["lora_alpha"], (int, float)) \
      or not config["lora_alpha"] > 0:
    raise CheckpointError(f"{f}: lora_alpha must be a positive number, got {config['lora_alpha']!r}")
  tm = config["target_modules"]
  if not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
    raise CheckpointError(f"{f}: target_modules must be a list of names or a regex string, got {tm!r}")
  for field in ("rank_pattern", "alpha_pattern"):
    v = config.get(field) or {}
    if not isinstance(v, dict) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                          and x > 0 for x in v.values()):
      raise CheckpointError(f"{f}: {field} must map patterns to positive numbers, got {v!r}")
  if config.get("use_dora") not in (True, False, None):
    raise CheckpointError(f"{f}: use_dora must be true or false, got {config['use_dora']!r}")
  for field, ok in _UNSUPPORTED.items():
    if field in config and config[field] not in ok:
      raise CheckpointError(f"{f}: {field}={config[field]!r} is not supported by jlora (it reads "
                            f"plain LoRA: {field} must be {ok[0]!r})")
  init = config.get("init_lora_weights", True)
  if init not in (True, False, "gaussian"):
    raise CheckpointError(
        f"{f}: init_lora_weights={init!r} is not supported: it rewrites the base weights at init "
        "(PiSSA, OLoRA, LoftQ, ...) or needs data; convert the adapter to plain LoRA with PEFT first: "
        "save it with save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter saved "
        "right after init>) (PiSSA / OLoRA), then load `out`")
  dropout = config.get("lora_dropout", 0.0)
  if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise CheckpointError(f"{f}: lora_dropout must be in [0, 1), got {dropout!r}")
  # layers_to_transform, layers_pattern and exclude_modules only select modules: the tensors in
  # the file say which modules are adapted.
  mts = config.get("modules_to_save")
  if mts is not None and not (isinstance(mts, list) and all(isinstance(x, str) for x in mts)):
    raise CheckpointError(f"{f}: modules_to_save must be a list of module names or null, got {mts!r}")


def _load_lora(config, tensors, params, m, where):
  return _import(where, config, tensors, params, m)


register_codec(PeftCodec("LORA", ("lora", "lora_init", "dora"), _validate_lora, _load_lora,
                         lambda tree, m: _export(tree, m)))
