"""Thumbnails and search-by-key vectors of an index's items, for the web page: ``<index>/thumbs.sqlite``.

Two kinds of rows per item, in one table ``item_thumbs(item_id, key, kind, mime, data)``, keyed by
``(item_id, kind)``:

* display thumbnails, all WebP at quality ``THUMB_QUALITY`` (80, lossy), at most ``THUMB_PX`` (96) pixels on
  the longer side and at most ``THUMB_MAX_BYTES`` (3,500) bytes (a busier picture is stored at a lower quality,
  then smaller, until it fits; so a row never needs an SQLite overflow page): ``rgb``, ``depth`` (colour-mapped
  with viridis, near = dark, far = yellow) and ``normals`` (camera-space normals as colours, (n + 1) / 2, derived
  from depth when the data has no normals);
* the item's embeddings, ``emb:<view>`` for every indexed view, float16 little-endian (``application/x-float16``,
  2 x dim bytes): the vector the index holds for the item, so ``/search_by_key`` searches with it directly
  instead of re-embedding a stored input. float16 keeps 11 significant bits: each component is within 2^-11
  of itself relatively (2^-25 absolutely below 2^-14), so a score moves by at most 2^-11 ||q|| ||x|| +
  2^-25 ||x||_1, under ``FLOAT16_SCORE_BOUND`` (5e-4) for the unit-norm embeddings, and ranks change only
  between hits whose scores are within twice that.

Bytes per item (``python -m index.thumbs measure``, BENCHMARKS.md "Thumbnail storage"): 1.4 to 4.3 KB of file
(CIFAR-10 in two views to the load test's noisy pictures in three), against 6.6 to 24.9 KB when the query inputs
were kept as lossless PNG. Files written before (rows
``input:rgb`` / ``input:depth``, lossless PNG at the model's input size, and ``input:<vector view>``, raw
float32) still work: ``get_input`` reads them and the server re-embeds them when an item has no ``emb:`` row;
``python -m index.thumbs compact DIR`` rewrites such a file in the current format.

Written by ``index.build`` (and so by the default gallery of ``python -m train.pretrain``) and by the server's
``/index/add``. The file is separate from ``meta.sqlite`` so that the index store stays the only owner of its
own transactions; losing it loses only pictures and search-by-key. WAL mode and a busy timeout let several
server workers read and write it at once.

Rows belong to item ids, not keys: a key can be removed and added again, and ids are never reused. Writers
store rows under the ids that ``IndexStore.add`` returned; readers find them by key through the key's current
id, read from the index's ``meta.sqlite`` (attached read-only, never written), so a row left by a removed item
(its thumbnail written after the remove, say) is never served for a later item with the same key; such rows
are deleted by the hooks below. Files of the older format (``thumbs(key, kind, ...)``, keyed by key) are
migrated when opened: each row moves to the current id of its key, rows of keys no longer stored are dropped.
"""
from __future__ import annotations

import io
import logging
import random
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image


LOG = logging.getLogger(__name__)

FILE = "thumbs.sqlite"
META = "meta.sqlite"  # the index's items: thumbnails are found through them
THUMB_PX = 96
THUMB_QUALITY = 80  # WebP quality of every display thumbnail (lossy: for display only)
THUMB_MAX_BYTES = 3500  # one thumbnail's bound: a row (with its key) fits an SQLite page, no overflow page
_QUALITIES = (THUMB_QUALITY, 60, 40, 20)  # tried in turn until a thumbnail fits THUMB_MAX_BYTES
EMB_MIME = "application/x-float16"  # emb:<view> rows: the item's indexed vector, float16 little-endian
# float16 rounds a component within 2^-11 of itself (relative), or 2^-25 (absolute) below 2^-14 (subnormals), so
# |score(q16, x) - score(q, x)| <= 2^-11 ||q|| ||x|| + 2^-25 ||x||_1: at most 4.9e-4 for unit vectors of up to
# 4096 dimensions (inner product; the same for L2 distances between them).
FLOAT16_SCORE_BOUND = 5e-4
DISPLAY_KINDS = ("rgb", "depth", "normals")  # default preference when no view is named
_SCHEMA = """
CREATE TABLE IF NOT EXISTS item_thumbs(item_id INTEGER NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL,
                                       mime TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (item_id, kind));
CREATE INDEX IF NOT EXISTS item_thumbs_key ON item_thumbs(key);
"""
# viridis at 9 stops (matplotlib's table, sampled); interpolated to 256 entries
_VIRIDIS9 = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129],
                      [92, 200, 99], [170, 220, 50], [253, 231, 37]], np.float64)
