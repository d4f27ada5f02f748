"""Index builds on a Ray cluster (``python -m index.build ... --engine ray [--address ADDR]``).

The driver reads the data exactly as the local build does (the same chunks, in windows of ``window`` items);
Ray Data embeds every view of a window with ``map_batches`` over a pool of actors, each holding one
``models.runtime.Runtime`` (one onnxruntime session per view) loaded from the exported graphs, which travel
through Ray's object store, so the workers need no shared filesystem and no torch. The driver gets the
vectors back in order and ``index.build`` writes them to the store as it writes the local path's.

Without ``address`` a local Ray is started (``ray.init(num_cpus=...)``) and shut down afterwards; with one
(``auto``, ``HOST:PORT`` or ``ray://HOST:10001``) the build joins that cluster. Ray is optional
(``pip install -e ".[ray]"``); nothing else in the project imports this module.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from models.data import Dataset
from models.runtime import Runtime
from models.views import source_key

LOG = logging.getLogger(__name__)

# Items per map_batches call of one actor. Measured on 2 shared cores (2026-12-02; 4,096 scenes at 32 px, views
# L, ab, depth of the tests' resnet10 model, 2 actors, pool start included): 32: 108 items/s, 64: 313, 128: 335,
# 256: 355, 512: 378. Small batches pay Ray's per-batch cost; past 128 each doubling gains ~6% (within the noise
# of shared cores) and costs memory per call at larger image sizes: 256.
DEFAULT_BATCH_SIZE = 256
DEFAULT_WINDOW = 8192  # items the driver reads and hands to Ray Data at a time (bounded driver memory)


def model_files(path: str | Path) -> dict[str, bytes]:
    """Every file of an exported artifact directory (card.json and the ONNX graphs), by name."""
    path = Path(path)
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


class Embedder:
    """One Ray Data actor: writes the model's files to a scratch directory and embeds batches in ``views``."""

    def __init__(self, files_ref: list, views: list[str], threads: int = 1):
        import ray
        files = ray.get(files_ref[0])
        self._dir = tempfile.TemporaryDirectory(prefix="cmc-ray-model-")
        for name, data in files.items():
            (Path(self._dir.name) / name).write_bytes(data)
        self.rt = Runtime(self._dir.name, intra_op_threads=threads)
        self.views = views
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"i": batch["i"], "node": np.array([self.node] * len(batch["i"]))}
        for v in self.views:
            key = source_key(v, self.rt.views[v])
            out[f"vec:{v}"] = self.rt.embed_sources(v, {key: batch[key]})
        return out


def _windows(chunks: Iterable[Dataset], window: int) -> Iterator[list[Dataset]]:
    buf: list[Dataset] = []
    n = 0
    for c in chunks:
        buf.append(c)
        n += len(c)
        if n >= window:
            yield buf
            buf, n = [], 0
    if buf:
        yield buf


def _dataset(win: list[Dataset], keys: list[str], batch_size: int):
    """A window's sources as a Ray Dataset of Arrow blocks of ``batch_size`` rows (tensor columns, no per-row
    Python objects), with each item's position in the window as column ``i``."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray
    src = {k: np.concatenate([c.sources[k] for c in win]) for k in keys}
    n = len(next(iter(src.values())))
    return ray.data.from_arrow([pa.table({"i": pa.array(np.arange(lo, min(lo + batch_size, n))),
                                          **{k: ArrowTensorArray.from_numpy(a[lo:lo + batch_size])
                                             for k, a in src.items()}})
                                for lo in range(0, n, batch_size)])


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` or start a local Ray; returns whether this call started Ray (and so
    should shut it down). An already initialised Ray (a caller's ``ray.init``) is used as it is."""
    import ray
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        start_with_retry(lambda: ray.init(num_cpus=num_cpus or os.cpu_count() or 1,
                                          logging_level=logging.WARNING, include_dashboard=False),
                         ray.shutdown)
    return True


START_TRIES = 3  # a local Ray's raylet has a fixed 30 s to register (ray/_private/node.py); on a loaded machine


STARTUP_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


def start_with_retry(start, stop, tries: int = START_TRIES):
    """``start()``, retried after ``stop()`` when Ray's own startup times out (``STARTUP_TIMEOUTS``: "The current
    node timed out during startup", the raylet did not register with the GCS in Ray's fixed 30 s; "Timed out
    waiting for file .../gcs_server_port_...", the GCS did not write its port in time; both seen on 2 cores under
    load). Any other error, or the last try's, is raised as it is."""
    for attempt in range(1, tries + 1):
        try:
            return start()
        except Exception as e:  # Ray raises a bare Exception / RuntimeError for these
            if not any(m in str(e) for m in STARTUP_TIMEOUTS) or attempt == tries:
                raise
            LOG.warning("Ray's startup timed out (try %d of %d); starting it again", attempt, tries)
            stop()


def embed_chunks(rt: Runtime, chunks: Iterable[Dataset], views: list[str], *, address: str | None = None,
                 num_cpus: int | None = None, actors: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 window: int = DEFAULT_WINDOW, threads: int = 1,
                 nodes: Counter | None = None) -> Iterator[tuple[Dataset, dict[str, np.ndarray]]]:
    """Yield ``(chunk, {view: (n, D) vectors})`` for every chunk, in order, embedded on Ray (the local path's
    ``rt.embed_sources`` per view, in actors). ``actors``: the pool size (default: the cluster's CPUs divided by
    ``threads``, the onnxruntime threads of each actor); ``nodes``, when given, counts the items embedded per
    Ray node id."""
    import ray
    import ray.data

    started = connect(address, num_cpus)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        # The whole pool is up before the first batch goes out, so the work spreads over every actor (and node)
        # rather than going to whichever actor started first.
        ctx.wait_for_min_actors_s = max(ctx.wait_for_min_actors_s, 600)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        pool = actors or max(1, cpus // threads)
        files_ref = [ray.put(model_files(rt.path))]
        keys = {v: source_key(v, rt.views[v]) for v in views}
        LOG.info("ray: %d CPUs, %d actors of %d thread(s), batches of %d", cpus, pool, threads, batch_size)
        for win in _windows(chunks, window):
            ds = _dataset(win, sorted(set(keys.values())), batch_size)
            ds = ds.map_batches(Embedder, fn_constructor_kwargs={"files_ref": files_ref, "views": views,
                                                                   "threads": threads},
                                batch_size=batch_size, batch_format="numpy", num_cpus=threads,
                                compute=ray.data.ActorPoolStrategy(size=min(pool, max(1, -(-sum(map(len, win)) // batch_size))),
                                                                   max_tasks_in_flight_per_actor=2))
            order, node, vec = [], [], {v: [] for v in views}
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                order.append(b["i"])
                node.append(b["node"])
                for v in views:
                    vec[v].append(b[f"vec:{v}"])
            idx = np.argsort(np.concatenate(order), kind="stable")
            full = {v: np.concatenate(vec[v])[idx].astype(np.float32, copy=False) for v in views}
            if nodes is not None:
                nodes.update(np.concatenate(node).tolist())
            lo = 0
            for c in win:
                yield c, {v: full[v][lo:lo + len(c)] for v in views}
                lo += len(c)
    finally:
        if started:
            ray.shutdown()
