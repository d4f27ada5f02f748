"""Work of an index store off the request path: the background thread that follows the committed log and the
committed manifest, writes snapshots, trains IVF/PQ views and rebuilds HNSW views without their tombstones (a
mixin of :class:`index.store.IndexStore`; see its module docstring).

A view's index structure (the trained IVF quantizer, the HNSW graph) is built once per index, not once per
process: the process that holds the ``BUILD`` flock builds it from a copy with no store lock held, replays the
log rows that arrived meanwhile into it and commits it as that view's snapshot (``build`` numbers it); every
process, the builder too, then loads that snapshot and replays the log past its seq (:meth:`_follow`), so all
of them hold the same index and answer a query with the same hits."""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import faiss

from index import manifest as mf
from index import snapshots as snaps
from index.errors import NotWritableError, StoreError
from index.journal import Journal, unpack
from index.viewindex import _View, rebuilt_copy, retyped_copy, trained_copy

LOG = logging.getLogger(__name__)
MAX_BACKOFF_S = 60.0
BUILD_LOCK = "BUILD"  # flock'ed by the one process that builds a view's new index
BUILD_WAIT_S = 60.0  # an explicit snapshot()/tune_search waits this long for another process's build
CLEAN_TRIES = 5  # a snapshot rebuilds views marked dirty (by a failed write) this many times before giving up


@dataclass
class Schedule:
    """When the background work runs next; the store's state that only :class:`Maintenance` reads and writes."""
    ops_since: int = 0  # writes since the last snapshot
    last_snap: float = field(default_factory=time.monotonic)
    retry_at: float = 0.0  # no snapshot attempt before this (back-off after a failure)
    backoff: float = 1.0
    train_retry_at: float = 0.0  # no background build before this (after a failed one)

    def snapshot_due(self, behind: int, params_dirty: bool, ops: int, seconds: float) -> bool:
        """``behind``: log rows past the committed snapshot; ``ops``/``seconds``: the store's snapshot policy."""
        if behind <= 0 and not params_dirty:
            return False
        if time.monotonic() < self.retry_at:
            return False
        return behind >= ops or self.ops_since >= ops or time.monotonic() - self.last_snap >= seconds

    def snapshotted(self) -> None:
        self.ops_since, self.last_snap = 0, time.monotonic()

    def failed(self) -> float:
        """A snapshot failed: the seconds until the next attempt (doubling up to MAX_BACKOFF_S)."""
        wait, self.retry_at = self.backoff, time.monotonic() + self.backoff
        self.backoff = min(MAX_BACKOFF_S, self.backoff * 2)
        return wait


