"""The Dataset container, DataError and the deterministic split rule shared by all readers."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """A one-line message naming the problem with a data spec, path or array (the CLI exits 2)."""


@dataclass
class Dataset:
    """Items with one array per source/view, aligned on the first axis.

    sources: 'rgb' uint8 (N, H, W, 3); 'depth' uint16 (N, H, W) (0 = camera .. 65535 = far plane);
    'normals' uint8 (N, H, W, 3) ((n + 1) / 2 * 255, camera space, x right, y down, z to camera);
    vector views float32 (N, D) keyed by the view's name.
    """

    sources: dict[str, np.ndarray]
    y: np.ndarray | None = None  # int64 (N,)
    classes: list[str] | None = None
    keys: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        if self.sources:
            return int(next(iter(self.sources.values())).shape[0])
        return len(self.keys)

    def sample(self, n: int, seed: int = 0) -> "Dataset":
        """``n`` items drawn at random (seeded, kept in file order), or all of them when ``n`` is 0 or at least
        ``len(self)``. The one way to take a subset for statistics: never the first ``n``, since files may be
        sorted by class (CIFAR-10's npz is)."""
        if n <= 0 or n >= len(self):
            return self
        return self.subset(np.sort(np.random.default_rng(seed).permutation(len(self))[:n]))

    def subset(self, idx: np.ndarray) -> "Dataset":
        """Items at ``idx`` (integer indices or a boolean mask), in that order."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        idx = idx.astype(np.int64)
        return Dataset(
            sources={k: v[idx] for k, v in self.sources.items()},
            y=None if self.y is None else self.y[idx],
            classes=None if self.classes is None else list(self.classes),
            keys=[self.keys[i] for i in idx] if self.keys else [],
            info=dict(self.info),
        )


def is_test_key(key: str) -> bool:
    """The deterministic 10% split: an item is 'test' when crc32(key) % 10 == 0."""
    return zlib.crc32(key.encode("utf-8")) % 10 == 0


def check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}: expected 'train' or 'test'")
    return split
