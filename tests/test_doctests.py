"""Every example in a docstring runs and prints what it says.

The modules are found by their source, not listed by hand, and each must run as many examples as
its source has `>>>` lines: a module whose examples doctest cannot find (a docstring turned into
a comment, an example in a string doctest does not read) fails instead of passing with nothing run.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

import scalestudy

PACKAGE = Path(scalestudy.__file__).parent
EXAMPLE = re.compile(r"^\s*>>> ", re.MULTILINE)


def modules_with_examples() -> dict[str, int]:
    """Dotted module name → how many `>>>` lines its source has, for every module with one."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        count = len(EXAMPLE.findall(path.read_text()))
        if count:
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = count
    return found


MODULES = modules_with_examples()


def test_the_modules_known_to_have_examples_are_found():
    assert {"scalestudy.losses", "scalestudy.analysis.labels"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_docstring_example_of_the_module_runs_and_passes(name: str):
    result = doctest.testmod(importlib.import_module(name), verbose=False)
    assert result.attempted == MODULES[name], (
        f"{name} has {MODULES[name]} `>>>` lines but doctest ran {result.attempted} examples")
    assert result.failed == 0
