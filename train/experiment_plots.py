"""Tables (stdout) and plots (PNG) of train.experiments: rows -> mean and spread over seeds.

The spread is half the range over seeds (with two seeds: the distance of either seed from the mean)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def aggregate(rows: list[dict], keys: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """Group rows by ``keys`` (in first-seen order): per metric the mean, the half range and the seed count."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    out = []
    for key, rs in groups.items():
        g = dict(zip(keys, key), n=len(rs))
        for m in metrics:
            v = np.array([r[m] for r in rs], dtype=float)
            g[m], g[m + "_spread"] = float(v.mean()), float((v.max() - v.min()) / 2)
        out.append(g)
    return out


def _pct(g: dict, m: str) -> str:
    return f"{100 * g[m]:5.1f} ±{100 * g[m + '_spread']:4.1f}"


def _budget(b) -> str:
    return f"{b.data}, {b.steps} steps x batch {b.batch_size}, seeds {','.join(map(str, b.seeds))}"


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------- views
VIEW_METRICS = ("linear_top1", "knn_top1", "concat_linear_top1", "concat_knn_top1")


def views_table(rows: list[dict], b) -> str:
    lines = [f"views: held-out top-1 (%), mean ± half range over seeds ({_budget(b)})",
             f"{'views':<20} {'graph':<6} {'L linear':>13} {'L kNN':>13} {'concat linear':>14} {'concat kNN':>13}"]
    lines.append("-" * len(lines[-1]))
    for g in aggregate(rows, ("n_views", "graph"), VIEW_METRICS):
        views = next(r["views"] for r in rows if r["n_views"] == g["n_views"])
        lines.append(f"{','.join(views):<20} {g['graph']:<6} {_pct(g, 'linear_top1'):>13} {_pct(g, 'knn_top1'):>13} "
                     f"{_pct(g, 'concat_linear_top1'):>14} {_pct(g, 'concat_knn_top1'):>13}")
    return "\n".join(lines)


