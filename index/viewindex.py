"""One view's mutable FAISS index: ids, HNSW tombstones and rebuilds, the IVF/PQ training switch.

Flat/HNSW views are ``IndexIDMap2``; IVF views take ids natively. HNSW cannot remove: removed ids become
tombstones excluded at search time with ``IDSelectorNot``. Past ``TOMBSTONE_REBUILD`` of the view the store's
background thread rebuilds a copy without them off the request path (:func:`rebuilt_copy`), once per index,
and every process loads the result from its snapshot; only past ``TOMBSTONE_INLINE`` (a store without that
thread, or one far behind) does the remove rebuild inline (in every process, at the same log row). IVF/PQ views
stay an exact Flat until enough vectors arrived to train on; the store then trains a copy off the request path
(:func:`trained_copy`), once per index, in the same way.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

import faiss
import numpy as np

from index import factory as fac
from index import ondisk
from index.choose import choose_trained, sample_size

LOG = logging.getLogger(__name__)
TOMBSTONE_REBUILD = 0.2  # background rebuild of an HNSW view past this fraction of tombstones
TOMBSTONE_INLINE = 0.5  # ... and inline, in the remove, past this one


class _View:
    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        self.name, self.dim, self.metric = name, int(spec["dim"]), spec.get("metric", "ip")
        self.factory = fac.normalize_factory(spec["factory"])
        self.params: dict[str, int] = dict(spec.get("search_params") or {})
        self.index: faiss.Index = fac.make_index(self.factory, self.dim, self.metric)
        if not self.index.is_trained:  # exact Flat until there is enough data to train on
            self.index = fac.make_index("Flat", self.dim, self.metric)
        self.loaded_seq = 0
        self.build = 0  # the committed structure this index holds: its snapshot entry's ``build``
        self.tomb: set[int] = set()
        self._sel: tuple[Any, Any] | None = None
        self.pending = False
        self.storage = ondisk.check_storage(name, spec.get("storage"), self.factory)
        self.disk: ondisk.Mapped | None = None  # an on-disk view's mapped base, delta and tombstones

    def set_index(self, index: faiss.Index, fp: Path | None = None) -> None:
        """Hold ``index``, read from the snapshot file ``fp``: a memory-mapped IVF index (an on-disk view) is
        wrapped so that it is never modified (``index/ondisk.py``)."""
        self.index = index
        self.disk = ondisk.Mapped(fp, index) if fp is not None and ondisk.is_mapped(index) else None

    def maps(self, snap: dict[str, Any]) -> bool:
        """Whether this on-disk view maps another file than the committed snapshot entry ``snap`` names."""
        return self.disk is not None and self.disk.file.name != snap.get("file")

    def search(self, xq: np.ndarray, k: int, nprobe: int | None,
               ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        if self.disk is not None:
            return self.disk.search(xq, k, nprobe)
        params = fac.search_params(self.index, nprobe=nprobe, ef_search=ef_search, sel=self.sel)
        return self.index.search(xq, k, params=params)

    def write(self, fp: Path) -> None:
        """Write this view to the new snapshot file ``fp`` with no copy in memory (caller holds the read lock)."""
        if self.disk is not None:
            self.disk.write(fp)
        else:
            faiss.write_index(self.index, str(fp))

    def refresh_state(self) -> None:
        self.pending = (fac.needs_training(self.factory, self.dim, self.metric)
                        and isinstance(fac.base_of(self.index), faiss.IndexFlat))
        if self.pending:
            self.threshold = fac.train_threshold(self.factory, self.dim, self.metric)
        self.set_tomb(self.tomb)

    def set_tomb(self, tomb: set[int]) -> None:
        self.tomb = tomb
        if tomb:
            batch = faiss.IDSelectorBatch(np.fromiter(tomb, dtype=np.int64, count=len(tomb)))
            self._sel = (faiss.IDSelectorNot(batch), batch)  # keep `batch` alive
        else:
            self._sel = None

    @property
    def sel(self) -> faiss.IDSelector | None:
        return self._sel[0] if self._sel else None

    @property
    def count(self) -> int:
        if self.disk is not None:
            return self.disk.count
        return int(self.index.ntotal) - len(self.tomb)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    @property
    def due_for_training(self) -> bool:
        return self.pending and self.index.ntotal >= self.threshold

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        if self.disk is not None:
            self.disk.add(ids, x)  # the delta: the mapped lists are read-only (FAISS aborts on a write)
            return
        self.index.add_with_ids(x, ids)

    def retype_reason(self, memory_budget_mb: float) -> str | None:
        """Why this view must be re-chosen within ``memory_budget_mb`` (``factory.retype_due``), or None (a view
        waiting for training, an on-disk or a compressed one is never re-chosen)."""
        if self.pending or self.disk is not None or self.tomb:
            return None
        return fac.retype_due(self.factory, self.count, self.dim, memory_budget_mb)

    @property
    def due_for_rebuild(self) -> bool:
        return fac.is_hnsw(self.index) and len(self.tomb) > TOMBSTONE_REBUILD * max(self.index.ntotal, 1)

    def remove(self, ids: np.ndarray) -> None:
        if self.disk is not None:
            self.disk.remove(ids)
            return
        if fac.is_hnsw(self.index):
            self.set_tomb(self.tomb | set(ids.tolist()))
            if len(self.tomb) > TOMBSTONE_INLINE * max(self.index.ntotal, 1):
                self.rebuild()
        else:
            self.index.remove_ids(ids)

    def _chunks(self, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from _chunks(self.index, chunk)

    def rebuild(self) -> None:
        """Rebuild without tombstoned ids (HNSW), in place."""
        self.index = rebuilt_copy(self.name, self.factory, self.dim, self.metric, self.index, self.tomb)
        self.set_tomb(set())


def rebuilt_copy(name: str, factory: str, dim: int, metric: str, index: faiss.Index, dead: set[int]) -> faiss.Index:
    """A new index of ``factory`` holding ``index``'s vectors except the ids in ``dead`` (reads ``index``
    only: the store hands it a copy to build from with no lock held)."""
    new = fac.make_index(factory, dim, metric)
    gone = np.fromiter(dead, dtype=np.int64, count=len(dead))
    for ids, x in _chunks(index):
        keep = ~np.isin(ids, gone)
        if keep.any():
            new.add_with_ids(np.ascontiguousarray(x[keep]), ids[keep])
    LOG.info("view %s: rebuilt without %d tombstones (%d live)", name, len(gone), new.ntotal)
    return new


def _chunks(index: faiss.Index, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, vectors)`` of every item of an IDMap2 index, or of an IVF-Flat one (list by list)."""
    if fac.is_ivf(index):
        yield from _ivf_flat_lists(index)
        return
    base, ids = fac.base_of(index), faiss.vector_to_array(index.id_map).astype(np.int64)
    for s in range(0, len(ids), chunk):
        e = min(s + chunk, len(ids))
        yield ids[s:e], base.reconstruct_n(s, e - s)  # (e - s,), (e - s, dim)


