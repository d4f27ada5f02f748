"""A view of ten million items built within a memory budget: ``python -m index.bench_scale``.

    python -m index.bench_scale --real 100000 --n 10000000 --noise 0.3 --memory-mb 4096 \\
        --cache /work/bench_cache --work /work/scale --out docs/results/index_scale_10m.json

1. **Real embeddings** (``index.bench_data``, ``embeddings:default:scenes``): ``1,500 + real`` rows; the first
   1,000 are the held-out timed queries, the next 500 the held-out tuning queries (as in ``index.bench``), the
   rest the base.
2. **Expanded to ``n`` rows** (``<work>/vectors/L.npy``, written chunk by chunk): row j is base row ``j mod
   real``; the first ``real`` rows are the embeddings themselves, every later copy is that embedding plus
   Gaussian noise of expected norm ``noise`` (isotropic, ``noise / sqrt(d)`` per coordinate), renormalised. So
   the set is real embeddings repeated with small noise, not ten million real images (which would take about
   ten hours to render and embed here): each real item becomes a cloud of ``n / real`` points whose pairwise
   inner products (about ``1 / (1 + noise**2)``, 0.92 at 0.3) sit where a real item's nearest neighbours do at
   1M (top-1 0.93, 10th 0.90), so the neighbours of a query are a mix of copies of several real items.
3. **Exact ground truth** for both query sets over the ``n`` rows, streamed from the file (``<work>/gt.npy``).
4. **The build** is the user's command, ``python -m index.build --data vectors:<work>/vectors --memory-mb MB``
   (``index/vector_files.py``), run as a child process: its wall time and peak RSS (``wait4``'s ``ru_maxrss``)
   are recorded with the choice it made.
5. **Tuning on held-out queries**: the build tunes nprobe leave-one-out on stored items, which here have
   noisy copies of themselves in the index (held-out queries have none), so nprobe is tuned again on the 500
   tuning queries (``IndexStore.tune_search``, the store's default from then on, committed by a snapshot).
   ``--given-queries`` passes those 500 to the build itself (``index.build --queries``), so that the budget's
   choice, not only the nprobe, is measured on queries like the timed ones (which it never sees); the build's
   tuning is then the one reported, not repeated.
6. **Search in process**: the store opened read-only as the server opens it, recall@10
   of the timed queries at the tuned nprobe, single-query QPS on one thread, batch-64 QPS; exact search's
   single-query QPS is measured on the first ``EXACT_SLICE`` rows and scaled by ``n / EXACT_SLICE`` (exact
   search is linear in n; holding all ``n`` raw rows is what the budget forbids).

The server over the same index is measured by ``python -m serving.measure.scale --work DIR`` (index/ must not
import serving/). Every step is skipped when its output exists with the same parameters (``<work>/*.json``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from . import manifest as mf
from .bench_data import embeddings
from .recall import exact_knn, merge_topk, overlap
from .store import IndexStore
from .vector_files import VectorFiles, write_npy_header

LOG = logging.getLogger(__name__)
SPEC = "embeddings:default:scenes"
NQ, NTUNE = 1000, 500  # held-out queries, then rows index.bench keeps for tuning (unused here)
VIEW = "L"
CHUNK = 262_144  # rows per expansion / ground-truth chunk (128 MiB at 128 d)
EXACT_SLICE = 1_000_000
K = 10


def _done(path: Path, params: dict) -> bool:
    try:
        return json.loads(path.read_text()).get("params") == params
    except (OSError, ValueError):
        return False


def _mark(path: Path, params: dict, **extra) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"params": params, **extra}, indent=1))
    os.replace(tmp, path)


def expand(base: np.ndarray, n: int, noise: float, seed: int, out: Path, progress: bool = True) -> Path:
    """``<out>/L.npy`` of ``n`` unit rows: ``base`` repeated, copies after the first with noise (module doc)."""
    params = {"rows": n, "base": len(base), "noise": noise, "seed": seed, "dim": int(base.shape[1])}
    mark = out / "expand.json"
    if _done(mark, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    nb, d = base.shape
    with open(out / f"{VIEW}.npy", "wb") as f, tqdm(total=n, desc="expand", unit="row", disable=not progress,
                                                     dynamic_ncols=True, mininterval=5) as bar:
        write_npy_header(f, n, d)
        for lo in range(0, n, CHUNK):
            hi = min(lo + CHUNK, n)
            rows = np.arange(lo, hi)
            x = np.array(base[rows % nb], dtype=np.float32)
            noisy = rows >= nb
            if noisy.any():
                g = np.random.default_rng([seed, lo]).standard_normal((int(noisy.sum()), d), dtype=np.float32)
                x[noisy] += g * np.float32(noise / np.sqrt(d))
                x[noisy] /= np.linalg.norm(x[noisy], axis=1, keepdims=True)
            f.write(x.tobytes())
            bar.update(hi - lo)
    _mark(mark, params)
    return out


def ground_truth(xq: np.ndarray, vectors: Path, path: Path, k: int = K, progress: bool = True) -> np.ndarray:
    """Exact top-``k`` rows of every query among the vectors' rows (streamed chunk by chunk), cached."""
    vf = VectorFiles(f"vectors:{vectors}", [VIEW], xq.shape[1])
    params = {"rows": vf.n, "queries": len(xq), "k": k, "q_digest": float(np.asarray(xq, np.float64).sum())}
    if _done(path.with_suffix(".json"), params) and path.exists():
        return np.load(path)
    D = np.full((len(xq), k), -np.inf, np.float32)
    I = np.full((len(xq), k), -1, np.int64)
    with tqdm(total=vf.n, desc="exact ground truth", unit="row", disable=not progress, dynamic_ncols=True,
              mininterval=5) as bar:
        for lo in range(0, vf.n, CHUNK):
            hi = min(lo + CHUNK, vf.n)
            d, i = exact_knn(xq, vf.read(VIEW, lo, hi), k)
            D, I = merge_topk(D, I, d, i + lo, k)
            bar.update(hi - lo)
    np.save(path, I)
    _mark(path.with_suffix(".json"), params)
    return I