def views_plot(rows: list[dict], out: Path, b) -> Path:
    agg = aggregate(rows, ("n_views", "graph"), VIEW_METRICS)
    ns = sorted({g["n_views"] for g in agg})
    labels = {n: "+".join(next(r["views"] for r in rows if r["n_views"] == n)) for n in ns}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, prefix, title in ((axes[0], "", "L encoder alone"), (axes[1], "concat_", "all views' encoders concatenated")):
        for graph, colour in (("core", "tab:blue"), ("full", "tab:orange")):
            gs = sorted((g for g in agg if g["graph"] == graph), key=lambda g: g["n_views"])
            for metric, style, name in (("linear_top1", "-o", "linear probe"), ("knn_top1", "--s", "kNN")):
                m = prefix + metric
                ax.errorbar([g["n_views"] for g in gs], [100 * g[m] for g in gs], [100 * g[m + "_spread"] for g in gs],
                            fmt=style, color=colour, capsize=3, label=f"{'L_C core' if graph == 'core' else 'L_F full'}"
                                                                      f" graph, {name}")
        ax.set_xticks(ns, [f"{n} views\n{labels[n]}" for n in ns], fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out top-1 accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Does adding views improve the representation? ({_budget(b)})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------- predictive
def predictive_table(rows: list[dict], b) -> str:
    lines = [f"predictive: L encoder, held-out top-1 (%) on its penultimate features, mean ± half range "
             f"({_budget(b)})", f"{'method':<28} {'linear':>13} {'kNN':>13}"]
    lines.append("-" * len(lines[-1]))
    for g in aggregate(rows, ("method",), ("linear_top1", "knn_top1")):
        lines.append(f"{g['method']:<28} {_pct(g, 'linear_top1'):>13} {_pct(g, 'knn_top1'):>13}")
    return "\n".join(lines)


def predictive_plot(rows: list[dict], out: Path, b) -> Path:
    agg = aggregate(rows, ("method",), ("linear_top1", "knn_top1"))
    x = np.arange(len(agg))
    fig, ax = plt.subplots(figsize=(8, 4.4))
    for off, metric, name, colour in ((-0.2, "linear_top1", "linear probe", "tab:blue"),
                                      (0.2, "knn_top1", "kNN", "tab:green")):
        ys = [100 * g[metric] for g in agg]
        ax.bar(x + off, ys, 0.4, yerr=[100 * g[metric + "_spread"] for g in agg], capsize=3, color=colour, label=name)
        for xi, y in zip(x + off, ys):
            ax.text(xi, y + 0.5, f"{y:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [g["method"].replace("-", "\n", 1) for g in agg], fontsize=9)
    ax.set_ylabel("held-out top-1 of the L encoder (%)")
    ax.set_title(f"Contrastive (L<->ab) vs predictive (L->ab) learning, same L encoder and steps\n({_budget(b)})",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


# ------------------------------------------------------------------------------------------------- patches
def patches_table(rows: list[dict], b) -> str:
    r0 = rows[0]
    lines = [f"patches: {r0['patch']}px patches of {r0['image_size']}px images at (x, y) and (x+d, y+d); MI bound "
             f"log(k) - L on held-out pairs (nats, k = {r0['k']}, log k = {r0['log_k']:.2f}); mean ± half range "
             f"({_budget(b)})", f"{'d (px)':>7} {'MI bound':>14} {'linear top-1':>14} {'kNN top-1':>13}"]
    lines.append("-" * len(lines[-1]))
    for g in aggregate(rows, ("distance",), ("mi_bound", "linear_top1", "knn_top1")):
        lines.append(f"{g['distance']:>7} {g['mi_bound']:>7.3f} ±{g['mi_bound_spread']:5.3f} "
                     f"{_pct(g, 'linear_top1'):>14} {_pct(g, 'knn_top1'):>13}")
    return "\n".join(lines)


def patches_plot(rows: list[dict], out: Path, b) -> Path:
    agg = sorted(aggregate(rows, ("distance",), ("mi_bound", "linear_top1", "knn_top1")), key=lambda g: g["distance"])
    r0 = rows[0]
    size, patch = r0["image_size"], r0["patch"]
    d = [g["distance"] for g in agg]
    fig = plt.figure(figsize=(8, 5.6))
    ax = fig.add_axes((0.1, 0.1, 0.78, 0.6))
    ax.errorbar(d, [g["mi_bound"] for g in agg], [g["mi_bound_spread"] for g in agg], fmt="-o", color="tab:blue",
                capsize=3)
    ax.axhline(r0["log_k"], color="tab:blue", ls=":", lw=1)
    ax.text(d[0], r0["log_k"], f"log k = {r0['log_k']:.2f} (the bound's ceiling)", color="tab:blue", fontsize=7,
            va="bottom")
    ax.set_xlabel(f"offset d between the two {patch}px patches (pixels along the diagonal of a {size}px image)")
    ax.set_ylabel("MI lower bound log(k) - L (nats)", color="tab:blue")
    ax.tick_params(axis="y", colors="tab:blue")
    ax2 = ax.twinx()
    ax2.errorbar(d, [100 * g["linear_top1"] for g in agg], [100 * g["linear_top1_spread"] for g in agg], fmt="-s",
                 color="tab:red", capsize=3, label="linear probe")
    ax2.plot(d, [100 * g["knn_top1"] for g in agg], "--^", color="tab:red", alpha=0.5, label="kNN")
    ax2.set_ylabel("held-out top-1 of the patch encoder (%)", color="tab:red")
    ax2.tick_params(axis="y", colors="tab:red")
    ax2.legend(loc="center right", fontsize=8)
    ax.set_xticks(d)
    ax.grid(alpha=0.3)
    # the two views at each offset, drawn above the axis: the image (grey) and both patches
    lo, hi = ax.get_xlim()
    for di in d:
        cx = 0.1 + 0.78 * (di - lo) / (hi - lo)
        ia = fig.add_axes((cx - 0.045, 0.72, 0.09, 0.09))
        ia.add_patch(mpatches.Rectangle((0, 0), size, size, color="0.85"))
        x0 = (size - patch - di) / 2  # a middle position, for the picture
        for (px, py), c, ls in (((x0 + di, x0 + di), "tab:olive", "-"), ((x0, x0), "tab:purple", "--")):
            ia.add_patch(mpatches.Rectangle((px, size - py - patch), patch, patch, fill=False, ec=c, lw=1.5, ls=ls))
        ia.set(xlim=(0, size), ylim=(0, size), xticks=[], yticks=[], aspect="equal")
        ia.set_title(f"d={di}", fontsize=7, pad=2)
    fig.suptitle(f"Two patches of one image as the views: shared information (blue) vs downstream accuracy (red)\n"
                 f"({_budget(b)})", fontsize=9, y=0.97)
    return _save(fig, out)


PLOTS = {"views": views_plot, "predictive": predictive_plot, "patches": patches_plot}
TABLES = {"views": views_table, "predictive": predictive_table, "patches": patches_table}
