"""The CMC analyses (train.experiments): each command end to end on a test-sized budget (JSON shape, finite
numbers in range, a PNG), the pieces they rest on against independent references, and the view-pair table."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli
from train import experiments
from train.config import Config
from train.patches import crop_pair, distances, mi_bound, patch_model, positions
from train.predictive import PredictiveModel, ab_bins, bin_centres, predictive_loss
from train.metrics import mi_bound as pair_mi_bound
from train.viewpairs import format_view_pairs, plot_view_pairs, view_pair_table

# smaller than --quick: 16 px scenes, 2 steps of 16, 2 probe epochs (a few seconds per run on 2 cores)
TINY = "scenes:n=96,size=16,seed=3,test_n=64"
TINY_ARGS = ["--quick", "--data", TINY, "--steps", "2", "--batch-size", "16", "--probe-epochs", "2", "--threads", "2",
             "--seeds", "0"]
PNG = b"\x89PNG\r\n\x1a\n"


def run_experiment(name: str, out, *extra: str) -> list[dict]:
    assert experiments.main([name, *TINY_ARGS, "--out", str(out), "--results", str(out / "results"), *extra]) == 0
    assert (out / f"{name}.png").read_bytes()[:8] == PNG and (out / f"{name}.png").stat().st_size > 10_000
    rows = json.loads((out / f"{name}.json").read_text())
    assert json.loads((out / "results" / f"{name}-quick.json").read_text()) == rows  # the raw rows kept
    for r in rows:  # provenance: the code version, the commit, the precision the run actually used
        assert len(r["code_version"]) == 16 and r["precision"] in ("bf16", "fp32") and "commit" in r
    return rows


def in_unit(*xs: float) -> bool:
    return all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in xs)


def test_views_command(tmp_path, capsys, monkeypatch):
    rows = run_experiment("views", tmp_path)
    assert sorted((r["n_views"], r["graph"]) for r in rows) == [(n, g) for n in (2, 3, 4) for g in ("core", "full")]
    for r in rows:
        assert r["views"] == ["L", "ab", "depth", "normals"][:r["n_views"]] and r["steps"] == 2
        assert in_unit(r["linear_top1"], r["knn_top1"], r["concat_linear_top1"], r["concat_knn_top1"])
        assert set(r["per_view"]) == set(r["views"])
    two = [r for r in rows if r["n_views"] == 2]  # L_C = L_F with two views: one run, reported twice
    assert sorted(r["graph"] for r in two) == ["core", "full"]
    assert [r.get("same_run_as") for r in two].count("full") == 1
    assert len(list((tmp_path / "runs" / "views").glob("2views_*"))) == 1
    table = capsys.readouterr().out
    assert "L,ab,depth,normals" in table and "concat linear" in table
    # a finished run is reused (its cached row), not retrained
    monkeypatch.setattr(experiments, "train", lambda *a, **k: pytest.fail("a cached run was trained again"))
    again = run_experiment("views", tmp_path)
    assert again == rows


def test_predictive_command(tmp_path):
    rows = run_experiment("predictive", tmp_path)
    assert [r["method"] for r in rows] == ["contrastive", "supervised", "regression_l1", "regression_l2",
                                           "classification", "classification_rebalanced", "random_init",
                                           "random_init_bn"]
    for r in rows:
        assert in_unit(r["linear_top1"], r["knn_top1"])
    assert [r["steps"] for r in rows] == [2] * 6 + [0, 0]


def test_patches_command(tmp_path, capsys):
    rows = run_experiment("patches", tmp_path, "--distances", "3")
    assert [(r["positions"], r["distance"], r["seed"]) for r in rows] == \
        [("fixed", d, 0) for d in (0, 3, 6)] + [("shrinking", d, 0) for d in (0, 4, 8)]
    # the fixed scheme draws every pair from the same anchor positions (those of its largest d); shrinking does not
    assert [r["anchor_positions"] for r in rows] == [9, 9, 9, 81, 25, 1]
    for r in rows:
        assert r["patch"] == 8 and r["image_size"] == 16 and r["k"] == 16
        assert math.isfinite(r["mi_bound"]) and r["mi_bound"] <= math.log(16) + 1e-9 and r["log_k"] == math.log(16)
        assert in_unit(r["linear_top1"], r["knn_top1"])
    out = capsys.readouterr().out
    assert "MI bound" in out and "shrinking" in out and "fixed" in out


def test_negatives_command(tmp_path, capsys):
    """negatives --quick on tiny data: the memory bank at k = 16 (64 > the 48 training items) and in-batch at the
    batch (16); the held-out bound never passes log k."""
    assert experiments.main(["negatives", *TINY_ARGS, "--data", "scenes:n=48,size=16,seed=3,test_n=64",
                             "--out", str(tmp_path), "--results", str(tmp_path / "res")]) == 0
    rows = json.loads((tmp_path / "negatives.json").read_text())
    assert json.loads((tmp_path / "res" / "negatives-quick.json").read_text()) == rows
    assert [(r["negatives"], r["k"], r["batch_size"]) for r in rows] == [("memory", 16, 16), ("batch", 16, 16)]
    for r in rows:
        assert {"negatives", "k", "mi_bound", "linear_top1", "knn_top1"} <= set(r)
        assert math.isfinite(r["mi_bound"]) and r["mi_bound"] <= math.log(r["k"]) + 1e-9
        assert in_unit(r["linear_top1"], r["knn_top1"])
    assert "memory" in capsys.readouterr().out
    assert experiments.negatives_plan(50_000, 128) == [("memory", k) for k in experiments.MEMORY_K] + \
        [("batch", k) for k in (16, 32, 64, 128)]


def test_negatives_k_runs_a_subset_and_refuses_a_k_outside_the_plan(tmp_path, capsys):
    """--k 16 keeps the rows of k = 16 (both kinds), each equal to its twin in the whole plan (the bound's pool is
    the whole plan's); a k the plan lacks is refused by name with exit 2; --limit -1 likewise."""
    args = ["negatives", *TINY_ARGS, "--data", "scenes:n=48,size=16,seed=3,test_n=64", "--out", str(tmp_path),
            "--results", ""]
    assert experiments.main([*args, "--k", "16"]) == 0
    rows = json.loads((tmp_path / "negatives.json").read_text())
    assert [(r["negatives"], r["k"]) for r in rows] == [("memory", 16), ("batch", 16)]
    whole = [a if a != str(tmp_path) else str(tmp_path / "whole") for a in args]
    assert experiments.main(whole) == 0  # a fresh cache: every row trained again
    twins = {(r["negatives"], r["k"]): r for r in json.loads((tmp_path / "whole" / "negatives.json").read_text())}
    for r in rows:
        assert r["mi_bound"] == twins[(r["negatives"], r["k"])]["mi_bound"]
    assert experiments.main([*args, "--k", "16,64"]) == 2
    err = capsys.readouterr().err
    assert "--k 64: not in this budget's plan" in err and "memory 16" in err
    assert experiments.main([*args, "--k", "x"]) == 2 and "--k must be comma-separated integers" in capsys.readouterr().err
    assert experiments.main([*args, "--limit", "-1"]) == 2 and "--limit >= 0" in capsys.readouterr().err
    assert experiments.main(["views", *args[1:], "--k", "16"]) == 2
    assert "--k chooses rows of negatives, not of views" in capsys.readouterr().err


def test_pool_mi_bound_reference_and_ceiling():
    """The held-out bound at k with negatives from a pool equals log k - L computed by hand, and stays under log k."""
    g = torch.Generator().manual_seed(0)
    za = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    zb = torch.nn.functional.normalize(za + 0.3 * torch.randn(40, 8, generator=g), dim=1)
    pa = torch.nn.functional.normalize(torch.randn(100, 8, generator=g), dim=1)
    pb = torch.nn.functional.normalize(torch.randn(100, 8, generator=g), dim=1)
    k, tau = 20, 0.2
    got = experiments.pool_mi_bound(za, zb, pa, pb, k, tau, seed=3, chunk=40)
    neg = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:k - 1]

    def direction(a, b, nb):  # mean over anchors of -log softmax of the positive among itself and k - 1 negatives
        logits = torch.cat([(a * b).sum(1, keepdim=True), a @ nb[neg].t()], 1) / tau
        return float(-torch.log_softmax(logits, 1)[:, 0].mean())

    ref = math.log(k) - (direction(za, zb, pb) + direction(zb, za, pa)) / 2
    assert got == pytest.approx(ref, abs=1e-5)
    assert got <= math.log(k) and experiments.pool_mi_bound(za, za, pa, pa, k, 0.01) <= math.log(k) + 1e-9


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    npz = tmp_path / "c.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x_train=rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8), y_train=np.zeros(40, np.int64),
             x_test=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8), y_test=np.zeros(20, np.int64))
    r = run_cli(["-m", "train.experiments", "views", "--quick", "--data", f"cifar10:{npz}", "--out", str(tmp_path)],
                timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "view 'depth' needs a 'depth' source" in r.stderr.strip().splitlines()[-1]
    from train import experiments  # in process: the same exit path as the CLI above
    assert experiments.main(["patches", "--quick", "--data", f"cifar10:{npz}", "--patch", "40", "--batch-size", "8",
                             "--out", str(tmp_path)]) == 2
    assert "--patch must be in [8, 31]" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- pieces
def test_tables_aggregate_seeds_as_mean_and_standard_deviation():
    from train.experiment_plots import aggregate
    seeds = [0.5, 0.7, 0.66]
    rows = [{"d": 0, "acc": seeds[0], "seed": 0}, {"d": 4, "acc": 0.2, "seed": 0}, {"d": 0, "acc": seeds[1], "seed": 1},
            {"d": 0, "acc": seeds[2], "seed": 2}]
    agg = aggregate(rows, ("d",), ("acc",))
    assert [g["d"] for g in agg] == [0, 4] and [g["n"] for g in agg] == [3, 1]
    assert agg[0]["acc"] == pytest.approx(np.mean(seeds)) and agg[0]["acc_std"] == pytest.approx(np.std(seeds, ddof=1))
    assert agg[0]["acc_min"] == 0.5 and agg[0]["acc_max"] == 0.7
    assert agg[1]["acc"] == pytest.approx(0.2) and agg[1]["acc_std"] == 0.0


def test_cache_key_changes_with_the_training_code_and_the_precision(tmp_path, monkeypatch):
    """A changed training-code file (a temp copy of one stands in for the hashed list) or another effective
    precision gives another cache key, so a fixed code never reuses a stale run."""
    src = tmp_path / "code" / "step.py"
    src.parent.mkdir()
    src.write_bytes((experiments.ROOT / "train" / "step.py").read_bytes())
    monkeypatch.setattr(experiments, "code_files", lambda: [src])
    b = experiments.BUDGETS["predictive"]["quick"]
    ctx = experiments.Context("predictive", b, tmp_path, torch.device("cpu"), experiments.BASE)
    cfg = ctx.config("contrastive", 0, 512, views="L,ab", amp="off")
    before = ctx.key(cfg)
    assert before["precision"] == "fp32" and ctx.key(cfg) == before
    src.write_text(src.read_text() + "\n# a fix\n")
    assert ctx.key(cfg) == before  # hashed once per process: the code it imported
    experiments._hash_files.cache_clear()  # a new process
    after = ctx.key(cfg)
    assert after["code"] != before["code"] and after != before
    assert ctx.key(experiments.replace(cfg, amp="bf16"))["precision"] == "bf16"
    # a cached row is reused under the same code, and computed again after a change to it
    calls = []
    assert ctx.cached(cfg, lambda: calls.append(1) or {"x": 1})["x"] == 1
    assert ctx.cached(cfg, lambda: pytest.fail("the same code and config were computed again"))["x"] == 1
    src.write_text(src.read_text() + "\n# another fix\n")
    experiments._hash_files.cache_clear()
    assert ctx.cached(cfg, lambda: calls.append(1) or {"x": 2})["x"] == 2
    assert len(calls) == 2


def test_crop_pair_is_the_slices_at_x_y_and_offset():
    img = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).reshape(2, 3, 10, 10)
    x, y = torch.tensor([0, 3]), torch.tensor([2, 1])
    a, b = crop_pair(img, 4, 2, x, y)
    for n in range(2):
        assert torch.equal(a[n], img[n, :, y[n]:y[n] + 4, x[n]:x[n] + 4])
        assert torch.equal(b[n], img[n, :, y[n] + 2:y[n] + 6, x[n] + 2:x[n] + 6])
    g = torch.Generator().manual_seed(0)
    px, py = positions(1000, 32, 16, 12, g)
    assert int(px.min()) == 0 and int(px.max()) == 4 and int(py.max()) == 4  # both patches always fit
    assert distances(32, 16) == [0, 4, 8, 12, 16] and distances(64, 32, 6)[-1] == 32


