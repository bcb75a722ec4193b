"""The layout the architecture promises (docs/architecture.md): no import cycle, ``targets`` and the training side
apart, no module over 400 lines, no function over 80. Parsed from the source, so it fails on the line that breaks it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compressor", "targets")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# the training side: what must never import targets (only the pipeline layer joins the two)
TRAINING_SIDE = ("compressor.core", "compressor.data", "compressor.kernels", "compressor.students",
                 "compressor.teachers", "compressor.training", "compressor.config", "compressor.demo",
                 "compressor.inspect", "compressor.options")


def modules() -> dict[str, Path]:
    """Every module of the two packages by dotted name (a package by its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (function-level imports count: they still run)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                out.add(child if child in known else node.module)
    return {name for name in out if name in known}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_compressor_or_targets():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_targets_imports_only_the_floor_of_compressor():
    bad = [(name, dep) for name, deps in import_graph().items() if name.startswith("targets")
           for dep in deps if dep.startswith("compressor") and not dep.startswith("compressor.core")]
    assert not bad, f"targets/ imports training code (only compressor.core is shared): {bad}"


def test_the_training_side_never_imports_targets():
    bad = [(name, dep) for name, deps in import_graph().items()
           if name.startswith(TRAINING_SIDE) for dep in deps if dep.startswith("targets")]
    assert not bad, f"only compressor.pipeline, compressor.cli and compressor.deployment may import targets: {bad}"


def test_no_module_over_400_lines(capsys):
    lengths = sorted(((len(path.read_text().splitlines()), name) for name, path in modules().items()), reverse=True)
    with capsys.disabled():
        print("\nlongest modules: " + ", ".join(f"{name} {lines}" for lines, name in lengths[:5]))
    assert lengths[0][0] <= MAX_MODULE_LINES, f"{lengths[0][1]} has {lengths[0][0]} lines; split it"


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_function_over_80_lines(name):
    path = modules()[name]
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(ROOT)}: {', '.join(long)}"
