"""Pictures of a run (PNG): training curves (loss and MI bound per pair) and a cross-view retrieval grid."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.data import Dataset
from models.encoders import CMCModel
from .metrics import extract


def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no display). Imported when a picture is drawn, not with
    this module: matplotlib is heavy, and the command lines import this module whether or not they plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def training_curves(metrics_path: str | Path, out: str | Path) -> Path:
    plt = pyplot()
    rows = [json.loads(l) for l in Path(metrics_path).read_text().splitlines()[1:] if l.strip()]
    steps = [r["step"] for r in rows]
    pairs = sorted({k.split("/", 1)[1] for r in rows[:1] for k in r if k.startswith("mi/")})
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))

    def smooth(y, w=max(1, len(rows) // 100)):
        return np.convolve(y, np.ones(w) / w, mode="valid") if len(y) > w else np.asarray(y)

    for p in pairs:
        for a, key in ((ax[0], "loss"), (ax[1], "mi")):
            y = smooth([r[f"{key}/{p}"] for r in rows])
            a.plot(steps[len(steps) - len(y):], y, label=p)
    ax[0].set(title="pair loss L(Vi,Vj)", xlabel="step")
    ax[1].set(title="MI lower bound log(k) - L/2 (nats)", xlabel="step")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _show(ds: Dataset, view: str, i: int) -> np.ndarray:
    """How a person looks at item i in a view: L as grayscale, depth-based views as depth, else colour."""
    if view in ("depth", "normals") and "depth" in ds.sources:
        return ds.sources["depth"][i].astype(np.float32) / 65535.0
    rgb = ds.sources["rgb"][i]
    if view in ("L", "Y"):
        return rgb.astype(np.float32).mean(axis=2) / 255.0
    return rgb


@torch.no_grad()
def retrieval_grid(model: CMCModel, ds: Dataset, query_view: str, gallery_view: str, out: str | Path,
                   n_queries: int = 8, k: int = 5, seed: int = 0) -> Path:
    """Queries in one view, their top-k items retrieved in another; the true match framed in green."""
    plt = pyplot()
    ds = ds.subset(np.sort(np.random.default_rng(seed).permutation(len(ds))[:2000]))  # files may be sorted by class
    z = extract(model, ds)["embed"]
    q = np.random.default_rng(seed).choice(len(ds), n_queries, replace=False)
    top = (z[query_view][q] @ z[gallery_view].t()).topk(k, dim=1).indices.numpy()
    fig, axes = plt.subplots(n_queries, k + 1, figsize=(1.6 * (k + 1), 1.6 * n_queries))
    for r, qi in enumerate(q):
        img = _show(ds, query_view, qi)
        axes[r, 0].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r, 0].set_title(f"{query_view} query", fontsize=7)
        for c, gi in enumerate(top[r], 1):
            axes[r, c].imshow(ds.sources["rgb"][gi] if "rgb" in ds.sources else _show(ds, gallery_view, gi))
            if gi == qi:
                for s in axes[r, c].spines.values():
                    s.set_edgecolor("lime")
                    s.set_linewidth(3)
                axes[r, c].set_title("match", fontsize=7, color="green")
    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"{query_view} -> {gallery_view}: top-{k}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_run(run: str | Path, model: CMCModel, test: Dataset, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    metrics = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run).parent / "metrics.jsonl"
    if metrics.is_file():
        files.append(training_curves(metrics, out / "training_curves.png"))
    views = list(model.specs)
    image_views = [v for v in views if model.specs[v].is_image]
    if len(image_views) >= 2:
        files.append(retrieval_grid(model, test, image_views[0], image_views[1],
                                    out / f"retrieval_{image_views[0]}_to_{image_views[1]}.png"))
    return files
