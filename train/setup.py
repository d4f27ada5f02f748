"""Load the data of a config and check it against the views: one place for the bad-input messages."""
from __future__ import annotations

import logging

from models import data as datasets
from models.data import DataError, Dataset
from models.views import ViewError, ViewSpec, parse_views
from .config import Config

LOG = logging.getLogger(__name__)


def vector_dims(ds: Dataset) -> dict[str, int]:
    return {k: int(v.shape[1]) for k, v in ds.sources.items() if v.ndim == 2}


def check_views(specs: list[ViewSpec], ds: Dataset, spec: str) -> None:
    have = sorted(ds.sources)
    for s in specs:
        if s.source_key not in ds.sources:
            raise ViewError(f"view {s.name!r} needs a {s.source!r} source, but data {spec!r} provides only: "
                            f"{', '.join(have)}")


def default_views(ds: Dataset) -> str:
    """The views of the data when --views is 'auto': Lab's L and ab of RGB, depth (and normals when there
    is no RGB), and every vector view, in the data's order."""
    names = (["L", "ab"] if "rgb" in ds.sources else []) + (["depth"] if "depth" in ds.sources else [])
    if "depth" in ds.sources and "rgb" not in ds.sources:
        names.append("normals")
    names += [k for k in vector_dims(ds) if k not in ("rgb", "depth", "normals")]
    if len(names) < 2:
        raise ViewError(f"data provides only {', '.join(sorted(ds.sources)) or 'nothing'}: CMC needs two views; "
                        f"choose them with --views")
    return ",".join(names)


def native_size(ds: Dataset) -> int:
    for k in ("rgb", "depth"):
        if k in ds.sources:
            return int(ds.sources[k].shape[1])
    return 0


def prepare(cfg: Config, progress: bool = True) -> tuple[Dataset, Dataset | None, list[ViewSpec], int]:
    """(train set, held-out set or None, view specs, image size) of a config; DataError / ViewError otherwise."""
    size = cfg.image_size or None
    if datasets.parse_spec(cfg.data)[0] in ("scenes", "cifar10", "imagefolder") and cfg.views != "auto":
        parse_views(cfg.views)  # image-only data: a bad view name fails before the data loads
    ds = datasets.load(cfg.data, "train", image_size=size, progress=progress)
    if len(ds) == 0:
        raise DataError(f"data {cfg.data!r} has no training samples")
    if cfg.limit:  # a seeded random sample, the same for every --seed: never the first N (CIFAR-10's file is
        ds = ds.sample(cfg.limit, 0)  # sorted by class, so its first 5,000 images are two classes)
    views = cfg.views
    if views == "auto":
        views = default_views(ds)
        LOG.info("views: %s (what %s provides; choose with --views)", views, cfg.data)
    specs = parse_views(views, vector_dims(ds))
    check_views(specs, ds, cfg.data)
    try:
        test = datasets.load(cfg.data, "test", image_size=size, progress=progress)
        test = test if len(test) else None
    except DataError as e:
        LOG.warning("no held-out split: %s", e)
        test = None
    skipped = ds.info.get("skipped", 0)
    if skipped:
        LOG.warning("skipped %d unreadable file(s) in %s", skipped, cfg.data)
    return ds, test, specs, cfg.image_size or native_size(ds)
