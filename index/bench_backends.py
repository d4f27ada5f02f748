"""The Milvus backend beside the FAISS backend on the same vectors: build time, recall@k against exact search,
single-query and batched QPS, memory.

    python -m index.bench_backends --n 100000 --types ivf,hnsw --out bench_out/backends.json
    python -m index.bench_backends --vectors /work/bench_cache/emb.npy --n 1000000 --types ivf

Both backends go through their store (``index.store.IndexStore`` and ``index.milvus.MilvusStore``, the surface the
server uses), with the same index family at the same size: ``ivf`` is FAISS ``IVF<nlist>,Flat`` beside Milvus
``IVF_FLAT`` with the same ``nlist`` (``factory.nlist_for``), ``hnsw`` is FAISS ``HNSW32,Flat`` beside Milvus
``HNSW`` M=32 (efConstruction: FAISS 80, ``factory.EF_CONSTRUCTION``; Milvus 200, ``milvus.index_from_factory``),
``flat`` is exact on both. The search parameter (nprobe, ef) of every row is tuned on 200 separate queries to the
smallest value of ``IndexStore.tune_search``'s grid that reaches ``--target-recall``; the timed queries then run with
it, and their recall against exact search (``faiss.knn``) is the row's. One timing loop serves both backends.

Build time is from an empty index to one answering at its final index type: FAISS's adds and a snapshot (which
trains a due IVF view and writes the index files), Milvus's inserts, flush and the server's index build:
``describe_index`` until every row is indexed, and for a local server until its process group's CPU goes quiet
(Milvus Lite builds segment indexes on a background thread and reports them finished at once; see
``wait_server_idle``). Memory: FAISS lives in this process (its RSS growth during the build, and the serialized index);
Milvus lives in its server: the RSS of the server's process group (``/proc/<pid>/status`` VmRSS of every process
in it) empty and after the build, plus this client's RSS growth during the build (none when
its RSS fell: memory freed from an earlier row).

Without ``--milvus`` a ``milvus-lite server`` process (index.milvus_lite.MilvusLite) is started in a temporary
directory; ``--milvus milvus://HOST:PORT[/DB]`` benchmarks a running Milvus instead (its server memory is then
not read). ``--vectors PATH.npy`` (an (N, dim) float array, e.g. real embeddings) replaces the synthetic clustered
vectors of ``index.bench.make_data``: its last ``nq + 200`` rows are the queries and tuning queries, the first
``n`` the collection.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from index import factory as fac
from index.recall import exact_knn, overlap

LOG = logging.getLogger(__name__)

TYPES = ("flat", "ivf", "hnsw")
TUNE_GRID = {"nprobe": (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024),
             "ef": (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)}  # IndexStore.tune_search's
ADD_CHUNK = 10_000
INDEX_WAIT_S = 3600.0
IDLE_QUIET_S = 3.0  # a local server is done building once it used < IDLE_CPU_FRACTION of a core this long
IDLE_CPU_FRACTION = 0.1


def factory_for(kind: str, n: int, nlist: int | None = None) -> str:
    """The FAISS factory string of index family ``kind`` for ``n`` vectors (Milvus gets the same family);
    ``nlist``: the IVF lists (default ``factory.nlist_for(n)``)."""
    if kind not in TYPES:
        raise ValueError(f"unknown index type {kind!r}; expected one of {', '.join(TYPES)}")
    return {"flat": "Flat", "ivf": f"IVF{nlist or fac.nlist_for(n)},Flat", "hnsw": f"HNSW{fac.HNSW_M},Flat"}[kind]


def rss_bytes(pid: int | str = "self") -> int:
    """VmRSS of one process, from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def group_rss_bytes(pgid: int) -> int:
    """Summed VmRSS of every process in process group ``pgid`` (a server and the children it started)."""
    total = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid:
                    total += rss_bytes(d)
            except OSError:
                continue
    return total