class Maintenance:
    """Background thread, snapshots and training. Relies on IndexStore's attributes and ``_refresh``."""

    # ------------------------------------------------------------------ what is due
    def view_budget_mb(self) -> float:
        """Each view's share of the memory budget: the opener's (``open(memory_budget_mb=...)``), else the
        manifest's, split equally between the views."""
        total = self._budget_mb or self._manifest.get("memory_budget_mb") or 2048
        return float(total) / max(1, len(self._views))

    def _due(self, v: _View) -> str | None:
        """What build a view needs: ``"train"`` (an IVF/PQ view with enough vectors), ``"rebuild"`` (HNSW past its
        tombstone limit), ``"retype"`` (outgrown its type or its budget: ``factory.retype_due``; only a type the
        store chose, never one the caller gave), or None."""
        if v.due_for_training:
            return "train"
        if v.due_for_rebuild:
            return "rebuild"
        if self.readonly or v.count < self._retype_skip.get(v.name, 0):
            return None
        chosen = (self._manifest.get("views", {}).get(v.name) or {}).get("choice") or {}
        if not chosen or str(chosen.get("reason", "")).startswith("given"):
            return None  # a type the caller gave (or an index from before choices were recorded) is kept
        return "retype" if v.retype_reason(self.view_budget_mb()) else None

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
        self._schedule.ops_since += 1
        if self._snapshot_due() or any(self._due(v) for v in self._views.values()):
            self._wake.set()

    # ------------------------------------------------------------------ snapshots
    def _snapshot_due(self) -> bool:
        behind = self._applied - mf.manifest_seq(self._manifest)
        return self._schedule.snapshot_due(behind, bool(self._params_dirty), self.snapshot_ops, self.snapshot_seconds)

    def _maybe_snapshot(self) -> None:
        if not self._snapshot_due():
            return
        try:
            self._snapshot(timeout=0.0)
            self._schedule.backoff = 1.0
        except snaps.SnapshotLockHeld:
            self._schedule.last_snap = time.monotonic()  # another process is snapshotting; look again later
        except Exception as e:  # noqa: BLE001 - the log holds every acknowledged write
            LOG.error("index %s: snapshot failed (%s: %s); the log keeps every write, retrying in %.0f s",
                      self.path, type(e).__name__, e, self._schedule.failed())

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
        """One snapshot of every view under the snapshot lock (skipped when the committed one is as recent, unless
        ``force``); True if one was committed. A structure another process committed is loaded first, never
        overwritten by this process's older one."""
        with self._snap_mutex:
            lock = snaps.SnapshotLock(self.path)
            lock.acquire(timeout)
            try:
                disk = self._manifest if initial else mf.read_manifest(self.path)
                if not initial:
                    self._follow(disk, locked=True)
                got = self._write_clean(disk, refresh=not initial, always=initial or force)
                if got is None:
                    self._adopt(disk)
                    return False
                seq, files, states = got
                t0 = time.perf_counter()
                self._commit_snapshot(disk, files, seq, states)
                self._params_dirty.clear()
                self._schedule.snapshotted()
                LOG.info("snapshot of %s at seq %d in %.2fs", self.path, seq, time.perf_counter() - t0)
                self._follow(self._manifest, locked=True)  # on-disk views map the new file (an empty delta)
                return True
            finally:
                lock.release()

    def _write_clean(self, disk: dict[str, Any], refresh: bool,
                     always: bool) -> tuple[int, snaps.NewFiles, dict[str, dict]] | None:
        """``(seq, files, states)``: every view written to a new file under the read lock, or None when ``disk``
        is as recent. Each view is written straight from the live index (``faiss.write_index``; an on-disk view
        merges its mapped lists, tombstones and delta list by list), with no serialized copy: memory stays at one
        view, not two, and searches go on, but writes wait for the disk write (not just a memcpy). The files are
        fsynced and hashed afterwards with no store lock held. Views marked dirty (a failed write may have left a
        rolled-back vector in them) are never written: they are rebuilt from snapshot + log first
        (``_refresh``), and the dirty flag is checked under the lock."""
        for _ in range(CLEAN_TRIES):
            if refresh:
                self._refresh()
            with self._rw.read():
                if self._dirty:
                    continue  # a write failed since _refresh: reload, then write
                seq = self._applied
                if not always and seq <= mf.manifest_seq(disk) and not self._params_dirty:
                    return None
                files = snaps.NewFiles(self.path, seq)
                try:
                    for n, v in self._views.items():
                        files.write(n, v.write)
                except BaseException:
                    files.discard()
                    raise
                states = {n: {"count": v.count, "pending_training": v.pending, "build": v.build,
                              "search_params": v.params if n in self._params_dirty else mf.search_params(disk, n)}
                          for n, v in self._views.items()}
                return seq, files, states
        raise StoreError(f"index {self.path}: the views stayed dirty through {CLEAN_TRIES} reloads; no snapshot")

    def _commit_snapshot(self, disk: dict[str, Any], files: snaps.NewFiles, seq: int,
                         states: dict[str, dict]) -> dict[str, Any]:
        """Commit written files (caller holds the snapshot lock), prune the log rows both named snapshots cover."""
        new = snaps.write_snapshot(self.path, disk, files, seq, states, bad=self._bad)
        prev_seq = min((s.get("previous") or {"seq": 0})["seq"] for s in new["views"].values())
        jr = self._journal
        try:
            with jr.write_lock, jr.transaction() as conn:
                Journal.prune(conn, mf.manifest_seq(new), prev_seq)
        except Exception as e:  # noqa: BLE001 - the snapshot is committed; pruning waits for the next
            LOG.warning("index %s: pruning the log failed: %s", self.path, e)
        self._adopt(new)
        return new

    def _adopt(self, manifest: dict[str, Any]) -> None:
        """Take a committed manifest as this process's view of it (and other processes' tuned params)."""
        for n, v in self._views.items():
            if n in self._params_dirty:
                mf.set_search_params(manifest, n, dict(v.params))
            else:
                v.params = mf.search_params(manifest, n)
        self._manifest = manifest

    # ------------------------------------------------------------------ IVF/PQ training, HNSW rebuilds
    def _views_due(self, background: bool = False) -> None:
        """Train the IVF/PQ views that have enough vectors, rebuild the HNSW views past their tombstone limit,
        once per index: only the holder of the build lock builds (others skip, and load its snapshot)."""
        if self.readonly or (background and time.monotonic() < self._schedule.train_retry_at):
            return
        if not any(self._due(v) for v in self._views.values()):
            return
        with self._train_mutex:
            lock = snaps.SnapshotLock(self.path, BUILD_LOCK)
            try:
                lock.acquire(0.0 if background else BUILD_WAIT_S)
            except snaps.SnapshotLockHeld as e:
                LOG.info("index %s: %s; this process loads its result instead", self.path, e)
                return
            try:
                self._follow(mf.read_manifest(self.path))  # built by another process meanwhile: load it
                for name in [n for n, v in self._views.items() if self._due(v)]:
                    try:
                        self._build(name)
                    except Exception:
                        self._schedule.train_retry_at = time.monotonic() + MAX_BACKOFF_S  # e.g. out of memory
                        raise
            finally:
                lock.release()

    def _build(self, name: str) -> None:
        """Build a view's new index from a copy with no store lock held (searches and writes go on meanwhile);
        then, under the snapshot lock, replay into it the log rows that arrived meanwhile, commit it as the view's
        snapshot and load it from there like every other process (caller holds the build lock)."""
        with self._rw.read():
            v = self._views[name]
            kind = None if self._dirty else self._due(v)
            if kind is None:
                return
            seq0, dead, old_factory, storage = self._applied, v.tomb, v.factory, v.storage
            reason = v.retype_reason(self.view_budget_mb()) if kind == "retype" else None
            blob = faiss.serialize_index(v.index)
        copied = faiss.deserialize_index(blob)  # tomb sets are replaced, never changed in place
        del blob  # not held through the build: memory is the live index, the copy and the new one
        choice = None
        if kind == "retype":
            choice, new = retyped_copy(name, old_factory, v.metric, copied, self.view_budget_mb(), str(reason),
                                       storage=storage)
            if choice["factory"] == old_factory:  # nothing better: look again when the view has doubled
                self._retype_skip[name] = 2 * int(copied.ntotal)
                LOG.info("view %s: re-chosen as its own type %s; kept", name, old_factory)
                return
        elif kind == "train":
            new = trained_copy(name, v.factory, v.metric, copied)
        else:
            new = rebuilt_copy(name, v.factory, v.dim, v.metric, copied, dead)
        del copied
        with self._snap_mutex:
            lock = snaps.SnapshotLock(self.path)
            lock.acquire(BUILD_WAIT_S)
            try:
                jr = self._journal
                if self._closed or jr is None or jr.closed:
                    return  # closed meanwhile: the copy is dropped
                disk = mf.read_manifest(self.path)
                spec = disk["views"][name]
                if choice is not None:
                    if spec["factory"] != old_factory:
                        LOG.info("view %s: re-chosen by another process meanwhile; this build is dropped", name)
                        return
                    spec = spec | {"factory": choice["factory"]}
                with jr.read_lock:
                    rows = Journal.rows_after(jr.read, seq0)
                if rows is None:
                    LOG.warning("view %s: log rows pruned while building its new index; building again later", name)
                    return
                fresh = _View(name, spec)
                fresh.index = new
                fresh.refresh_state()
                for _, op, payload in rows:  # exactly as _apply does in every process
                    self._apply(op, unpack(payload), [fresh])
                seq, number = (rows[-1][0] if rows else seq0), int(spec.get("builds", 0)) + 1
                state = {"count": fresh.count, "pending_training": fresh.pending, "build": number, "builds": number,
                         "search_params": spec.get("search_params") or {}}
                if choice is not None:  # the new type, why, and its measured nprobe (the old params do not apply)
                    state |= {"factory": choice["factory"], "choice": choice,
                              "search_params": {"nprobe": choice["nprobe"]} if choice.get("nprobe") else {}}
                files = snaps.NewFiles(self.path, seq)
                try:
                    files.write(name, fresh.write)  # `fresh` is this thread's alone: no store lock needed
                except BaseException:
                    files.discard()
                    raise
                del new, fresh
                committed = self._commit_snapshot(disk, files, seq, {name: state})
                LOG.info("view %s: %s build %d of this index committed at seq %d by pid %d", name,
                         {"train": "training", "rebuild": "rebuild", "retype": "re-chosen"}[kind], number, seq,
                         os.getpid())
            finally:
                lock.release()
        self._follow(committed)  # this process loads it as every other one does
