"""The GPU path without a GPU (issue 23): each rank's device under torchrun, set_device before anything touches
CUDA, and per-rank dropout streams. torch.cuda's queries are monkeypatched; nothing here runs a CUDA kernel."""
import pytest
import torch

from train import distributed, pretrain
from train.config import ConfigError
from train.distributed import rank_seed, resolve_device


@pytest.fixture
def eight_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_cuda_under_torchrun_is_the_ranks_gpu(eight_gpus, name):
    assert [resolve_device(name, r, 8) for r in range(8)] == [torch.device("cuda", r) for r in range(8)]


def test_one_process_gets_an_explicit_index(eight_gpus):
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:5") == torch.device("cuda", 5)
    assert resolve_device("cpu", 3, 8) == torch.device("cpu")


def test_explicit_cuda_n_under_torchrun_is_refused_naming_the_problem(eight_gpus):
    with pytest.raises(ConfigError, match="every rank on GPU 2.*CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda:2", 1, 4)


def test_more_ranks_than_gpus_and_bad_names_are_refused(eight_gpus):
    with pytest.raises(ConfigError, match="LOCAL_RANK 8.*8 CUDA device"):
        resolve_device("cuda", 8, 16)
    with pytest.raises(ConfigError, match="cuda:9"):
        resolve_device("cuda:9")
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        resolve_device("cudax")


def test_no_cuda_is_the_cpu_for_auto_and_an_error_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 3, 4) == torch.device("cpu")
    with pytest.raises(ConfigError, match="not available"):
        resolve_device("cuda", 0, 1)


class Stop(Exception):
    pass


