"""python -m index.rebuild_bench [--n N] [--dim D]: what an HNSW view's tombstone rebuild costs the requests
around it, inline in the remove (as before) against in the background thread (now), side by side.

One process, a real store on disk (``IDMap2,HNSW32,Flat``): N unit vectors are added, 20% removed (tombstones
only), then one remove of 100 more crosses ``TOMBSTONE_REBUILD`` while a thread searches every 5 ms. Printed
per mode: the time of that remove call, the time until the view is compact, and the search latencies
meanwhile (the inline mode holds the writer lock for the whole rebuild: searches wait on it).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time

import numpy as np

from index import viewindex
from index.bench import make_data
from index.store import IndexStore


def run(mode: str, x: np.ndarray, workdir: str) -> dict:
    n, dim = x.shape
    keys = [f"k{i}" for i in range(n)]
    saved = viewindex.TOMBSTONE_INLINE
    viewindex.TOMBSTONE_INLINE = viewindex.TOMBSTONE_REBUILD if mode == "inline" else saved
    try:
        s = IndexStore.create(f"{workdir}/{mode}", views={"v": dim}, fingerprint="bench", model_ref="bench",
                              factory="HNSW32,Flat")
        for lo in range(0, n, 5000):
            s.add(keys[lo:lo + 5000], {"v": x[lo:lo + 5000]})
        cut = int(viewindex.TOMBSTONE_REBUILD * n)
        s.remove(keys[:cut])  # exactly at the threshold: tombstones only
        lat: list[float] = []
        stop = threading.Event()

        def searcher() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                s.search(x[-1:], "v", 10)
                lat.append(time.perf_counter() - t0)
                time.sleep(0.005)

        th = threading.Thread(target=searcher)
        th.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        s.remove(keys[cut:cut + 100])
        removed = time.perf_counter() - t0
        while s._views["v"].tomb and time.perf_counter() - t0 < 600:
            time.sleep(0.05)
        compact = time.perf_counter() - t0
        time.sleep(0.5)
        stop.set()
        th.join()
        live = s.count("v")
        s.close()
    finally:
        viewindex.TOMBSTONE_INLINE = saved
    ms = np.array(lat) * 1000
    return {"mode": mode, "remove_ms": removed * 1000, "compact_s": compact, "searches": len(ms),
            "search_p50_ms": float(np.median(ms)), "search_max_ms": float(ms.max()), "live": live}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m index.rebuild_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=40_000)
    p.add_argument("--dim", type=int, default=64)
    a = p.parse_args(argv)
    if a.n < 1000 or a.dim < 2:
        print("error: --n must be at least 1000 and --dim at least 2", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    x = make_data(a.n, a.dim, "uniform", 0)
    with tempfile.TemporaryDirectory() as d:
        rows = [run(m, x, d) for m in ("inline", "background")]
    print(f"HNSW32 view of {a.n} x {a.dim}: the remove that crosses {viewindex.TOMBSTONE_REBUILD:.0%} tombstones")
    print(f"{'rebuild':<11} {'remove call':>12} {'compact after':>14} {'searches':>9} {'p50':>8} {'max':>9}")
    for r in rows:
        print(f"{r['mode']:<11} {r['remove_ms']:>9.0f} ms {r['compact_s']:>12.1f} s {r['searches']:>9d} "
              f"{r['search_p50_ms']:>5.2f} ms {r['search_max_ms']:>6.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
