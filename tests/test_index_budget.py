"""The memory budget: index.build's peak RSS stays within it (measured in a child process), the estimates bound the
real sizes, and the choice measured on a training sample reaches its recall on the whole collection."""
import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from conftest import ROOT, run_cli
from index import factory as fac
from index.choose import OPQ_MIN_SAMPLE, QUERIES, choose_trained
from index.recall import exact_knn, overlap
from index.store import IndexStore, StoreError

MiB = 2**20
# above the budget: FAISS's k-means blocks (sample x 256 floats) and the heap glibc keeps after them, SQLite's page
# cache, the chunk in flight, per-item Python objects, the store's threads (measured: 5-6 MiB over the index)
SLACK = 8 * MiB


def _build(out, mb: int, n: int = 30_000, dim: int = 64) -> dict:
    env = os.environ.copy() | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "tests/_budget_build.py", str(out), "--n", str(n), "--dim", str(dim),
                        "--memory-mb", str(mb)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_build_peak_rss_stays_within_a_small_budget(tmp_path):
    """30k x 128 floats (14.6 MiB raw) within 3 MiB: a compressed type, built without ever holding the raw vectors
    (peak RSS above the child's baseline <= budget + SLACK); with 64 MiB the same data keeps its raw vectors, and
    its build rises by more than the small budget's bound, so the bound would catch an uncompressed build."""
    small = _build(tmp_path / "small", 3, dim=128)
    print(f"3 MiB: {small['line']}; peak {(small['peak'] - small['baseline']) / MiB:.1f} MiB above baseline, "
          f"view files {small['view_bytes'] / MiB:.2f} MiB")
    assert small["count"] == 30_000
    assert fac.IVF_RE.match(small["factory"]) and not fac.holds_raw(small["factory"]), small["factory"]
    assert small["peak"] - small["baseline"] <= 3 * MiB + SLACK, small
    assert small["view_bytes"] <= 3 * MiB < small["raw"]
    c = small["choice"]
    assert c["budget_mb"] == 3 and c["est_bytes"] * fac.SNAPSHOT_COPIES <= 3 * MiB and c["measured_recall"] > 0.5
    # the recall the build recorded (exact neighbours merged chunk by chunk) is the built index's true recall
    assert c["built_queries"] == 200 and abs(c["built_recall"] - small["recall"]) <= 0.005, (c, small["recall"])
    big = _build(tmp_path / "big", 64, dim=128)  # snapshots stream to disk: the rise is the raw vectors, ~15 MiB
    print(f"64 MiB: {big['line']}; peak {(big['peak'] - big['baseline']) / MiB:.1f} MiB above baseline")
    assert big["factory"] in ("IDMap2,Flat",) or big["factory"].endswith(",Flat"), big["factory"]
    assert big["view_bytes"] >= big["raw"]
    assert big["peak"] - big["baseline"] > 3 * MiB + SLACK


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, dim), dtype=np.float32)[rng.integers(0, 200, n)]
    x += 0.4 * rng.standard_normal(x.shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF64,Flat", "IVF64,SQfp16", "IVF64,SQ8", "IVF64,SQ6", "IVF64,SQ4",
                                     "IVF64,PQ16x8np", "OPQ16,IVF64,PQ16x8np"])
def test_estimate_bounds_the_index_size(factory):
    """est_bytes is at least the serialized index (what a loaded view holds) and at most 1.6x it (+ 64 KiB)."""
    n, dim = 20_000, 64
    x = _clustered(n, dim)
    idx = fac.make_index(factory, dim)
    if not idx.is_trained:
        if "PQ" in factory:
            faiss.downcast_index(faiss.extract_index_ivf(idx)).pq.cp.niter = 5  # the codebooks' quality is not
            if isinstance(idx, faiss.IndexPreTransform):  # what is measured
                faiss.downcast_VectorTransform(idx.chain.at(0)).niter = 2
        idx.train(x[:5000])
    idx.add_with_ids(x, np.arange(n, dtype=np.int64) * 7)
    real = len(faiss.serialize_index(idx))
    est = fac.est_bytes(factory, n, dim)
    assert real <= est <= 1.6 * real + 64 * 1024, (real, est)


