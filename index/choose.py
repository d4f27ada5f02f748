"""Choosing a view's index by measuring the candidates on a training sample (the rules: ``index/factory.py``).

:func:`choose_trained` is what ``index.build`` calls once it holds a view's training sample: when the raw
vectors do not fit the budget it trains every fitting compressed candidate on the sample (one coarse quantizer,
trained once, shared by all), measures recall@k of held-out sample queries against exact search while raising
nprobe, and keeps the candidate reaching the target at the lowest expected search cost at ``n`` items; otherwise
it keeps the static choice and trains it. Either way it returns the choice (recorded in the manifest) and the
trained, empty index.

Recall is measured at the density of ``n``, not of the sample: a sample of S items is S/n as dense, so a query's
10th neighbour among all ``n`` items lies about as close as its (10 S / n)-th neighbour in the sample, and a code
whose error is small against the sample's 10-neighbour radius can be large against the collection's. The sample
recall is therefore recall@k' with ``k' = max(1, round(k S / n))`` (:func:`density_k`). On 40k near-copies (400
centres x 100 noisy copies, ``tests/test_index_budget.py``) recall@10 on a tenth put IVF-SQ4 at 0.94, which
reaches 0.40 over the whole; recall@1 puts it at 0.38. What a sample cannot show is a query distribution unlike
the data's: on index.bench_scale's 10M rows (real embeddings with noise-free originals and their noisy copies)
both measures chose IVF-PQ64 for held-out real queries, which it serves at recall@10 0.77 at most (BENCHMARKS.md,
"A 10M-item view within 4 GB"). A user who holds such queries passes them (``queries``; ``index.build
--queries SPEC``): they are measured against the whole sample instead, at the same density.

Bounded: the sample is bounded by the budget (``factory.sample_cap``), the queries by ``QUERIES`` (or
``GIVEN_QUERIES``), and at most ``MAX_PQ`` PQ sizes are tried; when no SQ or PQ candidate reaches the target, the
largest PQ size again behind an OPQ rotation, on samples of at least ``OPQ_MIN_SAMPLE`` (the rotation trains for
up to two minutes at 1M, 6-12 s even on 4,000 x 32; the shared coarse centroids are rotated with it).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import faiss
import numpy as np

from index import factory as fac
from index import ondisk
from index.recall import exact_knn, overlap

LOG = logging.getLogger(__name__)
QUERIES = 200  # held out from the sample
GIVEN_QUERIES = 1000  # of the user's queries (index.build --queries)
OPQ_MIN_SAMPLE = 39 * 256  # FAISS's ask for training 256 centroids per sub-quantizer; below it no OPQ is tried
MAX_PQ = 2  # PQ sizes tried: the largest that fit, and half of it
PQ_NITER = 10  # k-means iterations of each PQ sub-quantizer (FAISS's default 25 costs 2.5x for little)
PQ_POINTS = 32  # ... on at most 32 x 256 vectors of the sample
PLATEAU = 0.003  # raising nprobe stops when recall gains less than this twice in a row
NPROBES = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def sample_size(factory: str, n: int, dim: int, memory_budget_mb: float, metric: str = "ip") -> int:
    """Vectors to hold before training ``factory`` for ``n`` items: what FAISS asks for, within the budget."""
    if fac.make_index(factory, dim, metric).is_trained:
        return 0
    want = max(fac.train_sample_size(factory, dim, metric), fac.train_threshold(factory, dim, metric))
    return int(min(n, want, fac.sample_cap(dim, memory_budget_mb)))


def expected_cost(factory: str, n: int, dim: int, nprobe: int) -> float:
    """Work per query at ``n`` items (multiply-adds): the coarse quantizer plus the probed lists' codes."""
    f = fac.normalize_factory(factory)
    m = fac.IVF_RE.match(f)
    if not m:
        return float(n * dim)
    nlist, kind = int(m["nlist"]), m["kind"]
    per_code = int(m["m"]) if kind.startswith("PQ") else dim  # a PQ code: m table look-ups; else d products
    tables = 256 * dim if kind.startswith("PQ") else 0
    rotation = dim * dim if m["opq"] else 0
    return float(rotation + nlist * dim + tables + min(nprobe, nlist) * (n / nlist) * per_code)


def _pq_m(factory: str) -> int:
    return int(fac.IVF_RE.match(fac.normalize_factory(factory))["m"])


