"""Benchmark index types through IndexStore: build time, memory, QPS (batch 1 and 64), recall@k vs exact.

    python -m index.bench --n 100000 --dim 128 --nq 1000 --k 10 --types flat,hnsw,ivf,ivfpq,auto \
        --data clustered,uniform --out bench_out/index_bench.json

ANN search parameters (nprobe / efSearch) are tuned per index with ``IndexStore.tune_search`` on a separate
set of 200 queries: the smallest value reaching ``--target-recall`` is then used for the timed queries.
Batch-1 queries run with one FAISS thread (as a server thread would; on this 2-core machine OpenMP start-up
made a single exact query ~100x slower with 2 threads); builds and batch-64 queries use all threads.

Real embeddings (``--data embeddings:MODEL:SPEC``, index/bench_data.py: a model's ONNX graphs over rendered
scenes or a data spec, cached as one ``.npy`` per view under ``--cache``):

    python -m index.bench --data embeddings:default:scenes --n 1000000 --cache /work/bench_cache \
        --types flat,ivf,ivfsq8,ivfpq,ivfpq_rf,opq_rf,auto --budgets 0.5,0.25,0.125 \
        --out docs/results/index_bench_real.json --plot docs/index_bench_real.svg

The first ``--nq`` rows of the source are the timed queries, the next ``--ntune`` the tuning queries, the
``n`` after them the indexed items: queries are held out from the indexed set, and ground truth is exact
search over it. These candidates are built as plain FAISS indexes (``faiss.index_factory``, trained on
``factory.train_sample_size`` vectors, added in chunks), not through IndexStore, whose views cannot hold
re-ranking (``Refine``) indexes; the IVF types share one coarse quantizer, trained once, whose training time
is counted in each of their build times. Each row records the process's peak RSS during the build (VmHWM, reset
before it; the input vectors, held in RAM, are part of it) and what the build added to the RSS before it.
``--types auto --budgets 0.5,0.25,0.125`` gives one ``auto`` row per memory budget, as a fraction of the raw
vectors' size, chosen as ``index.build`` chooses (:func:`auto_choice`: the candidates measured on a sample, which
the row's ``choice`` records beside what the built index reached); budgets choosing the same factory share one
build.
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
from typing import Callable

import faiss
import numpy as np

from index import bench_data
from index.bench_data import make_data  # noqa: F401 - index.bench.make_data, as before
from index.factory import choose_factory, nlist_for, train_sample_size
from index.recall import exact_knn, overlap
from index.store import IndexStore

LOG = logging.getLogger(__name__)


def factory_for(kind: str, n: int, dim: int, budget_mb: int) -> str:
    nlist, m = nlist_for(n), max(1, dim // 4)
    table = {"flat": "Flat", "hnsw": "HNSW32,Flat", "ivf": f"IVF{nlist},Flat", "ivfsq8": f"IVF{nlist},SQ8",
             "ivfsqfp16": f"IVF{nlist},SQfp16", "ivfsq6": f"IVF{nlist},SQ6", "ivfsq4": f"IVF{nlist},SQ4",
             "ivfpq": f"IVF{nlist},PQ{m}x8", "ivfopq": f"OPQ{m},IVF{nlist},PQ{m}x8np",
             "ivfpq_rf": f"IVF{nlist},PQ{m}x8,Refine(SQ8)",
             "opq_rf": f"OPQ{m},IVF{nlist},PQ{m}x8,Refine(SQ8)"}
    if kind == "auto":
        return choose_factory(n, dim, budget_mb)
    if kind not in table:
        raise SystemExit(f"error: unknown index type {kind!r}; known: {', '.join([*table, 'auto'])}")
    return table[kind]


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


def reset_peak_rss() -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux: ``5`` to /proc/self/clear_refs), after
    handing freed heap back to the OS (so a build cannot grow into pages that stay resident from earlier ones)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        LOG.warning("cannot reset the peak RSS (/proc/self/clear_refs): build peaks include earlier ones")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def train_coarse(nlist: int, xb: np.ndarray) -> tuple[np.ndarray, float]:
    """The IVF coarse centroids every non-rotated IVF candidate shares, and the seconds their k-means took
    (on ``train_sample_size`` vectors, as a view's training does)."""
    t0 = time.perf_counter()
    idx = faiss.index_factory(xb.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    idx.train(_sample(xb, train_sample_size(f"IVF{nlist},Flat", xb.shape[1])))
    ivf = faiss.extract_index_ivf(idx)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist), time.perf_counter() - t0


def _sample(xb: np.ndarray, size: int) -> np.ndarray:
    if size >= len(xb):
        return xb
    return xb[np.sort(np.random.default_rng(0).choice(len(xb), size, replace=False))]


def build_raw(fstr: str, xb: np.ndarray, coarse: tuple[np.ndarray, float] | None,
              pq_iters: int = 0) -> tuple[faiss.Index, float, int, int]:
    """A plain FAISS index of ``fstr`` holding ``xb``: (index, build seconds, peak RSS the build added, RSS before
    it). An IVF index without a rotation gets the shared ``coarse`` centroids (their k-means time is added to
    the build's)."""
    dim = xb.shape[1]
    reset_peak_rss()
    rss0, t0 = rss_bytes(), time.perf_counter()
    idx = faiss.index_factory(dim, fstr.removeprefix("IDMap2,"), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(idx)
    extra = 0.0
    if (ivf is not None and coarse is not None and not isinstance(idx, faiss.IndexPreTransform)
            and ivf.nlist == len(coarse[0])):
        ivf.quantizer.add(coarse[0])
        extra = coarse[1]
    if pq_iters and ivf is not None and hasattr(faiss.downcast_index(ivf), "pq"):
        faiss.downcast_index(ivf).pq.cp.niter = pq_iters
    if not idx.is_trained:
        idx.train(_sample(xb, train_sample_size(fstr.removeprefix("IDMap2,"), dim)))
    for s in range(0, len(xb), 100_000):
        idx.add(xb[s:s + 100_000])
    build_s = time.perf_counter() - t0 + extra
    return idx, build_s, peak_rss_bytes() - rss0, rss0


def _set(idx: faiss.Index, params: dict) -> None:
    ps = faiss.ParameterSpace()
    for name, v in params.items():
        ps.set_index_parameter(idx, name, v)


def _search_batched(idx: faiss.Index, xq: np.ndarray, k: int, batch: int = 64) -> np.ndarray:
    return np.concatenate([idx.search(xq[i:i + batch], k)[1] for i in range(0, len(xq), batch)])


def _time_batch1(idx: faiss.Index, xq: np.ndarray, k: int) -> float:
    """Single-query QPS with one FAISS thread."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        t0 = time.perf_counter()
        for i in range(len(xq)):
            idx.search(xq[i:i + 1], k)
        return len(xq) / (time.perf_counter() - t0)
    finally:
        faiss.omp_set_num_threads(threads)


def tune_raw(idx: faiss.Index, xt: np.ndarray, gt_t: np.ndarray, k: int, target: float) -> tuple[dict, float, bool]:
    """The search parameters reaching recall@k >= ``target`` on the tuning queries at the best single-query speed:
    the smallest nprobe (IVF) or efSearch (HNSW) that reaches it, for each re-ranking factor (k_factor_rf, on
    Refine indexes) the fastest of those. Returns (params, tuning recall, reached); where no setting reaches the
    target, the one with the highest recall."""
    ivf = faiss.try_extract_index_ivf(idx)
    base = faiss.downcast_index(idx.base_index) if isinstance(idx, faiss.IndexRefine) else idx
    if ivf is not None:
        name, grid = "nprobe", [2 ** i for i in range(int(np.log2(ivf.nlist)) + 1)]
    elif isinstance(base, faiss.IndexHNSW):
        name, grid = "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]
    else:
        return {}, overlap(_search_batched(idx, xt, k), gt_t), True
    kfs = [1, 2, 4, 8, 16] if isinstance(idx, faiss.IndexRefine) else [None]
    reached: list[tuple[dict, float]] = []
    best: tuple[float, dict] = (-1.0, {})
    for kf in kfs:
        for v in grid:
            params = {name: v} | ({"k_factor_rf": kf} if kf is not None else {})
            _set(idx, params)
            rec = overlap(_search_batched(idx, xt, k), gt_t)
            if rec > best[0]:
                best = (rec, params)
            if rec >= target:
                reached.append((params, rec))
                break
    if not reached:
        _set(idx, best[1])
        return best[1], best[0], False
    timed = []
    for params, rec in reached:
        _set(idx, params)
        timed.append((-_time_batch1(idx, xt[:100], k), params, rec))
    _, params, rec = min(timed, key=lambda t: t[0])
    _set(idx, params)
    return params, rec, True


def bench_raw(kind: str, fstr: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, xt: np.ndarray,
              gt_t: np.ndarray, k: int, target: float, coarse: tuple[np.ndarray, float] | None, workdir: Path,
              flat_nq: int, pq_iters: int = 0) -> dict:
    n, dim = xb.shape
    idx, build_s, peak, rss0 = build_raw(fstr, xb, coarse, pq_iters)
    path = workdir / "bench.faiss"
    faiss.write_index(idx, str(path))
    size = path.stat().st_size
    path.unlink()
    params, rec_t, reached = tune_raw(idx, xt, gt_t, k, target)
    timed = xq[:flat_nq] if fstr.removeprefix("IDMap2,") == "Flat" else xq
    qps1 = _time_batch1(idx, timed, k)
    t0 = time.perf_counter()
    I = _search_batched(idx, xq, k)
    qps64 = len(xq) / (time.perf_counter() - t0)
    del idx
    return {"type": kind, "factory": fstr, "n": n, "dim": dim, "build_s": round(build_s, 2),
            "coarse_train_s": round(coarse[1], 2) if coarse and "IVF" in fstr and "OPQ" not in fstr else None,
            "index_bytes": size, "rss_delta_bytes": peak, "build_peak_rss_bytes": rss0 + peak,
            "rss_before_build_bytes": rss0, "params": params,
            f"recall@{k}": round(overlap(I, gt), 4), "tune_recall": round(rec_t, 4), "target_reached": reached,
            "timed_queries_batch1": len(timed), "qps_batch1": round(qps1, 1), "qps_batch64": round(qps64, 1)}


def neighbour_stats(xq: np.ndarray, xb: np.ndarray, D: np.ndarray) -> dict:
    """How the exact top-k inner products of held-out queries compare with those of random pairs: the spread that
    decides how hard ANN search is (close, well-separated neighbours are easy; uniform vectors, whose
    neighbours are barely closer than anyone, are hardest)."""
    k = D.shape[1]
    r = (xq[:200] @ _sample(xb, 10_000).T).ravel()
    q = lambda a, p: round(float(np.percentile(a, p)), 4)  # noqa: E731
    return {"top1_mean": round(float(D[:, 0].mean()), 4), "top1_p5": q(D[:, 0], 5), "top1_p95": q(D[:, 0], 95),
            f"top{k}_mean": round(float(D[:, -1].mean()), 4), f"top{k}_p5": q(D[:, -1], 5),
            f"top{k}_p95": q(D[:, -1], 95), "random_mean": round(float(r.mean()), 4),
            "random_std": round(float(r.std()), 4), "random_p99": q(r, 99), "random_p99_99": q(r, 99.99),
            "gap_top1_top10": round(float((D[:, 0] - D[:, -1]).mean()), 4),
            "relative_contrast": round(float((1 - r.mean()) / max(1e-9, 1 - D[:, 0].mean())), 3),
            f"top{k}_z": round(float((D[:, -1].mean() - r.mean()) / r.std()), 2)}


def holdout(x: np.ndarray, nq: int, ntune: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a source -> (timed queries: the first ``nq``, tuning queries: the next ``ntune``, indexed items: the
    ``n`` after them), copied into RAM (build peaks are then not page-cache noise). No query is an indexed row."""
    if len(x) < nq + ntune + n:
        raise SystemExit(f"error: the source has {len(x)} rows; {nq} + {ntune} held out + {n} indexed were asked for")
    return np.array(x[:nq]), np.array(x[nq:nq + ntune]), np.array(x[nq + ntune:nq + ntune + n])


def run_embeddings(args: argparse.Namespace, spec: str, tmp: Path,
                   on_row: Callable[[list[dict], dict], None] | None = None) -> tuple[list[dict], dict]:
    """Every candidate on the real embeddings of one view, plus the neighbourhood statistics of the data and of
    clustered Gaussians of the same size."""
    views = [v.strip() for v in args.views.split(",") if v.strip()]
    if len(views) != 1:
        raise SystemExit("error: --views: the index benchmark measures one view at a time")
    rows, stats = [], {}
    for n in [int(v) for v in args.n.split(",")]:
        hold = args.nq + args.ntune
        try:
            x = bench_data.embeddings(spec, hold + n, views, cache=args.cache, workers=args.workers,
                                      threads=args.threads)[views[0]]
        except bench_data.BenchDataError as e:
            raise SystemExit(f"error: {e}") from None
        xq, xt, xb = holdout(x, args.nq, args.ntune, n)
        del x
        dim = xb.shape[1]
        t0 = time.perf_counter()
        D, gt = exact_knn(xq, xb, args.k)
        gt_t = exact_knn(xt, xb, args.k)[1]
        LOG.warning("exact ground truth for %d queries over %d items in %.1f s", hold, n, time.perf_counter() - t0)
        stats[str(n)] = {"data": neighbour_stats(xq, xb, D)}
        if args.compare_synthetic:
            sb, sq = make_data(n, dim, "clustered", seed=0), make_data(args.nq, dim, "clustered", seed=1)
            stats[str(n)]["clustered"] = neighbour_stats(sq, sb, exact_knn(sq, sb, args.k)[0])
            del sb, sq
        print(json.dumps({"n": n, "neighbour_stats": stats[str(n)]}), flush=True)
        kinds: list[tuple[str, str, int | None, dict | None]] = []
        for t in args.types.split(","):
            if t == "auto" and args.budgets:
                for frac in [float(b) for b in args.budgets.split(",")]:
                    mb = max(1, int(frac * n * dim * 4 / 2**20))
                    choice = auto_choice(xb, mb, args.target_recall, args.k)
                    kinds.append((f"auto@{frac:g}", choice["factory"], mb, choice))
            else:
                kinds.append((t, factory_for(t, n, dim, args.memory_budget_mb),
                              args.memory_budget_mb if t == "auto" else None, None))
        nlist = nlist_for(n)
        coarse = None
        if any(f"IVF{nlist}," in f and "OPQ" not in f for _, f, _, _ in kinds):
            coarse = train_coarse(nlist, xb)
            LOG.warning("coarse quantizer IVF%d trained in %.1f s", nlist, coarse[1])
        built: dict[str, dict] = {}
        for kind, fstr, mb, choice in kinds:
            if kind == "hnsw" and n > args.hnsw_max:
                LOG.warning("skipping hnsw at n=%d (> --hnsw-max %d): its build does not fit the time here",
                            n, args.hnsw_max)
                continue
            if fstr in built:  # the same index (e.g. two budgets choosing one type): measured once
                row = dict(built[fstr], type=kind, same_build_as=built[fstr]["type"])
            else:
                row = bench_raw(kind, fstr, xb, xq, gt, xt, gt_t, args.k, args.target_recall, coarse, tmp,
                                args.flat_nq, args.pq_train_iters)
                built[fstr] = row
            row["data"] = spec
            if mb is not None:
                row["budget_mb"] = mb
                row["budget_fraction_of_raw"] = round(mb * 2**20 / (n * dim * 4), 4)
            if choice is not None:  # what the chooser measured on its sample, beside what the index reached
                row["choice"] = {k: v for k, v in choice.items() if k != "factory"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if on_row is not None:  # results so far on disk: a long run stopped early keeps its rows
                on_row(rows, stats)
    return rows, stats


def auto_choice(xb: np.ndarray, budget_mb: int, target: float, k: int = 10) -> dict:
    """The choice ``index.build`` makes for ``xb`` (n, dim) within ``budget_mb`` (its ``factory``, ``reason`` and,
    when measured, ``candidates``, ``measured_at_k``, ``sample``): the static choice when the raw vectors fit,
    else the fitting compressed candidates measured on a budget-bounded random sample
    (``index.choose.choose_trained``, as the build does)."""
    from index import choose
    from index import factory as fac
    n, dim = xb.shape
    static = fac.static_choice(n, dim, budget_mb)["factory"]
    size = choose.sample_size(static, n, dim, budget_mb)
    sample = np.ascontiguousarray(xb[np.sort(np.random.default_rng(0).choice(n, size, replace=False))])
    choice, _ = choose.choose_trained(sample, n, dim, budget_mb, target=target, k=k)
    LOG.warning("auto within %d MB: %s (%s)", budget_mb, choice["factory"], choice.get("reason"))
    return choice


def backend_argv(args: argparse.Namespace) -> list[str]:
    """``index.bench --backend milvus`` as ``index.bench_backends``'s arguments: the same sizes, queries, k,
    target and output; real embeddings through their cached ``.npy`` (embedded first when not cached yet)."""
    types = [t for t in args.types.split(",") if t in ("flat", "ivf", "hnsw")] or ["ivf", "hnsw"]
    out = ["--n", args.n, "--dim", str(args.dim), "--nq", str(args.nq), "--k", str(args.k), "--types", ",".join(types),
           "--backends", "faiss,milvus", "--target-recall", str(args.target_recall), "--out", args.out]
    if args.workdir:
        out += ["--workdir", args.workdir]
    data = args.data.split(",")
    if len(data) != 1 or not (bench_data.is_embeddings(data[0]) or data[0] == "clustered"):
        raise SystemExit("error: --backend milvus takes one --data: clustered or embeddings:MODEL:SPEC")
    if bench_data.is_embeddings(data[0]):
        rows = max(int(v) for v in args.n.split(",")) + args.nq + 200  # load_vectors: n, then nq + 200 held out
        x = bench_data.embeddings(data[0], rows, [args.views], cache=args.cache)[args.views]
        out += ["--vectors", str(x.filename), "--vectors-rows", str(rows)]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="100000", help="comma-separated collection sizes")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--types", default="flat,hnsw,ivf,ivfpq,auto")
    ap.add_argument("--data", default="clustered",
                    help="comma-separated: clustered, uniform, embeddings:MODEL:SPEC (index/bench_data.py)")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--memory-budget-mb", type=int, default=2048)
    ap.add_argument("--budgets", default=None,
                    help="embeddings: one 'auto' row per memory budget, as fractions of the raw vectors' size "
                         "(e.g. 0.5,0.25,0.125)")
    ap.add_argument("--views", default="L", help="embeddings: the view to benchmark")
    ap.add_argument("--cache", default=None, help="embeddings: cache directory (default $CMC_HOME/bench)")
    ap.add_argument("--ntune", type=int, default=500, help="embeddings: held-out queries for tuning nprobe/efSearch")
    ap.add_argument("--flat-nq", type=int, default=300, help="embeddings: queries timed one by one on Flat")
    ap.add_argument("--hnsw-max", type=int, default=200_000, help="embeddings: skip hnsw above this n")
    ap.add_argument("--no-compare-synthetic", dest="compare_synthetic", action="store_false",
                    help="embeddings: skip the neighbourhood statistics of clustered Gaussians of the same size")
    ap.add_argument("--workers", type=int, default=None, help="embeddings: render processes for scenes")
    ap.add_argument("--threads", type=int, default=0, help="embeddings: onnxruntime threads (0: its default)")
    ap.add_argument("--faiss-threads", type=int, default=0,
                    help="FAISS threads for builds and batch-64 queries (0: all); 1 avoids OpenMP barrier stalls "
                         "on an oversubscribed machine")
    ap.add_argument("--pq-train-iters", type=int, default=0,
                    help="embeddings: k-means iterations of PQ codebook training (0: FAISS's default, 25)")
    ap.add_argument("--plot", default=None, help="embeddings: recall@k vs single-query QPS plot (.svg or .png)")
    ap.add_argument("--backend", default="faiss", choices=["faiss", "milvus"],
                    help="milvus: the Milvus backend beside the FAISS one on the same vectors, through a milvus-lite "
                         "server started here (index/bench_backends.py; --types among flat, ivf, hnsw)")
    ap.add_argument("--out", default="bench_out/index_bench.json")
    ap.add_argument("--workdir", default=None, help="where index directories go (default: a temp dir)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.backend == "milvus":
        from index import bench_backends
        bench_backends.main(backend_argv(args))
        return
    if args.faiss_threads:
        faiss.omp_set_num_threads(args.faiss_threads)
    rows: list[dict] = []
    stats: dict = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for kind in args.data.split(","):
            if bench_data.is_embeddings(kind):
                partial = Path(args.out).with_suffix(".partial.json")
                partial.parent.mkdir(parents=True, exist_ok=True)
                r, st = run_embeddings(args, kind, Path(tmp), lambda rs, st: partial.write_text(
                    json.dumps({"args": vars(args), "results": rows + rs, "neighbour_stats": {kind: st}}, indent=1)))
                partial.unlink(missing_ok=True)
                rows += r
                stats[kind] = st
                continue
            if kind not in ("clustered", "uniform"):
                raise SystemExit(f"error: unknown --data {kind!r}: clustered, uniform or embeddings:MODEL:SPEC")
            for n in [int(v) for v in args.n.split(",")]:
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
    doc = {"meta": meta, "results": rows} | ({"neighbour_stats": stats} if stats else {})
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    if args.plot:
        from index.bench_plot import plot_recall_qps
        print(f"wrote {plot_recall_qps(rows, args.plot, k=args.k, target=args.target_recall)}")


if __name__ == "__main__":
    main()
