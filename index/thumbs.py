"""Thumbnails and query inputs of an index's items, for the web page: ``<index>/thumbs.sqlite``.

Two kinds of rows per item key, in one table ``thumbs(key, kind, mime, data)``:

* display thumbnails, at most ``THUMB_PX`` (96) pixels on the longer side: ``rgb`` (WebP), ``depth``
  (colour-mapped with viridis, near = dark, far = yellow; PNG) and ``normals`` (camera-space normals as colours,
  (n + 1) / 2; PNG, derived from depth when the data has no normals);
* query inputs, so that the page can search *with a stored item* in any view (``/search_by_key``):
  ``input:rgb`` and ``input:depth`` hold the source already fitted to the model's input size (``fit_image``:
  an S x S image goes through the runtime unchanged, so the embedding equals the one that was indexed) as
  lossless PNG (16-bit for depth); ``input:<vector view>`` holds the raw float32 vector.

Written by ``index.build`` (and so by the default gallery of ``python -m train.pretrain``) and by the server's
``/index/add``. The file is separate from ``meta.sqlite`` so that the index store stays the only owner of its
own transactions; losing it loses only pictures. WAL mode and a busy timeout let several server workers read
and write it at once.
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import random
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from models.imageio import ImageError, decode_depth, decode_image, encode_png, fit_image

LOG = logging.getLogger(__name__)

FILE = "thumbs.sqlite"
THUMB_PX = 96
DISPLAY_KINDS = ("rgb", "depth", "normals")  # default preference when no view is named
_SCHEMA = """
CREATE TABLE IF NOT EXISTS thumbs(key TEXT NOT NULL, kind TEXT NOT NULL, mime TEXT NOT NULL, data BLOB NOT NULL,
                                  UNIQUE(key, kind));
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


def _save(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 85} if fmt == "WEBP" else {}))
    return buf.getvalue()


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
    """A display thumbnail of one source array -> (mime, bytes), at most THUMB_PX on the longer side.
    kind 'rgb': uint8 (H, W, 3); 'depth': uint16 (H, W); 'normals': uint16 depth (H, W) or uint8 (H, W, 3)."""
    if kind == "rgb":
        return "image/webp", _save(_bounded(Image.fromarray(np.ascontiguousarray(a, np.uint8))), "WEBP")
    if kind == "depth":
        return "image/png", _save(_bounded(Image.fromarray(colormap_depth(a))), "PNG")
    if kind == "normals":
        rgb = a if a.ndim == 3 else normals_from_depth(a)
        return "image/png", _save(_bounded(Image.fromarray(np.ascontiguousarray(rgb, np.uint8))), "PNG")
    raise ValueError(f"unknown thumbnail kind {kind!r}")


def kind_of_view(name: str, source: str) -> str | None:
    """The display kind that shows an item in a view: rgb views -> 'rgb', 'normals' -> 'normals', other depth
    views -> 'depth', vector views -> None (no picture; the page falls back to any kind)."""
    if source == "rgb":
        return "rgb"
    if source == "depth":
        return "normals" if name == "normals" else "depth"
    return None


def item_rows(key: str, sources: Mapping[str, Any], views: Mapping[str, str], image_size: int) -> list[tuple]:
    """Rows (key, kind, mime, data) of one item. ``sources``: 'rgb' uint8 (H, W, 3), 'depth' uint16 (H, W),
    optional 'normals' uint8 (H, W, 3), vectors by view name; ``views``: view name -> source of the model."""
    rows: list[tuple] = []
    srcs = set(views.values())
    if "rgb" in srcs and "rgb" in sources:
        a = np.asarray(sources["rgb"])
        rows.append((key, "rgb", *render("rgb", a)))
        rows.append((key, "input:rgb", "image/png", encode_png(fit_image(a, image_size))))
    if "depth" in srcs and "depth" in sources:
        d = np.asarray(sources["depth"])
        if any(s == "depth" and v != "normals" for v, s in views.items()):
            rows.append((key, "depth", *render("depth", d)))
        if "normals" in views:
            n = sources.get("normals")
            rows.append((key, "normals", *render("normals", np.asarray(n) if n is not None else d)))
        rows.append((key, "input:depth", "image/png", encode_png(fit_image(d, image_size))))
    for v, s in views.items():
        if s == "vector" and v in sources:
            rows.append((key, f"input:{v}", "application/x-float32", np.asarray(sources[v], "<f4").tobytes()))
    return rows


