"""python -m train.pretrain: one run, top to bottom. ``main`` reads the config, loads the data and its views,
checks that the model can be exported, trains (``train``: the loop, validation, checkpoints), then evaluates,
exports and indexes (``train.finish``). The pieces are one import away: the model (``train.model``), one
step (``train.step``), the input pipeline (``train.pipeline``), model selection (``train.selection``).

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

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from models.data import DataError, Dataset
from models.encoders import CMCModel
from models.views import ViewError, ViewSpec
from .config import Config, ConfigError, parse_args
from .distributed import Dist, convert_global_batchnorm, rank_seed, resolve_device, restore_batchnorm, use_device
from .export import ExportError, check_exportable
from .finish import finish
from .losses import MemoryBank, read_stats
from .model import CHECKPOINT, build_model, save_checkpoint
from .pipeline import DeviceData, augment, crop_params, epoch_order, step_generator
from .selection import Selector, resolve_val_fraction, split_validation, validate
from .setup import prepare
from .speed import speed_choices, to_channels_last
from .step import LossFn, lr_at, make_optimizer, train_step
from .vector_aug import VectorAugment, vector_pool

LOG = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, an incompatible checkpoint)."""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = None
    try:
        cfg = parse_args(argv)  # defaults < --config FILE < flags, every value type-checked
        world = Dist()  # torchrun's ranks, or one process
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device, world.local_rank, world.world)  # under torchrun: cuda:LOCAL_RANK
        use_device(device)  # this rank's GPU is current before NCCL, the data or the model touch CUDA
        world.init(device)
        ds, test, specs, image_size = prepare(cfg, progress=world.main)  # training and held-out data, views
        if cfg.export:  # an unexportable arch/size fails now on every rank, not after training
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
    code = finish(cfg, model, specs, image_size, test, device, ds)  # kNN check, export, gallery index
    if world.world > 1:
        dist.destroy_process_group()
    return code


