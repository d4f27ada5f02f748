"""Benchmark index types through IndexStore: build time, memory, QPS (batch 1 and 64), recall@k vs exact.

    python -m index.bench --n 100000 --dim 128 --nq 1000 --k 10 --types flat,hnsw,ivf,ivfpq,auto \
        --data clustered,uniform --out bench_out/index_bench.json

ANN search parameters (nprobe / efSearch) are tuned per index with ``IndexStore.tune_search`` on a separate
set of 200 queries: the smallest value reaching ``--target-recall`` is then used for the timed queries.
Batch-1 queries run with one FAISS thread (as a server thread would; on this 2-core machine OpenMP start-up
made a single exact query ~100x slower with 2 threads); builds and batch-64 queries use all threads.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from index.factory import choose_factory, nlist_for
from index.recall import exact_knn, overlap
from index.store import IndexStore

LOG = logging.getLogger(__name__)


def make_data(n: int, dim: int, kind: str, seed: int) -> np.ndarray:
    """Deterministic unit vectors: 'uniform' on the sphere, or a 'clustered' Gaussian mixture."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        centers = np.random.default_rng(12345).standard_normal((1000, dim), dtype=np.float32)
        x = centers[rng.integers(0, len(centers), n)]
        x += 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x  # (n, dim)


def factory_for(kind: str, n: int, dim: int, budget_mb: int) -> str:
    nlist = nlist_for(n)
    return {"flat": "Flat", "hnsw": "HNSW32,Flat", "ivf": f"IVF{nlist},Flat",
            "ivfpq": f"IVF{nlist},PQ{max(1, dim // 4)}x8", "auto": choose_factory(n, dim, budget_mb)}[kind]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_one(kind: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, xt: np.ndarray, gt_t: np.ndarray,
              k: int, budget_mb: int, target: float, workdir: Path) -> dict:
    n, dim = xb.shape
    fstr = factory_for(kind, n, dim, budget_mb)
    rss0, t0 = rss_bytes(), time.perf_counter()
    store = IndexStore.create(workdir / f"{kind}_{n}", views={"v": dim}, fingerprint="bench", model_ref="bench",
                              factory=fstr, snapshot_ops=10**9, snapshot_seconds=1e9)
    chunk = 50_000
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        store.add([str(i) for i in range(s, e)], {"v": xb[s:e]})
    build_s = time.perf_counter() - t0
    rss_delta = rss_bytes() - rss0
    index = store.index_of("v")
    size = int(faiss.serialize_index(index).nbytes)
    tuned = store.tune_search("v", xt, gt_t, k=k, target_recall=target)
    params = {p: tuned[p] for p in ("nprobe", "ef_search") if p in tuned}
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one query per request thread: OpenMP spin-up dominates a single query
    t0 = time.perf_counter()
    for i in range(len(xq)):
        store.search(xq[i:i + 1], "v", k)
    qps1 = len(xq) / (time.perf_counter() - t0)
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    Is = [store.search(xq[i:i + 64], "v", k)[1] for i in range(0, len(xq), 64)]
    qps64 = len(xq) / (time.perf_counter() - t0)
    rec = overlap(np.concatenate(Is), gt)
    store.close(snapshot=False)
    return {"type": kind, "factory": store.manifest["views"]["v"]["factory"], "n": n, "dim": dim,
            "build_s": round(build_s, 2), "index_bytes": size, "rss_delta_bytes": rss_delta, "params": params,
            f"recall@{k}": round(rec, 4), "qps_batch1": round(qps1, 1), "qps_batch64": round(qps64, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="100000", help="comma-separated collection sizes")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--types", default="flat,hnsw,ivf,ivfpq,auto")
    ap.add_argument("--data", default="clustered", help="comma-separated: clustered, uniform")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--memory-budget-mb", type=int, default=2048)
    ap.add_argument("--out", default="bench_out/index_bench.json")
    ap.add_argument("--workdir", default=None, help="where index directories go (default: a temp dir)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in [int(v) for v in args.n.split(",")]:
            for kind in args.data.split(","):
                xb = make_data(n, args.dim, kind, seed=0)
                xq, xt = make_data(args.nq, args.dim, kind, seed=1), make_data(200, args.dim, kind, seed=2)
                gt, gt_t = exact_knn(xq, xb, args.k)[1], exact_knn(xt, xb, args.k)[1]
                for t in args.types.split(","):
                    row = bench_one(t, xb, xq, gt, xt, gt_t, args.k, args.memory_budget_mb, args.target_recall,
                                    Path(tmp))
                    row["data"] = kind
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    for d in Path(tmp).iterdir():
                        if d.is_dir():
                            for f in d.iterdir():
                                f.unlink()
                            d.rmdir()
    flat1 = {(r["n"], r["data"]): r["qps_batch1"] for r in rows if r["type"] == "flat"}
    for r in rows:
        if (r["n"], r["data"]) in flat1:
            r["speedup_batch1_vs_flat"] = round(r["qps_batch1"] / flat1[(r["n"], r["data"])], 1)
    hdr = ["data", "n", "type", "factory", "params", "build_s", "index_MB", "rss_MB", f"recall@{args.k}",
           "qps_b1", "qps_b64", "x_flat_b1"]
    table = [[r["data"], str(r["n"]), r["type"], r["factory"], ",".join(f"{a}={b}" for a, b in r["params"].items()),
              f"{r['build_s']:.1f}", f"{r['index_bytes'] / 2**20:.0f}", f"{r['rss_delta_bytes'] / 2**20:.0f}",
              f"{r[f'recall@{args.k}']:.3f}", f"{r['qps_batch1']:.0f}", f"{r['qps_batch64']:.0f}",
              str(r.get("speedup_batch1_vs_flat", "-"))] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(hdr)]
    print("  ".join(h.ljust(w) for h, w in zip(hdr, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(), "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
