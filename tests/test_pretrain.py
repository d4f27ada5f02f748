"""Training: a smoke run lowers the loss, resume equals an uninterrupted run, bad input exits 2 with one
line, a non-finite loss names its step, and torchrun's first loss equals the single process's."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import ROOT, make_npz, run_cli
from train import losses as losses_mod
from train import pretrain, step
from train.model import build_model
from train.config import Config
from train.pipeline import DeviceData
from train.setup import prepare

SMALL = "scenes:n=64,size=32,seed=5,test_n=32"


def small_cfg(tmp_path, **kw) -> Config:
    base = dict(data=SMALL, views="L,ab,depth", arch="resnet10", width=0.25, batch_size=16, epochs=2, lr=3e-3,
                warmup_steps=2, out=str(tmp_path / "run"), export=False, index=False, evaluate=False, threads=2)
    return Config(**(base | kw)).validate()


def metrics(run) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()[1:]]


def test_smoke_run_lowers_loss_on_a_fixed_batch(tmp_path):
    cfg = small_cfg(tmp_path, data="scenes:n=16,size=32,seed=1,test_n=16", batch_size=8, epochs=40, crop_min=0.9,
                    tau=0.2, flip=False)
    ds, _, specs, size = prepare(cfg, progress=False)
    fixed = DeviceData(ds, specs, torch.device("cpu")).batch(torch.arange(16))

    def loss_of(model):
        model.eval()
        with torch.no_grad():
            return float(losses_mod.cmc_loss(model(fixed), cfg.tau, cfg.graph)[0])

    before = loss_of(build_model(cfg, specs, size, ds))
    after = loss_of(pretrain.train(cfg, ds, specs, size, torch.device("cpu")))
    assert after < 0.7 * before, (before, after)


def test_resume_equals_uninterrupted(tmp_path):
    full = small_cfg(tmp_path / "a", negatives="memory", nce_k=32)
    ds, _, specs, size = prepare(full, progress=False)
    pretrain.train(full, ds, specs, size, torch.device("cpu"))
    part = replace(full, out=str(tmp_path / "b" / "run"), max_steps=3)
    pretrain.train(part, ds, specs, size, torch.device("cpu"))
    pretrain.train(replace(part, max_steps=0, resume=True), ds, specs, size, torch.device("cpu"))
    a = [m["loss"] for m in metrics(tmp_path / "a" / "run")]
    b = [m["loss"] for m in metrics(tmp_path / "b" / "run")]
    assert len(a) == len(b) == 8
    assert a == b  # bit-for-bit on the CPU: data order, augmentation, negatives and states are all restored


def test_a_budget_of_steps_decays_the_learning_rate_to_zero(tmp_path):
    """``max_steps`` alone stops early on the epochs' schedule (resume continues it); ``schedule_steps`` spans the
    decay over the steps run, as ``train.experiments`` budgets do (issue 20: its learning rate never decayed)."""
    ds, _, specs, size = prepare(small_cfg(tmp_path), progress=False)
    early = small_cfg(tmp_path / "early", epochs=10, max_steps=6)  # 4 steps per epoch: a schedule of 40
    budget = replace(small_cfg(tmp_path / "budget", epochs=10, max_steps=6), schedule_steps=6)
    for cfg in (early, budget):
        pretrain.train(cfg, ds, specs, size, torch.device("cpu"))
    lr_early = [m["lr"] for m in metrics(tmp_path / "early" / "run")]
    lr_budget = [m["lr"] for m in metrics(tmp_path / "budget" / "run")]
    assert len(lr_early) == len(lr_budget) == 6
    expect = [step.lr_at(budget, i, 6) for i in range(6)]
    assert lr_budget == pytest.approx(expect, rel=1e-5)
    assert lr_budget[-1] < 0.2 * budget.lr and lr_early[-1] > 0.9 * early.lr  # decayed by the budget's end
    with pytest.raises(ValueError, match="schedule-steps"):
        replace(budget, schedule_steps=-1).validate()


def test_nonfinite_loss_stops_naming_the_step(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, epochs=1)
    ds, _, specs, size = prepare(cfg, progress=False)
    real = losses_mod.cmc_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        loss, stats = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), stats

    monkeypatch.setattr(step, "cmc_loss", flaky)
    with pytest.raises(pretrain.TrainingError, match="loss is nan at step 2"):
        pretrain.train(cfg, ds, specs, size, torch.device("cpu"))


@pytest.mark.parametrize("args,message", [
    (["--data", "imagefolder:/no/such/dir"], "/no/such/dir"),
    (["--data", SMALL, "--views", "L,XYZ"], "unknown view 'XYZ'"),
    (["--data", "cifar10:{npz}", "--views", "L,depth"], "view 'depth' needs a 'depth' source"),
    (["--data", "imagefolder:{empty}"], "no train images found"),
    (["--data", SMALL, "--graph", "star"], "--graph must be core or full"),
    (["--epochs", "zero"], "--epochs"),
    (["--data", "nosuchkind:x"], "nosuchkind"),
    (["--config", "{badcfg}"], "unknown field"),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys, args, message):
    """In process (the real CLI's exit code and stderr: test_wrong_types_exit_2_with_one_line_from_a_file_and_from_a_flag)."""
    npz = tmp_path / "c.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x_train=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8), y_train=np.zeros(20, np.int64),
             x_test=rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), y_test=np.zeros(4, np.int64))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "bad.json").write_text('{"epochs": 1, "colour": "red"}')
    args = [a.format(npz=npz, empty=tmp_path / "empty", badcfg=tmp_path / "bad.json") for a in args]
    argv = [*args, "--out", str(tmp_path / "run")] + ([] if "--epochs" in args else ["--epochs", "1"])
    try:
        code = pretrain.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("INFO", "WARNING")) and "%|" not in l]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert message in lines[0]


