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
``prompt_tuning_init`` in the config. Sequence classification (``task_type:
"SEQ_CLS"``) also trains and saves the classification head, as
``base_model.classifier.weight`` / ``.bias`` (``modules_to_save``); jlora reads
and writes them as the ``classifier`` leaves.
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

__all__ = ["PromptTuning", "PrefixTuning", "add_prompt", "add_prefix", "prepend_prompt", "prepend_prefix",
           "project_prefix",
           "PROMPT_KEY", "PREFIX_KEY"]

#: the params entry that holds the soft prompt: ``params[PROMPT_KEY]["embedding"]``
PROMPT_KEY = "prompt"
#: the params entry that holds a prefix: ``params[PREFIX_KEY]["embedding"]`` ``(N, L, 2, K, hd)``, or
#: ``(N, K*hd)`` plus ``params[PREFIX_KEY]["projection"]`` (:func:`project_prefix`)
PREFIX_KEY = "prefix"
#: the leaves of a prefix projection (PEFT's ``prefix_projection=True`` MLP)
_PROJECTION = ("w1", "b1", "w2", "b2")
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
  """The spec of a prefix (PEFT's ``PrefixTuningConfig``).

  ``N`` trained keys and values per layer, which every token attends to as if
  they were ``N`` earlier tokens (Li & Liang, 2021).

  Attributes:
    num_virtual_tokens: ``N``.
    projection: ``None`` (default): the keys and values are trained directly,
      initialised ``N(0, 1)`` (torch's ``nn.Embedding``, as PEFT). An int
      ``H``: PEFT's ``prefix_projection=True`` with ``encoder_hidden_size=H``:
      ``N`` embeddings of width ``K * hd`` go through a two-layer MLP
      (``Linear(K*hd, H)``, ``tanh``, ``Linear(H, L*2*K*hd)``) that gives the
      keys and values (:func:`project_prefix`); the embeddings and the MLP
      train, and only the MLP's output is what the model reads.

  Example:
    >>> import jlora
    >>> jlora.PrefixTuning(10).num_virtual_tokens, jlora.PrefixTuning(10, projection=64).projection
    (10, 64)
  """

  num_virtual_tokens: int
  projection: int | None = None

  def __post_init__(self):
    n = self.num_virtual_tokens
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise SpecError(f"PrefixTuning num_virtual_tokens must be a positive integer, got {n!r}")
    object.__setattr__(self, "num_virtual_tokens", int(n))
    h = self.projection
    if h is not None:
      if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1:
        raise SpecError(f"PrefixTuning projection must be None (no projection) or the MLP's hidden "
                        f"size, a positive integer (PEFT's encoder_hidden_size), got {h!r}")
      object.__setattr__(self, "projection", int(h))


