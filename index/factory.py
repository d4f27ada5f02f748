"""Choosing a FAISS index type for one view from its size and a memory budget, in the spirit of autofaiss.

Items carry stable int64 ids: Flat and HNSW views are wrapped in ``IndexIDMap2`` (factory string
``IDMap2,...``), IVF views take ids natively (see :func:`normalize_factory` for why they must not be wrapped).
The manifest records the exact factory string, and, for an index chosen by :mod:`index.choose`, the choice
(``choice``: factory, reason, budget, estimated bytes, measured recall, nprobe).

The budget (``memory_budget_mb`` per view; ``index.build --memory-mb`` is shared equally by the views) bounds
what a view holds in RAM while it is built and served. :func:`est_bytes` estimates a candidate at ``n`` vectors:
codes + ids (``IDMap2`` adds a reverse hash map, ``MAP_BYTES``) + the inverted lists' growth while items are
added (``LIST_SLACK``) + the coarse quantizer + the PQ codebooks (HNSW: the graph's links). A candidate fits
when ``SNAPSHOT_COPIES`` times its estimate is within the budget: 1, since a snapshot streams each view to its
file with ``faiss.write_index`` and needs no second copy in memory (``index/snapshots.py``; it was 2 while
snapshots serialized the view first). Candidates, cheapest search first when they fit:

* ``IDMap2,Flat`` below ``FLAT_MAX`` (50k) items: exact, trivially mutable; a brute-force scan of 50k x 128
  floats takes ~1-3 ms per query on one core, which an ANN index would not beat by enough to pay for its loss.
* ``IVF{nlist},Flat`` below ``IVF_FLAT_MAX`` (4M): removes natively and reaches any recall by nprobe
  (measured at 1M on 2 cores: IVF4096,Flat built in 44 s, 171x the exact QPS at recall@10 0.975).
* ``IDMap2,HNSW32,Flat`` above that: HNSW32 takes over 10 minutes to build at 1M here and can only
  tombstone removals (``viewindex.py``), so it is kept for the sizes IVF-Flat is not.
* when the raw vectors do not fit: the compressed IVF candidates, the scalar quantizers ``IVF{nlist},SQfp16``,
  ``,SQ8``, ``,SQ6`` and ``,SQ4`` (2d, d, 3d/4 and d/2 bytes a vector: each dimension in 16, 8, 6 or 4 bits) and
  ``IVF{nlist},PQ{m}x8np`` (m bytes; ``m`` divides d, up to 64; ``np``: without the polysemous training
  FAISS's factory adds by default, which costs minutes and serves no search here), all with native ids. Statically
  (:func:`choose_factory`) the largest codes that fit win (PQ before SQ at equal bytes: its codebooks adapt to
  the data). :func:`index.choose.choose_trained` (used by
  ``index.build``, where a training sample is at hand) instead trains each fitting compressed candidate on the
  sample, measures recall of held-out sample queries against exact search while raising nprobe (recall@k at the
  collection's density: ``index.choose.density_k``), and picks
  the one reaching the target (default 0.95) at the lowest expected search cost at ``n`` (quantizer + nprobe
  lists of n / nlist codes; the scalar quantizers cost the same, so among them the higher recall wins); when
  none reaches it, the one with the highest recall, and the reason says so.
  The measured chooser also tries ``OPQ{m},IVF{nlist},PQ{m}x8np``: PQ codes behind a learned rotation (FAISS
  ``IndexPreTransform``, which passes ids, removals and search parameters through), at the largest PQ size; the
  rotation costs d^2 floats and training (seconds to a minute on the sample), and on the default model's
  embeddings it lifts PQ's recall the most of any change (BENCHMARKS.md). Static choices never pick it (a view
  the store creates would train it on the request path's schedule), and neither do on-disk views (their
  mapping reads a plain IVF file). Re-ranking on full or SQ8 vectors (FAISS ``IndexRefine``, ``Refine(SQ8)``)
  is not a candidate: it takes no ids (``add_with_ids``, ``remove_ids`` are not implemented), and its refine
  codes cost as much as the SQ codes that serve the same budgets without a second pass.
* nothing fits: the smallest PQ, and the reason says the budget is exceeded.

Views that grow (the server's ``/index/add``): a store chooses a view's type when it is created, from
``n_hint``; a view that outgrows it is **re-chosen** (:func:`retype_due`): a view that still holds raw vectors
(``IDMap2,Flat`` or ``IVF..,Flat`` in RAM) and passes its budget, or an exact Flat view past ``RETYPE_FLAT_AT``
items, is rebuilt off the request path as :func:`index.choose.choose_trained` chooses for ``RETYPE_HEADROOM``
times its count, measured on a sample of its own vectors (``index/maintenance.py``, once per index, like
training). The budget is the manifest's ``memory_budget_mb`` (``index.build --memory-mb``), or the one the
opening process gives (``IndexStore.open(memory_budget_mb=...)``; the server's ``CMC_INDEX_MEMORY_MB``).
Compressed views are never re-chosen: their raw vectors are gone, and re-encoding codes compounds the loss.

``nlist`` is ~4 sqrt(n), a power of two, but no more than the training sample allows at 39 vectors per
centroid, and the sample itself is bounded by the budget (:func:`sample_cap`): IVF/PQ views hold raw vectors
only until they are trained (an exact Flat in the store; the sample in ``index.build``, which trains before
adding anything), so that phase stays within the budget too. :func:`train_threshold` says how many vectors
the store waits for before training.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any

import faiss

LOG = logging.getLogger(__name__)

FLAT_MAX = 50_000
IVF_FLAT_MAX = 4_000_000
HNSW_M = 32
DEFAULT_EF_SEARCH = 128  # until tune_search() stores a tuned value
EF_CONSTRUCTION = 80  # FAISS's default 40 gives a visibly worse graph for inner product
ID_PREFIX = "IDMap2,"
MAP_BYTES = 56  # IndexIDMap2 per vector: its id (8) and the reverse unordered_map node (~48)
LIST_SLACK = 1.4  # inverted lists are std::vectors grown by doubling while items are added
SNAPSHOT_COPIES = 1  # snapshots stream the view to disk (faiss.write_index): no second copy in memory
SAMPLE_SHARE = 3  # the training sample takes at most 1/3 of a view's budget (a candidate is built beside it)
MIN_PER_CENTROID = 39  # FAISS asks for 39 training vectors per centroid
PQ_MAX_M = 64

RETYPE_FLAT_AT = 2 * FLAT_MAX  # an exact Flat view is re-chosen past this many items (exact search ~5 ms a query)
RETYPE_HEADROOM = 2  # ... for twice its count, so that it is not re-chosen again right away
RETYPE_MIN = 2_000  # fewer items than this are never re-chosen (too few to train or measure on)

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def nlist_for(n: int, cap: int | None = None) -> int:
    """~4*sqrt(n) inverted lists, rounded to a power of two, in [16, 65536], and at most ``cap / 39`` (the
    training sample ``cap`` vectors can train; not below 16)."""
    target = 4.0 * math.sqrt(max(n, 1))
    nl = int(min(65536, max(16, 2 ** round(math.log2(target)))))
    if cap is not None:
        while nl > 16 and nl * MIN_PER_CENTROID > cap:
            nl //= 2
    return nl


def sample_cap(dim: int, memory_budget_mb: float) -> int:
    """Most raw training vectors of ``dim`` floats a view's training sample may hold within its budget."""
    return max(256, int(memory_budget_mb * 2**20 / SAMPLE_SHARE / (4 * dim)))