@pytest.mark.parametrize("views", ["vectors", "conv"])
def test_torchrun_first_loss_equals_single_process(tmp_path, views):
    """Two CPU processes (gloo) train as one: embeddings gathered before the loss, the memory bank updated with
    the gathered batch, and batch norm over the global batch (conv encoders), so the losses match."""
    if views == "vectors":
        data = ["--data", f"npz:{make_npz(tmp_path / 'v.npz', n=256)}", "--views", "fa,fb"]
    else:
        data = ["--data", "scenes:n=64,size=32,seed=2,test_n=16", "--views", "L,depth,normals", "--arch", "resnet10",
                "--width", "0.25"]
    common = ["-m", "train.pretrain", *data, "--batch-size", "32", "--max-steps", "2", "--negatives", "memory",
              "--nce-k", "16", "--export", "false", "--index", "false", "--evaluate", "false", "--threads", "1",
              # fp32 and NCHW: bf16 rounding and channels_last kernels differ between one batch of 32 and two of 16
              "--amp", "off", "--channels-last", "false"]
    single = run_cli([*common, "--out", str(tmp_path / "one")], timeout=180)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     *common, "--out", str(tmp_path / "two")], timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(a) == len(b) == 2
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], abs=1e-4)
    # after one step the memory bank, the weights and batch-norm statistics agree too, so the second loss does
    assert b[1]["loss"] == pytest.approx(a[1]["loss"], abs=1e-4)
    one, two = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in ("one", "two"))
    # to float32 rounding of reductions split over two processes: on some CPUs (AVX512) a conv weight of scale
    # 0.04 differs by 2.3e-4 after two steps (oneDNN picks other kernels for a batch of 16 than of 32); within
    # 1e-4 plus 1% of each tensor's scale (a batch norm or bank left unsynchronised is off by far more)
    for k in one:
        x, y = one[k].float(), two[k].float()
        assert float((x - y).abs().max()) <= 1e-4 + 1e-2 * float(x.abs().max()), k


