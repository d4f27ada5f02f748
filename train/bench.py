"""python -m train.bench: samples/s of the full training pipeline (data -> device -> augmentation -> views
-> step) beside the model step alone (views + forward + loss + backward + optimiser on a batch already on
the device), for the default config and for the paper's reference setting (AlexNet-half for L and ab at
224 px, batch 64, 4096 memory-bank negatives, softmax form)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from models.data import Dataset
from .config import Config
from .pipeline import DeviceData, augment, crop_params, step_generator
from .pretrain import Dist, build_model, make_optimizer, resolve_device, train_step
from models.views import parse_views

SETTINGS = {
    "default": Config(views="L,ab,depth"),
    "reference": Config(views="L,ab", arch="alexnet", image_size=224, batch_size=64, negatives="memory",
                        nce_k=4096, nce_momentum=0.5, optimizer="sgd", lr=0.03, graph="full"),
}


def synthetic(n: int, size: int, seed: int = 0) -> Dataset:
    """Smooth random RGB-D images (in memory, uint8/uint16 as the readers give them)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    rgb = np.repeat(np.repeat(small, size // 8, 1), size // 8, 2)
    depth = (rgb[..., 0].astype(np.uint16) * 257)
    return Dataset(sources={"rgb": np.ascontiguousarray(rgb), "depth": depth}, y=np.zeros(n, np.int64),
                   keys=[str(i) for i in range(n)])


def bench(cfg: Config, steps: int, warmup: int, device: torch.device, n_data: int) -> dict:
    size = cfg.image_size or 64
    ds = synthetic(n_data, size)
    specs = parse_views(cfg.views)
    model = build_model(cfg, specs, size).to(device).train()
    opt = make_optimizer(cfg, model)
    from .losses import MemoryBank
    bank = MemoryBank([s.name for s in specs], len(ds), cfg.feat_dim, cfg.nce_momentum, device) \
        if cfg.negatives == "memory" else None
    data, world = DeviceData(ds, specs, device, pin=device.type == "cuda"), Dist()
    amp = device.type == "cuda"
    bs = cfg.batch_size

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def pipeline_batch(step):
        idx = torch.randint(0, len(ds), (bs,), generator=torch.Generator().manual_seed(step))
        g = step_generator(cfg.seed, step)
        return augment(data.batch(idx), crop_params(bs, cfg.crop_min, cfg.flip, g)), idx.to(device), g

    fixed, fidx, fg = pipeline_batch(0)
    times = {"step": [], "pipeline": []}
    for rep in range(2):  # interleave the two modes so machine noise hits both alike
        for mode in ("step", "pipeline"):
            for i in range(warmup + steps):
                sync()
                t = time.perf_counter()
                batch, idx, g = pipeline_batch(i) if mode == "pipeline" else (fixed, fidx, fg)
                train_step(model, opt, bank, batch, idx, cfg, world, g, amp)
                sync()
                if i >= warmup:
                    times[mode].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"step_samples_per_s": bs / med["step"], "pipeline_samples_per_s": bs / med["pipeline"],
            "ratio": med["step"] / med["pipeline"], "batch_size": bs, "image_size": size, "views": cfg.views,
            "arch": cfg.arch, "negatives": cfg.negatives, "steps": steps, "device": str(device),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="default,reference", help="comma-separated: default, reference")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode and repetition")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n-data", type=int, default=4096, help="in-memory dataset size")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    rows = []
    for name in a.settings.split(","):
        if name not in SETTINGS:
            print(f"error: unknown setting {name!r}; choose from {', '.join(SETTINGS)}", file=sys.stderr)
            return 2
        r = bench(SETTINGS[name], a.steps, a.warmup, device, a.n_data) | {"setting": name}
        rows.append(r)
    print(f"{'setting':<10} {'arch':<9} {'size':>4} {'batch':>5} {'neg':<7} {'step samples/s':>15} "
          f"{'pipeline samples/s':>19} {'pipeline/step':>14}")
    for r in rows:
        print(f"{r['setting']:<10} {r['arch']:<9} {r['image_size']:>4} {r['batch_size']:>5} {r['negatives']:<7} "
              f"{r['step_samples_per_s']:>15.1f} {r['pipeline_samples_per_s']:>19.1f} {100 * r['ratio']:>13.1f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
