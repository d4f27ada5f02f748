"""python -m index.build: embed items through the ONNX runtime (never torch) and index every view.

    python -m index.build --model cmc:latest --data scenes --split test --views L,ab,depth --out DIR

Items stream in chunks (``--batch-size``): only one chunk of decoded images is in memory at a time, so
folders of a million images build in bounded memory. Each item gets its data key as its key and its label,
class name and split as metadata (SQLite).

The memory budget (``--memory-mb``, shared equally by the views) holds during the build: the items are counted
first (a dataset's length; a folder's files), each view's index type is chosen from that count
(``index/factory.py``, measured on a training sample by ``index/choose.py`` when the raw vectors do not fit), and
a view that needs training is trained on a sample of its first items (bounded by the budget) before anything is
added, so no view ever holds more raw vectors than that sample. The choice and its reason are recorded in the
manifest (``views.<view>.choice``) and printed, one line per view.
"""
from __future__ import annotations

import argparse
import itertools
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from models import data as datasets
from models.card import CardError
from models.data import DataError, Dataset
from models.runtime import InputError, Runtime
from . import factory as fac
from . import manifest as mf
from .choose import GIVEN_QUERIES, choose_trained, sample_size
from .milvus import is_milvus
from .recall import exact_knn, merge_topk, without_own
from .store import IndexStore, StoreError
from .thumbs import ThumbStore
from .vector_files import VectorChunk, VectorFiles, is_vectors

LOG = logging.getLogger(__name__)


def item_metadata(chunk: Dataset, split: str | None = None) -> list[dict]:
    meta = []
    for i in range(len(chunk)):
        m: dict = {"key": chunk.keys[i]} if chunk.keys else {}
        if chunk.y is not None:
            m["label"] = int(chunk.y[i])
            if chunk.classes:
                m["class"] = chunk.classes[int(chunk.y[i])]
        if split:
            m["split"] = split
        meta.append(m)
    return meta


def chunk_keys(chunk: Dataset, start: int) -> list[str]:
    """The chunk's keys, or ``item-<n>`` numbered from ``start`` (the items before it) for keyless data."""
    return list(chunk.keys) if chunk.keys else [f"item-{start + i}" for i in range(len(chunk))]


