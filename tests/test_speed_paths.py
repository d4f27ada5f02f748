"""The CPU speed paths compute what the plain path computes: shared memory-bank negatives against an
independent float64 loop over the formula, bf16 only where the CPU has it natively, transforms and loss in
fp32 under autocast, channels_last equal to NCHW, and train.bench times old and new in one run."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from models.encoders import CMCModel
from models.views import parse_views
from train import losses, speed, step
from train.distributed import Dist
from train.model import build_model
from train.config import Config
from train.losses import MemoryBank, cmc_loss


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _reference_shared(z, bank, idx, neg_idx, tau, graph):
    """float64 loop: for anchor n in view a, candidates are bank_b[idx[n]] (positive) and bank_b[j] for every
    drawn j != idx[n]; L = -mean_n log softmax(positive), summed over both directions of every pair."""
    total = 0.0
    for a, b in losses.pairs(list(z), graph):
        for anc, mem in ((a, b), (b, a)):
            terms = []
            for n in range(z[anc].shape[0]):
                x = z[anc][n].double()
                pos = math.exp(float(x @ bank[mem][idx[n]].double()) / tau)
                den = pos + sum(math.exp(float(x @ bank[mem][j].double()) / tau) for j in neg_idx.tolist() if j != idx[n])
                terms.append(-math.log(pos / den))
            total += sum(terms) / len(terms)
    return total


@pytest.mark.parametrize("graph", ["full", "core"])
def test_shared_negatives_equal_float64_reference(graph):
    n_bank, b, k, d, tau = 40, 6, 24, 8, 0.1
    views = ["L", "ab", "depth"]
    bank = MemoryBank(views, n_bank, d, seed=3)
    z = {v: _unit(b, d, seed=i) for i, v in enumerate(views)}
    idx = torch.tensor([0, 5, 7, 11, 30, 39])
    neg_idx, own = bank.sample_shared(idx, k, torch.Generator().manual_seed(1))
    neg_idx[:3] = idx[:3]  # make sure some anchors meet their own sample among the shared draws
    neg_idx[3] = idx[0]  # twice for anchor 0
    own = neg_idx[None, :] == idx[:, None]
    targets, negs = bank.gather(idx, neg_idx)
    assert negs["L"].shape == (k, d)
    loss, stats = cmc_loss(z, tau, graph, targets, negs, own)
    ref = _reference_shared(z, bank.memory, idx, neg_idx, tau, graph)
    assert float(loss) == pytest.approx(ref, rel=1e-5, abs=1e-5)
    # without the mask the anchor's own sample would count as a negative: a different (wrong) number
    unmasked, _ = cmc_loss(z, tau, graph, targets, negs)
    assert abs(float(unmasked) - ref) > 1e-3


def test_shared_equals_per_sample_form_with_the_same_draws():
    """Shared negatives are the per-sample form whose K draws happen to be the same for every anchor."""
    views = ["a", "b"]
    bank = MemoryBank(views, 50, 16, seed=0)
    z = {v: _unit(8, 16, seed=i + 10) for i, v in enumerate(views)}
    idx = torch.arange(8) * 3
    neg_idx, own = bank.sample_shared(idx, 32, torch.Generator().manual_seed(0))
    keep = ~torch.isin(neg_idx, idx)  # draws that hit no anchor: then no masking is involved
    neg_idx = neg_idx[keep]
    targets, shared = bank.gather(idx, neg_idx)
    _, per = bank.gather(idx, neg_idx[None, :].expand(8, -1))
    assert per["a"].shape == (8, neg_idx.numel(), 16)
    a, _ = cmc_loss(z, 0.07, "full", targets, shared, torch.zeros(8, neg_idx.numel(), dtype=torch.bool))
    b, _ = cmc_loss(z, 0.07, "full", targets, per)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_shared_sampling_marks_exactly_the_own_sample():
    bank = MemoryBank(["a"], 10, 4)
    idx = torch.tensor([0, 3, 9])
    neg, own = bank.sample_shared(idx, 200, torch.Generator().manual_seed(0))
    assert neg.shape == (200,) and own.shape == (3, 200)
    assert torch.equal(own, neg[None] == idx[:, None]) and own.any(1).all()  # 200 draws of 10 hit every anchor


@pytest.mark.parametrize("flags,device,amp,expected", [
    ({"avx2", "fma"}, "cpu", "auto", False),  # no native bf16: fp32
    ({"avx512f", "avx512_bf16"}, "cpu", "auto", True),
    ({"amx_bf16", "amx_tile"}, "cpu", "auto", True),
    ({"avx512_bf16"}, "cpu", "off", False),
    ({"avx2"}, "cpu", "bf16", True),  # asked for explicitly
])
def test_bf16_only_on_cpus_with_native_bf16(monkeypatch, flags, device, amp, expected):
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset(flags))
    assert speed.use_amp(amp, torch.device(device)) is expected
    cfg = Config(amp=amp, views="L,ab")
    assert speed.speed_choices(cfg, parse_views("L,ab"), torch.device(device))[0] is expected


def test_vector_views_keep_fp32_on_cpu_auto(monkeypatch):
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    specs = parse_views("fa,fb", {"fa": 4, "fb": 3})
    amp, channels_last = speed.speed_choices(Config(views="fa,fb"), specs, torch.device("cpu"))
    assert (amp, channels_last) == (False, False)


def test_cpu_flags_probe_reads_this_machine():
    r = speed.cpu_report()
    assert set(r["bf16_flags"]) <= set(speed.BF16_FLAGS) and r["native_bf16"] == bool(r["bf16_flags"])


def _sources(size=32, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.rand(n, 3, size, size, generator=g), "depth": torch.rand(n, 1, size, size, generator=g)}


@pytest.mark.parametrize("view", ["L", "ab", "depth", "normals"])
def test_transforms_stay_fp32_under_training_autocast(view):
    spec = parse_views(f"{view},rgb")[0]
    m = CMCModel([spec, parse_views("rgb,L")[0]], "resnet10", 16, 32, 0.25).views[view]
    src = _sources()[spec.source]
    ref = m.transform(src)  # the float32 transform, as exported
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.view_input(src)  # what the encoder receives in training under autocast
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_train_step_under_autocast_gives_the_loss_fp32_embeddings(monkeypatch):
    cfg = Config(views="L,ab", arch="resnet10", width=0.25, feat_dim=16, negatives="memory", nce_k=8, batch_size=4)
    specs = parse_views(cfg.views)
    model = build_model(cfg, specs, 32)
    bank = MemoryBank(["L", "ab"], 16, 16)
    seen = {}
    real = step.cmc_loss

    def spy(z, *a, **k):
        seen.update({v: t.dtype for v, t in z.items()})
        loss, stats = real(z, *a, **k)
        seen["loss"] = loss.dtype
        return loss, stats

    monkeypatch.setattr(step, "cmc_loss", spy)
    opt = step.make_optimizer(cfg, model)
    loss, _ = step.train_step(model, opt, bank, _sources(), torch.arange(4), cfg, Dist(),
                              torch.Generator().manual_seed(0), amp=True)
    assert seen == {"L": torch.float32, "ab": torch.float32, "loss": torch.float32} and torch.isfinite(loss)


@pytest.mark.parametrize("arch", ["alexnet", "resnet10"])
def test_channels_last_gives_the_same_outputs(arch):
    specs = parse_views("L,ab")
    torch.manual_seed(0)
    model = CMCModel(specs, arch, 32, 32, 0.25).eval()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    src = _sources()
    with torch.no_grad():
        a = model(src)
        b = cl(speed.to_channels_last(src))
    for v in a:
        torch.testing.assert_close(b[v], a[v], rtol=1e-4, atol=1e-5)


def test_bench_times_old_and_new_in_one_run(tmp_path):
    out = tmp_path / "b.json"
    r = run_cli(["-m", "train.bench", "--settings", "tiny", "--steps", "1", "--warmup", "0", "--n-data", "32",
                 "--threads", "1", "--json", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    rows = json.loads(out.read_text())["rows"]
    assert [x["path"] for x in rows] == ["old", "new"]
    assert rows[0]["negatives_sharing"] == "per-sample" and rows[1]["negatives_sharing"] == "shared"
    assert not rows[0]["amp"] and not rows[0]["channels_last"] and rows[1]["channels_last"]
    assert all(x["pipeline_samples_per_s"] > 0 for x in rows)
    assert "new/old end to end" in r.stdout and "bf16 flags" in r.stdout


def _count_host_reads(monkeypatch) -> list:
    """Every read of a tensor's value on the host (what synchronises with a GPU): item, float, bool, tolist."""
    reads = []
    for name in ("item", "__float__", "__bool__", "tolist"):
        real = getattr(torch.Tensor, name)

        def wrap(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrap)
    return reads


