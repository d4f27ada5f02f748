"""Loading an index store's in-memory views (a mixin of :class:`index.store.IndexStore`; see its module
docstring): from the committed snapshot + log at open and after a failure (``_load``, ``_reload``), following
the committed log (``_refresh``, ``_catch_up``) and the index structures other processes commit (a trained IVF
quantizer, a rebuilt HNSW graph: ``_follow``), which every process loads from the same snapshot file instead of
building its own."""
from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any, Iterable

import faiss
import numpy as np

from index import factory as fac
from index import manifest as mf
from index import snapshots as snaps
from index.errors import NotWritableError, StoreError, WriteFailed
from index.journal import Gap as _Gap, Journal, unpack
from index.viewindex import _View

LOG = logging.getLogger(__name__)


class Loading:
    """Load, reload, follow. Relies on IndexStore's attributes."""

    # ------------------------------------------------------------------ load / follow
    def _load_current(self, recover: bool, manifest: dict[str, Any]) -> bool:
        """``_load`` of the committed manifest. Another process may commit a newer snapshot between reading the
        manifest and loading its files (and delete files no manifest names any more, or prune log rows): when
        loading fails and the manifest has changed meanwhile, load the newer one."""
        for _ in range(20):
            try:
                return self._load(recover, manifest)
            except StoreError:
                try:
                    newer = mf.read_manifest(self.path)
                except (OSError, ValueError):
                    raise
                if newer == manifest:
                    raise
                manifest = newer
                time.sleep(0.01)
        return self._load(recover, manifest)

    def _load(self, recover: bool, manifest: dict[str, Any]) -> bool:
        """Load each view's snapshot and replay the log (caller holds the write lock). True if a previous
        snapshot was used."""
        recovered = False
        views: dict[str, _View] = {}
        for name, spec in manifest["views"].items():
            v = _View(name, spec)
            got, which = snaps.read_view(self.path, spec, "snapshot"), "snapshot"
            if got is None and recover:
                got, which = snaps.read_view(self.path, spec, "previous"), "previous"
            if got is None:
                raise StoreError(self._load_error(spec, recover))
            if which == "previous":
                LOG.warning("view %s: %s is missing or corrupt; recovered from the previous snapshot %s and "
                            "replaying the log from seq %d", name, spec["snapshot"]["file"], got[1],
                            spec["previous"]["seq"])
                self._bad.add(mf.entry_id(spec["snapshot"]))  # the next snapshot keeps `got` as previous
                recovered = True
            self._check_index(v, got[0], got[1])
            v.set_index(got[0], self.path / got[1])
            v.build = int(spec[which].get("build", 0))
            v.loaded_seq = int(spec[which]["seq"])
            v.refresh_state()
            views[name] = v
        jr = self._journal
        start = min(v.loaded_seq for v in views.values())
        with jr.read_lock:
            conn = jr.read
            conn.execute("BEGIN")  # one consistent read of the log and the items
            try:
                rows = Journal.rows_after(conn, start)
                if rows is None:
                    raise StoreError(f"index at {self.path}: log rows after seq {start} are missing; the snapshot "
                                     "does not match meta.sqlite")
                for seq, op, payload in rows:
                    self._apply(op, unpack(payload), [v for v in views.values() if v.loaded_seq < seq])
                applied = rows[-1][0] if rows else start
                for v in views.values():
                    v.loaded_seq = applied
                    if fac.is_hnsw(v.index) and v.index.ntotal:
                        v.set_tomb(set(np.setdiff1d(v.ids(), Journal.live_ids(conn, v.name)).tolist()))
            finally:
                conn.execute("COMMIT")
        self._views, self._manifest, self._applied, self._dirty = views, manifest, applied, False
        self._manifest_key = None  # the next _refresh compares the committed structures with these
        LOG.info("opened index at %s: replayed %d log entries to seq %d; counts %s", self.path, len(rows), applied,
                 self._counts())
        return recovered

    def _check_index(self, v: _View, index: faiss.Index, fname: str) -> None:
        ok = isinstance(index, (faiss.IndexIDMap2, faiss.IndexIVF)) or (  # or an IVF behind a rotation (OPQ)
            isinstance(index, faiss.IndexPreTransform) and faiss.try_extract_index_ivf(index) is not None)
        if not ok or index.d != v.dim:
            raise StoreError(f"index file {self.path / fname} does not hold an IDMap2/IVF index of dim {v.dim}")

    def _load_error(self, spec: dict[str, Any], recover: bool) -> str:
        name = mf.candidates(spec, "snapshot")[0]
        fp = self.path / name
        state = "missing" if not fp.exists() else "corrupt or truncated (sha256 does not match the manifest)"
        prev = snaps.read_view(self.path, spec, "previous") if not recover else None
        hint = (f"; the previous snapshot {self.path / prev[1]} is intact: open with recover=True to load it and "
                "replay the log") if prev else "; no usable previous snapshot"
        return f"index file {fp} is {state}{hint}"

    def _reload(self) -> None:
        """Rebuild the in-memory views from the committed snapshot + log (caller holds the write lock)."""
        last: Exception | None = None
        for _ in range(3):  # a concurrent snapshot may delete a file between reading the manifest and it
            try:
                self._load(False, mf.read_manifest(self.path))
                LOG.warning("index %s: in-memory views reloaded from snapshot + log (seq %d)", self.path,
                            self._applied)
                return
            except (StoreError, OSError, ValueError) as e:
                last = e
                time.sleep(0.05)
        self._dirty = True
        raise WriteFailed(f"index {self.path}: cannot reload the views: {last}") from last

    def _apply(self, op: str, z: dict[str, np.ndarray], views: Iterable[_View]) -> None:
        for v in views:
            if op == "add" and f"x::{v.name}" in z:
                v.add(z["ids"], np.ascontiguousarray(z[f"x::{v.name}"], dtype=np.float32))
            elif op == "remove" and f"ids::{v.name}" in z:
                v.remove(z[f"ids::{v.name}"])

    def _catch_up(self, conn: sqlite3.Connection, upto: int | None = None) -> None:
        """Apply committed rows after ``_applied`` (caller holds the write lock and ``conn``'s lock)."""
        rows = Journal.rows_after(conn, self._applied, upto)
        if rows is None:
            raise _Gap()
        for seq, op, payload in rows:
            try:
                self._apply(op, unpack(payload), self._views.values())
            except BaseException:
                self._dirty = True
                raise
            self._applied = seq

    def _refresh(self) -> None:
        """Bring the in-memory views up to the last committed log row (cheap when nothing changed)."""
        jr = self._journal
        if self._closed or jr is None or jr.closed:
            raise NotWritableError("index is closed")
        self._follow_manifest()  # a structure (trained IVF, rebuilt HNSW) another process committed: load it
        with jr.read_lock:
            last = Journal.last_seq(jr.read)
        if last <= self._applied and not self._dirty:
            return
        with self._rw.write():
            if self._closed:
                raise NotWritableError("index is closed")
            if self._dirty:
                self._reload()
                return
            with jr.read_lock:
                try:
                    self._catch_up(jr.read)
                    return
                except _Gap:
                    LOG.warning("index %s: log rows after seq %d were pruned; reloading", self.path, self._applied)
                except Exception as e:  # noqa: BLE001 - the views are dirty; reload
                    LOG.error("index %s: applying the log failed (%s: %s); reloading", self.path,
                              type(e).__name__, e)
            self._reload()

    # ------------------------------------------------------------------ following committed structures
    def _follow_manifest(self) -> None:
        """Cheap unless ``manifest.json`` changed (a stat): then follow the structures it names."""
        key = mf.stat_key(self.path)
        if key is None or key == self._manifest_key or not self._follow_mutex.acquire(blocking=False):
            return  # unchanged, or another thread of this process is following it now
        try:
            disk = mf.read_manifest(self.path)
            if not self._follow(disk):  # a file replaced meanwhile: the manifest changed again, so it is read again
                LOG.warning("index %s: a view's committed snapshot could not be read; kept the index it has", self.path)
            self._manifest_key = key
            self._adopt(disk)
        except (OSError, ValueError, KeyError) as e:  # replaced meanwhile: the next call reads the newer one
            LOG.debug("index %s: manifest not followed yet: %s", self.path, e)
        finally:
            self._follow_mutex.release()

    def _follow(self, disk: dict[str, Any], locked: bool = False) -> bool:
        """Load each view whose committed snapshot holds another structure than this process's (another
        ``build``): read the file with no store lock held, then ``_install`` it. True if none is left behind.
        ``locked``: the caller holds the snapshot lock, so a file that cannot be read is corrupt, not replaced."""
        done = True
        with self._follow_mutex:
            for name, spec in disk["views"].items():
                v, snap = self._views.get(name), spec.get("snapshot") or {}
                if v is None or mf.entry_id(snap) in self._bad:
                    continue
                if int(snap.get("build", 0)) == v.build and not v.maps(snap):  # on-disk views map every snapshot
                    continue
                got = snaps.read_view(self.path, spec, "snapshot")
                if got is None:
                    done = False
                    if locked:
                        self._bad.add(mf.entry_id(snap))
                        LOG.error("view %s: the committed snapshot %s is missing or corrupt; not loaded", name,
                                  snap.get("file"))
                    continue
                self._install(name, spec, got[0])
        return done

    def _install(self, name: str, spec: dict[str, Any], index: faiss.Index) -> None:
        """Swap in ``index`` (the view's committed snapshot) after replaying into it, under the write lock, the log
        rows past its seq, as ``_load`` does; a reload of every view when that cannot be done."""
        jr = self._journal
        with self._rw.write():
            if self._closed or jr is None or jr.closed:
                return
            fresh = None
            if not self._dirty:
                with jr.read_lock:
                    conn = jr.read
                    conn.execute("BEGIN")  # one consistent read of the log and the items
                    try:
                        self._catch_up(conn)
                        fresh = self._replayed(conn, name, spec, index)
                    except Exception as e:  # noqa: BLE001 - a gap, or a failed apply: reload everything below
                        LOG.warning("index %s: view %s not swapped in (%s: %s); reloading", self.path, name,
                                    type(e).__name__, e)
                    finally:
                        conn.execute("COMMIT")
            if fresh is None:
                self._reload()
                return
            old = self._views[name]
            if name in self._params_dirty:
                fresh.params = old.params
            self._views[name] = fresh
        LOG.info("view %s: loaded build %d (%s) from %s", name, fresh.build, type(fac.base_of(index)).__name__,
                 spec["snapshot"]["file"])

    def _replayed(self, conn: Any, name: str, spec: dict[str, Any], index: faiss.Index) -> _View | None:
        seq = int(spec["snapshot"]["seq"])
        rows = Journal.rows_after(conn, seq, self._applied)
        if rows is None:
            return None
        fresh = _View(name, spec)
        self._check_index(fresh, index, spec["snapshot"]["file"])
        fresh.set_index(index, self.path / spec["snapshot"]["file"])
        fresh.build = int(spec["snapshot"].get("build", 0))
        fresh.refresh_state()
        for _, op, payload in rows:
            self._apply(op, unpack(payload), [fresh])
        if fac.is_hnsw(fresh.index) and fresh.index.ntotal:
            fresh.set_tomb(set(np.setdiff1d(fresh.ids(), Journal.live_ids(conn, name)).tolist()))
        fresh.loaded_seq = self._applied
        return fresh