def test_patch_mi_bound_below_log_k_and_high_for_identical_patches():
    from models.data import Dataset
    rng = np.random.default_rng(0)
    ds = Dataset({"rgb": rng.integers(0, 255, (64, 16, 16, 3), dtype=np.uint8)}, y=np.zeros(64, np.int64))
    model = patch_model("resnet10", 32, 8, 0.25, seed=0)
    same = mi_bound(model, ds, 8, 0, k=32, tau=0.07)  # d = 0: both views are the same pixels
    far = mi_bound(model, ds, 8, 8, k=32, tau=0.07)  # opposite corners of noise images: nothing shared
    assert same <= math.log(32) + 1e-9 and far <= math.log(32) + 1e-9
    assert abs(far) < 0.05 and same > far + 0.2  # even a random encoder sees that identical patches match


def test_ab_bins_round_trip_and_predictive_target_is_the_ab_view():
    q = 16
    c = bin_centres(q)  # (q*q, 2)
    assert torch.equal(ab_bins(c.t().reshape(1, 2, q, q), q).flatten(), torch.arange(q * q))
    assert int(ab_bins(torch.full((1, 2, 1, 1), 5.0), q)) == q * q - 1  # out of range clamps to the last bin
    from models.transforms import make_transform
    from models.views import BUILTIN
    m = PredictiveModel("regression_l2", "resnet10", 32, 32, 0.25)
    rgb = torch.rand(2, 3, 32, 32)
    pred, target = m(rgb)
    assert pred.shape == target.shape == (2, 2, 8, 8)
    ref = make_transform(BUILTIN["ab"])(rgb).reshape(2, 2, 8, 4, 8, 4).mean((3, 5))
    assert torch.allclose(target, ref, atol=1e-5)
    assert PredictiveModel("classification", "resnet10", 32, 32, 0.25)(rgb)[0].shape == (2, q * q, 8, 8)


