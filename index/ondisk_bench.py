"""python -m index.ondisk_bench [--n N] [--dim D] [--nprobe P]: an on-disk IVF view (``storage: disk``, lists
memory-mapped, ``index/ondisk.py``) against the same view in RAM, through the store.

One real store is built on disk (``IndexStore.create(..., storage="disk")``, IVF{nlist},Flat with nlist from
``factory.nlist_for``, N clustered unit vectors from ``index.bench.make_data``, or with ``--data
embeddings:MODEL:SPEC`` the real embeddings index.bench measures (its held-out queries, its indexed rows), trained
and committed by ``snapshot()``); a copy of the directory whose manifest names no storage is the same view in RAM. Printed:

* single-query QPS (``store.search`` one query at a time, ``nprobe`` P) of the on-disk view with a cold page cache
  (the view file's pages dropped with ``posix_fadvise(DONTNEED)`` after opening, which reads the whole file
  once for its sha256; the first ``--cold`` queries;
  ``fincore`` says how much of the file was cached before and after) and a warm one (after reading the file
  once), and of the in-RAM view; recall@10 against exact search;
* RSS after opening each store (the mapped view costs its quantizer, the in-RAM one its whole file);
* the peak RSS rise (VmHWM reset through ``/proc/self/clear_refs``) of ``snapshot()`` after 1% more adds and
  removes: the in-RAM view streamed with ``faiss.write_index``, the on-disk view merged list by list.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from index import bench_data
from index import manifest as mf
from index import ondisk
from index.bench import holdout, make_data
from index.factory import nlist_for
from index.store import IndexStore


def status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "VmHWM"))}


def reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status()["VmRSS"]


def view_file(path: Path) -> Path:
    return path / mf.read_manifest(path)["views"]["v"]["snapshot"]["file"]


def drop_cache(fp: Path) -> None:
    fd = os.open(fp, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_mb(fp: Path) -> float | None:
    """MiB of ``fp`` in the page cache (util-linux ``fincore``; None where it is missing)."""
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(fp)], capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return int(out.stdout.split()[0]) / 2**20


def warm_cache(fp: Path) -> None:
    with open(fp, "rb") as f:
        while f.read(1 << 24):
            pass


def qps(store: IndexStore, xq: np.ndarray, nprobe: int) -> tuple[float, np.ndarray, float]:
    """Single-query QPS over ``xq`` (one store.search per query), the ids (nq, 10), p99 latency (ms)."""
    out, lat = [], []
    t0 = time.perf_counter()
    for q in xq:
        t = time.perf_counter()
        out.append(store.search(q[None], "v", 10, nprobe=nprobe)[1][0])
        lat.append(time.perf_counter() - t)
    return len(xq) / (time.perf_counter() - t0), np.array(out), 1e3 * float(np.percentile(lat, 99))


def recall(I: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, gt)]))


def snapshot_rise(path: Path, x: np.ndarray, n: int) -> tuple[int, str]:
    """Peak RSS rise (kB) of snapshot() after adding and removing 1% of the items."""
    s = IndexStore.open(path, follow=False)
    m = max(1, n // 100)
    s.add([f"new{i}" for i in range(m)], {"v": x[:m]})
    s.remove([f"k{i}" for i in range(0, 2 * m, 2)])
    before = reset_peak()
    s.snapshot()
    rise = status()["VmHWM"] - before
    kind = s.index_types()["v"]
    s.close()
    return rise, kind


NTUNE = 500  # rows index.bench holds out for tuning after its queries: skipped here, so the items are its items


def _source(a: argparse.Namespace) -> np.ndarray:
    x = bench_data.embeddings(a.data, a.queries + NTUNE + a.n, ["L"], cache=a.cache, progress=False)["L"]
    if x.shape[1] != a.dim:
        raise SystemExit(f"error: {a.data} has {x.shape[1]} dimensions; pass --dim {x.shape[1]}")
    return x


def items(a: argparse.Namespace) -> np.ndarray:
    """The ``n`` indexed vectors: clustered Gaussians, or real embeddings (``--data embeddings:MODEL:SPEC``, view
    L, index.bench's indexed rows: after its timed and tuning queries)."""
    if a.data == "clustered":
        return make_data(a.n, a.dim, "clustered", seed=0)
    return holdout(_source(a), a.queries, NTUNE, a.n)[2]


def queries(a: argparse.Namespace) -> np.ndarray:
    """The timed queries, never indexed: clustered Gaussians of another seed, or index.bench's timed rows."""
    if a.data == "clustered":
        return make_data(a.queries, a.dim, "clustered", seed=1)
    return np.array(_source(a)[:a.queries])


def build(a: argparse.Namespace, disk: Path, ram: Path) -> dict:
    x = items(a)  # (n, dim)
    factory = f"IVF{nlist_for(a.n)},Flat"
    t0 = time.perf_counter()
    s = IndexStore.create(disk, views={"v": a.dim}, fingerprint="bench", model_ref="bench", factory=factory,
                          storage="disk", follow=False)
    for lo in range(0, a.n, 50_000):
        s.add([f"k{i}" for i in range(lo, min(a.n, lo + 50_000))], {"v": x[lo:lo + 50_000]})
    s.snapshot()  # trains, commits, maps
    s.close()
    build_s = time.perf_counter() - t0
    shutil.copytree(disk, ram)
    man = mf.read_manifest(ram)
    man["views"]["v"].pop("storage")
    mf.commit_manifest(ram, man)
    xq = queries(a)  # (queries, dim), not in x
    np.save(disk.parent / "gt.npy", faiss.knn(xq, x, 10, metric=faiss.METRIC_INNER_PRODUCT)[1])  # exact ids
    return {"n": a.n, "dim": a.dim, "factory": factory, "file_mb": view_file(disk).stat().st_size / 2**20,
            "build_s": build_s}


def query(a: argparse.Namespace, path: Path, on_disk: bool) -> dict:
    """In a fresh process: RSS of opening, cold/warm (on disk) or in-RAM single-query QPS, recall@10."""
    xq = queries(a)
    gt = np.load(path.parent / "gt.npy")
    fp, res = view_file(path), {}
    tag = ("disk" if a.prefetch == ondisk.PREFETCH_THREADS else f"disk_prefetch{a.prefetch}") if on_disk else "ram"
    ondisk.PREFETCH_THREADS = a.prefetch
    drop_cache(fp)
    rss0 = status()["VmRSS"]
    s = IndexStore.open(path, readonly=True, follow=False)
    res[f"{tag}_open_rss_mb"] = (status()["VmRSS"] - rss0) / 1024
    res[f"{tag}_cached_after_open_mb"] = resident_mb(fp)  # opening reads the file once: its sha256
    drop_cache(fp)  # mapped, but no page of it faulted in by this process yet: they can be dropped
    res[f"{tag}_cached_before_mb"] = resident_mb(fp)
    res[f"{tag}_type"] = s.index_types()["v"]
    if on_disk:
        res[f"{tag}_cold_qps"], _, res[f"{tag}_cold_p99_ms"] = qps(s, xq[:a.cold], a.nprobe)
        res[f"{tag}_cached_after_cold_mb"] = resident_mb(fp)
        warm_cache(fp)
    qps(s, xq, a.nprobe)  # one pass to fault the pages in
    res[f"{tag}_qps"], I, res[f"{tag}_p99_ms"] = qps(s, xq, a.nprobe)
    res[f"{tag}_recall10"] = recall(I, gt)
    np.save(path.parent / f"I_{tag}.npy", I)
    s.close()
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--cold", type=int, default=200, help="queries measured right after dropping the page cache")
    ap.add_argument("--phase", choices=["all", "build", "disk", "ram", "snap-disk", "snap-ram"], default="all",
                    help=argparse.SUPPRESS)  # each measurement runs in a fresh process (clean RSS)
    ap.add_argument("--prefetch", type=int, default=ondisk.PREFETCH_THREADS,
                    help="FAISS prefetch threads per search of the on-disk view (measured beside 32, FAISS's)")
    ap.add_argument("--data", default="clustered",
                    help="clustered (Gaussians), or embeddings:MODEL:SPEC: real embeddings of view L through "
                         "index.bench_data's cache (index.bench's held-out queries and indexed rows)")
    ap.add_argument("--cache", default=None, help="embeddings: cache directory (index.bench_data)")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ondisk_bench_"))
    disk, ram = work / "disk", work / "ram"
    if a.phase != "all":
        fresh = make_data(a.n // 100 + 1, a.dim, "clustered", 2)
        res = {"build": lambda: build(a, disk, ram), "disk": lambda: query(a, disk, True),
               "ram": lambda: query(a, ram, False),
               "snap-disk": lambda: {"disk_snapshot_rise_mb": snapshot_rise(disk, fresh, a.n)[0] / 1024},
               "snap-ram": lambda: {"ram_snapshot_rise_mb": snapshot_rise(ram, fresh, a.n)[0] / 1024}}[a.phase]()
        print(json.dumps(res))
        return
    res: dict = {"nprobe": a.nprobe, "data": a.data}
    for phase, prefetch in (("build", a.prefetch), ("disk", a.prefetch), ("disk", 32), ("ram", a.prefetch),
                            ("snap-ram", a.prefetch), ("snap-disk", a.prefetch)):
        args = [sys.executable, "-m", "index.ondisk_bench", "--phase", phase, "--workdir", str(work),
                f"--prefetch={prefetch}"]
        args += [f"--{k}={getattr(a, k)}" for k in ("n", "dim", "nprobe", "queries", "cold", "data")]
        args += [f"--cache={a.cache}"] if a.cache else []
        out = subprocess.run(args, capture_output=True, text=True, check=True)
        res.update(json.loads(out.stdout.strip().splitlines()[-1]))
    res["same_ids_disk_ram"] = float((np.load(work / "I_disk.npy") == np.load(work / "I_ram.npy")).mean())
    for k, v in res.items():
        print(f"{k:26s} {round(v, 3) if isinstance(v, float) else v}")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
