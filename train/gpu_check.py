"""python -m train.gpu_check: the one script a lent CUDA machine runs (issue 23). One call measures and checks
the whole GPU path and writes one JSON report (``--out``), part by part, so a run cut short keeps what it had:

- training on one GPU, at the default settings (bf16 autocast, channels_last), with ``--compile``, and at the
  reference settings (fp32 storage with TF32, NCHW, eager): samples/s over the timed steps only (CUDA events
  around each step after ``--warmup`` steps; not the data preparation, set-up, pinning, validation, metrics or
  checkpoint saves), FLOPs per step (``torch.utils.flop_counter.FlopCounterMode`` over one step), MFU against the
  GPU's dense bf16 peak (PEAK_BF16_TFLOPS, by device name), peak reserved memory, host synchronisations per step
  (CUDA's sync debug mode over a few steps), first and final loss;
- DistributedDataParallel through torchrun over every visible GPU (with one GPU, a one-process DDP: NCCL,
  GlobalBatchNorm, DDP's all-reduce and the gathered loss all run);
- export to ONNX and parity of onnxruntime's CUDA provider against torch; the serving runtime on the CUDA
  provider: providers granted, the worker's GPU, IOBinding against plain runs, the warm-up at every batch size
  the batcher forms, and the first call at a size the warm-up did not run (cuDNN HEURISTIC search).

``--device cpu`` runs the same on the CPU (a smoke test; no CUDA events, sync counts or MFU).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .config import Config
from .distributed import Dist, resolve_device, use_device
from .export import PARITY_ATOL, export_model, random_source  # onnx is imported inside its functions
from .pretrain import train
from .setup import prepare

# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS per GPU, from NVIDIA's datasheets (which quote sparse
# figures; halved here). First match of the name wins, so the longer names come first.
PEAK_BF16_TFLOPS = [("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.5),
                    ("H100", 989.4), ("A100", 312.0), ("L40S", 362.05), ("L4", 121.0)]


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` as FlopCounterMode counts them (matmuls and convolutions, forward and backward; an
    elementwise op counts 0)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as m:
        fn()
    return int(m.get_total_flops())


class StepTimer:
    """``start()``/``stop()`` around every training step (``train(timer=)``). Times the steps from ``warmup`` on
    (CUDA events on a GPU, perf_counter on the CPU), counts the FLOPs of step ``warmup - 1`` (FlopCounterMode;
    untimed) and, on CUDA, the host synchronisations of the ``sync_steps`` steps before it."""

    def __init__(self, device: torch.device, warmup: int, sync_steps: int = 5, flops: bool = True):
        self.cuda, self.count = device.type == "cuda", flops
        self.warmup, self.i = max(1, warmup), 0
        self.sync_window = range(max(0, self.warmup - 1 - sync_steps), self.warmup - 1)
        self.flops: int | None = None
        self.syncs: list[int] = []
        self._marks: list = []
        self._fc = self._warn = self._caught = None

    def start(self) -> None:
        if self.i == self.warmup - 1 and self.count:
            from torch.utils.flop_counter import FlopCounterMode
            self._fc = FlopCounterMode(display=False)
            self._fc.__enter__()
        elif self.cuda and self.i in self.sync_window:
            self._warn = warnings.catch_warnings(record=True)
            self._caught = self._warn.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        if self.i >= self.warmup:
            self._marks.append(self._now())

    def stop(self) -> None:
        if self.i >= self.warmup:
            self._marks.append(self._now())
        if self._fc is not None:
            self._fc.__exit__(None, None, None)
            self.flops, self._fc = int(self._fc.get_total_flops()), None
        if self._warn is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._warn.__exit__(None, None, None)
            self.syncs.append(sum("synchroniz" in str(w.message) for w in self._caught))
            self._warn = self._caught = None
        self.i += 1

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    @property
    def steps(self) -> int:
        return len(self._marks) // 2

    def seconds(self) -> float:
        """The timed steps' total time (between each step's start and stop, gaps excluded)."""
        pairs = list(zip(self._marks[0::2], self._marks[1::2]))
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in pairs) / 1e3
        return sum(b - a for a, b in pairs)


def run_variant(cfg: Config, ds, specs, size, device: torch.device, world: Dist, warmup: int) -> tuple[dict, object]:
    """Train ``cfg`` (its max_steps) and measure its timed steps; returns the figures and the trained model."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(device, warmup, flops=not cfg.compile)  # FLOPs counted eagerly (a compiled step: the same)
    with tempfile.TemporaryDirectory() as d:
        model = train(replace(cfg, out=d), ds, specs, size, device, world, timer=timer)
        rows = [json.loads(l) for l in (Path(d) / "metrics.jsonl").read_text().splitlines()[1:]]
    secs = timer.seconds()
    steps_s = timer.steps / secs if secs > 0 else float("nan")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_tflops(name) if cuda else None
    res = {"steps_timed": timer.steps, "timed_s": round(secs, 4), "steps_per_s": round(steps_s, 3),
           "samples_per_s": round(steps_s * cfg.batch_size, 1), "flops_per_step_per_rank": timer.flops,
           "achieved_tflops_per_gpu": round(timer.flops * steps_s / 1e12, 3) if timer.flops else None,
           "peak_bf16_tflops": peak, "host_syncs_per_step": timer.syncs or None,
           "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"],
           "settings": {k: getattr(cfg, k) for k in ("amp", "channels_last", "compile", "batch_size", "arch", "width")}}
    res["mfu"] = round(res["achieved_tflops_per_gpu"] / peak, 4) if peak and timer.flops else None
    if cuda:
        res["peak_reserved_GiB"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
        res["peak_allocated_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return res, model


def check_export_and_serving(model, size: int, cfg: Config, device: torch.device) -> dict:
    """Export ``model`` (CPU parity inside export_model), then the serving runtime on ``device``'s provider:
    parity against torch fp32 on the CPU, IOBinding against plain runs, the warm-up sizes, an unwarmed size."""
    import numpy as np

    from models.runtime import DeviceError, Runtime, warmup_sizes  # lazy: onnxruntime only here

    model = copy.deepcopy(model).cpu().eval()
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        export_model(copy.deepcopy(model), size, d, asdict(cfg), fused=False)
        dev = "cuda" if device.type == "cuda" else "cpu"
        t = time.perf_counter()
        try:
            rt = Runtime(d, device=dev, verify=False)
        except DeviceError as e:  # no usable CUDA provider (onnxruntime without CUDA, or its libraries missing)
            out["cuda_provider_error"] = str(e)
            dev = "cpu"
            rt = Runtime(d, device=dev, verify=False)
        out["session_s"] = round(time.perf_counter() - t, 3)
        plain = Runtime(d, device=dev, verify=False, iobinding=False)
        out |= {"providers": rt.providers, "device_id": rt.device_id, "iobinding": rt.iobinding}
        t = time.perf_counter()
        out["warmup_sizes"] = warmup_sizes(64)
        rt.warmup(64)
        out["warmup_s"] = round(time.perf_counter() - t, 3)
        views = {}
        for name, v in rt.views.items():
            x = random_source(v["input"], 64, 7, model.views[name])
            with torch.no_grad():
                want = model.views[name](torch.from_numpy(x)).numpy()
            got, got_plain = rt.embed(name, x), plain.embed(name, x)
            lat = {}
            for label, r in (("iobinding" if rt.iobinding else "default", rt), ("plain", plain)):
                for b in (1, 64):
                    ts = []
                    for _ in range(20):
                        t = time.perf_counter()
                        r.embed(name, x[:b])
                        ts.append(time.perf_counter() - t)
                    lat[f"{label}_b{b}_p50_ms"] = round(float(np.median(ts)) * 1e3, 3)
            t = time.perf_counter()
            rt.embed(name, x[:37])  # a size the warm-up did not run
            first = time.perf_counter() - t
            t = time.perf_counter()
            rt.embed(name, x[:37])
            views[name] = {"parity_max_abs_vs_torch": float(np.abs(got - want).max()),
                           "iobinding_vs_plain_max_abs": float(np.abs(got - got_plain).max()),
                           "unwarmed_b37_first_ms": round(first * 1e3, 3),
                           "unwarmed_b37_second_ms": round((time.perf_counter() - t) * 1e3, 3), **lat}
        out["views"] = views
        worst = max(v["parity_max_abs_vs_torch"] for v in views.values())
        # the CUDA provider runs convolutions through cuDNN with TF32 allowed: a looser bound than the CPU's
        out |= {"parity_atol_cpu": PARITY_ATOL, "parity_max_abs": worst, "parity_ok": worst <= max(PARITY_ATOL, 1e-2)}
    return out


def base_config(a: argparse.Namespace) -> Config:
    return Config(data=a.data, batch_size=a.batch_size, max_steps=a.steps, epochs=1000, device=a.device,
                  out="unused", export=False, index=False, evaluate=False, val_fraction=0.0).validate()


VARIANTS = {"default": {}, "compile": {"compile": True}, "reference": {"amp": "off", "channels_last": False}}


def _child(a: argparse.Namespace) -> int:
    """One torchrun rank: DDP (forced with one process) at the default settings; rank 0 writes ``--out``."""
    world = Dist(force_ddp=True)
    cfg = base_config(a)
    device = resolve_device(a.device, world.local_rank, world.world)
    use_device(device)
    world.init(device)
    ds, _, specs, size = prepare(cfg, progress=False)
    res, _ = run_variant(cfg, ds, specs, size, device, world, a.warmup)
    res["world"] = world.world
    if world.main:
        Path(a.out).write_text(json.dumps(res, indent=2))
    import torch.distributed as dist
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps per variant (the first --warmup untimed)")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data", default="scenes:n=4096,test_n=256")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--variants", default="default,compile,reference", help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--ddp", action=argparse.BooleanOptionalAction, default=True,
                   help="also train under torchrun over every visible GPU")
    p.add_argument("--serving", action=argparse.BooleanOptionalAction, default=True,
                   help="also export, check parity on the provider and time the serving runtime")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps <= a.warmup:
        p.error(f"--steps {a.steps} must exceed --warmup {a.warmup}")
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device on this machine; the GPU check needs one (or --device cpu)", file=sys.stderr)
        return 2
    if a.child:
        return _child(a)
    unknown = set(a.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    out = Path(a.out)
    cuda = a.device == "cuda"
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
                    "gpus": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "args": vars(a), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "single": {}, "errors": {}}

    def save() -> None:
        out.write_text(json.dumps(report, indent=2))

    cfg = base_config(a)
    t = time.perf_counter()
    ds, _, specs, size = prepare(cfg, progress=False)
    report["prepare_s"] = round(time.perf_counter() - t, 1)
    device = resolve_device(a.device)
    model = None
    for name in a.variants.split(","):
        try:
            res, m = run_variant(replace(cfg, **VARIANTS[name]), ds, specs, size, device, Dist(), a.warmup)
            if res["flops_per_step_per_rank"] is None and "default" in report["single"]:  # compiled: same model
                d = report["single"]["default"]
                res["flops_per_step_per_rank"] = f = d["flops_per_step_per_rank"]
                res["achieved_tflops_per_gpu"] = round(f * res["steps_per_s"] / 1e12, 3) if f else None
                res["mfu"] = round(res["achieved_tflops_per_gpu"] / res["peak_bf16_tflops"], 4) \
                    if f and res["peak_bf16_tflops"] else None
            report["single"][name] = res
            model = model or m
        except Exception as e:  # one part failing must not lose the others
            report["errors"][name] = f"{type(e).__name__}: {e}"
        print(json.dumps({name: report["single"].get(name) or report["errors"].get(name)}), flush=True)
        save()
    if a.serving and model is not None:
        try:
            report["export_serving"] = check_export_and_serving(model, size, cfg, device)
        except Exception as e:
            report["errors"]["export_serving"] = f"{type(e).__name__}: {e}"
        save()
    if a.ddp:
        n = torch.cuda.device_count() if cuda else 1
        child_out = out.with_suffix(".ddp.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "train.gpu_check", "--child", "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--batch-size", str(a.batch_size), "--data", a.data, "--device", a.device, "--out", str(child_out)]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
        if r.returncode == 0 and child_out.exists():
            report["ddp"] = json.loads(child_out.read_text()) | {"wall_s": round(time.perf_counter() - t, 1)}
            child_out.unlink()
        else:
            report["errors"]["ddp"] = f"torchrun exit {r.returncode}: {r.stderr[-2000:]}"
        save()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    print(json.dumps(report, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