# ---------------------------------------------------------------------------------------------- the file
class ThumbStore:
    """``<index>/thumbs.sqlite``: put and get rows by (key, kind); safe to share between threads."""

    def __init__(self, index_dir: str | Path, readonly: bool = False):
        self.path = Path(index_dir) / FILE
        self.readonly = readonly
        if readonly:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=10)
        else:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    @classmethod
    def exists(cls, index_dir: str | Path) -> bool:
        return (Path(index_dir) / FILE).exists()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ThumbStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def put(self, rows: Iterable[tuple]) -> int:
        rows = list(rows)
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO thumbs(key, kind, mime, data) VALUES (?, ?, ?, ?)", rows)
        return len(rows)

    def remove(self, keys: list[str]) -> None:
        """Forget the rows of removed items."""
        with self._lock, self._db:
            self._db.executemany("DELETE FROM thumbs WHERE key = ?", [(k,) for k in keys])

    def add_sources(self, keys: list[str], sources: Mapping[str, np.ndarray], views: Mapping[str, str],
                    image_size: int) -> int:
        """A batch of a Dataset's sources (arrays aligned on the first axis) -> rows for every key."""
        rows = [r for i, k in enumerate(keys)
                for r in item_rows(k, {s: a[i] for s, a in sources.items()}, views, image_size)]
        return self.put(rows)

    def get(self, key: str, kind: str | None = None) -> tuple[str, str, bytes] | None:
        """(kind, mime, data) of ``kind``, or of the first display kind stored when kind is None."""
        kinds = (kind,) if kind else DISPLAY_KINDS
        with self._lock:
            rows = self._db.execute(f"SELECT kind, mime, data FROM thumbs WHERE key = ? AND kind IN "
                                    f"({','.join('?' * len(kinds))})", (key, *kinds)).fetchall()
        by = {r[0]: r for r in rows}
        for k in kinds:
            if k in by:
                return by[k][0], by[k][1], bytes(by[k][2])
        return None

    def get_input(self, key: str, source: str) -> bytes | None:
        r = self.get(key, f"input:{source}")
        return r[2] if r else None

    def random_key(self, rng: random.Random | None = None) -> str | None:
        """A key picked at a random row (uniform over rows when rowids have no gaps)."""
        with self._lock:
            lo, hi = self._db.execute("SELECT min(rowid), max(rowid) FROM thumbs").fetchone()
            if lo is None:
                return None
            r = (rng or random).randint(lo, hi)
            row = self._db.execute("SELECT key FROM thumbs WHERE rowid >= ? ORDER BY rowid LIMIT 1", (r,)).fetchone()
        return row[0] if row else None

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(DISTINCT key) FROM thumbs").fetchone()[0])


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


def add_items(index_dir: str | Path, keys: list[str], decoded: Mapping[str, list], rt: Any) -> int:
    """Thumbnails of items just added through ``/index/add``, from their inputs as the server decoded them
    (``decoded``: source key -> one array per item, ``models.runtime.to_source``), so the stored query input
    is exactly what was embedded. Never raises: the items are already durable, a picture is a nicety; a
    failure is logged and the count of items written is returned (0 for an index that keeps none)."""
    ts = _writer(index_dir)
    if ts is None:
        return 0
    views = {v: spec["source"] for v, spec in rt.views.items()}
    try:
        rows = []
        for i, key in enumerate(keys):
            rows += item_rows(key, {src: arrs[i] for src, arrs in decoded.items()}, views, rt.image_size)
        ts.put(rows)
        return len(keys)
    except (ValueError, TypeError, OSError, sqlite3.Error) as e:
        LOG.warning("thumbnails of %d added items not written: %s", len(keys), e)
        return 0


def remove_items(index_dir: str | Path, keys: list[str]) -> None:
    """Drop the thumbnails of items just removed through ``/index/remove``; never raises (logged)."""
    ts = _writer(index_dir)
    if ts is None:
        return
    try:
        ts.remove(keys)
    except sqlite3.Error as e:
        LOG.warning("thumbnails of %d removed items not deleted: %s", len(keys), e)
