"""Tasks: turn a dataset into fixed-shape numpy features for a model.

Every task validates its input (columns, emptiness, label range) before it
tokenises anything, pads every row to the same length (so ``jax.jit`` compiles
once), and returns ``dict[str, np.ndarray]`` with int32 arrays of one leading
length, ready for :func:`jlora.data.batches`.

Padding is always on the right. Language-model labels are already shifted:
``labels[:, t]`` is the token that ``logits[:, t]`` must predict, ``-100`` where
nothing is scored; the loss is ``jlora.metrics.nll(logits, labels)`` with no
further shift.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np

from jlora._errors import ConfigError, DataError

__all__ = [
    "IGNORE_INDEX",
    "TruncationWarning",
    "ClassificationTask",
    "CausalLMTask",
    "InstructionTask",
]

#: Label value of a position (or example) that is not scored.
IGNORE_INDEX = -100

Features = dict[str, np.ndarray]


class TruncationWarning(UserWarning):
  """Some examples were longer than a task's length and were cut (issued once per task)."""


class ClassificationTask:
  """Sequence classification: text (or a text pair) -> one integer class.

  ``encode(dataset)`` checks, before tokenising: the dataset is not empty and
  has the text / label columns (the error lists the columns present), every
  text is a string, every label is an integer in ``[0, num_labels)`` (the
  error names the first offending value and its row). Each text is tokenised
  with the tokenizer's special tokens; texts longer than ``max_length`` tokens
  are re-tokenised with truncation (the tokenizer's ``truncation_side``, so
  ``[SEP]``-style end tokens are kept) and ONE :class:`TruncationWarning` per
  task says how many were cut (:attr:`num_truncated` keeps the running count).
  Rows are right-padded with the pad token to exactly ``max_length``.

  ``num_labels=None`` takes the count from a ``datasets.ClassLabel`` label
  column, else ``max(label) + 1`` of the first dataset encoded; it is then
  fixed for later datasets (validation, test).

  Attributes:
    num_labels: the number of classes (None until known).
    num_truncated: texts truncated so far, over all ``encode`` calls.

  Example:
    >>> task = ClassificationTask(tokenizer, max_length=16)  # doctest: +SKIP
    >>> feats = task.encode(load_sentiment(split="train"))  # doctest: +SKIP
    >>> sorted(feats)  # doctest: +SKIP
    ['attention_mask', 'input_ids', 'labels', 'token_type_ids']
  """

  def __init__(
      self,
      tokenizer: Any,
      max_length: int,
      text_column: str = "text",
      label_column: str = "label",
      num_labels: int | None = None,
      *,
      text_pair_column: str | None = None,
  ) -> None:
    """Configures the task; see the class docstring.

    Args:
      tokenizer: a Hugging Face tokenizer with a pad token.
      max_length: the fixed row length in tokens (special tokens included).
      text_column: column holding the text.
      label_column: column holding the integer class.
      num_labels: the number of classes, or None to infer it.
      text_pair_column: optional second text column (sentence-pair tasks).

    Raises:
      ConfigError: bad max_length / num_labels, or the tokenizer has no pad token.
    """
    _check_tokenizer(tokenizer, "ClassificationTask", need_pad=True)
    _check_positive_int(max_length, "max_length", "ClassificationTask")
    special = _num_special(tokenizer, pair=text_pair_column is not None)
    if max_length <= special:
      raise ConfigError(
          f"ClassificationTask: max_length={max_length} leaves no room for text next to "
          f"the tokenizer's {special} special tokens; use a larger max_length.")
    if num_labels is not None:
      _check_positive_int(num_labels, "num_labels", "ClassificationTask")
      if num_labels < 2:
        raise ConfigError(f"ClassificationTask: num_labels must be >= 2, got {num_labels}.")
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.text_column = text_column
    self.label_column = label_column
    self.text_pair_column = text_pair_column
    self.num_labels = num_labels
    self.num_truncated = 0
    self._warned = False

  def encode(self, dataset: datasets.Dataset | Mapping[str, Sequence[Any]]) -> Features:
    """Tokenises, truncates, pads and checks a dataset.

    Args:
      dataset: a ``datasets.Dataset`` or a mapping of equal-length columns.

    Returns:
      ``input_ids``, ``attention_mask`` (int32 ``[N, max_length]``),
      ``token_type_ids`` (same shape, when the tokenizer produces them) and
      ``labels`` (int32 ``[N]``).

    Raises:
      DataError: empty dataset, missing column, non-string text, or a label
        that is not an integer in ``[0, num_labels)``.

    Example:
      >>> feats = task.encode({"text": ["good", "bad"], "label": [1, 0]})  # doctest: +SKIP
    """
    name = "ClassificationTask"
    wanted = [self.text_column, self.label_column]
    if self.text_pair_column is not None:
      wanted.append(self.text_pair_column)
    cols, features = _columns(dataset, wanted, name)
    texts = _check_texts(cols[self.text_column], self.text_column, name)
    pairs = None
    if self.text_pair_column is not None:
      pairs = _check_texts(cols[self.text_pair_column], self.text_pair_column, name)
    labels = _check_int_labels(cols[self.label_column], self.label_column, name)
    num_labels = self.num_labels
    if num_labels is None:
      feature = features.get(self.label_column) if features is not None else None
      if isinstance(feature, datasets.ClassLabel):
        num_labels = feature.num_classes
      else:
        num_labels = int(labels.max()) + 1
        if num_labels < 2:
          raise DataError(
              f"{name}: every label in column {self.label_column!r} is 0, so the number of "
              "classes cannot be inferred; pass num_labels=.")
    bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
    if bad.size:
      i = int(bad[0])
      raise DataError(
          f"{name}: label {int(labels[i])} at row {i} of column {self.label_column!r} is "
          f"outside [0, {num_labels}) (num_labels={num_labels}; {bad.size} such rows). "
          "Fix the labels or pass a larger num_labels.")
    self.num_labels = num_labels

    tok = self.tokenizer
    args = (texts,) if pairs is None else (texts, pairs)
    enc = tok(*args, add_special_tokens=True, truncation=False, padding=False, verbose=False)
    ids = list(enc["input_ids"])
    types = list(enc["token_type_ids"]) if "token_type_ids" in enc else None
    long_rows = [i for i, x in enumerate(ids) if len(x) > self.max_length]
    if long_rows:
      longest = max(len(ids[i]) for i in long_rows)
      sub = ([texts[i] for i in long_rows],)
      if pairs is not None:
        sub = (*sub, [pairs[i] for i in long_rows])
      cut = tok(*sub, add_special_tokens=True, truncation=True, max_length=self.max_length,
                padding=False, verbose=False)
      for j, i in enumerate(long_rows):
        ids[i] = cut["input_ids"][j]
        if types is not None:
          types[i] = cut["token_type_ids"][j]
      self.num_truncated += len(long_rows)
      if not self._warned:
        self._warned = True
        warnings.warn(
            f"{name}: {len(long_rows)} of {len(ids)} texts were longer than "
            f"max_length={self.max_length} tokens (longest {longest}) and were truncated; "
            "raise max_length to keep them whole. (Shown once per task; see "
            "task.num_truncated.)", TruncationWarning, stacklevel=2)
    out = {
        "input_ids": _pad(ids, self.max_length, tok.pad_token_id),
        "attention_mask": _pad([[1] * len(x) for x in ids], self.max_length, 0),
    }
    if types is not None:
      out["token_type_ids"] = _pad(types, self.max_length, getattr(tok, "pad_token_type_id", 0))
    out["labels"] = labels.astype(np.int32)
    return out

  __call__ = encode


