"""Cross-view prediction, the objective CMC compares itself with: predict ab from L (colourisation).

The same L encoder as the contrastive model (``models.encoders``) reads L; a small decoder on its last
spatial feature map predicts the ab channels at a quarter of the input resolution (as colourisation work
does, Zhang et al. 2016), by

- ``regression_l2``: mean squared error on the normalised ab values;
- ``regression_l1``: mean absolute error on them;
- ``classification``: per-pixel cross-entropy over a Q x Q grid of quantised ab bins (hard assignment to the
  nearest bin, no rebalancing; bin width about 11 Lab units at Q = 16, close to Zhang et al.'s 10);
- ``classification_rebalanced``: the recipe of Zhang, Isola and Efros 2016 ("Colorful Image Colorization",
  section 2.1-2.2) on the same grid: each target cell soft-encoded over its 5 nearest bins with a Gaussian
  kernel of sigma = 5 Lab units on the distance to the bin centres (normalised to sum 1), and each cell's
  cross-entropy weighted by w(q*) of its nearest bin q*, w proportional to ((1 - lambda) p~ + lambda / Q)^-1
  with lambda = 1/2, p~ the empirical bin distribution of a seeded random sample of training targets smoothed
  by a Gaussian of sigma = 5 Lab units, Q the number of bins that sample uses (the paper's in-gamut bins), and
  w scaled so that its mean under p~ is 1 (``ab_prior``, ``rebalance_weights``, ``soft_encode``).

The supervised row of ``train.experiments predictive`` trains the same L encoder with labels (a linear
classifier on its penultimate features, cross-entropy) at the same budget: ``train_supervised``.

``PredictiveModel.cmc`` is an ordinary one-view :class:`CMCModel`, so the L encoder is evaluated by
``train.metrics`` exactly as a contrastive one is. The loss is a ``loss_fn`` for ``train.pretrain.train``.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.encoders import AlexNetHalf, CMCModel, ResNet
from models.transforms import make_transform
from models.views import BUILTIN, LAB_STD

from .pipeline import DeviceData, augment, crop_params, epoch_order, step_generator
from .speed import use_amp
from .step import lr_at, make_optimizer

LOG = logging.getLogger(__name__)

METHODS = ("regression_l1", "regression_l2", "classification", "classification_rebalanced")
AB_RANGE = 1.0  # normalised ab lies in about [-1, 1] (views.LAB_MEAN / LAB_STD); bins cover [-1, 1]^2
AB_STD = (LAB_STD[1], LAB_STD[2])  # Lab units per normalised unit of a and of b
SIGMA_LAB = 5.0  # Zhang et al.: the soft-encoding kernel and the prior's smoothing, in Lab units
NEAREST = 5  # Zhang et al.: bins a target is soft-encoded over
LAMBDA = 0.5  # Zhang et al.: weight of the uniform distribution mixed into the prior


def feature_map(encoder: nn.Module, x: Tensor) -> Tensor:
    """The encoder's last spatial feature map, before global pooling: (N, C, h, w)."""
    if isinstance(encoder, ResNet):
        return encoder.body[:-2](x)  # body = stem, blocks, AdaptiveAvgPool2d, Flatten
    if isinstance(encoder, AlexNetHalf):
        return encoder.conv[:-1](x)  # conv = blocks, AdaptiveAvgPool2d
    raise ValueError(f"cross-view prediction needs a convolutional encoder, not {type(encoder).__name__}")


def ab_bins(ab: Tensor, q: int) -> Tensor:
    """Normalised ab (N, 2, h, w) -> bin index (N, h, w) on a q x q grid over [-1, 1]^2 (clamped)."""
    i = ((ab.clamp(-AB_RANGE, AB_RANGE - 1e-6) + AB_RANGE) / (2 * AB_RANGE) * q).long().clamp_(0, q - 1)  # (N, 2, h, w)
    return i[:, 0] * q + i[:, 1]


def bin_centres(q: int) -> Tensor:
    """(q * q, 2) normalised ab at each bin's centre, in ``ab_bins`` order."""
    c = (torch.arange(q, dtype=torch.float32) + 0.5) / q * 2 * AB_RANGE - AB_RANGE
    return torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)


def _lab_distance2(ab: Tensor, centres: Tensor) -> Tensor:
    """Squared distances in Lab units between normalised ab points (M, 2) and bin centres (Q, 2): (M, Q)."""
    scale = torch.tensor(AB_STD, dtype=ab.dtype, device=ab.device)
    return torch.cdist(ab * scale, centres.to(ab.device, ab.dtype) * scale).square()


