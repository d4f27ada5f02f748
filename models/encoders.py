"""Per-view encoders: forward(x) -> (N, D), unit norm. No memory bank, no device calls, no side effects.

- ``alexnet``: the CMC paper's AlexNet-half (conv 48-128-192-192-128, fc 2048-2048-D, batch norm). At
  224 px it matches the reference layer for layer; below 128 px a 3x3 stride-1 stem replaces the 11x11
  stride-4 one (as the reference's CIFAR variant does) and a fixed average pooling to 6x6 (adaptive pooling's
  windows for the known map size, as a matrix product, so ONNX can export it at any size) feeds the fc.
- ``resnet10`` / ``resnet18`` / ``resnet34`` at a configurable width (0.5 = the paper's "half" per view).
- ``mlp`` for vector views.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transforms import DepthToNormals, make_transform
from .views import ViewSpec

ARCHS = ("alexnet", "resnet10", "resnet18", "resnet34", "mlp")
CROP_KEY = "_crop"  # key of the crop matrices (N, 2, 3) in a training batch; never a view name


def _adaptive_windows(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) averaging matrix of AdaptiveAvgPool1d(n_out) over n_in positions (torch's windows:
    [floor(i n_in / n_out), ceil((i + 1) n_in / n_out)))."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


class FixedAdaptiveAvgPool2d(nn.Module):
    """AdaptiveAvgPool2d(out) for a map size known at construction, as two matrix products: exportable to
    ONNX whatever the sizes (torch's exporter refuses adaptive pooling when out does not divide the input)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.register_buffer("ph", _adaptive_windows(n_in, n_out), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.ph @ x @ self.ph.t()  # (N, C, n_in, n_in) -> (N, C, n_out, n_out)


def alexnet_map_size(image_size: int) -> int:
    """Side of AlexNetHalf's conv5 map (after its max pool) at ``image_size``."""
    def conv(s, k, st, p):
        return (s + 2 * p - k) // st + 1

    def pool(s):
        return (s - 3) // 2 + 1
    s = pool(conv(image_size, 11, 4, 2)) if image_size >= 128 else pool(conv(image_size, 3, 1, 1))
    return pool(pool(s))  # conv2 (same size) + pool, conv3-5 (same size) + pool


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
        )
        side = alexnet_map_size(image_size)
        if side < 1:
            raise ValueError(f"alexnet needs images of at least 15 px, got {image_size}")
        self.conv.append(nn.Identity() if side == 6 else FixedAdaptiveAvgPool2d(side, 6))
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

    def probe(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(conv5 features pooled to 6x6 (N, 4608): the CMC paper's linear-probe layer, embedding (N, D))."""
        c = self.conv(x).flatten(1)
        return c, F.normalize(self.head(self.fc(c)), dim=1)


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

    def probe(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(globally pooled last stage (N, C), embedding (N, D))."""
        f = self.body(x)
        return f, F.normalize(self.head(f), dim=1)


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

    def probe(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(last hidden layer (N, H), embedding (N, D))."""
        f = self.body(x)
        return f, F.normalize(self.head(f), dim=1)


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
    This is the module that is exported to ONNX. The view transform always runs in float32, also under
    autocast, so training sees the inputs that the exported float32 graph computes."""

    def __init__(self, spec: ViewSpec, arch: str, feat_dim: int = 128, image_size: int = 64, width: float = 0.5,
                 **mlp):
        super().__init__()
        self.spec = spec
        if not spec.is_image:
            arch = "mlp"
        self.transform = make_transform(spec, image_size)
        self.encoder = build_encoder(arch, spec.channels, feat_dim, image_size, width, **mlp)
        self._takes_crop = isinstance(self.transform, DepthToNormals)

    def view_input(self, source: Tensor, crop: Tensor | None = None) -> Tensor:
        """The encoder's input, computed in float32 whatever autocast says; ``crop`` (N, 2, 3) are the
        training augmentation's crop matrices (geometry-aware transforms such as normals use them)."""
        dev = source.device.type
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return self.view_input(source, crop)
        x = source.float()
        return self.transform(x, crop) if self._takes_crop else self.transform(x)

    def forward(self, source: Tensor, crop: Tensor | None = None) -> Tensor:
        return self.encoder(self.view_input(source, crop))

    def features(self, source: Tensor) -> Tensor:
        return self.encoder.features(self.view_input(source))


class CMCModel(nn.Module):
    """The per-view models, keyed by view name. forward(sources) -> {view: (N, D)}; ``sources`` maps a source
    name ('rgb', 'depth') or a vector view's name to its batch, and optionally CROP_KEY to the crop
    matrices (N, 2, 3) that the training augmentation applied to the image sources. ``mlp``
    (mlp_layers, mlp_dropout) shapes the encoders of vector views."""

    def __init__(self, specs: list[ViewSpec], arch: str = "resnet18", feat_dim: int = 128, image_size: int = 64,
                 width: float = 0.5, **mlp):
        super().__init__()
        self.specs = {s.name: s for s in specs}
        self.views = nn.ModuleDict({s.name: ViewModel(s, arch, feat_dim, image_size, width, **mlp) for s in specs})

    def forward(self, sources: dict[str, Tensor]) -> dict[str, Tensor]:
        crop = sources.get(CROP_KEY)
        return {name: m(sources[self.specs[name].source_key], crop if self.specs[name].is_image else None)
                for name, m in self.views.items()}