def add_prefix(params: Any, spec: PrefixTuning, *, key: jax.Array, config: Any) -> Any:
  """A copy of ``params`` with a trainable prefix at ``params["prefix"]``.

  Without a projection the prefix is ``{"embedding": (N, L, 2, K, hd)}``: per
  layer ``N`` keys and ``N`` values for every key/value head (see
  :mod:`jlora.models.llama`). With ``spec.projection=H`` it is
  ``{"embedding": (N, K*hd), "projection": {"w1": (K*hd, H), "b1": (H,),
  "w2": (H, L, 2, K, hd), "b2": (L, 2, K, hd)}}``, initialised as torch
  initialises PEFT's ``PrefixEncoder`` (embedding ``N(0, 1)``, each Linear
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), and :func:`project_prefix` maps it to
  the keys and values. Every array is a :class:`jlora.FullWeight`.
  :func:`jlora.models.llama.llama_forward` reads either, and
  :func:`jlora.generate.generate` writes it to the KV cache. ``params`` is not
  modified.

  Args:
    params: a Llama or BERT params tree (plain or wrapped).
    spec: a :class:`PrefixTuning`.
    key: PRNG key of the init.
    config: the model's :class:`jlora.models.llama.LlamaConfig` (layers, kv heads,
      head size), or a BERT model / its :class:`jlora.models.bert.BertConfig`.

  Raises:
    TreeError: not a Llama or BERT params tree, or it already holds a prompt / prefix.

  Example:
    >>> import jax, jlora
    >>> from jlora.models.llama import LlamaConfig, init_llama
    >>> cfg = LlamaConfig(64, 32, 64, 2, 4, 2)
    >>> params = init_llama(cfg, jax.random.key(0))
    >>> jlora.add_prefix(params, jlora.PrefixTuning(3), key=jax.random.key(1), config=cfg)["prefix"]["embedding"].w.shape
    (3, 2, 2, 2, 8)
    >>> tree = jlora.add_prefix(params, jlora.PrefixTuning(3, projection=20), key=jax.random.key(1), config=cfg)
    >>> tree["prefix"]["embedding"].w.shape, tree["prefix"]["projection"]["w2"].w.shape
    ((3, 16), (20, 2, 2, 2, 8))
  """
  if not isinstance(spec, PrefixTuning):
    raise SpecError(f"add_prefix takes a jlora.PrefixTuning, got {type(spec).__name__}")
  layers, heads, head_dim = _prefix_dims(params, config)
  if PREFIX_KEY in params or PROMPT_KEY in params:
    raise TreeError("the params already hold a soft prompt or a prefix; remove it first")
  n, kv = spec.num_virtual_tokens, (layers, 2, heads, head_dim)
  if spec.projection is None:
    return {**params, PREFIX_KEY: {"embedding": FullWeight(jax.random.normal(key, (n, *kv), jnp.float32))}}
  width, hidden = heads * head_dim, spec.projection
  k_emb, k_w1, k_b1, k_w2, k_b2 = jax.random.split(key, 5)

  def linear(k, shape, fan_in):  # torch.nn.Linear's init of weight and bias
    bound = 1.0 / math.sqrt(fan_in)
    return FullWeight(jax.random.uniform(k, shape, jnp.float32, -bound, bound))

  projection = {"w1": linear(k_w1, (width, hidden), width), "b1": linear(k_b1, (hidden,), width),
                "w2": linear(k_w2, (hidden, *kv), hidden), "b2": linear(k_b2, kv, hidden)}
  return {**params, PREFIX_KEY: {"embedding": FullWeight(jax.random.normal(k_emb, (n, width), jnp.float32)),
                                 "projection": projection}}


def _prefix_dims(params: Any, config: Any) -> tuple[int, int, int]:
  """``(layers, key/value heads, head size)`` of a shipped Llama or BERT tree and its config."""
  if isinstance(params, dict) and "layers" in params and "embed_tokens" in params:
    return config.num_layers, config.num_kv_heads, config.head_dim
  if isinstance(params, dict) and "layers" in params and "embeddings" in params:
    c = getattr(config, "config", config)  # a BERT module or its BertConfig
    return c.num_hidden_layers, c.num_attention_heads, c.head_dim
  raise TreeError("add_prefix: the params are neither a Llama tree ('layers' / 'embed_tokens') nor a "
                  "BERT tree ('layers' / 'embeddings'); prefix tuning needs a shipped model, whose "
                  "attention takes the prefix (jlora.prepend_prefix(fn) for a model of your own)")