class CausalLMTask:
  """Causal language modelling on raw text, packed into fixed-length blocks.

  Each text is tokenised (with the tokenizer's own special tokens, such as a
  BOS, when ``add_special_tokens``) and an EOS is appended unless the text
  already ends with one.

  ``pack=True`` concatenates all texts, in dataset order, into one stream
  ``s`` and cuts it into ``n = (len(s) - 1) // seq_len`` blocks: block ``i``
  has ``input_ids = s[i*L:(i+1)*L]`` and ``labels = s[i*L+1:(i+1)*L+1]`` (the
  next token; a block's last label looks one token ahead into the next
  block), with an all-ones ``attention_mask``: documents in a block attend to
  each other, separated only by EOS (GPT-style packing). The remainder,
  ``len(s) - 1 - n*L`` input tokens at the end of the stream, is dropped
  (``remainder="drop"``, recorded in :attr:`dropped_tokens`) or kept in one
  last right-padded block (``remainder="pad"``: pad id, attention 0, label
  -100).

  ``pack=False`` gives one right-padded row per text: ``input_ids = t[:L]``,
  ``labels = t[1:L+1]`` (-100 past the end), attention 1 on real tokens; texts
  longer than ``L + 1`` tokens are cut at the end with one
  :class:`TruncationWarning` per task.

  Attributes:
    dropped_tokens: remainder tokens dropped by the last ``encode`` (pack=True).
    num_truncated: texts truncated so far (pack=False).

  Example:
    >>> task = CausalLMTask(tokenizer, seq_len=128)  # doctest: +SKIP
    >>> feats = task.encode(load_files("corpus/*.txt"))  # doctest: +SKIP
  """

  def __init__(
      self,
      tokenizer: Any,
      seq_len: int,
      text_column: str = "text",
      pack: bool = True,
      *,
      add_special_tokens: bool = True,
      remainder: str = "drop",
  ) -> None:
    """Configures the task; see the class docstring.

    Args:
      tokenizer: a Hugging Face tokenizer with an EOS token.
      seq_len: the fixed row length in tokens.
      text_column: column holding the text.
      pack: pack texts into blocks (True) or one padded row per text.
      add_special_tokens: let the tokenizer add its special tokens (e.g. BOS).
      remainder: ``"drop"`` or ``"pad"`` the tail of the packed stream.

    Raises:
      ConfigError: bad seq_len / remainder, or the tokenizer has no EOS token.
    """
    _check_tokenizer(tokenizer, "CausalLMTask", need_eos=True)
    _check_positive_int(seq_len, "seq_len", "CausalLMTask")
    if remainder not in ("drop", "pad"):
      raise ConfigError(f"CausalLMTask: remainder must be 'drop' or 'pad', got {remainder!r}.")
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.text_column = text_column
    self.pack = bool(pack)
    self.add_special_tokens = add_special_tokens
    self.remainder = remainder
    self.dropped_tokens = 0
    self.num_truncated = 0
    self._warned = False

  def tokenize(self, dataset: datasets.Dataset | Mapping[str, Sequence[Any]]) -> list[list[int]]:
    """The per-text token lists (EOS appended) that :meth:`encode` packs.

    Args:
      dataset: a ``datasets.Dataset`` or a mapping of columns.

    Returns:
      One list of token ids per row.

    Raises:
      DataError: empty dataset, missing column or non-string text.

    Example:
      >>> docs = task.tokenize({"text": ["hello world"]})  # doctest: +SKIP
    """
    cols, _ = _columns(dataset, [self.text_column], "CausalLMTask")
    texts = _check_texts(cols[self.text_column], self.text_column, "CausalLMTask")
    return self._tokenize(texts)

  def encode(self, dataset: datasets.Dataset | Mapping[str, Sequence[Any]]) -> Features:
    """Tokenises and packs (or pads) a dataset.

    Args:
      dataset: a ``datasets.Dataset`` or a mapping of columns.

    Returns:
      ``input_ids``, ``attention_mask``, ``labels``: int32 ``[N, seq_len]``.

    Raises:
      DataError: empty dataset, missing column, non-string text, or (pack=True,
        remainder="drop") fewer than ``seq_len + 1`` tokens in all.

    Example:
      >>> feats = task.encode({"text": ["one text", "another"]})  # doctest: +SKIP
    """
    docs = self.tokenize(dataset)
    L = self.seq_len
    pad_id = _pad_id(self.tokenizer)
    if not self.pack:
      too_long = [d for d in docs if len(d) > L + 1]
      if too_long:
        self.num_truncated += len(too_long)
        if not self._warned:
          self._warned = True
          warnings.warn(
              f"CausalLMTask: {len(too_long)} of {len(docs)} texts were longer than "
              f"seq_len + 1 = {L + 1} tokens (longest {max(map(len, too_long))}) and were "
              "cut at the end; use pack=True or a larger seq_len to keep every token. "
              "(Shown once per task; see task.num_truncated.)", TruncationWarning,
              stacklevel=2)
      inputs = [d[:L] for d in docs]
      labels = [d[1:L + 1] for d in docs]
      return {
          "input_ids": _pad(inputs, L, pad_id),
          "attention_mask": _pad([[1] * len(x) for x in inputs], L, 0),
          "labels": _pad(labels, L, IGNORE_INDEX),
      }
    stream = np.fromiter((t for d in docs for t in d), dtype=np.int64)
    n_full = (stream.size - 1) // L
    rest = stream.size - 1 - n_full * L
    if n_full == 0 and (self.remainder == "drop" or rest == 0):
      raise DataError(
          f"CausalLMTask: the dataset has {stream.size} tokens, fewer than seq_len + 1 = "
          f"{L + 1} needed for one packed block; lower seq_len, add text, or pass "
          "remainder='pad'.")
    inputs = stream[:n_full * L].reshape(n_full, L)
    labels = stream[1:n_full * L + 1].reshape(n_full, L)
    mask = np.ones((n_full, L), np.int32)
    self.dropped_tokens = 0
    if rest and self.remainder == "pad":
      tail_in = np.full((1, L), pad_id, np.int64)
      tail_lab = np.full((1, L), IGNORE_INDEX, np.int64)
      tail_mask = np.zeros((1, L), np.int32)
      tail_in[0, :rest] = stream[n_full * L:-1]
      tail_lab[0, :rest] = stream[n_full * L + 1:]
      tail_mask[0, :rest] = 1
      inputs = np.concatenate([inputs, tail_in])
      labels = np.concatenate([labels, tail_lab])
      mask = np.concatenate([mask, tail_mask])
    else:
      self.dropped_tokens = rest
    return {
        "input_ids": inputs.astype(np.int32),
        "attention_mask": mask,
        "labels": labels.astype(np.int32),
    }

  __call__ = encode

  def _tokenize(self, texts: list[str]) -> list[list[int]]:
    enc = self.tokenizer(texts, add_special_tokens=self.add_special_tokens, truncation=False,
                         padding=False, verbose=False)
    eos = self.tokenizer.eos_token_id
    docs = []
    for ids in enc["input_ids"]:
      ids = list(ids)
      if not ids or ids[-1] != eos:
        ids.append(eos)
      docs.append(ids)
    return docs