def build(vectors: Path, out: Path, model: str | None, memory_mb: int, batch: int, log: Path,
          factory: str | None = None, queries: Path | None = None) -> dict:
    """``python -m index.build --data vectors:...`` as a child: wall seconds, peak RSS, its printed choice
    (``queries``: a ``vectors:`` directory passed as ``--queries``)."""
    cmd = [sys.executable, "-m", "index.build", "--data", f"vectors:{vectors}", "--views", VIEW, "--memory-mb",
           str(memory_mb), "--no-thumbs", "--batch-size", str(batch), "--out", str(out)]
    if model:
        cmd += ["--model", model]
    if factory:
        cmd += ["--index-factory", factory]
    if queries:
        cmd += ["--queries", f"vectors:{queries}"]
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    secs = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"index.build exited with {code}:\n{text[-3000:]}")
    return {"command": " ".join(cmd[1:]), "seconds": round(secs, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "output": [ln for ln in text.splitlines() if ln.startswith(("index ", "  view "))]}


def tune(out: Path, xt: np.ndarray, gt_t: np.ndarray, k: int = K) -> dict:
    """nprobe tuned to recall@k >= 0.95 on held-out tuning queries, stored as the view's default."""
    t0 = time.perf_counter()
    with IndexStore.open(out) as store:
        best = store.tune_search(VIEW, xt, _ids(store, gt_t), k=k)
        store.snapshot()
    return {**{n: (round(v, 4) if n == "recall" else v) for n, v in best.items()}, "queries": len(xt),
            "seconds": round(time.perf_counter() - t0, 1)}


def tuned_by_build(out: Path) -> dict:
    """The nprobe ``index.build --queries`` tuned on the same tuning queries, as :func:`tune` reports it (the
    build stored it as the view's default; tuning again would repeat the work)."""
    c = mf.read_manifest(out)["views"][VIEW].get("choice") or {}
    return {"nprobe": c.get("built_nprobe"), "recall": c.get("built_recall"), "queries": c.get("built_queries"),
            "by": "index.build --queries"}


def _ids(store: IndexStore, rows: np.ndarray) -> np.ndarray:
    """Rows of the vectors file -> the stored ids of their items (keys ``vec-<row>``)."""
    flat = [f"vec-{int(r)}" for r in rows.ravel()]
    return np.array([-1 if i is None else i for i in store.ids_of(flat)], np.int64).reshape(rows.shape)


def search(out: Path, xq: np.ndarray, gt: np.ndarray, k: int = K) -> dict:
    """Recall@k and QPS of the built store, opened as the server opens it."""
    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    store = IndexStore.open(out, readonly=True)  # its memory: serving.measure.scale, in a fresh process
    open_s = time.perf_counter() - t0
    try:
        spec = store.manifest["views"][VIEW]
        _, ids = store.search(xq, VIEW, k)
        rows = rows_of(store, ids)
        rec = overlap(rows, gt, k)
        t0 = time.perf_counter()
        for q in xq:
            store.search(q[None], VIEW, k)
        qps1 = len(xq) / (time.perf_counter() - t0)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        for lo in range(0, len(xq), 64):
            store.search(xq[lo:lo + 64], VIEW, k)
        qps64 = len(xq) / (time.perf_counter() - t0)
        size = store.count(VIEW)
        view_bytes = (out / spec["snapshot"]["file"]).stat().st_size  # the current snapshot (a previous is kept)
    finally:
        store.close()
    return {"items": size, "factory": spec["factory"], "choice": spec.get("choice"), "recall_at_10": round(rec, 4),
            "qps_batch1": round(qps1, 1), "qps_batch64": round(qps64, 1), "open_seconds": round(open_s, 1),
            "view_file_mib": round(view_bytes / 2**20)}


def rows_of(store: IndexStore, ids: np.ndarray) -> np.ndarray:
    """Stored ids -> the rows of the vectors file they came from (keys ``vec-<row>``)."""
    flat = [int(i) for i in ids.ravel()]
    meta = store.lookup([i for i in flat if i >= 0])
    by = {i: int(m["key"][4:]) for i, m in zip([i for i in flat if i >= 0], meta) if m is not None}
    return np.array([by.get(i, -1) for i in flat], np.int64).reshape(ids.shape)


def exact_qps(vectors: Path, xq: np.ndarray, n: int, queries: int = 50) -> dict:
    """Single-query exact search on one thread over the first EXACT_SLICE rows, scaled to ``n`` rows."""
    faiss.omp_set_num_threads(1)
    m = min(n, EXACT_SLICE)
    xb = VectorFiles(f"vectors:{vectors}", [VIEW], xq.shape[1]).read(VIEW, 0, m)
    idx = faiss.IndexFlatIP(xb.shape[1])
    idx.add(xb)
    t0 = time.perf_counter()
    for q in xq[:queries]:
        idx.search(q[None], K)
    per = (time.perf_counter() - t0) / queries
    return {"slice_rows": m, "qps_slice": round(1 / per, 2), "qps_at_n_scaled": round(m / n / per, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m index.bench_scale", description=__doc__.split("\n")[0])
    p.add_argument("--real", type=int, default=100_000, help="real embeddings in the base (distinct scenes)")
    p.add_argument("--n", type=int, default=10_000_000, help="rows of the view (real rows + noisy copies)")
    p.add_argument("--noise", type=float, default=0.3, help="expected norm of each copy's noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-mb", type=int, default=4096, help="the build's memory budget (index.build --memory-mb)")
    p.add_argument("--model", default=None, help="model reference (default: the default model)")
    p.add_argument("--index-factory", default=None, help="a given index type instead of the budget's choice")
    p.add_argument("--given-queries", action="store_true",
                   help="pass the 500 tuning queries to the build (index.build --queries): the choice and its "
                        "nprobe tuning measure them instead of indexed rows")
    p.add_argument("--cache", default=None, help="embeddings cache (index.bench_data)")
    p.add_argument("--work", required=True, help="directory for the vectors, ground truth and index")
    p.add_argument("--batch-size", type=int, default=65_536, help="rows per add of the build")
    p.add_argument("--workers", type=int, default=None, help="scene render processes")
    p.add_argument("--out", default=None, help="JSON of the results")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not 0 < a.real <= a.n:
        p.error(f"--real must be in 1..--n, got {a.real}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = SPEC if a.model is None else f"embeddings:{a.model}:scenes"
    real = embeddings(spec, NQ + NTUNE + a.real, [VIEW], cache=a.cache, workers=a.workers, threads=1)[VIEW]
    xqt = np.ascontiguousarray(real[:NQ + NTUNE], dtype=np.float32)  # timed queries, then tuning queries
    np.save(work / "queries.npy", xqt)
    vectors = expand(real[NQ + NTUNE:], a.n, a.noise, a.seed, work / "vectors")
    gt_all = ground_truth(xqt, vectors, work / "gt.npy")
    xq, gt, xt, gt_t = xqt[:NQ], gt_all[:NQ], xqt[NQ:], gt_all[NQ:]
    params = {"n": a.n, "real": a.real, "noise": a.noise, "seed": a.seed, "memory_mb": a.memory_mb,
              "factory": a.index_factory, **({"queries": "given"} if a.given_queries else {})}
    qdir = None
    if a.given_queries:  # the tuning queries as a vectors: directory (the timed ones stay unseen)
        qdir = work / "tune_queries"
        qdir.mkdir(exist_ok=True)
        np.save(qdir / f"{VIEW}.npy", xt)
    index = work / "index"
    if not _done(work / "build.json", params) or not index.exists():
        if index.exists():
            raise SystemExit(f"{index} exists from another build; remove it to rebuild")
        built = build(vectors, index, a.model, a.memory_mb, a.batch_size, work / "build.log", a.index_factory,
                      qdir)
        _mark(work / "build.json", params, **built)
    built = json.loads((work / "build.json").read_text())
    if not _done(work / "tune.json", params):
        _mark(work / "tune.json", params, **(tuned_by_build(index) if a.given_queries else tune(index, xt, gt_t)))
    tuned = {k: v for k, v in json.loads((work / "tune.json").read_text()).items() if k != "params"}
    res = {"params": params, "spec": spec, "build": {k: v for k, v in built.items() if k != "params"},
           "tuned": tuned, "search": search(index, xq, gt), "exact": exact_qps(vectors, xq, a.n),
           "vectors_file_mib": round((vectors / f"{VIEW}.npy").stat().st_size / 2**20)}
    res["search"]["x_exact_batch1"] = round(res["search"]["qps_batch1"] / res["exact"]["qps_at_n_scaled"], 1)
    _mark(work / "result.json", params, **{k: v for k, v in res.items() if k != "params"})
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
