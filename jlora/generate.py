"""Text generation for :mod:`jlora.models.llama` decoders: KV-cached, jitted, batched.

:func:`generate` continues a batch of token-id prompts of different lengths (left-padded
internally) greedily or by sampling (temperature, top-k, top-p) until ``max_new_tokens`` or an
end-of-sequence id. The whole loop (prefill and decode) is one compiled XLA program; prompt
lengths are rounded up to a multiple of ``pad_to_multiple`` so different prompts reuse it.
:func:`generate_text` wraps it with a ``transformers`` tokenizer and an optional chat template.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._adapter import is_adapted
from jlora._errors import ConfigError, DataError
from jlora._rewrite import lift, validate_adapter_ids
from jlora.models.llama import LlamaConfig, init_llama_cache, llama_forward_cached

__all__ = ["generate", "generate_text"]

# generated lengths are rounded up to a multiple of this, so nearby lengths share a compile
_STEP_BUCKET = 16


def generate(params: dict, config: LlamaConfig, prompts: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, attention_mask: np.ndarray | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | jax.Array = 0, eos_token_ids: Sequence[int] | None = None,
             pad_token_id: int | None = None, pad_to_multiple: int = 16,
             adapter_ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
  """Continues each prompt by up to ``max_new_tokens`` tokens.

  Args:
    params: the model's params: plain (LoRA adapters merged), or a wrapped tree, which runs
      through :func:`jlora.lora` (no merge); a tree from :func:`jlora.stack_adapters` needs
      ``adapter_ids``. A soft prompt (``params["prompt"]``, :func:`jlora.add_prompt`) or a
      prefix (``params["prefix"]``, :func:`jlora.add_prefix`) is written to the cache before
      every prompt, as PEFT's prompt / prefix tuning generates.
    config: the model's config.
    prompts: a list of token-id lists (lengths may differ), or a ``(B, T)`` array; with an
      array, ``attention_mask`` marks padding (left or right; real tokens are kept in order).
    max_new_tokens: how many tokens to generate at most.
    attention_mask: ``(B, T)`` 1/0 mask for an array ``prompts``; ``None``: all real.
    temperature: 0 for greedy decoding; otherwise the softmax temperature of sampling.
    top_k: sample only among the ``top_k`` most likely tokens (``None``: all).
    top_p: sample only from the smallest set of tokens whose probability reaches ``top_p``.
    seed: an int or a PRNG key for sampling.
    eos_token_ids: ids that end a row; ``None``: ``config.eos_token_ids``; ``()``: never stop.
    pad_token_id: written after a row ended (any int, e.g. -1); ``None``:
      ``config.pad_token_id``, else the first eos id, else 0.
    pad_to_multiple: prompt lengths are rounded up to a multiple of this to reuse compiles.
    adapter_ids: for a stacked tree, one adapter id per prompt (``-1``: the base alone); the
      prefill and every decode step route each row to its adapter. Swapping an adapter's arrays
      (:func:`jlora.add_adapter` with ``replace=True``) reuses the compiled loop.

  Returns:
    ``(B, max_new_tokens)`` int32 numpy array of new tokens; a row that ended holds its eos id
    and then ``pad_token_id``.

  Raises:
    DataError: an empty prompt or a token id outside the vocabulary.
    ConfigError: a bad sampling setting.

  Example:
    >>> import jax
    >>> from jlora.models.llama import LlamaConfig, init_llama
    >>> from jlora.generate import generate
    >>> cfg = LlamaConfig(128, 64, 128, 2, 4, 2)
    >>> params = init_llama(cfg, jax.random.key(0))
    >>> generate(params, cfg, [[1, 2, 3], [4]], max_new_tokens=5).shape
    (2, 5)
  """
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if temperature < 0:
    raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
  if top_k is not None and not 1 <= top_k <= config.vocab_size:
    raise ConfigError(f"top_k must be in [1, {config.vocab_size}], got {top_k}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
  if pad_to_multiple < 1:
    raise ConfigError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
  rows = _prompt_rows(prompts, attention_mask, config)
  lifted = any(is_adapted(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_adapted))
  if adapter_ids is not None or lifted:
    ids = validate_adapter_ids(params, adapter_ids)
    if ids is not None and ids.shape[0] != len(rows):
      raise DataError(f"adapter_ids has {ids.shape[0]} entries for {len(rows)} prompts; give one "
                      "adapter id per prompt")
    adapter_ids = ids
  eos = tuple(config.eos_token_ids if eos_token_ids is None else (int(e) for e in eos_token_ids))
  if pad_token_id is None:
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
  longest = max(len(r) for r in rows)
  width = -(-longest // pad_to_multiple) * pad_to_multiple
  tokens = np.zeros((len(rows), width), np.int32)  # padding slots are masked; id 0 is harmless
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    if len(r):
      tokens[i, width - len(r):] = r
      mask[i, width - len(r):] = True
  key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  greedy = temperature == 0 or top_k == 1
  is_eos = np.zeros((config.vocab_size,), bool)
  for e in eos:
    if not 0 <= e < config.vocab_size:
      raise ConfigError(f"eos token id {e} is outside the vocabulary [0, {config.vocab_size})")
    is_eos[e] = True
  steps = -(-int(max_new_tokens) // _STEP_BUCKET) * _STEP_BUCKET
  out = _generate_jit(params, jnp.asarray(tokens), jnp.asarray(mask), key,
                      jnp.float32(temperature if not greedy else 1.0),
                      jnp.int32(top_k if top_k is not None else config.vocab_size),
                      jnp.float32(top_p if top_p is not None else 1.0),
                      jnp.asarray(is_eos), jnp.int32(pad_token_id), jnp.int32(max_new_tokens),
                      adapter_ids, config=config, steps=steps, greedy=greedy, lifted=lifted)
  out = np.asarray(out)[:, :max_new_tokens]
  return out


def generate_text(params: dict, config: LlamaConfig, tokenizer: Any, prompts: str | Sequence[str],
                  *, max_new_tokens: int, chat: bool = False, system: str | None = None,
                  **kwargs: Any) -> list[str]:
  """Generates continuations of text prompts and decodes them.

  Args:
    params: the model's params.
    config: the model's config.
    tokenizer: a ``transformers`` tokenizer (e.g. from
      :func:`jlora.models.llama_io.load_llama_tokenizer`).
    prompts: one string or a list of strings.
    max_new_tokens: how many tokens to generate at most.
    chat: wrap each prompt as a user message with the tokenizer's chat template.
    system: a system message for ``chat``.
    **kwargs: passed to :func:`generate` (``temperature``, ``top_k``, ``top_p``, ``seed``, ...).

  Returns:
    One decoded continuation per prompt, without the prompt and without special tokens.

  Example:
    >>> from jlora.models.llama_io import load_llama, load_llama_tokenizer
    >>> from jlora.generate import generate_text
    >>> cfg, params = load_llama("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> tok = load_llama_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> generate_text(params, cfg, tok, "What is 2+2?", chat=True, max_new_tokens=20)  # doctest: +SKIP
    ['2 + 2 = 4']
  """
  single = isinstance(prompts, str)
  texts = [prompts] if single else list(prompts)
  if not texts:
    raise DataError("generate_text got no prompts")
  ids = []
  for text in texts:
    if chat:
      messages = ([{"role": "system", "content": system}] if system else [])
      messages.append({"role": "user", "content": text})
      if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("chat=True but the tokenizer has no chat template; pass chat=False")
      enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
      if hasattr(enc, "keys"):
        enc = enc["input_ids"]
      ids.append(list(enc))
    else:
      ids.append(tokenizer(text).input_ids)
  out = generate(params, config, ids, max_new_tokens=max_new_tokens, **kwargs)
  eos = set(config.eos_token_ids if kwargs.get("eos_token_ids") is None else kwargs["eos_token_ids"])
  texts_out = []
  for row in out.tolist():
    cut = next((i for i, t in enumerate(row) if t in eos), len(row))
    texts_out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
  return texts_out


# ----------------------------------------------------------------------------------------------
# Private helpers.


def _prompt_rows(prompts, attention_mask, config: LlamaConfig) -> list[np.ndarray]:
  if isinstance(prompts, (np.ndarray, jax.Array)):
    arr = np.asarray(prompts)
    if arr.ndim != 2:
      raise DataError(f"a prompt array must be (batch, length), got shape {arr.shape}")
    mask = np.ones(arr.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    if mask.shape != arr.shape:
      raise DataError(f"attention_mask has shape {mask.shape}, prompts {arr.shape}")
    rows = [arr[i][mask[i]] for i in range(arr.shape[0])]
  else:
    if attention_mask is not None:
      raise DataError("attention_mask is only for an array of prompts; lists need none")
    if isinstance(prompts, str) or not len(prompts):
      raise DataError("prompts must be a non-empty list of token-id lists (tokenize text first, "
                      "or use generate_text)")
    rows = [np.asarray(list(p), dtype=np.int64).reshape(-1) for p in prompts]
  if not rows:
    raise DataError("generate got no prompts")
  for i, r in enumerate(rows):
    if r.size == 0:
      raise DataError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
    if not np.issubdtype(r.dtype, np.integer):
      raise DataError(f"prompt {i} holds non-integer values ({r.dtype})")
    if r.min() < 0 or r.max() >= config.vocab_size:
      raise DataError(
          f"prompt {i} holds token ids in [{r.min()}, {r.max()}], outside the vocabulary "
          f"[0, {config.vocab_size})")
  return rows


def _sample(logits, key, temperature, top_k, top_p, *, greedy: bool):
  """Greedy, or temperature then top-k then top-p (on the renormalised top-k), as HF orders them."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  ordered = -jnp.sort(-logits, axis=-1)
  rank = jnp.arange(logits.shape[-1])
  in_k = rank < top_k
  probs = jax.nn.softmax(jnp.where(in_k, ordered, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
  keep = in_k & (before < top_p)
  threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "steps", "greedy", "lifted"))
def _generate_jit(params, tokens, mask, key, temperature, top_k, top_p, is_eos, pad_id, limit,
                  adapter_ids, *, config, steps, greedy, lifted):
  batch, width = tokens.shape
  dtype = params["embed_tokens"]["embedding"].dtype
  forward = llama_forward_cached
  if lifted:  # a wrapped tree: low-rank contractions, each row routed to its adapter
    forward = functools.partial(lift(llama_forward_cached, strict=False), adapter_ids=adapter_ids)
  # a soft prompt (prompt tuning) or a prefix (prefix tuning): n more slots, written in the prefill
  prompted = next((k for k in ("prompt", "prefix") if isinstance(params, dict) and k in params), None)
  n = jax.tree.leaves(params[prompted]["embedding"])[0].shape[0] if prompted else 0
  cache = init_llama_cache(config, batch, n + width + steps, dtype)
  sample = functools.partial(_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                             greedy=greedy)
  kw = {"prefill_prompt": True} if prompted else {}
  logits, cache = forward(params, tokens, cache, config, attention_mask=mask, **kw)
  key, sub = jax.random.split(key)
  first = sample(logits[:, -1], sub)
  out = jnp.full((batch, steps), pad_id, jnp.int32)
  done = jnp.zeros((batch,), bool)

  def cond(state):
    step, _, _, _, done, _ = state
    return (step < limit) & ~jnp.all(done)

  def body(state):
    step, tok, cache, out, done, key = state
    out = jax.lax.dynamic_update_slice(out, jnp.where(done, pad_id, tok)[:, None], (0, step))
    done = done | is_eos[tok]
    logits, cache = forward(params, tok[:, None], cache, config)  # tok in vocab
    key, sub = jax.random.split(key)
    return step + 1, sample(logits[:, 0], sub), cache, out, done, key

  state = (jnp.int32(0), first, cache, out, done, key)
  _, _, _, out, _, _ = jax.lax.while_loop(cond, body, state)
  return out
