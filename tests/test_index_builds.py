"""One build per index (issue 18, item 9): the server's workers all open one index for writing; IVF training and
HNSW rebuilds must run in one of them only, and every worker must then hold the same index, so that the same
query gets the same approximate hits from each. Real processes (tests/_index_writer.py --serve) beside this one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from index import maintenance
from index.factory import is_ivf
from index.store import IndexStore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _index_writer import vec  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
QUIET = dict(snapshot_ops=10**9, snapshot_seconds=10**9, follow_interval=0.05)  # no periodic snapshots
CASES = {  # factory: (how the build is made due, when a process is ready, search params that keep it approximate)
    "IVF16,Flat": ("ivf", {"nprobe": 2}),
    "HNSW32,Flat": ("compact", {"ef_search": 16}),
}


class Peer:
    """Another process with the index open for writing, as a second server worker (tests/_index_writer.py --serve)."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_index_writer.py"), str(path), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
        assert self.proc.stdout.readline().strip() == "READY"

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        if self.proc.wait(timeout=60) != 0:
            raise AssertionError(f"peer exited with {self.proc.returncode}")


@pytest.mark.parametrize("factory", list(CASES))
def test_workers_build_once_and_answer_alike(tmp_path, monkeypatch, factory):
    ready, params = CASES[factory]
    here = {"builds": 0}
    for name in ("trained_copy", "rebuilt_copy"):  # count this process's builds too
        def counted(*a, _f=getattr(maintenance, name), **k):
            here["builds"] += 1
            return _f(*a, **k)
        monkeypatch.setattr(maintenance, name, counted)
    path = tmp_path / "ix"
    a = IndexStore.create(path, views={"v": 16}, fingerprint="fp", model_ref="t", factory=factory, **QUIET)
    early = Peer(path)  # open before the build is due: it races this process for it
    late = None
    try:
        xb = np.concatenate([vec(i) for i in range(1200)])
        a.add([f"k{i}" for i in range(1000)], {"v": xb[:1000]})  # 624 vectors make IVF16 due
        if ready == "compact":
            a.remove([f"k{i}" for i in range(300)])  # 30% tombstones make the HNSW graph due

        def done() -> bool:
            v = a._views["v"]
            return is_ivf(v.index) if ready == "ivf" else not v.tomb

        deadline = time.monotonic() + 120
        while not done() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert done(), "the build never reached this process"
        a.add([f"k{i}" for i in range(1000, 1200)], {"v": xb[1000:]})  # writes after the build, replayed alike
        late = Peer(path)  # opened after the build and those writes
        cmd = dict(seq=a.applied_seq, ready=ready, queries=list(range(2000, 2040)) + list(range(400, 440)), k=10,
                   params=params)
        got = [early.ask(**cmd), late.ask(**cmd)]
        D, I = a.search(np.concatenate([vec(q) for q in cmd["queries"]]), "v", 10, **params)
        for g in got:
            assert np.array_equal(np.asarray(g["I"]), I)  # the same hits, in the same order
            assert np.array_equal(np.asarray(g["D"], np.float32), D)  # with bit-identical scores
        assert here["builds"] + sum(g["builds"] for g in got) == 1  # one build for the whole index
        spec = a.manifest["views"]["v"]
        assert spec["builds"] == 1 and spec["snapshot"]["build"] == 1  # the manifest counts it too
        if ready == "compact":
            assert not set(range(300)) & set(I.ravel().tolist())
    finally:
        for p in (early, late):
            if p is not None:
                p.close()
        a.close()
