"""Data specs -> Dataset. Torch-free (numpy + pillow), so the server and index can import it.

Specs: 'scenes[:n=..,size=..,seed=..,test_n=..,ss=..]', 'cifar10:PATH', 'imagefolder:PATH',
'paired:PATH', 'npz:PATH'.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from models.data.base import Dataset, DataError, check_split, is_test_key
from models.data.paired import iter_paired, load_npz, load_paired
from models.data.readers import iter_imagefolder, load_cifar10, load_imagefolder
from models.data.scenes import load_scenes

LOG = logging.getLogger(__name__)

__all__ = ["Dataset", "DataError", "KINDS", "load", "iter_batches", "parse_spec", "provided_sources", "is_test_key"]

KINDS = ("scenes", "cifar10", "imagefolder", "paired", "npz")


def parse_spec(spec: str) -> tuple[str, str]:
    """'cifar10:/x/y.npz' -> ('cifar10', '/x/y.npz'); 'scenes' -> ('scenes', '')."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec; expected one of {', '.join(KINDS)} (e.g. 'scenes' or 'cifar10:PATH')")
    kind, _, arg = spec.strip().partition(":")
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r} in spec {spec!r}; known kinds: {', '.join(KINDS)}")
    if kind != "scenes" and not arg:
        raise DataError(f"data spec {spec!r} needs a path: {kind}:PATH")
    return kind, arg


def load(spec: str, split: str = "train", *, image_size: int | None = None,
         cache_dir: str | Path | None = None, progress: bool = False) -> Dataset:
    """Load one split of a data spec into memory."""
    kind, arg = parse_spec(spec)
    check_split(split)
    if kind == "scenes":
        return load_scenes(arg, split, image_size=image_size, cache_dir=cache_dir, progress=progress)
    loader = {"cifar10": load_cifar10, "imagefolder": load_imagefolder, "paired": load_paired, "npz": load_npz}[kind]
    return loader(arg, split, image_size=image_size, progress=progress)


def iter_batches(spec: str, split: str, batch_size: int, *, image_size: int | None = None,
                 cache_dir: str | Path | None = None, progress: bool = False) -> Iterator[Dataset]:
    """Yield the split in chunks of at most ``batch_size`` items; files are streamed, not held."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    kind, arg = parse_spec(spec)
    check_split(split)
    if kind == "imagefolder":
        yield from _rebatch(iter_imagefolder(arg, split, batch_size, image_size=image_size, progress=progress),
                            f"imagefolder: no readable {split} images under {arg}")
        return
    if kind == "paired":
        yield from _rebatch(iter_paired(arg, split, batch_size, image_size=image_size, progress=progress),
                            f"paired: no readable {split} items under {arg}")
        return
    ds = load(spec, split, image_size=image_size, cache_dir=cache_dir, progress=progress)
    for start in range(0, len(ds), batch_size):
        yield ds.subset(np.arange(start, min(start + batch_size, len(ds))))


def _rebatch(parts: Iterator[Dataset], empty_msg: str) -> Iterator[Dataset]:
    any_items = False
    for p in parts:
        any_items = True
        yield p
    if not any_items:
        raise DataError(empty_msg)


def provided_sources(spec: str) -> set[str]:
    """Source names a spec provides, without loading images where it can be avoided."""
    kind, arg = parse_spec(spec)
    if kind == "scenes":
        return {"rgb", "depth", "normals"}
    if kind in ("cifar10", "imagefolder"):
        return {"rgb"}
    if kind == "paired":
        root = Path(arg).expanduser()
        folder = root / "train" if (root / "train").is_dir() and (root / "test").is_dir() else root
        if not folder.is_dir():
            raise DataError(f"paired: not a directory: {root}")
        return {d.name for d in folder.iterdir() if d.is_dir()}
    return set(load(spec, "train").sources)
