"""On-disk IVF views: inverted lists memory-mapped from the committed snapshot file, read-mostly.

A view whose manifest spec says ``"storage": "disk"`` (``IndexStore.create(..., storage="disk")``) is held like
this once it is a trained IVF index (``IVF{nlist},Flat``, ``,SQ8``, ``,PQ{m}``; until then it is the exact Flat
every IVF view starts as, in RAM):

* the **base** is the view's committed snapshot file opened with ``faiss.IO_FLAG_MMAP``: FAISS maps the file's
  inverted lists read-only (``OnDiskInvertedLists``) instead of reading them, so opening costs the coarse
  quantizer only, and the pages a search touches live in the page cache, shared by every process that maps the
  same file (all workers of a server). The file is one the committed manifest names, so it is never modified;
  FAISS aborts the process on ``add`` to read-only lists, so the base is never handed to ``add``/``remove``;
* adds since that snapshot go into the **delta**, an in-memory IVF index with the same coarse quantizer (and PQ
  or SQ tables), made from the base file's own header;
* removes are removed from the delta and recorded as **tombstones**, excluded from base searches with
  ``IDSelectorNot`` (ids are never reused, so a tombstone never hides a later add);
* a search queries the base and the delta with the same ``nprobe`` and merges the two top-k lists: the hits and
  scores equal those of one in-memory IVF index holding the same vectors (same quantizer, same lists probed);
* a snapshot (:meth:`Mapped.write`) writes a NEW file in FAISS's own IVF format, list by list: the base list's
  codes and ids read with ``pread`` from the file (they pass through the page cache, not this process's memory),
  minus tombstones, plus the delta's list. Peak memory is one inverted list, not the view. After the manifest
  names it, every process maps the new file in place of its base and replays the log past its seq into a fresh
  delta (``Loading._follow``), so the delta and the tombstones only hold the writes since the last snapshot.
  The price: each snapshot of an on-disk view rewrites the whole file (sequential disk I/O of its size).

Reopening after any crash maps the committed snapshot and replays the log rows past its seq into the delta, as
for every view, so every acknowledged write is present.

File layout relied on (checked when a file is mapped, and by a test that compares :meth:`Mapped.write` byte for
byte with ``faiss.write_index``): ``<index header with ntotal at bytes 8..16><quantizer, tables> "ilar"
<nlist u64><code_size u64> ("full" <nlist u64><sizes u64 * nlist> | "sprs" <2k u64><(list, size) u64 * k>)``
then, per non-empty list in order, its codes (size * code_size bytes) and ids (size int64).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index import factory as fac
from index.errors import StoreError
from index.recall import merge_topk

STORAGE = ("ram", "disk")
# FAISS's OnDiskInvertedLists starts 32 threads per search to fault in the probed lists; for one query on a warm
# page cache that thread start costs 3-4x the search (measured: 551 against 1633 QPS, IVF1024 200k x 128,
# nprobe 16; in RAM 1984). Off: a cold list is read by the searching thread's page faults instead.
PREFETCH_THREADS = 0
_ILAR = b"ilar"


def can_hold(storage: str, factory: str) -> bool:
    """Whether a view of ``storage`` can hold ``factory``: anything in RAM; on disk only a plain IVF index, whose
    file's inverted lists are mapped (no HNSW, Flat or pre-transform such as an OPQ rotation)."""
    return storage != "disk" or fac.normalize_factory(factory).startswith("IVF")


def check_storage(view: str, storage: Any, factory: str) -> str:
    """The storage of a view (``"ram"`` or ``"disk"``), or a StoreError naming the bad value (``"disk"`` needs
    an IVF factory: only inverted lists can be memory-mapped)."""
    s = "ram" if storage is None else storage
    if s not in STORAGE:
        raise StoreError(f"view {view!r}: unknown storage {storage!r}; expected one of {list(STORAGE)}")
    if not can_hold(s, factory):
        raise StoreError(f"view {view!r}: storage 'disk' needs a plain IVF index factory (IVF{{nlist}},...: its "
                         f"inverted lists are memory-mapped; no HNSW, Flat or OPQ rotation), got {factory!r}")
    return s


def read_index(fp: Path, storage: str) -> faiss.Index:
    """A snapshot file as an index: IVF files of ``disk`` views memory-mapped, everything else read into RAM."""
    if storage == "disk":
        with open(fp, "rb") as f:
            magic = f.read(4)
        if magic[:2] == b"Iw":  # IndexIVF* (IDMap2 wrappers are "IxM2", pre-transforms "IxPT")
            return faiss.read_index(str(fp), faiss.IO_FLAG_MMAP)
    return faiss.read_index(str(fp))


def is_mapped(index: faiss.Index) -> bool:
    """Whether ``index`` is a plain IVF index whose inverted lists are on disk (must never be modified)."""
    if not isinstance(index, faiss.IndexIVF):
        return False
    return isinstance(faiss.downcast_InvertedLists(index.invlists), faiss.OnDiskInvertedLists)


def _lists(ivf: faiss.IndexIVF) -> Any:
    return faiss.downcast_InvertedLists(ivf.invlists)