VIRIDIS = np.stack([np.interp(np.linspace(0, 8, 256), np.arange(9), _VIRIDIS9[:, c]) for c in range(3)],
                   axis=1).round().astype(np.uint8)  # (256, 3)


# ---------------------------------------------------------------------------------------------- rendering
def _bounded(im: Image.Image, px: int = THUMB_PX) -> Image.Image:
    if max(im.size) > px:
        im = im.copy()
        im.thumbnail((px, px), Image.BILINEAR)
    return im


def _webp(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


def encode_thumb(im: Image.Image, max_bytes: int = THUMB_MAX_BYTES) -> bytes:
    """A picture -> WebP of at most THUMB_PX on the longer side and at most ``max_bytes``: quality THUMB_QUALITY,
    lower qualities for a busier picture, then halved sides until it fits (noise at 96 px fits at quality 20)."""
    im = _bounded(im.convert("RGB"))
    while True:
        for q in _QUALITIES:
            data = _webp(im, q)
            if len(data) <= max_bytes:
                return data
        if max(im.size) <= 8:
            raise ValueError(f"a {im.size} thumbnail does not fit in {max_bytes} bytes")
        im = im.resize((max(1, im.size[0] // 2), max(1, im.size[1] // 2)), Image.BILINEAR)


def colormap_depth(d: np.ndarray) -> np.ndarray:
    """uint16 depth (H, W) -> uint8 (H, W, 3) viridis, stretched over the map's own range (near dark, far yellow)."""
    x = np.asarray(d, np.float64)
    lo, hi = float(x.min()), float(x.max())
    idx = np.zeros(x.shape, np.intp) if hi <= lo else np.rint((x - lo) / (hi - lo) * 255).astype(np.intp)
    return VIRIDIS[idx]


def normals_from_depth(d: np.ndarray) -> np.ndarray:
    """uint16 depth (H, W) -> uint8 (H, W, 3) normals as colours, by central differences as the normals view
    computes them (x right, y down, z to the camera; a flat wall facing the camera is (128, 128, 255))."""
    x = np.asarray(d, np.float64) / 65535.0
    p = np.pad(x, 1, mode="edge")
    gain = float(max(x.shape))
    dx = (p[1:-1, 2:] - p[1:-1, :-2]) * 0.5 * gain
    dy = (p[2:, 1:-1] - p[:-2, 1:-1]) * 0.5 * gain
    n = -np.stack([dx, dy, -np.ones_like(x)], axis=-1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return np.clip(np.rint((n + 1) / 2 * 255), 0, 255).astype(np.uint8)


def render(kind: str, a: np.ndarray) -> tuple[str, bytes]:
    """A display thumbnail of one source array -> (mime, WebP bytes), at most THUMB_PX on the longer side and
    THUMB_MAX_BYTES long. kind 'rgb': uint8 (H, W, 3); 'depth': uint16 (H, W); 'normals': uint16 depth (H, W)
    or uint8 (H, W, 3)."""
    a = np.asarray(a)
    if kind not in ("rgb", "depth", "normals"):
        raise ValueError(f"unknown thumbnail kind {kind!r}")
    colour = a.ndim == 3 and a.shape[2] == 3 and kind != "depth"
    if not (colour or (kind != "rgb" and a.ndim == 2)) or 0 in a.shape:
        want = {"rgb": "(H, W, 3)", "depth": "(H, W)", "normals": "(H, W) depth or (H, W, 3)"}[kind]
        raise ValueError(f"a {kind} thumbnail needs an {want} image, got shape {a.shape}")
    rgb = a if colour else colormap_depth(a) if kind == "depth" else normals_from_depth(a)
    return "image/webp", encode_thumb(Image.fromarray(np.ascontiguousarray(rgb, np.uint8)))


def encode_embedding(z: np.ndarray) -> bytes:
    """One indexed vector (D,) -> the bytes of its ``emb:<view>`` row (float16 little-endian)."""
    z = np.asarray(z, np.float32).reshape(-1)
    if not np.isfinite(z).all() or np.abs(z).max(initial=0) > 65504:
        raise ValueError("an embedding to store must be finite and within float16's range (|x| <= 65504)")
    return z.astype("<f2").tobytes()


def decode_embedding(mime: str, data: bytes) -> np.ndarray:
    """The bytes of an ``emb:<view>`` row -> float32 (D,) (float16 rows; float32 ones are read too)."""
    dtype = {EMB_MIME: "<f2", "application/x-float32": "<f4"}.get(mime)
    if dtype is None:
        raise ValueError(f"an embedding row of type {mime!r}: expected {EMB_MIME}")
    return np.frombuffer(data, dtype).astype(np.float32)


def kind_of_view(name: str, source: str) -> str | None:
    """The display kind that shows an item in a view: rgb views -> 'rgb', 'normals' -> 'normals', other depth
    views -> 'depth', vector views -> None (no picture; the page falls back to any kind)."""
    if source == "rgb":
        return "rgb"
    if source == "depth":
        return "normals" if name == "normals" else "depth"
    return None


def item_rows(key: str, sources: Mapping[str, Any], views: Mapping[str, str],
              vectors: Mapping[str, np.ndarray] | None = None) -> list[tuple]:
    """Rows (key, kind, mime, data) of one item. ``sources``: 'rgb' uint8 (H, W, 3), 'depth' uint16 (H, W),
    optional 'normals' uint8 (H, W, 3); ``views``: view name -> source of the model; ``vectors``: view name ->
    the item's indexed vector (D,), as ``IndexStore.add`` received it (one ``emb:<view>`` row each)."""
    rows: list[tuple] = []
    srcs = set(views.values())
    if "rgb" in srcs and "rgb" in sources:
        rows.append((key, "rgb", *render("rgb", np.asarray(sources["rgb"]))))
    if "depth" in srcs and "depth" in sources:
        d = np.asarray(sources["depth"])
        if any(s == "depth" and v != "normals" for v, s in views.items()):
            rows.append((key, "depth", *render("depth", d)))
        if "normals" in views:
            n = sources.get("normals")
            rows.append((key, "normals", *render("normals", np.asarray(n) if n is not None else d)))
    for v, z in (vectors or {}).items():
        rows.append((key, f"emb:{v}", EMB_MIME, encode_embedding(z)))
    return rows


# ---------------------------------------------------------------------------------------------- the file
class ThumbStore:
    """``<index>/thumbs.sqlite``: rows by (item id, kind), looked up by key through the key's current item id in
    the index's ``meta.sqlite`` (attached read-only), so rows of removed items are never served; safe to share
    between threads. Opening a file of the older key-keyed format migrates it (see the module docstring)."""

    def __init__(self, index_dir: str | Path, readonly: bool = False):
        self.path = Path(index_dir) / FILE
        self.readonly = readonly
        meta = Path(index_dir) / META
        if not meta.exists():
            raise FileNotFoundError(f"no index at {index_dir} (missing {META}): thumbnails belong to an index's items")
        self._db = self._connect(self.path, meta, readonly)
        if not readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        self._base, self._join = "item_thumbs", "i.id = b.item_id"
        if self._has(self._db, "thumbs"):  # written by an older version: keyed by key
            self._migrate(meta)
        self._lock = threading.Lock()

    @staticmethod
    def _connect(path: Path, meta: Path, readonly: bool) -> sqlite3.Connection:
        uri = path.resolve().as_uri() + ("?mode=ro" if readonly else "")
        db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
        db.execute("ATTACH DATABASE ? AS meta", (meta.resolve().as_uri() + "?mode=ro",))
        return db

    @staticmethod
    def _has(db: sqlite3.Connection, table: str) -> bool:
        return db.execute("SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone() \
            is not None

    def _migrate(self, meta: Path) -> None:
        """Rows of the older format (``thumbs(key, kind, ...)``) move to ``item_thumbs`` under the current id of
        their key; rows of keys no longer stored are dropped. A read-only opener migrates through a writable
        connection of its own; where the file cannot be written at all, it reads the old rows by key."""
        db = self._db if not self.readonly else None
        try:
            db = db or self._connect(self.path, meta, False)
            db.executescript(_SCHEMA)
            db.execute("BEGIN IMMEDIATE")
            try:
                if self._has(db, "thumbs"):  # not migrated by another process meanwhile
                    n = db.execute("INSERT OR REPLACE INTO item_thumbs(item_id, key, kind, mime, data) "
                                   "SELECT i.id, t.key, t.kind, t.mime, t.data FROM main.thumbs AS t "
                                   "JOIN meta.items AS i ON i.key = t.key").rowcount
                    db.execute("DROP TABLE main.thumbs")
                    LOG.info("%s: migrated %d thumbnail rows to item ids", self.path, n)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            LOG.warning("%s: cannot migrate the older thumbnail format (%s); reading it by key", self.path, e)
            self._base, self._join = "thumbs", "i.key = b.key"
        finally:
            if db is not None and db is not self._db:
                db.close()

    @classmethod
    def exists(cls, index_dir: str | Path) -> bool:
        return "://" not in str(index_dir) and (Path(index_dir) / FILE).exists()  # a Milvus URL keeps none

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ThumbStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def put(self, rows: Iterable[tuple], ids: Mapping[str, int]) -> int:
        """Store rows ``(key, kind, mime, data)`` (``item_rows``) under the item id of their key: ``ids[key]``,
        as ``IndexStore.add`` returned it (never the key's current id: the key may belong to a later item)."""
        rows = [(int(ids[r[0]]), *r) for r in rows]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO item_thumbs(item_id, key, kind, mime, data) "
                                 "VALUES (?, ?, ?, ?, ?)", rows)
        return len(rows)

    def drop_dead(self, keys: Iterable[str] | None = None, ids: Iterable[int] | None = None) -> int:
        """Delete the rows (of these keys, of these ids, or all) whose item id is no longer stored."""
        dead = "NOT EXISTS (SELECT 1 FROM meta.items AS i WHERE i.id = item_thumbs.item_id)"
        with self._lock, self._db:
            if keys is None and ids is None:
                return self._db.execute(f"DELETE FROM item_thumbs WHERE {dead}").rowcount
            if keys is not None:
                cur = self._db.executemany(f"DELETE FROM item_thumbs WHERE key = ? AND {dead}", [(k,) for k in keys])
            else:
                cur = self._db.executemany(f"DELETE FROM item_thumbs WHERE item_id = ? AND {dead}",
                                           [(int(i),) for i in ids])
            return cur.rowcount

    def remove(self, keys: list[str]) -> None:
        """Forget the rows of removed items (those of a key's current item stay)."""
        self.drop_dead(keys=keys)

    def add_sources(self, keys: list[str], sources: Mapping[str, np.ndarray], views: Mapping[str, str], *,
                    ids: Iterable[int], vectors: Mapping[str, np.ndarray]) -> int:
        """A batch of a Dataset's sources (arrays aligned on the first axis) and the vectors the index received
        for them (view -> (N, D)) -> rows for every key, stored under ``ids`` (the items' ids, aligned with
        ``keys``)."""
        rows = [r for i, k in enumerate(keys)
                for r in item_rows(k, {s: a[i] for s, a in sources.items()}, views,
                                   {v: z[i] for v, z in vectors.items()})]
        return self.put(rows, dict(zip(keys, (int(i) for i in ids))))

    def current_ids(self, keys: list[str]) -> list[int | None]:
        """The id of the item that holds each key now (None if no stored item has it)."""
        with self._lock:
            found = dict(self._db.execute(f"SELECT key, id FROM meta.items WHERE key IN ({','.join('?' * len(keys))})",
                                          list(keys)).fetchall()) if keys else {}
        return [found.get(k) for k in keys]

    def get(self, key: str, kind: str | None = None) -> tuple[str, str, bytes] | None:
        """(kind, mime, data) of ``kind``, or of the first display kind stored when kind is None, for the item
        that holds ``key`` now (None when no stored item has it)."""
        kinds = (kind,) if kind else DISPLAY_KINDS
        with self._lock:
            rows = self._db.execute(f"SELECT b.kind, b.mime, b.data FROM meta.items AS i JOIN {self._base} AS b "
                                    f"ON {self._join} WHERE i.key = ? AND b.kind IN ({','.join('?' * len(kinds))})",
                                    (key, *kinds)).fetchall()
        by = {r[0]: r for r in rows}
        for k in kinds:
            if k in by:
                return by[k][0], by[k][1], bytes(by[k][2])
        return None

    def get_embedding(self, key: str, view: str) -> np.ndarray | None:
        """The indexed vector of view ``view`` (float32 (D,), from its float16 row) of the item that holds ``key``
        now; None when it has none (an index written before these rows: see ``get_input``)."""
        r = self.get(key, f"emb:{view}")
        return decode_embedding(r[1], r[2]) if r else None

    def get_input(self, key: str, source: str) -> bytes | None:
        """The lossless query input (``input:<source>``) of files written before ``emb:`` rows, or None."""
        r = self.get(key, f"input:{source}")
        return r[2] if r else None

    def random_key(self, rng: random.Random | None = None) -> str | None:
        """The key of a stored item picked at a random row (uniform over rows when rowids have no gaps)."""
        with self._lock:
            lo, hi = self._db.execute(f"SELECT min(rowid), max(rowid) FROM {self._base}").fetchone()
            if lo is None:
                return None
            r = (rng or random).randint(lo, hi)
            sql = (f"SELECT i.key FROM {self._base} AS b JOIN meta.items AS i ON {self._join} "
                   "WHERE b.rowid {} ? ORDER BY b.rowid {} LIMIT 1")
            row = (self._db.execute(sql.format(">=", "ASC"), (r,)).fetchone()
                   or self._db.execute(sql.format("<", "DESC"), (r,)).fetchone())
        return row[0] if row else None

    def __len__(self) -> int:
        """Stored items with thumbnails."""
        with self._lock:
            return int(self._db.execute(f"SELECT count(DISTINCT i.id) FROM {self._base} AS b JOIN meta.items AS i "
                                        f"ON {self._join}").fetchone()[0])


# ---------------------------------------------------------------------------------------------- server hooks
_writers: dict[str, ThumbStore] = {}
_writers_lock = threading.Lock()


def _writer(index_dir: str | Path) -> ThumbStore | None:
    """This process's (cached) writable thumbnail file of an index, or None when the index keeps none.
    An index keeps thumbnails when it has ``thumbs.sqlite`` (``index.build`` makes one unless ``--no-thumbs``)."""
    path = str(Path(index_dir).resolve())
    with _writers_lock:
        ts = _writers.get(path)
        if ts is None and ThumbStore.exists(path):
            ts = _writers[path] = ThumbStore(path)
        return ts


def add_items(index_dir: str | Path, keys: list[str], decoded: Mapping[str, list], rt: Any,
              ids: Iterable[int] | None = None, vectors: Mapping[str, np.ndarray] | None = None) -> int:
    """Thumbnails of items just added through ``/index/add``, from their inputs as the server decoded them
    (``decoded``: source key -> one array per item, ``models.runtime.to_source``), and their embeddings as the
    index received them (``vectors``: view -> (N, D), for ``/search_by_key``; an item with none cannot be
    searched by key). ``ids``: the items' ids as ``IndexStore.add`` returned them; the rows go
    under those ids, so a remove (and a re-add of the key) between the add and this call cannot leave them to
    a later item: rows of an item removed meanwhile are deleted again here, and are never served anyway.
    Without ``ids`` the keys' current ids are used (racy: for callers that do not know them). Never raises:
    the items are already durable, a picture is a nicety; a failure is logged and the count of items written
    is returned (0 for an index that keeps none)."""
    try:
        ts = _writer(index_dir)
        if ts is None:
            return 0
        views = {v: spec["source"] for v, spec in rt.views.items()}
        got = list(ids) if ids is not None else ts.current_ids(keys)
        rows = []
        for i, key in enumerate(keys):
            if got[i] is not None:
                rows += item_rows(key, {src: arrs[i] for src, arrs in decoded.items()}, views,
                                  {v: z[i] for v, z in (vectors or {}).items()})
        ts.put(rows, {k: i for k, i in zip(keys, got) if i is not None})
        ts.drop_dead(ids=[i for i in got if i is not None])  # removed between the add and now
        return sum(i is not None for i in got)
    except (ValueError, TypeError, OSError, sqlite3.Error) as e:
        LOG.warning("thumbnails of %d added items not written: %s", len(keys), e)
        return 0


def remove_items(index_dir: str | Path, keys: list[str]) -> None:
    """Drop the thumbnails of items just removed through ``/index/remove`` (rows of the keys whose item is
    gone; a key added again meanwhile keeps its new item's rows); never raises (logged)."""
    try:
        ts = _writer(index_dir)
        if ts is not None:
            ts.remove(keys)
    except (OSError, sqlite3.Error) as e:
        LOG.warning("thumbnails of %d removed items not deleted: %s", len(keys), e)


# ---------------------------------------------------------------------------------------------- measuring
def stats(index_dir: str | Path) -> dict:
    """What ``<index>/thumbs.sqlite`` costs: stored items, rows and mean bytes by kind, payload bytes per item,
    and the file's bytes per item (the main file, and the write-ahead log beside it, as they are on disk)."""
    path = Path(index_dir) / FILE
    with ThumbStore(index_dir, readonly=True) as ts:
        items = len(ts)
        with ts._lock:
            rows = ts._db.execute(f"SELECT b.kind, count(*), sum(length(b.data)) FROM {ts._base} AS b "
                                  f"JOIN meta.items AS i ON {ts._join} GROUP BY b.kind ORDER BY b.kind").fetchall()
    wal = Path(str(path) + "-wal")
    size, wal_size = path.stat().st_size, (wal.stat().st_size if wal.exists() else 0)
    per = max(items, 1)
    return {"items": items,
            "kinds": {k: {"rows": int(c), "mean_bytes": round(b / c, 1)} for k, c, b in rows},
            "data_bytes_per_item": round(sum(b for _, _, b in rows) / per, 1),
            "file_bytes": size, "wal_bytes": wal_size, "file_bytes_per_item": round(size / per, 1)}


def _measure_data(rt: Any, data: str, split: str, n: int) -> tuple[list[str], dict[str, np.ndarray]]:
    """(keys, sources) of ``n`` items: a data spec, or 'loadtest' (the load test's generated images,
    loadtests/plan.py: smooth colour patterns with noise and tilted depth planes, image_size x 1.25 image_size)."""
    if data == "loadtest":
        from models.data.synth import synth_depth, synth_rgb  # the images the load test adds
        rng = np.random.default_rng(0)
        h, w = rt.image_size, rt.image_size + rt.image_size // 4
        rgb, depth = zip(*[(synth_rgb(rng, h, w), synth_depth(rng, h, w)) for _ in range(n)])
        return [f"loadtest-{i}" for i in range(n)], {"rgb": np.stack(rgb), "depth": np.stack(depth)}
    from models import data as datasets
    ds = datasets.load(data, split, image_size=rt.image_size)  # as index.build reads it
    ds = ds.subset(np.arange(min(n, len(ds))))
    keys = list(ds.keys) or [f"item-{i}" for i in range(len(ds))]
    return keys, ds.sources


def measure(model: str | None, data: str, split: str, n: int, via: str, out: str | Path) -> dict:
    """Write the thumbnails of ``n`` items into a fresh index at ``out`` the way ``via`` does: 'build' (index.build:
    chunks of 256 through ``add_sources``) or 'server' (/index/add: each item's encoded upload decoded by the
    runtime as the server does, embedded, added, then ``add_items``, one transaction per item); -> ``stats``."""
    from models.imageio import encode_png as _png
    from models.runtime import Runtime
    from models.views import source_key
    from .store import IndexStore
    rt = Runtime(model)
    keys, sources = _measure_data(rt, data, split, n)
    views = {v: s["source"] for v, s in rt.views.items() if source_key(v, s) in sources}
    if not views:
        raise ValueError(f"{data} gives {sorted(sources)}, which no view of the model takes")
    store = IndexStore.create(out, views={v: rt.dim for v in views}, fingerprint=rt.fingerprint,
                              model_ref=str(rt.path), follow=False)
    try:
        ThumbStore(out).close()
        if via == "build":
            ts = ThumbStore(out)
            for lo in range(0, len(keys), 256):
                part = {s: a[lo:lo + 256] for s, a in sources.items()}
                vec = {v: rt.embed_sources(v, part) for v in views}
                ids = store.add(keys[lo:lo + 256], vec)
                ts.add_sources(keys[lo:lo + 256], part, views, ids=ids, vectors=vec)
            ts.close()
        elif via == "server":
            for i, key in enumerate(keys):
                decoded: dict[str, list] = {}
                vec = {}
                for v, spec in rt.views.items():
                    if v not in views:
                        continue
                    src = source_key(v, spec)
                    item = sources[src][i] if spec["source"] == "vector" else _png(sources[src][i])
                    dec: list = []
                    vec[v] = rt.embed(v, rt.preprocess(v, [item], decoded=dec))
                    decoded.setdefault(src, dec)
                ids = store.add([key], vec)
                add_items(out, [key], decoded, rt, ids, vec)
        else:
            raise ValueError(f"via must be 'build' or 'server', not {via!r}")
        before = stats(out)
    finally:
        store.close()
        w = _writers.pop(str(Path(out).resolve()), None)
        if w is not None:
            w.close()
    return before | {"via": via, "data": data, "image_size": rt.image_size, "views": sorted(views)}


def compact(index_dir: str | Path, model: str | Path | None = None, batch: int = 256) -> dict:
    """Rewrite a thumbnail file of the earlier format in the current one: each item's lossless query inputs
    (``input:<source>``) are embedded in every indexed view of that source by the index's model (or ``model``) and
    stored as ``emb:<view>`` rows, then deleted; PNG display thumbnails are re-encoded as bounded WebP; the file
    is vacuumed. The server may keep running (it reads an item's input until its ``emb:`` row exists). ->
    ``stats`` before and after."""
    from models.imageio import decode_depth, decode_image, fit_image
    from models.runtime import Runtime
    from models.views import source_key
    from .manifest import read_manifest
    index_dir = Path(index_dir)
    before = stats(index_dir)
    manifest = read_manifest(index_dir)
    rt = Runtime(model or manifest["model_ref"])
    if rt.fingerprint != manifest.get("fingerprint"):
        raise ValueError(f"model {rt.path} (fingerprint {rt.fingerprint}) did not build the index at {index_dir} "
                         f"(fingerprint {manifest.get('fingerprint')}): its vectors would not match")
    by_src: dict[str, list[str]] = {}
    for v in manifest["views"]:
        by_src.setdefault(f"input:{source_key(v, rt.view(v))}", []).append(v)
    with ThumbStore(index_dir) as ts:
        for kind, views in by_src.items():
            vector = rt.view(views[0])["source"] == "vector"
            while True:
                with ts._lock:
                    rows = ts._db.execute("SELECT item_id, key, data FROM item_thumbs WHERE kind = ? LIMIT ?",
                                          (kind, batch)).fetchall()
                if not rows:
                    break
                if vector:
                    x = [np.frombuffer(r[2], "<f4") for r in rows]
                elif kind == "input:depth":
                    x = [fit_image(decode_depth(bytes(r[2])), rt.image_size) for r in rows]
                else:
                    x = [fit_image(decode_image(bytes(r[2])), rt.image_size) for r in rows]
                z = {v: rt.embed(v, rt.preprocess(v, x)) for v in views}
                new = [(r[0], r[1], f"emb:{v}", EMB_MIME, encode_embedding(z[v][i]))
                       for i, r in enumerate(rows) for v in views]
                with ts._lock, ts._db:
                    ts._db.executemany("INSERT OR REPLACE INTO item_thumbs(item_id, key, kind, mime, data) "
                                       "VALUES (?, ?, ?, ?, ?)", new)
                    ts._db.executemany("DELETE FROM item_thumbs WHERE item_id = ? AND kind = ?",
                                       [(r[0], kind) for r in rows])
        last = -1
        while True:  # display thumbnails of the earlier format: PNG -> bounded WebP
            with ts._lock:
                rows = ts._db.execute("SELECT rowid, data FROM item_thumbs WHERE mime = 'image/png' AND rowid > ? "
                                      "ORDER BY rowid LIMIT ?", (last, batch)).fetchall()
            if not rows:
                break
            last = rows[-1][0]
            new = []
            for rowid, data in rows:
                with Image.open(io.BytesIO(data)) as im:
                    new.append(("image/webp", encode_thumb(im), rowid))
            with ts._lock, ts._db:
                ts._db.executemany("UPDATE item_thumbs SET mime = ?, data = ? WHERE rowid = ?", new)
        ts.drop_dead()
        with ts._lock:
            ts._db.execute("PRAGMA main.wal_checkpoint(TRUNCATE)")
            ts._db.execute("VACUUM")
            ts._db.execute("PRAGMA main.wal_checkpoint(TRUNCATE)")
    return {"before": before, "after": stats(index_dir)}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import tempfile
    p = argparse.ArgumentParser(prog="python -m index.thumbs", description="What an index's thumbnails cost.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats", help="bytes per item of an index's thumbs.sqlite, by kind")
    s.add_argument("index", help="index directory")
    m = sub.add_parser("measure", help="write the thumbnails of N items into a fresh index and report stats")
    m.add_argument("--model", default=None, help="model reference (default cmc:latest)")
    m.add_argument("--data", required=True, help="data spec (scenes, cifar10:PATH, ...) or 'loadtest'")
    m.add_argument("--split", default="test", choices=["train", "test"])
    m.add_argument("--n", type=int, default=1000, help="items")
    m.add_argument("--via", default="build", choices=["build", "server"],
                   help="index.build's batched path or the server's /index/add path (one item per transaction)")
    c = sub.add_parser("compact", help="rewrite an earlier-format thumbs.sqlite (lossless inputs, PNG) in the "
                                       "current one (indexed vectors, WebP) and vacuum it")
    c.add_argument("index", help="index directory")
    c.add_argument("--model", default=None, help="the index's model (default: the one its manifest names)")
    a = p.parse_args(argv)
    if a.cmd == "stats":
        out = stats(a.index)
    elif a.cmd == "compact":
        out = compact(a.index, a.model)
    else:
        with tempfile.TemporaryDirectory(prefix="cmc-thumbs-") as d:
            out = measure(a.model, a.data, a.split, a.n, a.via, Path(d) / "index")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