def project_prefix(prefix: Any) -> jax.Array:
  """The keys and values ``(N, L, 2, K, hd)`` a prefix entry (``params["prefix"]``) stands for.

  A direct prefix ``{"embedding": (N, L, 2, K, hd)}`` is returned as it is. A
  projected one (``PrefixTuning(N, projection=H)``) is
  ``tanh(embedding @ w1 + b1) @ w2 + b2``, PEFT's ``PrefixEncoder`` with
  ``prefix_projection=True``, computed where the model reads it, so the
  embeddings and the MLP all get gradients. Leaves may be arrays or
  :class:`jlora.FullWeight` (their values are used).

  Args:
    prefix: ``params["prefix"]``.

  Returns:
    ``(N, L, 2, K, hd)``: layer ``l``'s ``N`` keys are ``[:, l, 0]``, its values ``[:, l, 1]``.

  Raises:
    TreeError: not a prefix entry, or the projection's shapes do not chain.

  Example:
    >>> import jax, jlora
    >>> from jlora.models.llama import LlamaConfig, init_llama
    >>> cfg = LlamaConfig(64, 32, 64, 2, 4, 2)
    >>> tree = jlora.add_prefix(init_llama(cfg, jax.random.key(0)), jlora.PrefixTuning(3, projection=20),
    ...                         key=jax.random.key(1), config=cfg)
    >>> jlora.project_prefix(tree["prefix"]).shape
    (3, 2, 2, 2, 8)
  """
  value = lambda x: getattr(x, "w", x)  # noqa: E731 - a FullWeight's array, or the array
  emb = value(prefix.get("embedding")) if isinstance(prefix, dict) else None
  if emb is None:
    raise TreeError("a prefix is {'embedding': ..., ['projection': {...}]} (params['prefix'], "
                    f"jlora.add_prefix), got {type(prefix).__name__}")
  if "projection" not in prefix:
    return emb
  proj = prefix["projection"]
  if not isinstance(proj, dict) or set(proj) != set(_PROJECTION):
    raise TreeError(f"params['prefix']['projection'] must hold {list(_PROJECTION)} (jlora.add_prefix "
                    f"with PrefixTuning(projection=H)), got {sorted(proj) if isinstance(proj, dict) else proj}")
  w1, b1, w2, b2 = (value(proj[k]) for k in _PROJECTION)
  shapes = tuple(tuple(jnp.shape(x)) for x in (emb, w1, b1, w2, b2))
  ok = (len(shapes[0]) == 2 and len(shapes[1]) == 2 and shapes[1][0] == shapes[0][1]
        and shapes[2] == (shapes[1][1],) and len(shapes[3]) == 5 and shapes[3][0] == shapes[1][1]
        and shapes[4] == shapes[3][1:])
  if not ok:
    raise TreeError(f"the prefix projection's shapes do not chain: embedding {shapes[0]}, w1 {shapes[1]}, "
                    f"b1 {shapes[2]}, w2 {shapes[3]}, b2 {shapes[4]}; they must be (N, E), (E, H), (H,), "
                    "(H, L, 2, K, hd), (L, 2, K, hd)")
  hidden = jnp.tanh(emb @ w1 + b1)
  return jnp.tensordot(hidden, w2, axes=1) + b2


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