def test_predictive_objective_trains_through_the_training_loop(tmp_path):
    """The same training loop (train.pretrain.train with a loss_fn) lowers the colourisation loss on a fixed batch."""
    from train.pretrain import train
    from train.setup import prepare
    cfg = Config(data="scenes:n=16,size=16,seed=1,test_n=16", views="L,ab", arch="resnet10", width=0.25,
                 batch_size=8, epochs=15, lr=3e-3, warmup_steps=2, crop_min=0.9, flip=False, out=str(tmp_path / "r"),
                 export=False, index=False, evaluate=False).validate()
    ds, _, specs, size = prepare(cfg, progress=False)
    rgb = {"rgb": torch.from_numpy(ds.sources["rgb"]).permute(0, 3, 1, 2).float() / 255}
    torch.manual_seed(0)
    model = PredictiveModel("classification", "resnet10", 32, size, 0.25)
    model.eval()
    with torch.no_grad():
        before = float(predictive_loss(model, rgb)[0])
    trained = train(cfg, ds, specs, size, torch.device("cpu"), model=model, loss_fn=predictive_loss)
    trained.eval()
    with torch.no_grad():
        after = float(predictive_loss(trained, rgb)[0])
    assert after < 0.75 * before, (before, after)
    assert (tmp_path / "r" / "checkpoint.pt").is_file()


