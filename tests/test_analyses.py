"""The analyses' statistics are taken on random samples, never on file order (issue 20, items 1-2): CIFAR-10's npz
is sorted by class, so the first rows or consecutive batches hold one class."""
from __future__ import annotations

import numpy as np
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


def test_mi_bound_stays_under_the_known_mi_and_approaches_its_ceiling():
    """Correlated Gaussians, I = -(d/2) log(1 - rho^2): the project's loss and bound, trained for 300 steps, stay
    under min(I, log k) (a sampling margin of 0.05 nats) and reach at least 80% of it."""
    from train.mi_check import run
    torch.set_num_threads(1)
    for rho, dim, k in ((0.5, 4, 64), (0.8, 4, 64), (0.9, 8, 64)):
        r = run(rho, dim, k, steps=300)
        assert r["bound"] <= r["ceiling"] + 0.05, r
        assert r["bound"] >= 0.8 * r["ceiling"], r