def test_config_file_values_are_typed_like_flags(tmp_path):
    """A config file goes through the same typed check as the flags: quoted numbers and booleans are read as
    a flag's text would be (YAML's flip: "false" used to stay a truthy string; epochs: "3" failed deep in
    training), and PyYAML's string '2e-3' is a number."""
    from train.config import parse_args
    f = tmp_path / "c.yaml"
    f.write_text('epochs: "3"\nflip: "false"\nchannels_last: off\nlr: 2e-3\nwidth: 1\n')
    cfg = parse_args(["--config", str(f)])
    assert (cfg.epochs, cfg.flip, cfg.channels_last, cfg.lr, cfg.width) == (3, False, False, 0.002, 1.0)
    assert type(cfg.epochs) is int and type(cfg.flip) is bool and type(cfg.width) is float
    assert parse_args(["--config", str(f), "--flip", "--epochs", "5"]).flip is True  # flags override the file
    assert parse_args(["--flip", "no", "--lr", "1e-3"]) == parse_args(["--flip", "false", "--lr", "0.001"])


@pytest.mark.parametrize("text,field", [
    ('epochs: "three"\n', "field epochs: expected an integer, not 'three'"),
    ("epochs: 2.5\n", "field epochs: expected an integer, not 2.5"),
    ("epochs: true\n", "field epochs: expected an integer, not True"),
    ('flip: "maybe"\n', "field flip: expected true or false, not 'maybe'"),
    ("flip: 1\n", "field flip: expected true or false, not 1"),
    ("data: 5\n", "field data: expected a string, not 5"),
    ("epochs:\n", "field epochs: expected an integer, not None"),
])
def test_config_file_of_a_wrong_type_names_the_field_and_the_file(tmp_path, text, field):
    from train.config import ConfigError, parse_args
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", str(f)])
    assert str(e.value) == f"config file {f}: {field}"