def test_static_choices_fit_their_budget_and_shrink_with_it():
    n, dim = 1_000_000, 128
    raw_mb = n * dim * 4 / MiB
    assert fac.choose_factory(n, dim, 4 * raw_mb).endswith(",Flat")  # raw vectors fit
    sizes = []
    for frac in (2, 4, 8):
        c = fac.static_choice(n, dim, raw_mb / frac)
        assert c["est_bytes"] * fac.SNAPSHOT_COPIES <= raw_mb / frac * MiB, c
        assert fac.IVF_RE.match(c["factory"]) and not fac.holds_raw(c["factory"]), c
        sizes.append(c["est_bytes"])
    assert sizes == sorted(sizes, reverse=True)
    # the training sample the budget allows bounds nlist (39 vectors per centroid)
    nlist = int(fac.IVF_RE.match(fac.static_choice(n, dim, 8)["factory"])["nlist"])
    assert nlist * fac.MIN_PER_CENTROID <= fac.sample_cap(dim, 8)


def test_measured_choice_is_the_cheapest_reaching_the_target():
    """20k clustered vectors whose raw form exceeds the budget: every fitting compressed candidate is measured on
    the sample, the choice is the one of lowest expected cost among those reaching the target, and its trained
    empty index searches the whole collection (at the measured nprobe) with a recall above chance."""
    faiss.omp_set_num_threads(1)
    n, dim, mb = 20_000, 32, 3
    x = _clustered(n, dim, seed=1)
    assert not fac.fits("IVF64,Flat", n, dim, mb)
    choice, idx = choose_trained(x[:4000], n, dim, mb)
    rows = choice["candidates"]
    assert len(rows) >= 2 and all(fac.fits(r["factory"], n, dim, mb) for r in rows), rows
    reached = [r for r in rows if r["recall"] >= 0.95]
    # the cheapest reaching it (equal costs: the higher recall), else the highest recall
    want = max(reached, key=lambda r: (-r["cost"], r["recall"])) if reached else max(rows, key=lambda r: r["recall"])
    assert choice["factory"] == want["factory"] and choice["nprobe"] == want["nprobe"], choice
    assert idx is not None and idx.ntotal == 0 and idx.is_trained
    idx.add_with_ids(x, np.arange(n, dtype=np.int64))
    p = faiss.SearchParametersIVF()
    p.nprobe = choice["nprobe"]
    rec = overlap(idx.search(x[:200], 10, params=p)[1], exact_knn(x[:200], x, 10)[1], 10)
    print(choice["factory"], "sample", choice["measured_recall"], "whole", rec, choice["reason"])
    assert rec > 0.3, rec


def test_create_records_the_choice_and_refuses_bad_budgets_and_indexes(tmp_path):
    with IndexStore.create(tmp_path / "a", views={"v": 16}, fingerprint="f", model_ref="m", n_hint=100,
                           memory_budget_mb=1) as s:
        c = s.manifest["views"]["v"]["choice"]
        assert c["factory"] == "IDMap2,Flat" and c["budget_mb"] == 1 and "exact" in c["reason"]
    for bad in (0, -5, "8", True):
        with pytest.raises(StoreError, match="memory_budget_mb must be a positive"):
            IndexStore.create(tmp_path / f"b{bad}", views={"v": 16}, fingerprint="f", model_ref="m",
                              memory_budget_mb=bad)
    untrained = fac.make_index("IVF16,Flat", 16)
    with pytest.raises(StoreError, match="not an empty, trained"):
        IndexStore.create(tmp_path / "c", views={"v": 16}, fingerprint="f", model_ref="m", factory="IVF16,Flat",
                          trained={"v": untrained})


