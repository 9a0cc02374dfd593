"""Leaf paths and the rules that match them.

A leaf's path is the '/'-joined string of its keys: dict keys, sequence
indices and attribute names (``"layers/3/attn/q_proj/kernel"``). The ``value``
attribute of a Flax NNX ``Variable`` is left out, so an NNX state reads like
the linen params of the same model.

Rules map patterns to specs. A pattern is a glob over whole path components
(``*`` one component or part of one, ``**`` any number of components, ``?``
one character, ``{a,b}`` alternatives, ``[...]`` character classes), or a
regular expression written ``"re:..."`` or passed as a compiled ``re.Pattern``
(matched against the whole path with ``re.fullmatch``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

from jlora._errors import RuleError

__all__ = ["path_str", "compile_pattern", "Rules", "normalise_rules"]

Rules = Any  # Mapping[pattern, spec] | Sequence[tuple[pattern, spec]] | Callable[[str, Any], spec | None]


def path_str(key_path: Sequence[Any]) -> str:
  """Returns the '/'-joined path of a ``jax.tree_util`` key path."""
  parts = []
  last = len(key_path) - 1
  for i, k in enumerate(key_path):
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name == "value" and i == last:
        continue  # an NNX Variable's payload
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def compile_pattern(pattern: str | re.Pattern) -> re.Pattern:
  """Compiles a glob (or ``"re:..."`` / ``re.Pattern``) into a full-match regex."""
  if isinstance(pattern, re.Pattern):
    return pattern
  if not isinstance(pattern, str) or not pattern:
    raise RuleError(f"a rule pattern must be a non-empty string or re.Pattern, got {pattern!r}")
  if pattern.startswith("re:"):
    try:
      return re.compile(pattern[3:])
    except re.error as e:
      raise RuleError(f"invalid regular expression in rule {pattern!r}: {e}") from None
  return re.compile(_glob_to_regex(pattern))


def _glob_to_regex(glob: str) -> str:
  out, i, n, depth = [], 0, len(glob), 0
  while i < n:
    c = glob[i]
    if glob.startswith("**/", i):
      out.append("(?:[^/]+/)*")
      i += 3
      continue
    if glob.startswith("/**", i) and i + 3 == n:
      out.append("(?:/[^/]+)*")
      i += 3
      continue
    if glob.startswith("**", i):
      out.append(".*")
      i += 2
      continue
    if c == "*":
      out.append("[^/]*")
    elif c == "?":
      out.append("[^/]")
    elif c == "{":
      out.append("(?:")
      depth += 1
    elif c == "}" and depth:
      out.append(")")
      depth -= 1
    elif c == "," and depth:
      out.append("|")
    elif c == "[":
      j = glob.find("]", i + 1)
      if j < 0:
        raise RuleError(f"unclosed '[' in rule pattern {glob!r}")
      cls = glob[i + 1:j]
      if cls.startswith("!"):
        cls = "^" + cls[1:]
      out.append(f"[{cls}]")
      i = j
    else:
      out.append(re.escape(c))
    i += 1
  if depth:
    raise RuleError(f"unclosed '{{' in rule pattern {glob!r}")
  return "".join(out)


class CompiledRules:
  """Rules compiled for matching: first match wins."""

  def __init__(self, rules: Rules):
    self.callable: Callable[[str, Any], Any] | None = None
    self.entries: list[tuple[str, re.Pattern, Any]] = []
    if callable(rules) and not isinstance(rules, Mapping):
      self.callable = rules
      return
    if isinstance(rules, Mapping):
      items: Iterable = rules.items()
    elif isinstance(rules, Sequence) and not isinstance(rules, str):
      items = rules
    else:
      raise RuleError(
          "rules must be a mapping {pattern: spec}, a list of (pattern, spec) pairs, or a "
          f"callable (path, leaf) -> spec | None; got {type(rules).__name__}")
    for item in items:
      if not (isinstance(item, tuple) and len(item) == 2):
        raise RuleError(f"each rule must be a (pattern, spec) pair, got {item!r}")
      pattern, spec = item
      name = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
      self.entries.append((name, compile_pattern(pattern), spec))

  def match(self, path: str, leaf: Any) -> tuple[str | None, Any]:
    """Returns (rule name, spec) for the first rule matching ``path``, or (None, None)."""
    if self.callable is not None:
      spec = self.callable(path, leaf)
      return ("<callable>" if spec is not None else None), spec
    for name, regex, spec in self.entries:
      if regex.fullmatch(path):
        return name, spec
    return None, None

  def patterns_matching(self, path: str) -> list[str]:
    return [name for name, regex, _ in self.entries if regex.fullmatch(path)]


def normalise_rules(rules: Rules) -> CompiledRules:
  return rules if isinstance(rules, CompiledRules) else CompiledRules(rules)


def closest_paths(pattern: str, paths: Sequence[str], n: int = 5) -> list[str]:
  """The paths most like ``pattern``, for error messages."""
  close = difflib.get_close_matches(pattern, paths, n=n, cutoff=0.3)
  if len(close) < n:
    tail = pattern.rsplit("/", 1)[-1].strip("*{}")
    close += [p for p in paths if tail and tail in p and p not in close][: n - len(close)]
  return close or list(paths[:n])
