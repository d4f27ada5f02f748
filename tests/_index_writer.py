"""A writer process for the fault tests: adds keys one at a time and prints each key once add() returned.

    python tests/_index_writer.py DIR [--snapshot-ops N] [--start I] [--count N] [--peer-start J --peer-count M]
                                      [--shared KEY] [--stall file|manifest|gc] [--serve]

``--serve``: add nothing; print ``READY``, then answer each stdin line ``{"seq", "ready", "queries", "k",
"params"}`` once this process applied log row ``seq`` and its view ``v`` is ready (``"ivf"``: trained; ``"compact"``:
no tombstones) with one line ``{"D", "I", "builds"}``: its hits for ``vec(q)`` of each query, and how many indexes
this process trained or rebuilt (``index.maintenance``'s build functions, counted).

``--stall`` makes every snapshot stop at a phase (half of a snapshot file written; all files written, manifest not
yet committed; manifest committed, old files not yet deleted), printing ``STALL <phase>`` first, so that the
parent can ``kill -9`` it there. ``--peer-*``: at the end, wait until the other writer's keys are all
searchable here, then print ``PEERS <n>``. ``--shared``: then add that key, printing ``OK`` or ``DUP``.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from index import maintenance, manifest, snapshots
from index.factory import is_ivf
from index.store import DuplicateKeyError, IndexStore


def vec(i: int, dim: int = 16) -> np.ndarray:
    x = np.random.default_rng(1000 + i).standard_normal((1, dim)).astype(np.float32)
    return x / np.linalg.norm(x)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def install_stall(phase: str) -> None:
    def stall() -> None:
        say(f"STALL {phase}")
        time.sleep(60)

    if phase == "file":
        def write_file(fp, writer):
            writer(fp)
            os.truncate(fp, fp.stat().st_size // 2)
            stall()
        snapshots.write_file = write_file
    elif phase == "manifest":
        orig = manifest.commit_manifest

        def commit_manifest(path, manifest):
            if any((s.get("previous") or {}).get("seq") for s in manifest["views"].values()):
                stall()
            orig(path, manifest)
        manifest.commit_manifest = commit_manifest
    elif phase == "gc":
        orig_gc = snapshots.collect_garbage

        def collect_garbage(path, manifest):
            stall()
            orig_gc(path, manifest)
        snapshots.collect_garbage = collect_garbage


def count_builds() -> dict:
    """Wrap the build functions the store calls (training and rebuilds); returns the live counter."""
    n = {"builds": 0}
    for name in ("trained_copy", "rebuilt_copy"):
        def counted(*a, _f=getattr(maintenance, name), **k):
            n["builds"] += 1
            return _f(*a, **k)
        setattr(maintenance, name, counted)
    return n


def serve(store: IndexStore, builds: dict) -> None:
    say("READY")
    for line in sys.stdin:
        cmd = json.loads(line)
        deadline = time.time() + 120
        while time.time() < deadline:
            v = store._views["v"]
            ok = is_ivf(v.index) if cmd["ready"] == "ivf" else not v.tomb
            if ok and store.applied_seq >= cmd["seq"]:
                break
            time.sleep(0.02)
        xq = np.concatenate([vec(q) for q in cmd["queries"]])
        D, I = store.search(xq, "v", cmd["k"], **cmd["params"])
        say(json.dumps({"D": D.tolist(), "I": I.tolist(), "builds": builds["builds"]}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--snapshot-ops", type=int, default=7)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, default=10**9)
    p.add_argument("--peer-start", type=int, default=None)
    p.add_argument("--peer-count", type=int, default=0)
    p.add_argument("--shared", default=None)
    p.add_argument("--stall", default=None, choices=["file", "manifest", "gc"])
    p.add_argument("--serve", action="store_true")
    a = p.parse_args()
    if a.stall:
        install_stall(a.stall)
    if a.serve:
        builds = count_builds()
        store = IndexStore.open(a.dir, snapshot_ops=10**9, snapshot_seconds=10**9, follow_interval=0.05)
        serve(store, builds)
        store.close(snapshot=False)
        return
    store = IndexStore.open(a.dir, snapshot_ops=a.snapshot_ops)
    for i in range(a.start, a.start + a.count):
        store.add([f"k{i}"], {"v": vec(i)}, [{"i": i}])
        say(f"k{i}")
    if a.peer_start is not None:
        want = {f"k{j}": j for j in range(a.peer_start, a.peer_start + a.peer_count)}
        t0 = time.time()
        while want and time.time() - t0 < 300:  # generous: the peer may start late on a loaded machine
            for key, j in list(want.items()):
                hit = store.search_items(vec(j), "v", 1)[0]
                if hit and hit[0]["key"] == key:
                    del want[key]
            time.sleep(0.05)
        say(f"PEERS {a.peer_count - len(want)}")
    if a.shared:
        try:
            store.add([a.shared], {"v": vec(999_999)})
            say("OK")
        except DuplicateKeyError:
            say("DUP")
    store.close()


if __name__ == "__main__":
    main()