def _qps(search: Callable[[np.ndarray], np.ndarray], xq: np.ndarray, batch: int,
         max_s: float = float("inf")) -> tuple[float, np.ndarray, int]:
    """Queries per second of ``search`` over ``xq`` in batches of ``batch``, the ids it returned, and how many
    queries ran: all of them, or those of the batches started within ``max_s`` seconds (at least one batch)."""
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(xq), batch):
        out.append(search(xq[i:i + batch]))
        if time.perf_counter() - t0 > max_s:
            break
    done = sum(len(o) for o in out)
    return done / (time.perf_counter() - t0), np.concatenate(out), done


def _positions(order: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Map a store's ids to positions in the added vectors (``order``: the ids ``add`` returned, in order)."""
    srt = np.argsort(order)
    keys = order[srt]

    def to_pos(I: np.ndarray) -> np.ndarray:
        j = np.clip(np.searchsorted(keys, I), 0, len(keys) - 1)
        return np.where(keys[j] == I, srt[j], -1)
    return to_pos


def _tune(search: Callable[[np.ndarray, int], np.ndarray], name: str, limit: int, xt: np.ndarray, gt_t: np.ndarray,
          k: int, target: float) -> dict[str, Any]:
    """Smallest ``name`` (nprobe / ef) of the grid (capped at ``limit``) whose recall@k on ``xt`` reaches target."""
    best: dict[str, Any] = {}
    for val in [v for v in TUNE_GRID[name] if v < limit] + [limit]:
        best = {name: val, "tune_recall": round(overlap(search(xt, val), gt_t, k), 4)}
        if best["tune_recall"] >= target:
            break
    return best


def _add_all(store: Any, xb: np.ndarray) -> np.ndarray:
    ids = [store.add([str(i) for i in range(s, min(len(xb), s + ADD_CHUNK))], {"v": xb[s:s + ADD_CHUNK]})
           for s in range(0, len(xb), ADD_CHUNK)]
    return np.concatenate(ids)


def bench_faiss(kind: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, xt: np.ndarray, gt_t: np.ndarray, k: int,
                target: float, workdir: Path, batch1_max_s: float = float("inf"), nlist: int | None = None) -> dict:
    from index.store import IndexStore
    n, dim = xb.shape
    rss0, t0 = rss_bytes(), time.perf_counter()
    store = IndexStore.create(Path(workdir) / f"faiss_{kind}_{n}_{uuid.uuid4().hex[:8]}", views={"v": dim},
                              fingerprint="bench", model_ref="bench", factory=factory_for(kind, n, nlist),
                              snapshot_ops=10**9, snapshot_seconds=1e9)
    try:
        order = _add_all(store, xb)
        store.snapshot()  # trains a due IVF view, and makes the build durable (as Milvus's flush below)
        build_s = time.perf_counter() - t0
        rss_delta = rss_bytes() - rss0
        index = store.index_of("v")
        size = int(faiss.serialize_index(index).nbytes)
        to_pos = _positions(order)
        params: dict[str, Any] = {}
        if fac.is_ivf(index) or fac.is_hnsw(index):
            if not np.array_equal(order, np.arange(n)):  # tune_search compares ids with positions in xb
                raise AssertionError("IndexStore handed out ids other than 0..n-1")
            tuned = store.tune_search("v", xt, gt_t, k=k, target_recall=target)  # the grid _tune uses
            params = {("ef" if a == "ef_search" else a): b for a, b in tuned.items() if a != "recall"}
            params["tune_recall"] = round(tuned["recall"], 4)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # as index.bench: one query per request thread
        try:
            qps1, _, nq1 = _qps(lambda x: store.search(x, "v", k)[1], xq, 1, batch1_max_s)
        finally:
            faiss.omp_set_num_threads(threads)
        qps64, I, _ = _qps(lambda x: store.search(x, "v", k)[1], xq, 64)
        factory = store.manifest["views"]["v"]["factory"]
    finally:
        store.close(snapshot=False)
    return {"backend": "faiss", "type": kind, "index": factory, "params": params, "n": n, "dim": dim,
            "build_s": round(build_s, 2), f"recall@{k}": round(overlap(to_pos(I), gt, k), 4),
            "qps_batch1": round(qps1, 1), "batch1_queries": nq1, "qps_batch64": round(qps64, 1), "index_bytes": size,
            "client_rss_delta_bytes": rss_delta, "memory_bytes": rss_delta}


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the processes of process group ``pgid``."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid:
                    with open(f"/proc/{d}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, ValueError, IndexError):
                continue
    return total


def wait_server_idle(pgid: int, quiet_s: float = IDLE_QUIET_S, timeout: float = INDEX_WAIT_S) -> float:
    """Wait until the server's process group has used (almost) no CPU for ``quiet_s`` seconds; return the
    ``time.perf_counter()`` at which it was last busy. Milvus Lite builds segment indexes (and compacts) on a
    background thread after a flush and answers ``describe_index`` with "Finished, every row indexed" at once,
    so its CPU going quiet is the only outside sign that the build is over."""
    step, t_end = 0.25, time.perf_counter() + timeout
    last_cpu, last_busy = group_cpu_s(pgid), time.perf_counter()
    while time.perf_counter() < t_end:
        time.sleep(step)
        cpu, now = group_cpu_s(pgid), time.perf_counter()
        if cpu - last_cpu > IDLE_CPU_FRACTION * step:
            last_busy = now
        last_cpu = cpu
        if now - last_busy >= quiet_s:
            return last_busy
    raise TimeoutError(f"the Milvus server (process group {pgid}) was still busy after {timeout:.0f} s")


def _wait_indexed(client: Any, name: str, field: str, n: int, timeout: float = INDEX_WAIT_S) -> None:
    """Until Milvus reports every row of ``field`` indexed (its index built on the sealed segments)."""
    t0 = time.time()
    idx = client.list_indexes(name, field_name=field)[0]
    while True:
        d = client.describe_index(name, idx)
        if int(d.get("indexed_rows", 0)) >= n and int(d.get("pending_index_rows", 0)) == 0:
            return
        if d.get("state") == "Failed":
            raise RuntimeError(f"Milvus failed to build the index of {name}.{field}: {d}")
        if time.time() - t0 > timeout:
            raise TimeoutError(f"Milvus index of {name}.{field} not built after {timeout:.0f} s: {d}")
        time.sleep(0.5)


def bench_milvus(kind: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, xt: np.ndarray, gt_t: np.ndarray, k: int,
                 target: float, url: str, server_pgid: int | None = None,
                 batch1_max_s: float = float("inf"), nlist: int | None = None) -> dict:
    """One row for a Milvus collection at ``url`` (``milvus://HOST:PORT[/DB]``; a fresh collection is created
    and dropped afterwards); ``server_pgid``: the server's process group, whose RSS is the row's memory."""
    from pymilvus import MilvusClient

    from index.milvus import MilvusStore, parse_url
    n, dim = xb.shape
    name = f"bench_{kind}_{n}_{uuid.uuid4().hex[:8]}"
    full = f"{url.split('?')[0]}?collection={name}"
    p = parse_url(full)
    admin = MilvusClient(uri=p["uri"], db_name=p["db"], token=p["token"], timeout=60)
    srv0 = group_rss_bytes(server_pgid) if server_pgid else 0
    rss0, t0 = rss_bytes(), time.perf_counter()
    store = MilvusStore.create(full, views={"v": dim}, fingerprint="bench", model_ref="bench",
                               factory=factory_for(kind, n, nlist))
    try:
        t_ins = time.perf_counter()
        order = _add_all(store, xb)
        insert_s = time.perf_counter() - t_ins
        store.snapshot()  # flush: seal the segments, which Milvus then indexes
        e = store.manifest["views"]["v"]
        _wait_indexed(admin, name, e["field"], n)
        build_s = (wait_server_idle(server_pgid) if server_pgid else time.perf_counter()) - t0
        rss_delta = rss_bytes() - rss0
        srv = group_rss_bytes(server_pgid) if server_pgid else 0
        to_pos = _positions(order)
        name_p = {"IVF_FLAT": "nprobe", "HNSW": "ef"}.get(e["type"])
        params: dict[str, Any] = {}
        if name_p:
            limit = int(e["params"]["nlist"]) if name_p == "nprobe" else 1024

            def with_param(x: np.ndarray, val: int) -> np.ndarray:
                store._manifest["views"]["v"]["search"] = {name_p: int(val)}  # the store's search parameters
                return to_pos(store.search(x, "v", k)[1])
            params = _tune(with_param, name_p, limit, xt, gt_t, k, target)
            store._manifest["views"]["v"]["search"] = {name_p: params[name_p]}
        qps1, _, nq1 = _qps(lambda x: store.search(x, "v", k)[1], xq, 1, batch1_max_s)
        qps64, I, _ = _qps(lambda x: store.search(x, "v", k)[1], xq, 64)
        index = "milvus " + e["type"] + "".join(f" {a}={b}" for a, b in e["params"].items())
    finally:
        store.close()
        try:
            admin.drop_collection(name)
        finally:
            admin.close()
    return {"backend": "milvus", "type": kind, "index": index, "params": params, "n": n, "dim": dim,
            "build_s": round(build_s, 2), "insert_s": round(insert_s, 2),
            f"recall@{k}": round(overlap(to_pos(I), gt, k), 4), "qps_batch1": round(qps1, 1),
            "batch1_queries": nq1, "qps_batch64": round(qps64, 1), "server_rss_empty_bytes": srv0,
            "server_rss_bytes": srv,
            "client_rss_delta_bytes": rss_delta, "memory_bytes": (srv + max(0, rss_delta)) if server_pgid else None}


def bench_backend(backend: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, xt: np.ndarray, gt_t: np.ndarray,
                  k: int, target_recall: float, workdir: str | Path, *, kind: str = "ivf",
                  milvus_url: str | None = None, batch1_max_s: float = float("inf"),
                  nlist: int | None = None) -> dict:
    """One benchmark row of ``backend`` ('faiss' or 'milvus') for index family ``kind`` on ``xb`` (n, dim):
    ``gt``/``gt_t`` are the exact top-k positions in ``xb`` of the timed queries ``xq`` and tuning queries ``xt``.
    Milvus: the server at ``milvus_url`` (``milvus://HOST:PORT[/DB]``), else a ``milvus-lite server`` started in
    ``workdir`` for this row and stopped after it. The single-query loop stops after ``batch1_max_s`` seconds
    (the row says how many queries it timed: ``batch1_queries``); the batched loop and recall use every query.
    ``nlist``: the IVF lists of both backends (default ``factory.nlist_for(n)``; FAISS trains once 39 per list
    have arrived, so a smaller ``n`` needs fewer)."""
    xb, xq, xt = (np.ascontiguousarray(a, dtype=np.float32) for a in (xb, xq, xt))
    if backend == "faiss":
        return bench_faiss(kind, xb, xq, gt, xt, gt_t, k, target_recall, Path(workdir), batch1_max_s, nlist)
    if backend != "milvus":
        raise ValueError(f"unknown backend {backend!r}; expected faiss or milvus")
    if milvus_url:
        return bench_milvus(kind, xb, xq, gt, xt, gt_t, k, target_recall, milvus_url, batch1_max_s=batch1_max_s,
                            nlist=nlist)
    from index.milvus_lite import MilvusLite
    srv = MilvusLite(Path(workdir) / f"milvus-{uuid.uuid4().hex[:8]}").wait_ready()
    try:
        return bench_milvus(kind, xb, xq, gt, xt, gt_t, k, target_recall, srv.url("x"), server_pgid=srv.proc.pid,
                            batch1_max_s=batch1_max_s, nlist=nlist)
    finally:
        srv.stop()


def load_vectors(path: str | Path, n: int, nq: int, nt: int,
                 rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xb, xq, xt)`` from an (N, dim) .npy file, L2-normalised: the first ``n`` rows, then the last
    ``nq + nt`` rows (disjoint from the first ``n``); ``rows``: use only the file's first ``rows`` rows (a cache
    still being written)."""
    a = np.load(path, mmap_mode="r")
    if a.ndim != 2:
        raise ValueError(f"{path}: expected an (N, dim) array, got shape {a.shape}")
    a = a[:rows] if rows else a
    if len(a) < n + nq + nt:
        raise ValueError(f"{path}: {len(a)} rows, need n + nq + 200 = {n + nq + nt}")
    out = []
    for part in (a[:n], a[len(a) - nq - nt:len(a) - nt], a[len(a) - nt:]):
        x = np.array(part, dtype=np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if not np.all(norms > 0):
            raise ValueError(f"{path}: {int(np.sum(norms == 0))} all-zero rows among those used (an unfinished "
                             f"cache?)")
        x /= norms
        out.append(x)
    return out[0], out[1], out[2]


def table(rows: list[dict], k: int) -> str:
    hdr = ["n", "backend", "index", "params", "build_s", f"recall@{k}", "qps_b1", "qps_b64", "memory_MB",
           "server_empty_MB"]
    body = [[str(r["n"]), r["backend"], r["index"], ",".join(f"{a}={b}" for a, b in r["params"].items()
                                                             if a != "tune_recall"),
             f"{r['build_s']:.1f}", f"{r[f'recall@{k}']:.3f}", f"{r['qps_batch1']:.0f}", f"{r['qps_batch64']:.0f}",
             "-" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.0f}",
             f"{r['server_rss_empty_bytes'] / 2**20:.0f}" if r.get("server_rss_empty_bytes") else "-"]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(hdr)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [hdr, *body])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="100000", help="comma-separated collection sizes")
    ap.add_argument("--dim", type=int, default=128, help="dimension of the synthetic vectors")
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--types", default="ivf,hnsw", help="comma-separated: flat, ivf, hnsw")
    ap.add_argument("--backends", default="faiss,milvus")
    ap.add_argument("--vectors", default=None, help="an (N, dim) .npy of real embeddings instead of synthetic ones")
    ap.add_argument("--vectors-rows", type=int, default=None,
                    help="use only the first ROWS rows of --vectors (a cache still being filled)")
    ap.add_argument("--milvus", default=None, help="milvus://HOST:PORT[/DB] of a running Milvus (default: start "
                                                   "milvus-lite)")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--batch1-max-s", type=float, default=120.0,
                    help="stop the single-query loop after this long (Milvus Lite at 1M: ~1 s a query)")
    ap.add_argument("--out", default="bench_out/backends.json")
    ap.add_argument("--workdir", default=None, help="where indexes and milvus-lite's data go (default: a temp dir)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    types = args.types.split(",")
    for t in types:
        factory_for(t, 1)
    backends = args.backends.split(",")
    if not set(backends) <= {"faiss", "milvus"}:
        ap.error(f"--backends: expected faiss and/or milvus, got {args.backends!r}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in [int(v) for v in args.n.split(",")]:
            if args.vectors:
                xb, xq, xt = load_vectors(args.vectors, n, args.nq, 200, args.vectors_rows)
            else:
                from index.bench_data import make_data
                xb = make_data(n, args.dim, "clustered", seed=0)
                xq, xt = make_data(args.nq, args.dim, "clustered", seed=1), make_data(200, args.dim, "clustered", 2)
            gt, gt_t = exact_knn(xq, xb, args.k)[1], exact_knn(xt, xb, args.k)[1]
            for t in types:
                for b in backends:
                    row = bench_backend(b, xb, xq, gt, xt, gt_t, args.k, args.target_recall, tmp, kind=t,
                                        milvus_url=args.milvus, batch1_max_s=args.batch1_max_s)
                    row["data"] = Path(args.vectors).name if args.vectors else "clustered"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(table(rows, args.k))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import PackageNotFoundError, version
    try:
        lite = version("milvus-lite")
    except PackageNotFoundError:
        lite = None
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "faiss": faiss.__version__,
            "pymilvus": version("pymilvus"), "milvus_lite": lite, "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
