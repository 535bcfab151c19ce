"""The package's layering, read from the source: no import cycles, no imports that run upward.

Every ``import`` / ``from ... import`` statement in ``llm_finetune/``, ``tasks/`` and ``workflows/``
is parsed (including those inside functions, which hide cycles from Python at import time but
still tie two modules to each other's internals). Layers, bottom to top: the Flyte-free core
``llm_finetune``, the ``tasks`` that wrap it, the ``workflows`` that compose them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llm_finetune", "tasks", "workflows")
LAYER = {"llm_finetune": 0, "tasks": 1, "workflows": 2}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (``pkg.mod.attr`` -> ``pkg.mod``), or None outside the project."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_edges() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                dep = _resolve(t, known)
                # a package's __init__ is not a dependency of its own modules (from pkg import sub)
                if dep and dep != mod and not (mod.startswith(dep + ".") and known[dep].name == "__init__.py"):
                    edges[mod].add(dep)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The parser itself, on a known graph: a cycle hidden in a function and a relative import are both found."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    found = import_edges()
    # tasks/data.py imports tasks.preference_data inside a function or at the top: either way it is an edge
    assert "llm_finetune.config" in found["tasks.train"]
    assert sum(len(v) for v in found.values()) > 100


def test_no_import_cycles():
    assert cycles(import_edges()) == []


def test_no_upward_imports():
    upward = [(m, d) for m, deps in import_edges().items() for d in deps
              if LAYER[d.split(".")[0]] > LAYER[m.split(".")[0]]]
    assert upward == []
