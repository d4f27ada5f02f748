"""Child processes for the on-disk view and snapshot-memory tests (memory is measured in a fresh process).

    python tests/_ondisk_child.py write DIR START COUNT   adds k{START}.. one at a time to view "v", printing
                                                        "ADD key" once add() returned; removes every 5th key
                                                        it added ("DEL key"); snapshots every 25 adds ("SNAP")
    python tests/_ondisk_child.py open DIR               one JSON line: RSS (kB) before and after opening DIR
                                                        readonly, its view file's size (bytes)
    python tests/_ondisk_child.py snapshot DIR N         opens DIR, adds N vectors and removes N // 2 (an
                                                        on-disk view's delta and tombstones), then one JSON line:
                                                        the peak RSS rise (kB) of store.snapshot()
    python tests/_ondisk_child.py ram N DIM               builds an in-RAM IDMap2,Flat view of N x DIM in a new
                                                        store, then one JSON line: the peak RSS rise (kB) of
                                                        store.snapshot() and of faiss.serialize_index (the
                                                        copy that snapshots made before they streamed)

Peak rises are VmHWM after minus VmRSS before, with VmHWM reset first (``echo 5 > /proc/self/clear_refs``).
"""
import json
import sys
import tempfile
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from index.store import IndexStore  # noqa: E402

DIM = 16


def vec(i: int, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(1000 + i).standard_normal((1, dim)).astype(np.float32)
    return x / np.linalg.norm(x)


def mem() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "VmHWM"))}


def reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return mem()["VmRSS"]


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def write(path: str, start: int, count: int) -> None:
    s = IndexStore.open(path, follow=False)
    added = []
    for i in range(start, start + count):
        key = f"k{i}"
        s.add([key], {"v": vec(i)})
        say(f"ADD {key}")
        added.append(key)
        if len(added) % 5 == 0:
            s.remove([added[-5]])
            say(f"DEL {added[-5]}")
        if len(added) % 25 == 0:
            s.snapshot()
            say("SNAP")


def open_rss(path: str) -> None:
    before = reset_peak()
    s = IndexStore.open(path, readonly=True, follow=False)
    after = mem()
    spec = s.manifest["views"]["v"]
    say(json.dumps({"before": before, "after": after["VmRSS"], "peak": after["VmHWM"],
                    "file_bytes": (Path(path) / spec["snapshot"]["file"]).stat().st_size,
                    "type": s.index_types()["v"]}))


def snapshot_disk(path: str, n: int) -> None:
    s = IndexStore.open(path, follow=False)
    dim = s.views["v"]
    x = np.random.default_rng(7).standard_normal((n, dim)).astype(np.float32)
    s.add([f"new{i}" for i in range(n)], {"v": x})
    s.remove([f"new{i}" for i in range(0, n, 4)] + [f"k{i}" for i in range(0, n, 4)])
    before = reset_peak()
    s.snapshot()
    peak = mem()["VmHWM"]
    say(json.dumps({"rise": peak - before, "type": s.index_types()["v"], "count": s.count("v")}))
    s.close()


def ram(n: int, dim: int) -> None:
    path = Path(tempfile.mkdtemp()) / "ix"
    s = IndexStore.create(path, views={"v": dim}, fingerprint="fp", model_ref="t", factory="Flat", follow=False)
    rng = np.random.default_rng(0)
    for b in range(0, n, 50_000):
        m = min(50_000, n - b)
        s.add([f"k{i}" for i in range(b, b + m)], {"v": rng.standard_normal((m, dim)).astype(np.float32)})
    before = reset_peak()
    s.snapshot()
    snap = mem()["VmHWM"] - before
    before = reset_peak()
    blob = faiss.serialize_index(s.index_of("v"))
    copy = mem()["VmHWM"] - before
    say(json.dumps({"snapshot": snap, "serialize": copy, "view_bytes": int(blob.nbytes)}))
    del blob
    s.close()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "write":
        write(args[0], int(args[1]), int(args[2]))
    elif mode == "open":
        open_rss(args[0])
    elif mode == "snapshot":
        snapshot_disk(args[0], int(args[1]))
    elif mode == "ram":
        ram(int(args[0]), int(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
