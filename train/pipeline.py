"""The input pipeline on the device: in-memory sources -> batch on the device -> CMC augmentation.

No DataLoader workers and no per-image Python: the dataset's arrays stay as uint8 / 16-bit tensors on the GPU
(when they fit) or in pinned host memory; a step indexes a batch there (gathered into a pinned buffer and moved
with one non-blocking copy when on the host), converts to float
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
    """Sources of a dataset, batched onto ``device`` as float32 in [0, 1] (images) or raw float32 (vectors).

    Where the sources live: on a CPU run, host tensors indexed directly. On CUDA, resident on the GPU when they
    fit (``resident``; by default when they take at most a quarter of the GPU's free memory: CIFAR-10 is 150 MiB),
    indexed there with no copy at all; else in pinned host memory, each batch gathered with
    ``torch.index_select(out=)`` into one of two pinned staging buffers, so the ``non_blocking`` copy really
    overlaps (``t[idx]`` would make an unpinned tensor, and its copy synchronous); a buffer is refilled only after
    the copy out of it two batches ago has finished (a CUDA event). uint16 depth crosses as its 16 bits (int16)
    and is widened on the device."""

    RESIDENT_FRACTION = 0.25  # of the free GPU memory the sources may take to live on the GPU

    def __init__(self, ds: Dataset, specs: list[ViewSpec], device: torch.device, pin: bool = False,
                 resident: bool | None = None, stage: bool | None = None):
        self.device = device
        keys = sorted({s.source_key for s in specs})
        cuda = device.type == "cuda"
        self.host: dict[str, Tensor] = {}
        self._u16: set[str] = set()
        for k in keys:
            a = np.ascontiguousarray(ds.sources[k])
            if a.dtype == np.uint16:  # torch indexes no uint16: the same bits as int16, widened on the device
                a = a.view(np.int16)
                self._u16.add(k)
            self.host[k] = torch.from_numpy(a)
        self.n = len(ds)
        nbytes = sum(t.numel() * t.element_size() for t in self.host.values())
        if resident is None:
            resident = cuda and nbytes <= self.RESIDENT_FRACTION * torch.cuda.mem_get_info(device)[0]
        self.resident = bool(resident) and cuda
        self.src = {k: t.to(device) for k, t in self.host.items()} if self.resident else self.host
        self.stage = (cuda and not self.resident) if stage is None else bool(stage)
        if pin and not self.resident:
            self.host = {k: t.pin_memory() for k, t in self.host.items()}
            self.src = self.host
        self._pin = pin and not self.resident
        self._bufs: dict[tuple[str, int], Tensor] = {}
        self._done: list = [None, None]  # per staging slot: the event after the copies out of it
        self._slot = 0

    def _gather(self, k: str, idx: Tensor) -> Tensor:
        """Rows ``idx`` of source ``k`` on the device, in its stored dtype."""
        t = self.src[k]
        if self.resident:
            return t.index_select(0, idx.to(self.device, non_blocking=True))
        if not self.stage:
            return t[idx].to(self.device, non_blocking=True)
        shape = (idx.shape[0], *t.shape[1:])
        buf = self._bufs.get((k, self._slot))
        if buf is None or buf.shape != shape:
            buf = torch.empty(shape, dtype=t.dtype, pin_memory=self._pin)
            self._bufs[(k, self._slot)] = buf
        torch.index_select(t, 0, idx, out=buf)
        # on a CPU device (tests) .to would return the buffer itself, which the batch after next overwrites
        return buf.to(self.device, non_blocking=True) if self.device.type != "cpu" else buf.clone()

    def batch(self, idx: Tensor) -> dict[str, Tensor]:
        if self.stage and self._done[self._slot] is not None:
            self._done[self._slot].synchronize()  # the copies out of this slot (two batches ago) have finished
        out = {}
        for k in self.src:
            x = self._gather(k, idx)
            if k in self._u16:  # the 16 bits of uint16, widened on the device
                x = x.to(torch.int32).bitwise_and_(0xFFFF)
            if k == "rgb":  # reorder while still uint8 (4x less memory traffic), then one conversion
                x = x.permute(0, 3, 1, 2).contiguous().float().div_(255.0)  # (N, 3, H, W)
            elif k == "depth":
                x = x.unsqueeze(1).float().div_(65535.0)  # (N, 1, H, W)
            else:
                x = x.float()  # (N, D)
            out[k] = x
        if self.stage:
            if self.device.type == "cuda":
                self._done[self._slot] = torch.cuda.Event()
                self._done[self._slot].record()
            self._slot ^= 1
        return out


def crop_params(n: int, crop_min: float, flip: bool, generator: torch.Generator) -> Tensor:
    """(n, 2, 3) affine matrices of RandomResizedCrop(scale=(crop_min, 1), ratio=(3/4, 4/3)) + flip, in
    grid_sample's normalised coordinates. Drawn from ``generator``, on its device (the step's generator: the CPU's
    on a CPU run, the GPU's on CUDA, so nothing is copied), so every rank and a resumed run draw the same numbers."""
    dev = generator.device
    area = torch.empty(n, device=dev).uniform_(crop_min, 1.0, generator=generator)
    logr = torch.empty(n, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = logr.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # fraction of the width
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=generator, device=dev) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator, device=dev) * 2 - 1) * (1 - h)
    sx = w * ((torch.rand(n, generator=generator, device=dev) < 0.5).float() * -2 + 1 if flip else 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
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


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Randomness of one global step (augmentation, memory-bank negatives), fixed by (seed, step), on ``device``:
    the draws are made where they are used. The CPU's and the GPU's generators (Philox) give different numbers for
    one seed, so a CUDA run's draws equal a CPU run's in distribution, not value; every rank of a run draws the same."""
    return torch.Generator(device=device).manual_seed((seed + 1) * 7_919 + step * 104_729)
