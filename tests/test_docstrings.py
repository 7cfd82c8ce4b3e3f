"""The examples in the public docstrings run, and say what they show.

Examples that would run a whole sweep are marked ``+SKIP`` (the README's tour,
tests/test_api.py, runs that path for real); every other example is executed.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["r2sweep", "r2sweep.api.sweep", "r2sweep.api.readers", "r2sweep.api.trial",
           "r2sweep.core.config.sweep", "r2sweep.core.config.trial",
           "r2sweep.core.config.overrides", "r2sweep.api.study"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name: str) -> None:
    module = importlib.import_module(name)
    examples = sum(len(test.examples) for test in doctest.DocTestFinder().find(module))
    assert examples > 0, f"{name} lost its examples"
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
