"""The package layering the design promises: ``apps -> inversion -> encoders``, libraries without
argument parsing, no import cycles, and benchmarks that use public names only.

Every ``.py`` file of ``encoders/``, ``inversion/``, ``apps/`` and ``bench/`` is parsed with
``ast``; every import counts, including those inside functions: an import deferred into a
function still ties the two modules together, so cycles are looked for among all imports
except those under ``if TYPE_CHECKING:`` (which never run). ``encoders.core`` is the ground
floor of the ground floor: it imports nothing else of RFI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("encoders", "inversion", "apps")
SCANNED = (*PACKAGES, "bench")
LOWER = {"encoders": {"inversion", "apps"}, "inversion": {"apps"}}  # package -> packages it must not import
LIBRARIES = ("encoders", "inversion")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def files() -> dict[str, Path]:
    return {module_name(p): p for top in SCANNED for p in sorted((ROOT / top).rglob("*.py"))}


MODULES = files()


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def imports(tree: ast.Module, module: str, runtime_only: bool = False) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` of every import (``runtime_only``: those
    that can run, i.e. not under ``if TYPE_CHECKING:``)."""
    package = module if (MODULES.get(module) and MODULES[module].name == "__init__.py") else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, [], child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.append((base, [a.name for a in child.names], child.lineno))
            if isinstance(child, ast.If) and _is_type_checking(child):
                if not runtime_only:
                    visit(child)
            else:
                visit(child)

    visit(tree)
    return found


TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def test_layers_point_one_way():
    """encoders imports neither inversion nor apps; inversion does not import apps."""
    bad = []
    for module, tree in TREES.items():
        banned = LOWER.get(module.split(".")[0], set())
        for target, _names, line in imports(tree, module):
            if target.split(".")[0] in banned:
                bad.append(f"{_where(module, line)}: {module} imports {target}")
    assert not bad, "imports against apps -> inversion -> encoders:\n" + "\n".join(bad)


def test_libraries_parse_no_arguments():
    """Argument parsing lives in apps/ (apps/commands/): encoders/ and inversion/ never import argparse."""
    bad = [
        f"{_where(m, line)}: {m} imports argparse"
        for m, tree in TREES.items()
        if m.split(".")[0] in LIBRARIES
        for target, _, line in imports(tree, m)
        if target == "argparse"
    ]
    assert not bad, "\n".join(bad)


def _resolve(target: str, names: list[str]) -> list[str]:
    """Our modules an import statement loads: ``from pkg import sub`` names the submodule ``pkg.sub``."""
    if not _ours(target):
        return []
    out = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    if len(out) < len(names) or not names:  # a name defined in ``target`` itself (or a plain import)
        out.append(target) if target in MODULES else None
    return out


def module_graph(trees: dict[str, ast.Module] | None = None) -> dict[str, set[str]]:
    """Import edges between our modules, imports inside functions included (``TYPE_CHECKING`` excluded)."""
    return {
        m: {t for target, names, _ in imports(tree, m, runtime_only=True) for t in _resolve(target, names) if t != m}
        for m, tree in (TREES if trees is None else trees).items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_find_cycles_finds_one():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    """No two modules import each other, directly or through others, even inside functions."""
    cycles = find_cycles(module_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_a_cycle_through_a_function_level_import_is_found():
    """A deferred import is still an edge; an import under ``if TYPE_CHECKING:`` is not."""
    a, b = next(m for m in MODULES if m.startswith("inversion.")), next(m for m in MODULES if m.startswith("apps."))
    deferred = {a: ast.parse(f"import os\ndef f():\n    import {b}\n"), b: ast.parse(f"from {a} import x\n")}
    assert find_cycles(module_graph(deferred)) == [sorted([a, b])]
    typing_only = {
        a: ast.parse(f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import {b}\n"),
        b: ast.parse(f"from {a} import x\n"),
    }
    assert find_cycles(module_graph(typing_only)) == []


def test_core_imports_nothing_else_of_rfi():
    """``encoders.core`` (config, errors, files, image IO, run folders, runtime) stands on its own."""
    bad = [
        f"{_where(m, line)}: {m} imports {target}"
        for m, tree in TREES.items()
        if m.startswith("encoders.core")
        for target, _, line in imports(tree, m)
        if _ours(target) and not target.startswith("encoders.core")
    ]
    assert not bad, "encoders.core imports the rest of RFI:\n" + "\n".join(bad)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(tree: ast.Module, module: str) -> list[str]:
    """``from ours import _name`` and ``ours_module._name`` in ``tree``."""
    bad, bound = [], {}  # local name -> our module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _ours(a.name):
                    bound[a.asname or a.name.split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and _ours(node.module):
            for a in node.names:
                if _private(a.name):
                    bad.append(f"{_where(module, node.lineno)}: from {node.module} import {a.name}")
                elif f"{node.module}.{a.name}" in MODULES:
                    bound[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                bad.append(f"{_where(module, node.lineno)}: {ast.unparse(node)}")
    return bad


def test_private_uses_are_found():
    tree = ast.parse(
        "from encoders.robust.train import _Trainer\nimport inversion.train as t\nt._DecoderTrainer\n"
        "from encoders import data\ndata._x\nimport os\nos._exit\n"
    )
    module = next(iter(MODULES))
    assert [b.split(": ", 1)[1] for b in private_uses(tree, module)] == [
        "from encoders.robust.train import _Trainer",
        "t._DecoderTrainer",
        "data._x",
    ]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] == "bench"))
def test_bench_uses_public_names_only(module):
    """Benchmarks time the library through its public API, never through private names."""
    bad = private_uses(TREES[module], module)
    assert not bad, f"{module} uses private names:\n" + "\n".join(bad)