def hnsw_bytes(n: int, dim: int, m: int = HNSW_M) -> int:
    """Approximate memory of IDMap2,HNSW{m},Flat: vectors + links (level 0 has 2m) + ids and their map."""
    return int(n * (4 * dim + 2 * m * 4 * 1.1 + 8 + MAP_BYTES))


# IVF views (named groups: ``opq`` the OPQ rotation's sub-quantizers or None, ``nlist``, ``kind`` of codes, ``m``
# the PQ sub-quantizers or None); OPQ only in front of PQ codes (its rotation balances the PQ sub-spaces)
IVF_RE = re.compile(r"^(?:OPQ(?P<opq>\d+),(?=IVF\d+,PQ))?IVF(?P<nlist>\d+),"
                    r"(?P<kind>Flat|SQfp16|SQ8|SQ6|SQ4|PQ(?P<m>\d+)(?:x8)?(?:np)?)$")
# a factory whose index is an IVF one, possibly behind pre-transforms (OPQ16, OPQ16_64, PCA64, RR128, L2norm, ...)
IVF_START = re.compile(r"^(?:[A-Za-z][A-Za-z0-9_]*,)*IVF\d")
SQ_KINDS = {"SQfp16": "ivf-sqfp16", "SQ8": "ivf-sq8", "SQ6": "ivf-sq6", "SQ4": "ivf-sq4"}  # largest codes first
COMPRESSED_KINDS = tuple(SQ_KINDS.values()) + ("ivf-pq", "ivf-opq")
STATIC_KINDS = tuple(SQ_KINDS.values()) + ("ivf-pq",)  # static choices: no OPQ (its training costs minutes)