def soft_encode(ab: Tensor, q: int, nearest: int = NEAREST, sigma: float = SIGMA_LAB) -> Tensor:
    """Normalised ab (N, 2, h, w) -> soft targets (N, q * q, h, w): a Gaussian kernel (sigma in Lab units) on the
    distance to each of the ``nearest`` closest bin centres, zero elsewhere, summing to 1 per cell."""
    n, _, h, w = ab.shape
    pts = ab.permute(0, 2, 3, 1).reshape(-1, 2).float()
    d2 = _lab_distance2(pts, bin_centres(q))  # (M, Q)
    near, idx = d2.topk(nearest, dim=1, largest=False)
    k = torch.exp(-(near - near[:, :1]) / (2 * sigma * sigma))  # shifted by the nearest: the same after normalising
    soft = torch.zeros_like(d2).scatter_(1, idx, k / k.sum(1, keepdim=True))
    return soft.reshape(n, h, w, q * q).permute(0, 3, 1, 2)


def ab_prior(targets: Tensor, q: int, sigma: float = SIGMA_LAB) -> tuple[Tensor, Tensor]:
    """(empirical, smoothed) distributions over the q * q bins of normalised ab target cells (N, 2, h, w): the
    share of cells whose nearest bin is each bin, and that histogram smoothed by a Gaussian of ``sigma`` Lab
    units over the bin centres, kept on the bins the data uses (the paper's in-gamut bins) and renormalised:
    Zhang et al.'s p~."""
    counts = torch.bincount(ab_bins(targets, q).flatten(), minlength=q * q).double()
    if counts.sum() == 0:
        raise ValueError("the prior sample has no target cells")
    p = counts / counts.sum()
    c = bin_centres(q).double()
    kern = torch.exp(-_lab_distance2(c, c) / (2 * sigma * sigma))  # (Q, Q)
    smooth = torch.where(p > 0, kern @ p, torch.zeros_like(p))
    return p, smooth / smooth.sum()


def rebalance_weights(smoothed: Tensor, lam: float = LAMBDA) -> Tensor:
    """Zhang et al.'s class-rebalancing weights: w ~ ((1 - lam) p~ + lam / Q)^-1, Q the bins the data uses
    (p~ > 0; the others never occur as a nearest bin), scaled so that E_{p~}[w] = sum_q p~_q w_q = 1."""
    n_used = int((smoothed > 0).sum())
    w = 1.0 / ((1 - lam) * smoothed + lam / n_used)
    return (w / (smoothed * w).sum()).float()


def target_prior(model: "PredictiveModel", rgb: Tensor) -> tuple[Tensor, Tensor]:
    """``ab_prior`` of the model's own targets (its ab transform, pooled to its target size) of rgb (N, 3, H, W)."""
    with torch.no_grad():
        target = F.adaptive_avg_pool2d(model.ab(rgb.float()), model.target_size)
    return ab_prior(target, model.bins)