class Mapped:
    """An on-disk view's base (mapped snapshot file), delta and tombstones; see the module docstring.
    Callers serialize ``add``/``remove`` against ``search``/``write`` (the store's readers-writer lock)."""

    def __init__(self, fp: Path, base: faiss.Index) -> None:
        if not is_mapped(base):
            raise StoreError(f"{fp}: not an IVF index with memory-mapped inverted lists")
        self.file, self.base = Path(fp), base
        faiss.downcast_InvertedLists(base.invlists).prefetch_nthread = PREFETCH_THREADS
        self.nlist, self.code_size = int(base.nlist), int(base.code_size)
        lists = _lists(base)
        self.sizes = np.array([lists.list_size(i) for i in range(self.nlist)], dtype=np.int64)  # (nlist,)
        self.fd = os.open(fp, os.O_RDONLY)  # pread stays valid after a newer snapshot deletes the file
        try:
            size = os.fstat(self.fd).st_size
            data = size - int(self.sizes.sum()) * (self.code_size + 8)
            rec = (self.sizes * (self.code_size + 8)).cumsum()
            self.offsets = data + np.concatenate([[0], rec[:-1]]).astype(np.int64)  # (nlist,) byte offsets
            nonzero = int((self.sizes > 0).sum())
            n_vec = self.nlist if nonzero > self.nlist // 2 else 2 * nonzero  # "full" or "sprs" (FAISS's rule)
            head_len = data - (4 + 8 + 8 + 4 + 8 + 8 * n_vec)
            self.head = os.pread(self.fd, head_len, 0) if head_len > 16 else b""
            if os.pread(self.fd, 4, max(head_len, 0)) != _ILAR or len(self.head) != head_len:
                raise StoreError(f"{fp}: unexpected IVF file layout (no inverted lists where expected)")
            empty = _ILAR + struct.pack("<QQ", self.nlist, self.code_size) + b"sprs" + struct.pack("<Q", 0)
            self.delta = faiss.deserialize_index(np.frombuffer(self.head + empty, dtype=np.uint8))
            self.delta.ntotal = 0
        except BaseException:
            os.close(self.fd)
            raise
        self.tomb: set[int] = set()
        self._sel: tuple[Any, Any] | None = None
        self.base_removed = 0  # tombstones that hide a base vector (the others were removed from the delta)

    def __del__(self) -> None:
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            os.close(fd)

    @property
    def count(self) -> int:
        return int(self.base.ntotal) - self.base_removed + int(self.delta.ntotal)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.delta.add_with_ids(x, ids)  # never the base: its lists are read-only

    def remove(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        from_delta = int(self.delta.remove_ids(ids)) if self.delta.ntotal else 0
        self.base_removed += len(ids) - from_delta
        self.tomb = self.tomb | set(ids.tolist())  # replaced, never changed in place (searches hold the old one)
        batch = faiss.IDSelectorBatch(np.fromiter(self.tomb, dtype=np.int64, count=len(self.tomb)))
        self._sel = (faiss.IDSelectorNot(batch), batch)  # keep `batch` alive

    def search(self, xq: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of base (minus tombstones) and delta, merged: D (nq, k), I (nq, k), -1 padded."""
        sel = self._sel[0] if self._sel else None
        D, I = self.base.search(xq, k, params=fac.search_params(self.base, nprobe=nprobe, sel=sel))
        if not self.delta.ntotal:
            return D, I
        Dd, Id = self.delta.search(xq, k, params=fac.search_params(self.delta, nprobe=nprobe))
        metric = "ip" if self.base.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
        return merge_topk(D, I, Dd, Id, k, metric)

    def write(self, fp: Path) -> int:
        """Write base minus tombstones plus delta as a new FAISS IVF file at ``fp`` (a new name), one inverted
        list at a time; returns the vectors written. Reads the base with ``pread`` (page cache, not RSS)."""
        cs, dl = self.code_size, _lists(self.delta)
        gone = np.fromiter(self.tomb, dtype=np.int64, count=len(self.tomb))
        sizes = np.zeros(self.nlist, dtype=np.int64)
        lists_at = len(self.head) + 4 + 8 + 8 + 4 + 8
        with open(fp, "wb") as f:
            f.write(self.head)
            f.write(_ILAR + struct.pack("<QQ", self.nlist, cs) + b"full" + struct.pack("<Q", self.nlist))
            f.write(sizes.tobytes())  # rewritten below
            for i in range(self.nlist):
                codes, ids = [], []
                n = int(self.sizes[i])
                if n:
                    buf = os.pread(self.fd, n * (cs + 8), int(self.offsets[i]))
                    if len(buf) != n * (cs + 8):
                        raise OSError(f"{self.file}: short read of inverted list {i}")
                    c = np.frombuffer(buf, dtype=np.uint8, count=n * cs).reshape(n, cs)
                    d = np.frombuffer(buf, dtype=np.int64, offset=n * cs)
                    if gone.size:
                        keep = ~np.isin(d, gone)
                        c, d = c[keep], d[keep]
                    codes.append(c)
                    ids.append(d)
                m = int(dl.list_size(i))
                if m:
                    codes.append(faiss.rev_swig_ptr(dl.get_codes(i), m * cs).reshape(m, cs).copy())
                    ids.append(faiss.rev_swig_ptr(dl.get_ids(i), m).copy())
                for c in codes:
                    f.write(memoryview(np.ascontiguousarray(c)))
                for d in ids:
                    f.write(memoryview(np.ascontiguousarray(d)))
                sizes[i] = sum(len(d) for d in ids)
            total = int(sizes.sum())
            f.seek(lists_at)
            f.write(sizes.tobytes())
            f.seek(8)
            f.write(struct.pack("<q", total))  # the index header's ntotal
        if total != self.count:
            raise StoreError(f"{fp}: wrote {total} vectors, the view holds {self.count}")
        return total