def train(cfg: Config, ds: Dataset, specs: list[ViewSpec], image_size: int, device: torch.device,
          world: Dist | None = None, model: nn.Module | None = None, loss_fn: LossFn | None = None,
          timer=None) -> CMCModel:
    """The training loop. Returns the trained (unwrapped) model: with a validation split, the weights of the
    epoch with the best validation cross-view recall@1. Writes checkpoint.pt and metrics.jsonl.

    ``model`` and ``loss_fn`` swap in another model and objective (the analyses of train.experiments):
    ``loss_fn(model, batch, generator) -> (loss, stats with 'loss')`` on the augmented batch of sources,
    single process, without the memory bank. ``timer``: its ``start()`` and ``stop()`` are called around every
    step (the batch, the step and its one synchronisation; not validation, metrics or checkpoints): train.gpu_check
    times the steps alone."""
    world = world or Dist()
    use_device(device)  # callers other than main (train.gpu_check, the analyses) get the same current device
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / CHECKPOINT, out / "metrics.jsonl"

    # 1. the data: hold out validation items to select the best epoch (vector views by default; none for images)
    ds, val = split_validation(ds, resolve_val_fraction(cfg.val_fraction, specs), cfg.seed)
    selector = Selector(cfg.patience)

    # 2. the model (seeded), the speed choices, the memory bank, the optimiser and the schedule's length
    model = (build_model(cfg, specs, image_size, ds) if model is None else model).to(device)
    use_cuda = device.type == "cuda"
    if use_cuda:  # TF32 for fp32 matmuls and convolutions; cuDNN picks the fastest algorithm per (fixed) shape
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
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

    # 3. resume: weights, optimiser, memory bank, selection and step from the checkpoint
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

    # 4. across processes: DDP around the model; every rank takes its slice of the global batch
    ddp_model: nn.Module = model
    if world.ddp:
        # batch norm over the global batch, as one process computes it, on every device: GlobalBatchNorm (one
        # all-reduce of sums per layer, no host synchronisation; undone after training), not SyncBatchNorm, which
        # syncs with the host in every layer (boolean-mask indexing) and all-gathers per layer, and needs CUDA
        ddp_model = convert_global_batchnorm(model)
        ddp_model = nn.parallel.DistributedDataParallel(ddp_model, device_ids=[device.index] if use_cuda else None)
        # the model's initial weights are the same on every rank (built from cfg.seed; DDP broadcasts rank 0's
        # anyway); from here the default generators (CPU and CUDA: dropout) differ per rank, so ranks do not draw
        # the same dropout masks. Augmentation and bank negatives come from the global step's generator, sliced
        # per rank, so they already differ per sample and match a single process. One process keeps its stream.
        torch.manual_seed(rank_seed(cfg.seed, world.rank))
    if cfg.compile:  # after DDP (its DDPOptimizer splits the graph at the gradient buckets); the weights are shared
        ddp_model = torch.compile(ddp_model)
    data = DeviceData(ds, specs, device, pin=use_cuda)  # on CUDA: resident on the GPU, or pinned and staged
    vec_aug = VectorAugment(vector_pool(data.host, [s.name for s in specs if not s.is_image]),
                            cfg.vector_corrupt, cfg.vector_noise)
    local_bs = cfg.batch_size // world.world
    if local_bs * world.world != cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by {world.world} processes")

    def checkpoint(final: bool = False) -> None:
        """Everything a resume, an evaluation or an export needs, written atomically by the main rank."""
        if world.main:
            weights = model.state_dict()
            extra = {}
            if final and selector.best_state is not None:  # the selected epoch is the model; keep the last to resume
                weights, extra = selector.best_state, {"last_model": model.state_dict()}
            save_checkpoint({"config": asdict(cfg), "model": weights, **extra, "optimizer": opt.state_dict(),
                             "selection": selector.state_dict() if val is not None else None,
                             "bank": bank.state_dict() if bank else None, "step": step,
                             "views": [s.to_dict() for s in specs], "image_size": image_size,
                             "data_info": {k: v for k, v in ds.info.items() if k != "skipped_files"},
                             "n_train": len(ds)}, ckpt_path)

    # 5. the loop: a global batch in a fixed order, augmented on the device, one step; per epoch validation
    # (with early stopping) and a checkpoint; one metrics.jsonl record per step
    last = total if not cfg.max_steps else min(total, cfg.max_steps)
    if selector.should_stop:  # a resumed run that had already stopped early
        last = step
    bar = tqdm(total=last, initial=step, desc="pretrain", disable=not world.main or step >= last, dynamic_ncols=True,
               mininterval=1.0)  # a redraw at most once a second, not every step
    ddp_model.train()
    t_last, n_since = time.perf_counter(), 0
    order_epoch, order, order_dev = -1, None, None
    try:
        with open(metrics_path, "a") if world.main else open(os.devnull, "w") as mf:
            while step < last:
                if timer is not None:
                    timer.start()
                epoch, i = divmod(step, steps_per_epoch)
                if epoch != order_epoch:  # one permutation per epoch, kept on the host and on the device
                    order = epoch_order(len(ds), cfg.seed, epoch)
                    order_dev, order_epoch = order.to(device), epoch
                rows = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)  # the global batch
                idx = order_dev[rows]
                # the step's randomness, drawn on the device (the same numbers on every rank)
                g = step_generator(cfg.seed, step, device)
                theta = crop_params(cfg.batch_size, cfg.crop_min, cfg.flip, g)
                lo, hi = world.rank * local_bs, (world.rank + 1) * local_bs
                mine = (idx if data.resident else order[rows])[lo:hi]  # indices where the sources live
                batch = vec_aug(augment(data.batch(mine), theta[lo:hi]), g, cfg.batch_size, lo)
                if channels_last:
                    batch = to_channels_last(batch)
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, step, cfg.schedule_steps or total)
                loss, stats = train_step(ddp_model, opt, bank, batch, idx, cfg, world, g, amp, loss_fn)
                # the step's one host synchronisation, after its update is queued: the loss and the statistics
                stats = read_stats(stats | {"__loss__": loss.detach()})
                if timer is not None:
                    timer.stop()
                if not math.isfinite(stats.pop("__loss__")):
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
                    bar.set_postfix(epoch=epoch + 1, loss=f"{stats['loss']:.3f}", mi=f"{mi:.2f}", sps=f"{sps:.0f}",
                                    refresh=False)  # drawn with the next throttled update
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

    # 6. the model is the selected epoch's (with a validation split), with plain batch norm
    if selector.best_state is not None:
        model.load_state_dict(selector.best_state)
        LOG.info("selected epoch %d: validation cross-view recall@1 %.4f", selector.best_epoch, selector.best)
    return restore_batchnorm(model)


def _trim_metrics(path: Path, step: int, cfg: Config) -> None:
    """Keep metrics of steps <= ``step`` (a resumed run rewrites what came after its checkpoint); write the
    header with the config on a fresh run."""
    if step == 0 or not path.exists():
        path.write_text(json.dumps({"type": "header", "config": asdict(cfg), "time": time.time()}) + "\n")
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("\n".join(keep) + "\n")


if __name__ == "__main__":
    sys.exit(main())