class Decoder(nn.Module):
    """(N, C, h, w) -> (N, out, h * 2^ups, w * 2^ups): bilinear x2 upsampling + conv-BN-ReLU, then a 1x1 conv."""

    def __init__(self, cin: int, out: int, ups: int, width: int = 64):
        super().__init__()
        layers, c = [], cin
        for _ in range(ups):
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(c, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c = width
        layers += [nn.Conv2d(c, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                   nn.Conv2d(width, out, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PredictiveModel(nn.Module):
    """L encoder (inside a one-view CMCModel) + decoder predicting ab from L's feature map."""

    def __init__(self, method: str, arch: str, feat_dim: int, image_size: int, width: float, bins: int = 16,
                 prior_rgb: Tensor | None = None):
        """``prior_rgb`` (N, 3, H, W) in [0, 1]: the images whose targets give the rebalancing prior
        (``classification_rebalanced`` only; a seeded random sample of the training set)."""
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown predictive method {method!r}; choose from {', '.join(METHODS)}")
        self.method, self.bins = method, bins
        self.cmc = CMCModel([BUILTIN["L"]], arch, feat_dim, image_size, width)
        self.ab = make_transform(BUILTIN["ab"], image_size)  # the ab view's own transform: the regression target
        self.target_size = max(1, image_size // 4)
        with torch.no_grad():
            enc = self.cmc.views["L"].encoder
            was = enc.training
            fm = feature_map(enc.eval(), torch.zeros(1, 1, image_size, image_size))
            enc.train(was)
        ups = max(0, round(math.log2(self.target_size / fm.shape[-1])))
        self.decoder = Decoder(fm.shape[1], 2 if method.startswith("regression") else bins * bins, ups)
        self.register_buffer("weights", torch.ones(bins * bins))
        if method == "classification_rebalanced":
            if prior_rgb is None:
                raise ValueError("classification_rebalanced needs prior_rgb, the images of its prior")
            self.weights.copy_(rebalance_weights(target_prior(self, prior_rgb)[1]))

    def forward(self, rgb: Tensor) -> tuple[Tensor, Tensor]:
        """rgb (N, 3, H, W) in [0, 1] -> (prediction (N, out, t, t), target ab (N, 2, t, t))."""
        view = self.cmc.views["L"]
        pred = self.decoder(feature_map(view.encoder, view.view_input(rgb)))  # L in float32, as evaluation reads it
        pred = F.interpolate(pred, size=self.target_size, mode="bilinear", align_corners=False) \
            if pred.shape[-1] != self.target_size else pred
        with torch.autocast(rgb.device.type, enabled=False):  # the colour conversion of the target in float32
            target = F.adaptive_avg_pool2d(self.ab(rgb.float()), self.target_size)  # (N, 2, t, t)
        return pred, target


def predictive_loss(model: PredictiveModel, batch: dict[str, Tensor], g: torch.Generator | None = None
                    ) -> tuple[Tensor, dict[str, float]]:
    """The ``loss_fn`` of ``train.pretrain.train``: MSE or L1 on normalised ab, or per-pixel cross-entropy over ab
    bins (hard, or soft-encoded and rebalanced)."""
    pred, target = model(batch["rgb"])
    pred = pred.float()
    if model.method == "regression_l2":
        loss = F.mse_loss(pred, target)
        return loss, {"loss": loss.detach()}
    if model.method == "regression_l1":
        loss = F.l1_loss(pred, target)
        return loss, {"loss": loss.detach()}
    labels = ab_bins(target, model.bins)  # (N, t, t): the nearest bin
    if model.method == "classification":
        loss = F.cross_entropy(pred, labels)
    else:  # Zhang et al.: -sum_cells w(q*) sum_q Z_q log Zhat_q, averaged over cells
        soft = soft_encode(target, model.bins)
        ce = -(soft * F.log_softmax(pred, dim=1)).sum(1)  # (N, t, t)
        loss = (model.weights[labels] * ce).mean()
    acc = (pred.detach().argmax(1) == labels).float().mean()
    return loss, {"loss": loss.detach(), "bin_acc": acc}


def train_supervised(cfg, ds, size: int, device: torch.device) -> CMCModel:
    """The supervised baseline: the L encoder of a one-view ``CMCModel`` (seeded as the contrastive run's) and a
    linear classifier on its penultimate features, trained with cross-entropy on the labels ``ds.y`` for
    ``cfg.max_steps`` steps of ``cfg.batch_size``: the contrastive run's optimiser, learning-rate schedule,
    data order and augmentation (``train.step``, ``train.pipeline``). A loop of its own because the
    ``loss_fn`` of ``train.pretrain.train`` does not see the batch's indices, so it cannot read labels."""
    if ds.y is None or (ds.y < 0).any():
        raise ValueError("the supervised baseline needs a label for every training item")
    torch.manual_seed(cfg.seed)
    cmc = CMCModel([BUILTIN["L"]], cfg.arch, cfg.feat_dim, size, cfg.width)
    view = cmc.views["L"]
    with torch.no_grad():
        feat = view.features(torch.zeros(2, 3, size, size)).shape[1]
    clf = nn.Module()
    clf.cmc, clf.fc = cmc, nn.Linear(feat, int(ds.y.max()) + 1)
    clf = clf.to(device)
    amp = use_amp(cfg.amp, device, True)
    opt = make_optimizer(cfg, clf)
    data = DeviceData(ds, [BUILTIN["L"]], device)
    y = torch.from_numpy(ds.y).long()
    per_epoch = len(ds) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(ds)} training items is fewer than one batch of {cfg.batch_size}")
    total = per_epoch * cfg.epochs
    last = min(total, cfg.max_steps) if cfg.max_steps else total
    clf.train()
    order, at = None, -1
    for step in range(last):
        epoch, i = divmod(step, per_epoch)
        if epoch != at:
            order, at = epoch_order(len(ds), cfg.seed, epoch), epoch
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        g = step_generator(cfg.seed, step, device)
        batch = augment(data.batch(idx), crop_params(cfg.batch_size, cfg.crop_min, cfg.flip, g))
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, cfg.schedule_steps or total)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = clf.fc(view.features(batch["rgb"]))
        loss = F.cross_entropy(logits.float(), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if not math.isfinite(float(loss.detach())):
        raise ValueError(f"the supervised baseline's loss is {float(loss.detach())} after {last} steps")
    return cmc