def trained_copy(name: str, factory: str, metric: str, flat: faiss.Index) -> faiss.Index:
    """A trained ``factory`` index holding every vector of ``flat`` (an IDMap2,Flat), built without touching
    any live index (so it runs without the store's locks)."""
    dim, n = flat.d, int(flat.ntotal)
    size = min(n, fac.train_sample_size(factory, dim, metric))
    pos = np.sort(np.random.default_rng(0).choice(n, size=size, replace=False))
    sample = fac.base_of(flat).reconstruct_batch(pos)  # (size, dim)
    new = fac.make_index(factory, dim, metric)
    t0 = time.perf_counter()
    new.train(sample)
    for ids, x in _chunks(flat):
        new.add_with_ids(x, ids)
    LOG.info("view %s: trained %s on %d of %d vectors in %.1fs", name, factory, size, n, time.perf_counter() - t0)
    return new


def _ivf_flat_lists(index: faiss.Index) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, vectors)`` of an in-RAM IVF-Flat index, one non-empty inverted list at a time (its codes are the
    raw float32 vectors)."""
    ivf = faiss.extract_index_ivf(index)
    if not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat):
        raise TypeError(f"{type(ivf).__name__} does not hold raw vectors")
    inv = ivf.invlists
    for lno in range(ivf.nlist):
        n = inv.list_size(lno)
        if n == 0:
            continue
        ids = faiss.rev_swig_ptr(inv.get_ids(lno), n).astype(np.int64)  # copies: the list may be freed later
        codes = faiss.rev_swig_ptr(inv.get_codes(lno), n * ivf.code_size)
        yield ids, np.frombuffer(codes.tobytes(), dtype=np.float32).reshape(n, ivf.d)


def retyped_copy(name: str, factory: str, metric: str, raw: faiss.Index, memory_budget_mb: float,
                 reason: str, storage: str = "ram") -> tuple[dict[str, Any], faiss.Index]:
    """``(choice, index)``: the type :func:`index.choose.choose_trained` picks for ``RETYPE_HEADROOM`` times the
    items of ``raw`` (the view's index of type ``factory``: an IDMap2,Flat or IVF-Flat, raw vectors) within ``memory_budget_mb``, measured on a
    sample of them, holding every vector of ``raw``; built without touching any live index (no store lock).
    ``storage``: the view's, which bounds what it may become (``ondisk.can_hold``)."""
    dim, n = raw.d, int(raw.ntotal)
    n_for = n * fac.RETYPE_HEADROOM
    static = fac.static_choice(n_for, dim, memory_budget_mb)
    want = min(n, sample_size(static["factory"], n_for, dim, memory_budget_mb, metric))  # as index.build samples
    pos = np.sort(np.random.default_rng(0).choice(n, size=want, replace=False))
    sample, seen = [], 0
    for ids, x in _chunks(raw):  # the sample in the order the items are held (one pass, no id lookups)
        lo, hi = np.searchsorted(pos, [seen, seen + len(ids)])
        if hi > lo:
            sample.append(x[pos[lo:hi] - seen])
        seen += len(ids)
    t0 = time.perf_counter()
    choice, new = choose_trained(np.concatenate(sample) if sample else None, n_for, dim, memory_budget_mb, metric,
                                 storage=storage)
    if new is None:
        new = fac.make_index(choice["factory"], dim, metric)
    for ids, x in _chunks(raw):
        new.add_with_ids(np.ascontiguousarray(x), ids)
    choice = choice | {"retyped_from": fac.normalize_factory(factory), "retype_reason": reason,
                       "retyped_at_count": n, "chosen_for_count": n_for}
    LOG.info("view %s: re-chosen as %s at %d items (%s) in %.1fs", name, choice["factory"], n, reason,
             time.perf_counter() - t0)
    return choice, new
