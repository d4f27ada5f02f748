"""A build process for the memory-budget test: ``index.build.build_index`` of N synthetic clustered vectors (one
view, the vectors themselves as its embeddings: no ONNX model) within a budget, printing one JSON line with its
baseline and peak RSS.

    python tests/_budget_build.py OUT --n N --dim D --memory-mb MB

The peak is the kernel's high-water mark (``VmHWM``), reset (``/proc/self/clear_refs`` 5) after the data is made
and every library is loaded and has set up its buffers (one small FAISS training and search), so it measures the build alone above ``baseline`` (``VmRSS`` at that moment).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from index import build
from index import factory as fac
from index.recall import exact_knn, overlap
from index.store import IndexStore
from models.data import Dataset
from models.runtime import Runtime


class VectorRuntime(Runtime):
    """The build's model: view ``v`` embeds a chunk as its own vectors."""
    image_size, fingerprint, dim = 32, "vectors", 0  # plain attributes in place of Runtime's properties

    def __init__(self, dim: int) -> None:  # no ONNX sessions
        self.path, self.dim = Path("vectors"), dim
        self.views = {"v": {"name": "v", "source": "v"}}

    def view(self, name: str) -> dict:
        return self.views[name]

    def embed_sources(self, view: str, sources: dict) -> np.ndarray:
        return np.ascontiguousarray(sources[view], dtype=np.float32)


def status(field: str) -> int:
    """A field of /proc/self/status in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--n", type=int, default=30_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--memory-mb", type=int, required=True)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((500, a.dim), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), a.n)]
    x += 0.5 * rng.standard_normal(x.shape, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # (n, dim) float32
    data = Dataset(sources={"v": x})
    warm = fac.make_index("IVF16,PQ8x8np", a.dim)  # BLAS and FAISS set up their buffers once: part of the baseline
    warm.train(x[:2048])
    exact_knn(x[:200], x[:2048], 10)
    del warm
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    baseline = status("VmRSS")
    out = build.build_index(VectorRuntime(a.dim), data, ["v"], a.out, memory_budget_mb=a.memory_mb, progress=False,
                            thumbs=False)
    peak = status("VmHWM")
    with IndexStore.open(out, readonly=True) as s:
        spec = s.manifest["views"]["v"]
        count = s.count("v")
        # recall@10 of the built index at its stored search parameters, for the first 200 items (the build's
        # tuning queries), each leaving itself out, against exact search over every other vector: an independent
        # check of what the build recorded
        ids = np.array(s.ids_of([f"item-{i}" for i in range(a.n)]))
        _, I = s.search(x[:200], "v", 11)
        _, pos = exact_knn(x[:200], x, 11)
        own = ids[:200, None]
        I = np.array([r[r != o][:10] for r, o in zip(I, own)])
        gt = np.array([r[r != o][:10] for r, o in zip(ids[pos], own)])
        recall = overlap(I, gt, 10)
    files = sum(f.stat().st_size for f in Path(out).glob("*.faiss*"))
    print(json.dumps({"baseline": baseline, "peak": peak, "raw": int(x.nbytes), "count": count,
                      "factory": spec["factory"], "recall": recall, "choice": spec.get("choice"), "view_bytes": files,
                      "line": build.describe(spec)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
