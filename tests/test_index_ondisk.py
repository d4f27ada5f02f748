"""On-disk IVF views (index/ondisk.py): the mapped snapshot file + in-memory delta + tombstones answer like one
in-memory IVF index, survive kill -9 with every acknowledged write, and cost far less memory than their file."""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from index import ondisk
from index.store import IndexStore, StoreError

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "_ondisk_child.py"
sys.path.insert(0, str(ROOT / "tests"))
from _ondisk_child import vec  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def make(path: Path, storage: str, factory: str = "IVF16,Flat", dim: int = 16, **kw) -> IndexStore:
    return IndexStore.create(path, views={"v": dim}, fingerprint="fp", model_ref="t", factory=factory,
                             storage=storage, follow=False, **kw)


def vecs(keys: range) -> np.ndarray:
    return np.concatenate([vec(i) for i in keys])


def child(*args: str, timeout: float = 120) -> dict:
    out = subprocess.run([sys.executable, str(CHILD), *args], env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the file layout the merge writes
@pytest.mark.parametrize("factory", ["IVF32,Flat", "IVF32,SQ8", "IVF16,PQ4x4"])
def test_merge_writes_faiss_format_byte_for_byte(tmp_path, factory):
    """A mapped file written back with nothing changed is byte-identical to faiss.write_index's; after adds and
    removes it reads back (plain faiss.read_index) as the same index an in-memory IVF holds."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12000, 16)).astype(np.float32)
    ref = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    ref.train(x[:1000])
    ref.add_with_ids(x[:8000], np.arange(8000))
    faiss.write_index(ref, str(tmp_path / "a.faiss"))
    m = ondisk.Mapped(tmp_path / "a.faiss", ondisk.read_index(tmp_path / "a.faiss", "disk"))
    assert m.write(tmp_path / "b.faiss") == 8000
    assert (tmp_path / "a.faiss").read_bytes() == (tmp_path / "b.faiss").read_bytes()
    m.add(np.arange(8000, 12000), x[8000:])
    ref.add_with_ids(x[8000:], np.arange(8000, 12000))
    gone = np.r_[np.arange(0, 8000, 3), np.arange(8000, 12000, 5)]
    m.remove(gone)
    ref.remove_ids(gone)
    assert m.count == ref.ntotal == 12000 - len(gone)
    m.write(tmp_path / "c.faiss")
    back = faiss.read_index(str(tmp_path / "c.faiss"))
    p = faiss.SearchParametersIVF()
    p.nprobe = 8
    for idx in (back, m):
        D, I = idx.search(x[:300], 10, params=p) if idx is back else idx.search(x[:300], 10, 8)
        D0, I0 = ref.search(x[:300], 10, params=p)
        np.testing.assert_allclose(D, D0, atol=1e-5)
        if "PQ" not in factory:  # 4x4-bit PQ codes tie often: equal scores, any order
            np.testing.assert_array_equal(I, I0)
        else:
            assert (I == I0).mean() > 0.9


def test_bad_storage_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="view 'v': unknown storage 'ssd'"):
        make(tmp_path / "ix", "ssd")
    for f in ("HNSW32,Flat", "OPQ8,IVF32,PQ8x8np"):  # an OPQ rotation's file is not a plain IVF file to map
        with pytest.raises(StoreError, match="view 'v': storage 'disk' needs a plain IVF index factory"):
            make(tmp_path / "ix", "disk", f)
    assert not (tmp_path / "ix").exists()


# ---------------------------------------------------------------- equal to the same data in an in-memory IVF view
def test_search_equals_in_memory_ivf(tmp_path):
    disk, ram = make(tmp_path / "d", "disk", "IVF32,Flat"), make(tmp_path / "r", "ram", "IVF32,Flat")
    stores = (disk, ram)

    def both(fn):
        for s in stores:
            fn(s)

    both(lambda s: s.add([f"k{i}" for i in range(1500)], {"v": vecs(range(1500))}))  # past 39 * 32: trains
    both(lambda s: s.snapshot())
    base = lambda s: s.index_of("v")  # noqa: E731
    assert disk.index_types()["v"] == "IndexIVFFlat on disk (mmap)" and ram.index_types()["v"] == "IndexIVFFlat"
    np.testing.assert_array_equal(base(disk).quantizer.reconstruct_n(0, 32), base(ram).quantizer.reconstruct_n(0, 32))
    q = vecs(range(5000, 5100))

    def same() -> None:
        assert disk.count("v") == ram.count("v")
        for nprobe in (2, 8):
            D1, I1 = disk.search(q, "v", 10, nprobe=nprobe)
            D2, I2 = ram.search(q, "v", 10, nprobe=nprobe)
            np.testing.assert_array_equal(I1, I2)
            np.testing.assert_allclose(D1, D2, atol=1e-5)

    # adds into the delta, removes of base ids (tombstones) and of delta ids
    both(lambda s: s.add([f"k{i}" for i in range(1500, 2100)], {"v": vecs(range(1500, 2100))}))
    both(lambda s: s.remove([f"k{i}" for i in range(0, 2100, 7)]))
    assert disk._views["v"].disk.delta.ntotal > 0 and disk._views["v"].disk.base_removed > 0
    same()
    file0 = disk.manifest["views"]["v"]["snapshot"]["file"]
    both(lambda s: s.snapshot())  # merged into a new mapped file: empty delta, no tombstones
    d = disk._views["v"].disk
    assert d.file.name != file0 and d.delta.ntotal == 0 and not d.tomb and d.base.ntotal == disk.count("v")
    same()
    both(lambda s: s.add([f"k{i}" for i in range(2100, 2300)], {"v": vecs(range(2100, 2300))}))
    both(lambda s: s.remove([f"k{i}" for i in range(1, 2300, 11) if i % 7]))
    same()
    disk.close()
    disk = IndexStore.open(tmp_path / "d", follow=False)  # the snapshot at close, mapped again
    stores = (disk, ram)
    assert disk.index_types()["v"].endswith("on disk (mmap)")
    same()
    for s in stores:
        s.close()


# ---------------------------------------------------------------- kill -9
def _run_and_kill(path: Path, start: int, stop_after: int) -> tuple[list[str], list[str], int]:
    """Run the writer child until it acknowledged ``stop_after`` adds, SIGKILL it; (acked adds, acked removes,
    snapshots it reported)."""
    proc = subprocess.Popen([sys.executable, str(CHILD), "write", str(path), str(start), "100000"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    added, removed, snaps = [], [], 0
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while len(added) < stop_after:
            assert sel.select(timeout=60), "the writer child stalled"
            line = proc.stdout.readline()
            assert line, "the writer child died"
            op, _, key = line.strip().partition(" ")
            if op == "ADD":
                added.append(key)
            elif op == "DEL":
                removed.append(key)
            elif op == "SNAP":
                snaps += 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return added, removed, snaps


def test_kill9_keeps_every_acknowledged_write(tmp_path):
    path = tmp_path / "ix"
    s = make(path, "disk")
    s.add([f"k{i}" for i in range(700)], {"v": vecs(range(700))})  # past 39 * 16: trained, then mapped
    s.snapshot()
    assert s.index_types()["v"].endswith("on disk (mmap)")
    s.close()
    live, gone = {f"k{i}" for i in range(700)}, set()
    rng = np.random.default_rng(3)
    start = 700
    follower = IndexStore.open(path, readonly=True, follow=False)  # follows the child's log and snapshots
    for _ in range(2):  # killed at a random point, twice (the second time after a reopen by another process)
        added, removed, snaps = _run_and_kill(path, start, int(rng.integers(55, 85)))
        assert snaps >= 2  # it snapshotted (merged a new file) before the kill
        live |= set(added)
        live -= set(removed)
        gone |= set(removed)
        start += 1000
        for r in (follower, IndexStore.open(path, follow=False)):
            check(r, live, gone)
            if r is follower:  # it mapped the child's last snapshot in place of the one it opened
                assert r._views["v"].disk.file.name == r.manifest["views"]["v"]["snapshot"]["file"]
            else:
                r.close()
    follower.close()


def check(r: IndexStore, live: set[str], gone: set[str]) -> None:
    """Every key in ``live`` is stored and finds itself at rank 1; no key in ``gone`` is stored or found."""
    assert r.index_types()["v"].endswith("on disk (mmap)")
    ids = r.ids_of(sorted(live))
    assert None not in ids
    keys = sorted(live)
    _, I = r.search(vecs([int(k[1:]) for k in keys]), "v", 1, nprobe=16)  # nprobe = nlist: exact
    np.testing.assert_array_equal(I[:, 0], np.array(ids))
    assert r.ids_of(sorted(gone)) == [None] * len(gone)
    D, _ = r.search(vecs([int(k[1:]) for k in sorted(gone)]), "v", 1, nprobe=16)
    assert (D[:, 0] < 0.999).all()  # a removed vector no longer finds itself (score 1.0)
    # the child was killed at one point: at most one unacknowledged add or remove differs
    assert abs(r.count("v") - len(live)) <= 1 and len(r) == r.count("v")


# ---------------------------------------------------------------- memory
@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """100k x 128 floats (a 53 MB view file) in an on-disk IVF256,Flat view."""
    path = tmp_path_factory.mktemp("ondisk") / "ix"
    s = make(path, "disk", "IVF256,Flat", dim=128)
    rng = np.random.default_rng(0)
    for b in range(0, 100_000, 25_000):
        s.add([f"k{i}" for i in range(b, b + 25_000)], {"v": rng.standard_normal((25_000, 128)).astype(np.float32)})
    s.snapshot()
    assert s.index_types()["v"].endswith("on disk (mmap)")
    s.close()
    return path


def test_opening_maps_instead_of_reading(big):
    got = child("open", str(big))
    assert got["type"].endswith("on disk (mmap)")
    assert got["file_bytes"] > 50e6
    # measured: peak RSS +3.0 MB for a 52 MB file (an in-RAM view reads the whole file)
    assert (got["peak"] - got["before"]) * 1024 < got["file_bytes"] / 10, got


def test_snapshot_of_an_on_disk_view_streams(big):
    got = child("snapshot", str(big), "20000")  # 20k adds in the delta, 10k removes of base ids, 5k of delta ids
    assert got["count"] == 100_000 + 20_000 - 10_000
    assert got["type"].endswith("on disk (mmap)")
    # merged list by list: peak RSS rises by one list, not by the 53 MB view (measured: +0.9 MB)
    assert got["rise"] * 1024 < 53e6 / 4, got


# ---------------------------------------------------------------- the benchmark
@pytest.mark.slow
def test_ondisk_bench_runs(tmp_path):
    """``python -m index.ondisk_bench`` on a small store: the mapped view answers like the in-RAM one, opens
    with less memory, and the page cache was really dropped before the cold queries."""
    out = subprocess.run([sys.executable, "-m", "index.ondisk_bench", "--n", "20000", "--dim", "32", "--queries",
                          "200", "--cold", "20"], env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    got = dict(line.split(None, 1) for line in out.stdout.strip().splitlines())
    assert float(got["same_ids_disk_ram"]) == 1.0
    assert got["disk_type"] == "IndexIVFFlat on disk (mmap)" and got["ram_type"] == "IndexIVFFlat"
    assert float(got["disk_cached_before_mb"]) == 0.0 or got["disk_cached_before_mb"] == "None"
    assert float(got["disk_open_rss_mb"]) < float(got["ram_open_rss_mb"]) + 1
    assert float(got["disk_recall10"]) == float(got["ram_recall10"]) > 0.9


def test_index_build_on_disk_equals_the_ram_build(tmp_path):
    """``index.build --on-disk`` (build_index(storage="disk")): the view is memory-mapped and answers exactly as
    the same build held in RAM; a build whose chosen type cannot live on disk (Flat, few items) says so."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from _budget_build import VectorRuntime
    from index.build import build_index
    from index.errors import StoreError
    from models.data import Dataset
    rng = np.random.default_rng(0)
    c = rng.standard_normal((300, 16), dtype=np.float32)
    x = c[rng.integers(0, 300, 60_000)] + 0.5 * rng.standard_normal((60_000, 16), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # (60000, 16): past FLAT_MAX, so an IVF view
    got = {}
    for st in ("ram", "disk"):
        build_index(VectorRuntime(16), Dataset(sources={"v": x}), ["v"], tmp_path / st, storage=st, progress=False,
                    thumbs=False, memory_budget_mb=64)
        with IndexStore.open(tmp_path / st) as s:
            assert ("on disk" in s.index_types()["v"]) == (st == "disk")
            got[st] = s.search(x[:100], "v", 10)
    assert np.array_equal(got["ram"][1], got["disk"][1])
    np.testing.assert_allclose(got["ram"][0], got["disk"][0], atol=1e-5)
    with pytest.raises(StoreError, match="disk"):
        build_index(VectorRuntime(16), Dataset(sources={"v": x[:1000]}), ["v"], tmp_path / "flat", storage="disk",
                    progress=False, thumbs=False)
