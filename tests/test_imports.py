"""The packages import one way (docs/ARCHITECTURE.md): models at the bottom, index above it, train and serving on
top, loadtests outside. The graph is read from the source with ast, imports inside functions included (an import
moved into a function to dodge a cycle still closes it here), so it holds whatever runs first."""
import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("models", "train", "index", "serving", "loadtests")
# package -> what it must never import (the packages above it, and torch where the runtime must not need it)
FORBIDDEN = {
    "models": ("train", "index", "serving", "loadtests"),
    "index": ("train", "serving", "loadtests", "torch"),
    "train": ("serving", "loadtests"),
    "serving": ("train", "loadtests", "torch"),
}


def modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((Path(ROOT) / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (absolute names, relative imports resolved), at any depth of its code."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # from pkg import module
    return found


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between the packages' modules, every imported name per module)."""
    mods = modules()
    edges, names = {}, {}
    for m, f in mods.items():
        names[m] = imported(m, f)
        edges[m] = set()
        for n in names[m]:
            while n and n not in mods:  # pkg.module.attribute -> pkg.module
                n = n.rpartition(".")[0]
            if n and n != m and not m.startswith(n + "."):  # a package's own __init__ is not an edge back
                edges[m].add(n)
    return edges, names


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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


def test_the_graph_is_read():
    edges, _ = graph()
    assert {"models.runtime", "train.pretrain", "index.store", "serving.service", "loadtests.plan"} <= set(edges)
    assert "models.card" in edges["models.runtime"] and "index.manifest" in edges["index.store"]
    assert "train.model" in edges["train.export"]  # relative imports resolve


def test_no_import_cycle():
    assert cycles(graph()[0]) == []


def test_a_cycle_would_be_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_layers_point_down(pkg):
    _, names = graph()
    bad = {m: sorted(n for n in ns if n.split(".")[0] in FORBIDDEN[pkg])
           for m, ns in names.items() if m.split(".")[0] == pkg}
    assert {m: b for m, b in bad.items() if b} == {}, f"{pkg}/ imports a package it must not"
