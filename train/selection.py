"""Model selection on a validation split: hold out a fixed part of the training items, measure cross-view
recall@1 on it after every epoch (``validate``), keep the weights of the best epoch (and optionally stop early).

The split is deterministic: by a hash of each item's key (independent of the data's order and of
``--limit``), or, for data without keys, by a permutation fixed by the seed. Validation items are never
trained on, so the selection sees the same kind of unseen pairs the held-out test set does.
"""
from __future__ import annotations

import copy
import logging
import zlib

import numpy as np
import torch

from models.data import Dataset
from models.encoders import CMCModel
from models.views import ViewSpec
from .metrics import embed_all, mean_cross_view_recall

LOG = logging.getLogger(__name__)

AUTO_VAL_FRACTION = 0.1  # --val-fraction -1: this much when every view is a vector view
MIN_VAL_ITEMS = 16  # fewer validation items than this measure nothing: validation is skipped


def resolve_val_fraction(val_fraction: float, specs: list[ViewSpec]) -> float:
    """-1 (auto): 0.1 when every view is a vector view (where overfitting was measured), else 0."""
    if val_fraction >= 0:
        return val_fraction
    return AUTO_VAL_FRACTION if all(not s.is_image for s in specs) else 0.0


def split_validation(ds: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset | None]:
    """(training items, validation items or None). By key hash when items have keys, else by a seeded
    permutation; None when ``fraction`` is 0 or leaves fewer than MIN_VAL_ITEMS items."""
    n = len(ds)
    if fraction <= 0:
        return ds, None
    if ds.keys and len(ds.keys) == n and len(set(ds.keys)) == n:
        u = np.array([zlib.crc32(f"val:{seed}:{k}".encode("utf-8")) / 2**32 for k in ds.keys])
        is_val = u < fraction
    else:
        perm = np.random.default_rng(10_007 + seed).permutation(n)
        is_val = np.zeros(n, bool)
        is_val[perm[:int(round(fraction * n))]] = True
    if is_val.sum() < MIN_VAL_ITEMS or (~is_val).sum() < 2:
        LOG.warning("validation: %d of %d items is too few; training on all items without selection",
                    int(is_val.sum()), n)
        return ds, None
    LOG.info("validation: %d of %d training items held out for model selection", int(is_val.sum()), n)
    return ds.subset(~is_val), ds.subset(is_val)


class Selector:
    """Best-epoch bookkeeping: the best validation recall, its weights and epoch, epochs since it."""

    def __init__(self, patience: int = 0):
        self.patience = patience
        self.best: float = -1.0
        self.best_epoch = 0
        self.best_state: dict | None = None
        self.since = 0

    def update(self, model: torch.nn.Module, epoch: int, recall: float) -> bool:
        """Record an epoch's recall; True when it is the best so far (its weights are kept)."""
        if recall > self.best:
            self.best, self.best_epoch, self.since = recall, epoch, 0
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            return True
        self.since += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_state": self.best_state, "since": self.since}

    def load_state_dict(self, d: dict | None) -> None:
        if d:
            self.best, self.best_epoch, self.since = d["best"], d["best_epoch"], d["since"]
            self.best_state = d["best_state"]


def validate(model: CMCModel, val: Dataset, device: torch.device, selector: Selector, epoch: int) -> dict[str, float]:
    """Validation cross-view recall@1 after an epoch (mean over ordered view pairs), fed to the selector. The
    entries of the epoch's metrics record: the recalls, and ``val_is_best`` (1.0 when this epoch is the best
    so far, else 0.0)."""
    mean, per = mean_cross_view_recall(embed_all(model, val, device))
    best = selector.update(model, epoch, mean)
    return {"val_recall@1": mean, **{f"val_recall@1/{p}": r for p, r in per.items()}, "val_is_best": float(best)}