def add_chunk(store: IndexStore, rt: Runtime, chunk: Dataset, views: list[str], split: str | None = None,
              keys: list[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Embed one chunk in every view and add it under ``keys`` (default: ``chunk_keys(chunk, 0)``); returns
    the ids and the vectors per view."""
    vectors = _embed(rt, views, chunk)  # (n, D) per view
    ids = store.add(keys or chunk_keys(chunk, 0), vectors, item_metadata(chunk, split))
    return ids, vectors


def store_class(out: str | Path) -> type:
    """Where ``--out`` points: IndexStore for a directory, MilvusStore for
    ``milvus://HOST:PORT[/DB]?collection=NAME`` (index/milvus.py, the ``[milvus]`` extra)."""
    if is_milvus(str(out)):
        from .milvus import MilvusStore
        return MilvusStore
    return IndexStore


def build_index(model: str | Path | Runtime, data: Dataset | str, views: list[str] | None, out: str | Path, *,
                model_ref: str | None = None, split: str = "test", factory: str | None = None,
                batch_size: int = 256, memory_budget_mb: int = 2048, n_hint: int = 0,
                progress: bool = True, tune_sample: int = 200, thumbs: bool = True,
                engine: str = "local", ray_options: dict | None = None, storage: str = "ram",
                queries: str | None = None) -> Path:
    """Build an index directory at ``out`` (which must not hold an index yet) within ``memory_budget_mb`` (see the
    module docstring). ANN views get their nprobe / efSearch tuned to recall@10 >= 0.95 against exact search for
    the first ``tune_sample`` items as queries (their exact neighbours among all items, merged chunk by chunk
    while the items stream), and the recall reached is recorded in the view's choice (``built_recall``).
    ``thumbs``: also keep each item's thumbnails and indexed vectors for the web page (index/thumbs.py).
    ``storage="disk"``: IVF views memory-map their snapshot's lists instead of holding them (index/ondisk.py).
    ``engine="ray"``: embed on a Ray cluster (index/ray_engine.py; ``ray_options`` are its keyword arguments:
    address, num_cpus, actors, batch_size, ...); the store is written here either way.
    ``queries``: what the served queries look like, when they differ from the indexed items (a data spec, read
    from its test split and embedded, or ``vectors:DIR``): the first ``choose.GIVEN_QUERIES`` are
    measured by the index choice (``index.choose``) and tune nprobe / efSearch, in place of indexed items."""
    rt = model if isinstance(model, Runtime) else Runtime(model)
    views = views or list(rt.views)
    for v in views:
        rt.view(v)  # unknown view -> InputError naming it
    if is_vectors(data) and engine != "local":
        raise InputError(f"{data}: vectors: are embedded already; --engine {engine} has nothing to do", "engine")
    make_chunks, total = _chunk_source(data, split, batch_size, rt.image_size, views, rt.dim, progress)
    qv = _queries(rt, views, queries, batch_size) if queries is not None else None
    n = n_hint or total or 0
    cls = store_class(out)
    if storage != "ram" and cls is not IndexStore:
        raise StoreError(f"storage {storage!r} (--on-disk) applies to an index directory, not to {out}")
    head: list[dict[str, np.ndarray] | None] = []  # the sample's chunks, embedded once: added first below
    plan: dict = {}
    if cls is IndexStore:
        head, plan = _plan(lambda c: _embed(rt, views, c), views, rt.dim, make_chunks, n, factory,
                           memory_budget_mb, storage=storage, queries=qv)
    store = cls.create(out, views={v: rt.dim for v in views}, fingerprint=rt.fingerprint,
                       model_ref=str(model_ref or rt.path), factory=plan.get("factory", factory), n_hint=n,
                       memory_budget_mb=memory_budget_mb, snapshot_ops=10**9, snapshot_seconds=10**9,
                       **({"trained": plan["trained"], "choice": plan["choice"]} if plan else {}),
                       **({"storage": storage} if storage != "ram" else {}))
    truth = _Truths(store, views, tune_sample, qv) if isinstance(store, IndexStore) else None  # Milvus: by size
    tuned: dict[str, dict] = {}
    done = 0
    th = ThumbStore(out) if thumbs and not is_milvus(str(out)) else None  # a Milvus collection keeps none
    sources = {v: rt.views[v]["source"] for v in views}
    chunks = make_chunks()
    replayed = _replay(head, chunks)
    if engine == "ray":
        from .ray_engine import embed_chunks
        rest = embed_chunks(rt, chunks, views, **(ray_options or {}))
    else:
        rest = ((c, _embed(rt, views, c)) for c in chunks)
    embedded = itertools.chain(replayed, rest)
    try:
        with tqdm(total=total, desc="index", unit="item", disable=not progress, dynamic_ncols=True) as bar:
            for chunk, vec in embedded:
                keys = chunk_keys(chunk, done)  # keyless data: numbered across chunks, not from 0 in each
                ids = store.add(keys, vec, item_metadata(chunk, None if isinstance(chunk, VectorChunk) else split))
                done += len(keys)
                if th is not None:
                    th.add_sources(keys, chunk.sources, sources, ids=ids, vectors=vec)
                if truth is not None:
                    truth.add(vec, ids)
                bar.update(len(ids))
        if truth is not None:
            tuned = truth.tune()
        store.snapshot()
    finally:
        store.close()
        if th is not None:
            th.close()
    if tuned:
        _record(Path(out), tuned)
    return out if is_milvus(str(out)) else Path(out)


def _embed(rt: Runtime, views: list[str], chunk: Dataset | VectorChunk) -> dict[str, np.ndarray]:
    """A chunk's vectors per view: embedded through the model, or as read (``vectors:DIR``)."""
    if isinstance(chunk, VectorChunk):
        return chunk.vectors
    return {v: rt.embed_sources(v, chunk.sources) for v in views}


def _queries(rt: Runtime, views: list[str], spec: str, batch_size: int) -> dict[str, np.ndarray]:
    """The first ``GIVEN_QUERIES`` queries per view, read from ``vectors:DIR`` (checked like the data's rows) or a
    data spec's test split embedded by the model; an InputError when there are none."""
    if is_vectors(spec):
        vf = VectorFiles(spec, views, rt.dim)
        out = {v: vf.read(v, 0, min(len(vf), GIVEN_QUERIES)) for v in views}
    else:
        make, _ = _chunk_source(spec, "test", batch_size, rt.image_size, views, rt.dim)
        got: list[dict[str, np.ndarray]] = []
        for chunk in make():
            got.append(_embed(rt, views, chunk))
            if sum(len(g[views[0]]) for g in got) >= GIVEN_QUERIES:
                break
        out = {v: np.concatenate([g[v] for g in got])[:GIVEN_QUERIES] for v in views} if got else {}
    if not out or not len(out[views[0]]):
        raise InputError(f"queries {spec}: no queries there", "queries")
    return out


def _chunk_source(data: Dataset | str, split: str, batch_size: int, image_size: int | None,
                  views: list[str] | None = None, dim: int | None = None, progress: bool = False
                  ) -> tuple[Callable[[], Iterator[Dataset | VectorChunk]], int | None]:
    """A function making a fresh iterator over the data's chunks, and the number of items when the data can say
    without decoding it: a dataset's length (non-folder specs are loaded whole by ``iter_batches`` anyway), a
    folder's files (an upper bound: unreadable files are skipped when decoded), the rows of ``vectors:DIR``."""
    if is_vectors(data):
        vf = VectorFiles(data, views or [], dim or 0)
        vf.check(progress=progress)  # a bad row fails the build before it writes anything
        return (lambda: vf.chunks(batch_size)), len(vf)
    if isinstance(data, str) and datasets.parse_spec(data)[0] not in ("imagefolder", "paired"):
        data = datasets.load(data, split, image_size=image_size)
    if isinstance(data, Dataset):
        ds = data
        return (lambda: (ds.subset(np.arange(lo, min(lo + batch_size, len(ds))))
                         for lo in range(0, len(ds), batch_size))), len(ds)
    spec = data
    return (lambda: datasets.iter_batches(spec, split, batch_size, image_size=image_size)), _count_files(spec, split)


def _count_files(spec: str, split: str) -> int | None:
    """The items of an imagefolder/paired spec, from listing its files (None when they cannot be listed)."""
    from models.data import paired, readers
    kind, arg = datasets.parse_spec(spec)
    try:
        got = readers._imagefolder_items(arg, split) if kind == "imagefolder" else paired._paired_items(arg, split)
        return len(got[1])
    except (DataError, OSError, TypeError, IndexError):
        return None  # the build reports the data error itself when it reads the items


def _plan(embed: Callable, views: list[str], dim: int, make_chunks: Callable[[], Iterator[Dataset]], n: int,
          factory: str | None, memory_budget_mb: int, storage: str = "ram",
          queries: dict[str, np.ndarray] | None = None) -> tuple[list, dict]:
    """Each view's index type for ``n`` items within its share of the budget, trained on a sample of the first
    items where it needs training: ``(head, plan)``, ``head`` the embedded chunks of the sample (added to the
    store first, not embedded again), ``plan`` the store's ``factory``, ``trained`` and ``choice`` per view
    (``opq``: whether OPQ candidates may be chosen; on-disk views map plain IVF files only; ``queries``: the
    user's queries per view, measured in place of held-out sample items)."""
    budget = memory_budget_mb / len(views)
    static = {v: factory or fac.static_choice(n, dim, budget)["factory"] for v in views}
    need = max(sample_size(static[v], n, dim, budget) for v in views)
    head: list[dict[str, np.ndarray] | None] = []
    got = 0
    if need:
        for chunk in make_chunks():
            head.append(embed(chunk))
            got += len(chunk)
            if got >= need:
                break
    plan: dict = {"factory": {}, "trained": {}, "choice": {}}
    for v in views:
        sample = np.concatenate([h[v] for h in head])[:need] if head else None  # (S, D)
        choice, index = choose_trained(sample, n, dim, budget, factory=factory, storage=storage,
                                       queries=queries[v] if queries else None)
        plan["factory"][v], plan["choice"][v] = choice["factory"], choice
        if index is not None:
            plan["trained"][v] = index
        del sample
    return head, plan


def _replay(head: list, chunks: Iterator[Dataset]) -> Iterator[tuple[Dataset, dict[str, np.ndarray]]]:
    """The first ``len(head)`` chunks with the vectors embedded for the sample (each dropped once yielded)."""
    for i in range(len(head)):
        chunk = next(chunks, None)
        if chunk is None:
            return
        vec, head[i] = head[i], None
        yield chunk, vec


def describe(spec: dict) -> str:
    """One line on a view's index choice, from its manifest entry."""
    c = spec.get("choice") or {}
    line = spec["factory"]
    if c:
        line += f" ({c.get('reason', '')}"
        if c.get("est_bytes") is not None:
            line += f"; est {c['est_bytes'] / 2**20:.1f} MiB of a {c.get('budget_mb')} MB budget"
        if c.get("measured_recall") is not None:
            asked = " for the given queries" if c.get("queries_from") == "given" else ""
            line += (f"; recall@{c.get('measured_at_k', 10)} {c['measured_recall']:.3f} at nprobe {c.get('nprobe')} on "
                     f"the training sample{asked}")
        if c.get("built_recall") is not None:
            got = ", ".join(f"{k[6:]} {v}" for k, v in c.items() if k.startswith("built_") and k not in
                            ("built_recall", "built_queries", "built_queries_from"))
            given = " given" if c.get("built_queries_from") == "given" else ""
            line += (f"; recall@10 {c['built_recall']:.3f} on the built index ({got}, "
                     f"{c['built_queries']}{given} queries)")
        line += ")"
    return line


class _Truths:
    """Each view's :class:`_Truth`; the queries are the first ``nq`` items, buffered until there are that many, or
    the ``queries`` given per view (``index.build --queries``)."""

    def __init__(self, store: IndexStore, views: list[str], nq: int,
                 queries: dict[str, np.ndarray] | None = None) -> None:
        self.store, self.views, self.nq = store, views, nq
        self.buf: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self.views_truth: dict[str, _Truth] = {}
        if queries:
            self.views_truth = {v: _Truth(queries[v], None, store.manifest["views"][v]) for v in views}

    def add(self, vec: dict[str, np.ndarray], ids: np.ndarray) -> None:
        if self.views_truth:
            for v in self.views:
                self.views_truth[v].add(vec[v], ids)
            return
        self.buf.append((ids, vec))
        if sum(len(i) for i, _ in self.buf) >= self.nq:
            self._start()

    def _start(self) -> None:
        if not self.buf:
            return
        ids = np.concatenate([i for i, _ in self.buf])
        for v in self.views:
            x = np.concatenate([c[v] for _, c in self.buf])  # (<= nq + a chunk, D)
            self.views_truth[v] = _Truth(x[:self.nq], ids[:self.nq], self.store.manifest["views"][v])
            self.views_truth[v].add(x, ids)
        self.buf = []

    def tune(self) -> dict[str, dict]:
        """Tune every view (see :meth:`_Truth.tune`); the results per view."""
        self._start()
        for v, t in self.views_truth.items():
            t.tune(self.store, v)
        return {v: t.result for v, t in self.views_truth.items() if t.result}


class _Truth:
    """Exact top-``k`` neighbours of ``nq`` stored items among every other item added so far (a running merge of
    ``faiss.knn`` over each chunk: nq x n x dim work, nq x k memory), to tune and measure the built index against
    exact search without keeping the collection's vectors. Leave-one-out: each query's own item is left out of
    its neighbours and of the index's answers (``IndexStore.tune_search(exclude=...)``), so the tuned nprobe is
    the one a query that is not in the index needs. ``qids`` None: the queries are not stored items (given)."""

    def __init__(self, xq: np.ndarray, qids: np.ndarray | None, spec: dict, k: int = 10) -> None:
        self.xq = np.ascontiguousarray(xq, dtype=np.float32)  # (nq, D)
        self.qids = None if qids is None else np.asarray(qids, np.int64)
        self.k, self.metric, self.factory = k, spec.get("metric", "ip"), spec["factory"]
        self.D = np.full((len(self.xq), k + 1), -np.inf if self.metric == "ip" else np.inf, np.float32)
        self.I = np.full((len(self.xq), k + 1), -1, np.int64)
        self.result: dict = {}

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        D, pos = exact_knn(self.xq, x, min(self.k + 1, len(x)), self.metric)
        self.D, self.I = merge_topk(self.D, self.I, D, ids[pos], self.k + 1, self.metric)

    def tune(self, store: IndexStore, view: str) -> None:
        """ANN views: the smallest nprobe / efSearch reaching recall@10 >= 0.95 against exact search (the
        store's default from now on), and the recall it reaches, recorded in the view's choice."""
        if ("IVF" not in self.factory and "HNSW" not in self.factory) or len(self.xq) < 20:
            return
        gt = self.I[:, :self.k] if self.qids is None else without_own(self.I, self.qids, self.k)
        best = store.tune_search(view, self.xq, gt, k=self.k, exclude=self.qids)
        self.result = {"built_recall": round(float(best["recall"]), 4), "built_queries": len(self.xq),
                       "built_queries_from": "given" if self.qids is None else "indexed items",
                       **{f"built_{n}": int(v) for n, v in best.items() if n != "recall"}}


def _record(out: Path, results: dict[str, dict]) -> None:
    """Add the recall measured on the built index to each view's choice in the committed manifest (the build
    is the only process of a new index, and it has closed its store)."""
    if not results:
        return
    m = mf.read_manifest(out)
    for v, r in results.items():
        m["views"][v]["choice"] = {**(m["views"][v].get("choice") or {}), **r}
    mf.commit_manifest(out, m)


def _positive_mb(v: str) -> int:
    try:
        mb = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--memory-mb must be a whole number of MiB, got {v!r}") from None
    if mb < 1:
        raise argparse.ArgumentTypeError(f"--memory-mb must be at least 1, got {mb}")
    return mb


def _ray_options(a: argparse.Namespace) -> dict | None:
    if a.engine != "ray":
        return None
    if importlib.util.find_spec("ray") is None:
        raise InputError("--engine ray needs Ray: pip install -e '.[ray]'", "engine")
    opts = {"address": a.address, "num_cpus": a.ray_cpus, "batch_size": a.ray_batch_size}
    return {k: v for k, v in opts.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m index.build", description="Build a cross-view FAISS index.")
    p.add_argument("--model", default=None, help="model reference: BentoML tag (default cmc:latest) or directory")
    p.add_argument("--data", required=True,
                   help="data spec (scenes, cifar10:PATH, imagefolder:PATH, paired:PATH, npz:PATH), or vectors:DIR: "
                        "this model's embeddings computed elsewhere, one <view>.npy per view (index/vector_files.py)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split to index")
    p.add_argument("--views", default=None, help="comma-separated views to index (default: every view of the model)")
    p.add_argument("--out", required=True,
                   help="index directory, or milvus://HOST:PORT[/DB]?collection=NAME (must not exist yet)")
    p.add_argument("--index-factory", default=None, help="faiss.index_factory string (default: chosen by size)")
    p.add_argument("--batch-size", type=int, default=256, help="items embedded and added per chunk")
    p.add_argument("--memory-mb", type=_positive_mb, default=2048,
                   help="memory budget in MiB for the index, shared by the views (chooses each view's index type)")
    p.add_argument("--queries", default=None,
                   help="what the served queries look like, when unlike the indexed items: a data spec (its test "
                        "split, embedded) or vectors:DIR; the index choice and the nprobe tuning measure these "
                        f"(the first {GIVEN_QUERIES}) instead of indexed items")
    p.add_argument("--on-disk", action="store_true",
                   help="IVF views keep their inverted lists on disk, memory-mapped (views larger than RAM)")
    p.add_argument("--n-hint", type=int, default=0, help="expected item count (streamed folders)")
    p.add_argument("--no-thumbs", action="store_true", help="keep no thumbnails for the web page (thumbs.sqlite)")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="where to embed: this process, or a Ray cluster (pip install -e '.[ray]')")
    p.add_argument("--address", default=None, help="--engine ray: the cluster to join (default: start a local Ray)")
    p.add_argument("--ray-cpus", type=int, default=None, help="--engine ray, local Ray: its CPUs (default: all)")
    p.add_argument("--ray-batch-size", type=int, default=None, help="--engine ray: items per actor call (default 256)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        views = [v.strip() for v in a.views.split(",")] if a.views else None
        out = build_index(a.model, a.data, views, a.out, model_ref=a.model, split=a.split, factory=a.index_factory,
                          batch_size=a.batch_size, memory_budget_mb=a.memory_mb, n_hint=a.n_hint,
                          thumbs=not a.no_thumbs, engine=a.engine, ray_options=_ray_options(a),
                          storage="disk" if a.on_disk else "ram", queries=a.queries)
    except (DataError, StoreError, CardError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with store_class(out).open(out, readonly=True) as s:
        print(f"index {out}: {len(s)} items; " + ", ".join(f"{v} {s.manifest['views'][v]['factory']}" for v in s.views))
        for v in s.views:
            print(f"  view {v}: {describe(s.manifest['views'][v])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
