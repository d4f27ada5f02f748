"""The input pipeline on the device: in-memory sources -> batch on the device -> CMC augmentation.

No DataLoader workers and no per-image Python: the dataset's arrays stay in (pinned) host memory as
uint8 / int32 tensors; a step indexes a batch, moves it with one non-blocking copy, converts to float
and applies one random resized crop + flip per sample to *all* image sources of that sample at once
(rgb and depth stay aligned) with ``affine_grid`` / ``grid_sample``. View transforms (Lab, normals, ...)
then run inside the models, on the same device.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.data import Dataset
from models.encoders import CROP_KEY
from models.views import ViewSpec


class DeviceData:
    """Sources of a dataset as host tensors, batched onto ``device`` as float32 in [0, 1] (images) or raw
    float32 (vectors)."""

    def __init__(self, ds: Dataset, specs: list[ViewSpec], device: torch.device, pin: bool = False):
        self.device = device
        keys = sorted({s.source_key for s in specs})
        self.host: dict[str, Tensor] = {}
        for k in keys:
            a = ds.sources[k]
            if a.dtype == np.uint16:  # torch has no general uint16: int32 keeps the values exact
                a = a.astype(np.int32)
            t = torch.from_numpy(np.ascontiguousarray(a))
            self.host[k] = t.pin_memory() if pin else t
        self.n = len(ds)

    def batch(self, idx: Tensor) -> dict[str, Tensor]:
        out = {}
        for k, t in self.host.items():
            x = t[idx].to(self.device, non_blocking=True)
            if k == "rgb":  # reorder while still uint8 (4x less memory traffic), then one conversion
                x = x.permute(0, 3, 1, 2).contiguous().float().div_(255.0)  # (N, 3, H, W)
            elif k == "depth":
                x = x.unsqueeze(1).float().div_(65535.0)  # (N, 1, H, W)
            else:
                x = x.float()  # (N, D)
            out[k] = x
        return out


def crop_params(n: int, crop_min: float, flip: bool, generator: torch.Generator) -> Tensor:
    """(n, 2, 3) affine matrices of RandomResizedCrop(scale=(crop_min, 1), ratio=(3/4, 4/3)) + flip, in
    grid_sample's normalised coordinates. Drawn on the CPU from ``generator`` so every rank and a resumed run
    draw the same numbers."""
    area = torch.empty(n).uniform_(crop_min, 1.0, generator=generator)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = logr.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # fraction of the width
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    sx = w * ((torch.rand(n, generator=generator) < 0.5).float() * -2 + 1 if flip else 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    return theta


def augment(batch: dict[str, Tensor], theta: Tensor) -> dict[str, Tensor]:
    """Apply one crop + flip per sample to every image source of the batch; vectors pass through. The crop
    matrices go along under CROP_KEY (geometry-aware view transforms such as normals read them)."""
    imgs = [k for k in ("rgb", "depth") if k in batch]
    if not imgs:
        return batch
    x = batch[imgs[0]] if len(imgs) == 1 else torch.cat([batch[k] for k in imgs], dim=1)  # (N, C_rgb + C_depth, H, W)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    out, c = dict(batch), 0
    for k in imgs:
        ch = batch[k].shape[1]
        out[k] = y[:, c:c + ch]
        c += ch
    out[CROP_KEY] = theta.to(x.device, x.dtype)
    return out


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of an epoch: a permutation fixed by (seed, epoch), the same on every rank."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_generator(seed: int, step: int) -> torch.Generator:
    """Randomness of one global step (augmentation, memory-bank negatives), fixed by (seed, step)."""
    return torch.Generator().manual_seed((seed + 1) * 7_919 + step * 104_729)
