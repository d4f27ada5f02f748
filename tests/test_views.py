"""View transforms: Lab against scikit-image, YCbCr, normals, vector standardisation; encoders' shapes."""
import numpy as np
import pytest
import torch

from models.encoders import AlexNetHalf, CMCModel, build_encoder
from models.transforms import DepthToNormals, VectorStandardize, make_transform, rgb_to_lab
from models.views import ViewError, get_view, parse_views

skimage_color = pytest.importorskip("skimage.color")


def test_lab_matches_skimage_within_1e3():
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


def test_normals_of_a_plane():
    # depth rising to the right by 1/64 per pixel, gain 64: slope 1 -> normal ∝ (-1, 0, 1) towards the camera
    d = (torch.arange(16).float() / 64).view(1, 1, 1, 16).expand(1, 1, 16, 16).contiguous()
    n = DepthToNormals(gain=64.0)(d)[0, :, 4:-4, 4:-4]
    assert torch.allclose(n[0], torch.full_like(n[0], -2 ** -0.5), atol=1e-5)
    assert torch.allclose(n[1], torch.zeros_like(n[1]), atol=1e-6)
    assert torch.allclose(n[2], torch.full_like(n[2], 2 ** -0.5), atol=1e-5)


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
