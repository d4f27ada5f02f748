"""One index directory: a collection of items, each embedded in one or more views.

Layout of the directory::

    manifest.json      model_ref, fingerprint, format_version, created/updated, and per view:
                       dim, metric, factory, count, file, snapshot {sha256, seq}, previous {sha256, seq},
                       search_params (default nprobe / ef_search), pending_training
    <view>.faiss       the latest snapshot of the view's index (FAISS binary format)
    <view>.faiss.prev  the snapshot before it (fallback)
    meta.sqlite        items(id, key UNIQUE, metadata JSON, views JSON), wal(seq, op, payload), state(name, value)
    LOCK               flock'ed exclusively by the one process that has the directory open for writing

Durability. ``add``/``remove`` commit, in ONE SQLite transaction (journal_mode=WAL, synchronous=FULL),
the item rows and a ``wal`` row whose payload (an ``.npz``) holds the ids and float32 vectors per view;
only then is the in-memory FAISS index changed and the call returns. ``snapshot()`` writes every view to
``<view>.faiss.tmp`` (fsync), rotates ``<view>.faiss`` to ``<view>.faiss.prev``, renames the tmp in place,
fsyncs the directory, then atomically replaces ``manifest.json`` - **the manifest is the commit point**: it
records the sha256 and WAL seq of the current and the previous snapshot of each view. WAL rows are deleted
only once two snapshots cover them (seq <= the previous snapshot's seq), so either snapshot can be replayed.

Opening loads, per view, the file whose sha256 matches the manifest's current snapshot (under either file
name: a crash in the middle of a snapshot leaves it as ``.faiss.prev``), then replays WAL rows with a larger
seq. If the current snapshot is missing, truncated or corrupt, ``open`` raises :class:`StoreError` naming the
file; ``open(..., recover=True)`` instead loads the previous snapshot (with a warning), replays the WAL from
its seq, and (when writable) writes a fresh snapshot. The result equals the last acknowledged state.

Index types (see ``factory.py``): Flat/HNSW views are ``IndexIDMap2``, IVF views take ids natively; Flat and
IVF remove ids directly. HNSW
cannot remove: removed ids become tombstones, excluded at search time with an ``IDSelectorNot`` (so
``k`` results are still returned), and the view is rebuilt when tombstones exceed ``TOMBSTONE_REBUILD`` of
it. IVF/PQ views keep vectors in an exact ``IDMap2,Flat`` until ``train_threshold`` vectors arrived, then
train on a sample and switch (``pending_training`` in the manifest).

Concurrency: a readers-writer lock; searches run in parallel and never see a half-applied write; writes
(and snapshots) serialize. One writer process per directory (``LOCK``); ``readonly=True`` opens take no
lock, see the state as of opening, and never write.
"""
from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import faiss
import numpy as np

