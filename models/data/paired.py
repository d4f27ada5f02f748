"""Readers for aligned multi-view data: 'paired:' folders (one sub-folder per source) and 'npz:' vector views."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from models.data.base import Dataset, DataError, check_split, is_test_key
from models.data.readers import DEFAULT_IMAGE_SIZE, IMAGE_EXTS, _existing, _split_root, concat, decode_in_batches
from models.imageio import ImageError, decode_depth, decode_image, fit_image

LOG = logging.getLogger(__name__)

_NPZ_META = {"y", "classes", "keys", "y_test", "keys_test", "classes_test"}


# ---------------------------------------------------------------- paired
def _read_labels(path: Path) -> dict[str, str]:
    labels: dict[str, str] = {}
    try:
        with open(path, newline="") as f:
            for i, row in enumerate(csv.reader(f)):
                if not row or (i == 0 and [c.strip().lower() for c in row[:2]] == ["stem", "label"]):
                    continue
                if len(row) < 2:
                    raise DataError(f"paired: {path} line {i + 1}: expected 'stem,label', got {row}")
                labels[row[0].strip()] = row[1].strip()
    except OSError as e:
        raise DataError(f"paired: cannot read {path}: {e}") from None
    return labels


def _sorted_classes(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def _paired_items(arg: str, split: str):
    check_split(split)
    root = _existing(arg, "paired")
    if not root.is_dir():
        raise DataError(f"paired: not a directory: {root}")
    folder, explicit = _split_root(root, split)
    views = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not views:
        raise DataError(f"paired: {folder} has no source sub-folders (expected e.g. rgb/ and depth/)")
    files: dict[str, dict[str, Path]] = {}
    for v in views:
        files[v] = {p.stem: p for p in sorted((folder / v).iterdir())
                    if p.is_file() and (p.suffix.lower() in IMAGE_EXTS or p.suffix.lower() == ".npy")}
    all_stems = set().union(*(set(f) for f in files.values()))
    common = sorted(set.intersection(*(set(f) for f in files.values())))
    info = {"spec": f"paired:{arg}", "split": split, "views": views, "dropped_unmatched": len(all_stems) - len(common)}
    labels_file = root / "labels.csv"
    labels = _read_labels(labels_file) if labels_file.exists() else None
    classes = None
    stems = [s for s in common if explicit or is_test_key(s) == (split == "test")]
    if not stems:
        raise DataError(f"paired: no {split} items under {folder} with a file in every one of {views}")
    if info["dropped_unmatched"]:
        LOG.info("paired %s: dropped %d item(s) without a file in every one of %s", split,
                 info["dropped_unmatched"], views)
    if labels is not None:  # pretraining uses every item; evaluation leaves out the unlabelled ones (y = -1)
        classes = _sorted_classes(set(labels.values()))
        info["unlabeled"] = sum(s not in labels for s in stems)
        if info["unlabeled"]:
            LOG.info("paired %s: %d of %d item(s) have no label in %s (kept for pretraining, y = -1)", split,
                     info["unlabeled"], len(stems), labels_file)
    cls_index = {c: i for i, c in enumerate(classes)} if classes else {}
    items = [(s, {v: files[v][s] for v in views}, cls_index.get(labels.get(s, ""), -1) if labels is not None else -1)
             for s in stems]
    return root, items, classes, info


def _decode_source(view: str, path: Path, size: int) -> np.ndarray:
    data_suffix = path.suffix.lower()
    if data_suffix == ".npy":
        a = np.load(path, allow_pickle=False)
        a = np.asarray(a, dtype=np.float32).reshape(-1)
        if not np.isfinite(a).all():
            raise ImageError(f"non-finite values in {path}")
        return a
    data = path.read_bytes()
    if view == "depth":
        return fit_image(decode_depth(data), size)
    return fit_image(decode_image(data), size)


def _decode_item(item, size: int) -> dict[str, np.ndarray] | None:
    stem, paths, _ = item
    try:
        return {v: _decode_source(v, p, size) for v, p in paths.items()}
    except (ImageError, OSError, ValueError) as e:
        LOG.debug("skipping paired item %s: %s", stem, e)
        return None


def iter_paired(arg: str, split: str, batch_size: int, *, image_size: int | None = None,
                progress: bool = False, threads: int = 4) -> Iterator[Dataset]:
    """Stream a paired folder in batches; items with any unreadable file are skipped."""
    root, items, classes, info = _paired_items(arg, split)
    size = image_size or DEFAULT_IMAGE_SIZE
    for good, skipped in decode_in_batches("paired", split, root, items, lambda it: _decode_item(it, size),
                                           batch_size, threads, progress):
        try:
            sources = {v: np.stack([d[v] for _, d in good]) for v in good[0][1]}
        except ValueError as e:
            raise DataError(f"paired: items of one source differ in shape under {root}: {e}") from None
        yield Dataset(sources=sources,
                      y=None if classes is None else np.array([it[2] for it, _ in good], np.int64),
                      classes=None if classes is None else list(classes), keys=[it[0] for it, _ in good],
                      info={**info, "skipped": len(skipped), "skipped_files": skipped[:10]})


def load_paired(arg: str, split: str = "train", *, image_size: int | None = None, progress: bool = False) -> Dataset:
    parts = list(iter_paired(arg, split, 512, image_size=image_size, progress=progress))
    return concat(parts, f"paired: no readable {split} items under {arg}")


# ---------------------------------------------------------------- npz vectors
def _vector(z, name: str, path: Path) -> np.ndarray:
    a = z[name]
    if a.ndim != 2:
        raise DataError(f"npz: {path}:{name} must be 2-D (N, D), got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise DataError(f"npz: {path}:{name} must be numeric, got {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise DataError(f"npz: {path}:{name} contains NaN or inf")
    return a


def load_npz(arg: str, split: str = "train", *, image_size: int | None = None, progress: bool = False) -> Dataset:
    """One float array (N, D_v) per view; optional y, classes, keys; '<view>_test' arrays for the test split."""
    check_split(split)
    path = _existing(arg, "npz")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"npz: cannot read {path}: {e}") from None
    with z:
        names = [n for n in z.files if n not in _NPZ_META and not n.endswith("_test")]
        if not names:
            raise DataError(f"npz: {path} has no view arrays (has {z.files})")
        has_test = any(f"{n}_test" in z.files for n in names)
        if has_test:
            missing = [f"{n}_test" for n in names if f"{n}_test" not in z.files]
            if missing:
                raise DataError(f"npz: {path} has test arrays for some views but is missing {missing}")
        suffix = "_test" if has_test and split == "test" else ""
        views = {n: _vector(z, n + suffix, path) for n in names}
        y = z["y" + suffix] if "y" + suffix in z.files else None
        classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
        keys = [str(k) for k in z["keys" + suffix]] if "keys" + suffix in z.files else None
    ns = {n: len(a) for n, a in views.items()}
    n = next(iter(ns.values()))
    if len(set(ns.values())) != 1:
        raise DataError(f"npz: {path} views differ in length: {ns}")
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (n,):
            raise DataError(f"npz: {path}:y{suffix} must be integer ({n},), got {y.dtype} {y.shape}")
        y = y.astype(np.int64)
    if keys is None:
        keys = [f"npz/{i:06d}" for i in range(n)]
    elif len(keys) != n or len(set(keys)) != n:
        raise DataError(f"npz: {path}:keys{suffix} must hold {n} unique keys")
    ds = Dataset(sources=views, y=y, classes=classes, keys=keys,
                 info={"spec": f"npz:{arg}", "split": split, "skipped": 0, "skipped_files": []})
    if not has_test:
        ds = ds.subset(np.array([is_test_key(k) == (split == "test") for k in keys], bool))
    if len(ds) == 0:
        raise DataError(f"npz: {path} has no {split} items")
    return ds
