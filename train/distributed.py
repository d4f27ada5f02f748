"""Where a run executes: torchrun's environment (``Dist``: world, rank, the differentiable gather of embeddings),
the device of a rank, and batch norm across processes on any device.

Runs under torchrun use ``GlobalBatchNorm`` on every device. torch's SyncBatchNorm needs CUDA ("SyncBatchNorm
layers only work with GPU modules" under gloo on CPU, torch 2.13), and on CUDA it synchronises with the host in
every layer (its forward indexes with a boolean mask) and all-gathers per layer; GlobalBatchNorm needs one
all-reduce of (sum, sum of squares) per layer and no synchronisation. In training mode every batch-norm layer
normalises with the statistics of the *global* batch (sums over all ranks, one differentiable all-reduce per
layer), exactly as one process would over the whole batch; its running statistics get the same update on
every rank. In eval mode, or in a single process, it is plain batch norm, so checkpoints, evaluation and ONNX
export are unchanged.
"""
from __future__ import annotations

import os
import re
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import ConfigError


def resolve_device(name: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """--device: auto (this rank's GPU when CUDA is present, else the CPU), cpu, cuda or cuda:N.

    Always an explicit index on CUDA. Under torchrun (``world`` > 1) ``auto`` and ``cuda`` mean this rank's GPU,
    ``cuda:LOCAL_RANK``; an explicit ``cuda:N`` is refused rather than mapped, because every rank would read the
    same N (all ranks on one GPU, which NCCL rejects) and silently replacing it would ignore what was asked:
    choose GPUs with CUDA_VISIBLE_DEVICES instead."""
    if name != "auto" and name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], not {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if ":" in name:
        if world > 1:
            raise ConfigError(f"--device {name} under torchrun ({world} processes) would put every rank on GPU "
                              f"{name.split(':')[1]}: use --device cuda or auto (each rank takes cuda:LOCAL_RANK) "
                              f"and choose the GPUs with CUDA_VISIBLE_DEVICES")
        index = int(name.split(":")[1])
    else:
        index = local_rank
    count = torch.cuda.device_count()
    if index >= count:
        what = f"LOCAL_RANK {local_rank}" if ":" not in name else f"--device {name}"
        raise ConfigError(f"{what}: this machine shows {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
                          f"run at most {count} processes per node")
    return torch.device("cuda", index)


def use_device(device: torch.device) -> None:
    """Make ``device`` this process's current CUDA device (before anything touches CUDA: pinning, the model, NCCL),
    so no rank opens a context on GPU 0 by default."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's default generators (CPU and CUDA: dropout) after the model is built: distinct per rank.
    Rank 0 of a single process keeps its generator untouched (see ``train.pretrain.train``)."""
    return (seed * 1_000_003 + 7_777 * (rank + 1)) % (2**63 - 1)


class Dist:
    """torchrun's environment, or a single process."""

    def __init__(self, force_ddp: bool = False):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # DistributedDataParallel (a process group, GlobalBatchNorm, DDP's gradient all-reduce) with several
        # processes, or with one when forced (train.gpu_check exercises that path on a one-GPU machine)
        self.ddp = self.world > 1 or force_ddp

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.ddp and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def gather(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Differentiable all-gather of every view's (n, D) -> (world * n, D), in rank order."""
        if self.world == 1:
            return z
        # lazy: torch.distributed.nn is needed only under torchrun
        from torch.distributed.nn.functional import all_gather  # differentiable: backward reduce-scatters
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
        return {v: torch.cat(all_gather(t), dim=0) for v, t in z.items()}


class GlobalBatchNorm(_BatchNorm):
    """Mixin over BatchNorm1d/2d/3d: training statistics are those of the batch gathered over all ranks."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        # lazy: torch.distributed.nn is needed only under torchrun
        from torch.distributed.nn.functional import all_reduce  # differentiable: backward sums the gradients
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        sums = torch.stack([xf.sum(dims), (xf * xf).sum(dims)])  # (2, C)
        sums = all_reduce(sums)
        n = float(x.numel() // x.shape[1] * dist.get_world_size())  # every rank holds an equal slice
        mean = sums[0] / n
        var = (sums[1] / n - mean * mean).clamp_min(0.0)  # biased, as batch norm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1.0, 1.0)), alpha=m)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class GlobalBatchNorm1d(GlobalBatchNorm, nn.BatchNorm1d):
    pass


class GlobalBatchNorm2d(GlobalBatchNorm, nn.BatchNorm2d):
    pass


class GlobalBatchNorm3d(GlobalBatchNorm, nn.BatchNorm3d):
    pass


_GLOBAL = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm3d: GlobalBatchNorm3d}


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every BatchNorm1d/2d/3d of ``module`` into its GlobalBatchNorm subclass, in place (same parameters,
    buffers and state-dict keys); returns ``module``."""
    for m in module.modules():
        if type(m) in _GLOBAL:
            m.__class__ = _GLOBAL[type(m)]
    return module


def restore_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_global_batchnorm` in place; returns ``module``."""
    back = {v: k for k, v in _GLOBAL.items()}
    for m in module.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
    return module
