"""python -m train.pretrain: pretrain per-view CMC encoders, then evaluate, export and index.

Single process on CPU or one GPU, or several processes under torchrun (DistributedDataParallel; each
rank takes its slice of the same global batch, embeddings are gathered before the loss, and the memory
bank is updated with the gathered batch on every rank, so ranks stay identical).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from models.data import DataError, Dataset
from models.encoders import CMCModel
from models.views import ViewError, ViewSpec
from .config import Config, ConfigError, parse_args
from .distributed import convert_global_batchnorm, restore_batchnorm
from .export import ExportError
from .losses import MemoryBank, cmc_loss
from .pipeline import DeviceData, augment, crop_params, epoch_order, step_generator
from .selection import Selector, embed_all, mean_cross_view_recall, resolve_val_fraction, split_validation
from .setup import prepare
from .speed import use_amp, use_channels_last
from .vector_aug import VectorAugment, vector_pool

LOG = logging.getLogger(__name__)

# loss_fn(model, batch of sources, step generator) -> (loss, stats): an objective other than CMC's
LossFn = Callable[[nn.Module, dict[str, torch.Tensor], torch.Generator], tuple[torch.Tensor, dict[str, float]]]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, an incompatible checkpoint)."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], not {name!r}")
    return torch.device(name)


class Dist:
    """torchrun's environment, or a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def gather(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Differentiable all-gather of every view's (n, D) -> (world * n, D), in rank order."""
        if self.world == 1:
            return z
        import warnings
        from torch.distributed.nn.functional import all_gather  # differentiable: backward reduce-scatters
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
        return {v: torch.cat(all_gather(t), dim=0) for v, t in z.items()}


def lr_at(cfg: Config, step: int, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build_model(cfg: Config, specs: list[ViewSpec], image_size: int, ds: Dataset | None = None) -> CMCModel:
    torch.manual_seed(cfg.seed)
    model = CMCModel(specs, cfg.arch, cfg.feat_dim, image_size, cfg.width, mlp_layers=cfg.mlp_layers,
                     mlp_dropout=cfg.mlp_dropout)
    if ds is not None:  # per-feature statistics of vector views, kept in the model (and the exported graph)
        for s in specs:
            if not s.is_image:
                model.views[s.name].transform.fit(torch.from_numpy(ds.sources[s.name]).float())
    return model


def speed_choices(cfg: Config, specs: list[ViewSpec], device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) for this config on this device (``speed.use_amp``, ``use_channels_last``)."""
    has_conv = any(s.is_image for s in specs)
    return use_amp(cfg.amp, device, has_conv), use_channels_last(cfg.channels_last, has_conv)


def to_channels_last(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in batch.items()}