def _pq_sizes(pqs: list[dict]) -> list[dict]:
    """Of PQ candidates that fit (largest codes first), the largest and its halvings, at most ``MAX_PQ``."""
    out = pqs[:1]
    for c in pqs[1:]:
        if len(out) < MAX_PQ and _pq_m(c["factory"]) * 2 ** len(out) == _pq_m(pqs[0]["factory"]):
            out.append(c)
    return out


def density_k(k: int, sample: int, n: int) -> int:
    """The neighbours of a sample of ``sample`` items that lie as close as the ``k`` nearest of ``n`` items."""
    return max(1, min(k, round(k * sample / max(n, 1))))


def _recall_curve(index: faiss.Index, xq: np.ndarray, gt: np.ndarray, k: int, target: float) -> tuple[float, int]:
    """(recall, nprobe): the smallest nprobe reaching ``target``, or the best recall seen before it stops rising."""
    ivf = faiss.extract_index_ivf(index)
    grid = [p for p in NPROBES if p < ivf.nlist] + [ivf.nlist]
    best, flat = (0.0, grid[-1]), 0
    for p in grid:
        params = faiss.SearchParametersIVF()
        params.nprobe = p
        _, I = index.search(xq, k, params=params)
        rec = overlap(I, gt, k)
        if rec >= target:
            return rec, p
        flat = flat + 1 if rec < best[0] + PLATEAU else 0
        if rec > best[0]:
            best = (rec, p)
        if flat >= 2:
            break
    return best


def choose_trained(sample: np.ndarray | None, n: int, dim: int, memory_budget_mb: float, metric: str = "ip",
                   target: float = 0.95, k: int = 10, factory: str | None = None, storage: str = "ram",
                   queries: np.ndarray | None = None) -> tuple[dict[str, Any], faiss.Index | None]:
    """``(choice, index)`` for a view of ``n`` items: the choice (``factory``, ``reason``, ``budget_mb``,
    ``est_bytes``, and after a measurement ``measured_recall``, ``nprobe``, ``candidates``) and a trained empty
    index of it (None when it needs no training). ``sample`` (S, dim): vectors of the view (at least
    :func:`sample_size` of the static choice's factory when it needs training); ``factory``: a given type
    (trained, not chosen); ``storage``: the view's (``ondisk.can_hold``: no OPQ on disk); ``queries`` (Q, dim):
    vectors like the queries the view will serve, measured in place of sample items held out as queries (at most
    ``GIVEN_QUERIES`` of them)."""
    if factory is not None:
        f = fac.normalize_factory(factory)
        choice = {"factory": f, "reason": "given (--index-factory)", "budget_mb": memory_budget_mb}
        try:
            choice["est_bytes"] = fac.est_bytes(f, n, dim)
        except ValueError:
            pass
    else:
        choice = fac.static_choice(n, dim, memory_budget_mb)
        choice.pop("kind", None)
        compressed = [c for c in fac.candidates(n, dim, memory_budget_mb)
                      if c["fits"] and c["kind"] in fac.COMPRESSED_KINDS and ondisk.can_hold(storage, c["factory"])]
        raw_fits = fac.IVF_RE.match(choice["factory"]) is None or choice["factory"].endswith(",Flat")
        if not raw_fits and sample is not None and len(sample) > QUERIES * 2 and compressed:
            return _measure(sample, n, dim, memory_budget_mb, metric, target, k, compressed, choice, queries)
    idx = fac.make_index(choice["factory"], dim, metric)
    if idx.is_trained:
        return choice, None
    if sample is None or len(sample) == 0:
        raise ValueError(f"{choice['factory']} needs a training sample")
    t0 = time.perf_counter()
    idx.train(np.ascontiguousarray(sample, dtype=np.float32))
    LOG.info("trained %s on %d vectors in %.1fs", choice["factory"], len(sample), time.perf_counter() - t0)
    return choice, idx


