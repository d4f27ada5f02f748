"""Batch norm across processes on any device: torch's SyncBatchNorm needs CUDA ("SyncBatchNorm layers only
work with GPU modules" under gloo on CPU, torch 2.13), so CPU runs under torchrun use this instead.

In training mode every batch-norm layer normalises with the statistics of the *global* batch (sums over all
ranks, one differentiable all-reduce per layer), exactly as one process would over the whole batch; its
running statistics get the same update on every rank. In eval mode, or in a single process, it is plain
batch norm, so checkpoints, evaluation and ONNX export are unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class GlobalBatchNorm(_BatchNorm):
    """Mixin over BatchNorm1d/2d/3d: training statistics are those of the batch gathered over all ranks."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
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