def train(cfg: Config, ds: Dataset, specs: list[ViewSpec], image_size: int, device: torch.device,
          world: Dist | None = None, model: nn.Module | None = None, loss_fn: LossFn | None = None) -> CMCModel:
    """The training loop. Returns the trained (unwrapped) model: with a validation split, the weights of the
    epoch with the best validation cross-view recall@1. Writes checkpoint.pt and metrics.jsonl.

    ``model`` and ``loss_fn`` swap in another model and objective (the analyses of train.experiments):
    ``loss_fn(model, batch, generator) -> (loss, stats with 'loss')`` on the augmented batch of sources,
    single process, without the memory bank."""
    world = world or Dist()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    ds, val = split_validation(ds, resolve_val_fraction(cfg.val_fraction, specs), cfg.seed)
    selector = Selector(cfg.patience)
    model = (build_model(cfg, specs, image_size, ds) if model is None else model).to(device)
    use_cuda = device.type == "cuda"
    amp, channels_last = speed_choices(cfg, specs, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    bank = None
    if cfg.negatives == "memory" and loss_fn is None:
        bank = MemoryBank([s.name for s in specs], len(ds), cfg.feat_dim, cfg.nce_momentum, device, cfg.seed)
    opt = make_optimizer(cfg, model)
    steps_per_epoch = len(ds) // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{len(ds)} training samples is fewer than one batch of {cfg.batch_size}: lower --batch-size")
    total = steps_per_epoch * cfg.epochs
    step = 0
    if cfg.resume:
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if [s["name"] for s in state["views"]] != [s.name for s in specs]:
            raise TrainingError(f"--resume: checkpoint views {[s['name'] for s in state['views']]} differ from --views")
        model.load_state_dict(state.get("last_model") or state["model"])
        opt.load_state_dict(state["optimizer"])
        if bank is not None and state.get("bank"):
            bank.load_state_dict(state["bank"])
        selector.load_state_dict(state.get("selection"))
        step = int(state["step"])
        LOG.info("resumed from %s at step %d", ckpt_path, step)
    if world.main:
        _trim_metrics(metrics_path, step, cfg)

    ddp_model: nn.Module = model
    if world.world > 1:
        # batch norm over the global batch, as one process computes it: SyncBatchNorm on CUDA; on CPU (gloo),
        # where SyncBatchNorm refuses to run, GlobalBatchNorm (undone after training)
        ddp_model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if use_cuda else convert_global_batchnorm(model)
        ddp_model = nn.parallel.DistributedDataParallel(ddp_model, device_ids=[device.index] if use_cuda else None)
    data = DeviceData(ds, specs, device, pin=use_cuda)
    vec_aug = VectorAugment(vector_pool(data.host, [s.name for s in specs if not s.is_image]),
                            cfg.vector_corrupt, cfg.vector_noise)
    local_bs = cfg.batch_size // world.world
    if local_bs * world.world != cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by {world.world} processes")

    def checkpoint(final: bool = False) -> None:
        if world.main:
            weights = model.state_dict()
            extra = {}
            if final and selector.best_state is not None:  # the selected epoch is the model; keep the last to resume
                weights, extra = selector.best_state, {"last_model": model.state_dict()}
            save_atomic({"config": asdict(cfg), "model": weights, **extra, "optimizer": opt.state_dict(),
                         "selection": selector.state_dict() if val is not None else None,
                         "bank": bank.state_dict() if bank else None, "step": step, "views": [s.to_dict() for s in specs],
                         "image_size": image_size, "data_info": {k: v for k, v in ds.info.items() if k != "skipped_files"},
                         "n_train": len(ds)}, ckpt_path)

    last = total if not cfg.max_steps else min(total, cfg.max_steps)
    if selector.should_stop:  # a resumed run that had already stopped early
        last = step
    bar = tqdm(total=last, initial=step, desc="pretrain", disable=not world.main or step >= last, dynamic_ncols=True)
    ddp_model.train()
    t_last, n_since = time.perf_counter(), 0
    try:
        with open(metrics_path, "a") if world.main else open(os.devnull, "w") as mf:
            while step < last:
                epoch, i = divmod(step, steps_per_epoch)
                order = epoch_order(len(ds), cfg.seed, epoch)
                idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]  # the global batch
                g = step_generator(cfg.seed, step)
                theta = crop_params(cfg.batch_size, cfg.crop_min, cfg.flip, g)
                lo, hi = world.rank * local_bs, (world.rank + 1) * local_bs
                batch = vec_aug(augment(data.batch(idx[lo:hi]), theta[lo:hi]), g, cfg.batch_size, lo)
                if channels_last:
                    batch = to_channels_last(batch)
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, step, total)
                loss, stats = train_step(ddp_model, opt, bank, batch, idx.to(device), cfg, world, g, amp, loss_fn)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss is {loss.item()} at step {step} (epoch {epoch + 1}): stopping; "
                                        f"lower --lr or check the data for extreme values")
                step += 1
                n_since += cfg.batch_size
                now = time.perf_counter()
                sps = n_since / max(now - t_last, 1e-9)
                epoch_end = step % steps_per_epoch == 0
                if epoch_end and val is not None:  # every rank measures (same weights), so all stop together
                    stats = stats | validate(model, val, device, selector, epoch + 1)
                if world.main:
                    rec = {"step": step, "epoch": epoch + 1, "lr": round(opt.param_groups[0]["lr"], 8),
                           "samples_per_s": round(sps, 1), **{k: round(v, 6) for k, v in stats.items()}}
                    mf.write(json.dumps(rec) + "\n")
                    mi = sum(v for k, v in stats.items() if k.startswith("mi/")) / max(1, sum(k.startswith("mi/") for k in stats))
                    bar.set_postfix(epoch=epoch + 1, loss=f"{stats['loss']:.3f}", mi=f"{mi:.2f}", sps=f"{sps:.0f}")
                    bar.update(1)
                if now - t_last > 10:
                    t_last, n_since = now, 0
                if epoch_end and val is not None and selector.should_stop:
                    LOG.info("early stop after epoch %d: no better validation recall for %d epochs (best %.4f at "
                             "epoch %d)", epoch + 1, selector.since, selector.best, selector.best_epoch)
                    last = step
                if epoch_end or step == last:
                    mf.flush()
                    checkpoint(final=step == last)
    except KeyboardInterrupt:
        checkpoint()
        bar.close()
        raise
    bar.close()
    if selector.best_state is not None:
        model.load_state_dict(selector.best_state)
        LOG.info("selected epoch %d: validation cross-view recall@1 %.4f", selector.best_epoch, selector.best)
    return restore_batchnorm(model)