def test_cli_refuses_a_bad_memory_budget(tmp_path):
    r = run_cli(["-m", "index.build", "--data", "scenes", "--memory-mb", "0", "--out", str(tmp_path / "i")])
    assert r.returncode == 2 and "--memory-mb must be at least 1" in r.stderr, r.stderr[-500:]


def test_info_states_each_views_choice(tmp_path):
    """GET /info's ``index.choice``: per view, what the manifest recorded about how its type was chosen. Core.info
    runs on a Core without a model (its model fields are not what this test reads)."""
    import asyncio
    from types import SimpleNamespace

    from serving.core import Core, Settings

    store = IndexStore.create(tmp_path / "idx", views={"L": 128, "ab": 128}, fingerprint="f", model_ref="m",
                              n_hint=1_000_000, memory_budget_mb=256)
    c = Core.__new__(Core)
    c.rt = SimpleNamespace(card=SimpleNamespace(to_dict=dict), fingerprint="f", dim=128, image_size=32, views={},
                           providers=["CPUExecutionProvider"])
    c.store, c.index_note, c.tau, c.settings, c.batcher = store, "", 0.07, Settings(), None
    try:
        info = asyncio.run(c.info())["index"]
        for v in ("L", "ab"):
            got = info["choice"][v]
            assert got == store.manifest["views"][v]["choice"] and got["budget_mb"] == 128, got
            assert got["factory"] == store.manifest["views"][v]["factory"]
            assert not fac.holds_raw(got["factory"])  # 1M x 128 floats (488 MiB) over 128 MiB: compressed
            assert "exceed the budget" in got["reason"]
    finally:
        store.close()


