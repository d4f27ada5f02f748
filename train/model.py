"""The model of a run: build it from a config (seeded), save a checkpoint atomically, load a run back, and
re-estimate batch-norm statistics (the fair random-init baseline). Every other module gets its model here."""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from models.artifact import CHECKPOINT, ModelNotFound, locate
from models.data import Dataset
from models.encoders import CMCModel
from models.views import ViewSpec, spec_from_dict
from .config import Config, ConfigError, from_dict
from .pipeline import DeviceData

LOG = logging.getLogger(__name__)


def build_model(cfg: Config, specs: list[ViewSpec], image_size: int, ds: Dataset | None = None) -> CMCModel:
    """The encoders of ``specs`` as ``cfg`` shapes them, initialised from ``cfg.seed``; with ``ds``, vector views'
    per-feature statistics are fitted on it (kept in the model, and so in the exported graph)."""
    torch.manual_seed(cfg.seed)
    model = CMCModel(specs, cfg.arch, cfg.feat_dim, image_size, cfg.width, mlp_layers=cfg.mlp_layers,
                     mlp_dropout=cfg.mlp_dropout)
    if ds is not None:
        for s in specs:
            if not s.is_image:
                model.views[s.name].transform.fit(torch.from_numpy(ds.sources[s.name]).float())
    return model


def save_checkpoint(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_run(run: str | Path, device="cpu", random_init: bool = False) -> tuple[CMCModel, dict]:
    """The trained model of a run directory (or a checkpoint file, or the artifact directory a run exported),
    in eval mode, and its checkpoint dict; the path comes from models.artifact.locate, the resolver the ONNX
    runtime uses too. ``random_init``: the same encoders at another seed's initial weights (the baseline),
    keeping the vector views' standardisation statistics, which are data, not learned weights."""
    try:
        path = locate(run, "checkpoint")
    except ModelNotFound as e:
        raise ConfigError(str(e)) from None
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = from_dict(state["config"])
    specs = [spec_from_dict(d) for d in state["views"]]
    model = build_model(replace(cfg, seed=cfg.seed + (9_999 if random_init else 0)), specs, state["image_size"])
    sd = state["model"]
    if random_init:
        model.load_state_dict({k: v for k, v in sd.items() if ".transform." in k}, strict=False)
    else:
        model.load_state_dict(sd)
    return model.to(device).eval(), state


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``recalibrate_bn`` has anything to re-estimate (vector views' MLPs use LayerNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recalibrate_bn(model: CMCModel, ds: Dataset, device="cpu", n: int = 2048, batch_size: int = 256,
                   seed: int = 0) -> CMCModel:
    """Re-estimate every batch-norm layer's running statistics on ``n`` (unlabelled) items of ``ds`` drawn at
    random (seeded: never the first ``n`` of a class-sorted file), without augmentation (cumulative average over
    batches), and return the model in eval mode. A randomly
    initialised encoder's default statistics (mean 0, variance 1) mis-scale its features; this is the fair
    random-init baseline."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    ds = ds.sample(n, seed)
    data = DeviceData(ds, list(model.specs.values()), torch.device(device))
    stop = len(ds)
    for lo in range(0, stop, batch_size):
        hi = min(lo + batch_size, stop)
        if hi - lo >= 2 and bns:  # batch norm needs two samples
            model(data.batch(torch.arange(lo, hi)))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()
