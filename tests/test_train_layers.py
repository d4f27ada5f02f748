"""train/ imports one way: no cycle among its modules, no import of a train module inside a function (the way
a cycle used to be dodged), and train.gpu_check (through train.pretrain) does not load onnx or onnxruntime."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

TRAIN = Path(ROOT) / "train"


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(train modules imported at module level, train modules imported inside a function) of one file."""
    tree = ast.parse(path.read_text())
    top, inner = set(), []

    def names(node) -> list[str]:
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y, from . import x
                return [f"train.{node.module}"] if node.module else [f"train.{a.name}" for a in node.names]
            return [node.module] if (node.module or "").startswith("train") else []
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name.startswith("train")]
        return []

    for node in tree.body:
        top.update(names(node))
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner += [n for node in ast.walk(fn) for n in names(node)]
    return top, inner


def test_train_modules_import_downward_only():
    graph, inner = {}, {}
    for f in sorted(TRAIN.glob("*.py")):
        mod = "train" if f.stem == "__init__" else f"train.{f.stem}"
        graph[mod], inner[mod] = _imports(f)
    assert {m: i for m, i in inner.items() if i} == {}, "a train module imported inside a function"
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [m, n])}"
            if n in graph and not state.get(n):
                visit(n, path + [m])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [])


def test_gpu_check_does_not_load_onnx():
    code = ("import sys, train.gpu_check; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'matplotlib', 'faiss') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