def code_bytes(kind: str, dim: int, m: int | None = None) -> int:
    """Bytes of one vector's code in an IVF list: ``kind`` as ``IVF_RE`` reads it (``m``: PQ sub-quantizers)."""
    per = {"Flat": 4 * dim, "SQfp16": 2 * dim, "SQ8": dim, "SQ6": (6 * dim + 7) // 8, "SQ4": (dim + 1) // 2}
    return per[kind] if kind in per else int(m)


def est_bytes(factory: str, n: int, dim: int) -> int:
    """Estimated RAM of ``factory`` (as :func:`normalize_factory` writes it) holding ``n`` vectors while it is
    built (see the module docstring); ValueError for a type it cannot estimate."""
    f = normalize_factory(factory)
    if f == ID_PREFIX + "Flat":
        return int(n * (4 * dim + MAP_BYTES))
    mh = re.match(r"^IDMap2,HNSW(\d+),Flat$", f)
    if mh:
        return hnsw_bytes(n, dim, int(mh.group(1)))
    mi = IVF_RE.match(f)
    if not mi:
        raise ValueError(f"no memory estimate for index factory {factory!r}")
    nlist, kind = int(mi["nlist"]), mi["kind"]
    code = code_bytes(kind, dim, mi["m"])
    extra = 256 * dim * 4 if kind.startswith("PQ") else 2 * dim * 4  # PQ codebooks / SQ ranges
    if mi["opq"]:
        extra += dim * dim * 4  # the rotation
    return int(n * (code + 8) * LIST_SLACK + nlist * dim * 4 + extra)


def holds_raw(factory: str) -> bool:
    """Whether ``factory``'s index keeps the raw vectors (so it can be re-chosen without loss)."""
    f = normalize_factory(factory)
    m = IVF_RE.match(f)
    return f == ID_PREFIX + "Flat" or (m is not None and m["kind"] == "Flat")


def retype_due(factory: str, count: int, dim: int, memory_budget_mb: float) -> str | None:
    """Why a view of ``factory`` holding ``count`` items must be re-chosen (see the module docstring), or None."""
    f = normalize_factory(factory)
    if count < RETYPE_MIN or not holds_raw(f):
        return None
    if not fits(f, count, dim, memory_budget_mb):
        return (f"{f} at {count} items needs about {est_bytes(f, count, dim) / 2**20:.1f} MiB, over the view's "
                f"budget of {memory_budget_mb:.1f} MiB")
    if f == ID_PREFIX + "Flat" and count >= RETYPE_FLAT_AT:
        return f"exact search over {count} items (>= {RETYPE_FLAT_AT}) is slow"
    return None


def fits(factory: str, n: int, dim: int, memory_budget_mb: float) -> bool:
    return SNAPSHOT_COPIES * est_bytes(factory, n, dim) <= memory_budget_mb * 2**20


def pq_ms(dim: int) -> list[int]:
    """PQ sub-quantizer counts that divide ``dim`` (at most ``PQ_MAX_M``), largest first."""
    return [m for m in range(min(dim, PQ_MAX_M), 0, -1) if dim % m == 0]


def candidates(n: int, dim: int, memory_budget_mb: float) -> list[dict[str, Any]]:
    """Every candidate type for ``n`` vectors: ``{factory, kind, est_bytes, fits}``, in the static order of
    preference (see the module docstring; PQ largest codes first)."""
    nlist = nlist_for(n, min(max(n, 1), sample_cap(dim, memory_budget_mb)))
    out = [("flat", ID_PREFIX + "Flat"), ("ivf-flat", f"IVF{nlist},Flat"),
           ("hnsw", f"{ID_PREFIX}HNSW{HNSW_M},Flat")] + [(k, f"IVF{nlist},{q}") for q, k in SQ_KINDS.items()]
    out += [("ivf-pq", f"IVF{nlist},PQ{m}x8np") for m in pq_ms(dim)]
    out += [("ivf-opq", f"OPQ{m},IVF{nlist},PQ{m}x8np") for m in pq_ms(dim)]
    return [{"factory": f, "kind": k, "est_bytes": est_bytes(f, n, dim), "fits": fits(f, n, dim, memory_budget_mb)}
            for k, f in out]


def static_choice(n: int, dim: int, memory_budget_mb: float) -> dict[str, Any]:
    """The rule-based choice (no measurement): ``{factory, kind, est_bytes, budget_mb, reason}``."""
    cands = {c["factory"]: c for c in candidates(n, dim, memory_budget_mb)}
    by_kind: dict[str, list[dict]] = {}
    for c in cands.values():
        by_kind.setdefault(c["kind"], []).append(c)
    raw_mib = n * 4 * dim / 2**20

    def pick(c: dict, why: str) -> dict[str, Any]:
        return {"factory": c["factory"], "kind": c["kind"], "est_bytes": c["est_bytes"],
                "budget_mb": memory_budget_mb, "reason": why}

    flat, ivf, hnsw = by_kind["flat"][0], by_kind["ivf-flat"][0], by_kind["hnsw"][0]
    if n < FLAT_MAX and flat["fits"]:
        return pick(flat, f"{n} vectors (< {FLAT_MAX}) fit the budget raw: exact search")
    if n < IVF_FLAT_MAX and ivf["fits"]:
        return pick(ivf, f"{n} raw vectors ({raw_mib:.1f} MiB) fit the budget: IVF over raw vectors")
    if hnsw["fits"]:
        return pick(hnsw, f"{n} raw vectors and an HNSW graph fit the budget")
    if ivf["fits"]:
        return pick(ivf, f"{n} raw vectors fit the budget, not an HNSW graph: IVF over raw vectors")
    # the largest codes first; at equal bytes PQ (its codebooks adapt to the data) before SQ
    for c in sorted([c for k in STATIC_KINDS for c in by_kind[k]],
                    key=lambda c: (-c["est_bytes"], c["kind"] != "ivf-pq")):
        if c["fits"]:
            return pick(c, f"{n} raw vectors ({raw_mib:.1f} MiB) exceed the budget: the largest codes that fit")
    c = by_kind["ivf-pq"][-1]
    LOG.warning("n=%d dim=%d: no index type fits %s MB; %s needs %.1f MiB", n, dim, memory_budget_mb,
                c["factory"], c["est_bytes"] / 2**20)
    return pick(c, f"nothing fits the budget at {n} vectors: the smallest codes")


def choose_factory(n: int, dim: int, memory_budget_mb: float = 2048) -> str:
    """The factory string of :func:`static_choice` for ``n`` vectors of ``dim`` floats."""
    return static_choice(n, dim, memory_budget_mb)["factory"]


def normalize_factory(factory: str) -> str:
    """Canonical form: ``IDMap2,<factory>`` for Flat/HNSW; bare ``IVF...`` (or ``OPQ{m},IVF...``) for IVF.

    IVF indexes take ids natively, and ``IndexIDMap2`` over IVF is *wrong* after ``remove_ids``: the
    wrapper compacts its id map as if the sub-index shifted its entries (true for Flat, not for IVF), so
    later results come back with shifted ids. IVF views are therefore stored unwrapped; an OPQ rotation in front
    (FAISS ``IndexPreTransform``) passes ids, removals and ``SearchParametersIVF`` through to its IVF index.
    """
    f = factory.strip()
    for prefix in ("IDMap2,", "IDMap,"):
        if f.startswith(prefix):
            f = f[len(prefix):]
    return f if IVF_START.match(f) else ID_PREFIX + f


def make_index(factory: str, dim: int, metric: str = "ip") -> faiss.Index:
    """Build an empty index (``IndexIDMap2`` or ``IndexIVF``) from a factory string."""
    idx = faiss.index_factory(dim, normalize_factory(factory), METRICS[metric])
    base = base_of(idx)
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efConstruction = EF_CONSTRUCTION
    return idx


def base_of(idx: faiss.Index) -> faiss.Index:
    """The index inside the IDMap2 wrapper (or ``idx`` itself), downcast to its concrete type."""
    if isinstance(idx, (faiss.IndexIDMap2, faiss.IndexIDMap)):
        return faiss.downcast_index(idx.index)
    return faiss.downcast_index(idx)


def is_hnsw(idx: faiss.Index) -> bool:
    return isinstance(base_of(idx), faiss.IndexHNSW)


def is_ivf(idx: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(base_of(idx)) is not None


def needs_training(factory: str, dim: int, metric: str = "ip") -> bool:
    return not make_index(factory, dim, metric).is_trained


def _nlist(factory: str, dim: int, metric: str) -> int | None:
    """The inverted lists of ``factory``'s IVF index (None for other types)."""
    idx = make_index(factory, dim, metric)  # kept alive while its inner index is read (FAISS frees it with idx)
    ivf = faiss.try_extract_index_ivf(base_of(idx))
    return ivf.nlist if ivf is not None else None


def train_threshold(factory: str, dim: int, metric: str = "ip") -> int:
    """Number of vectors to collect before training (39 per centroid, as FAISS asks)."""
    nlist = _nlist(factory, dim, metric)
    need = max(39 * (nlist or 0), 39 * 256 if "PQ" in factory else 0)
    return max(need, 1)


def train_sample_size(factory: str, dim: int, metric: str = "ip") -> int:
    """Up to 64 vectors per centroid (and at least 256 per PQ centroid)."""
    nlist = _nlist(factory, dim, metric)
    size = 64 * nlist if nlist is not None else 65536
    return max(size, 256 * 64) if "PQ" in factory else size


def search_params(idx: faiss.Index, *, nprobe: int | None = None, ef_search: int | None = None,
                  sel: faiss.IDSelector | None = None) -> faiss.SearchParameters | None:
    """SearchParameters of the right subtype for ``idx`` (per call, so thread-safe)."""
    base = base_of(idx)
    if isinstance(base, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        if ef_search is not None:
            p.efSearch = int(ef_search)
        else:
            p.efSearch = max(base.hnsw.efSearch, DEFAULT_EF_SEARCH)
    elif faiss.try_extract_index_ivf(base) is not None:
        p = faiss.SearchParametersIVF()
        ivf = faiss.try_extract_index_ivf(base)
        p.nprobe = int(nprobe) if nprobe is not None else min(ivf.nlist, max(16, ivf.nlist // 16))
    else:
        if sel is None:
            return None
        p = faiss.SearchParameters()
    if sel is not None:
        p.sel = sel
    return p
