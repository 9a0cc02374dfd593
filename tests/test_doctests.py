"""Runs the `>>>` examples in the public API's docstrings."""

import doctest
import importlib

import pytest

MODULES = ["jlora", "jlora._adapter", "jlora._methods.lora", "jlora._methods.lora_init", "jlora._spec",
           "jlora._tree", "jlora._optim", "jlora._summary", "jlora._lora", "jlora._paths",
           "jlora._checkpoint"]


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
