"""Model selection on a validation split: hold out a fixed part of the training items, measure cross-view
recall@1 on it after every epoch, keep the weights of the best epoch (and optionally stop early).

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
from torch import Tensor

from models.data import Dataset
from models.encoders import CMCModel, source_key
from models.views import ViewSpec

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


@torch.no_grad()
def embed_all(model: CMCModel, ds: Dataset, device: torch.device, batch_size: int = 512) -> dict[str, Tensor]:
    """{view: (N, D)} embeddings of ``ds`` in eval mode, fp32, on the CPU."""
    from .pipeline import DeviceData
    specs = list(model.specs.values())
    data = DeviceData(ds, specs, device)
    was_training = model.training
    model.eval()
    out: dict[str, list[Tensor]] = {s.name: [] for s in specs}
    for lo in range(0, len(ds), batch_size):
        b = data.batch(torch.arange(lo, min(lo + batch_size, len(ds))))
        for s in specs:
            out[s.name].append(model.views[s.name](b[source_key(s)]).float().cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


def recall_at_1(q: Tensor, g: Tensor) -> float:
    """Item n of one view queries the gallery of another; the hit is item n itself. q, g: (N, D)."""
    q, g = torch.nn.functional.normalize(q.float(), dim=1), torch.nn.functional.normalize(g.float(), dim=1)
    hits = 0
    for lo in range(0, q.shape[0], 1024):
        top = (q[lo:lo + 1024] @ g.t()).argmax(dim=1)  # (q,)
        hits += int((top == torch.arange(lo, lo + top.shape[0])).sum())
    return hits / q.shape[0]


def mean_cross_view_recall(z: dict[str, Tensor]) -> tuple[float, dict[str, float]]:
    """Mean recall@1 over every ordered pair of views, and per pair 'a->b'."""
    per = {f"{a}->{b}": recall_at_1(z[a], z[b]) for a in z for b in z if a != b}
    return sum(per.values()) / max(1, len(per)), per


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
