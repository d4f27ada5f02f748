"""Embeddings computed elsewhere, as index input: ``index.build --data vectors:DIR``.

A hundred million images are embedded by a cluster job (``index.build --engine ray``, or the user's own), not by
the process that writes the index; and benchmarks feed the store vectors they made. ``DIR`` holds one
``<view>.npy`` per view to index (float32, float16 or float64, C order, shape (n, dim), rows aligned across the
views: row i of every file is item i) and optionally ``keys.txt`` (one key per line, n lines; default keys are
``vec-<row>``). The vectors must be this model's embeddings: the store records the model's fingerprint, and the
server embeds its queries with that model.

Files are read a chunk at a time with plain reads at the chunk's offset (``np.fromfile``), never memory-mapped,
so a build's resident memory holds one chunk of the input however large the file: a mapped file's touched pages
would count in the process's RSS and make the budget look broken. Every row is checked before the build writes
anything (:meth:`VectorFiles.check`, one sequential pass) and again as it is added: finite values, and unit L2
norm (within ``NORM_TOL``), since the store searches by inner product; a bad row is named by its file and row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from models.data import DataError

PREFIX = "vectors:"
KEYS_FILE = "keys.txt"
NORM_TOL = 1e-3
DTYPES = (np.float32, np.float16, np.float64)


def is_vectors(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


@dataclass
class VectorChunk:
    """Consecutive rows of the files: keys and vectors per view (float32, unit norm); the attributes a build
    reads of a Dataset chunk (keys, y, classes, sources) are there, without labels or sources."""
    keys: list[str]
    vectors: dict[str, np.ndarray]
    y: None = None
    classes: None = None
    sources: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _File:
    path: Path
    dtype: np.dtype
    rows: int
    dim: int
    offset: int  # of the first row, in bytes


def _open_npy(path: Path) -> _File:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (vectors:DIR needs one <view>.npy per indexed view)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from None
    if fortran:
        raise DataError(f"{path}: Fortran-order array; save it in C order (np.ascontiguousarray)")
    if dtype.type not in DTYPES:
        raise DataError(f"{path}: dtype {dtype} (want float32, float16 or float64)")
    if len(shape) != 2:
        raise DataError(f"{path}: shape {shape}, want (n, dim)")
    size = path.stat().st_size
    if offset + shape[0] * shape[1] * dtype.itemsize > size:
        raise DataError(f"{path}: truncated: {shape} {dtype} needs {offset + shape[0] * shape[1] * dtype.itemsize}"
                        f" bytes, the file has {size}")
    return _File(path, dtype, int(shape[0]), int(shape[1]), offset)


class VectorFiles:
    """The vectors of ``views`` in ``DIR`` (see the module docstring), checked against ``dim`` when opened."""

    def __init__(self, spec: str, views: list[str], dim: int) -> None:
        self.root = Path(spec[len(PREFIX):]).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{spec}: {self.root} is not a directory (vectors:DIR, with one <view>.npy per view)")
        self.files = {v: _open_npy(self.root / f"{v}.npy") for v in views}
        for v, f in self.files.items():
            if f.dim != dim:
                raise DataError(f"{f.path}: {f.dim}-d vectors, but view {v!r} of this model embeds in {dim} d")
        rows = {v: f.rows for v, f in self.files.items()}
        if len(set(rows.values())) > 1:
            raise DataError(f"{self.root}: the views' files have different row counts {rows}; row i of each is item i")
        self.n = next(iter(rows.values())) if rows else 0
        self.keys = self._read_keys()

    def _read_keys(self) -> list[str] | None:
        p = self.root / KEYS_FILE
        if not p.exists():
            return None
        try:
            keys = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{p}: unreadable ({e})") from None
        if len(keys) != self.n:
            raise DataError(f"{p}: {len(keys)} keys for {self.n} rows (one key per line, row i's on line i+1)")
        return keys

    def __len__(self) -> int:
        return self.n

    def read(self, view: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of ``view`` as float32, checked finite and unit-norm."""
        f = self.files[view]
        count = (stop - start) * f.dim
        x = np.fromfile(f.path, dtype=f.dtype, count=count, offset=f.offset + start * f.dim * f.dtype.itemsize)
        x = x.reshape(stop - start, f.dim).astype(np.float32, copy=False)
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise DataError(f"{f.path}: row {start + int(np.argmax(bad))} holds NaN or inf")
        norms = np.linalg.norm(x, axis=1)
        off = np.abs(norms - 1) > NORM_TOL
        if off.any():
            i = int(np.argmax(off))
            raise DataError(f"{f.path}: row {start + i} has L2 norm {norms[i]:.4f}; the store searches by inner "
                            "product and takes unit vectors (divide each row by its norm)")
        return x

    def check(self, batch_size: int = 65_536, progress: bool = False) -> None:
        """Read every row once and raise :class:`DataError` at the first bad one, before a build writes anything
        (a pass of sequential reads: seconds per GB)."""
        from tqdm import tqdm
        with tqdm(total=self.n * len(self.files), desc="check vectors", unit="row", disable=not progress,
                  dynamic_ncols=True) as bar:
            for v in self.files:
                for lo in range(0, self.n, batch_size):
                    hi = min(lo + batch_size, self.n)
                    self.read(v, lo, hi)
                    bar.update(hi - lo)

    def chunks(self, batch_size: int) -> Iterator[VectorChunk]:
        for lo in range(0, self.n, batch_size):
            hi = min(lo + batch_size, self.n)
            keys = self.keys[lo:hi] if self.keys is not None else [f"vec-{i}" for i in range(lo, hi)]
            yield VectorChunk(keys, {v: self.read(v, lo, hi) for v in self.files})


def write_npy_header(f, rows: int, dim: int, dtype=np.float32) -> None:
    """Start a C-order (rows, dim) .npy file in ``f``: the rows follow as raw bytes, written chunk by chunk."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": (rows, dim)})
