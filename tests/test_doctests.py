"""Runs the `>>>` examples in the public API's docstrings."""

import doctest
import re
from pathlib import Path
import importlib

import pytest

MODULES = ["jlora", "jlora._adapter", "jlora._methods.lora", "jlora._methods.lora_init", "jlora._methods.dora",
           "jlora._spec", "jlora._tree", "jlora._optim", "jlora._summary", "jlora._lora", "jlora._paths",
           "jlora._checkpoint", "jlora._multi", "jlora._methods.stacked", "jlora._methods.adalora",
           "jlora._methods.prompt", "jlora._methods.bottleneck"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0


def test_every_public_name_has_a_docstring_with_an_example():
  import jlora
  missing = []
  for name in jlora.__all__:
    obj = getattr(jlora, name)
    if isinstance(obj, type) and issubclass(obj, Exception):
      continue
    if type(obj).__name__ == "module":
      continue
    doc = obj.__doc__ or ""
    if ">>>" not in doc:
      missing.append(name)
  assert not missing, f"public names without a docstring example: {missing}"


_DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("doc", sorted(p.name for p in _DOCS.glob("method_*.md")) + ["ARCHITECTURE.md", "multi_adapter.md"])
def test_method_docs_examples_run(doc):
  """The runnable examples of each method's page (and of how to add a method) run as printed."""
  text = (_DOCS / doc).read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, f"{doc} has no python example"
  scope: dict = {}
  for block in blocks:
    exec(compile(block, str(_DOCS / doc), "exec"), scope)  # noqa: S102
