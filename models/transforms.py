"""View transforms as torch modules: whole batches on the training device, exportable to ONNX.

Each module maps a *source* batch (float32 NCHW RGB in [0, 1], depth in [0, 1], or (N, D) vectors) to the
tensor its encoder sees; which one a view uses is its ViewSpec's ``transform`` recipe (models/views.py), built by
:func:`make_transform` from :data:`TRANSFORMS`. Training applies them on the device; export puts them inside the ONNX graph, so
the server only decodes and resizes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.scenes import TAN_HALF_FOV as SCENES_TAN_HALF_FOV
from .views import LAB_MEAN, LAB_STD, RGB_MEAN, RGB_STD, ViewError, ViewSpec

# sRGB (D65) -> XYZ, as in scikit-image
_RGB2XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """(N, 3, H, W) sRGB in [0, 1] -> (N, 3, H, W) CIE Lab (D65, 2 deg), L in [0, 100]."""
    rgb = rgb.clamp(0.0, 1.0)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp_min(1e-12).pow(2.4), rgb / 12.92)
    m = torch.tensor(_RGB2XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_D65_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,njhw->nihw", m, lin) / white
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12).pow(1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[:, 0:1], f[:, 1:2], f[:, 2:3]
    L = 116.0 * fy - 16.0
    a = 500.0 * (fx - fy)
    b = 200.0 * (fy - fz)
    return torch.cat([L, a, b], dim=1)


class Lab(nn.Module):
    """RGB -> normalised Lab channels ``keep`` (L: [0], ab: [1, 2])."""

    def __init__(self, keep: tuple[int, ...]):
        super().__init__()
        self.keep = keep
        self.register_buffer("mean", torch.tensor([LAB_MEAN[i] for i in keep]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([LAB_STD[i] for i in keep]).view(1, -1, 1, 1), persistent=False)

    def forward(self, rgb: Tensor) -> Tensor:
        lab = rgb_to_lab(rgb)  # (N, 3, H, W)
        lo, hi = self.keep[0], self.keep[-1] + 1
        return (lab[:, lo:hi] - self.mean) / self.std


class YCbCr(nn.Module):
    """RGB -> normalised YCbCr (BT.601, full range) channels ``keep``, each mapped to about [-1, 1]."""

    def __init__(self, keep: tuple[int, ...]):
        super().__init__()
        self.keep = keep
        m = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
        off = torch.tensor([-0.5, 0.0, 0.0])
        self.register_buffer("m", m[list(keep)], persistent=False)
        self.register_buffer("off", off[list(keep)].view(1, -1, 1, 1), persistent=False)

    def forward(self, rgb: Tensor) -> Tensor:
        return 2.0 * (torch.einsum("ij,njhw->nihw", self.m, rgb.clamp(0, 1)) + self.off)


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class DepthStandardize(nn.Module):
    """Depth in [0, 1] -> per-image standardised depth (N, 1, H, W): invariant to the camera's distance."""

    def __init__(self, eps: float = 1e-2):
        super().__init__()
        self.eps = eps

    def forward(self, d: Tensor) -> Tensor:
        mu = d.mean(dim=(2, 3), keepdim=True)
        sd = (d - mu).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
        return (d - mu) / (sd + self.eps)


class DepthToNormals(nn.Module):
    """Depth (N, 1, H, W) -> unit surface normals (N, 3, H, W) in the data's convention: camera space, x right,
    y down, z towards the camera (the scenes generator's reference normals).

    Depth is a pinhole camera's z-buffer scaled to [0, 1] (0 at the camera); ``tan_half_fov`` is the camera's
    tan(FOV / 2) (the scenes generator's by default). A pixel at normalised image coordinates (u, v) in
    [-1, 1] sees the point P = z (u t, v t, 1); the normal is -(dP/du x dP/dv), which with g = (dz/du) / z
    is proportional to (g_u, g_v, t (1 + u g_u + v g_v)): exact under perspective, and independent of the
    depth's scale. Derivatives are central differences.

    ``crop`` (N, 2, 3), optional: the affine matrices of the random resized crop + flip that produced ``d``
    from the full image (``grid_sample`` coordinates). Derivatives are then taken per unit of the *full*
    image and (u, v) are the full image's coordinates, so a slope does not change with the crop's zoom; a
    flip yields the mirrored scene's normals (n_x negated), consistent with the mirrored RGB. Export and
    serving have no crop (the identity)."""

    def __init__(self, tan_half_fov: float = SCENES_TAN_HALF_FOV):
        super().__init__()
        self.t = float(tan_half_fov)
        kx = torch.tensor([[0.0, 0.0, 0.0], [-0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]).view(1, 1, 3, 3)
        self.register_buffer("kx", kx, persistent=False)
        self.register_buffer("ky", kx.transpose(2, 3).contiguous(), persistent=False)

    def forward(self, d: Tensor, crop: Tensor | None = None) -> Tensor:
        h, w = d.shape[2], d.shape[3]
        z = d.clamp_min(1e-4)
        p = F.pad(z, (1, 1, 1, 1), mode="replicate")
        gu = F.conv2d(p, self.kx) * (w / 2.0) / z  # (N, 1, H, W): (dz/du) / z, u in [-1, 1] over the width
        gv = F.conv2d(p, self.ky) * (h / 2.0) / z
        u = ((torch.arange(w, dtype=d.dtype, device=d.device) + 0.5) * (2.0 / w) - 1.0).view(1, 1, 1, -1)
        v = ((torch.arange(h, dtype=d.dtype, device=d.device) + 0.5) * (2.0 / h) - 1.0).view(1, 1, -1, 1)
        if crop is not None:  # back to the full image's (mirrored) coordinates: u_full = |s_x| u + sign(s_x) c_x
            sx, cx = crop[:, 0, 0].view(-1, 1, 1, 1), crop[:, 0, 2].view(-1, 1, 1, 1)
            sy, cy = crop[:, 1, 1].view(-1, 1, 1, 1), crop[:, 1, 2].view(-1, 1, 1, 1)
            gu, gv = gu / sx.abs(), gv / sy.abs()
            u, v = sx.abs() * u + sx.sign() * cx, sy * v + cy
        nz = self.t * (1.0 + u * gu + v * gv)
        n = torch.cat([gu, gv, nz.expand_as(gu)], dim=1)  # (N, 3, H, W)
        return n / n.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-12).sqrt()


class VectorStandardize(nn.Module):
    """(N, D) -> (x - mean) / std with per-feature statistics of the training data, kept as buffers so the
    exported graph applies the same standardisation."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


# Transform recipes by kind (a ViewSpec's ``transform`` is (kind, *args)): (spec, *args) -> module.
TRANSFORMS = {
    "lab": lambda spec, *keep: Lab(keep),
    "ycbcr": lambda spec, *keep: YCbCr(keep),
    "rgb_normalize": lambda spec: Normalize(RGB_MEAN, RGB_STD),
    "depth_standardize": lambda spec: DepthStandardize(),
    "depth_normals": lambda spec: DepthToNormals(),
    "vector_standardize": lambda spec: VectorStandardize(spec.channels),
}


def make_transform(spec: ViewSpec, image_size: int | None = None) -> nn.Module:
    """The torch module of a view, built from its spec's transform recipe: source batch -> encoder input."""
    if not spec.transform or spec.transform[0] not in TRANSFORMS:
        raise ViewError(f"view {spec.name!r} has no known transform ({spec.transform!r}); known kinds: "
                        f"{', '.join(TRANSFORMS)}")
    kind, *args = spec.transform
    return TRANSFORMS[kind](spec, *args)
