"""python -m index.build: embed items through the ONNX runtime (never torch) and index every view.

    python -m index.build --model cmc:latest --data scenes --split test --views L,ab,depth --out DIR

Items stream in chunks (``--batch-size``): only one chunk of decoded images is in memory at a time, so
folders of a million images build in bounded memory. Each item gets its data key as its key and its label,
class name and split as metadata (SQLite).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from models import data as datasets
from models.card import CardError
from models.data import DataError, Dataset
from models.runtime import InputError, Runtime
from .milvus import is_milvus
from .recall import exact_knn
from .store import IndexStore, StoreError
from .thumbs import ThumbStore

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
    vectors = {v: rt.embed_sources(v, chunk.sources) for v in views}  # (n, D) per view
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
                progress: bool = True, tune_sample: int = 20_000, thumbs: bool = True,
                engine: str = "local", ray_options: dict | None = None) -> Path:
    """Build an index directory at ``out`` (which must not hold an index yet). ANN views get their
    nprobe / efSearch tuned to recall@10 >= 0.95 against exact search on a sample of the stored vectors.
    ``thumbs``: also keep each item's thumbnails and indexed vectors for the web page (index/thumbs.py).
    ``engine="ray"``: embed on a Ray cluster (index/ray_engine.py; ``ray_options`` are its keyword arguments:
    address, num_cpus, actors, batch_size, ...); the store is written here either way."""
    rt = model if isinstance(model, Runtime) else Runtime(model)
    views = views or list(rt.views)
    for v in views:
        rt.view(v)  # unknown view -> InputError naming it
    if isinstance(data, Dataset):
        chunks = (data.subset(np.arange(lo, min(lo + batch_size, len(data)))) for lo in range(0, len(data), batch_size))
        total = len(data)
    else:
        chunks = datasets.iter_batches(data, split, batch_size, image_size=rt.image_size)
        total = None
    store = store_class(out).create(out, views={v: rt.dim for v in views}, fingerprint=rt.fingerprint,
                              model_ref=str(model_ref or rt.path), factory=factory, n_hint=n_hint or total or 0,
                              memory_budget_mb=memory_budget_mb, snapshot_ops=10**9, snapshot_seconds=10**9)
    sample_ids: list[np.ndarray] = []
    sample_x: dict[str, list[np.ndarray]] = {v: [] for v in views}
    kept = done = 0
    th = ThumbStore(out) if thumbs and not is_milvus(str(out)) else None  # a Milvus collection keeps none
    sources = {v: rt.views[v]["source"] for v in views}
    if engine == "ray":
        from .ray_engine import embed_chunks
        embedded = embed_chunks(rt, chunks, views, **(ray_options or {}))
    else:
        embedded = ((c, {v: rt.embed_sources(v, c.sources) for v in views}) for c in chunks)
    try:
        with tqdm(total=total, desc="index", unit="item", disable=not progress, dynamic_ncols=True) as bar:
            for chunk, vec in embedded:
                keys = chunk_keys(chunk, done)  # keyless data: numbered across chunks, not from 0 in each
                ids = store.add(keys, vec, item_metadata(chunk, split))
                done += len(keys)
                if th is not None:
                    th.add_sources(keys, chunk.sources, sources, ids=ids, vectors=vec)
                if kept < tune_sample:  # the first items: a sample for tuning search parameters
                    sample_ids.append(ids)
                    for v in views:
                        sample_x[v].append(vec[v])
                    kept += len(ids)
                bar.update(len(ids))
        if kept and isinstance(store, IndexStore):  # Milvus: search parameters by size (index/milvus.py)
            ids = np.concatenate(sample_ids)
            for v in views:
                _tune(store, v, ids, np.concatenate(sample_x[v]))
        store.snapshot()
    finally:
        store.close()
        if th is not None:
            th.close()
    return out if is_milvus(str(out)) else Path(out)


def _tune(store: IndexStore, view: str, ids: np.ndarray, xb: np.ndarray, nq: int = 200) -> None:
    """ANN views: the smallest nprobe / efSearch reaching recall@10 >= 0.95 against exact search, with queries
    drawn from a sample of the stored vectors. When the sample is the whole collection the exact neighbours
    come from faiss.knn; otherwise from the index itself searched exhaustively (IVF with nprobe = nlist is exact;
    HNSW with a very large efSearch is as close as it gets)."""
    import faiss
    f = store.manifest["views"][view]["factory"]
    if ("IVF" not in f and "HNSW" not in f) or len(ids) < 20:
        return
    xq = xb[np.random.default_rng(0).choice(len(xb), min(nq, len(xb)), replace=False)]
    if len(ids) == len(store):
        gt = ids[exact_knn(xq, xb, 10)[1]]  # exact neighbours: the sample is everything
    elif "IVF" in f:
        nlist = faiss.extract_index_ivf(store.index_of(view)).nlist
        gt = store.search(xq, view, 10, nprobe=nlist)[1]
    else:
        gt = store.search(xq, view, 10, ef_search=4096)[1]
    store.tune_search(view, xq, gt)


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
    p.add_argument("--data", required=True, help="data spec (scenes, cifar10:PATH, imagefolder:PATH, paired:PATH, npz:PATH)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split to index")
    p.add_argument("--views", default=None, help="comma-separated views to index (default: every view of the model)")
    p.add_argument("--out", required=True,
                   help="index directory, or milvus://HOST:PORT[/DB]?collection=NAME (must not exist yet)")
    p.add_argument("--index-factory", default=None, help="faiss.index_factory string (default: chosen by size)")
    p.add_argument("--batch-size", type=int, default=256, help="items embedded and added per chunk")
    p.add_argument("--memory-mb", type=int, default=2048, help="memory budget for choosing the index type")
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
                          thumbs=not a.no_thumbs, engine=a.engine, ray_options=_ray_options(a))
    except (DataError, StoreError, CardError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with store_class(out).open(out, readonly=True) as s:
        print(f"index {out}: {len(s)} items; " + ", ".join(f"{v} {s.manifest['views'][v]['factory']}" for v in s.views))
    return 0


if __name__ == "__main__":
    sys.exit(main())