# ------------------------------------------------------------------------------------------ view-pair table
def test_pair_mi_bound_references():
    k = 32
    z = torch.eye(48)  # orthogonal unit rows
    assert pair_mi_bound(z, z, k, tau=0.05) == pytest.approx(math.log(k), abs=1e-6)  # loss ~0: the bound's ceiling
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(4096, 16, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(4096, 16, generator=g), dim=1)
    assert abs(pair_mi_bound(a, b, k, tau=1.0)) < 0.06  # independent views: about zero nats
    with pytest.raises(Exception, match="at least k"):
        pair_mi_bound(a[:10], b[:10], k, 1.0)


def test_view_pair_table_and_the_evaluate_flag(tmp_path):
    from train.pretrain import train
    from train.setup import prepare
    cfg = Config(data=TINY, views="L,ab,depth", arch="resnet10", width=0.25, batch_size=16, epochs=1, max_steps=3,
                 lr=3e-3, warmup_steps=1, out=str(tmp_path / "run"), export=False, index=False, evaluate=False,
                 threads=2).validate()
    ds, test, specs, size = prepare(cfg, progress=False)
    model = train(cfg, ds, specs, size, torch.device("cpu")).eval()
    rows = view_pair_table(model, ds, test, tau=cfg.tau, k=16, probe_epochs=2)
    assert [r["pair"] for r in rows] == ["L~ab", "L~depth", "ab~depth"]
    for r in rows:
        assert r["mi_bound"] <= math.log(16) + 1e-9 and math.isfinite(r["mi_bound"])
        assert in_unit(r["r1_ab"], r["r10_ab"], r["r1_ba"], r["r10_ba"], r["top1_a"], r["top1_b"], r["top1_pair"])
        assert r["r10_ab"] >= r["r1_ab"] and r["r10_ba"] >= r["r1_ba"]
    # the bound equals log(k) - L computed directly from the held-out embeddings
    from train.metrics import extract
    from train.losses import cmc_loss
    z = extract(model, test)["embed"]
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(test)))  # the bound's seeded shuffle
    zl, zab = z["L"][order], z["ab"][order]
    direct = np.mean([math.log(16) - float(cmc_loss({"a": zl[i:i + 16], "b": zab[i:i + 16]}, cfg.tau)[0]) / 2
                      for i in range(0, len(test) - 15, 16)])
    assert rows[0]["mi_bound"] == pytest.approx(direct, abs=1e-5)
    # unlabelled held-out items (y = -1) count in the bound and the recalls, not in the accuracies
    import dataclasses
    half = dataclasses.replace(test, y=np.where(np.arange(len(test)) % 2 == 0, test.y, -1))
    partial = view_pair_table(model, ds, half, tau=cfg.tau, k=16, linear=False)
    only = view_pair_table(model, ds, test.subset(np.arange(0, len(test), 2)), tau=cfg.tau, k=16, linear=False)
    full = view_pair_table(model, ds, test, tau=cfg.tau, k=16, linear=False)
    for p, o, f in zip(partial, only, full):
        assert p["top1_a"] == o["top1_a"] and p["top1_pair"] == o["top1_pair"]
        assert p["mi_bound"] == pytest.approx(f["mi_bound"], abs=1e-6) and p["r1_ab"] == f["r1_ab"]
    # accuracies measured already are taken as given, not measured again
    given = view_pair_table(model, ds, test, tau=cfg.tau, k=16, linear=False, single={"L": 0.5, "ab": 0.25})
    assert given[0]["top1_a"] == 0.5 and given[0]["top1_b"] == 0.25 and given[1]["top1_b"] == full[1]["top1_b"]
    text = format_view_pairs(rows)
    assert "L~depth" in text and "log k = 2.77" in text
    assert plot_view_pairs(rows, tmp_path / "vp.png").read_bytes()[:8] == PNG
    # python -m train.evaluate --view-pairs prints it, writes it to the JSON and plots it
    r = run_cli(["-m", "train.evaluate", "--model", str(tmp_path / "run"), "--view-pairs", "--probe-epochs", "2",
                 "--json", str(tmp_path / "e.json"), "--plots", str(tmp_path / "plots")], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "view pairs on held-out data" in r.stdout and "ab~depth" in r.stdout
    saved = json.loads((tmp_path / "e.json").read_text())
    assert [p["pair"] for p in saved["view_pairs"]] == ["L~ab", "L~depth", "ab~depth"]
    assert (tmp_path / "plots" / "view_pairs.png").is_file()
