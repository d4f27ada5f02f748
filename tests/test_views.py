"""View transforms: Lab against scikit-image, YCbCr, normals, vector standardisation; encoders' shapes."""
import numpy as np
import pytest
import torch

from models.data.scenes import TAN_HALF_FOV, generate
from models.encoders import AlexNetHalf, CMCModel, FixedAdaptiveAvgPool2d, build_encoder
from models.transforms import DepthToNormals, VectorStandardize, make_transform, rgb_to_lab
from models.views import ViewError, get_view, parse_views
from train.pipeline import augment, crop_params


def test_lab_matches_skimage_within_1e3():
    skimage_color = pytest.importorskip("skimage.color")
    x = np.random.default_rng(0).random((8, 24, 24, 3))
    ref = np.stack([skimage_color.rgb2lab(i) for i in x])  # (N, H, W, 3) float64
    got = rgb_to_lab(torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - ref).max() < 1e-3
    # also the saturated corners of the cube
    corners = np.array([[[[r, g, b] for r in (0, 1) for g in (0, 1) for b in (0, 1)]]], dtype=np.float64)
    ref = skimage_color.rgb2lab(corners[0])
    got = rgb_to_lab(torch.tensor(corners, dtype=torch.float32).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()[0]
    assert np.abs(got - ref).max() < 1e-3


def test_L_and_ab_views_split_and_normalise():
    x = torch.rand(2, 3, 8, 8)
    lab = rgb_to_lab(x)
    L, ab = make_transform(get_view("L"))(x), make_transform(get_view("ab"))(x)
    assert L.shape == (2, 1, 8, 8) and ab.shape == (2, 2, 8, 8)
    assert torch.allclose(L, (lab[:, :1] - 50) / 50, atol=1e-5)
    assert torch.allclose(ab[:, 0], (lab[:, 1] - 6.025) / 92.208, atol=1e-5)


def test_ycbcr_matches_bt601():
    x = torch.rand(1, 3, 4, 4)
    y = make_transform(get_view("Y"))(x)
    want = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(y[:, 0], 2 * (want - 0.5), atol=1e-6)


def plane_depth(a: float, b: float, size: int = 32, z0: float = 5.0, far: float = 12.0) -> torch.Tensor:
    """(1, 1, size, size) z-buffer depth / far of the plane z = z0 + a X + b Y seen by the scenes camera."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    v, u = torch.meshgrid(c, c, indexing="ij")
    z = z0 / (1 - a * u * TAN_HALF_FOV - b * v * TAN_HALF_FOV)  # ray (u t, v t, 1) meets the plane
    return (z / far).float().view(1, 1, size, size)


def angles_deg(n: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-pixel angle between (N, 3, H, W) unit normal maps."""
    return torch.rad2deg(torch.arccos((n * ref).sum(1).clamp(-1, 1)))


@pytest.mark.parametrize("a,b", [(1.0, 0.0), (0.0, -0.5), (0.3, 0.2)])
def test_normals_of_a_plane_point_right_down_and_towards_the_camera(a, b):
    # a plane receding to the right (a > 0) faces right: n ∝ (a, b, 1) in x right, y down, z to the camera
    n = DepthToNormals()(plane_depth(a, b))[:, :, 2:-2, 2:-2]
    want = torch.tensor([a, b, 1.0]) / (a * a + b * b + 1) ** 0.5
    assert angles_deg(n, want.view(1, 3, 1, 1)).max() < 0.5


@pytest.fixture(scope="module")
def scenes64():
    a = generate(48, 64, seed=3, workers=1)
    d = torch.from_numpy(a["depth"].astype(np.float32) / 65535)[:, None]  # (N, 1, H, W)
    ref = torch.from_numpy(a["normals"].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    return d, ref / ref.norm(dim=1, keepdim=True)


def test_normals_match_the_scenes_generators_reference(scenes64):
    d, ref = scenes64
    ang = angles_deg(make_transform(get_view("normals"), 64)(d), ref)
    assert float(ang.median()) < 2.0  # was 22.8 deg (mirrored x/y, 3x too flat)
    assert float((ang < 10).float().mean()) > 0.85  # the rest: depth edges and quantisation


def test_normals_do_not_change_with_the_crops_zoom(scenes64):
    """Normals of the cropped (and flipped) depth, told the crop, equal the full image's normals cropped the
    same way (n_x mirrored with the image); a slope does not flatten as the crop zooms in."""
    d, _ = scenes64
    theta = crop_params(len(d), 0.2, True, torch.Generator().manual_seed(0))
    t = DepthToNormals()
    full = t(d)  # (N, 3, H, W)
    out = augment({"depth": d}, theta)
    got = t(out["depth"], out["_crop"])
    grid = torch.nn.functional.affine_grid(theta, list(full.shape), align_corners=False)
    want = torch.nn.functional.grid_sample(full, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mirror = torch.ones(len(d), 3, 1, 1)
    mirror[:, 0, 0, 0] = theta[:, 0, 0].sign()  # a flipped image shows the mirrored scene: n_x changes sign
    want = want * mirror
    want = want / want.norm(dim=1, keepdim=True)
    assert float(angles_deg(got, want).median()) < 1.0
    # a plane tilted by 5.7 deg keeps its tilt at crop area 0.2 (without the crop it read 2.6 deg)
    plane = plane_depth(0.1, 0.0, 64)
    th = torch.tensor([[[0.2 ** 0.5, 0.0, 0.1], [0.0, 0.2 ** 0.5, 0.0]]])
    zoomed = augment({"depth": plane}, th)
    tilt = lambda n: float(torch.rad2deg(torch.arccos(n[:, 2, 8:-8, 8:-8])).median())  # noqa: E731
    assert tilt(t(zoomed["depth"], zoomed["_crop"])) == pytest.approx(tilt(t(plane)), abs=0.1)
    assert tilt(t(plane)) == pytest.approx(5.71, abs=0.1)


def test_transforms_run_in_float32_under_autocast(scenes64):
    """Under bf16 autocast (as on GPU with --amp auto), the encoder still receives the float32 normals that
    the exported float32 graph computes."""
    d, _ = scenes64
    torch.manual_seed(0)
    model = CMCModel(parse_views("depth,normals"), "resnet10", 32, 64, 0.25).eval()
    seen = {}
    model.views["normals"].encoder.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        want = make_transform(get_view("normals"), 64)(d)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model({"depth": d})
    assert seen["x"].dtype == torch.float32
    assert float((seen["x"] - want).abs().max()) < 1e-6  # bf16 depth gave a mean 3.4 deg


@pytest.mark.parametrize("n_in", [1, 3, 6, 7, 13])
def test_fixed_adaptive_pool_equals_torchs(n_in):
    x = torch.randn(2, 4, n_in, n_in)
    assert torch.allclose(FixedAdaptiveAvgPool2d(n_in, 6)(x), torch.nn.AdaptiveAvgPool2d((6, 6))(x), atol=1e-6)


def test_vector_standardize_uses_training_statistics():
    x = torch.randn(1000, 5) * torch.tensor([1e-3, 1.0, 1e3, 5.0, 1e6]) + 7
    t = VectorStandardize(5)
    t.fit(x)
    y = t(x)
    assert torch.allclose(y.mean(0), torch.zeros(5), atol=1e-3)
    assert torch.allclose(y.std(0), torch.ones(5), atol=1e-3)


def test_unknown_and_bad_views():
    with pytest.raises(ViewError, match="unknown view 'XYZ'"):
        parse_views("L,XYZ")
    with pytest.raises(ViewError, match="at least two"):
        parse_views("L")
    assert [v.source for v in parse_views("L,feat", {"feat": 7})] == ["rgb", "vector"]


@pytest.mark.parametrize("arch,size", [("alexnet", 32), ("alexnet", 64), ("resnet10", 32), ("resnet18", 64), ("resnet10", 128)])
def test_encoders_unit_norm_any_size(arch, size):
    m = build_encoder(arch, 2, 64, size).eval()
    z = m(torch.randn(3, 2, size, size))
    assert z.shape == (3, 64)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)


def test_alexnet_half_matches_reference_layers_at_224():
    m = AlexNetHalf(1, 128, 224)
    convs = [l for l in m.conv.modules() if isinstance(l, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == \
        [(48, 11, 4), (128, 5, 1), (192, 3, 1), (192, 3, 1), (128, 3, 1)]
    assert m.conv[:-1](torch.randn(2, 1, 224, 224)).shape == (2, 128, 6, 6)  # reference fc6 input: 128*6*6
    fcs = [l for l in m.modules() if isinstance(l, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(4608, 2048), (2048, 2048), (2048, 128)]


def test_cmc_model_embeds_every_view():
    specs = parse_views("L,ab,depth,normals,vec", {"vec": 6})
    m = CMCModel(specs, "resnet10", 32, 32).eval()
    z = m({"rgb": torch.rand(2, 3, 32, 32), "depth": torch.rand(2, 1, 32, 32), "vec": torch.randn(2, 6)})
    assert set(z) == {"L", "ab", "depth", "normals", "vec"} and all(v.shape == (2, 32) for v in z.values())