@pytest.mark.parametrize("graph", ["core", "full"])
def test_issue23_cmc_loss_and_the_step_read_nothing_on_the_host(monkeypatch, graph):
    """Issue 23, item 7: the loss's statistics stay tensors and the step does not check finiteness on the host;
    train.pretrain reads them all with one synchronisation per step (read_stats), to the same numbers."""
    cfg = Config(views="L,ab,depth", arch="resnet10", width=0.25, feat_dim=16, negatives="memory", nce_k=8,
                 batch_size=4, optimizer="sgd", graph=graph)
    specs = parse_views(cfg.views)
    model = build_model(cfg, specs, 32)
    bank = MemoryBank(["L", "ab", "depth"], 16, 16)
    opt = step.make_optimizer(cfg, model)
    src = _sources()
    reads = _count_host_reads(monkeypatch)
    loss, stats = step.train_step(model, opt, bank, src, torch.arange(4), cfg, Dist(),
                                  torch.Generator().manual_seed(0), amp=False)
    assert reads == [], reads
    got = losses.read_stats(stats)
    assert len(reads) == 1  # one tolist for every statistic
    monkeypatch.undo()
    assert got == {k: float(v) for k, v in stats.items()}
    for k, v in got.items():
        if k.startswith("mi/"):
            pair = k[3:]
            assert v == math.log(cfg.nce_k + 1) - float(stats[f"loss/{pair}"]) / 2  # the float arithmetic, exactly
