"""python -m train.gpu_check: on a CUDA machine, train the default config for a few hundred steps in bf16
and print samples/s, peak GPU memory and the final loss (the figures BENCHMARKS.md asks for)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from .config import Config
from .distributed import resolve_device
from .pretrain import train
from .setup import prepare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.gpu_check", description=__doc__)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data", default="scenes")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device on this machine; the GPU check needs one", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        cfg = Config(data=a.data, batch_size=a.batch_size, max_steps=a.steps, epochs=100, device="cuda", amp="bf16",
                     out=d, export=False, index=False, evaluate=False).validate()
        ds, _, specs, size = prepare(cfg)
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        train(cfg, ds, specs, size, resolve_device("cuda"))  # cuda:0, made the current device by train
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        rows = [json.loads(l) for l in (Path(d) / "metrics.jsonl").read_text().splitlines()[1:]]
    res = {"gpu": torch.cuda.get_device_name(0), "steps": a.steps, "batch_size": a.batch_size,
           "samples_per_s": a.steps * a.batch_size / dt, "median_step_samples_per_s":
           sorted(r["samples_per_s"] for r in rows)[len(rows) // 2],
           "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30, "first_loss": rows[0]["loss"],
           "final_loss": rows[-1]["loss"], "wall_s": dt}
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
