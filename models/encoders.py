"""Per-view encoders: forward(x) -> (N, D), unit norm. No memory bank, no device calls, no side effects.

- ``alexnet``: the CMC paper's AlexNet-half (conv 48-128-192-192-128, fc 2048-2048-D, batch norm). At
  224 px it matches the reference layer for layer; below 128 px a 3x3 stride-1 stem replaces the 11x11
  stride-4 one (as the reference's CIFAR variant does) and adaptive pooling feeds the 6x6 fc input.
- ``resnet10`` / ``resnet18`` / ``resnet34`` at a configurable width (0.5 = the paper's "half" per view).
- ``mlp`` for vector views.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .transforms import make_transform
from .views import ViewSpec

ARCHS = ("alexnet", "resnet10", "resnet18", "resnet34", "mlp")


class AlexNetHalf(nn.Module):
    def __init__(self, in_ch: int, feat_dim: int = 128, image_size: int = 224):
        super().__init__()
        big = image_size >= 128

        def block(cin, cout, k, s, p, pool):
            layers = [nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, *( [nn.MaxPool2d(3, 2)] if pool else []))

        stem = block(in_ch, 48, 11, 4, 2, True) if big else block(in_ch, 48, 3, 1, 1, True)
        self.conv = nn.Sequential(
            stem,
            block(48, 128, 5, 1, 2, True),
            block(128, 192, 3, 1, 1, False),
            block(192, 192, 3, 1, 1, False),
            block(192, 128, 3, 1, 1, True),
            nn.AdaptiveAvgPool2d((6, 6)),
        )
        self.fc = nn.Sequential(
            nn.Linear(128 * 6 * 6, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True),
            nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True),
        )
        self.feat_dim_in = 2048
        self.head = nn.Linear(2048, feat_dim)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).flatten(1))  # (N, 2048)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)  # (N, D)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.b1(self.c1(x)), inplace=True)
        y = self.b2(self.c2(y))
        return F.relu(y + (x if self.short is None else self.short(x)), inplace=True)


class ResNet(nn.Module):
    DEPTHS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}

    def __init__(self, in_ch: int, arch: str = "resnet18", width: float = 0.5, feat_dim: int = 128,
                 image_size: int = 64):
        super().__init__()
        widths = [max(8, int(round(c * width))) for c in (64, 128, 256, 512)]
        if image_size >= 128:  # ImageNet stem
            stem = [nn.Conv2d(in_ch, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                    nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        elif image_size >= 48:  # small images: one stride-2 3x3 stem
            stem = [nn.Conv2d(in_ch, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        else:  # CIFAR stem
            stem = [nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        layers, cin = [], widths[0]
        for i, (n, c) in enumerate(zip(self.DEPTHS[arch], widths)):
            for j in range(n):
                layers.append(BasicBlock(cin, c, 2 if (j == 0 and i > 0) else 1))
                cin = c
        self.body = nn.Sequential(*stem, *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feat_dim_in = cin
        self.head = nn.Linear(cin, feat_dim)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (N, C)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)  # (N, D)


class MLP(nn.Module):
    def __init__(self, in_dim: int, feat_dim: int = 128, hidden: int = 512, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        mods, d = [], in_dim
        for _ in range(layers):
            mods += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True)]
            mods += [nn.Dropout(dropout)] if dropout > 0 else []
            d = hidden
        self.body = nn.Sequential(*mods)
        self.feat_dim_in = d
        self.head = nn.Linear(d, feat_dim)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)


def build_encoder(arch: str, in_ch: int, feat_dim: int = 128, image_size: int = 64, width: float = 0.5,
                  mlp_layers: int = 2, mlp_dropout: float = 0.0) -> nn.Module:
    if arch == "alexnet":
        return AlexNetHalf(in_ch, feat_dim, image_size)
    if arch in ResNet.DEPTHS:
        return ResNet(in_ch, arch, width, feat_dim, image_size)
    if arch == "mlp":
        return MLP(in_ch, feat_dim, hidden=max(128, int(1024 * width)), layers=mlp_layers, dropout=mlp_dropout)
    raise ValueError(f"unknown encoder {arch!r}; choose from {', '.join(ARCHS)}")


class ViewModel(nn.Module):
    """One view end to end: source batch -> view transform -> encoder -> (N, D) unit-norm embedding.
    This is the module that is exported to ONNX."""

    def __init__(self, spec: ViewSpec, arch: str, feat_dim: int = 128, image_size: int = 64, width: float = 0.5,
                 **mlp):
        super().__init__()
        self.spec = spec
        if not spec.is_image:
            arch = "mlp"
        self.transform = make_transform(spec, image_size)
        self.encoder = build_encoder(arch, spec.channels, feat_dim, image_size, width, **mlp)

    def forward(self, source: Tensor) -> Tensor:
        return self.encoder(self.transform(source))

    def features(self, source: Tensor) -> Tensor:
        return self.encoder.features(self.transform(source))


class CMCModel(nn.Module):
    """The per-view models, keyed by view name. forward(sources) -> {view: (N, D)}; ``sources`` maps a source
    name ('rgb', 'depth') or a vector view's name to its batch. ``mlp`` (mlp_layers, mlp_dropout) shapes the
    encoders of vector views."""

    def __init__(self, specs: list[ViewSpec], arch: str = "resnet18", feat_dim: int = 128, image_size: int = 64,
                 width: float = 0.5, **mlp):
        super().__init__()
        self.specs = {s.name: s for s in specs}
        self.views = nn.ModuleDict({s.name: ViewModel(s, arch, feat_dim, image_size, width, **mlp) for s in specs})

    def forward(self, sources: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: m(sources[source_key(self.specs[name])]) for name, m in self.views.items()}


def source_key(spec: ViewSpec) -> str:
    """The key of a view's input in a batch of sources: 'rgb'/'depth' for images, the view's name for vectors."""
    return spec.source if spec.is_image else spec.name
