"""Real embeddings for index benchmarks: ``embeddings:MODEL:SPEC`` -> one cached ``.npy`` per view.

    python -m index.bench --data embeddings:default:scenes --n 1000000 --cache /work/bench_cache

``MODEL`` is a model reference (``default`` or empty: the default model, ``cmc:latest`` unless $CMC_MODEL; a
BentoML tag; a run or artifact directory); ``SPEC`` a data spec. ``scenes[:seed=S,ss=..]`` renders procedural
scenes (models/data/scenes.py) chunk by chunk with seed ``S`` (default :data:`BENCH_SEED`, disjoint from the
training seed 0 and its test seed 1000003, so no benchmark item is a training or test scene); any other spec
(``cifar10:PATH``, ``imagefolder:PATH``, ...) is read through ``models.data.iter_batches``, its train split
then its test split. Each item is embedded through the model's exported ONNX graphs (models.runtime.Runtime,
as ``index.build`` does).

Rows are a fixed sequence: row i is the same whatever the requested count (scenes are always rendered in
whole chunks of ``scenes.CHUNK``), so a cache of N rows serves any request for n <= N (its prefix). The cache
is ``<cache>/<fingerprint>-<spec digest>-n<N>/<view>.npy`` plus ``meta.json`` (model fingerprint, spec, n,
rows done), written through ``np.lib.format.open_memmap`` one chunk at a time: memory stays bounded (one
chunk of images), and an interrupted run resumes from the rows it recorded as done.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from models import data as datasets
from models.data import DataError
from models.data.scenes import CHUNK, TEST_SEED_OFFSET, parse_params, render_chunk

LOG = logging.getLogger(__name__)

PREFIX = "embeddings:"
BENCH_SEED = 20_261_202  # scenes seed of benchmark items: not the training seed (0) nor its test seed (1000003)
FLUSH_ROWS = 16_384  # rows between recorded progress points (meta.json)


class BenchDataError(ValueError):
    """A bad ``embeddings:`` spec or request; the message is one line naming it."""


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


def is_embeddings(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse(spec: str) -> tuple[str | None, str]:
    """``embeddings:MODEL:SPEC`` -> (model reference or None for the default, data spec). MODEL may itself hold
    colons (``cmc:latest``): the data spec starts at the first ``:KIND`` naming a known data kind."""
    if not is_embeddings(spec):
        raise BenchDataError(f"bad data spec {spec!r}: expected {PREFIX}MODEL:SPEC (e.g. {PREFIX}default:scenes)")
    rest = spec[len(PREFIX):]
    cuts = [m.start(1) for m in re.finditer(r"(?:^|:)((?:%s)(?=:|$))" % "|".join(datasets.KINDS), rest)]
    if not cuts:
        raise BenchDataError(f"bad data spec {spec!r}: no data kind after the model (one of "
                             f"{', '.join(datasets.KINDS)}), expected {PREFIX}MODEL:SPEC")
    model, data = rest[:cuts[0]].rstrip(":"), rest[cuts[0]:]
    try:
        datasets.parse_spec(data)
    except DataError as e:
        raise BenchDataError(f"bad data spec {spec!r}: {e}") from None
    return (None if model in ("", "default") else model), data


def scenes_options(arg: str, image_size: int) -> dict[str, int]:
    """The render options of a ``scenes`` spec for benchmarks: seed (default BENCH_SEED), size, ss."""
    if "seed=" not in arg:
        arg = f"{arg},seed={BENCH_SEED}" if arg else f"seed={BENCH_SEED}"
    try:
        p = parse_params(arg, image_size)
    except DataError as e:
        raise BenchDataError(f"bad scenes spec {arg!r}: {e}") from None
    if p["seed"] in (0, TEST_SEED_OFFSET):
        raise BenchDataError(f"scenes seed {p['seed']} is a training/test seed of the default model; pick another "
                             f"(default {BENCH_SEED})")
    return {"seed": p["seed"], "size": p["size"], "ss": p["ss"]}


def canonical(data: str, image_size: int) -> str:
    """The data spec as cached: scenes options filled in, so 'scenes' and 'scenes:seed=<default>' share a cache."""
    kind, arg = datasets.parse_spec(data)
    if kind == "scenes":
        o = scenes_options(arg, image_size)
        return f"scenes:seed={o['seed']},size={o['size']},ss={o['ss']}"
    return f"{kind}:{Path(arg).expanduser().resolve()}"


def default_cache() -> Path:
    return Path(os.environ.get("CMC_HOME", Path.home() / ".cmc")) / "bench"


def _render(args: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
    seed, chunk, size, ss = args
    part = render_chunk(seed, chunk, CHUNK, size, ss)
    return {"rgb": part["rgb"], "depth": part["depth"]}


def iter_scenes(opts: dict[str, int], start: int, stop: int, workers: int) -> Iterator[tuple[int, dict]]:
    """(first row, sources) for rows [start, stop) of the benchmark scenes, whole chunks rendered by ``workers``
    forked processes with a bounded number in flight (memory stays a few chunks)."""
    first, last = start // CHUNK, (stop + CHUNK - 1) // CHUNK
    jobs = ((opts["seed"], c, opts["size"], opts["ss"]) for c in range(first, last))

    def trim(c: int, part: dict) -> tuple[int, dict]:
        lo, hi = max(start, c * CHUNK), min(stop, (c + 1) * CHUNK)
        return lo, {k: v[lo - c * CHUNK:hi - c * CHUNK] for k, v in part.items()}

    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        for job in jobs:
            yield trim(job[1], _render(job))
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append((job[1], pool.submit(_render, job)))
            if len(pending) >= 2 * workers:
                c, fut = pending.popleft()
                yield trim(c, fut.result())
        while pending:
            c, fut = pending.popleft()
            yield trim(c, fut.result())


def iter_spec(data: str, image_size: int, start: int, stop: int, batch: int = CHUNK) -> Iterator[tuple[int, dict]]:
    """Rows [start, stop) of a non-scenes spec: its train split, then its test split."""
    row = 0
    for split in ("train", "test"):
        try:
            batches = datasets.iter_batches(data, split, batch, image_size=image_size)
            for ds in batches:
                lo, hi = row, row + len(ds)
                row = hi
                if hi <= start:
                    continue
                a, b = max(lo, start), min(hi, stop)
                yield a, {k: v[a - lo:b - lo] for k, v in ds.sources.items()}
                if hi >= stop:
                    return
        except DataError as e:
            if split == "test":  # a spec without a test split: the train split is all there is
                break
            raise BenchDataError(f"data spec {data!r}: {e}") from None
    if row < stop:
        raise BenchDataError(f"data spec {data!r} has {row} items; {stop} were asked for")


def _cache_dir(root: Path, fingerprint: str, spec: str, n: int) -> Path:
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    return root / f"{fingerprint}-{digest}-n{n}"


def _read_meta(d: Path) -> dict | None:
    try:
        return json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _write_meta(d: Path, meta: dict) -> None:
    tmp = d / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, d / "meta.json")


def find_cached(root: Path, fingerprint: str, spec: str, n: int, views: list[str]) -> Path | None:
    """A finished cache of this model and spec with at least ``n`` rows of every view, or None."""
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    best = None
    for d in sorted(root.glob(f"{fingerprint}-{digest}-n*")) if root.is_dir() else []:
        m = _read_meta(d)
        if (m and m.get("spec") == spec and m.get("fingerprint") == fingerprint and m.get("done", 0) >= n
                and all((d / f"{v}.npy").is_file() for v in views)):
            if best is None or m["n"] < best[0]:
                best = (m["n"], d)
    return best[1] if best else None


def embeddings(spec: str, n: int, views: list[str] | None = None, *, cache: str | Path | None = None,
               workers: int | None = None, threads: int = 0, progress: bool = True,
               runtime_factory: Callable | None = None) -> dict[str, np.ndarray]:
    """The first ``n`` rows of an ``embeddings:MODEL:SPEC`` source: {view: (n, D) float32 read-only memmap}.

    Reuses a finished cache with >= n rows (no model inference at all when one exists); else embeds what is
    missing into ``<cache>/<fingerprint>-<digest>-n<n>/`` (resuming a partial run there). ``workers``: render
    processes for scenes (default: the CPU count); ``threads``: onnxruntime intra-op threads (0: its default)."""
    from models.artifact import ModelNotFound
    from models.card import CardError
    from models.runtime import Runtime

    model, data = parse(spec)
    kind, arg = datasets.parse_spec(data)
    if kind == "scenes":
        scenes_options(arg, 64)  # a bad option or seed is named before any model is loaded
    if n < 1:
        raise BenchDataError(f"n must be >= 1, got {n}")
    root = Path(cache) if cache is not None else default_cache()
    try:
        rt = (runtime_factory or Runtime)(model, device="cpu", intra_op_threads=threads)
    except (ModelNotFound, CardError) as e:
        raise BenchDataError(f"model of {spec!r}: {e}") from None
    views = list(views or rt.views)
    for v in views:
        if v not in rt.views:
            raise BenchDataError(f"unknown view {v!r} for {spec!r}; the model has: {', '.join(rt.views)}")
    canon = canonical(data, rt.image_size)
    hit = find_cached(root, rt.fingerprint, canon, n, views)
    if hit is not None:
        LOG.info("embeddings cache hit %s", hit)
        return {v: np.load(hit / f"{v}.npy", mmap_mode="r")[:n] for v in views}
    d = _cache_dir(root, rt.fingerprint, canon, n)
    d.mkdir(parents=True, exist_ok=True)
    meta = _read_meta(d)
    files = {v: d / f"{v}.npy" for v in views}
    if (meta and meta.get("spec") == canon and meta.get("fingerprint") == rt.fingerprint
            and all(f.is_file() for f in files.values()) and set(meta.get("views", [])) >= set(views)):
        done = int(meta["done"])
        out = {v: np.lib.format.open_memmap(f, mode="r+") for v, f in files.items()}
        LOG.info("resuming %s at row %d of %d", d, done, n)
    else:
        done = 0
        out = {v: np.lib.format.open_memmap(f, mode="w+", dtype=np.float32, shape=(n, rt.dim))
               for v, f in files.items()}
    meta = {"fingerprint": rt.fingerprint, "model": str(rt.path), "spec": canon, "n": n, "views": views,
            "done": done, "dim": rt.dim, "image_size": rt.image_size}
    if kind == "scenes":
        workers = workers if workers is not None else (os.cpu_count() or 1)
        chunks = iter_scenes(scenes_options(arg, rt.image_size), done, n, workers)
    else:
        chunks = iter_spec(data, rt.image_size, done, n)
    from tqdm import tqdm
    t0, last = time.perf_counter(), done
    with tqdm(total=n, initial=done, desc=f"embed {','.join(views)}", unit="item", disable=not progress,
              dynamic_ncols=True, mininterval=5) as bar:
        for lo, sources in chunks:
            m = len(next(iter(sources.values())))
            for v in views:
                out[v][lo:lo + m] = rt.embed_sources(v, sources)
            done = lo + m
            bar.update(m)
            if done - last >= FLUSH_ROWS or done == n:
                for a in out.values():
                    a.flush()
                meta["done"] = done
                meta["seconds"] = round(meta.get("seconds", 0) + time.perf_counter() - t0, 1)
                t0, last = time.perf_counter(), done
                _write_meta(d, meta)
    del out
    return {v: np.load(files[v], mmap_mode="r") for v in views}


def main(argv: list[str] | None = None) -> int:
    """``python -m index.bench_data SPEC --n N``: fill the cache only (e.g. a long job in the background)."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="python -m index.bench_data", description=main.__doc__)
    ap.add_argument("spec")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--views", default="L")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        x = embeddings(a.spec, a.n, a.views.split(","), cache=a.cache, workers=a.workers, threads=a.threads)
    except BenchDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{v}: {arr.shape}" for v, arr in x.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