def _measure(sample: np.ndarray, n: int, dim: int, memory_budget_mb: float, metric: str, target: float, k: int,
             compressed: list[dict], static: dict, queries: np.ndarray | None = None) -> tuple[dict[str, Any], faiss.Index]:
    t0 = time.perf_counter()
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    source = "given" if queries is not None and len(queries) else "sample"
    if source == "given":  # the user's queries against the whole sample
        xq, xb = np.ascontiguousarray(queries[:GIVEN_QUERIES], dtype=np.float32), sample
        asked = f"{len(xq)} given queries"
    else:  # sample items held out as queries: the data's own distribution
        rng = np.random.default_rng(0)
        qpos = rng.choice(len(sample), QUERIES, replace=False)
        keep = np.ones(len(sample), bool)
        keep[qpos] = False
        xq, xb = sample[qpos], sample[keep]
        asked = f"{len(xq)} queries held out of the sample"
    k_s = density_k(k, len(xb), n)  # recall@k at n items ~ recall@k_s at the sample's density
    gt = exact_knn(xq, xb, k_s, metric)[1]
    tried = [c for c in compressed if c["kind"] in fac.SQ_KINDS.values()]  # every SQ that fits (cheap to train)
    tried += _pq_sizes([c for c in compressed if c["kind"] == "ivf-pq"])
    # only if the others fall short (below), on a sample that can train 256 centroids per sub-quantizer, and at the
    # largest PQ size that fits (measured at 1M: the rotation never won at the halved size)
    rotated = [c for c in compressed if c["kind"] == "ivf-opq"][:1] if len(xb) >= OPQ_MIN_SAMPLE else []
    nlist = int(fac.IVF_RE.match(compressed[0]["factory"])["nlist"])
    coarse = fac.make_index(f"IVF{nlist},Flat", dim, metric)
    coarse.train(xb)  # one coarse quantizer for every candidate
    centroids = faiss.extract_index_ivf(coarse).quantizer.reconstruct_n(0, nlist)  # (nlist, dim)
    del coarse
    rows: list[dict[str, Any]] = []
    best: tuple | None = None
    for c in tried + rotated:
        if c["kind"] == "ivf-opq" and best is not None and best[0][0]:
            break  # a rotation trains for up to a minute: tried only when no SQ or PQ candidate reached the target
        idx = fac.make_index(c["factory"], dim, metric)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(idx))
        if isinstance(idx, faiss.IndexPreTransform):  # OPQ: k-means commutes with the rotation, so the shared
            opq = faiss.downcast_VectorTransform(idx.chain.at(0))  # centroids, rotated, are the rotated data's
            pq = faiss.ProductQuantizer(dim, opq.M, 8)  # OPQ's own PQ, quiet on a sample below 39 x 256 (the
            pq.cp.min_points_per_centroid = 1  # budget's), where FAISS would warn at every one of its iterations
            opq.pq = pq
            opq.train(xb)
            opq.pq = None
            ivf.quantizer.add(opq.apply(centroids))
        else:
            ivf.quantizer.add(centroids)
        if c["kind"] in ("ivf-pq", "ivf-opq"):
            ivf.pq.cp.niter, ivf.pq.cp.max_points_per_centroid = PQ_NITER, PQ_POINTS
            ivf.pq.cp.min_points_per_centroid = 1  # quiet on a small sample (the budget's)
        idx.train(xb)  # the PQ or SQ codes (a trained rotation and quantizer are kept)
        idx.add(xb)
        rec, nprobe = _recall_curve(idx, xq, gt, k_s, target)
        cost = expected_cost(c["factory"], n, dim, nprobe)
        rows.append({"factory": c["factory"], "est_bytes": c["est_bytes"], "recall": round(rec, 4),
                     "nprobe": nprobe, "cost": cost})
        key = (rec >= target, -cost if rec >= target else rec, rec)  # equal cost (the SQs): the higher recall
        if best is None or key > best[0]:
            best = (key, c, rec, nprobe, idx)
        else:
            del idx
    assert best is not None
    (reached, _, _), c, rec, nprobe, idx = best
    idx.reset()  # keeps the quantizer and codebooks: a trained, empty index
    raw_mib = n * 4 * dim / 2**20
    if reached:
        why = (f"{n} raw vectors ({raw_mib:.1f} MiB) exceed the budget; of {len(rows)} compressed candidates "
               f"that fit, the fastest reaching recall@{k_s} {target} on the training sample of {len(xb)} (the "
               f"density of recall@{k} at {n}; {asked}; nprobe {nprobe})")
    else:
        why = (f"{n} raw vectors ({raw_mib:.1f} MiB) exceed the budget; no compressed candidate that fits reaches "
               f"recall@{k_s} {target} on the training sample of {len(xb)} (the density of recall@{k} at {n}; "
               f"{asked}): the highest recall ({rec:.3f} at nprobe {nprobe})")
    choice = {"factory": c["factory"], "reason": why, "budget_mb": memory_budget_mb, "est_bytes": c["est_bytes"],
              "measured_recall": round(rec, 4), "measured_at_k": k_s, "nprobe": nprobe, "target_recall": target,
              "sample": int(len(xb)), "queries": int(len(xq)),
              "queries_from": source,
              "static_choice": static["factory"], "candidates": rows}
    LOG.info("chose %s in %.1fs: %s", c["factory"], time.perf_counter() - t0, why)
    return choice, idx
