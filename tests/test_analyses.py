"""The analyses' statistics are taken on random samples, never on file order (issue 20, items 1-2): CIFAR-10's npz
is sorted by class, so the first rows or consecutive batches hold one class."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.data import Dataset


def _class_sorted(n: int = 600, classes: int = 10) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(sources={"rgb": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)},
                   y=np.repeat(np.arange(classes), n // classes).astype(np.int64))


def test_batch_norm_recalibration_reads_a_random_sample_of_every_class(monkeypatch):
    import train.model as tm
    from models.encoders import CMCModel
    from models.views import parse_views
    seen: list[np.ndarray] = []
    real = tm.DeviceData

    class Spy(real):  # the classes of every batch the recalibration runs
        def __init__(self, ds, *a, **kw):
            super().__init__(ds, *a, **kw)
            self._y = ds.y

        def batch(self, idx, *a, **kw):
            seen.append(self._y[idx.cpu().numpy()])
            return super().batch(idx, *a, **kw)

    monkeypatch.setattr(tm, "DeviceData", Spy)
    torch.manual_seed(0)
    model = CMCModel(parse_views("L,ab"), "resnet10", 32, 32, 0.25)
    tm.recalibrate_bn(model, _class_sorted(), n=120, batch_size=60)
    used = np.concatenate(seen)
    assert len(used) == 120
    assert len(set(used.tolist())) >= 8, f"the recalibration read classes {sorted(set(used.tolist()))} only"
    # seeded: the same sample twice
    seen.clear()
    tm.recalibrate_bn(model, _class_sorted(), n=120, batch_size=60)
    assert np.array_equal(np.concatenate(seen), used)


def test_mi_bound_batches_draw_negatives_from_every_class(monkeypatch):
    import train.metrics as tmet
    n, k, classes = 640, 64, 10
    y = np.repeat(np.arange(classes), n // classes)
    za = F.normalize(torch.randn(n, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    zb = F.normalize(za + 0.1 * torch.randn(n, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    row = {tuple(r.tolist()): i for i, r in enumerate(za)}
    batches: list[set] = []
    real = tmet.cmc_loss

    def spy(z, tau, graph):
        batches.append({int(y[row[tuple(r.tolist())]]) for r in z["a"]})
        return real(z, tau, graph)

    monkeypatch.setattr(tmet, "cmc_loss", spy)
    b = tmet.mi_bound(za, zb, k, 0.1)
    assert len(batches) == n // k
    assert min(len(s) for s in batches) >= 5, f"batches held classes {batches}"
    assert 0 < b <= np.log(k) + 1e-6  # the bound never passes log k
    monkeypatch.setattr(tmet, "cmc_loss", real)
    assert tmet.mi_bound(za, zb, k, 0.1) == b  # seeded


def test_limit_is_a_random_sample_of_every_class_the_same_for_every_seed(tmp_path):
    """--limit on a class-sorted file (CIFAR-10's layout) takes a seeded random sample, not the first N rows
    (which were one class here), and the same sample whatever the training seed."""
    from train.config import Config
    from train.setup import prepare
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)  # sorted by class
    npz = tmp_path / "sorted.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (200, 8, 8, 3), dtype=np.uint8), y_train=y,
             x_test=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), y_test=np.zeros(8, np.int64))
    got = [prepare(Config(data=f"cifar10:{npz}", views="L,ab", limit=40, seed=s).validate(), progress=False)[0]
           for s in (0, 1)]
    assert len(got[0]) == 40 and set(got[0].y.tolist()) == {0, 1, 2, 3}  # the first 40 rows are all class 0
    assert np.array_equal(got[0].sources["rgb"], got[1].sources["rgb"])


def test_mi_bound_stays_under_the_known_mi_and_approaches_its_ceiling():
    """Correlated Gaussians, I = -(d/2) log(1 - rho^2): the project's loss and bound, trained for 300 steps, stay
    under min(I, log k) (a sampling margin of 0.05 nats) and reach at least 80% of it."""
    from train.mi_check import run
    torch.set_num_threads(1)
    for rho, dim, k in ((0.5, 4, 64), (0.8, 4, 64), (0.9, 8, 64)):
        r = run(rho, dim, k, steps=300)
        assert r["bound"] <= r["ceiling"] + 0.05, r
        assert r["bound"] >= 0.8 * r["ceiling"], r


# ------------------------------------------------------------------ item 3: the patch pair's anchor positions
def test_fixed_scheme_draws_every_offset_from_the_same_anchor_positions():
    from train.patches import admissible, distances, fixed_distances, positions
    size, patch = 32, 16
    fixed = fixed_distances(size, patch)
    d_max = max(fixed)
    counts = [admissible(size, patch, d, d_max) for d in fixed]
    assert len(set(counts)) == 1 and counts[0] == (size - patch - d_max + 1) ** 2 > 1
    old = [admissible(size, patch, d) for d in distances(size, patch)]
    assert old == [(size - patch - d + 1) ** 2 for d in distances(size, patch)] and len(set(old)) == len(old)
    # the draws: the same support at every d, and both patches inside the image
    for d in fixed:
        x, y = positions(4000, size, patch, d, torch.Generator().manual_seed(d), d_max)
        assert set(x.tolist()) == set(range(size - patch - d_max + 1)) == set(y.tolist())
        assert int(x.max()) + d + patch <= size


# --------------------------------------------------- item 4: Zhang et al.'s soft encoding and class rebalancing
def test_soft_encoded_targets_sum_to_one_with_most_weight_on_the_nearest_bin():
    from train.predictive import NEAREST, ab_bins, bin_centres, soft_encode
    q = 16
    ab = torch.rand(3, 2, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    soft = soft_encode(ab, q)
    assert soft.shape == (3, q * q, 5, 5)
    assert torch.allclose(soft.sum(1), torch.ones(3, 5, 5), atol=1e-6)
    assert torch.equal(soft.argmax(1), ab_bins(ab, q))  # the nearest bin (the hard label) weighs most
    assert int((soft > 0).sum(1).max()) == NEAREST and int((soft > 0).sum(1).min()) == NEAREST
    # a point exactly on a bin centre: the kernel (sigma 5 Lab units, bins about 11 apart) by hand
    c = bin_centres(q)[q * 5 + 7]
    s = soft_encode(c.reshape(1, 2, 1, 1), q).flatten()
    from models.views import LAB_STD
    lab = (bin_centres(q) - c) * torch.tensor([LAB_STD[1], LAB_STD[2]])
    d2 = (lab ** 2).sum(1)
    near = d2.argsort()[:NEAREST]
    ref = torch.zeros(q * q)
    ref[near] = torch.exp(-d2[near] / 50)
    assert torch.allclose(s, ref / ref.sum(), atol=1e-5) and int(s.argmax()) == q * 5 + 7


def test_rebalancing_weights_have_mean_one_under_the_prior_and_favour_rare_bins():
    from train.predictive import LAMBDA, ab_prior, rebalance_weights
    q = 16
    g = torch.Generator().manual_seed(0)
    ab = torch.cat([torch.randn(4, 2, 8, 8, generator=g) * 0.05, torch.rand(1, 2, 8, 8, generator=g) * 2 - 1])
    p, smooth = ab_prior(ab, q)
    assert float(p.sum()) == pytest.approx(1) and float(smooth.sum()) == pytest.approx(1)
    assert torch.equal(smooth > 0, p > 0)  # kept on the bins the data uses
    w = rebalance_weights(smooth).double()
    assert float((smooth * w).sum()) == pytest.approx(1.0, abs=1e-6)  # E_{p~}[w] = 1 (Zhang et al. eq. 4)
    used = smooth > 0
    n_used = int(used.sum())
    ref = 1 / ((1 - LAMBDA) * smooth + LAMBDA / n_used)
    assert torch.allclose(w[used], (ref / (smooth * ref).sum())[used], rtol=1e-5)
    common, rare = int(smooth.argmax()), int(torch.where(used, smooth, torch.ones_like(smooth)).argmin())
    assert w[rare] > 1 > w[common]


@pytest.mark.parametrize("method", ["regression_l1", "regression_l2", "classification", "classification_rebalanced"])
def test_each_predictive_method_takes_one_step(method):
    from train.predictive import PredictiveModel, predictive_loss
    torch.manual_seed(0)
    rgb = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    m = PredictiveModel(method, "resnet10", 16, 16, 0.25, prior_rgb=rgb if method.endswith("rebalanced") else None)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    before = [p.detach().clone() for p in m.parameters()]
    loss, stats = predictive_loss(m, {"rgb": rgb})
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert math.isfinite(float(loss)) and float(loss) > 0 and float(stats["loss"]) == float(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    if method == "regression_l1":  # L1 by hand
        pred, target = m.eval()(rgb)
        assert float(predictive_loss(m, {"rgb": rgb})[0]) == pytest.approx(float((pred - target).abs().mean()), rel=1e-5)
    if method == "classification_rebalanced":
        assert float(m.weights.min()) < 1 < float(m.weights.max())


def test_supervised_baseline_trains_the_same_encoder_from_the_same_initial_weights(tmp_path):
    from train.config import Config
    from train.predictive import train_supervised
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 16).astype(np.int64)
    x = rng.integers(0, 60, (32, 16, 16, 3), dtype=np.uint8)
    x[y == 1] += 150  # class 1 is bright: learnable in a few steps
    ds = Dataset(sources={"rgb": x}, y=y)
    cfg = Config(arch="resnet10", width=0.25, feat_dim=16, batch_size=8, epochs=3, max_steps=10, lr=3e-3,
                 warmup_steps=1, amp="off", out=str(tmp_path), export=False, index=False, evaluate=False).validate()
    model = train_supervised(cfg, ds, 16, torch.device("cpu"))
    assert list(model.specs) == ["L"]
    from models.encoders import CMCModel
    from models.views import BUILTIN
    torch.manual_seed(cfg.seed)  # the contrastive run's L encoder at its initial weights: same shapes, moved by training
    init = CMCModel([BUILTIN["L"]], cfg.arch, cfg.feat_dim, 16, cfg.width).state_dict()
    trained = model.state_dict()
    assert init.keys() == trained.keys() and all(init[k].shape == trained[k].shape for k in init)
    conv = [k for k in init if k.endswith("weight") and init[k].dim() == 4]
    assert all(not torch.equal(init[k], trained[k]) for k in conv)
    # the features separate the two classes after 10 steps: nearest class mean on the training images
    with torch.no_grad():
        f = model.eval().views["L"].features(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    mu = torch.stack([f[torch.from_numpy(y == c)].mean(0) for c in (0, 1)])
    assert float((torch.cdist(f, mu).argmin(1).numpy() == y).mean()) == 1.0
    with pytest.raises(ValueError, match="label"):
        train_supervised(cfg, Dataset(sources={"rgb": x}, y=np.full(32, -1)), 16, torch.device("cpu"))
