"""Tables (stdout) and plots (PNG) of train.experiments: rows -> mean and spread over seeds.

The spread is the sample standard deviation over seeds (numpy's std with ddof = 1; 0 for one seed); the
minimum and the maximum are kept beside it (``aggregate``)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def aggregate(rows: list[dict], keys: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """Group rows by ``keys`` (in first-seen order): per metric the mean, the sample standard deviation over the
    group's seeds (``_std``, ddof 1; 0 for one seed), the
    minimum and maximum (``_min``, ``_max``), and the seed count ``n``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    out = []
    for key, rs in groups.items():
        g = dict(zip(keys, key), n=len(rs))
        for m in metrics:
            v = np.array([r[m] for r in rs], dtype=float)
            std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            g[m], g[m + "_std"] = float(v.mean()), std
            g[m + "_min"], g[m + "_max"] = float(v.min()), float(v.max())
        out.append(g)
    return out


def _pct(g: dict, m: str) -> str:
    return f"{100 * g[m]:5.1f} ±{100 * g[m + '_std']:4.1f}"


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
    lines = [f"views: held-out top-1 (%), mean ± std over seeds ({_budget(b)})",
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
                ax.errorbar([g["n_views"] for g in gs], [100 * g[m] for g in gs], [100 * g[m + "_std"] for g in gs],
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
    lines = [f"predictive: L encoder, held-out top-1 (%) on its penultimate features, mean ± std over seeds "
             f"({_budget(b)})", f"{'method':<28} {'linear':>13} {'kNN':>13}"]
    lines.append("-" * len(lines[-1]))
    for g in aggregate(rows, ("method",), ("linear_top1", "knn_top1")):
        lines.append(f"{g['method']:<28} {_pct(g, 'linear_top1'):>13} {_pct(g, 'knn_top1'):>13}")
    return "\n".join(lines)


def predictive_plot(rows: list[dict], out: Path, b) -> Path:
    agg = aggregate(rows, ("method",), ("linear_top1", "knn_top1"))
    x = np.arange(len(agg))
    fig, ax = plt.subplots(figsize=(10, 4.4))
    for off, metric, name, colour in ((-0.2, "linear_top1", "linear probe", "tab:blue"),
                                      (0.2, "knn_top1", "kNN", "tab:green")):
        ys = [100 * g[metric] for g in agg]
        ax.bar(x + off, ys, 0.4, yerr=[100 * g[metric + "_std"] for g in agg], capsize=3, color=colour, label=name)
        for xi, y in zip(x + off, ys):
            ax.text(xi, y + 0.5, f"{y:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [g["method"].replace("_", "\n", 1) for g in agg], fontsize=8)
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
             f"log(k) - L on held-out pairs (nats, k = {r0['k']}, log k = {r0['log_k']:.2f}); mean ± std over seeds "
             f"({_budget(b)})", f"{'positions':<10} {'d (px)':>7} {'anchors':>8} {'MI bound':>14} {'linear top-1':>14} "
                                f"{'kNN top-1':>13}"]
    lines.append("-" * len(lines[-1]))
    for g in aggregate(rows, ("positions", "distance", "anchor_positions"), ("mi_bound", "linear_top1", "knn_top1")):
        lines.append(f"{g['positions']:<10} {g['distance']:>7} {g['anchor_positions']:>8} {g['mi_bound']:>7.3f} "
                     f"±{g['mi_bound_std']:5.3f} {_pct(g, 'linear_top1'):>14} {_pct(g, 'knn_top1'):>13}")
    return "\n".join(lines)


SCHEME_STYLE = {"fixed": ("-", "o", "the same anchor positions at every d"),
                "shrinking": (":", "x", "anchor positions shrink with d")}


def patches_plot(rows: list[dict], out: Path, b) -> Path:
    r0 = rows[0]
    size, patch = r0["image_size"], r0["patch"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    ds = set()
    for scheme in dict.fromkeys(r["positions"] for r in rows):
        ls, mk, label = SCHEME_STYLE.get(scheme, ("-", "o", scheme))
        agg = sorted(aggregate([r for r in rows if r["positions"] == scheme], ("distance",),
                               ("mi_bound", "linear_top1", "knn_top1")), key=lambda g: g["distance"])
        d = [g["distance"] for g in agg]
        ds |= set(d)
        ax.errorbar(d, [g["mi_bound"] for g in agg], [g["mi_bound_std"] for g in agg], ls=ls, marker=mk,
                    color="tab:blue", capsize=3, label=f"{scheme}: {label}")
        ax2.errorbar(d, [100 * g["linear_top1"] for g in agg], [100 * g["linear_top1_std"] for g in agg], ls=ls,
                     marker=mk, color="tab:red", capsize=3, label=f"{scheme}, linear probe")
        ax2.plot(d, [100 * g["knn_top1"] for g in agg], ls=ls, marker=mk, color="tab:red", alpha=0.4,
                 label=f"{scheme}, kNN")
    ax.axhline(r0["log_k"], color="0.5", ls=":", lw=1)
    ax.text(min(ds), r0["log_k"], f"log k = {r0['log_k']:.2f} (the bound's ceiling)", fontsize=7, va="bottom")
    ax.set_ylabel("MI lower bound log(k) - L (nats)")
    ax2.set_ylabel("held-out top-1 of the patch encoder (%)")
    for a in (ax, ax2):
        a.set_xlabel(f"offset d (px along the diagonal; {patch}px patches, {size}px image)")
        a.set_xticks(sorted(ds))
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"Two patches of one image as the views: shared information vs downstream accuracy\n"
                 f"({_budget(b)})", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


# ----------------------------------------------------------------------------------------------- negatives
def negatives_table(rows: list[dict], b) -> str:
    lines = [f"negatives: held-out MI bound log(k) - L at the row's k (nats; negatives drawn from training "
             f"embeddings) and L-encoder top-1 (%), mean ± std over seeds ({_budget(b)})",
             f"{'negatives':<10} {'k':>6} {'log k':>6} {'MI bound':>14} {'linear top-1':>14} {'kNN top-1':>13}"]
    lines.append("-" * len(lines[-1]))
    for g in aggregate(rows, ("negatives", "k"), ("mi_bound", "log_k", "linear_top1", "knn_top1")):
        lines.append(f"{g['negatives']:<10} {g['k']:>6} {g['log_k']:>6.2f} {g['mi_bound']:>7.3f} ±{g['mi_bound_std']:5.3f}"
                     f" {_pct(g, 'linear_top1'):>14} {_pct(g, 'knn_top1'):>13}")
    return "\n".join(lines)


def negatives_plot(rows: list[dict], out: Path, b) -> Path:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    for kind, colour in (("memory", "tab:blue"), ("batch", "tab:orange")):
        agg = sorted(aggregate([r for r in rows if r["negatives"] == kind], ("k",),
                               ("mi_bound", "linear_top1", "knn_top1")), key=lambda g: g["k"])
        if not agg:
            continue
        k = [g["k"] for g in agg]
        name = "memory bank (k - 1 bank negatives)" if kind == "memory" else "in-batch (batch = k)"
        ax.errorbar(k, [g["mi_bound"] for g in agg], [g["mi_bound_std"] for g in agg], fmt="-o", color=colour,
                    capsize=3, label=name)
        ax2.errorbar(k, [100 * g["linear_top1"] for g in agg], [100 * g["linear_top1_std"] for g in agg], fmt="-o",
                     color=colour, capsize=3, label=f"{name}, linear")
        ax2.plot(k, [100 * g["knn_top1"] for g in agg], "--s", color=colour, alpha=0.5, label=f"{name}, kNN")
    ks = sorted({r["k"] for r in rows})
    ax.plot(ks, [float(np.log(k)) for k in ks], ":", color="0.5", label="log k (the ceiling)")
    ax.set_ylabel("held-out MI bound log(k) - L (nats)")
    ax2.set_ylabel("held-out top-1 of the L encoder (%)")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("k (negatives + 1)")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"How the number of negatives moves the bound and the accuracy ({_budget(b)})", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


PLOTS = {"views": views_plot, "predictive": predictive_plot, "patches": patches_plot, "negatives": negatives_plot}
TABLES = {"views": views_table, "predictive": predictive_table, "patches": patches_table,
          "negatives": negatives_table}
