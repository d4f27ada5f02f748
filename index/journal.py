"""The committed log of an index directory: ``meta.sqlite`` (items, the write-ahead log of vector changes, state).

SQLite is the commit point for items and log rows and arbitrates writers across threads and processes:
``journal_mode=WAL``, ``synchronous=FULL``, ``busy_timeout``; a write is one ``BEGIN IMMEDIATE`` transaction
that checks keys, allocates ids (``state.next_id``), inserts the items and one ``wal`` row, and commits.
``wal.seq`` is AUTOINCREMENT and writers serialize, so seqs are committed in increasing order without holes;
rows are only ever deleted from the low end (:meth:`Journal.prune`), which is how a follower detects that rows
it still needed are gone (:meth:`Journal.rows_after` returns ``None``).

Two connections per store: ``write`` (used by the one writer thread of the process, inside transactions) and
``read`` (searches' lookups, following the log); both are guarded by their own lock by the caller.
"""
from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, metadata TEXT, views TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS wal(seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO state VALUES ('next_id', 0), ('snapshot_seq', 0), ('prev_seq', 0);
"""
BUSY_TIMEOUT_MS = 30_000
Row = tuple[int, str, bytes]  # (seq, op, payload)


class Gap(Exception):
    """Log rows a process needs were pruned: it must reload from the committed snapshot."""


FailureHook = Callable[[BaseException, str], "BaseException | None"]


def _raise(error: BaseException, stage: str, on_failure: FailureHook | None) -> NoReturn:
    """Raise what ``on_failure`` makes of ``error`` (called inside the ``except`` that caught it)."""
    instead = on_failure(error, stage) if on_failure is not None else None
    if instead is None:
        raise error
    raise instead from error


def unpack(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class Journal:
    """SQLite side of a store. Methods taking ``conn`` run on the connection the caller holds the lock of."""

    def __init__(self, path: Path, readonly: bool) -> None:
        db = path / "meta.sqlite"
        self.readonly = readonly
        self.read_lock, self.write_lock = threading.Lock(), threading.Lock()
        self.write: sqlite3.Connection | None = None
        if not readonly:
            self.write = self._connect(db, False)
            self.write.executescript(SCHEMA)
        self.read: sqlite3.Connection | None = self._connect(db, readonly)
        self._open, self._on_failure = False, None  # the transaction of transaction(), and its failure hook

    @staticmethod
    def _connect(db: Path, readonly: bool) -> sqlite3.Connection:
        if readonly:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
        else:
            conn = sqlite3.connect(db, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return conn

    def close(self) -> None:
        with self.write_lock, self.read_lock:
            for conn in (self.write, self.read):
                if conn is not None:
                    conn.close()
            self.write = self.read = None

    @property
    def closed(self) -> bool:
        return self.read is None

    # ------------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def transaction(self, on_failure: FailureHook | None = None) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` on the write connection (caller holds ``write_lock``); COMMIT when the block ends,
        or earlier with :meth:`commit` (a caller that commits under a lock of its own); ROLLBACK on any exception.

        ``on_failure(error, stage)``, stage ``'begin'``, ``'body'`` or ``'commit'``, is called once the transaction
        is rolled back (for ``'commit'`` inside :meth:`commit`, so under the caller's locks) and returns the
        exception to raise instead (chained to ``error``), or None to re-raise ``error``."""
        conn = self.write
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as e:
            _raise(e, "begin", on_failure)
        self._open, self._on_failure = True, on_failure
        try:
            yield conn
        except BaseException as e:
            if not self._open:  # commit() failed: rolled back and reported already
                raise
            self._open = False
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            _raise(e, "body", on_failure)
        if self._open:
            self.commit()

    def commit(self) -> None:
        """COMMIT the transaction open in :meth:`transaction` now; on failure ROLLBACK, then its failure hook."""
        conn, self._open = self.write, False
        try:
            conn.execute("COMMIT")
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            _raise(e, "commit", self._on_failure)

    # ------------------------------------------------------------------ queries (any connection)
    @staticmethod
    def state(conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT value FROM state WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def last_seq(conn: sqlite3.Connection) -> int:
        """The seq of the last committed log row (0 if none ever)."""
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='wal'").fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def rows_after(conn: sqlite3.Connection, seq: int, upto: int | None = None) -> list[Row] | None:
        """Log rows with ``seq < s <= upto`` (default: the last committed) in order, or None when some of them
        were pruned (a gap: the caller must reload from a snapshot)."""
        upto = Journal.last_seq(conn) if upto is None else upto
        rows = [(int(s), op, p) for s, op, p in conn.execute(
            "SELECT seq, op, payload FROM wal WHERE seq > ? AND seq <= ? ORDER BY seq", (seq, upto))]
        if len(rows) != max(0, upto - seq) or (rows and rows[0][0] != seq + 1):
            return None
        return rows

    @staticmethod
    def rows_for(conn: sqlite3.Connection, keys: list[str]) -> dict[str, tuple[int, str]]:
        """``{key: (id, views)}`` of the stored keys among ``keys`` (one JSON parameter, however many keys)."""
        return {k: (i, vs) for k, i, vs in conn.execute(
            "SELECT key, id, views FROM items WHERE key IN (SELECT value FROM json_each(?))",
            (json.dumps(keys, ensure_ascii=False),))}

    @staticmethod
    def items_by_id(conn: sqlite3.Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
        return {i: {"id": i, "key": key, "metadata": json.loads(meta) if meta else {}}
                for i, key, meta in conn.execute(
                    "SELECT id, key, metadata FROM items WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps(ids),))}

    @staticmethod
    def live_ids(conn: sqlite3.Connection, view: str) -> np.ndarray:
        return np.fromiter((r[0] for r in conn.execute(
            "SELECT items.id FROM items, json_each(items.views) WHERE json_each.value = ?", (view,))), dtype=np.int64)

    @staticmethod
    def count_items(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    # ------------------------------------------------------------------ writes (inside transaction())
    @staticmethod
    def insert_add(conn: sqlite3.Connection, keys: list[str], meta_json: list[str], views_json: str,
                   payload_of: Any) -> tuple[np.ndarray, int]:
        """Allocate ids, insert items and the log row (``payload_of(ids) -> bytes``); returns (ids, seq).
        Raises sqlite3.IntegrityError on a duplicate key."""
        start = Journal.state(conn, "next_id")
        ids = np.arange(start, start + len(keys), dtype=np.int64)
        conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?)",
                         zip(ids.tolist(), keys, meta_json, [views_json] * len(keys)))
        cur = conn.execute("INSERT INTO wal(op, payload) VALUES ('add', ?)", (payload_of(ids),))
        conn.execute("UPDATE state SET value=? WHERE name='next_id'", (start + len(keys),))
        return ids, int(cur.lastrowid)

    @staticmethod
    def insert_remove(conn: sqlite3.Connection, ids: list[int], payload: bytes) -> int:
        conn.executemany("DELETE FROM items WHERE id=?", [(i,) for i in ids])
        cur = conn.execute("INSERT INTO wal(op, payload) VALUES ('remove', ?)", (payload,))
        return int(cur.lastrowid)

    @staticmethod
    def prune(conn: sqlite3.Connection, snapshot_seq: int, prev_seq: int) -> None:
        """Record the committed snapshots' seqs and delete log rows both of them cover."""
        conn.execute("UPDATE state SET value=? WHERE name='snapshot_seq'", (snapshot_seq,))
        conn.execute("UPDATE state SET value=? WHERE name='prev_seq'", (prev_seq,))
        conn.execute("DELETE FROM wal WHERE seq <= ?", (prev_seq,))
