"""python -m train.bench: samples/s of the full training pipeline (data -> device -> augmentation -> views
-> step) beside the model step alone (views + forward + loss + backward + optimiser on a batch already on
the device), for the default config and for the paper's reference setting (AlexNet-half for L and ab at
224 px, batch 64, 4096 memory-bank negatives, softmax form).

Each setting is timed on two paths in one run, interleaved so that machine noise hits both alike:
``old`` (fp32 on a CPU, NCHW, per-sample memory-bank negatives: the step before the CPU speed work) and
``new`` (the defaults: ``--amp auto``, which is bf16 autocast on a CPU with native bf16, channels_last for
conv encoders, and memory-bank negatives shared by the batch). The CPU's bf16 flags are printed with them."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from models.data import Dataset
from models.views import parse_views
from .config import Config
from .distributed import Dist, resolve_device
from .losses import MemoryBank
from .model import build_model
from .pipeline import DeviceData, augment, crop_params, step_generator
from .speed import cpu_report, speed_choices, to_channels_last
from .step import make_optimizer, train_step

SETTINGS = {
    "default": Config(views="L,ab,depth"),
    "reference": Config(views="L,ab", arch="alexnet", image_size=224, batch_size=64, negatives="memory",
                        nce_k=4096, nce_momentum=0.5, optimizer="sgd", lr=0.03, graph="full"),
    # a few seconds on any machine: checks that the command and both paths run (tests, smoke checks)
    "tiny": Config(views="L,ab", arch="alexnet", image_size=32, batch_size=8, negatives="memory", nce_k=64,
                   optimizer="sgd", lr=0.03),
}


def synthetic(n: int, size: int, seed: int = 0) -> Dataset:
    """Smooth random RGB-D images (in memory, uint8/uint16 as the readers give them)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    rgb = np.repeat(np.repeat(small, size // 8, 1), size // 8, 2)
    depth = (rgb[..., 0].astype(np.uint16) * 257)
    return Dataset(sources={"rgb": np.ascontiguousarray(rgb), "depth": depth}, y=np.zeros(n, np.int64),
                   keys=[str(i) for i in range(n)])


def old_path(cfg: Config, device: torch.device) -> Config:
    """The step as it was before the CPU speed work: autocast on CUDA only, channels_last on CUDA only,
    per-sample memory-bank negatives."""
    cuda = device.type == "cuda"
    return replace(cfg, amp="auto" if cuda else "off", channels_last=cuda, negatives_sharing="per-sample")


PATHS = {"old": old_path, "new": lambda cfg, device: cfg}


class _Runner:
    """One path's model, optimiser, memory bank and speed choices on a shared synthetic dataset."""

    def __init__(self, cfg: Config, ds: Dataset, size: int, device: torch.device):
        specs = parse_views(cfg.views)
        self.cfg, self.device = cfg, device
        self.amp, self.channels_last = speed_choices(cfg, specs, device)
        self.model = build_model(cfg, specs, size).to(device).train()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = make_optimizer(cfg, self.model)
        self.bank = MemoryBank([s.name for s in specs], len(ds), cfg.feat_dim, cfg.nce_momentum, device) \
            if cfg.negatives == "memory" else None
        self.data, self.world = DeviceData(ds, specs, device, pin=device.type == "cuda"), Dist()
        self.n = len(ds)

    def batch(self, step: int):
        bs = self.cfg.batch_size
        idx = torch.randint(0, self.n, (bs,), generator=torch.Generator().manual_seed(step))
        g = step_generator(self.cfg.seed, step)
        b = augment(self.data.batch(idx), crop_params(bs, self.cfg.crop_min, self.cfg.flip, g))
        return (to_channels_last(b) if self.channels_last else b), idx.to(self.device), g

    def step(self, batch, idx, g) -> None:
        train_step(self.model, self.opt, self.bank, batch, idx, self.cfg, self.world, g, self.amp)


def bench(cfg: Config, steps: int, warmup: int, device: torch.device, n_data: int,
          paths: tuple[str, ...] = ("old", "new")) -> list[dict]:
    """One row per path: step and pipeline samples/s (medians over interleaved repetitions)."""
    size = cfg.image_size or 64
    ds = synthetic(n_data, size)
    runners = {p: _Runner(PATHS[p](cfg, device), ds, size, device) for p in paths}
    fixed = {p: r.batch(0) for p, r in runners.items()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {(p, m): [] for p in paths for m in ("step", "pipeline")}
    for rep in range(2):  # interleave paths and modes so machine noise hits all alike
        for p, r in runners.items():
            for mode in ("step", "pipeline"):
                for i in range(warmup + steps):
                    sync()
                    t = time.perf_counter()
                    r.step(*(r.batch(i) if mode == "pipeline" else fixed[p]))
                    sync()
                    if i >= warmup:
                        times[(p, mode)].append(time.perf_counter() - t)
    rows = []
    bs = cfg.batch_size
    for p, r in runners.items():
        med = {m: statistics.median(times[(p, m)]) for m in ("step", "pipeline")}
        rows.append({"path": p, "step_samples_per_s": bs / med["step"], "pipeline_samples_per_s": bs / med["pipeline"],
                     "ratio": med["step"] / med["pipeline"], "batch_size": bs, "image_size": size, "views": cfg.views,
                     "arch": cfg.arch, "negatives": cfg.negatives, "negatives_sharing": r.cfg.negatives_sharing,
                     "amp": r.amp, "channels_last": r.channels_last, "steps": steps, "device": str(device),
                     "threads": torch.get_num_threads()})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="default,reference", help=f"comma-separated: {', '.join(SETTINGS)}")
    p.add_argument("--paths", default="old,new", help="comma-separated: old, new")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode and repetition")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n-data", type=int, default=4096, help="in-memory dataset size")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    paths = tuple(x for x in a.paths.split(",") if x)
    bad = [x for x in paths if x not in PATHS] + [x for x in a.settings.split(",") if x not in SETTINGS]
    if bad or not paths:
        print(f"error: unknown setting or path {bad[0] if bad else a.paths!r}; settings: {', '.join(SETTINGS)}; "
              f"paths: {', '.join(PATHS)}", file=sys.stderr)
        return 2
    rows = []
    for name in a.settings.split(","):
        rows += [r | {"setting": name} for r in bench(SETTINGS[name], a.steps, a.warmup, device, a.n_data, paths)]
    cpu = cpu_report()
    print(f"device {device}; CPU capability {cpu['capability']}; bf16 flags: {', '.join(cpu['bf16_flags']) or 'none'} "
          f"(native bf16: {'yes' if cpu['native_bf16'] else 'no'}); threads {cpu['threads']}")
    print(f"{'setting':<10} {'path':<4} {'arch':<9} {'size':>4} {'batch':>5} {'neg':<18} {'amp':<5} {'NHWC':<5} "
          f"{'step samples/s':>15} {'pipeline samples/s':>19} {'pipeline/step':>14}")
    for r in rows:
        neg = r["negatives"] + ("/" + r["negatives_sharing"] if r["negatives"] == "memory" else "")
        print(f"{r['setting']:<10} {r['path']:<4} {r['arch']:<9} {r['image_size']:>4} {r['batch_size']:>5} {neg:<18} "
              f"{'bf16' if r['amp'] else 'fp32':<5} {'yes' if r['channels_last'] else 'no':<5} "
              f"{r['step_samples_per_s']:>15.1f} {r['pipeline_samples_per_s']:>19.1f} {100 * r['ratio']:>13.1f}%")
    for name in a.settings.split(","):
        by = {r["path"]: r for r in rows if r["setting"] == name}
        if "old" in by and "new" in by:
            print(f"{name}: new/old end to end {by['new']['pipeline_samples_per_s'] / by['old']['pipeline_samples_per_s']:.2f}x, "
                  f"step {by['new']['step_samples_per_s'] / by['old']['step_samples_per_s']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
