"""Work of an index store off the request path: the background thread that follows the committed log, writes
snapshots, trains IVF/PQ views and rebuilds HNSW views without their tombstones (a mixin of :class:`index.store.IndexStore`; see its module docstring)."""
from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any, Callable

import faiss

from index import snapshots as snaps
from index.errors import NotWritableError, StoreError
from index.journal import Journal, unpack
from index.viewindex import rebuilt_copy, trained_copy

LOG = logging.getLogger(__name__)
MAX_BACKOFF_S = 60.0


class Maintenance:
    """Background thread, snapshots and training. Relies on IndexStore's attributes and ``_refresh``."""

    # ------------------------------------------------------------------ the thread
    def _start(self) -> None:
        if self.readonly or not self._follow_on:
            return
        self._thread = threading.Thread(target=self._run, name=f"index-{self.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.follow_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            for step in (self._refresh, self._views_due, self._maybe_snapshot):
                try:
                    step(**({"background": True} if step == self._views_due else {}))
                except NotWritableError:
                    if self._closed:
                        return
                except Exception:  # noqa: BLE001 - logged; the next round retries
                    LOG.exception("index %s: background %s failed", self.path, step.__name__)

    def _note_write(self) -> None:
        self._ops_since += 1
        if self._snapshot_due() or any(v.due_for_training or v.due_for_rebuild for v in self._views.values()):
            self._wake.set()

    # ------------------------------------------------------------------ snapshots
    def _snapshot_due(self) -> bool:
        behind = self._applied - snaps.manifest_seq(self._manifest)
        if behind <= 0 and not self._params_dirty:
            return False
        if time.monotonic() < self._retry_at:
            return False
        return (behind >= self.snapshot_ops or self._ops_since >= self.snapshot_ops
                or time.monotonic() - self._last_snap >= self.snapshot_seconds)

    def _maybe_snapshot(self) -> None:
        if not self._snapshot_due():
            return
        try:
            self._snapshot(timeout=0.0)
            self._backoff = 1.0
        except snaps.SnapshotLockHeld:
            self._last_snap = time.monotonic()  # another process is snapshotting; look again later
        except Exception as e:  # noqa: BLE001 - the log holds every acknowledged write
            self._retry_at = time.monotonic() + self._backoff
            LOG.error("index %s: snapshot failed (%s: %s); the log keeps every write, retrying in %.0f s",
                      self.path, type(e).__name__, e, self._backoff)
            self._backoff = min(MAX_BACKOFF_S, self._backoff * 2)

    def snapshot(self, timeout: float = 60.0) -> None:
        """Write a snapshot of every view now (trains due IVF views and rebuilds due HNSW views first); raises StoreError on failure,
        naming the process that holds the snapshot lock if another one does for ``timeout`` seconds."""
        if self.readonly:
            raise NotWritableError("index is open readonly; cannot snapshot")
        self._views_due()
        try:
            self._snapshot(timeout=timeout)
        except snaps.SnapshotLockHeld as e:
            raise StoreError(f"index {self.path}: {e}") from None
        except OSError as e:
            raise StoreError(f"index {self.path}: snapshot failed: {e}") from e

    def _snapshot(self, timeout: float, initial: bool = False, force: bool = False) -> bool:
        """One snapshot under the snapshot lock (skipped when the committed one is as recent, unless
        ``force``); True if one was committed."""
        with self._snap_mutex:
            lock = snaps.SnapshotLock(self.path)
            lock.acquire(timeout)
            try:
                disk = self._manifest if initial else snaps.read_manifest(self.path)
                if not initial:
                    self._refresh()
                with self._rw.read():
                    seq = self._applied
                    if not (initial or force) and seq <= snaps.manifest_seq(disk) and not self._params_dirty:
                        self._adopt(disk)
                        return False
                    blobs = {n: faiss.serialize_index(v.index) for n, v in self._views.items()}  # (bytes,) uint8
                    states = {n: {"count": v.count, "pending_training": v.pending,
                                  "search_params": (v.params if n in self._params_dirty
                                                    else disk["views"][n].get("search_params") or {})}
                              for n, v in self._views.items()}
                t0 = time.perf_counter()
                new = snaps.write_snapshot(self.path, disk, blobs, seq, states)
                del blobs
                prev_seq = min((s.get("previous") or {"seq": 0})["seq"] for s in new["views"].values())
                jr = self._journal
                try:
                    with jr.write_lock, jr.transaction() as conn:
                        Journal.prune(conn, seq, prev_seq)
                except Exception as e:  # noqa: BLE001 - the snapshot is committed; pruning waits for the next
                    LOG.warning("index %s: pruning the log failed: %s", self.path, e)
                self._params_dirty.clear()
                self._adopt(new)
                self._ops_since, self._last_snap = 0, time.monotonic()
                LOG.info("snapshot of %s at seq %d in %.2fs", self.path, seq, time.perf_counter() - t0)
                return True
            finally:
                lock.release()

    def _adopt(self, manifest: dict[str, Any]) -> None:
        """Take a committed manifest as this process's view of it (and other processes' tuned params)."""
        for n, v in self._views.items():
            if n not in self._params_dirty:
                v.params = dict(manifest["views"][n].get("search_params") or {})
        self._manifest = manifest

    # ------------------------------------------------------------------ IVF/PQ training, HNSW rebuilds
    def _views_due(self, background: bool = False) -> None:
        """Train the IVF/PQ views that have enough vectors, rebuild the HNSW views past their tombstone limit."""
        if self.readonly or (background and time.monotonic() < self._train_retry_at):
            return
        for name, v in list(self._views.items()):
            try:
                if v.due_for_training:
                    self._replace(name, lambda w: w.due_for_training,
                                  lambda w, idx, dead: trained_copy(name, w.factory, w.metric, idx))
                elif v.due_for_rebuild:
                    self._replace(name, lambda w: w.due_for_rebuild,
                                  lambda w, idx, dead: rebuilt_copy(name, w.factory, w.dim, w.metric, idx, dead))
            except Exception:
                self._train_retry_at = time.monotonic() + MAX_BACKOFF_S  # e.g. out of memory: not every round
                raise

    def _replace(self, name: str, due: Callable[[Any], bool], build: Callable[[Any, Any, set[int]], Any]) -> None:
        """Build a new index for a view from a copy of it with no lock held (searches and writes go on meanwhile):
        ``build(view, copy, tombstones)``; then, under the writer lock, replay into it the log rows that arrived
        meanwhile, exactly as ``_apply`` does, and swap it in."""
        with self._train_mutex:
            with self._rw.read():
                v = self._views[name]
                if not due(v):
                    return
                seq0, old, dead, blob = self._applied, v.index, v.tomb, faiss.serialize_index(v.index)
            copied = faiss.deserialize_index(blob)  # tomb sets are replaced, never changed in place
            del blob  # not held through the build: memory is the live index, the copy and the new one
            new = build(v, copied, dead)
            del copied
            jr = self._journal
            with self._rw.write():
                if self._views.get(name) is not v or v.index is not old or self._dirty:
                    return  # reloaded or rebuilt inline meanwhile: the next round looks again
                if self._closed or jr is None or jr.closed:
                    return  # closed meanwhile: the copy is dropped, the view is as it was
                with jr.read_lock:
                    rows = Journal.rows_after(jr.read, seq0, self._applied)
                if rows is None:
                    LOG.warning("view %s: log rows pruned while building its new index; building again later", name)
                    return
                fresh = copy.copy(v)  # the same view over the new index
                fresh.index = new
                fresh.set_tomb(set())
                for _, op, payload in rows:
                    self._apply(op, unpack(payload), [fresh])
                v.tomb = fresh.tomb
                v.swap(fresh.index)
        self._wake.set()  # a snapshot soon persists the new index
