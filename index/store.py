"""One index directory: a collection of items, each embedded in one or more views, shared by processes.

Layout of the directory::

    manifest.json              the commit point of snapshots: model_ref, fingerprint, format_version, and per
                               view: dim, metric, factory, count, search_params, pending_training, builds,
                               snapshot {file, sha256, seq, build}, previous {file, sha256, seq, build}
    <view>.<seq>.<tok>.faiss   snapshot files (FAISS binary format); only those the manifest names are kept
    meta.sqlite                items(id, key UNIQUE, metadata, views), wal(seq, op, payload), state(name, value)
    LOCK                       flock'ed by the process writing a snapshot; holds its pid
    BUILD                      flock'ed by the one process training or rebuilding a view's index; holds its pid

Writes (``writes.py``, ``journal.py``). ``add``/``remove`` run ONE SQLite transaction (``BEGIN IMMEDIATE``,
journal_mode=WAL, synchronous=FULL, busy_timeout): check keys (UNIQUE -> :class:`DuplicateKeyError`, in any
process), allocate ids from ``state.next_id``, insert/delete the item rows and one ``wal`` row whose payload
(``.npz``) holds the ids and float32 vectors per view. Inside that transaction, under this process's writer
lock, the in-memory FAISS views first apply every committed row they have not seen (other processes' writes),
then this row; only then is the transaction committed (still under the writer lock, so no search here sees
an uncommitted vector) and the call returns. If applying or the COMMIT raises (an exception in FAISS, disk
full, SQLite busy past the timeout), the transaction is rolled back (the key stays absent and can be added
again), the call raises :class:`WriteFailed` (a :class:`NotWritableError`, served as 503), and the in-memory
views are marked dirty and rebuilt from snapshot + log before the next search, write or snapshot (a snapshot
checks the flag under the read lock it copies the views with, so it never persists a rolled-back vector whose
id the next add hands out again). The applied seq only ever advances past rows that were applied. An
acknowledged write is therefore durable (in SQLite) and searchable in this process; SQLite (not a directory
lock) arbitrates writers, so any number of processes may open the directory for writing.

Following. Every process (writers and ``readonly=True`` tools) follows the committed log: a search first
compares the last committed seq (``sqlite_sequence``, a cheap query) with its applied seq and applies the
missing rows; a follower thread does the same every ``follow_interval`` s, so a row committed by any process
is searchable in every process at once on its next search and within about 0.2 s otherwise. Seqs are
committed in increasing order without holes; if rows a follower needs were pruned, it reloads from the
committed snapshot (see below) instead. The same calls follow the manifest (a ``stat`` when nothing changed):
when a view's committed snapshot holds another index structure than this process's (its ``build``, see
below), the process reads that file with no store lock held, replays the log past its seq into it and swaps
it in under the writer lock.

Snapshots (``snapshots.py``) run on the background thread (or on explicit :meth:`snapshot`), in one process at
a time (the flock'ed ``LOCK``; an error naming it says the holder's pid). The writer writes every view straight
to a NEW file (``faiss.write_index``, no in-memory copy: a snapshot needs no second view's worth of memory) under
the read lock (searches continue; writes wait for the disk write), then, with no store lock held, fsyncs and
hashes the files by streaming them and atomically replaces ``manifest.json``: the new
manifest names the new files as current and the old current ones as previous (except a current file found
corrupt: that view keeps its previous snapshot). A snapshot first loads any structure another process
committed, so it never writes an older one over it. A file the committed manifest names is never moved or
overwritten; files no manifest names are deleted afterwards; log rows are deleted only
once both named snapshots cover them (seq <= the previous snapshot's seq). A snapshot that fails (disk full,
any ``OSError``) leaves the committed state as it was, is logged and retried later with back-off; the writes
it would have covered are already durable and acknowledged.

Opening loads, per view, the manifest's current snapshot (checked by sha256) and replays log rows with a
larger seq. If it is missing or corrupt, ``open`` raises :class:`StoreError` naming the file;
``open(..., recover=True)`` loads the previous snapshot instead and replays the log from its seq, then
writes a fresh snapshot whose previous one is the snapshot it loaded (not the corrupt file), so the log is
kept back to a readable snapshot and a second fault is recoverable too. The result equals the last
acknowledged state, whatever the point at which a process was killed.

Index types (``factory.py``, ``viewindex.py``): Flat/HNSW views are ``IndexIDMap2``, IVF views take ids
natively; HNSW removals are tombstones. An IVF view with ``storage: disk`` (``ondisk.py``) memory-maps its
committed snapshot file read-only and holds the writes since then in an in-memory delta and tombstones; each
snapshot writes a merged new file list by list and every process maps it in place of the old one. IVF/PQ views stay an exact Flat until ``train_threshold`` vectors
arrived; HNSW views past ``TOMBSTONE_REBUILD`` tombstones are rebuilt. Either build happens ONCE per index
(``maintenance.py``): the process whose background thread (or explicit :meth:`snapshot`) takes the ``BUILD``
flock builds from a copy with no store lock held (searches and writes go on), replays the log rows that
arrived meanwhile into it and, under the snapshot lock, commits it as that view's snapshot, numbered by the
view's ``builds`` counter; other processes skip the build while the flock is held, and one that takes it
afterwards finds the new build in the manifest and loads it instead of building. Every process, the builder
too, then loads that snapshot and replays the log past it (see Following), so all processes hold the same
index from the same file and return identical hits and scores for a query (within about ``follow_interval``
of the commit; until then a process answers from its previous structure). HNSW graphs built by adds after a
snapshot still depend on the order of adds since the process loaded it (FAISS draws HNSW levels from a
per-index generator that is not saved), so two processes that loaded different snapshots may differ on HNSW
views; IVF adds are deterministic. Only past ``TOMBSTONE_INLINE`` (no background thread, or one far behind)
does a remove rebuild inline, in every process at the same log row.

Concurrency in a process: a readers-writer lock over the in-memory views (searches in parallel, never a
half-applied write); one writing thread at a time; separate SQLite connections for writes and for reads.
``close()`` stops the thread, snapshots if needed, waits for searches and lookups in flight, then closes the
database; later calls raise :class:`NotWritableError`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable

import faiss
import numpy as np

from index import factory as fac
from index import manifest as mf
from index import ondisk
from index.durable import _RWLock
from index.errors import (DuplicateKeyError, NotWritableError, StoreError, UnknownKeyError,  # noqa: F401 - re-exported
                          WriteFailed)
from index.inputs import check_vectors
from index.recall import overlap, without_own
from index.journal import Journal
from index.loading import Loading
from index.maintenance import Maintenance, Schedule
from index.writes import Writes
from index.viewindex import TOMBSTONE_REBUILD, _View  # noqa: F401 - re-exported

SEARCH_RETRIES = 5  # search_items: searches again when a hit was removed by another process meanwhile

LOG = logging.getLogger(__name__)

_VIEW_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class IndexStore(Writes, Loading, Maintenance):
    """See the module docstring. Construct with :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, readonly: bool = False, snapshot_ops: int = 1000,
                 snapshot_seconds: float = 300.0, follow: bool = True, follow_interval: float = 0.2) -> None:
        self.path, self.readonly = path, readonly
        self.snapshot_ops, self.snapshot_seconds = snapshot_ops, snapshot_seconds
        self.follow_interval = follow_interval
        self._follow_on = follow
        self._rw, self._wmutex = _RWLock(), threading.RLock()
        self._snap_mutex, self._train_mutex = threading.Lock(), threading.Lock()
        self._journal: Journal | None = None
        self._manifest: dict[str, Any] = {}
        self._views: dict[str, _View] = {}
        self._applied = 0  # every log row with seq <= this is applied to self._views, and no other
        self._dirty = False  # the views may differ from snapshot + log: reload before use
        self._closed = False
        self._schedule = Schedule()  # when snapshots and builds run next: Maintenance's alone
        self._params_dirty: set[str] = set()
        self._follow_mutex = threading.RLock()  # one thread at a time loads structures other processes committed
        self._manifest_key: tuple | None = None  # stat of the manifest last followed
        self._bad: set[tuple] = set()  # snapshot entries whose file is corrupt: never loaded, never kept as previous
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._budget_mb: float | None = None  # overrides the manifest's memory_budget_mb when re-choosing views
        self._retype_skip: dict[str, int] = {}  # view -> count below which it is not re-chosen again

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, path: str | os.PathLike, *, views: dict[str, int], fingerprint: str, model_ref: str,
               factory: str | dict[str, str] | None = None, n_hint: int = 0, memory_budget_mb: int = 2048,
               metric: str = "ip", storage: str | dict[str, str] | None = None,
               trained: dict[str, faiss.Index] | None = None, choice: dict[str, dict[str, Any]] | None = None,
               **open_kw: Any) -> "IndexStore":
        """Create an empty index directory (``path`` must not hold an index) and open it for writing.

        ``factory=None`` chooses per view with ``choose_factory(n_hint, dim, memory_budget_mb / len(views))``.
        ``storage`` ("ram" or "disk", or per view): "disk" memory-maps an IVF view's lists (``index/ondisk.py``).
        ``trained[view]``: an empty, trained index of the view's factory (``index.choose.choose_trained``), used
        from the start instead of an exact Flat until enough vectors arrived to train; ``choice[view]``: how the
        factory was chosen, recorded in the manifest (the static choice's when the factory was chosen here).
        """
        p = Path(path)
        if mf.exists(p):
            raise StoreError(f"an index already exists at {p}")
        if not views:
            raise StoreError("an index needs at least one view")
        if metric not in fac.METRICS:
            raise StoreError(f"unknown metric {metric!r}; expected one of {sorted(fac.METRICS)}")
        if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) or not memory_budget_mb > 0:
            raise StoreError(f"memory_budget_mb must be a positive number of MiB, got {memory_budget_mb!r}")
        specs: dict[str, dict[str, Any]] = {}
        for name, dim in views.items():
            if not _VIEW_NAME.match(str(name)):
                raise StoreError(f"invalid view name {name!r}")
            if not isinstance(dim, (int, np.integer)) or dim <= 0:
                raise StoreError(f"view {name!r}: dim must be a positive int, got {dim!r}")
            f = factory.get(name) if isinstance(factory, dict) else factory
            why = (choice or {}).get(name)
            if not f:
                why = fac.static_choice(n_hint, int(dim), memory_budget_mb / len(views))
                why.pop("kind", None)
                f = why["factory"]
            try:
                empty = fac.make_index(f, int(dim), metric)
            except Exception as e:  # faiss raises RuntimeError on a bad factory string
                raise StoreError(f"view {name!r}: invalid index factory {f!r}: {e}") from e
            st = ondisk.check_storage(name, storage.get(name) if isinstance(storage, dict) else storage, f)
            t = (trained or {}).get(name)
            if t is not None and (not t.is_trained or t.ntotal or t.d != int(dim) or t.metric_type != empty.metric_type
                                  or type(fac.base_of(t)) is not type(fac.base_of(empty))):
                raise StoreError(f"view {name!r}: the trained index given is not an empty, trained {f!r} of dim {dim}")
            specs[name] = mf.view_entry(name, int(dim), metric, fac.normalize_factory(f), st)
            if why:
                specs[name]["choice"] = why
        p.mkdir(parents=True, exist_ok=True)
        store = cls(p, False, **open_kw)
        try:
            store._journal = Journal(p, False)
            store._manifest = mf.new_manifest(model_ref, fingerprint, specs, n_hint, memory_budget_mb)
            store._views = {n: _View(n, s) for n, s in specs.items()}
            for n, v in store._views.items():
                if (trained or {}).get(n) is not None:
                    v.index = trained[n]
                v.refresh_state()
            store._snapshot(timeout=30.0, initial=True)
        except BaseException:
            store.close(snapshot=False)
            raise
        store._start()
        LOG.info("created index at %s: %s", p, {n: s["factory"] for n, s in specs.items()})
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, *, fingerprint: str | None = None, readonly: bool = False,
             recover: bool = False, snapshot_ops: int = 1000, snapshot_seconds: float = 300.0,
             follow: bool = True, follow_interval: float = 0.2,
             memory_budget_mb: float | None = None) -> "IndexStore":
        """Open an index directory (any number of processes at once; see the module docstring).

        ``recover=True`` falls back to the previous snapshot of a missing or corrupt file; ``follow`` runs the
        background thread (follow other processes' writes, snapshots, IVF training) in writable stores;
        ``memory_budget_mb`` (all views together) replaces the manifest's budget when this process re-chooses a
        view that outgrew its type or its budget (``index.factory.retype_due``)."""
        p = Path(path)
        if memory_budget_mb is not None and (isinstance(memory_budget_mb, bool)
                                             or not isinstance(memory_budget_mb, (int, float)) or not memory_budget_mb > 0):
            raise StoreError(f"memory_budget_mb must be a positive number of MiB, got {memory_budget_mb!r}")
        try:
            manifest = mf.read_manifest(p)
        except FileNotFoundError as e:
            raise StoreError(str(e)) from None
        except (OSError, ValueError) as e:
            raise StoreError(f"manifest {p / mf.MANIFEST} is unreadable: {e}") from e
        if fingerprint is not None and fingerprint != manifest["fingerprint"]:
            raise StoreError(f"index at {p} was built with model space {manifest['fingerprint']}, this model is "
                             f"{fingerprint}; rebuild the index with this model")
        store = cls(p, readonly, snapshot_ops, snapshot_seconds, follow, follow_interval)
        store._budget_mb = memory_budget_mb
        try:
            try:
                store._journal = Journal(p, readonly)
            except sqlite3.Error as e:
                raise StoreError(f"cannot open {p / 'meta.sqlite'}: {e}") from e
            with store._rw.write():
                recovered = store._load_current(recover, manifest)
            if recovered and not readonly:
                store._snapshot(timeout=60.0, force=True)
        except BaseException:
            store.close(snapshot=False)
            raise
        store._start()
        return store

    def close(self, snapshot: bool = True) -> None:
        """Stop the background thread, snapshot if anything changed (best effort: the log is durable), wait
        for searches and lookups in flight, then close the database. Later calls raise NotWritableError."""
        with self._wmutex:
            if self._closed:
                return
            self._stop.set()
            self._wake.set()
            if self._thread is not None:
                self._thread.join(timeout=120)
            if (snapshot and not self.readonly and self._journal is not None and not self._dirty
                    and self._applied > mf.manifest_seq(self._manifest)):
                try:
                    self._snapshot(timeout=5.0)
                except Exception as e:  # noqa: BLE001 - the log holds every acknowledged write
                    LOG.warning("index %s: no snapshot at close (%s); the log keeps every write", self.path, e)
            with self._rw.write():
                self._closed = True
            if self._journal is not None:
                self._journal.close()

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ reads
    def search(self, xq: np.ndarray, view: str, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query: D (nq, k) float32 scores, I (nq, k) int64 ids, -1 padded."""
        self._refresh()
        with self._rw.read():
            return self._search(xq, view, k, nprobe, ef_search)

    def _search(self, xq: Any, view: str, k: int, nprobe: int | None,
                ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        if self._closed:
            raise NotWritableError("index is closed")
        xq = check_vectors(xq, view, self._views, None)  # (nq, dim)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise StoreError(f"k must be a positive int, got {k!r}")
        v = self._views[view]
        D, I = v.search(xq, int(k), nprobe or v.params.get("nprobe"), ef_search or v.params.get("ef_search"))
        return D.astype(np.float32, copy=False), I.astype(np.int64, copy=False)

    def _read(self, fn: Any) -> Any:
        jr = self._journal
        if jr is None:
            raise NotWritableError("index is closed")
        with jr.read_lock:
            if jr.closed:
                raise NotWritableError("index is closed")
            return fn(jr.read)

    def lookup(self, ids: Iterable[int]) -> list[dict | None]:
        """``[{'id', 'key', 'metadata'}]`` per id (None for -1 or unknown ids)."""
        ids = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel()]
        want = sorted({i for i in ids if i >= 0})
        found = self._read(lambda conn: Journal.items_by_id(conn, want))
        return [found.get(i) for i in ids]

    def ids_of(self, keys: list[str]) -> list[int | None]:
        """The id of each key (None if absent)."""
        rows = self._read(lambda conn: Journal.rows_for(conn, list(keys)))
        return [rows[k][0] if k in rows else None for k in keys]

    def search_items(self, xq: np.ndarray, view: str, k: int, **kw: Any) -> list[list[dict]]:
        """Per query ``[{'id', 'key', 'score', 'metadata'}]``. The views are searched as of the last log row
        this process applied, the items are read from SQLite as of now: when another process removed a hit in
        between, its row is gone, so the search catches up and runs again (up to ``SEARCH_RETRIES`` times)
        rather than answer fewer than ``k`` items."""
        for _ in range(SEARCH_RETRIES):
            self._refresh()
            with self._rw.read():
                D, I = self._search(xq, view, k, kw.get("nprobe"), kw.get("ef_search"))
                items = self.lookup(I.ravel())
            if all(it is not None or i < 0 for it, i in zip(items, I.ravel().tolist())):
                break
            LOG.debug("index %s: a hit was removed by another process during the search; searching again", self.path)
        out: list[list[dict]] = []
        for qi in range(I.shape[0]):
            row = []
            for j in range(I.shape[1]):
                it = items[qi * I.shape[1] + j]
                if it is not None:
                    row.append({**it, "score": float(D[qi, j])})
            out.append(row)
        return out

    def tune_search(self, view: str, xq: np.ndarray, gt_I: np.ndarray, *, k: int = 10,
                    target_recall: float = 0.95, exclude: np.ndarray | None = None) -> dict[str, Any]:
        """Smallest nprobe / efSearch reaching ``target_recall`` @k against exact ids ``gt_I`` (nq, >=k);
        stored as the view's default (persisted at the next snapshot). Trains a due IVF view (rebuilds a due HNSW view) first.
        ``exclude`` (nq,): an id dropped from each query's answers, the query's own item when the queries are
        stored items (leave-one-out; ``gt_I`` must leave it out too): an item finds itself in its own inverted list
        at any nprobe, so self-queries would tune for a recall that held-out queries do not get."""
        self._views_due()
        v = self._views[view]
        if fac.is_hnsw(v.index):
            name, grid = "ef_search", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
        elif fac.is_ivf(v.index):
            nlist = faiss.try_extract_index_ivf(fac.base_of(v.index)).nlist
            name, grid = "nprobe", [p for p in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384,
                                                 512, 768, 1024) if p < nlist] + [nlist]
        else:
            return {"recall": 1.0}
        best: dict[str, Any] = {}
        for val in grid:
            if exclude is None:
                _, I = self.search(xq, view, k, **{name: val})
            else:
                _, I = self.search(xq, view, k + 1, **{name: val})
                I = without_own(I, np.asarray(exclude), k)
            rec = overlap(I, np.asarray(gt_I), k)
            best = {name: val, "recall": rec}
            if rec >= target_recall:
                break
        with self._wmutex:
            v.params = {name: best[name]}
            self._params_dirty.add(view)
            mf.set_search_params(self._manifest, view, v.params)
        LOG.info("view %s: tuned %s", view, best)
        return best

    # ------------------------------------------------------------------ info
    def _counts(self) -> dict[str, int]:
        return {n: v.count for n, v in self._views.items()}

    def count(self, view: str | None = None) -> int | dict[str, int]:
        """Live vectors in ``view``, or a dict for all views."""
        self._refresh()
        with self._rw.read():
            if view is None:
                return self._counts()
            if view not in self._views:
                raise StoreError(f"unknown view {view!r}; this index has views {sorted(self._views)}")
            return self._views[view].count

    def __len__(self) -> int:
        return self._read(Journal.count_items)

    @property
    def applied_seq(self) -> int:
        """The last log row applied to this process's in-memory views."""
        return self._applied

    @property
    def views(self) -> dict[str, int]:
        return {n: v.dim for n, v in self._views.items()}

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    def index_types(self) -> dict[str, str]:
        """Per view, the class of its live FAISS index (for /info; the Milvus backend names its index type), with
        " on disk (mmap)" for an on-disk view whose inverted lists are memory-mapped (``index/ondisk.py``)."""
        return {n: type(v.index).__name__ + (" on disk (mmap)" if v.disk is not None else "")
                for n, v in self._views.items()}

    def index_of(self, view: str) -> faiss.Index:
        """The live FAISS index of a view (read-only use; for benchmarks and inspection)."""
        return self._views[view].index

