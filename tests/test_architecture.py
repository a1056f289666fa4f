"""The package's shape: no import cycle among metaopt's modules (imports inside functions included), short
functions, and the layering DESIGN.md draws (estimators and meta-parameter kinds never import each other;
the runner imports no estimator; the core never imports Hydra or wandb); DESIGN.md's layout names every module
and every `metaopt...` name it gives exists."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "metaopt"
DESIGN = (PACKAGE.parent / "DESIGN.md").read_text()
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """metaopt modules that `name` imports anywhere in its file, inside functions and TYPE_CHECKING blocks
    too (`from pkg import mod` depends on pkg.mod, `from pkg import name` on pkg)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def test_no_import_cycle():
    edges = GRAPH
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_function_longer_than_the_limit():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, f"functions longer than {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("low,high", [("metaopt.estimators", "metaopt.metaparams"),
                                      ("metaopt.metaparams", "metaopt.estimators"),
                                      ("metaopt.runner", "metaopt.estimators"),
                                      ("metaopt.runner", "metaopt.planning")])
def test_layers(low, high):
    offenders = [n for n, deps in GRAPH.items() if n.startswith(low) and any(d.startswith(high) for d in deps)]
    assert not offenders, f"{offenders} import {high}"


def test_core_never_imports_hydra_or_wandb():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] in ("hydra", "omegaconf", "wandb") for m in mods), name


def test_design_layout_names_every_module():
    """A module added without its line in DESIGN.md's layout fails here (subpackages count as one line)."""
    layout = DESIGN.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^ {6}(\w+(?:\.py|/))", layout, flags=re.M))
    files = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    packages = {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert files | packages == named, f"missing: {sorted((files | packages) - named)}, stale: {sorted(named - files - packages)}"


def test_every_metaopt_name_in_design_exists():
    names = set(re.findall(r"`(metaopt(?:\.\w+)+)`", DESIGN))
    assert len(names) > 20
    for name in sorted(names):
        module, attribute = name, None
        while module not in MODULES and module != "metaopt":
            module, _, attribute = module.rpartition(".")
        assert attribute is None or hasattr(importlib.import_module(module), attribute), name
