"""Cross-view prediction, the objective CMC compares itself with: predict ab from L (colourisation).

The same L encoder as the contrastive model (``models.encoders``) reads L; a small decoder on its last
spatial feature map predicts the ab channels at a quarter of the input resolution (as colourisation work
does, Zhang et al. 2016), either by

- ``regression``: mean squared error on the normalised ab values, or
- ``classification``: per-pixel cross-entropy over a Q x Q grid of quantised ab bins (hard assignment,
  no class rebalancing; bin width about 11 Lab units at Q = 16, close to Zhang et al.'s 10).

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
from models.views import BUILTIN

LOG = logging.getLogger(__name__)

METHODS = ("regression", "classification")
AB_RANGE = 1.0  # normalised ab lies in about [-1, 1] (views.LAB_MEAN / LAB_STD); bins cover [-1, 1]^2


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

    def __init__(self, method: str, arch: str, feat_dim: int, image_size: int, width: float, bins: int = 16):
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
        self.decoder = Decoder(fm.shape[1], 2 if method == "regression" else bins * bins, ups)

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
    """The ``loss_fn`` of ``train.pretrain.train``: MSE on normalised ab, or per-pixel cross-entropy over ab bins."""
    pred, target = model(batch["rgb"])
    pred = pred.float()
    if model.method == "regression":
        loss = F.mse_loss(pred, target)
        return loss, {"loss": float(loss.detach())}
    labels = ab_bins(target, model.bins)  # (N, t, t)
    loss = F.cross_entropy(pred, labels)
    acc = float((pred.detach().argmax(1) == labels).float().mean())
    return loss, {"loss": float(loss.detach()), "bin_acc": acc}
