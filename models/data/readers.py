"""Readers for files on disk: cifar10 (pickled batches or .npz), imagefolder, paired folders, npz vectors."""
from __future__ import annotations

import logging
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from models.data.base import Dataset, DataError, check_split, is_test_key
from models.imageio import ImageError, decode_image, fit_image

LOG = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEFAULT_IMAGE_SIZE = 64
_RESERVED = {"y", "classes", "keys", "y_test", "keys_test"}


def _existing(path: str, kind: str) -> Path:
    if not path:
        raise DataError(f"{kind}: no path given (use {kind}:PATH)")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{kind}: path does not exist: {p}")
    return p


# ---------------------------------------------------------------- cifar10
def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(f"cifar10: cannot read {path}: {e}") from None


def _get(d: dict, name: str):
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise KeyError(name)


def _cifar_folder(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        f = root / name
        if not f.exists():
            raise DataError(f"cifar10: missing batch file {f}")
        d = _unpickle(f)
        try:
            x = np.asarray(_get(d, "data"), dtype=np.uint8)
            yy = np.asarray(_get(d, "labels"), dtype=np.int64)
        except KeyError as e:
            raise DataError(f"cifar10: {f} has no {e} entry") from None
        if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(yy):
            raise DataError(f"cifar10: {f} data has shape {x.shape}, expected (N, 3072) with N labels")
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(yy)
    classes = list(CIFAR_CLASSES)
    meta = root / "batches.meta"
    if meta.exists():
        try:
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _get(_unpickle(meta), "label_names")]
        except KeyError:
            pass
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), classes


def _cifar_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cifar10: cannot read {path}: {e}") from None
    with z:
        xk, yk = f"x_{split}", f"y_{split}"
        missing = [k for k in (xk, yk) if k not in z.files]
        if missing:
            raise DataError(f"cifar10: {path} is missing arrays {missing} (has {z.files})")
        x, y = z[xk], z[yk]
        classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise DataError(f"cifar10: {path}:{xk} must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
        raise DataError(f"cifar10: {path}:{yk} must be integer ({len(x)},), got {y.dtype} {y.shape}")
    if classes is None:
        classes = list(CIFAR_CLASSES) if y.size == 0 or y.max() < 10 else [str(i) for i in range(int(y.max()) + 1)]
    return x, y.astype(np.int64), classes


def load_cifar10(arg: str, split: str = "train", *, image_size: int | None = None, progress: bool = False) -> Dataset:
    check_split(split)
    root = _existing(arg, "cifar10")
    x, y, classes = _cifar_folder(root, split) if root.is_dir() else _cifar_npz(root, split)
    if len(x) == 0:
        raise DataError(f"cifar10: {root} has no {split} images")
    if y.min() < 0 or y.max() >= len(classes):
        raise DataError(f"cifar10: {root} labels out of range for {len(classes)} classes")
    if image_size is not None and (x.shape[1] != image_size or x.shape[2] != image_size):
        x = np.stack([fit_image(im, image_size) for im in _bar(x, progress, "cifar10 resize")])
    keys = [f"cifar10/{split}/{i:06d}" for i in range(len(x))]
    info = {"spec": f"cifar10:{arg}", "split": split, "skipped": 0, "skipped_files": []}
    return Dataset(sources={"rgb": x}, y=y, classes=classes, keys=keys, info=info)


def _bar(it, progress: bool, desc: str, total: int | None = None):
    if not progress:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, total=total)