class InstructionTask:
  """Supervised fine-tuning on (prompt, response) pairs; the loss covers the response only.

  **Formatting.** With a chat template (``chat_template=True`` and the
  tokenizer has one, or ``chat_template`` is a template string), the prompt
  is rendered as ``[system?, user]`` with ``add_generation_prompt=True`` and
  the full text as ``[system?, user, assistant]``; the response part is the
  full text minus the rendered prompt (so the template's end-of-turn tokens
  belong to the response and are learned). A template that does not render
  the prompt as a prefix of the conversation raises ConfigError. Both parts
  are tokenised with ``add_special_tokens=False`` (templates write their own
  BOS). Without a template (``chat_template=False``, or True on a tokenizer
  without one) the prompt is tokenised with the tokenizer's special tokens
  and the response without, followed by EOS; nothing is inserted between
  them, so end the prompt with the separator you want.

  **Labels.** ``labels[t]`` is token ``t + 1`` when that token belongs to the
  response, else -100: the scored targets are exactly the response tokens.
  A row of ``max_length`` inputs thus scores up to ``max_length + 1`` tokens.

  **Truncation.** A sequence longer than ``max_length + 1`` tokens keeps its
  whole prompt and loses the end of its response. An example whose prompt
  alone is longer than ``max_length`` tokens, or whose response is empty, has
  no response token to score and is dropped. One :class:`TruncationWarning`
  per task reports both counts (:attr:`num_truncated`, :attr:`num_dropped`
  keep running totals).

  Example:
    >>> task = InstructionTask(tokenizer, max_length=64)  # doctest: +SKIP
    >>> feats = task.encode({"prompt": ["2+2?"], "response": ["4"]})  # doctest: +SKIP
  """

  def __init__(
      self,
      tokenizer: Any,
      max_length: int,
      prompt_column: str = "prompt",
      response_column: str = "response",
      chat_template: bool | str = True,
      *,
      system_column: str | None = None,
  ) -> None:
    """Configures the task; see the class docstring.

    Args:
      tokenizer: a Hugging Face tokenizer.
      max_length: the fixed row length in tokens.
      prompt_column: column holding the user prompt.
      response_column: column holding the target response.
      chat_template: True (the tokenizer's template if it has one), False (plain
        concatenation), or a Jinja template string to use instead.
      system_column: optional column with a system message (template mode only).

    Raises:
      ConfigError: bad max_length, or (no template) the tokenizer has no EOS.
    """
    _check_positive_int(max_length, "max_length", "InstructionTask")
    if not isinstance(chat_template, (bool, str)):
      raise ConfigError(
          f"InstructionTask: chat_template must be True, False or a template string, "
          f"got {type(chat_template).__name__}.")
    self.uses_template = isinstance(chat_template, str) or bool(
        chat_template and getattr(tokenizer, "chat_template", None))
    _check_tokenizer(tokenizer, "InstructionTask", need_eos=not self.uses_template)
    if system_column is not None and not self.uses_template:
      raise ConfigError(
          "InstructionTask: system_column needs a chat template; the tokenizer has none "
          "and chat_template is not a template string.")
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.prompt_column = prompt_column
    self.response_column = response_column
    self.system_column = system_column
    self.chat_template = chat_template
    self.num_truncated = 0
    self.num_dropped = 0
    self._warned = False

  def split_tokens(
      self, dataset: datasets.Dataset | Mapping[str, Sequence[Any]]
  ) -> list[tuple[list[int], list[int]]]:
    """The (prompt tokens, response tokens) of each row, before truncation.

    Args:
      dataset: a ``datasets.Dataset`` or a mapping of columns.

    Returns:
      One ``(prompt_ids, response_ids)`` pair per row.

    Raises:
      DataError: empty dataset, missing column or non-string entry.
      ConfigError: the chat template does not render the prompt as a prefix.

    Example:
      >>> [(p, r)] = task.split_tokens({"prompt": ["hi"], "response": ["yo"]})  # doctest: +SKIP
    """
    name = "InstructionTask"
    wanted = [self.prompt_column, self.response_column]
    if self.system_column is not None:
      wanted.append(self.system_column)
    cols, _ = _columns(dataset, wanted, name)
    prompts = _check_texts(cols[self.prompt_column], self.prompt_column, name)
    responses = _check_texts(cols[self.response_column], self.response_column, name)
    systems = None
    if self.system_column is not None:
      systems = _check_texts(cols[self.system_column], self.system_column, name)
    tok = self.tokenizer
    if self.uses_template:
      p_texts, r_texts = [], []
      for i, (p, r) in enumerate(zip(prompts, responses)):
        pt, rt = self._render(p, r, systems[i] if systems is not None else None, i)
        p_texts.append(pt)
        r_texts.append(rt)
      p_ids = tok(p_texts, add_special_tokens=False, verbose=False)["input_ids"]
      r_ids = tok(r_texts, add_special_tokens=False, verbose=False)["input_ids"]
      return [(list(p), list(r)) for p, r in zip(p_ids, r_ids)]
    p_ids = tok(prompts, add_special_tokens=True, verbose=False)["input_ids"]
    r_ids = tok(responses, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tok.eos_token_id
    return [(list(p), list(r) + [eos]) for p, r in zip(p_ids, r_ids)]

  def encode(self, dataset: datasets.Dataset | Mapping[str, Sequence[Any]]) -> Features:
    """Formats, tokenises, masks, truncates and pads a dataset.

    Args:
      dataset: a ``datasets.Dataset`` or a mapping of columns.

    Returns:
      ``input_ids``, ``attention_mask``, ``labels``: int32 ``[N, max_length]``
      (N = rows kept).

    Raises:
      DataError: empty dataset, missing column, non-string entry, or every
        example dropped (prompt longer than max_length, or empty response).
      ConfigError: the chat template does not render the prompt as a prefix.

    Example:
      >>> feats = task.encode({"prompt": ["2+2?"], "response": ["4"]})  # doctest: +SKIP
    """
    pairs = self.split_tokens(dataset)
    L = self.max_length
    rows_in, rows_lab = [], []
    truncated = dropped = 0
    for p, r in pairs:
      if len(p) > L or not r:  # no response token could be scored
        dropped += 1
        continue
      seq = p + r
      if len(seq) > L + 1:
        truncated += 1
        seq = seq[:L + 1]
      n_prompt = len(p)
      lab = [seq[t + 1] if t + 1 >= n_prompt else IGNORE_INDEX for t in range(len(seq) - 1)]
      rows_in.append(seq[:L])
      rows_lab.append(lab[:L])
    if not rows_in:
      raise DataError(
          f"InstructionTask: all {len(pairs)} examples were dropped: each prompt is longer "
          f"than max_length={L} tokens or its response is empty; raise "
          "max_length or shorten the prompts.")
    self.num_truncated += truncated
    self.num_dropped += dropped
    if (truncated or dropped) and not self._warned:
      self._warned = True
      warnings.warn(
          f"InstructionTask: of {len(pairs)} examples, {truncated} were longer than "
          f"max_length + 1 = {L + 1} tokens and lost the end of their response, and "
          f"{dropped} were dropped (prompt alone > max_length tokens, or an empty "
          "response); raise max_length to keep them. (Shown once per task; see "
          "task.num_truncated / task.num_dropped.)", TruncationWarning, stacklevel=2)
    return {
        "input_ids": _pad(rows_in, L, _pad_id(self.tokenizer)),
        "attention_mask": _pad([[1] * len(x) for x in rows_in], L, 0),
        "labels": _pad(rows_lab, L, IGNORE_INDEX),
    }

  __call__ = encode

  def _render(self, prompt: str, response: str, system: str | None, row: int) -> tuple[str, str]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs.append({"role": "user", "content": prompt})
    kw: dict[str, Any] = {"tokenize": False}
    if isinstance(self.chat_template, str):
      kw["chat_template"] = self.chat_template
    head = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, **kw)
    full = self.tokenizer.apply_chat_template(
        msgs + [{"role": "assistant", "content": response}], add_generation_prompt=False, **kw)
    if not isinstance(head, str) or not isinstance(full, str) or not full.startswith(head):
      raise ConfigError(
          f"InstructionTask: the chat template renders row {row}'s prompt (with "
          "add_generation_prompt=True) differently from the start of the full "
          "conversation, so the response tokens cannot be located; use a template whose "
          "generation prompt is a prefix of the assistant turn, or chat_template=False.")
    return head, full[len(head):]


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _columns(dataset: Any, names: list[str], task: str) -> tuple[dict[str, list], Any]:
  """Columns as lists, plus the dataset's ``features`` (or None)."""
  if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
    raise DataError(
        f"{task}: got a DatasetDict with splits {list(dataset)}; pass one split, e.g. "
        "dataset['train'].")
  if isinstance(dataset, datasets.Dataset):
    present = list(dataset.column_names)
    missing = [n for n in names if n not in present]
    if missing:
      raise DataError(
          f"{task}: the dataset has no column(s) {missing}; its columns are {present}. "
          "Rename them (dataset.rename_column) or pass the column names to the task.")
    if len(dataset) == 0:
      raise DataError(f"{task}: the dataset is empty (0 rows).")
    table = dataset.select_columns(names)[:]
    return {n: list(table[n]) for n in names}, dataset.features
  if isinstance(dataset, Mapping):
    present = list(dataset)
    missing = [n for n in names if n not in present]
    if missing:
      raise DataError(
          f"{task}: the data has no column(s) {missing}; its columns are {present}. "
          "Rename them or pass the column names to the task.")
    cols = {}
    for n in names:
      v = dataset[n]
      if isinstance(v, str):
        raise DataError(f"{task}: column {n!r} is a single string; pass a list of strings.")
      cols[n] = list(np.asarray(v).tolist() if isinstance(v, np.ndarray) else v)
    sizes = {n: len(v) for n, v in cols.items()}
    if len(set(sizes.values())) > 1:
      raise DataError(f"{task}: columns have different lengths {sizes}.")
    if not next(iter(sizes.values())):
      raise DataError(f"{task}: the data is empty (0 rows).")
    return cols, None
  raise DataError(
      f"{task}: expected a datasets.Dataset or a mapping of columns, got "
      f"{type(dataset).__name__}.")