def validate(model: CMCModel, val: Dataset, device: torch.device, selector: Selector, epoch: int) -> dict[str, float]:
    """Validation cross-view recall@1 after an epoch (mean over ordered view pairs), fed to the selector."""
    mean, per = mean_cross_view_recall(embed_all(model, val, device))
    best = selector.update(model, epoch, mean)
    return {"val_recall@1": mean, **{f"val_recall@1/{p}": r for p, r in per.items()}, "val_best": float(best)}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, bank: MemoryBank | None, batch: dict[str, torch.Tensor],
               idx: torch.Tensor, cfg: Config, world: Dist, g: torch.Generator, amp: bool,
               loss_fn: LossFn | None = None) -> tuple[torch.Tensor, dict]:
    """One optimisation step on a (local) batch of sources; ``idx`` are the *global* batch's sample indices.
    A non-finite loss is returned before any parameter changes."""
    if loss_fn is not None:  # another objective (train.experiments): its own loss; no gather, no memory bank
        with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=amp):
            loss, stats = loss_fn(model, batch, g)
        if torch.isfinite(loss):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss, stats
    with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=amp):
        z = model(batch)
    z = world.gather({v: t.float() for v, t in z.items()})  # (B, D) per view, the global batch; the loss is fp32
    if bank is not None and cfg.negatives_sharing == "shared":
        neg_idx, own = bank.sample_shared(idx, cfg.nce_k, g)  # (K,), (B, K)
        targets, negs = bank.gather(idx, neg_idx)  # (B, D), (K, D) per view
        loss, stats = cmc_loss(z, cfg.tau, cfg.graph, targets, negs, own)
    elif bank is not None:
        targets, negs = bank.gather(idx, bank.sample(idx, cfg.nce_k, g))  # (B, D), (B, K, D) per view
        loss, stats = cmc_loss(z, cfg.tau, cfg.graph, targets, negs)
    else:
        loss, stats = cmc_loss(z, cfg.tau, cfg.graph)
    if not torch.isfinite(loss):
        return loss, stats
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if bank is not None:
        bank.update(z, idx)
    return loss, stats


def _trim_metrics(path: Path, step: int, cfg: Config) -> None:
    """Keep metrics of steps <= ``step`` (a resumed run rewrites what came after its checkpoint); write the
    header with the config on a fresh run."""
    if step == 0 or not path.exists():
        path.write_text(json.dumps({"type": "header", "config": asdict(cfg), "time": time.time()}) + "\n")
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("\n".join(keep) + "\n")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = None
    try:
        cfg = parse_args(argv)
        world = Dist()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device, world.local_rank)
        world.init(device)
        ds, test, specs, image_size = prepare(cfg, progress=world.main)
        if cfg.export:  # an unexportable arch/size fails now on every rank, not after training
            from .export import check_exportable
            check_exportable(build_model(cfg, specs, image_size), image_size)
        model = train(cfg, ds, specs, image_size, device, world)
    except (ConfigError, DataError, ViewError, TrainingError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted" + (f": checkpoint saved in {cfg.out}; continue with --resume" if cfg else ""), file=sys.stderr)
        return 130
    if world.world > 1:
        dist.barrier()
        if not world.main:
            dist.destroy_process_group()
            return 0
    from .finish import finish
    code = finish(cfg, model, specs, image_size, test, device, ds)
    if world.world > 1:
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
