"""Recall@k against single-query QPS for the rows of ``python -m index.bench`` (matplotlib, headless).

    python -m index.bench_plot docs/img/index_bench_real.png docs/results/index_bench_real.json [MORE.json ...]

Each candidate is a point labelled with its type; ``auto`` rows (the memory-budget choice) are drawn as stars,
the exact index as a square; the target recall is a dashed line. QPS is on a log axis.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_recall_qps(rows: list[dict], out: str | Path, *, k: int = 10, target: float = 0.95,
                    title: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in rows:
        rec, qps, t = r[f"recall@{k}"], r["qps_batch1"], r["type"]
        auto = t.startswith("auto")
        marker, colour = ("*", "tab:red") if auto else ("s", "black") if t == "flat" else ("o", "tab:blue")
        ax.scatter([qps], [rec], marker=marker, s=180 if auto else 50, color=colour, zorder=3,
                   label="auto: what index.build chooses at the budget" if auto else None)
        label = f"{t}\n{r['factory']}" if auto else t
        ax.annotate(label, (qps, rec), textcoords="offset points", xytext=(6, 4 if not auto else -14), fontsize=7)
    ax.axhline(target, ls="--", color="grey", lw=1)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 10, 100, 1000: plain numbers
    ax.xaxis.set_minor_formatter(NullFormatter())  # no labels on the minor ticks (they overlap over one decade)
    ax.set_xlabel("single-query QPS (1 FAISS thread, log scale)")
    ax.set_ylabel(f"recall@{k} vs exact search")
    n = rows[0]["n"] if rows else 0
    ax.set_title(title or f"{n:,} real embeddings ({rows[0].get('data', '')}), dim {rows[0].get('dim', '')}"
                 if rows else "")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles[:1], labels[:1], loc="lower left", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """Plot the rows of one or more result files of the same data (a flat row present in several is drawn once)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m index.bench_plot OUT.(svg|png) RESULTS.json [MORE.json ...]", file=sys.stderr)
        return 2
    rows, seen = [], set()
    for p in argv[1:]:
        doc = json.loads(Path(p).read_text())
        for r in doc["results"]:
            if r["type"] not in seen:
                seen.add(r["type"])
                rows.append(r)
    args = doc.get("meta", {}).get("args", {})
    print(plot_recall_qps(rows, argv[0], k=int(args.get("k", 10)), target=float(args.get("target_recall", 0.95))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
