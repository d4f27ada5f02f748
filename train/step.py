"""One optimisation step and what it is made of: the optimiser, the learning-rate schedule, and
``train_step`` (forward under autocast, CMC's loss or another objective, backward, update, memory bank)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .config import Config
from .distributed import Dist
from .losses import MemoryBank, cmc_loss

# loss_fn(model, batch of sources, step generator) -> (loss, stats): an objective other than CMC's
LossFn = Callable[[nn.Module, dict[str, torch.Tensor], torch.Generator],
                  tuple[torch.Tensor, dict[str, torch.Tensor | float]]]


def lr_at(cfg: Config, step: int, total: int) -> float:
    """Linear warm-up over ``cfg.warmup_steps``, then cosine decay to 0 at ``total``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # fused AdamW on CUDA (one kernel for all parameters' updates instead of a loop of small ones)
    params = list(model.parameters())
    fused = True if params and all(p.is_cuda for p in params) else None
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, bank: MemoryBank | None, batch: dict[str, torch.Tensor],
               idx: torch.Tensor, cfg: Config, world: Dist, g: torch.Generator, amp: bool,
               loss_fn: LossFn | None = None) -> tuple[torch.Tensor, dict]:
    """One optimisation step on a (local) batch of sources; ``idx`` are the *global* batch's sample indices.
    CMC's objective by default: embeddings under autocast, gathered across ranks, the loss in fp32 (with the
    memory bank's negatives when there is a bank). ``loss_fn`` swaps in another objective (train.experiments),
    computed under autocast on the local batch, without gather or memory bank. No host synchronisation: the
    statistics are tensors and finiteness is the caller's to check (``train.pretrain`` reads the loss and the
    statistics once per step, after the update is queued, and stops on a non-finite loss before any checkpoint)."""
    with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(batch) if loss_fn is None else loss_fn(model, batch, g)
    if loss_fn is None:
        z = world.gather({v: t.float() for v, t in out.items()})  # (B, D) per view, the global batch
        loss, stats = _cmc_objective(z, bank, idx, cfg, g)
    else:
        z, bank = None, None
        loss, stats = out
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if bank is not None:
        bank.update(z, idx)
    return loss, stats


def _cmc_objective(z: dict[str, torch.Tensor], bank: MemoryBank | None, idx: torch.Tensor, cfg: Config,
                   g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CMC's loss of the global batch's embeddings: in-batch negatives, or the memory bank's (shared or
    per-sample draws)."""
    if bank is not None and cfg.negatives_sharing == "shared":
        neg_idx, own = bank.sample_shared(idx, cfg.nce_k, g)  # (K,), (B, K)
        targets, negs = bank.gather(idx, neg_idx)  # (B, D), (K, D) per view
        return cmc_loss(z, cfg.tau, cfg.graph, targets, negs, own)
    if bank is not None:
        targets, negs = bank.gather(idx, bank.sample(idx, cfg.nce_k, g))  # (B, D), (B, K, D) per view
        return cmc_loss(z, cfg.tau, cfg.graph, targets, negs)
    return cmc_loss(z, cfg.tau, cfg.graph)