def _check_texts(values: list[Any], column: str, task: str) -> list[str]:
  for i, v in enumerate(values):
    if not isinstance(v, str):
      raise DataError(
          f"{task}: row {i} of column {column!r} is {type(v).__name__} ({v!r:.40}), not a "
          "string; drop or fill missing texts first (dataset.filter).")
  return values


def _check_int_labels(values: list[Any], column: str, task: str) -> np.ndarray:
  out = np.empty(len(values), np.int64)
  for i, v in enumerate(values):
    if isinstance(v, (bool, int, np.integer)):
      out[i] = int(v)
    elif isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
      out[i] = int(v)
    else:
      raise DataError(
          f"{task}: label {v!r} at row {i} of column {column!r} is not an integer class id; "
          "map string labels to ids first (dataset.class_encode_column) and drop missing ones.")
  return out


def _check_tokenizer(tok: Any, task: str, *, need_pad: bool = False, need_eos: bool = False) -> None:
  if not callable(tok):
    raise ConfigError(f"{task}: tokenizer must be a Hugging Face tokenizer, got {type(tok).__name__}.")
  if need_pad and getattr(tok, "pad_token_id", None) is None:
    raise ConfigError(
        f"{task}: the tokenizer has no pad token; set one first, e.g. "
        "tokenizer.pad_token = tokenizer.eos_token (decoder models).")
  if need_eos and getattr(tok, "eos_token_id", None) is None:
    raise ConfigError(
        f"{task}: the tokenizer has no EOS token, needed to end each text; set "
        "tokenizer.eos_token (or add_special_tokens({'eos_token': ...})).")


def _check_positive_int(value: Any, name: str, task: str) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ConfigError(f"{task}: {name} must be a positive int, got {value!r}.")


def _num_special(tok: Any, *, pair: bool) -> int:
  fn = getattr(tok, "num_special_tokens_to_add", None)
  try:
    return int(fn(pair=pair)) if fn is not None else 0
  except Exception:  # noqa: BLE001 - a tokenizer without the notion
    return 0


def _pad_id(tok: Any) -> int:
  pid = getattr(tok, "pad_token_id", None)
  return int(pid if pid is not None else tok.eos_token_id)


def _pad(rows: Sequence[Sequence[int]], length: int, value: int) -> np.ndarray:
  out = np.full((len(rows), length), value, dtype=np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out
