"""The ``>>>`` examples in the docstrings of every module of ``encoders``, ``inversion`` and ``apps`` run as tests.

One test per module (found by walking the packages, so new modules are picked up): it imports the
module (importing must have no side effects beyond definitions) and runs its examples with the
standard :mod:`doctest` runner (no option flags; an example opts in with ``# doctest: +ELLIPSIS``
and the like). Examples that train or need downloads are marked ``# doctest: +SKIP``. The examples
run from the repository root (some read ``configs/...``), on one thread, after ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("encoders", "inversion", "apps")

pytestmark = pytest.mark.usefixtures("one_thread")


def module_names() -> list[str]:
    """Every module of the packages, found from the files (nothing is imported to list them)."""
    names = []
    for package in PACKAGES:
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages([str(ROOT / package)], package + ".")]
    return sorted(names)


@pytest.mark.parametrize("name", module_names())
def test_docstring_examples(name, monkeypatch):
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module, name)
    examples = sum(len(t.examples) for t in tests)
    written = len(re.findall(r"^\s*>>>", Path(module.__file__).read_text(), flags=re.M))
    assert examples == written, f"{name}: {written} '>>>' lines in the file, but only {examples} found as examples"
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    runner = doctest.DocTestRunner(verbose=False)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