def prepend_prefix(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Prefix tuning for any model that takes Hugging Face-layout ``past_key_values``.

  ``fn(params, inputs, attention_mask, *args, past_key_values=..., **kw)``
  becomes ``g(params, prefix, inputs, attention_mask, *args, **kw)``, which
  calls ``fn`` with the prefix's keys and values as ``past_key_values`` and the
  mask extended by ``N`` ones in front, as PEFT's prefix tuning calls a
  transformers model:

  * ``prefix`` is a prefix entry (``tree["prefix"]``, from
    :func:`jlora.add_prefix` or :func:`jlora.load_peft`; projected by
    :func:`project_prefix` when it has a projection, inside ``g``, so its
    arrays get gradients) or an array ``(N, L, 2, K, hd)``;
  * ``past_key_values`` is a tuple of ``L`` ``(key, value)`` pairs, each
    ``(B, K, N, hd)`` (``B = inputs.shape[0]``), the same for every row;
  * ``attention_mask`` ``(B, T)`` becomes ``(B, N + T)`` (``None``: all ones).

  ``fn`` owns the rest, positions included. A transformers model places the
  tokens at ``N .. N + T - 1`` (its cache position), padding counted; a model
  that derives positions from the mask (``cumsum(mask) - 1``, as
  :func:`jlora.models.llama.llama_forward` does) gives the same positions for
  right-padded rows, but not for left-padded ones, whose real tokens it places
  from ``N`` on (PEFT from ``N`` plus the padding). Tested against PEFT 0.21 on
  the shipped Llama, whose ``llama_forward`` takes ``past_key_values``, with
  right padding (``tests/test_prompt.py``).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora.models.llama import LlamaConfig, init_llama, llama_forward
    >>> cfg = LlamaConfig(64, 32, 64, 2, 4, 2)
    >>> params = init_llama(cfg, jax.random.key(0))
    >>> tree = jlora.add_prefix(params, jlora.PrefixTuning(3, projection=8), key=jax.random.key(1), config=cfg)
    >>> def model(p, ids, mask, past_key_values):  # any model with an HF-style past
    ...   return llama_forward(p, ids, cfg, attention_mask=mask, past_key_values=past_key_values)
    >>> ids, mask = jnp.array([[1, 5, 9, 3]]), jnp.ones((1, 4))
    >>> out = jlora.prepend_prefix(model)(params, jlora.merge(tree)["prefix"], ids, mask)
    >>> bool(jnp.allclose(out, llama_forward(jlora.merge(tree), ids, cfg), atol=1e-5))
    True
  """

  def g(params, prefix, inputs, attention_mask, *args, **kw):
    kv = project_prefix(prefix) if isinstance(prefix, dict) else jnp.asarray(getattr(prefix, "w", prefix))
    if kv.ndim != 5 or kv.shape[2] != 2:
      raise TreeError(f"the prefix's keys and values have shape {tuple(kv.shape)}; they must be "
                      "(N, L, 2, K, hd) (a prefix entry of jlora.add_prefix, or its array)")
    b, t = jnp.shape(inputs)[:2]
    n, layers = kv.shape[:2]
    kv = jnp.transpose(kv, (1, 2, 3, 0, 4))  # (L, 2, K, N, hd)
    kv = jnp.broadcast_to(kv[:, :, None], (layers, 2, b) + kv.shape[2:])
    past = tuple((kv[i, 0], kv[i, 1]) for i in range(layers))
    if attention_mask is None:
      mask = jnp.ones((b, n + t), jnp.int32)
    else:
      attention_mask = jnp.asarray(attention_mask)
      mask = jnp.concatenate([jnp.ones((b, n), attention_mask.dtype), attention_mask], axis=1)
    return fn(params, inputs, mask, *args, past_key_values=past, **kw)

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


def _the_embeddings(tensors: dict, where: str, what: str, extra: tuple[str, ...] = ()) -> np.ndarray:
  """The one tensor a PEFT prompt / prefix file holds (besides the ``extra`` ones)."""
  if set(tensors) - set(extra) != {"prompt_embeddings"}:
    raise CheckpointError(f"{where} holds {sorted(tensors)[:4]}; PEFT's {what} tuning holds "
                          f"'prompt_embeddings'{' and a classification head' if extra else ''} only")
  return np.asarray(tensors["prompt_embeddings"])


#: PEFT's names of a prompt-tuned classifier's head (modules_to_save of SEQ_CLS), and jlora's
_HEAD = {"base_model.classifier.weight": ("kernel", True), "base_model.classifier.bias": ("bias", False)}


def _load_head(tensors: dict, params: Any, where: str) -> Any:
  """``params`` with PEFT's saved classification head as FullWeight ``classifier`` leaves."""
  head = {k: v for k, v in tensors.items() if k in _HEAD}
  if not head:
    return params
  cls = params.get("classifier") if isinstance(params, dict) else None
  if not isinstance(cls, dict):
    raise CheckpointError(f"{where} holds a classification head ({sorted(head)}, PEFT's SEQ_CLS "
                          "modules_to_save) but the params have no 'classifier'; load it onto "
                          "BertForSequenceClassification params (jlora.models.bert.load_bert(..., "
                          "task='classification'))")
  out = dict(cls)
  for key, value in head.items():
    leaf, transpose = _HEAD[key]
    value = np.asarray(value).T if transpose else np.asarray(value)
    if leaf not in cls or tuple(jnp.shape(cls[leaf])) != value.shape:
      raise CheckpointError(f"{where}: {key} has shape {value.shape} (as jlora's {leaf}), the params' "
                            f"classifier/{leaf} {jnp.shape(cls[leaf]) if leaf in cls else 'is missing'}; "
                            "is the adapter for this model (num_labels)?")
    out[leaf] = FullWeight(jnp.asarray(value, jnp.result_type(cls[leaf])))
  return {**params, "classifier": out}


def _save_head(tree: Any, tensors: dict) -> tuple[dict, dict]:
  """Adds a trained ``classifier`` head (PEFT's SEQ_CLS ``modules_to_save``) to ``tensors``;
  returns ``(head, trained leaves)``."""
  head = tree.get("classifier") if isinstance(tree.get("classifier"), dict) else {}
  trained = {leaf: x for leaf, x in head.items() if isinstance(x, FullWeight)}
  for key, (leaf, transpose) in _HEAD.items():
    if trained and leaf not in trained:
      raise SpecError(f"the classifier trains {sorted(trained)} but not {leaf!r}; PEFT saves the whole "
                      "head (modules_to_save): train classifier/kernel and classifier/bias both")
    if leaf in trained:
      value = np.asarray(jax.device_get(trained[leaf].w))
      tensors[key] = np.ascontiguousarray(value.T if transpose else value)
  return head, trained


def _validate(config: dict, f: str) -> None:
  _check_learned(config, f, "prompt", ("num_virtual_tokens", "token_dim"), "decoders and encoders")


def load_prompt(config: dict, tensors: dict, params: Any, where: str) -> Any:
  """PEFT's ``prompt_embeddings`` as ``params["prompt"]`` (a :class:`jlora.FullWeight`)."""
  _validate(config, where)
  emb = _the_embeddings(tensors, where, "prompt", extra=tuple(_HEAD))
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
  params = _load_head(tensors, params, where)
  return {**params, PROMPT_KEY: {"embedding": FullWeight(jnp.asarray(emb, jnp.float32))}}


def save_prompt(tree: Any) -> tuple[dict, dict]:
  """``(config, tensors)`` of PEFT's prompt tuning for a tree whose only trained leaf is the prompt
  (and, on a classifier, its trained ``classifier`` head: PEFT's SEQ_CLS ``modules_to_save``)."""
  emb = prompt_of(tree)
  if emb is None:
    raise SpecError("the tree holds no soft prompt (params['prompt'], jlora.add_prompt)")
  layers = tree.get("layers", {})
  some = jax.tree.leaves(layers)
  num_layers = int(some[0].shape[0]) if some and not isinstance(layers, list) else (
      len(layers) if isinstance(layers, list) else None)
  tensors = {"prompt_embeddings": np.ascontiguousarray(emb.astype(np.float32))}
  head, trained = _save_head(tree, tensors)
  config = {
      "peft_type": "PROMPT_TUNING",
      "task_type": "CAUSAL_LM" if "embed_tokens" in tree else ("SEQ_CLS" if head else None),
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
      "modules_to_save": ["classifier"] if trained else None,
  }
  return config, tensors


def _validate_prefix(config: dict, f: str) -> None:
  _check_learned(config, f, "prefix", ("num_virtual_tokens", "token_dim", "num_layers"),
                 "decoders and encoders")


def load_prefix(config: dict, tensors: dict, params: Any, where: str) -> Any:
  """PEFT's prefix ``prompt_embeddings`` ``(N, L*2*token_dim)`` as ``params["prefix"]``.

  ``token_dim`` is ``K * hd`` and ``num_attention_heads`` is ``K`` (the kv
  heads). A file written with ``prefix_projection=True`` holds the projected
  prefix (PEFT saves the projection's output), so it loads as a plain prefix.
  """
  _validate_prefix(config, where)
  emb = _the_embeddings(tensors, where, "prefix", extra=tuple(_HEAD))
  n, layers, width = config["num_virtual_tokens"], config["num_layers"], config["token_dim"]
  heads = config.get("num_attention_heads")
  if not isinstance(heads, int) or heads <= 0 or width % heads:
    raise CheckpointError(f"{where}: num_attention_heads={heads!r} does not divide token_dim={width}")
  if emb.shape != (n, layers * 2 * width):
    raise CheckpointError(f"{where}: prompt_embeddings has shape {emb.shape}, the config says "
                          f"({n}, {layers} * 2 * {width})")
  try:
    layer_tree = params["layers"]
    k = layer_tree["self_attn"]["k_proj"] if "self_attn" in layer_tree else \
        layer_tree["attention"]["self"]["key"]
    k = getattr(k["kernel"], "w", k["kernel"])
    have = (int(k.shape[0]), int(k.shape[-1]))
  except (KeyError, TypeError):
    raise CheckpointError(f"{where}: prefix tuning needs a Llama params tree (layers/self_attn/"
                          "k_proj) or a BERT one (layers/attention/self/key)") from None
  if have != (layers, width):
    raise CheckpointError(f"{where}: the prefix is for {layers} layers of {width} key/value features; "
                          f"the model has {have[0]} of {have[1]}; is the adapter for this model?")
  if PREFIX_KEY in params or PROMPT_KEY in params:
    raise CheckpointError(f"{where}: the params already hold a soft prompt or prefix")
  emb = emb.reshape(n, layers, 2, heads, width // heads)
  params = _load_head(tensors, params, where)
  return {**params, PREFIX_KEY: {"embedding": FullWeight(jnp.asarray(emb, jnp.float32))}}


def save_prefix(tree: Any) -> tuple[dict, dict]:
  """``(config, tensors)`` of PEFT's prefix tuning: the keys and values, flat ``(N, L*2*K*hd)``.

  A projected prefix is written as PEFT saves one: its projection's output
  (:func:`project_prefix`) with ``prefix_projection: true`` and
  ``encoder_hidden_size: H``; the MLP itself is not in the file.
  """
  prefix = tree.get(PREFIX_KEY) if isinstance(tree, dict) else None
  if prefix is None:
    raise SpecError("the tree holds no prefix (params['prefix'], jlora.add_prefix)")
  emb = np.asarray(jax.device_get(project_prefix(prefix)))
  if emb.ndim != 5 or emb.shape[2] != 2:
    raise SpecError(f"the prefix has shape {emb.shape}; it must be (N, L, 2, K, hd) (jlora.add_prefix)")
  n, layers, _, heads, hd = emb.shape
  projected = "projection" in prefix
  hidden = int(jnp.shape(getattr(prefix["projection"]["b1"], "w", prefix["projection"]["b1"]))[0]) \
      if projected else int(heads * hd)
  tensors = {"prompt_embeddings": np.ascontiguousarray(emb.reshape(n, -1).astype(np.float32))}
  head, trained = _save_head(tree, tensors)
  config = {
      "peft_type": "PREFIX_TUNING",
      "task_type": "CAUSAL_LM" if "embed_tokens" in tree else ("SEQ_CLS" if head else None),
      "auto_mapping": None,
      "revision": None,
      "num_virtual_tokens": int(n),
      "token_dim": int(heads * hd),
      "num_layers": int(layers),
      "num_attention_heads": int(heads),
      "num_transformer_submodules": 1,
      "prefix_projection": projected,
      "encoder_hidden_size": hidden,
      "init_weights": None,
      "inference_mode": True,
      "modules_to_save": ["classifier"] if trained else None,
  }
  return config, tensors


def _register_codec() -> None:
  from jlora import _peft  # noqa: PLC0415

  _peft.register_codec(_peft.PeftCodec(
      "PROMPT_TUNING", (), _validate, lambda config, tensors, params, m, where: load_prompt(
          config, tensors, params, where), lambda tree, m: save_prompt(tree)))
  _peft.register_codec(_peft.PeftCodec(
      "PREFIX_TUNING", (), _validate_prefix, lambda config, tensors, params, m, where: load_prefix(
          config, tensors, params, where), lambda tree, m: save_prefix(tree)))


_register_codec()
