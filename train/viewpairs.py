"""The view-pair table, how to choose views (its rows, text and plot; the numbers come from ``train.metrics``).
For every pair of a model's views, on held-out data:

- the contrastive bound log(k) - L on I(v_i; v_j) (the two-view loss with in-batch negatives, k fixed for
  every pair, at the model's training temperature),
- cross-view retrieval recall@1/@10 in both directions,
- each view's downstream top-1 (linear probe on frozen features, or weighted kNN with ``linear=False``) and
  that of the pair's features concatenated.

``plot_view_pairs`` draws the pair's accuracy against its MI bound (Tian et al. 2020 argue for a sweet
spot: views that share too much carry nuisance, views that share too little carry no signal).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from models.data import DataError, Dataset
from models.encoders import CMCModel
from .losses import pairs
from .metrics import cross_view_recall, extract, mi_bound, top1
from .plots import pyplot

LOG = logging.getLogger(__name__)


def view_pair_table(model: CMCModel, train: Dataset, test: Dataset, tau: float, k: int = 256, device="cpu",
                    linear: bool = True, probe_epochs: int = 30, knn_k: int = 200,
                    single: dict[str, float] | None = None) -> list[dict]:
    """One row per unordered pair of the model's views (see the module docstring). The MI bound and the
    recalls use every held-out item; the accuracies only the labelled ones (y >= 0). ``single``: each view's
    top-1 already measured by ``train.metrics.evaluate`` under the same probe (not measured again)."""
    if train.y is None or test.y is None:
        raise DataError("the view-pair table needs labels ('y') in both splits")
    views = list(model.specs)
    if len(views) < 2:
        raise DataError("the view-pair table needs a model with at least two views")
    ltr, lte = torch.from_numpy(train.y >= 0), torch.from_numpy(test.y >= 0)
    if not ltr.any() or not lte.any():
        raise DataError("the view-pair table needs labelled items (y >= 0) in both splits")
    k = min(k, len(test))
    ytr, yte = torch.from_numpy(train.y).long()[ltr], torch.from_numpy(test.y).long()[lte]
    ftr, fte = extract(model, train, device), extract(model, test, device)
    ftr_l = {kind: {v: t[ltr] for v, t in d.items()} for kind, d in ftr.items()}  # the labelled items
    fte_l = {kind: {v: t[lte] for v, t in d.items()} for kind, d in fte.items()}

    def acc(vs: list[str]) -> float:
        return top1(ftr_l, fte_l, ytr, yte, vs, linear, probe_epochs, knn_k)

    single = {v: (single or {}).get(v) for v in views}
    single = {v: acc([v]) if a is None else a for v, a in single.items()}
    rows = []
    for a, b in pairs(views, "full"):
        za, zb = fte["embed"][a], fte["embed"][b]
        ab, ba = cross_view_recall(za, zb), cross_view_recall(zb, za)
        rows.append({"pair": f"{a}~{b}", "a": a, "b": b, "k": k, "log_k": math.log(k),
                     "mi_bound": mi_bound(za, zb, k, tau),
                     "r1_ab": ab["R@1"], "r10_ab": ab["R@10"], "r1_ba": ba["R@1"], "r10_ba": ba["R@10"],
                     "top1_a": single[a], "top1_b": single[b], "top1_pair": acc([a, b]),
                     "metric": "linear" if linear else "knn"})
    return rows


def format_view_pairs(rows: list[dict]) -> str:
    """The table a user chooses views with; accuracies and recalls in percent, the bound in nats."""
    if not rows:
        return ""
    metric = rows[0]["metric"]
    head = (f"{'pair a~b':<18} {'MI bound':>9} {'R@1 a>b':>8} {'R@10 a>b':>9} {'R@1 b>a':>8} {'R@10 b>a':>9} "
            f"{'top1 a':>7} {'top1 b':>7} {'top1 a+b':>9}")
    lines = [f"view pairs on held-out data (MI bound log(k) - L in nats, k = {rows[0]['k']}, "
             f"log k = {rows[0]['log_k']:.2f}; top-1 by {metric} probe)", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['pair']:<18} {r['mi_bound']:>9.3f} {100 * r['r1_ab']:>7.1f}% {100 * r['r10_ab']:>8.1f}% "
                     f"{100 * r['r1_ba']:>7.1f}% {100 * r['r10_ba']:>8.1f}% {100 * r['top1_a']:>6.1f}% "
                     f"{100 * r['top1_b']:>6.1f}% {100 * r['top1_pair']:>8.1f}%")
    return "\n".join(lines)


def plot_view_pairs(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """Scatter of each pair's downstream top-1 (features of both views) against its MI bound, labelled."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        ax.plot([r["mi_bound"]] * 2, [100 * min(r["top1_a"], r["top1_b"]), 100 * max(r["top1_a"], r["top1_b"])],
                color="0.8", lw=4, solid_capstyle="round", zorder=1)
        ax.scatter(r["mi_bound"], 100 * r["top1_pair"], s=40, zorder=2)
        ax.annotate(r["pair"], (r["mi_bound"], 100 * r["top1_pair"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.axvline(rows[0]["log_k"], color="0.5", ls=":", lw=1)
    ax.text(rows[0]["log_k"], ax.get_ylim()[0], " log k", color="0.4", fontsize=8, va="bottom", ha="right",
            rotation=90)
    ax.set_xlabel(f"MI lower bound log(k) - L on held-out pairs (nats, k = {rows[0]['k']})")
    ax.set_ylabel(f"held-out {rows[0]['metric']} top-1 (%)")
    ax.set_title(title or "View pairs: shared information vs downstream accuracy\n"
                          "dot: both views' features; grey bar: each view alone", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