# ---------------------------------------------------------------- image folders
def _split_root(root: Path, split: str) -> tuple[Path, bool]:
    """(folder to scan, whether the folder is an explicit split) for imagefolder/paired."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root / split, True
    return root, False


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _imagefolder_items(arg: str, split: str) -> tuple[Path, list[tuple[str, Path, int]], list[str]]:
    check_split(split)
    root = _existing(arg, "imagefolder")
    if not root.is_dir():
        raise DataError(f"imagefolder: not a directory: {root}")
    folder, explicit = _split_root(root, split)
    if explicit:  # classes from both splits so labels agree
        classes = sorted({d.name for s in ("train", "test") for d in (root / s).iterdir() if d.is_dir()})
    else:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"imagefolder: {root} has no class sub-folders")
    items = []
    for ci, c in enumerate(classes):
        if not (folder / c).is_dir():
            continue
        for f in _image_files(folder / c):
            rel = f.relative_to(root).as_posix()
            if explicit or is_test_key(rel) == (split == "test"):
                items.append((rel, f, ci))
    if not items:
        raise DataError(f"imagefolder: no {split} images found under {root}")
    return root, items, classes


def _decode_rgb(path: Path, size: int) -> np.ndarray | None:
    try:
        return fit_image(decode_image(path.read_bytes()), size)
    except (ImageError, OSError) as e:
        LOG.debug("skipping %s: %s", path, e)
        return None


def _warn_skipped(kind: str, root: Path, skipped: list[str]) -> None:
    if skipped:
        LOG.warning("%s: skipped %d unreadable file(s) under %s, first: %s", kind, len(skipped), root, skipped[:10])


def decode_in_batches(kind: str, split: str, root: Path, items: list, decode: Callable[[Any], Any], batch_size: int,
                      threads: int, progress: bool) -> Iterator[tuple[list[tuple[Any, Any]], list[str]]]:
    """Decode ``items`` (tuples whose first field is the item's key) on a thread pool, ``batch_size`` at a time:
    yields each batch's readable ``(item, decode(item))`` pairs (batches with none are left out) and the keys of
    the items skipped so far (``decode`` returned None); warns once, at the end, of the skipped ones."""
    skipped: list[str] = []
    bar = _bar(None, progress, f"{kind} {split}", len(items)) if progress else None
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            decoded = list(pool.map(decode, chunk))
            good = [(it, d) for it, d in zip(chunk, decoded) if d is not None]
            skipped += [it[0] for it, d in zip(chunk, decoded) if d is None]
            if bar is not None:
                bar.update(len(chunk))
            if good:
                yield good, skipped
    if bar is not None:
        bar.close()
    _warn_skipped(kind, root, skipped)


def iter_imagefolder(arg: str, split: str, batch_size: int, *, image_size: int | None = None,
                     progress: bool = False, threads: int = 4) -> Iterator[Dataset]:
    """Stream an imagefolder in batches of decoded, fitted images (corrupt files skipped)."""
    root, items, classes = _imagefolder_items(arg, split)
    size = image_size or DEFAULT_IMAGE_SIZE
    for good, skipped in decode_in_batches("imagefolder", split, root, items, lambda it: _decode_rgb(it[1], size),
                                           batch_size, threads, progress):
        yield Dataset(sources={"rgb": np.stack([im for _, im in good])},
                      y=np.array([it[2] for it, _ in good], np.int64), classes=list(classes),
                      keys=[it[0] for it, _ in good],
                      info={"spec": f"imagefolder:{arg}", "split": split,
                            "skipped": len(skipped), "skipped_files": skipped[:10]})


def concat(parts: list[Dataset], empty_msg: str) -> Dataset:
    """Join streamed batches into one Dataset (info from the last batch)."""
    if not parts:
        raise DataError(empty_msg)
    first, last = parts[0], parts[-1]
    return Dataset(sources={k: np.concatenate([p.sources[k] for p in parts]) for k in first.sources},
                   y=None if first.y is None else np.concatenate([p.y for p in parts]),
                   classes=first.classes, keys=[k for p in parts for k in p.keys], info=dict(last.info))


def load_imagefolder(arg: str, split: str = "train", *, image_size: int | None = None,
                     progress: bool = False) -> Dataset:
    parts = list(iter_imagefolder(arg, split, 512, image_size=image_size, progress=progress))
    return concat(parts, f"imagefolder: no readable {split} images under {arg} (all files failed to decode)")
