"""IndexStore: exact/ANN recall, add/remove semantics, durability (WAL, kill -9, corruption), concurrency."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index.factory import choose_factory, normalize_factory
from index.store import DuplicateKeyError, IndexStore, NotWritableError, StoreError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _index_writer import vec  # noqa: E402


def unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # (n, dim)


def clustered(n: int, dim: int, n_clusters: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, n_clusters, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_topk(xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :k]


def recall(I: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(I.tolist(), gt.tolist())]))


def make(tmp_path: Path, factory: str = "Flat", dim: int = 16, name: str = "ix", **kw) -> IndexStore:
    return IndexStore.create(tmp_path / name, views={"v": dim, "w": dim}, fingerprint="fp-A",
                             model_ref="cmc:test", factory=factory, **kw)


def keys_of(n: int, start: int = 0) -> list[str]:
    return [f"k{i}" for i in range(start, start + n)]


# ---------------------------------------------------------------- recall
def test_exact_recall(tmp_path):
    xb, xq = unit(2000, 16), unit(50, 16, seed=1)
    s = make(tmp_path)
    ids = s.add(keys_of(2000), {"v": xb})
    assert ids.dtype == np.int64 and list(ids) == list(range(2000))
    _, I = s.search(xb[:200], "v", 1)
    assert (I[:, 0] == ids[:200]).all()  # recall@1 = 1.0 on stored vectors
    D, I = s.search(xq, "v", 10)
    assert D.dtype == np.float32 and I.shape == (50, 10)
    assert recall(I, exact_topk(xq, xb, 10)) == 1.0
    np.testing.assert_allclose(D, np.sort(xq @ xb.T, axis=1)[:, ::-1][:, :10], atol=1e-5)
    assert s.count() == {"v": 2000, "w": 0} and s.count("w") == 0
    s.close()


@pytest.mark.parametrize("factory", ["HNSW32,Flat", "IVF64,Flat"])
def test_ann_recall(tmp_path, factory):
    xb, xq = clustered(5000, 32), clustered(100, 32, seed=7)
    s = make(tmp_path, factory, dim=32)
    for start in range(0, 5000, 1000):  # chunked adds: IVF trains once 39*64 vectors have arrived
        s.add(keys_of(1000, start), {"v": xb[start:start + 1000]})
    assert s.manifest["views"]["v"]["factory"] == normalize_factory(factory)
    gt = exact_topk(xq, xb, 10)
    _, I = s.search(xq, "v", 10)
    assert recall(I, gt) >= 0.9
    tuned = s.tune_search("v", xq, gt, k=10, target_recall=0.95)
    assert tuned["recall"] >= 0.95
    s.close()


def test_choose_factory():
    assert choose_factory(10_000, 128) == "IDMap2,Flat"
    assert choose_factory(500_000, 128).startswith("IVF") and choose_factory(500_000, 128).endswith(",Flat")
    assert choose_factory(1_000_000, 128, 2048) == "IVF4096,Flat"
    assert choose_factory(8_000_000, 128, 16384) == "IDMap2,HNSW32,Flat"
    assert ",PQ" in choose_factory(100_000_000, 128, 2048)


# ---------------------------------------------------------------- semantics
@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat", "IVF16,Flat"])
def test_add_remove_search(tmp_path, factory):
    xb = clustered(1500, 16)
    s = make(tmp_path, factory)
    s.add(keys_of(1500), {"v": xb, "w": xb[:, ::-1]}, [{"i": i} for i in range(1500)])
    assert s.remove(keys_of(600)) == 600  # HNSW: > 20% tombstones triggers a rebuild
    assert s.remove(["k700"]) == 1
    gone = set(range(600)) | {700}
    for view in ("v", "w"):
        _, I = s.search(xb if view == "v" else np.ascontiguousarray(xb[:, ::-1]), view, 10)
        assert not gone & set(I.ravel().tolist())
        assert (I[600:700, 0] == np.arange(600, 700)).all()
    assert s.count() == {"v": 899, "w": 899} and len(s) == 899
    items = s.search_items(xb[800], "v", 3)
    assert items[0][0]["key"] == "k800" and items[0][0]["metadata"] == {"i": 800}
    assert s.lookup([800, -1, 5]) == [{"id": 800, "key": "k800", "metadata": {"i": 800}}, None, None]
    s.close()


def test_validation_changes_nothing(tmp_path):
    xb = unit(20, 16)
    s = make(tmp_path)
    s.add(keys_of(10), {"v": xb[:10]})
    before = (s.count(), len(s))
    with pytest.raises(StoreError, match="'k3'"):
        s.add(["new1", "k3"], {"v": xb[10:12]})
    with pytest.raises(StoreError, match="duplicate key 'a'"):
        s.add(["a", "a"], {"v": xb[10:12]})
    with pytest.raises(StoreError, match="shape"):
        s.add(["a"], {"v": unit(1, 8)})
    with pytest.raises(StoreError, match="int64"):
        s.add(["a"], {"v": np.ones((1, 16), dtype=np.int64)})
    bad = xb[10:11].copy()
    bad[0, 3] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        s.add(["a"], {"v": bad})
    with pytest.raises(StoreError, match="unknown view 'z'"):
        s.add(["a"], {"z": xb[10:11]})
    with pytest.raises(StoreError, match="2 vectors for 1 keys"):
        s.add(["a"], {"v": xb[10:12]})
    with pytest.raises(StoreError, match="'nope'"):
        s.remove(["k1", "nope"])
    with pytest.raises(StoreError, match="shape"):
        s.search(unit(1, 8), "v", 3)
    assert (s.count(), len(s)) == before and s.ids_of(["k1", "a"]) == [1, None]
    s.add(["a"], {"v": xb[10:11].astype(np.float64)})  # float64 is cast
    s.close()


# ---------------------------------------------------------------- persistence
@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat", "IVF16,Flat"])
def test_reopen_identical(tmp_path, factory):
    xb, xq = clustered(1200, 16), clustered(30, 16, seed=3)
    s = make(tmp_path, factory)
    s.add(keys_of(1200), {"v": xb})
    s.remove(keys_of(100, 50))
    D, I = s.search(xq, "v", 10)
    s.close()
    s = IndexStore.open(tmp_path / "ix", fingerprint="fp-A")
    D2, I2 = s.search(xq, "v", 10)
    assert (I == I2).all() and np.allclose(D, D2)
    assert s.count("v") == 1100
    s.close()


def _crash_script(path: Path, code: str) -> None:
    prog = ("import os, numpy as np\nfrom index.store import IndexStore\n"
            f"s = IndexStore.open({str(path)!r}, snapshot_ops=3)\n{code}\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", prog], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_wal_replay_after_crash(tmp_path):
    s = make(tmp_path, "HNSW32,Flat")
    s.close()
    # 5 adds + 1 remove with snapshot_ops=3: a snapshot in the middle, then log entries after it
    _crash_script(tmp_path / "ix", "for i in range(5):\n"
                  "    x = np.random.default_rng(i).standard_normal((10, 16)).astype('float32')\n"
                  "    s.add([f'k{i}_{j}' for j in range(10)], {'v': x / np.linalg.norm(x, axis=1, keepdims=True)})\n"
                  "s.remove(['k0_0', 'k4_9'])")
    s = IndexStore.open(tmp_path / "ix")
    assert len(s) == 48 and s.count("v") == 48
    x = np.random.default_rng(4).standard_normal((10, 16)).astype(np.float32)
    _, I = s.search(x / np.linalg.norm(x, axis=1, keepdims=True), "v", 1)
    assert [it["key"] for it in s.lookup(I[:9, 0])] == [f"k4_{j}" for j in range(9)]
    assert 49 not in I  # id of k4_9
    s.close()


def test_kill9_keeps_acknowledged(tmp_path):
    make(tmp_path, "HNSW32,Flat").close()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_index_writer.py"), str(tmp_path / "ix")],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    acked = [proc.stdout.readline().strip() for _ in range(40)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    s = IndexStore.open(tmp_path / "ix")
    ids = s.ids_of(acked)
    assert None not in ids
    for key, i in zip(acked, ids):
        _, I = s.search(vec(int(key[1:])), "v", 1)
        assert I[0, 0] == i
    s.close()


def test_corrupt_file_falls_back_to_previous(tmp_path):
    xb, xq = unit(300, 16), unit(20, 16, seed=5)
    s = make(tmp_path)
    s.add(keys_of(200), {"v": xb[:200]})
    s.snapshot()
    D1, I1 = s.search(xq, "v", 5)
    s.add(keys_of(100, 200), {"v": xb[200:]})
    s.snapshot()
    D2, I2 = s.search(xq, "v", 5)
    s.close()
    spec = json.loads((tmp_path / "ix" / "manifest.json").read_text())["views"]["v"]
    f, prev = tmp_path / "ix" / spec["snapshot"]["file"], tmp_path / "ix" / spec["previous"]["file"]
    assert f != prev and spec["previous"]["seq"] < spec["snapshot"]["seq"]
    f.write_bytes(f.read_bytes()[:100])  # truncate the current snapshot
    with pytest.raises(StoreError, match=re.escape(f.name) + r" is corrupt or truncated.*recover=True"):
        IndexStore.open(tmp_path / "ix")
    # the previous snapshot alone is what the first snapshot held
    import faiss
    Dp, Ip = faiss.read_index(str(prev)).search(xq, 5)
    assert (Ip == I1).all() and np.allclose(Dp, D1)
    # recover: previous snapshot + log replay = the last acknowledged state
    s = IndexStore.open(tmp_path / "ix", recover=True)
    D3, I3 = s.search(xq, "v", 5)
    assert (I3 == I2).all() and np.allclose(D3, D2)
    s.close()
    s = IndexStore.open(tmp_path / "ix")  # recovery wrote a fresh snapshot
    assert s.count("v") == 300
    s.close()


def test_only_named_files_are_kept(tmp_path):
    s = make(tmp_path)
    for i in range(4):
        s.add(keys_of(10, 10 * i), {"v": unit(10, 16, seed=i)})
        s.snapshot()
    s.close()
    m = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    named = {sp[w]["file"] for sp in m["views"].values() for w in ("snapshot", "previous")}
    assert {p.name for p in (tmp_path / "ix").glob("*.faiss*")} == named and len(named) == 4


def test_hnsw_tombstones_are_rebuilt_off_the_request_path(tmp_path, monkeypatch):
    """Past TOMBSTONE_REBUILD a remove only tombstones; the rebuild builds a copy with no lock held, and the
    writes that land meanwhile are replayed into it before the swap."""
    import index.maintenance as maint
    from index.viewindex import TOMBSTONE_INLINE, TOMBSTONE_REBUILD
    xb = clustered(1500, 16)
    s = make(tmp_path, "HNSW32,Flat", follow=False)
    s.add(keys_of(1500), {"v": xb, "w": xb[:, ::-1]})
    assert TOMBSTONE_REBUILD < 400 / 1500 < TOMBSTONE_INLINE
    s.remove(keys_of(400))  # the remove itself does not rebuild
    v = s._views["v"]
    assert v.index.ntotal == 1500 and len(v.tomb) == 400 and v.due_for_rebuild
    extra = unit(1, 16, seed=9)
    build, calls = maint.rebuilt_copy, []

    def meanwhile(*args):
        out = build(*args)
        if not calls:  # while the first view's copy is built, a write and a remove land
            calls.append(1)
            s.add(["new"], {"v": extra, "w": extra[:, ::-1]})
            s.remove(["k500"])
        return out

    monkeypatch.setattr(maint, "rebuilt_copy", meanwhile)
    s._views_due()
    # v: built from the state before the write and the remove, which were replayed into the copy; w: built
    # after them (the remove of k500 is one of its tombstones), so nothing to replay
    (v, w) = s._views["v"], s._views["w"]
    assert v.index.ntotal == 1101 and v.tomb == {500} and not v.due_for_rebuild
    assert w.index.ntotal == 1100 and w.tomb == set()
    assert s.count() == {"v": 1100, "w": 1100}
    _, I = s.search(np.vstack([xb, extra]), "v", 5)
    assert not (set(range(400)) | {500}) & set(I.ravel().tolist())
    assert I[-1, 0] == 1500 and (I[600:700, 0] == np.arange(600, 700)).all()  # the new item, and the rest
    s.close()
    with IndexStore.open(tmp_path / "ix") as t:  # and it reopens to the same items
        assert len(t) == 1100 and t.ids_of(["new", "k500", "k0"]) == [1500, None, None]


def test_hnsw_rebuild_runs_in_the_background_thread(tmp_path):
    xb = clustered(1000, 16)
    s = make(tmp_path, "HNSW32,Flat", follow_interval=0.05)
    s.add(keys_of(1000), {"v": xb, "w": xb})
    s.remove(keys_of(300))
    deadline = time.monotonic() + 60
    while any(v.tomb for v in s._views.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(v.index.ntotal == 700 and not v.tomb for v in s._views.values())
    _, I = s.search(xb, "v", 1)
    assert (I[300:, 0] == np.arange(300, 1000)).mean() > 0.95 and not set(range(300)) & set(I.ravel().tolist())
    s.close()


def test_search_items_never_drops_a_hit_removed_by_another_writer_mid_search(tmp_path):
    """Two writers of one index (as two server workers are): one removes a hit after the other searched its
    views but before it read the items. The searcher catches up and searches again: k items, none removed."""
    a = make(tmp_path, follow=False)
    x = unit(50, 16, seed=3)
    a.add(keys_of(50), {"v": x, "w": x})
    b = IndexStore.open(tmp_path / "ix", follow=False)
    q = x[:1]
    top = b.search_items(q, "v", 5)[0][0]["key"]
    assert top == "k0"
    search, calls = b._search, []

    def racing(*args):
        out = search(*args)
        if not calls:  # the first search only: the other writer removes the top hit right after it
            calls.append(1)
            a.remove([top])
        return out

    b._search = racing
    hits = b.search_items(q, "v", 5)[0]
    keys = [h["key"] for h in hits]
    assert calls and len(hits) == 5 and top not in keys, keys
    gt = exact_topk(q, x[1:], 5)[0] + 1  # the exact top 5 of what is left
    assert keys == [f"k{i}" for i in gt]
    a.close()
    b.close()


def test_fingerprint_and_processes(tmp_path):
    s = make(tmp_path)
    with pytest.raises(StoreError, match="fp-A.*fp-B"):
        IndexStore.open(tmp_path / "ix", fingerprint="fp-B")
    t = IndexStore.open(tmp_path / "ix")  # several writers may open one directory
    s.add(["a"], {"v": unit(1, 16)})
    assert t.ids_of(["a"]) == [0] and t.count("v") == 1  # followed at once
    with pytest.raises(DuplicateKeyError, match="'a' already exists"):
        t.add(["a"], {"v": unit(1, 16)})
    t.add(["b"], {"v": unit(1, 16, seed=1)})
    r = IndexStore.open(tmp_path / "ix", readonly=True)
    assert r.count("v") == 2
    with pytest.raises(NotWritableError, match="readonly"):
        r.add(["c"], {"v": unit(1, 16)})
    s.add(["c"], {"v": unit(1, 16, seed=2)})
    assert r.count("v") == 3 and r.search(unit(1, 16, seed=2), "v", 1)[1][0, 0] == 2  # readers follow too
    r.close()
    t.close()
    s.close()
    with pytest.raises(NotWritableError, match="closed"):
        s.search(unit(1, 16), "v", 1)
    with pytest.raises(NotWritableError, match="closed"):
        s.lookup([0])
    with pytest.raises(StoreError, match="already exists"):
        make(tmp_path)


# ---------------------------------------------------------------- concurrency
@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat"])
def test_concurrent_search_during_writes(tmp_path, factory):
    xb = unit(1200, 16)
    s = make(tmp_path, factory, snapshot_ops=25)
    s.add(keys_of(200), {"v": xb[:200]}, [{"i": i} for i in range(200)])
    stop, errors, seen = threading.Event(), [], set()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                for row in s.search_items(xb[rng.integers(0, 1200, 4)], "v", 5):
                    for it in row:
                        assert it["metadata"] == {"i": int(it["key"][1:])}
                        seen.add(it["key"])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    alive = set(keys_of(200))
    for start in range(200, 1200, 20):
        ks = keys_of(20, start)
        s.add(ks, {"v": xb[start:start + 20]}, [{"i": i} for i in range(start, start + 20)])
        alive |= set(ks)
        drop = sorted(alive)[:7]
        s.remove(drop)
        alive -= set(drop)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert seen
    assert len(s) == len(alive) == s.count("v")
    _, I = s.search(xb, "v", 1)
    live_ids = set(i for i in s.ids_of(sorted(alive)))
    assert set(I[:, 0].tolist()) <= live_ids
    s.close()


def test_rebuild_bench_runs_both_modes(tmp_path, capsys):
    from index.rebuild_bench import main, run
    x = unit(2000, 8, seed=4)
    rows = [run(m, x, str(tmp_path)) for m in ("inline", "background")]
    assert [r["live"] for r in rows] == [2000 - 400 - 100] * 2 and all(r["searches"] > 0 for r in rows)
    assert main(["--n", "10"]) == 2 and "at least 1000" in capsys.readouterr().err
