"""Prompt tuning: a trained soft prompt placed before every input (Lester et al., 2021; PEFT).

A soft prompt is ``N`` embedding vectors that the model reads before the
tokens of every row; only they train. In jlora it is an entry of the params
tree, ``params["prompt"] = {"embedding": (N, D)}``, trained in full (a
:class:`jlora.FullWeight`), so ``split``, the optimizer, checkpoints and
``make_train_step`` treat it like any other trainable leaf, and the model
function decides what it means:

* the shipped Llama reads it as its documented soft-prompt input
  (:mod:`jlora.models.llama`): prepended to the token embeddings, always
  attended to, at positions ``0 .. N-1``; the logits of the virtual positions
  are sliced off; generation writes it to the KV cache in the prefill;
* any other model: :func:`prepend_prompt` turns a function of input
  embeddings into one that puts the soft prompt first.

PEFT's format (``peft_type: "PROMPT_TUNING"``): one tensor ``prompt_embeddings``
``(N * num_transformer_submodules, token_dim)`` (``num_transformer_submodules``
is 1 for decoders), ``num_virtual_tokens``, ``token_dim`` and
``prompt_tuning_init`` in the config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlora._errors import CheckpointError, SpecError, TreeError
from jlora._methods.lora import FullWeight

__all__ = ["PromptTuning", "PrefixTuning", "add_prompt", "add_prefix", "prepend_prompt", "PROMPT_KEY",
           "PREFIX_KEY"]

#: the params entry that holds the soft prompt: ``params[PROMPT_KEY]["embedding"]``
PROMPT_KEY = "prompt"
#: the params entry that holds a prefix: ``params[PREFIX_KEY]["embedding"]`` ``(N, L, 2, K, hd)``
PREFIX_KEY = "prefix"
_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
#: where each shipped family keeps its token embeddings
_EMBEDDINGS = (("embed_tokens", "embedding"), ("embeddings", "word_embeddings", "embedding"))


@dataclasses.dataclass(frozen=True)
class PromptTuning:
  """The spec of a soft prompt (PEFT's ``PromptTuningConfig``).

  Attributes:
    num_virtual_tokens: ``N``, the soft prompt's length.
    init: ``"random"`` (``N(0, 1)``, torch's ``nn.Embedding`` init, PEFT's
      ``RANDOM``), ``"vocab"`` (the embeddings of ``N`` token ids drawn
      uniformly, PEFT's ``SAMPLE_VOCAB``) or ``"text"`` (the embeddings of
      ``text_ids`` repeated / cut to ``N``, PEFT's ``TEXT``).
    text_ids: the token ids of the init text (``init="text"``; tokenize it
      with the model's tokenizer, as PEFT does with ``prompt_tuning_init_text``).

  Example:
    >>> import jlora
    >>> jlora.PromptTuning(8, init="vocab").num_virtual_tokens
    8
  """

  num_virtual_tokens: int
  init: str = "random"
  text_ids: tuple[int, ...] | None = None

  def __post_init__(self):
    n = self.num_virtual_tokens
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise SpecError(f"PromptTuning num_virtual_tokens must be a positive integer, got {n!r}")
    object.__setattr__(self, "num_virtual_tokens", int(n))
    if self.init not in _INITS:
      raise SpecError(f"PromptTuning init must be one of {sorted(_INITS)}, got {self.init!r}")
    if self.init == "text":
      if not self.text_ids:
        raise SpecError("PromptTuning(init='text') needs text_ids: the init text's token ids "
                        "(tokenizer(text)['input_ids'])")
    if self.text_ids is not None:
      object.__setattr__(self, "text_ids", tuple(int(i) for i in self.text_ids))


def _embedding_table(params: Any, path: str | None) -> tuple[str, Any]:
  if path is not None:
    node = params
    for part in path.split("/"):
      if not isinstance(node, dict) or part not in node:
        raise TreeError(f"add_prompt: params have no {path!r} (embedding_path)")
      node = node[part]
    return path, node
  for parts in _EMBEDDINGS:
    node = params
    for part in parts:
      node = node.get(part) if isinstance(node, dict) else None
    if node is not None:
      return "/".join(parts), node
  raise TreeError("add_prompt: the model has no token-embedding table jlora knows "
                  "('embed_tokens/embedding' for Llama, 'embeddings/word_embeddings/embedding' "
                  "for BERT); prompt tuning needs a model that takes input embeddings: pass "
                  "embedding_path=..., or use jlora.prepend_prompt on your own model function")


def add_prompt(params: Any, spec: PromptTuning, *, key: jax.Array,
               embedding_path: str | None = None) -> Any:
  """A copy of ``params`` with a trainable soft prompt at ``params["prompt"]["embedding"]``.

  The prompt is a :class:`jlora.FullWeight` of shape ``(N, D)`` (``D`` the
  token-embedding width) initialised as ``spec.init`` says; everything else
  stays as it was (plain: frozen; wrapped: adapters keep training too).
  ``params`` is not modified.

  Args:
    params: the model's params (plain, or a wrapped tree: prompt tuning then
      trains next to the adapters).
    spec: a :class:`PromptTuning`.
    key: PRNG key of the init.
    embedding_path: the token-embedding table's path; default the shipped
      Llama's / BERT's.

  Raises:
    TreeError: no embedding table (the model takes no input embeddings), or
      the params already hold a prompt.

  Example:
    >>> import jax, jlora
    >>> from jlora.models.llama import LlamaConfig, init_llama, llama_forward
    >>> cfg = LlamaConfig(64, 32, 64, 2, 4, 2)
    >>> params = init_llama(cfg, jax.random.key(0))
    >>> tree = jlora.add_prompt(params, jlora.PromptTuning(4, init="vocab"), key=jax.random.key(1))
    >>> tree["prompt"]["embedding"].w.shape, llama_forward(jlora.merge(tree), jax.numpy.ones((1, 3), int), cfg).shape
    ((4, 32), (1, 3, 64))
  """
  if not isinstance(spec, PromptTuning):
    raise SpecError(f"add_prompt takes a jlora.PromptTuning, got {type(spec).__name__}")
  if not isinstance(params, dict):
    raise TreeError("add_prompt needs a dict params tree (the model's params)")
  if PROMPT_KEY in params or PREFIX_KEY in params:
    raise TreeError("the params already hold a soft prompt or a prefix; remove it first")
  _, table = _embedding_table(params, embedding_path)
  table = table.w if isinstance(table, FullWeight) else getattr(table, "w", table)
  vocab, dim = table.shape
  n = spec.num_virtual_tokens
  if spec.init == "random":
    emb = jax.random.normal(key, (n, dim), jnp.float32)
  else:
    if spec.init == "vocab":
      ids = jax.random.randint(key, (n,), 0, vocab)
    else:
      text = list(spec.text_ids)
      if max(text) >= vocab or min(text) < 0:
        raise SpecError(f"PromptTuning text_ids hold ids outside the vocabulary [0, {vocab})")
      ids = jnp.asarray((text * math.ceil(n / len(text)))[:n])
    emb = jnp.take(jnp.asarray(table), ids, axis=0).astype(jnp.float32)
  return {**params, PROMPT_KEY: {"embedding": FullWeight(emb)}}


@dataclasses.dataclass(frozen=True)
class PrefixTuning:
  """The spec of a prefix (PEFT's ``PrefixTuningConfig`` without ``prefix_projection``).

  ``N`` trained keys and values per layer, which every token attends to as if
  they were ``N`` earlier tokens (Li & Liang, 2021). Initialised ``N(0, 1)``
  (torch's ``nn.Embedding``, as PEFT).

  Attributes:
    num_virtual_tokens: ``N``.

  Example:
    >>> import jlora
    >>> jlora.PrefixTuning(10).num_virtual_tokens
    10
  """

  num_virtual_tokens: int

  def __post_init__(self):
    n = self.num_virtual_tokens
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise SpecError(f"PrefixTuning num_virtual_tokens must be a positive integer, got {n!r}")
    object.__setattr__(self, "num_virtual_tokens", int(n))


def add_prefix(params: Any, spec: PrefixTuning, *, key: jax.Array, config: Any) -> Any:
  """A copy of ``params`` with a trainable prefix at ``params["prefix"]["embedding"]``.

  The prefix is a :class:`jlora.FullWeight` of shape ``(N, L, 2, K, hd)``:
  per layer ``N`` keys and ``N`` values for every key/value head (see
  :mod:`jlora.models.llama`), read by :func:`jlora.models.llama.llama_forward`
  and written to the KV cache by :func:`jlora.generate.generate`. ``params``
  is not modified.

  Args:
    params: a Llama params tree (plain or wrapped).
    spec: a :class:`PrefixTuning`.
    key: PRNG key of the ``N(0, 1)`` init.
    config: the model's :class:`jlora.models.llama.LlamaConfig` (layers, kv heads, head size).

  Raises:
    TreeError: not a Llama params tree, or it already holds a prompt / prefix.

  Example:
    >>> import jax, jlora
    >>> from jlora.models.llama import LlamaConfig, init_llama
    >>> cfg = LlamaConfig(64, 32, 64, 2, 4, 2)
    >>> params = init_llama(cfg, jax.random.key(0))
    >>> jlora.add_prefix(params, jlora.PrefixTuning(3), key=jax.random.key(1), config=cfg)["prefix"]["embedding"].w.shape
    (3, 2, 2, 2, 8)
  """
  if not isinstance(spec, PrefixTuning):
    raise SpecError(f"add_prefix takes a jlora.PrefixTuning, got {type(spec).__name__}")
  if not isinstance(params, dict) or "layers" not in params or "embed_tokens" not in params:
    raise TreeError("add_prefix: the params are not a Llama tree (no 'layers' / 'embed_tokens'); "
                    "prefix tuning needs the shipped decoder, whose KV cache path takes the prefix")
  if PREFIX_KEY in params or PROMPT_KEY in params:
    raise TreeError("the params already hold a soft prompt or a prefix; remove it first")
  shape = (spec.num_virtual_tokens, config.num_layers, 2, config.num_kv_heads, config.head_dim)
  return {**params, PREFIX_KEY: {"embedding": FullWeight(jax.random.normal(key, shape, jnp.float32))}}


def prepend_prompt(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Prompt tuning for any model that takes input embeddings.

  ``fn(params, inputs_embeds, attention_mask, *args, **kw)`` becomes
  ``g(params, prompt, inputs_embeds, attention_mask, *args, **kw)``, which
  calls ``fn`` with ``prompt`` (``(N, D)``) before every row and the mask
  extended by ``N`` ones. What ``fn`` returns for the ``N`` virtual positions
  is returned too (slice it off as your model needs).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> f = lambda p, e, m: (e * m[..., None]).sum(1) @ p
    >>> g = jlora.prepend_prompt(f)
    >>> g(jnp.eye(2), jnp.ones((3, 2)), jnp.zeros((1, 4, 2)), jnp.ones((1, 4))).tolist()
    [[3.0, 3.0]]
  """

  def g(params, prompt, inputs_embeds, attention_mask, *args, **kw):
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[-1] != inputs_embeds.shape[-1]:
      raise TreeError(f"the soft prompt has shape {prompt.shape}; it must be (N, "
                      f"{inputs_embeds.shape[-1]}) for inputs_embeds {inputs_embeds.shape}")
    b = inputs_embeds.shape[0]
    p = jnp.broadcast_to(prompt.astype(inputs_embeds.dtype)[None], (b,) + prompt.shape)
    mask = jnp.concatenate([jnp.ones((b, prompt.shape[0]), jnp.asarray(attention_mask).dtype),
                            attention_mask], axis=1)
    return fn(params, jnp.concatenate([p, inputs_embeds], axis=1), mask, *args, **kw)

  return g


def prompt_of(tree: Any, key: str = PROMPT_KEY):
  """The tree's soft prompt (``key=PREFIX_KEY``: prefix) as a host array, or None."""
  if not isinstance(tree, dict) or key not in tree:
    return None
  x = tree[key].get("embedding") if isinstance(tree[key], dict) else None
  if x is None:
    return None
  return np.asarray(jax.device_get(getattr(x, "w", x)))


# -- PEFT's format -----------------------------------------------------------------------------


def _check_learned(config: dict, f: str, what: str, required: tuple[str, ...], reads: str) -> None:
  """The checks PEFT's prompt and prefix configs share: required fields, one transformer stack."""
  missing = [k for k in required if k not in config]
  if missing:
    raise CheckpointError(f"{f} lacks the required field(s) {missing}; re-save the adapter with PEFT")
  subs = config.get("num_transformer_submodules", 1)
  if subs not in (1, None):
    raise CheckpointError(f"{f}: num_transformer_submodules={subs} (an encoder-decoder's {what}); "
                          f"jlora reads {what} tuning for {reads} (1)")


def _the_embeddings(tensors: dict, where: str, what: str) -> np.ndarray:
  """The one tensor a PEFT prompt / prefix file holds."""
  if set(tensors) != {"prompt_embeddings"}:
    raise CheckpointError(f"{where} holds {sorted(tensors)[:4]}; PEFT's {what} tuning holds exactly "
                          "'prompt_embeddings'")
  return np.asarray(tensors["prompt_embeddings"])


def _validate(config: dict, f: str) -> None:
  _check_learned(config, f, "prompt", ("num_virtual_tokens", "token_dim"), "decoders and encoders")


def load_prompt(config: dict, tensors: dict, params: Any, where: str) -> Any:
  """PEFT's ``prompt_embeddings`` as ``params["prompt"]`` (a :class:`jlora.FullWeight`)."""
  _validate(config, where)
  emb = _the_embeddings(tensors, where, "prompt")
  n, d = config["num_virtual_tokens"], config["token_dim"]
  if emb.shape != (n, d):
    raise CheckpointError(f"{where}: prompt_embeddings has shape {emb.shape}, the config says "
                          f"({n}, {d}) (num_virtual_tokens, token_dim)")
  _, table = _embedding_table(params, None)
  if table.shape[-1] != d:
    raise CheckpointError(f"{where}: the soft prompt is {d} wide but the model's embeddings are "
                          f"{table.shape[-1]}; is the adapter for this model?")
  if not isinstance(params, dict) or PROMPT_KEY in params:
    raise CheckpointError(f"{where}: the params already hold a soft prompt (params['prompt'])")
  return {**params, PROMPT_KEY: {"embedding": FullWeight(jnp.asarray(emb, jnp.float32))}}


def save_prompt(tree: Any) -> tuple[dict, dict]:
  """``(config, tensors)`` of PEFT's prompt tuning for a tree whose only trained leaf is the prompt."""
  emb = prompt_of(tree)
  if emb is None:
    raise SpecError("the tree holds no soft prompt (params['prompt'], jlora.add_prompt)")
  layers = tree.get("layers", {})
  some = jax.tree.leaves(layers)
  num_layers = int(some[0].shape[0]) if some and not isinstance(layers, list) else (
      len(layers) if isinstance(layers, list) else None)
  config = {
      "peft_type": "PROMPT_TUNING",
      "task_type": "CAUSAL_LM" if "embed_tokens" in tree else None,
      "num_virtual_tokens": int(emb.shape[0]),
      "token_dim": int(emb.shape[1]),
      "num_transformer_submodules": 1,
      "num_layers": num_layers,
      "num_attention_heads": None,
      "prompt_tuning_init": "RANDOM",
      "prompt_tuning_init_text": None,
      "tokenizer_name_or_path": None,
      "tokenizer_kwargs": None,
      "inference_mode": True,
      "modules_to_save": None,
  }
  return config, {"prompt_embeddings": np.ascontiguousarray(emb.astype(np.float32))}


def _validate_prefix(config: dict, f: str) -> None:
  _check_learned(config, f, "prefix", ("num_virtual_tokens", "token_dim", "num_layers"), "decoders")


def load_prefix(config: dict, tensors: dict, params: Any, where: str) -> Any:
  """PEFT's prefix ``prompt_embeddings`` ``(N, L*2*token_dim)`` as ``params["prefix"]``.

  ``token_dim`` is ``K * hd`` and ``num_attention_heads`` is ``K`` (the kv
  heads). A file written with ``prefix_projection=True`` holds the projected
  prefix (PEFT saves the projection's output), so it loads as a plain prefix.
  """
  _validate_prefix(config, where)
  emb = _the_embeddings(tensors, where, "prefix")
  n, layers, width = config["num_virtual_tokens"], config["num_layers"], config["token_dim"]
  heads = config.get("num_attention_heads")
  if not isinstance(heads, int) or heads <= 0 or width % heads:
    raise CheckpointError(f"{where}: num_attention_heads={heads!r} does not divide token_dim={width}")
  if emb.shape != (n, layers * 2 * width):
    raise CheckpointError(f"{where}: prompt_embeddings has shape {emb.shape}, the config says "
                          f"({n}, {layers} * 2 * {width})")
  try:
    k = params["layers"]["self_attn"]["k_proj"]["kernel"]
    have = (int(k.shape[0]), int(k.shape[-1]))
  except (KeyError, TypeError):
    raise CheckpointError(f"{where}: prefix tuning needs a Llama params tree (layers/self_attn/"
                          "k_proj)") from None
  if have != (layers, width):
    raise CheckpointError(f"{where}: the prefix is for {layers} layers of {width} key/value features; "
                          f"the model has {have[0]} of {have[1]}; is the adapter for this model?")
  if PREFIX_KEY in params or PROMPT_KEY in params:
    raise CheckpointError(f"{where}: the params already hold a soft prompt or prefix")
  emb = emb.reshape(n, layers, 2, heads, width // heads)
  return {**params, PREFIX_KEY: {"embedding": FullWeight(jnp.asarray(emb, jnp.float32))}}


def save_prefix(tree: Any) -> tuple[dict, dict]:
  emb = prompt_of(tree, PREFIX_KEY)
  if emb is None or emb.ndim != 5 or emb.shape[2] != 2:
    raise SpecError(f"the prefix has shape {None if emb is None else emb.shape}; it must be "
                    "(N, L, 2, K, hd) (jlora.add_prefix)")
  n, layers, _, heads, hd = emb.shape
  config = {
      "peft_type": "PREFIX_TUNING",
      "task_type": "CAUSAL_LM",
      "num_virtual_tokens": int(n),
      "token_dim": int(heads * hd),
      "num_layers": int(layers),
      "num_attention_heads": int(heads),
      "num_transformer_submodules": 1,
      "prefix_projection": False,
      "encoder_hidden_size": int(heads * hd),
      "inference_mode": True,
      "modules_to_save": None,
  }
  return config, {"prompt_embeddings": np.ascontiguousarray(emb.reshape(n, -1).astype(np.float32))}


def _register_codec() -> None:
  from jlora import _peft  # noqa: PLC0415

  _peft.register_codec(_peft.PeftCodec(
      "PROMPT_TUNING", (), _validate, lambda config, tensors, params, m, where: load_prompt(
          config, tensors, params, where), lambda tree, m: save_prompt(tree)))
  _peft.register_codec(_peft.PeftCodec(
      "PREFIX_TUNING", (), _validate_prefix, lambda config, tensors, params, m, where: load_prefix(
          config, tensors, params, where), lambda tree, m: save_prefix(tree)))


_register_codec()
