"""Writes of an index store: validation, and one SQLite transaction per add/remove that is applied to the
in-memory views before it commits (a mixin of :class:`index.store.IndexStore`; see its module docstring)."""
from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

import numpy as np

from index.durable import _pack
from index.errors import DuplicateKeyError, NotWritableError, StoreError, UnknownKeyError, WriteFailed
from index.journal import Gap, Journal

LOG = logging.getLogger(__name__)


class Writes:
    """add/remove. Relies on IndexStore's attributes, ``_catch_up`` and ``_reload``."""

    # ------------------------------------------------------------------ writes
    def _writable(self) -> Journal:
        if self.readonly:
            raise NotWritableError("index is open readonly")
        if self._closed or self._journal is None:
            raise NotWritableError("index is closed")
        return self._journal

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
        for k in keys:
            try:
                k.encode("utf-8")
            except UnicodeEncodeError:
                raise StoreError(f"key {k!r} is not valid UTF-8 text (a lone surrogate)") from None
        if len(set(keys)) != len(keys):
            dup = next(k for i, k in enumerate(keys) if k in keys[:i])
            raise DuplicateKeyError(f"duplicate key {dup!r} in the request")
        return keys

    def _commit(self, prepare: Any, apply: Any) -> Any:
        """One write: BEGIN IMMEDIATE; ``prepare(conn) -> (result, seq)`` inserts the rows; under the writer lock
        catch up with other processes' rows, ``apply()`` this one, COMMIT. Any failure rolls back."""
        with self._wmutex:
            jr = self._writable()
            if self._dirty:
                with self._rw.write():
                    self._reload()
            with jr.write_lock:
                conn = jr.write
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as e:
                    raise WriteFailed(f"index {self.path}: cannot start a write: {e}") from e
                done = False
                try:
                    try:
                        result, seq = prepare(conn)
                    except sqlite3.Error as e:  # e.g. disk full, or busy past the timeout
                        raise WriteFailed(f"the write was rolled back: {type(e).__name__}: {e}") from e
                    with self._rw.write():
                        try:
                            try:
                                self._catch_up(conn, seq - 1)
                            except Gap:
                                self._reload()  # the committed state, without this uncommitted row
                            apply()
                        except BaseException as e:
                            self._dirty = True
                            LOG.error("index %s: applying a write failed (%s: %s); rolled back", self.path,
                                      type(e).__name__, e)
                            if isinstance(e, StoreError):
                                raise
                            raise WriteFailed(f"the write was rolled back: {type(e).__name__}: {e}") from e
                        try:
                            conn.execute("COMMIT")
                        except sqlite3.Error as e:
                            self._dirty = True  # the views hold a row that is not committed
                            raise WriteFailed(f"the write was not committed: {e}") from e
                        done, self._applied = True, seq
                finally:
                    if not done:
                        try:
                            conn.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass
            self._note_write()
            return result

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
        out: dict[str, np.ndarray] = {}

        def prepare(conn: sqlite3.Connection) -> tuple[np.ndarray, int]:
            present = Journal.rows_for(conn, keys)
            if present:
                raise DuplicateKeyError(f"key {next(k for k in keys if k in present)!r} already exists "
                                        f"({len(present)} of {n} keys already exist)")
            try:
                ids, seq = Journal.insert_add(conn, keys, meta_json, views_json,
                                              lambda ids: _pack({"ids": ids, **{f"x::{v}": x for v, x in xs.items()}}))
            except sqlite3.IntegrityError as e:
                raise DuplicateKeyError(f"a key already exists: {e}") from None
            out["ids"] = ids
            return ids, seq

        def apply() -> None:
            for view, x in xs.items():
                self._views[view].add(out["ids"], x)

        return self._commit(prepare, apply)

    def remove(self, keys: list[str]) -> int:
        """Remove items by key (all of them, or none if a key is unknown). Durable on return."""
        self._writable()
        keys = self._check_keys(keys)
        if not keys:
            return 0
        per_view: dict[str, np.ndarray] = {}

        def prepare(conn: sqlite3.Connection) -> tuple[int, int]:
            rows = Journal.rows_for(conn, keys)
            missing = [k for k in keys if k not in rows]
            if missing:
                raise UnknownKeyError(f"unknown key {missing[0]!r} ({len(missing)} of {len(keys)} keys unknown); "
                                      "nothing removed")
            lists: dict[str, list[int]] = {}
            for k in keys:
                i, vs = rows[k]
                for view in json.loads(vs):
                    lists.setdefault(view, []).append(i)
            per_view.update({v: np.asarray(i, dtype=np.int64) for v, i in lists.items()})
            seq = Journal.insert_remove(conn, [rows[k][0] for k in keys],
                                        _pack({f"ids::{v}": i for v, i in per_view.items()}))
            return len(keys), seq

        def apply() -> None:
            for view, ids in per_view.items():
                self._views[view].remove(ids)

        return self._commit(prepare, apply)