def _copies(nc: int, copies: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``nc`` random unit centres, each repeated ``copies`` times with noise of expected norm ``noise`` (the
    centre-major order of index.bench_scale's expanded file), and the centres."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((nc, dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.tile(c, (copies, 1)) + rng.standard_normal((nc * copies, dim), dtype=np.float32) * noise / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True), c


def test_sample_recall_is_measured_at_the_collections_density():
    """Near-copies (400 centres x 100 noisy copies): on a sample of a tenth, recall@10 is easy for any code (a
    query's 10 neighbours there are its ~10 copies, all of them), while at the full size the 10 neighbours are a
    fine ranking among 99 copies. The chooser measures recall@1 on the tenth (``density_k``), and for every
    candidate that recall predicts held-out recall@10 over the whole collection at the same nprobe within 0.15."""
    from index.choose import density_k
    faiss.omp_set_num_threads(1)
    dim = 64
    x, c = _copies(400, 100, dim, 0.3, 0)
    n = len(x)
    rng = np.random.default_rng(9)
    q = c[:200] + rng.standard_normal((200, dim), dtype=np.float32) * np.float32(0.3 / np.sqrt(dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gt = exact_knn(q, x, 10)[1]
    choice, idx = choose_trained(x[:4000], n, dim, 4)
    assert choice["measured_at_k"] == density_k(10, 3800, n) == 1
    for row in choice["candidates"]:
        cand = fac.make_index(row["factory"], dim)
        cand.train(x[:4000])
        cand.add(x)
        p = faiss.SearchParametersIVF()
        p.nprobe = row["nprobe"]
        held = overlap(cand.search(q, 10, params=p)[1], gt, 10)
        assert abs(row["recall"] - held) <= 0.15, (row, held)


def _anisotropic(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors whose variance sits in a few directions, randomly rotated: the PQ sub-spaces (runs of
    consecutive dimensions) then share correlated coordinates, which an OPQ rotation can undo and plain PQ cannot."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((300, dim), dtype=np.float32)[rng.integers(0, 300, n)]
    x += 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    x *= np.exp(-np.arange(dim) / 6).astype(np.float32)
    q = np.linalg.qr(np.random.default_rng(1).standard_normal((dim, dim)))[0].astype(np.float32)
    x = x @ q
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_opq_is_measured_chosen_and_served_with_ids(tmp_path):
    """24k x 32 anisotropic vectors in 0.6 MiB (only PQ codes fit): the chooser measures the PQ sizes it tries, and
    the largest again behind an OPQ rotation (none reaches the target); the rotation is chosen when it measures best, its trained index serves a real
    store (ids, removals, a snapshot and a reopen), and over the whole collection it beats plain PQ of the same
    size trained on the same sample, as the sample said it would."""
    faiss.omp_set_num_threads(1)
    for f in ("OPQ8,IVF32,PQ8x8np", "OPQ8_16,IVF32,PQ8", "PCA16,IVF32,Flat", "IDMap2,OPQ8,IVF32,PQ8x8np"):
        assert fac.normalize_factory(f) == f.removeprefix("IDMap2,")  # pre-transforms pass ids: never wrapped
    assert fac.normalize_factory("HNSW32,Flat") == "IDMap2,HNSW32,Flat"
    n, dim, mb, s_n = 24_000, 32, 0.6, OPQ_MIN_SAMPLE + QUERIES  # the smallest sample a rotation is tried on
    x = _anisotropic(n, dim)
    choice, trained = choose_trained(x[:s_n], n, dim, mb)
    rows = {r["factory"]: r for r in choice["candidates"]}
    pq, opq = "IVF32,PQ8x8np", "OPQ8,IVF32,PQ8x8np"
    assert not any(r.startswith("OPQ4") for r in rows)  # a rotation at the largest PQ size only
    assert {pq, opq} <= set(rows), rows
    assert not any(fac.SQ_KINDS.get(f.split(",")[-1]) for f in rows)  # no scalar quantizer fits 0.5 MiB
    assert rows[opq]["recall"] >= rows[pq]["recall"] + 0.08, rows  # measured: 0.70 against 0.51
    assert choice["factory"] == max(rows.values(), key=lambda r: r["recall"])["factory"] == opq, choice
    assert rows[opq]["cost"] > rows[pq]["cost"] or rows[opq]["nprobe"] < rows[pq]["nprobe"]  # the rotation's d^2
    assert isinstance(trained, faiss.IndexPreTransform) and trained.ntotal == 0
    plain_only, _ = choose_trained(x[:s_n], n, dim, mb, storage="disk")  # an on-disk view maps plain IVF only
    assert plain_only["factory"] == pq and not any("OPQ" in r["factory"] for r in plain_only["candidates"])

    xq = _anisotropic(300, dim, seed=5)
    gt = exact_knn(xq, x, 10)[1]
    plain = fac.make_index(pq, dim)
    plain.train(x[:s_n])
    plain.add(x)
    p = faiss.SearchParametersIVF()
    p.nprobe = choice["nprobe"]
    plain_rec = overlap(plain.search(xq, 10, params=p)[1], gt, 10)

    path = tmp_path / "idx"
    with IndexStore.create(path, views={"v": dim}, fingerprint="f", model_ref="m", factory={"v": opq}, n_hint=n,
                           memory_budget_mb=mb, trained={"v": trained}, choice={"v": choice}) as s:
        for i in range(0, n, 6000):
            s.add([f"k{j}" for j in range(i, i + 6000)], {"v": x[i:i + 6000]})
        hits = s.search_items(xq, "v", 10, nprobe=choice["nprobe"])
        got = np.array([[int(h["key"][1:]) for h in row] for row in hits])
        store_rec = overlap(got, gt, 10)
        print(f"whole collection at nprobe {choice['nprobe']}: OPQ store {store_rec:.3f}, plain PQ {plain_rec:.3f}; "
              f"sample {rows[opq]['recall']} / {rows[pq]['recall']}")
        assert store_rec >= plain_rec + 0.08, (store_rec, plain_rec)
        gone = sorted({int(k) for k in got[:20, 0]})
        assert s.remove([f"k{j}" for j in gone]) == len(gone)
        after = s.search_items(xq[:20], "v", 10, nprobe=choice["nprobe"])
        assert not {f"k{j}" for j in gone} & {h["key"] for row in after for h in row}
        s.snapshot()
    with IndexStore.open(path) as s:
        assert s.manifest["views"]["v"]["factory"] == opq
        again = s.search_items(xq[:20], "v", 10, nprobe=choice["nprobe"])
        assert [[h["key"] for h in row] for row in again] == [[h["key"] for h in row] for row in after]
        assert len(s) == s.count("v") == n - len(gone)


def _expanded(dim: int, copies: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """index.bench_scale's 10M rows in small: 1,000 base items (clustered unit vectors), each indexed with its
    ``copies - 1`` noisy copies (noise norm 0.3), shuffled; and 300 queries from the base items' distribution that
    are not indexed. An indexed item's neighbours are its own copies, in its own IVF list; a query's are copies of
    several other items, spread over lists: a sample's own items are not the queries the index will serve."""
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((50, dim), dtype=np.float32)

    def base(m: int, s: int) -> np.ndarray:
        r = np.random.default_rng(s)
        x = cent[r.integers(0, 50, m)] + 0.6 * r.standard_normal((m, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    b = base(1000, seed + 1)
    x = np.tile(b, (copies, 1))
    x[len(b):] += rng.standard_normal((len(x) - len(b), dim), dtype=np.float32) * np.float32(0.3 / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[rng.permutation(len(x))], base(300, seed + 2)


def test_given_queries_predict_the_recall_that_sample_queries_miss():
    """On rows unlike the queries (``_expanded``), recall measured with sample items as queries misses the served
    queries' recall by more than 0.15 for some candidate (measured: SQ8 0.98 on the sample, 0.74 for the queries,
    at nprobe 1); with 200 of the queries given, every candidate's measured recall is within 0.07 of the recall of
    100 other queries over the whole collection at the same nprobe, and the choice serves them at the target within
    that error, 0.1 above what the sample-query choice serves them (measured: 0.88 against 0.74)."""
    faiss.omp_set_num_threads(1)
    dim, mb = 64, 5
    x, q = _expanded(dim)
    n, sample = len(x), x[:4000]
    gt = exact_knn(q[200:], x, 10)[1]

    built: dict[str, faiss.Index] = {}

    def held_out(row: dict) -> float:
        if row["factory"] not in built:  # each candidate built once over the whole collection
            built[row["factory"]] = cand = fac.make_index(row["factory"], dim)
            cand.train(sample)
            cand.add(x)
        cand = built[row["factory"]]
        p = faiss.SearchParametersIVF()
        p.nprobe = row["nprobe"]
        return overlap(cand.search(q[200:], 10, params=p)[1], gt, 10)

    own, _ = choose_trained(sample, n, dim, mb)
    assert own["queries_from"] == "sample"
    own_rows = {r["factory"]: (r["recall"], held_out(r)) for r in own["candidates"]}
    own_err = max(abs(a - b) for a, b in own_rows.values())
    given, _ = choose_trained(sample, n, dim, mb, queries=q[:200])
    assert given["queries_from"] == "given" and given["queries"] == 200 and "200 given queries" in given["reason"]
    errs = {r["factory"]: (r["recall"], held_out(r)) for r in given["candidates"]}
    print("sample queries: worst error", round(own_err, 3), "; given queries:", errs)
    assert own_err > 0.15, own_err  # the hard case this test is about
    assert all(abs(a - b) <= 0.07 for a, b in errs.values()), errs
    # the choice's recall for the queries: the target within that error, and well above the sample-query choice's
    assert errs[given["factory"]][1] >= 0.95 - 0.07, (given["factory"], errs)
    assert errs[given["factory"]][1] >= own_rows[own["factory"]][1] + 0.1, (given, own)