def test_main_sets_the_ranks_device_before_nccl_and_the_data(eight_gpus, monkeypatch, tmp_path, capsys):
    """torchrun rank 3 of 4 with --device cuda: set_device(cuda:3), then the process group, then the data."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(distributed.Dist, "init", lambda self, d: calls.append(("init", d)))

    def prepare(cfg, progress=True):
        calls.append(("prepare",))
        raise pretrain.DataError("stop here")

    monkeypatch.setattr(pretrain, "prepare", prepare)
    assert pretrain.main(["--device", "cuda", "--out", str(tmp_path / "run"), "--threads", "1"]) == 2
    assert calls == [("set_device", torch.device("cuda", 3)), ("init", torch.device("cuda", 3)), ("prepare",)]
    assert "stop here" in capsys.readouterr().err


class FakeWorld:
    """Rank ``rank`` of two, without a process group: gather is the identity (the step is stubbed anyway)."""

    def __init__(self, rank: int):
        self.world, self.rank, self.local_rank, self.ddp = 2, rank, 0, True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, z):
        return z


def test_ranks_draw_different_dropout_masks_from_the_same_initial_weights(tmp_path, monkeypatch):
    from conftest import make_npz
    from train.config import Config
    from train.setup import prepare

    cfg = Config(data=f"npz:{make_npz(tmp_path / 'v.npz', n=64)}", views="fa,fb", batch_size=16, max_steps=1,
                 mlp_dropout=0.5, out=str(tmp_path / "run"), export=False, index=False, evaluate=False,
                 threads=1, val_fraction=0.0).validate()
    ds, _, specs, size = prepare(cfg, progress=False)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda m, **kw: m)
    seen = {}

    def step(model, opt, bank, batch, idx, cfg_, world, g, amp, loss_fn=None):
        model.train()
        drop = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout))
        seen[world.rank] = ({k: v.clone() for k, v in model.state_dict().items()}, drop(torch.ones(256)))
        raise Stop

    monkeypatch.setattr(pretrain, "train_step", step)
    for rank in (0, 1):
        with pytest.raises(Stop):
            pretrain.train(cfg, ds, specs, size, torch.device("cpu"), FakeWorld(rank))
    (w0, m0), (w1, m1) = seen[0], seen[1]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)  # the same initial model
    assert not torch.equal(m0, m1)  # but each rank its own dropout mask
    assert rank_seed(cfg.seed, 0) != rank_seed(cfg.seed, 1)


# onnxruntime-gpu's CUDA and cuDNN majors by version on PyPI, from the requirements table of
# https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements ("starting with 1.19,
# CUDA 12.x becomes the default version when distributing ONNX Runtime GPU packages in PyPI": 1.19.x -> CUDA 12.x,
# cuDNN 9.x; 1.18.1 -> 12.x / 9.x but PyPI's default was the CUDA 11.8 / cuDNN 8 build; 1.18.0 -> 11.8 / 8.x)
ORT_GPU_PYPI = [((1, 19), (12, 9)), ((1, 18), (11, 8)), ((1, 15), (11, 8))]


def ort_requirement(version: tuple[int, int]) -> tuple[int, int]:
    return next(req for since, req in ORT_GPU_PYPI if version >= since)


def test_bento_image_has_the_cuda_and_cudnn_onnxruntime_gpu_needs():
    """bentofile.yaml's docker.cuda_version, as BentoML 1.4 turns it into a base image, carries the CUDA major and
    the cuDNN major that the pinned onnxruntime-gpu's lowest allowed version was built for (and the highest)."""
    import re

    import yaml
    from bentoml._internal.bento.build_config import ALLOWED_CUDA_VERSION_ARGS, BentoBuildConfig
    from bentoml._internal.container.frontend.dockerfile import get_cuda_base_image

    from conftest import ROOT

    text = (ROOT / "bentofile.yaml").read_text()
    spec = next(p for p in yaml.safe_load(text)["python"]["packages"] if p.startswith("onnxruntime-gpu"))
    low = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", spec).groups())
    high = re.search(r"<\s*(\d+)\.(\d+)", spec)
    assert high, f"{spec}: an upper bound keeps a later default CUDA major out of the locked Bento"
    cuda_major, cudnn_major = ort_requirement(low)
    assert ort_requirement((int(high[1]), int(high[2]) - 1)) == (cuda_major, cudnn_major)
    with open(ROOT / "bentofile.yaml") as f:
        docker = BentoBuildConfig.from_yaml(f).docker  # BentoML's own parsing and validation
    assert docker.distro == "debian" and docker.cuda_version in ALLOWED_CUDA_VERSION_ARGS.values()
    assert int(docker.cuda_version.split(".")[0]) == cuda_major
    image = get_cuda_base_image(docker.distro, docker.cuda_version)
    # nvidia/cuda's "-cudnn-" images of CUDA 12.6+ carry cuDNN 9; "-cudnn8-" images carry cuDNN 8
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn(\d*)-runtime-ubuntu(\d+)\.04", image)
    assert m, image
    assert (int(m[1]), int(m[2] or 9)) == (cuda_major, cudnn_major), image