from index import factory as fac
from index.durable import _atomic_write, _fsync_path, _now, _pack, _RWLock, _sha256
from index.viewindex import TOMBSTONE_REBUILD, _View  # noqa: F401 - re-exported

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
_VIEW_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, metadata TEXT, views TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS wal(seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO state VALUES ('next_id', 0), ('snapshot_seq', 0), ('prev_seq', 0);
"""


class StoreError(ValueError):
    """A request or an index directory is invalid; the message names the problem."""


class DuplicateKeyError(StoreError):
    """An added key is already stored, or repeats within the request."""


class UnknownKeyError(StoreError):
    """A key to remove is not stored."""


class NotWritableError(StoreError):
    """The store is open read-only, or closed."""


class IndexStore:
    """See the module docstring. Construct with :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, readonly: bool = False, snapshot_ops: int = 1000,
                 snapshot_seconds: float = 300.0) -> None:
        self.path, self.readonly = path, readonly
        self.snapshot_ops, self.snapshot_seconds = snapshot_ops, snapshot_seconds
        self._rw, self._wmutex, self._db_lock = _RWLock(), threading.RLock(), threading.Lock()
        self._lock_fd: int | None = None
        self._db: sqlite3.Connection | None = None
        self._manifest: dict[str, Any] = {}
        self._views: dict[str, _View] = {}
        self._ops_since, self._last_snap = 0, time.monotonic()
        self._last_seq = 0

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, path: str | os.PathLike, *, views: dict[str, int], fingerprint: str, model_ref: str,
               factory: str | dict[str, str] | None = None, n_hint: int = 0, memory_budget_mb: int = 2048,
               metric: str = "ip", **open_kw: Any) -> "IndexStore":
        """Create an empty index directory (``path`` must not hold an index) and open it for writing.

        ``factory=None`` chooses per view with ``choose_factory(n_hint, dim, memory_budget_mb / len(views))``.
        """
        p = Path(path)
        if (p / "manifest.json").exists():
            raise StoreError(f"an index already exists at {p}")
        if not views:
            raise StoreError("an index needs at least one view")
        if metric not in fac.METRICS:
            raise StoreError(f"unknown metric {metric!r}; expected one of {sorted(fac.METRICS)}")
        specs: dict[str, dict[str, Any]] = {}
        for name, dim in views.items():
            if not _VIEW_NAME.match(str(name)):
                raise StoreError(f"invalid view name {name!r}")
            if not isinstance(dim, (int, np.integer)) or dim <= 0:
                raise StoreError(f"view {name!r}: dim must be a positive int, got {dim!r}")
            f = factory.get(name) if isinstance(factory, dict) else factory
            f = f or fac.choose_factory(n_hint, int(dim), max(1, memory_budget_mb // len(views)))
            try:
                fac.make_index(f, int(dim), metric)
            except Exception as e:  # faiss raises RuntimeError on a bad factory string
                raise StoreError(f"view {name!r}: invalid index factory {f!r}: {e}") from e
            specs[name] = {"dim": int(dim), "metric": metric, "factory": fac.normalize_factory(f), "count": 0,
                           "file": f"{name}.faiss", "snapshot": None, "previous": None, "search_params": {},
                           "pending_training": False}
        p.mkdir(parents=True, exist_ok=True)
        store = cls(p, False, **open_kw)
        store._acquire_lock()
        try:
            store._connect()
            store._manifest = {"format_version": FORMAT_VERSION, "model_ref": model_ref,
                               "fingerprint": fingerprint, "created": _now(), "updated": _now(),
                               "n_hint": n_hint, "memory_budget_mb": memory_budget_mb, "views": specs}
            store._views = {n: _View(n, s) for n, s in specs.items()}
            for v in store._views.values():
                v.refresh_state()
            store._write_snapshot()
        except BaseException:
            store.close(snapshot=False)
            raise
        LOG.info("created index at %s: %s", p, {n: s["factory"] for n, s in specs.items()})
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, *, fingerprint: str | None = None, readonly: bool = False,
             recover: bool = False, snapshot_ops: int = 1000, snapshot_seconds: float = 300.0) -> "IndexStore":
        """Open an index directory; ``recover=True`` falls back to previous snapshots of corrupt files."""
        p = Path(path)
        mpath = p / "manifest.json"
        if not mpath.exists():
            raise StoreError(f"no index at {p} (missing manifest.json)")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"manifest {mpath} is unreadable: {e}") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"index at {p} has format version {manifest.get('format_version')}, "
                             f"this code reads {FORMAT_VERSION}")
        if fingerprint is not None and fingerprint != manifest["fingerprint"]:
            raise StoreError(f"index at {p} was built with model space {manifest['fingerprint']}, this model is "
                             f"{fingerprint}; rebuild the index with this model")
        store = cls(p, readonly, snapshot_ops, snapshot_seconds)
        if not readonly:
            store._acquire_lock()
        try:
            store._connect()
            store._manifest = manifest
            recovered = store._load(recover)
            if recovered and not readonly:
                store.snapshot()
        except BaseException:
            store.close(snapshot=False)
            raise
        return store

    def close(self, snapshot: bool = True) -> None:
        """Snapshot (if anything changed since the last one), then release the files and the lock."""
        with self._wmutex:
            if self._db is not None:
                if snapshot and not self.readonly and self._ops_since:
                    self.snapshot()
                self._db.close()
                self._db = None
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _acquire_lock(self) -> None:
        fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NotWritableError(f"index at {self.path} is already open for writing by another writer "
                             "(only one writer per directory; open with readonly=True to search)") from None
        self._lock_fd = fd

    def _connect(self) -> None:
        db = self.path / "meta.sqlite"
        if self.readonly:
            self._db = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)
        else:
            self._db = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def _state(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM state WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ load / snapshot
    def _load(self, recover: bool) -> bool:
        """Load each view's snapshot, replay the WAL, compute tombstones. True if a fallback was used."""
        recovered = False
        for name, spec in self._manifest["views"].items():
            v = _View(name, spec)
            recovered |= self._load_view(v, spec, recover)
            self._views[name] = v
        with self._db_lock:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='wal'").fetchone()
            self._last_seq = max(int(row[0]) if row else 0, max(v.loaded_seq for v in self._views.values()))
            start = min(v.loaded_seq for v in self._views.values())
            n_rows = 0
            for seq, op, payload in self._db.execute("SELECT seq, op, payload FROM wal WHERE seq > ? ORDER BY seq",
                                                     (start,)):
                n_rows += 1
                self._apply(op, payload, [v for v in self._views.values() if v.loaded_seq < seq])
            for v in self._views.values():
                v.loaded_seq = self._last_seq
                if fac.is_hnsw(v.index) and v.index.ntotal:
                    live = np.fromiter((r[0] for r in self._db.execute(
                        "SELECT items.id FROM items, json_each(items.views) WHERE json_each.value = ?",
                        (v.name,))), dtype=np.int64)
                    v.set_tomb(set(np.setdiff1d(v.ids(), live).tolist()))
        LOG.info("opened index at %s: replayed %d log entries; counts %s", self.path, n_rows, self._counts())
        return recovered

    def _load_view(self, v: _View, spec: dict[str, Any], recover: bool) -> bool:
        cur, prev = spec.get("snapshot"), spec.get("previous")
        path = self.path / spec["file"]
        candidates = {"faiss": path, "prev": path.with_name(path.name + ".prev")}
        found: dict[str, str] = {}
        for loc, fp in candidates.items():
            if fp.exists():
                sha = _sha256(fp)
                if cur and sha == cur["sha256"]:
                    found.setdefault("cur", loc)
                elif prev and sha == prev["sha256"]:
                    found.setdefault("prev", loc)
        if cur is None:  # never snapshotted (cannot happen after create, kept for robustness)
            v.refresh_state()
            return False
        if "cur" in found:
            use, snap = found["cur"], cur
            if use == "prev":
                LOG.info("view %s: an interrupted snapshot left the current one as %s", v.name, candidates[use])
        elif recover and "prev" in found:
            use, snap = found["prev"], prev
            LOG.warning("view %s: %s is missing or corrupt (sha256 mismatch); recovering from the previous "
                        "snapshot %s and replaying the log from seq %d", v.name, path, candidates[use], prev["seq"])
        else:
            hint = (f"; the previous snapshot {candidates[found['prev']]} is intact: open with recover=True to "
                    "load it and replay the log") if "prev" in found else "; no usable previous snapshot"
            state = "missing" if not path.exists() else "corrupt or truncated (sha256 does not match the manifest)"
            raise StoreError(f"index file {path} is {state}{hint}")
        try:
            v.index = faiss.read_index(str(candidates[use]))
        except RuntimeError as e:
            raise StoreError(f"index file {candidates[use]} is corrupt: {e}") from e
        if not isinstance(v.index, (faiss.IndexIDMap2, faiss.IndexIVF)) or v.index.d != v.dim:
            raise StoreError(f"index file {candidates[use]} does not hold an IDMap2/IVF index of dim {v.dim}")
        v.loaded_seq, v.cur_loc = int(snap["seq"]), (use if snap is cur else None)
        v.refresh_state()
        return snap is not cur

    def snapshot(self) -> None:
        """Write every view atomically, commit the manifest, then prune WAL rows covered twice."""
        if self.readonly:
            raise NotWritableError("index is open readonly; cannot snapshot")
        with self._wmutex, self._rw.read():
            self._write_snapshot()

    def _write_snapshot(self) -> None:
        seq, t0 = self._last_seq, time.perf_counter()
        views = self._manifest["views"]
        for name, v in self._views.items():
            spec, path = views[name], self.path / views[name]["file"]
            tmp, prev_path = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".prev")
            faiss.write_index(v.index, str(tmp))
            _fsync_path(tmp)
            sha = _sha256(tmp)
            if v.cur_loc == "faiss":
                os.replace(path, prev_path)
            if v.cur_loc is not None:  # the current snapshot is (now) the .prev file
                spec["previous"] = spec["snapshot"]
            os.replace(tmp, path)
            v.cur_loc = "faiss"
            spec.update(snapshot={"sha256": sha, "seq": seq}, count=v.count, pending_training=v.pending,
                        search_params=v.params)
        _fsync_path(self.path)
        self._manifest["updated"] = _now()
        _atomic_write(self.path / "manifest.json", json.dumps(self._manifest, indent=2).encode())
        prev_seq = min((s["previous"] or {"seq": 0})["seq"] for s in views.values())
        with self._db_lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE state SET value=? WHERE name='snapshot_seq'", (seq,))
            self._db.execute("UPDATE state SET value=? WHERE name='prev_seq'", (prev_seq,))
            self._db.execute("DELETE FROM wal WHERE seq <= ?", (prev_seq,))
            self._db.execute("COMMIT")
        self._ops_since, self._last_snap = 0, time.monotonic()
        LOG.info("snapshot of %s at seq %d in %.2fs", self.path, seq, time.perf_counter() - t0)

    def _maybe_snapshot(self) -> None:
        self._ops_since += 1
        if self._ops_since >= self.snapshot_ops or time.monotonic() - self._last_snap >= self.snapshot_seconds:
            self.snapshot()

    # ------------------------------------------------------------------ writes
    def _apply(self, op: str, payload: bytes, views: Iterable[_View]) -> None:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            for v in views:
                if op == "add" and f"x::{v.name}" in z:
                    v.add(z["ids"], np.ascontiguousarray(z[f"x::{v.name}"], dtype=np.float32))
                elif op == "remove" and f"ids::{v.name}" in z:
                    v.remove(z[f"ids::{v.name}"])

    def _writable(self) -> None:
        if self.readonly:
            raise NotWritableError("index is open readonly")
        if self._db is None:
            raise NotWritableError("index is closed")

    def _check_x(self, x: Any, view: str, n: int | None) -> np.ndarray:
        if view not in self._views:
            raise StoreError(f"unknown view {view!r}; this index has views {sorted(self._views)}")
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.float64):
            raise StoreError(f"view {view!r}: vectors must be float32 or float64, got {x.dtype}")
        if x.ndim == 1 and n is None:
            x = x[None, :]
        dim = self._views[view].dim
        if x.ndim != 2 or x.shape[1] != dim:
            raise StoreError(f"view {view!r}: expected shape (n, {dim}), got {x.shape}")
        if n is not None and x.shape[0] != n:
            raise StoreError(f"view {view!r}: {x.shape[0]} vectors for {n} keys")
        if not np.isfinite(x).all():
            raise StoreError(f"view {view!r}: vectors contain NaN or inf")
        return np.ascontiguousarray(x, dtype=np.float32)

    @staticmethod
    def _check_keys(keys: Any) -> list[str]:
        if isinstance(keys, str) or not all(isinstance(k, str) and k for k in keys):
            raise StoreError("keys must be a list of non-empty strings")
        keys = list(keys)
        if len(set(keys)) != len(keys):
            dup = next(k for i, k in enumerate(keys) if k in keys[:i])
            raise DuplicateKeyError(f"duplicate key {dup!r} in the request")
        return keys

    def _rows_for(self, keys: list[str]) -> dict[str, tuple[int, str]]:
        out: dict[str, tuple[int, str]] = {}
        for s in range(0, len(keys), 500):
            part = keys[s:s + 500]
            q = f"SELECT key, id, views FROM items WHERE key IN ({','.join('?' * len(part))})"
            out.update({k: (i, vs) for k, i, vs in self._db.execute(q, part)})
        return out

    def add(self, keys: list[str], vectors: dict[str, np.ndarray], metadata: list[dict] | None = None) -> np.ndarray:
        """Add items; ``vectors[view]`` is (len(keys), dim). Returns their int64 ids. Durable on return."""
        self._writable()
        keys = self._check_keys(keys)
        n = len(keys)
        if not vectors:
            raise StoreError("vectors must give at least one view")
        xs = {view: self._check_x(x, view, n) for view, x in vectors.items()}
        metadata = metadata if metadata is not None else [{} for _ in keys]
        if len(metadata) != n:
            raise StoreError(f"{len(metadata)} metadata entries for {n} keys")
        try:
            meta_json = [json.dumps(m, allow_nan=False) for m in metadata]
        except (TypeError, ValueError) as e:
            raise StoreError(f"metadata must be JSON-serializable: {e}") from e
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        views_json = json.dumps(sorted(xs))
        with self._wmutex:
            with self._db_lock:
                present = self._rows_for(keys)
                if present:
                    raise DuplicateKeyError(f"key {next(k for k in keys if k in present)!r} already exists "
                                     f"({len(present)} of {n} keys already exist)")
                start = self._state("next_id")
                ids = np.arange(start, start + n, dtype=np.int64)
                payload = _pack({"ids": ids, **{f"x::{v}": x for v, x in xs.items()}})
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.executemany("INSERT INTO items VALUES (?, ?, ?, ?)",
                                         zip(ids.tolist(), keys, meta_json, [views_json] * n))
                    cur = self._db.execute("INSERT INTO wal(op, payload) VALUES ('add', ?)", (payload,))
                    self._db.execute("UPDATE state SET value=? WHERE name='next_id'", (start + n,))
                    self._db.execute("COMMIT")
                self._last_seq = int(cur.lastrowid)
            with self._rw.write():
                for view, x in xs.items():
                    self._views[view].add(ids, x)
            self._maybe_snapshot()
        return ids

    def remove(self, keys: list[str]) -> int:
        """Remove items by key (all of them, or none if a key is unknown). Durable on return."""
        self._writable()
        keys = self._check_keys(keys)
        if not keys:
            return 0
        with self._wmutex, self._rw.write():
            with self._db_lock:
                rows = self._rows_for(keys)
                missing = [k for k in keys if k not in rows]
                if missing:
                    raise UnknownKeyError(f"unknown key {missing[0]!r} ({len(missing)} of {len(keys)} keys unknown); "
                                     "nothing removed")
                per_view: dict[str, list[int]] = {}
                for k in keys:
                    i, vs = rows[k]
                    for view in json.loads(vs):
                        per_view.setdefault(view, []).append(i)
                arrays = {f"ids::{v}": np.asarray(i, dtype=np.int64) for v, i in per_view.items()}
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.executemany("DELETE FROM items WHERE id=?", [(rows[k][0],) for k in keys])
                    cur = self._db.execute("INSERT INTO wal(op, payload) VALUES ('remove', ?)", (_pack(arrays),))
                    self._db.execute("COMMIT")
                self._last_seq = int(cur.lastrowid)
            for view, ids in arrays.items():
                self._views[view.split("::", 1)[1]].remove(ids)
        with self._wmutex:
            self._maybe_snapshot()
        return len(keys)

    # ------------------------------------------------------------------ reads
    def search(self, xq: np.ndarray, view: str, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query: D (nq, k) float32 scores, I (nq, k) int64 ids, -1 padded."""
        with self._rw.read():
            return self._search(xq, view, k, nprobe, ef_search)

    def _search(self, xq: Any, view: str, k: int, nprobe: int | None,
                ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        xq = self._check_x(xq, view, None)  # (nq, dim)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise StoreError(f"k must be a positive int, got {k!r}")
        v = self._views[view]
        params = fac.search_params(v.index, nprobe=nprobe or v.params.get("nprobe"),
                                   ef_search=ef_search or v.params.get("ef_search"), sel=v.sel)
        D, I = v.index.search(xq, int(k), params=params)
        return D.astype(np.float32, copy=False), I.astype(np.int64, copy=False)

    def lookup(self, ids: Iterable[int]) -> list[dict | None]:
        """``[{'id', 'key', 'metadata'}]`` per id (None for -1 or unknown ids)."""
        ids = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel()]
        found: dict[int, dict] = {}
        want = sorted({i for i in ids if i >= 0})
        with self._db_lock:
            for s in range(0, len(want), 500):
                part = want[s:s + 500]
                q = f"SELECT id, key, metadata FROM items WHERE id IN ({','.join('?' * len(part))})"
                for i, key, meta in self._db.execute(q, part):
                    found[i] = {"id": i, "key": key, "metadata": json.loads(meta) if meta else {}}
        return [found.get(i) for i in ids]

    def ids_of(self, keys: list[str]) -> list[int | None]:
        """The id of each key (None if absent)."""
        with self._db_lock:
            rows = self._rows_for(list(keys))
        return [rows[k][0] if k in rows else None for k in keys]

    def search_items(self, xq: np.ndarray, view: str, k: int, **kw: Any) -> list[list[dict]]:
        """Per query ``[{'id', 'key', 'score', 'metadata'}]`` (search and lookup see one consistent state)."""
        with self._rw.read():
            D, I = self._search(xq, view, k, kw.get("nprobe"), kw.get("ef_search"))
            items = self.lookup(I.ravel())
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
                    target_recall: float = 0.95) -> dict[str, Any]:
        """Smallest nprobe / efSearch reaching ``target_recall`` @k against exact ids ``gt_I`` (nq, >=k);
        stored as the view's default (persisted at the next snapshot)."""
        v = self._views[view]
        gt = np.asarray(gt_I)[:, :k]
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
            _, I = self.search(xq, view, k, **{name: val})
            rec = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(I.tolist(), gt.tolist())]))
            best = {name: val, "recall": rec}
            if rec >= target_recall:
                break
        with self._wmutex:
            v.params = {name: best[name]}
            self._manifest["views"][view]["search_params"] = v.params
        LOG.info("view %s: tuned %s", view, best)
        return best

    # ------------------------------------------------------------------ info
    def _counts(self) -> dict[str, int]:
        return {n: v.count for n, v in self._views.items()}

    def count(self, view: str | None = None) -> int | dict[str, int]:
        """Live vectors in ``view``, or a dict for all views."""
        with self._rw.read():
            if view is None:
                return self._counts()
            if view not in self._views:
                raise StoreError(f"unknown view {view!r}; this index has views {sorted(self._views)}")
            return self._views[view].count

    def __len__(self) -> int:
        with self._db_lock:
            return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    @property
    def views(self) -> dict[str, int]:
        return {n: v.dim for n, v in self._views.items()}

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    def index_of(self, view: str) -> faiss.Index:
        """The live FAISS index of a view (read-only use; for benchmarks and inspection)."""
        return self._views[view].index
