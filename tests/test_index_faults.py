"""Fault injection on real index stores on disk: disk full during snapshots, failures after the commit, kill -9 in
the middle of a snapshot, several processes writing one directory. The claim under test: every acknowledged
write is found after the fault, nothing unacknowledged is half there, and no key is left stuck."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from index import maintenance, manifest, snapshots
from index.factory import is_ivf
from index.store import IndexStore, NotWritableError, StoreError, WriteFailed
from index.viewindex import _View

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _index_writer import vec  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def make(tmp_path: Path, factory: str = "Flat", **kw) -> IndexStore:
    return IndexStore.create(tmp_path / "ix", views={"v": 16, "w": 16}, fingerprint="fp", model_ref="t",
                             factory=factory, **kw)


def assert_all_found(store: IndexStore, keys: list[str]) -> None:
    """Each key is stored and is the top hit of its own vector."""
    ids = store.ids_of(keys)
    assert None not in ids, [k for k, i in zip(keys, ids) if i is None][:5]
    for key, i in zip(keys, ids):
        _, I = store.search(vec(int(key[1:])), "v", 1)
        assert I[0, 0] == i, key


def wal_rows(path: Path) -> int:
    with sqlite3.connect(path / "meta.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM wal").fetchone()[0]


def committed(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


# ---------------------------------------------------------------- disk full during snapshots
def test_disk_full_during_snapshot(tmp_path, monkeypatch):
    path = tmp_path / "ix"
    s = make(tmp_path, snapshot_ops=4, follow_interval=0.05)
    s.add(["k0"], {"v": vec(0), "w": vec(0)})
    s.snapshot()
    before = committed(path)
    named = {before["views"][v][w]["file"] for v in ("v", "w") for w in ("snapshot", "previous")}
    sha = {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in named}
    failures = []
    real = snapshots.write_file

    def full(fp, writer):  # the second view's file: half written, then ENOSPC
        if fp.name.startswith("w."):
            writer(fp)
            os.truncate(fp, fp.stat().st_size // 2)
            failures.append(fp.name)
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        real(fp, writer)

    monkeypatch.setattr(snapshots, "write_file", full)
    monkeypatch.setattr(maintenance, "MAX_BACKOFF_S", 0.05)
    acked = ["k0"]
    for i in range(1, 41):  # every add is answered while snapshots keep failing in the background
        s.add([f"k{i}"], {"v": vec(i), "w": vec(i)})
        acked.append(f"k{i}")
        time.sleep(0.01)
    deadline = time.time() + 10
    while len(failures) < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert len(failures) >= 3
    with pytest.raises(StoreError, match="No space left"):
        s.snapshot()
    with s._snap_mutex:  # between two background attempts (none is half-way while we look)
        # the committed manifest and every file it names are untouched; no half-written file is left behind
        assert committed(path) == before
        assert {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in named} == sha
        assert {p.name for p in path.glob("*.faiss")} == named
        assert wal_rows(path) == 41  # the log keeps everything since the snapshots
    assert_all_found(s, acked)
    # a crash now (no close): reopening shows every acknowledged item
    r = IndexStore.open(path, readonly=True)
    assert_all_found(r, acked)
    r.close()
    # space again: the retry commits a snapshot in the background, and the log is pruned behind it
    monkeypatch.setattr(snapshots, "write_file", real)
    deadline = time.time() + 10
    while manifest.manifest_seq(committed(path)) < 41 and time.time() < deadline:
        s.add([f"k{len(acked)}"], {"v": vec(len(acked)), "w": vec(len(acked))})
        acked.append(f"k{len(acked)}")
        time.sleep(0.1)
    assert manifest.manifest_seq(committed(path)) >= 41
    s.close()
    s = IndexStore.open(path)
    assert_all_found(s, acked)
    assert len(s) == len(acked)
    s.close()


def test_failure_after_the_manifest_rename_keeps_its_files(tmp_path, monkeypatch):
    s = make(tmp_path)
    s.add(["k0"], {"v": vec(0)})
    real = manifest.commit_manifest

    def renamed_then_failed(path, manifest):  # e.g. the directory fsync fails after the rename
        real(path, manifest)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(manifest, "commit_manifest", renamed_then_failed)
    with pytest.raises(StoreError, match="Input/output error"):
        s.snapshot()
    m = committed(tmp_path / "ix")
    assert manifest.manifest_seq(m) == 1
    assert all((tmp_path / "ix" / f).exists() for f in manifest.named_files(m))
    s.close(snapshot=False)
    monkeypatch.undo()
    s = IndexStore.open(tmp_path / "ix")
    assert_all_found(s, ["k0"])
    s.close()


# ---------------------------------------------------------------- failures after the commit
def test_apply_failure_rolls_back_and_the_key_can_be_added_again(tmp_path, monkeypatch):
    s = make(tmp_path)
    other = IndexStore.open(tmp_path / "ix")  # a second writer on the same directory
    s.add(["k0"], {"v": vec(0)})
    real = _View.add
    calls = {"n": 0}

    def flaky(self, ids, x):
        calls["n"] += 1
        if calls["n"] == 1:
            self.index.add_with_ids(x, ids)  # half done: the vector went in, then the failure
            raise MemoryError("injected")
        real(self, ids, x)

    monkeypatch.setattr(_View, "add", flaky)
    with pytest.raises(WriteFailed, match="rolled back.*MemoryError"):
        s.add(["k1"], {"v": vec(1)})
    assert s.ids_of(["k1"]) == [None] and other.ids_of(["k1"]) == [None]
    _, I = s.search(vec(1), "v", 2)  # the half-applied vector is gone (views reloaded)
    assert I[0].tolist() == [0, -1]
    ids = s.add(["k1"], {"v": vec(1)})  # not stuck: the key can be added again
    assert_all_found(s, ["k0", "k1"])
    assert_all_found(other, ["k0", "k1"])
    assert other.search(vec(1), "v", 1)[1][0, 0] == ids[0]
    other.close()
    s.close()
    s = IndexStore.open(tmp_path / "ix")
    assert_all_found(s, ["k0", "k1"])
    assert len(s) == 2
    s.close()


def test_commit_failure_leaves_nothing(tmp_path):
    s = make(tmp_path)
    s.add(["k0"], {"v": vec(0)})
    real = s._journal.write

    class FailingCommit:  # the disk fills up exactly at COMMIT
        def __getattr__(self, name):
            return getattr(real, name)

        def execute(self, sql, *a):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *a)

    s._journal.write = FailingCommit()
    with pytest.raises(WriteFailed, match="not committed.*disk is full"):
        s.add(["k1"], {"v": vec(1)})
    s._journal.write = real
    assert s.ids_of(["k1"]) == [None]
    assert s.search(vec(1), "v", 2)[1][0].tolist() == [0, -1]  # the uncommitted vector is not searchable
    s.add(["k1"], {"v": vec(1)})
    assert_all_found(s, ["k0", "k1"])
    s.close()


def test_follower_apply_failure_reloads(tmp_path, monkeypatch):
    s = make(tmp_path)
    reader = IndexStore.open(tmp_path / "ix", readonly=True)
    real, calls = _View.add, {"n": 0}

    def flaky(self, ids, x):
        calls["n"] += 1
        if calls["n"] == 2:  # the reader's first apply of the writer's row
            raise RuntimeError("injected")
        real(self, ids, x)

    monkeypatch.setattr(_View, "add", flaky)
    s.add(["k0"], {"v": vec(0)})
    assert_all_found(reader, ["k0"])  # failed once, reloaded from snapshot + log
    assert reader.applied_seq == s.applied_seq == 1
    reader.close()
    s.close()


def test_training_failure_keeps_serving(tmp_path, monkeypatch):
    tries = []

    def boom(*a, **k):
        tries.append(1)
        raise MemoryError("injected during training")

    monkeypatch.setattr("index.maintenance.trained_copy", boom)
    s = make(tmp_path, "IVF16,Flat", follow_interval=0.05)
    keys = [f"k{i}" for i in range(700)]  # 39 * 16 = 624 vectors make the view due for training
    s.add(keys, {"v": np.concatenate([vec(i) for i in range(700)])})
    deadline = time.monotonic() + 30
    while not tries and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # six more rounds of the background thread
    assert len(tries) == 1  # it tried, failed, and backs off (no retry every round)
    assert not is_ivf(s.index_of("v"))  # training failed: the view is still the exact Flat
    assert_all_found(s, keys[::50])
    monkeypatch.undo()
    s.snapshot()  # trains now, then snapshots the trained index
    assert is_ivf(s.index_of("v")) and s.manifest["views"]["v"]["pending_training"] is False
    s.close()
    s = IndexStore.open(tmp_path / "ix")
    assert_all_found(s, keys[::50])
    s.close()


def test_lagging_follower_reloads_after_the_log_was_pruned(tmp_path):
    s = make(tmp_path, follow=False)
    lagging = IndexStore.open(tmp_path / "ix", follow=False)  # applies nothing until its next search
    for i in range(6):
        s.add([f"k{i}"], {"v": vec(i)})
        s.snapshot()  # two snapshots later the log rows it needs are pruned
    assert wal_rows(tmp_path / "ix") == 1 and lagging.applied_seq == 0
    assert_all_found(lagging, [f"k{i}" for i in range(6)])  # gap detected: reloaded from the snapshot
    assert lagging.applied_seq == 6
    lagging.close()
    s.close()


def test_idle_follower_applies_within_a_second(tmp_path):
    s = make(tmp_path)
    idle = IndexStore.open(tmp_path / "ix")  # never searched below: its follower thread does the work
    for i in range(3):
        s.add([f"k{i}"], {"v": vec(i)})
        t0 = time.time()
        while idle.applied_seq < s.applied_seq:
            assert time.time() - t0 < 1.0, "the follower lags more than 1 s"
            time.sleep(0.01)
    assert_all_found(idle, ["k0", "k1", "k2"])
    idle.close()
    s.close()


def test_snapshot_lock_names_its_holder(tmp_path):
    s = make(tmp_path)
    s.add(["k0"], {"v": vec(0)})
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from index.snapshots import SnapshotLock\nSnapshotLock(Path(sys.argv[1])).acquire()\n"
                               "print('held', flush=True)\ntime.sleep(60)", str(tmp_path / "ix")],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=f"held by pid {holder.pid}"):
            s.snapshot(timeout=0.2)
        s.add(["k1"], {"v": vec(1)})  # writes go on meanwhile
    finally:
        holder.kill()
        holder.wait()
    s.snapshot(timeout=5)  # released by the kernel when its holder died
    assert manifest.manifest_seq(committed(tmp_path / "ix")) == 2
    s.close()


def test_closed_store_refuses_calls(tmp_path):
    s = make(tmp_path)
    s.add(["k0"], {"v": vec(0)})
    s.close()
    for call in (lambda: s.add(["k1"], {"v": vec(1)}), lambda: s.search(vec(0), "v", 1), lambda: s.lookup([0]),
                 lambda: s.search_items(vec(0), "v", 1), lambda: s.remove(["k0"]), lambda: len(s)):
        with pytest.raises(NotWritableError, match="closed"):
            call()


# ---------------------------------------------------------------- processes
def writer(path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "_index_writer.py"), str(path), *args],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)


@pytest.mark.parametrize("phase", ["file", "manifest", "gc"])
def test_kill9_in_the_middle_of_a_snapshot(tmp_path, phase):
    path = tmp_path / "ix"
    make(tmp_path).close()
    acked: list[str] = []
    for round_ in range(2):  # kill, reopen, kill again on top of the first crash's leftovers
        proc = writer(path, "--snapshot-ops", "5", "--start", str(1000 * round_), "--stall", phase)
        for line in proc.stdout:
            if line.startswith("STALL"):
                break
            acked.append(line.strip())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        acked += [x.strip() for x in proc.stdout if x.startswith("k")]  # printed before the kill: acknowledged
        assert acked and line.startswith("STALL"), acked[-3:]
        s = IndexStore.open(path)
        assert_all_found(s, acked)
        assert len(s) <= len(acked) + round_ + 1  # besides those, at most the add in flight at each kill
        s.close()
    s = IndexStore.open(path, readonly=True)  # the close above wrote a clean snapshot
    assert_all_found(s, acked)
    s.close()


def test_two_processes_write_one_store(tmp_path):
    path = tmp_path / "ix"
    make(tmp_path).close()
    watcher = IndexStore.open(path)  # a third process's view of both writers
    n = 40
    a = writer(path, "--snapshot-ops", "6", "--start", "0", "--count", str(n), "--peer-start", "5000",
               "--peer-count", str(n), "--shared", "both")
    b = writer(path, "--snapshot-ops", "6", "--start", "5000", "--count", str(n), "--peer-start", "0",
               "--peer-count", str(n), "--shared", "both")
    sel = selectors.DefaultSelector()
    for p in (a, b):
        sel.register(p.stdout, selectors.EVENT_READ, p)
    acked, tail = [], {a: [], b: []}
    open_ = 2
    t_end = time.time() + 600  # an upper bound only (a loaded CI machine)
    while open_ and time.time() < t_end:
        for key, _ in sel.select(timeout=1):
            line = key.fileobj.readline()
            if not line:
                sel.unregister(key.fileobj)
                open_ -= 1
                continue
            line = line.strip()
            if line.startswith("k"):
                acked.append(line)
                # acknowledged in another process -> found by the very next search here (it follows the log
                # before searching), so the lag is one search, whatever the load
                hit = watcher.search_items(vec(int(line[1:])), "v", 1)[0]
                assert hit and hit[0]["key"] == line, f"{line} not searchable right after its acknowledgement"
            else:
                tail[key.data].append(line)
    assert a.wait(60) == 0 and b.wait(60) == 0, (tail, acked[-3:])
    assert len(acked) == 2 * n
    assert tail[a][0] == tail[b][0] == f"PEERS {n}"  # each writer finds all of the other's items
    assert sorted([tail[a][1], tail[b][1]]) == ["DUP", "OK"]  # a key is unique across processes
    assert_all_found(watcher, acked)
    assert len(watcher) == 2 * n + 1
    watcher.close()
    s = IndexStore.open(path)
    assert_all_found(s, acked)
    ids = s.ids_of(acked + ["both"])
    assert len(set(ids)) == 2 * n + 1  # ids allocated once across processes
    s.close()


@pytest.mark.slow
def test_kill9_soak(tmp_path):
    """20 writer processes killed at random moments (snapshots every 3 adds, so many kills land inside one),
    then one stalled in each snapshot phase; prints the reliability figures for BENCHMARKS.md."""
    path = tmp_path / "ix"
    make(tmp_path).close()
    rng = np.random.default_rng(0)
    acked: list[str] = []
    kills = 0
    for round_ in range(23):
        phase = ["file", "manifest", "gc"][round_ - 20] if round_ >= 20 else None
        proc = writer(path, "--snapshot-ops", "3", "--start", str(1000 * round_), *(["--stall", phase] if phase else []))
        n_round = int(rng.integers(5, 40))
        for _ in range(n_round):
            line = proc.stdout.readline()
            if not line or line.startswith("STALL"):
                break
            acked.append(line.strip())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        acked += [x.strip() for x in proc.stdout if x.startswith("k")]
        s = IndexStore.open(path)
        lost = [k for k, i in zip(acked, s.ids_of(acked)) if i is None]
        assert not lost, lost
        s.close()
    s = IndexStore.open(path)
    assert_all_found(s, acked)
    print(f"kill -9 soak: {kills} writer processes killed, {len(acked)} acknowledged adds, 0 lost, "
          f"{len(s) - len(acked)} unacknowledged adds that landed")
    s.close()


# ---------------------------------------------------------------- issue 18 (round two): snapshots after faults
def test_a_snapshot_never_persists_a_rolled_back_vector(tmp_path, monkeypatch):
    """A write fails after its vector went into the views (rolled back, views marked dirty) just after a snapshot
    caught up and before it copied the views. The snapshot must not save that ghost vector: its id is handed out
    again by the next add, and after a restart a live key would own the ghost."""
    path = tmp_path / "ix"
    s = make(tmp_path, follow=False)
    s.add(["k0", "k1", "k2"], {"v": np.concatenate([vec(i) for i in range(3)])})
    ghost, real_add, real_refresh, armed = vec(7), _View.add, s._refresh, [True]

    def half_then_fail(self, ids, x):
        self.index.add_with_ids(x, ids)  # the vector went in, then the failure
        raise MemoryError("injected")

    def refresh_then_a_write_fails():
        real_refresh()
        if armed:  # forced interleaving: between the snapshot's catch-up and its copy of the views
            armed.clear()
            monkeypatch.setattr(_View, "add", half_then_fail)
            with pytest.raises(WriteFailed, match="rolled back"):
                s.add(["ghost"], {"v": ghost})
            monkeypatch.setattr(_View, "add", real_add)

    s._refresh = refresh_then_a_write_fails
    s.snapshot()
    assert not armed  # the failure did happen inside the snapshot
    del s._refresh
    assert committed(path)["views"]["v"]["count"] == 3 == len(s)  # the manifest counts committed items only
    assert s.add(["real"], {"v": vec(8)}).tolist() == [3]  # the ghost's id, handed out again
    s.close()
    s = IndexStore.open(path)
    assert s.count("v") == 4 == len(s) == committed(path)["views"]["v"]["count"]
    hit = s.search_items(ghost, "v", 1)[0][0]
    assert hit["score"] < 0.99, hit  # the ghost vector is nobody's: not the live key 'real' at score 1.0
    assert_all_found(s, ["k0", "k1", "k2"])
    assert s.search_items(vec(8), "v", 1)[0][0]["key"] == "real"
    s.close()


def test_recovery_keeps_a_readable_previous_snapshot(tmp_path):
    """After open(recover=True) the manifest names as previous the snapshot recovery actually loaded (not the
    corrupt one) and the log still reaches back to it, so one more fault is recoverable too."""
    path, acked = tmp_path / "ix", []

    def add(s: IndexStore, lo: int, hi: int) -> None:
        keys = [f"k{i}" for i in range(lo, hi)]
        s.add(keys, {"v": np.concatenate([vec(i) for i in range(lo, hi)])})
        acked.extend(keys)

    def corrupt() -> str:
        f = path / committed(path)["views"]["v"]["snapshot"]["file"]
        f.write_bytes(f.read_bytes()[:100])
        return f.name

    s = make(tmp_path, follow=False)
    add(s, 0, 5)
    s.snapshot()
    first = committed(path)["views"]["v"]["snapshot"]["file"]
    add(s, 5, 10)
    s.snapshot()
    s.close()
    bad = corrupt()
    s = IndexStore.open(path, recover=True)  # loads `first` + the log, then writes a fresh snapshot
    spec = committed(path)["views"]["v"]
    assert spec["previous"]["file"] == first and spec["snapshot"]["file"] != bad
    assert wal_rows(path) >= 1  # the rows after `first` are still there
    add(s, 10, 15)
    s.close(snapshot=False)  # killed: the log holds these writes
    corrupt()  # and the snapshot recovery wrote is lost as well
    s = IndexStore.open(path, recover=True)
    assert_all_found(s, acked)
    assert len(s) == len(acked) == s.count("v")
    add(s, 15, 20)
    s.snapshot()
    s.close()
    corrupt()  # a third fault, after ordinary writes and a snapshot
    s = IndexStore.open(path, recover=True)
    assert_all_found(s, acked)
    assert len(s) == len(acked) == 20
    s.close()
    with IndexStore.open(path) as s:  # and the state recovery wrote opens without recover
        assert_all_found(s, acked)
