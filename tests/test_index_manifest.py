"""One owner per index file and idea: index.manifest alone names manifest.json, Journal.transaction runs every write
with its failure hook, SQLite lists go in as one JSON parameter, and ANN recall is computed in index.recall."""
import ast
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from index import manifest as mf
from index.journal import Journal
from index.recall import exact_knn, overlap


def _strings(path: Path) -> list[str]:
    """String constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def test_only_index_manifest_names_the_manifest_file():
    files = [f for pkg in ("models", "train", "index", "serving", "loadtests") for f in (Path(ROOT) / pkg).rglob("*.py")]
    naming = sorted(str(f.relative_to(ROOT)) for f in files if any("manifest.json" in s for s in _strings(f)))
    assert naming == ["index/manifest.py"]


def test_advance_rotates_snapshots_and_keeps_a_recovered_previous():
    disk = {"views": {"v": mf.view_entry("v", 4, "ip", "IDMap2,Flat"), "w": mf.view_entry("w", 4, "ip", "IDMap2,Flat")}}
    one = mf.advance(disk, {"v": {"file": "v.1.a.faiss", "sha256": "s1", "seq": 1},
                            "w": {"file": "w.1.a.faiss", "sha256": "t1", "seq": 1}},
                     {"v": {"count": 1, "build": 0}, "w": {"count": 1}})
    assert disk["views"]["v"]["snapshot"] is None  # advance never edits the committed manifest
    two = mf.advance(one, {"v": {"file": "v.2.b.faiss", "sha256": "s2", "seq": 2}}, {"v": {"count": 2, "build": 1}},
                     bad={mf.entry_id(one["views"]["w"]["snapshot"])})
    v, w = two["views"]["v"], two["views"]["w"]
    assert v["snapshot"] == {"file": "v.2.b.faiss", "sha256": "s2", "seq": 2, "build": 1} and v["count"] == 2
    assert v["previous"] == {"file": "v.1.a.faiss", "sha256": "s1", "seq": 1, "build": 0}
    assert w == one["views"]["w"] and mf.manifest_seq(two) == 1
    assert mf.named_files(two) == {"v.2.b.faiss", "v.1.a.faiss", "w.1.a.faiss"}


class _Failing:
    """The write connection, except that one statement fails (as a full disk or a busy database would)."""

    def __init__(self, conn, sql):
        self.conn, self.sql = conn, sql

    def __getattr__(self, name):
        return getattr(self.conn, name)

    def execute(self, sql, *a):
        if sql == self.sql:
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *a)


def test_transaction_commits_once_and_calls_its_failure_hook(tmp_path):
    jr = Journal(tmp_path, readonly=False)
    seen = []

    def hook(e, stage):
        seen.append(stage)
        return RuntimeError(f"{stage}: {e}") if isinstance(e, sqlite3.Error) else None

    def add(conn, key):
        Journal.insert_add(conn, [key], ["{}"], '["v"]', lambda ids: b"x")

    with jr.transaction(hook) as conn:
        add(conn, "a")
    with jr.transaction(hook) as conn:
        add(conn, "b")
        jr.commit()  # early, as a writer does under its own lock; the block's end does not commit again
    with pytest.raises(KeyError), jr.transaction(hook) as conn:
        add(conn, "c")
        raise KeyError("not a database error: raised as it is, rolled back")
    real = jr.write
    for sql, stage in (("BEGIN IMMEDIATE", "begin"), ("COMMIT", "commit")):
        jr.write = _Failing(real, sql)
        with pytest.raises(RuntimeError, match=f"^{stage}: database or disk is full") as e, \
                jr.transaction(hook) as conn:
            add(conn, "d")
        assert isinstance(e.value.__cause__, sqlite3.OperationalError)
    jr.write = real
    assert seen == ["body", "begin", "commit"]
    assert sorted(Journal.rows_for(jr.read, ["a", "b", "c", "d"])) == ["a", "b"]
    jr.close()


def test_lists_of_any_length_go_in_as_one_parameter(tmp_path):
    jr = Journal(tmp_path, readonly=False)
    keys = [f"k{i}" for i in range(5000)] + ["é", "😀", 'q"uote', "back\\slash", "line\nbreak"]
    with jr.transaction() as conn:
        ids, _ = Journal.insert_add(conn, keys, ['{"m": 1}'] * len(keys), '["v"]', lambda ids: b"x")
    rows = Journal.rows_for(jr.read, keys + ["absent"])
    assert [rows[k][0] for k in keys] == ids.tolist() and "absent" not in rows
    items = Journal.items_by_id(jr.read, ids.tolist())
    assert [items[i]["key"] for i in ids.tolist()] == keys
    jr.close()


def test_recall_is_the_mean_overlap_with_exact_neighbours():
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((500, 16)).astype(np.float32)
    xq = rng.standard_normal((40, 16)).astype(np.float32)
    _, gt = exact_knn(xq, xb, 10)
    assert (gt == np.argsort(-(xq @ xb.T), axis=1)[:, :10]).all()
    I = gt.copy()
    I[:, 7:] = -1  # an ANN search that found 7 of 10
    I[::2, 0] = 499  # and, in every other query, a wrong first hit (the true one may be 499 itself)
    want = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I.tolist(), gt.tolist())])
    assert overlap(I, gt) == pytest.approx(want, abs=1e-12) and overlap(gt, gt) == 1.0
    assert overlap(I, gt, k=5) == pytest.approx(np.mean([len(set(a[:5]) & set(b[:5])) / 5
                                                          for a, b in zip(I.tolist(), gt.tolist())]), abs=1e-12)
