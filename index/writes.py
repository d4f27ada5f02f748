"""Writes of an index store: one SQLite transaction per add/remove (``Journal.transaction``), applied to the
in-memory views before it commits (a mixin of :class:`index.store.IndexStore`; see its module docstring). Reads
never come here: they share only the input checks (``index/inputs.py``) and the follow path (``loading.py``)."""
from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

import numpy as np

from index.durable import _pack
from index.errors import DuplicateKeyError, NotWritableError, StoreError, UnknownKeyError, WriteFailed
from index.inputs import check_add, check_keys
from index.journal import Gap, Journal

LOG = logging.getLogger(__name__)


class Writes:
    """add/remove. Relies on IndexStore's attributes, ``_catch_up``, ``_reload`` and ``_note_write``."""

    # ------------------------------------------------------------------ writes
    def _writable(self) -> Journal:
        if self.readonly:
            raise NotWritableError("index is open readonly")
        if self._closed or self._journal is None:
            raise NotWritableError("index is closed")
        return self._journal

    def _commit(self, prepare: Any, apply: Any) -> Any:
        """One write in ``Journal.transaction``: ``prepare(conn) -> (result, seq)`` inserts the rows; under the
        writer lock catch up with other processes' rows, ``apply()`` this one, COMMIT. Any failure rolls back
        (:meth:`_write_failed` says what the caller sees)."""
        with self._wmutex:
            jr = self._writable()
            if self._dirty:
                with self._rw.write():
                    self._reload()
            with jr.write_lock, jr.transaction(on_failure=self._write_failed) as conn:
                result, seq = prepare(conn)
                with self._rw.write():
                    self._apply_uncommitted(conn, seq, apply)
                    jr.commit()  # still under the writer lock: no search here sees an uncommitted vector
                    self._applied = seq
            self._note_write()
            return result

    def _apply_uncommitted(self, conn: sqlite3.Connection, seq: int, apply: Any) -> None:
        """Bring the views to the row before ``seq`` and apply this write's (caller holds the writer lock); on
        failure the views are marked dirty (reloaded before their next use) and the write is rolled back."""
        try:
            try:
                self._catch_up(conn, seq - 1)
            except Gap:
                self._reload()  # the committed state, without this uncommitted row
            apply()
        except BaseException as e:
            self._dirty = True
            LOG.error("index %s: applying a write failed (%s: %s); rolled back", self.path, type(e).__name__, e)
            if isinstance(e, StoreError):
                raise
            raise WriteFailed(f"the write was rolled back: {type(e).__name__}: {e}") from e

    def _write_failed(self, e: BaseException, stage: str) -> BaseException | None:
        """The failure hook of a write's transaction (already rolled back): the error the caller gets, or None
        for ``e`` itself (a duplicate or unknown key, a failure of applying it: already a StoreError)."""
        if stage == "commit":
            self._dirty = True  # the views hold a row that is not committed (called under the writer lock)
            return WriteFailed(f"the write was not committed: {e}") if isinstance(e, sqlite3.Error) else None
        if not isinstance(e, sqlite3.Error):
            return None
        if stage == "begin":
            return WriteFailed(f"index {self.path}: cannot start a write: {e}")
        return WriteFailed(f"the write was rolled back: {type(e).__name__}: {e}")  # e.g. disk full, busy too long

    def add(self, keys: list[str], vectors: dict[str, np.ndarray], metadata: list[dict] | None = None) -> np.ndarray:
        """Add items; ``vectors[view]`` is (len(keys), dim). Returns their int64 ids. Durable on return."""
        self._writable()
        keys, xs, metadata, meta_json = check_add(keys, vectors, metadata, self._views)
        n = len(keys)
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
        keys = check_keys(keys)
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