def test_wrong_types_exit_2_with_one_line_from_a_file_and_from_a_flag(tmp_path, capsys):
    f = tmp_path / "bad.json"
    f.write_text('{"epochs": "3", "flip": "sometimes"}')
    r = run_cli(["-m", "train.pretrain", "--config", str(f), "--out", str(tmp_path / "run")], timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == f"error: config file {f}: field flip: expected true or false, not 'sometimes'"
    assert pretrain.main(["--flip", "sometimes", "--out", str(tmp_path / "run")]) == 2  # in process: the same path
    assert capsys.readouterr().err.strip() == "error: --flip: expected true or false, not 'sometimes'"


def test_vector_bench_overrides_are_typed_by_the_config():
    from train.config import ConfigError
    from train.vector_bench import _overrides
    assert _overrides(["mlp_dropout=0.1", "flip=false", "epochs=4"]) == {"mlp_dropout": 0.1, "flip": False, "epochs": 4}
    with pytest.raises(ConfigError, match="--set flip: expected true or false, not 'maybe'"):
        _overrides(["flip=maybe"])
    with pytest.raises(ConfigError, match="--set colour: unknown config field 'colour'"):
        _overrides(["colour=red"])


def test_help_prints_each_default_once(capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    from dataclasses import fields
    assert text.count("(default:") == len(fields(Config))  # was twice per flag: "(default: 3) (default: None)"
    assert "(default: None)" not in text
    assert "passes over the training data (default: 3)" in text


def test_npz_without_views_trains_on_the_datas_vector_views(tmp_path):
    npz = make_npz(tmp_path / "v.npz", n=128)
    r = run_cli(["-m", "train.pretrain", "--data", f"npz:{npz}", "--batch-size", "32", "--max-steps", "2",
                 "--export", "false", "--index", "false", "--evaluate", "false", "--out", str(tmp_path / "run")],
                timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert [v["name"] for v in state["views"]] == ["fa", "fb"]
    assert "views: fa,fb" in r.stderr


def test_alexnet_run_twice_exports_and_replaces_its_gallery(tmp_path, capsys):
    """`--arch alexnet` below 224 px used to train and then crash at export; the same command run twice (same
    model fingerprint) used to end in a traceback at the gallery step."""
    args = ["--data", "scenes:n=64,size=32,seed=4,test_n=24", "--views", "L,depth", "--arch", "alexnet",
            "--batch-size", "16", "--max-steps", "3", "--threads", "2", "--out", str(tmp_path / "run")]
    assert pretrain.main(args) == 0  # the first run in process, the second (the one that crashed) as the CLI
    first = capsys.readouterr().out
    second = run_cli(["-m", "train.pretrain", *args], timeout=300)
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr[-3000:]
    for out in (first, second.stdout):
        assert "model: " in out and "index: " in out, out
        assert "re-estimated BN" in out
    card = json.loads((tmp_path / "run" / "export" / "card.json").read_text())
    assert card["config"]["arch"] == "alexnet" and card["image_size"] == 32
    idx = second.stdout.split("index: ")[1].split(" ")[0]
    assert idx == first.split("index: ")[1].split(" ")[0]  # the same gallery, replaced
    from index.store import IndexStore
    store = IndexStore.open(idx)
    try:
        assert len(store) == 24
    finally:
        store.close()


def test_random_init_baseline_recalibrates_batch_norm_on_training_images():
    """recalibrate_bn re-estimates every BN layer's running statistics from the data (one batch here, so they
    equal that batch's statistics exactly), and leaves the weights alone."""
    from train.model import recalibrate_bn
    from models.data import Dataset
    from models.encoders import CMCModel
    from models.views import parse_views
    rng = np.random.default_rng(0)
    ds = Dataset(sources={"rgb": rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
                          "depth": rng.integers(0, 65535, (40, 16, 16), dtype=np.uint16)}, keys=[str(i) for i in range(40)])
    torch.manual_seed(0)
    model = CMCModel(parse_views("L,depth"), "resnet10", 32, 16, 0.25).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    first_bn = model.views["depth"].encoder.body[1]
    assert torch.equal(first_bn.running_mean, torch.zeros_like(first_bn.running_mean))  # the default statistics
    recalibrate_bn(model, ds, batch_size=64)
    assert not model.training
    d = torch.from_numpy(ds.sources["depth"].astype(np.float32) / 65535)[:, None]
    with torch.no_grad():
        h = model.views["depth"].encoder.body[0](model.views["depth"].view_input(d))  # (N, C, H, W): BN input
    want_mean, want_var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)
    assert torch.allclose(first_bn.running_mean, want_mean, atol=1e-5)
    assert torch.allclose(first_bn.running_var, want_var, rtol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_alexnet_probe_reads_conv5():
    """The linear probe of AlexNet reads conv5 pooled to 6x6 (128 x 6 x 6 = 4608 per view), not fc7 (2048)."""
    from models.encoders import CMCModel
    from models.views import parse_views
    from train.metrics import extract
    from models.data import Dataset
    rng = np.random.default_rng(1)
    ds = Dataset(sources={"rgb": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)}, keys=[str(i) for i in range(6)])
    model = CMCModel(parse_views("L,ab"), "alexnet", 32, 32).eval()
    out = extract(model, ds)
    assert out["features"]["L"].shape == (6, 128 * 6 * 6) and out["embed"]["L"].shape == (6, 32)
    with torch.no_grad():
        x = model.views["L"].view_input(torch.from_numpy(ds.sources["rgb"]).permute(0, 3, 1, 2).float() / 255)
        assert torch.allclose(out["features"]["L"], model.views["L"].encoder.conv(x).flatten(1), atol=1e-5)
        assert torch.allclose(out["embed"]["L"], model.views["L"].encoder(x), atol=1e-5)


def test_gallery_failure_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """The model is exported; the gallery step then cannot write ($CMC_HOME is a file): one line, exit 2."""
    from train.finish import finish
    home = tmp_path / "home_is_a_file"
    home.write_text("x")
    monkeypatch.setenv("CMC_HOME", str(home))
    cfg = small_cfg(tmp_path, views="L,depth", export=True, index=True, evaluate=False)
    ds, test, specs, size = prepare(cfg, progress=False)
    model = build_model(cfg, specs, size, ds).eval()
    assert finish(cfg, model, specs, size, test, torch.device("cpu"), ds) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error")]
    assert len(err) == 1 and "gallery index" in err[0] and "the model is exported" in err[0], err
    assert (tmp_path / "run" / "export" / "card.json").is_file()
