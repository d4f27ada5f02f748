"""Two patches of one image as two views at a diagonal offset d (Tian et al. 2020, "What makes for good
views for contrastive learning?", section 3.2): their crops, encoder, loss and MI bound.

View 1 is the ``patch`` x ``patch`` crop at (x, y), view 2 the crop at (x + d, y + d). Two position schemes
(``SCHEMES``) say where the anchor (x, y) is drawn from, uniformly:

- ``shrinking`` (the first curve): every position where both patches fit at this d, [0, size - patch - d]^2,
  so the number of positions falls with d ((size - patch + 1)^2 at d = 0, one at d = size - patch) and d
  changes the augmentation as well as the shared information (issue 20, item 3);
- ``fixed``: the positions where the pair fits at the curve's largest offset, [0, size - patch - d_max]^2, for
  every d, so only the offset changes with d. No pixel outside the image is read (padding would add
  mirrored or blank content that changes the shared information); the price is a smaller largest d
  (``fixed_distances`` leaves a quarter of the free room, (size - patch) / 4, for the positions). One encoder (the rgb view's transform and network, built by
``models.encoders``) embeds both patches; the objective is CMC's two-view loss with in-batch negatives,
so ``log(k) - L`` bounds I(v1; v2) from below. The encoder is convolutional with global pooling, so it is
evaluated on whole images at their native resolution: the same pixel scale it was trained on.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

from models.data import Dataset
from models.encoders import CMCModel
from models.views import BUILTIN
from .losses import cmc_loss
from .metrics import mi_bound as embeddings_mi_bound
from .pipeline import DeviceData

LOG = logging.getLogger(__name__)

PAIR = ("patch1", "patch2")
SCHEMES = ("fixed", "shrinking")


def distances(image_size: int, patch: int, n: int = 5) -> list[int]:
    """``n`` offsets from 0 to the largest that fits (image_size - patch), evenly spaced."""
    top = image_size - patch
    if top < 1:
        raise ValueError(f"patch {patch} leaves no room to move in a {image_size}px image")
    return sorted({int(round(v)) for v in np.linspace(0, top, n)})


def fixed_distances(image_size: int, patch: int, n: int = 5) -> list[int]:
    """The offsets of the ``fixed`` scheme: ``n`` from 0 to (size - patch) minus a quarter of it (at least 1 px),
    so that the common anchor set keeps (room + 1)^2 positions, room = (size - patch) // 4 (25 at 32 / 16 px)."""
    top = image_size - patch
    if top < 2:
        raise ValueError(f"patch {patch} leaves no room to move in a {image_size}px image")
    return distances(image_size - max(1, top // 4), patch, n)


def anchor_room(image_size: int, patch: int, d: int, d_max: int | None = None) -> int:
    """The largest anchor coordinate: size - patch - d (``shrinking``, d_max None) or size - patch - d_max
    (``fixed``: the same for every d <= d_max). Anchors are uniform over [0, room]^2."""
    if d_max is not None and not 0 <= d <= d_max:
        raise ValueError(f"offset {d} is outside [0, d_max = {d_max}]")
    room = image_size - patch - (d if d_max is None else d_max)
    if room < 0:
        raise ValueError(f"offset {d if d_max is None else d_max} and patch {patch} do not fit in a "
                         f"{image_size}px image")
    return room


def admissible(image_size: int, patch: int, d: int, d_max: int | None = None) -> int:
    """The number of anchor positions the pair at offset d is drawn from: (room + 1)^2."""
    return (anchor_room(image_size, patch, d, d_max) + 1) ** 2


def positions(n: int, image_size: int, patch: int, d: int, g: torch.Generator, d_max: int | None = None
              ) -> tuple[Tensor, Tensor]:
    """Top-left corners (x, y), each (n,), uniform over [0, room]^2 (``anchor_room``: the shrinking scheme
    without ``d_max``, the fixed one with it)."""
    room = anchor_room(image_size, patch, d, d_max)
    xy = torch.randint(0, room + 1, (2, n), generator=g, device=g.device)  # the step generator may be on a GPU
    return xy[0], xy[1]


def crop_pair(img: Tensor, patch: int, d: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """img (N, C, H, W) -> the patches at (x, y) and (x + d, y + d), each (N, C, patch, patch)."""
    n, c = img.shape[:2]
    r = torch.arange(patch, device=img.device)
    x, y = x.to(img.device), y.to(img.device)
    ni = torch.arange(n, device=img.device)[:, None, None, None]
    ci = torch.arange(c, device=img.device)[None, :, None, None]

    def at(x0: Tensor, y0: Tensor) -> Tensor:
        rows = (y0[:, None] + r)[:, None, :, None]  # (N, 1, p, 1)
        cols = (x0[:, None] + r)[:, None, None, :]  # (N, 1, 1, p)
        return img[ni, ci, rows, cols]  # (N, C, p, p)

    return at(x, y), at(x + d, y + d)


def patch_model(arch: str, feat_dim: int, patch: int, width: float, seed: int) -> CMCModel:
    """The patch encoder: the rgb view at the patch's input size (so a small patch gets the CIFAR stem)."""
    torch.manual_seed(seed)
    return CMCModel([BUILTIN["rgb"]], arch, feat_dim, patch, width)


def embed_pair(model: CMCModel, rgb: Tensor, patch: int, d: int, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Both patches through the one patch encoder: {'patch1': (N, D), 'patch2': (N, D)}."""
    p1, p2 = crop_pair(rgb, patch, d, x, y)
    m = model.views["rgb"]
    return {PAIR[0]: m(p1), PAIR[1]: m(p2)}


def patch_loss(patch: int, d: int, tau: float, d_max: int | None = None):
    """A ``loss_fn`` for ``train.pretrain.train``: CMC's two-view loss between the patches at offset d (anchors
    as ``positions`` draws them)."""

    def loss_fn(model: CMCModel, batch: dict[str, Tensor], g: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        rgb = batch["rgb"]  # (N, 3, S, S), already cropped/flipped as a whole by the pipeline
        x, y = positions(rgb.shape[0], rgb.shape[-1], patch, d, g, d_max)
        z = embed_pair(model, rgb, patch, d, x, y)
        return cmc_loss({k: v.float() for k, v in z.items()}, tau, "full")

    return loss_fn


@torch.no_grad()
def mi_bound(model: CMCModel, ds: Dataset, patch: int, d: int, k: int, tau: float, device="cpu",
             seed: int = 0, d_max: int | None = None) -> float:
    """``train.metrics.mi_bound`` of the patch pairs of held-out images (fixed positions, no augmentation):
    the mean of log(k) - L over batches of k pairs, the contrastive lower bound on I(v1; v2), with the same k
    at every offset (``train.metrics.mi_bound`` shuffles the pairs before batching them); anchors drawn as in
    training (``d_max``: the fixed scheme)."""
    if len(ds) < k:
        raise ValueError(f"the held-out set has {len(ds)} items, fewer than k = {k}")
    model.eval()
    data = DeviceData(ds, [BUILTIN["rgb"]], torch.device(device))
    g = torch.Generator().manual_seed(seed)
    size = int(ds.sources["rgb"].shape[1])
    z1, z2 = [], []
    for lo in range(0, len(ds) - k + 1, k):  # batches of k pairs, positions drawn per batch
        rgb = data.batch(torch.arange(lo, lo + k))["rgb"]
        x, y = positions(k, size, patch, d, g, d_max)
        z = embed_pair(model, rgb, patch, d, x, y)
        z1.append(z[PAIR[0]])
        z2.append(z[PAIR[1]])
    return embeddings_mi_bound(torch.cat(z1), torch.cat(z2), k, tau)