def _global_bn_rank(rank: int, world: int, init: str, x: torch.Tensor, out: dict) -> None:
    """One rank of test_global_batch_norm_equals_one_process: its slice of x through GlobalBatchNorm2d, 3 steps."""
    import torch.distributed as dist

    from train.distributed import convert_global_batchnorm
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    bn = convert_global_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.3))).train()
    with torch.no_grad():
        bn[0].weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        bn[0].bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    n = x.shape[1] // world
    for t in range(x.shape[0]):
        xs = x[t, rank * n:(rank + 1) * n].clone().requires_grad_(True)
        y = bn(xs)
        (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()  # a loss that mixes the samples
        out[f"y{t}_{rank}"], out[f"g{t}_{rank}"] = y.detach(), xs.grad
    out[f"mean_{rank}"], out[f"var_{rank}"] = bn[0].running_mean.clone(), bn[0].running_var.clone()
    out[f"wgrad_{rank}"] = bn[0].weight.grad.clone()


def _spawned(rank, world, init, x, path):
    import os

    import torch.distributed as dist
    out = {}
    _global_bn_rank(rank, world, init, x, out)
    torch.save(out, f"{path}.{rank}")
    dist.barrier()  # both ranks saved; then leave without gloo's teardown, which aborted at exit in about 1
    os._exit(0)  # run in 12 on torch 2.13 ("terminate called without an active exception"), barrier or not


def test_global_batch_norm_equals_one_process_over_the_whole_batch(tmp_path):
    """Two processes (gloo), each with half of a batch: GlobalBatchNorm's outputs, input gradients and running
    statistics equal plain BatchNorm2d's over the concatenated batch in one process, within 1e-5, over 3 steps
    (the batch-norm layer DDP uses on CUDA too). Weight gradients summed over ranks equal the single process's."""
    import torch.multiprocessing as mp

    x = torch.randn(3, 8, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1  # (steps, N, C, H, W)
    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path / 'pg'}"
    procs = [ctx.Process(target=_spawned, args=(r, 2, init, x, str(tmp_path / "out"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.exitcode is None:
            p.kill()
        assert p.exitcode == 0
    got = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    ref = torch.nn.BatchNorm2d(3, momentum=0.3).train()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    for t in range(3):
        xs = x[t].clone().requires_grad_(True)
        y = ref(xs)
        (y * torch.cat([torch.arange(y[:4].numel()).reshape(y[:4].shape).sin()] * 2)).sum().backward()
        torch.testing.assert_close(torch.cat([got[0][f"y{t}_0"], got[1][f"y{t}_1"]]), y.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.cat([got[0][f"g{t}_0"], got[1][f"g{t}_1"]]), xs.grad, atol=1e-5, rtol=0)
    for r in range(2):
        torch.testing.assert_close(got[r][f"mean_{r}"], ref.running_mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[r][f"var_{r}"], ref.running_var, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[0]["wgrad_0"] + got[1]["wgrad_1"], ref.weight.grad, atol=1e-4, rtol=1e-5)


def _reference_sources(ds, keys, idx) -> dict:
    """A batch of sources as the pipeline documents it, from the dataset's numpy arrays (independent of DeviceData)."""
    import numpy as np
    out, rows = {}, idx.numpy()
    for k in keys:
        a = ds.sources[k][rows]
        if k == "rgb":
            out[k] = torch.from_numpy(a.transpose(0, 3, 1, 2).astype(np.float32)) / 255.0
        elif k == "depth":
            out[k] = torch.from_numpy(a.astype(np.float32))[:, None] / 65535.0
        else:
            out[k] = torch.from_numpy(a.astype(np.float32))
    return out


@pytest.mark.parametrize("stage", [False, True])
def test_device_data_batches_equal_the_sources(tmp_path, stage):
    """Direct indexing and the staged gather (index_select into two alternating buffers, the pinned path on CUDA)
    give the sources' values exactly, uint16 depth above 32767 included (it crosses as int16, widened after),
    batch after batch (a buffer is reused every other batch)."""
    import numpy as np

    from train.pipeline import DeviceData
    from models.data import Dataset
    from models.views import parse_views

    rng = np.random.default_rng(0)
    n = 40
    ds = Dataset({"rgb": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                  "depth": rng.integers(0, 65536, (n, 8, 8), dtype=np.uint64).astype(np.uint16)},
                 np.zeros(n, np.int64))
    assert int(ds.sources["depth"].max()) > 60_000
    data = DeviceData(ds, parse_views("L,ab,depth"), torch.device("cpu"), stage=stage)
    assert data.stage is stage and not data.resident
    batches = [torch.from_numpy(rng.permutation(n)[:b]) for b in (16, 16, 16, 7, 16)]
    got = [data.batch(i) for i in batches]  # all kept: a later batch must not overwrite an earlier one
    for i, b in zip(batches, got):
        want = _reference_sources(ds, ["depth", "rgb"], i)
        assert b.keys() == want.keys()
        for k in want:
            assert b[k].dtype == torch.float32 and torch.equal(b[k], want[k]), k


@pytest.mark.parametrize("data", ["images", "vectors"])
def test_the_loops_batches_are_those_of_the_per_step_recipe(tmp_path, monkeypatch, data):
    """The loop now keeps one permutation per epoch and draws on the device's generator; on the CPU every batch,
    crop, vector augmentation and memory-bank draw of 6 steps across an epoch boundary equals the per-step recipe
    it replaced (the epoch's permutation rebuilt each step, a CPU generator seeded by (seed, step), sources read
    from numpy). On CUDA the draws come from the GPU's generator: equal in distribution, not in value."""
    from conftest import make_npz
    from train.config import Config
    from train.pipeline import augment, crop_params, epoch_order
    from train.setup import prepare
    from train.vector_aug import VectorAugment

    if data == "images":
        kw = dict(data="scenes:n=64,size=16,seed=5,test_n=8", views="L,ab,depth", arch="resnet10", width=0.25)
    else:
        kw = dict(data=f"npz:{make_npz(tmp_path / 'v.npz', n=64)}", views="fa,fb", vector_corrupt=0.3, vector_noise=0.2)
    cfg = Config(**kw, batch_size=16, max_steps=6, negatives="memory", nce_k=8, out=str(tmp_path / "run"),
                 export=False, index=False, evaluate=False, threads=1, val_fraction=0.0).validate()
    ds, _, specs, size = prepare(cfg, progress=False)
    seen = []

    def step(model, opt, bank, batch, idx, cfg_, world, g, amp, loss_fn=None):
        seen.append((batch, idx.clone(), bank.sample(idx, cfg.nce_k, g)))
        return torch.tensor(1.0), {"loss": torch.tensor(1.0)}

    monkeypatch.setattr(pretrain, "train_step", step)
    pretrain.train(cfg, ds, specs, size, torch.device("cpu"))
    assert len(seen) == 6
    keys = sorted({s.source_key for s in specs})
    vec = VectorAugment({k: torch.from_numpy(ds.sources[k]) for k in keys if k.startswith("f")},
                        cfg.vector_corrupt, cfg.vector_noise)
    for s, (batch, idx, neg) in enumerate(seen):
        epoch, i = divmod(s, len(ds) // cfg.batch_size)
        want_idx = epoch_order(len(ds), cfg.seed, epoch)[i * 16:(i + 1) * 16]
        g = torch.Generator().manual_seed((cfg.seed + 1) * 7_919 + s * 104_729)
        want = vec(augment(_reference_sources(ds, keys, want_idx), crop_params(16, cfg.crop_min, cfg.flip, g)), g, 16)
        r = torch.randint(0, len(ds) - 1, (16, cfg.nce_k), generator=g)
        assert torch.equal(idx, want_idx), s
        assert batch.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(batch[k], want[k], atol=0, rtol=0, msg=f"step {s}: {k}")
        assert torch.equal(neg, r + (r >= want_idx[:, None]).long()), s
    assert len({tuple(x[1].tolist()) for x in seen}) == 6  # the steps did not all see one batch


@pytest.mark.slow
def test_compile_runs_a_step_with_the_eager_loss(tmp_path):
    """--compile (torch.compile, inductor on the CPU here) trains: its first two losses equal eager's within 1e-4
    (the first is the same weights' forward; the second follows one update)."""
    from conftest import make_npz
    from train.config import Config
    from train.setup import prepare

    losses = {}
    for c in (False, True):
        cfg = Config(data=f"npz:{make_npz(tmp_path / 'v.npz', n=64)}", views="fa,fb", batch_size=16, max_steps=2,
                     out=str(tmp_path / f"run{c}"), export=False, index=False, evaluate=False, threads=1,
                     val_fraction=0.0, amp="off", compile=c).validate()
        ds, _, specs, size = prepare(cfg, progress=False)
        pretrain.train(cfg, ds, specs, size, torch.device("cpu"))
        import json
        rows = [json.loads(l) for l in (tmp_path / f"run{c}" / "metrics.jsonl").read_text().splitlines()[1:]]
        losses[c] = [r["loss"] for r in rows]
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A small exported model (two vector views: the fastest to export)."""
    from dataclasses import asdict

    from models.encoders import CMCModel
    from models.views import parse_views
    from train.config import Config
    from train.export import export_model

    out = tmp_path_factory.mktemp("artifact")
    torch.manual_seed(0)
    model = CMCModel(parse_views("fou,bar", {"fou": 8, "bar": 5}), "resnet10", 16, 16, 0.25)
    export_model(model, 16, out, asdict(Config(image_size=16, feat_dim=16)), fused=False)
    return out


def test_cuda_provider_options_device_per_worker_and_warmup_sizes(monkeypatch):
    """The CUDA provider gets its GPU and the HEURISTIC cuDNN search; workers go round-robin over the visible
    GPUs (cuda:N wins); the warm-up covers every power of two up to the batcher's maximum, and the maximum."""
    from models import runtime

    opts = runtime.provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"], 3)
    assert opts == [{"device_id": "3", "cudnn_conv_algo_search": "HEURISTIC"}, {}]
    assert [runtime.device_id("cuda", w, 4) for w in (1, 2, 3, 4, 5)] == [0, 1, 2, 3, 0]  # BentoML counts from 1
    assert runtime.device_id("cuda:2", 3, 4) == 2 and runtime.device_id("cuda", None, 4) == 0  # outside a worker
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
        assert runtime.visible_gpus() == 3
        mp.setenv("CUDA_VISIBLE_DEVICES", "-1")
        assert runtime.visible_gpus() == 0
    assert runtime.warmup_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert runtime.warmup_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert runtime.warmup_sizes(1) == [1]


def test_runtime_iobinding_equals_plain_runs_and_warmup_runs_every_size(artifact):
    """IOBinding (what the CUDA provider uses) gives the plain run's embeddings exactly, here on the CPU
    provider; the warm-up runs each view at each size (counted at the session)."""
    import numpy as np

    from models.runtime import Runtime

    plain, bound = Runtime(artifact, device="cpu", verify=False), Runtime(artifact, device="cpu", iobinding=True,
                                                                          verify=False)
    assert not plain.iobinding and bound.iobinding and bound.device_id is None
    for name, v in plain.views.items():
        shape = [5 if d is None else d for d in v["input"]["shape"]]
        x = np.random.default_rng(1).random(shape, dtype=np.float32)
        np.testing.assert_array_equal(bound.embed(name, x, batch_size=4), plain.embed(name, x, batch_size=4))
    seen = []

    class Spy:
        def __init__(self, sess):
            self.s = sess

        def __getattr__(self, a):
            return getattr(self.s, a)

        def run(self, out, feed):
            seen.append(next(iter(feed.values())).shape[0])
            return self.s.run(out, feed)

    plain.sessions = {k: Spy(s) for k, s in plain.sessions.items()}
    done = plain.warmup(8)
    assert done == [(v, b) for v in plain.views for b in (1, 2, 4, 8)]
    assert seen == [1, 2, 4, 8] * len(plain.views)


def test_flop_count_of_linear_and_conv_equals_the_analytic_count():
    """FlopCounterMode, as train.gpu_check uses it: a linear layer's forward is 2*N*I*O, its backward twice that
    (input and weight gradients); a convolution's forward is 2*N*Cout*Hout*Wout*Cin*kh*kw."""
    from train.gpu_check import count_flops, peak_tflops

    lin = torch.nn.Linear(7, 5)
    x = torch.randn(3, 7, requires_grad=True)
    assert count_flops(lambda: lin(x)) == 2 * 3 * 7 * 5
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * (2 * 3 * 7 * 5)
    conv = torch.nn.Conv2d(4, 6, 3, stride=1, padding=1)
    y = torch.randn(2, 4, 9, 9)
    assert count_flops(lambda: conv(y)) == 2 * 2 * 6 * 9 * 9 * 4 * 3 * 3
    assert count_flops(lambda: conv(y).sum().backward()) == 2 * (2 * 2 * 6 * 9 * 9 * 4 * 3 * 3)  # weight grad only
    assert peak_tflops("NVIDIA H200") == 989.4 and peak_tflops("NVIDIA L40S") == 362.05
    assert peak_tflops("NVIDIA L4") == 121.0 and peak_tflops("Tesla T4") is None


def test_train_calls_the_timer_around_the_steps_only(tmp_path, monkeypatch):
    """train(timer=) brackets each step with start()/stop(), and every checkpoint save falls outside the brackets,
    so train.gpu_check's timed total holds steps alone."""
    from conftest import make_npz
    from train.config import Config
    from train.setup import prepare

    log = []

    class Timer:
        def start(self):
            log.append("start")

        def stop(self):
            log.append("stop")

    real_save = pretrain.save_checkpoint
    monkeypatch.setattr(pretrain, "save_checkpoint", lambda obj, path: (log.append("save"), real_save(obj, path)))
    cfg = Config(data=f"npz:{make_npz(tmp_path / 'v.npz', n=64)}", views="fa,fb", batch_size=16, max_steps=6,
                 out=str(tmp_path / "run"), export=False, index=False, evaluate=False, threads=1,
                 val_fraction=0.0).validate()
    ds, _, specs, size = prepare(cfg, progress=False)
    pretrain.train(cfg, ds, specs, size, torch.device("cpu"), timer=Timer())
    want, per_epoch = [], len(ds) // 16
    for step in range(1, 7):
        want += ["start", "stop"] + (["save"] if step % per_epoch == 0 or step == 6 else [])  # epoch ends, last
    assert per_epoch < 6 and log == want


def test_gpu_check_cpu_mode_writes_its_report(tmp_path):
    """The GPU check's CPU mode end to end (training part): the JSON has the timed steps (not the warm-up), the
    FLOPs of a step (FlopCounterMode) and the losses; no MFU without a GPU peak."""
    import json

    from conftest import make_npz
    from train import gpu_check

    out = tmp_path / "r.json"
    code = gpu_check.main(["--device", "cpu", "--variants", "default", "--steps", "5", "--warmup", "2",
                           "--batch-size", "16", "--data", f"npz:{make_npz(tmp_path / 'v.npz', n=64)}",
                           "--no-ddp", "--no-serving", "--out", str(out)])
    assert code == 0
    rep = json.loads(out.read_text())
    d = rep["single"]["default"]
    assert d["steps_timed"] == 3 and d["timed_s"] > 0 and d["samples_per_s"] > 0
    assert d["flops_per_step_per_rank"] > 0 and d["first_loss"] > 0 and d["mfu"] is None and not rep["errors"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_on_cuda(tmp_path):
    """On a CUDA machine (pytest -m gpu): a short GPU check passes every part: training with MFU and a sync count,
    DDP through torchrun, the CUDA provider with IOBinding and parity."""
    import json

    from train import gpu_check

    out = tmp_path / "r.json"
    code = gpu_check.main(["--variants", "default", "--steps", "40", "--warmup", "10", "--batch-size", "64",
                           "--data", "scenes:n=512,test_n=64", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert code == 0, rep["errors"]
    d = rep["single"]["default"]
    assert d["flops_per_step_per_rank"] > 0 and d["peak_reserved_GiB"] > 0 and d["host_syncs_per_step"]
    assert rep["ddp"]["world"] == torch.cuda.device_count() and rep["ddp"]["steps_timed"] == 30
    s = rep["export_serving"]
    assert s["providers"][0] == "CUDAExecutionProvider" and s["iobinding"] and s["parity_ok"]
