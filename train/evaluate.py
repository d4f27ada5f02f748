"""python -m train.evaluate: frozen-feature evaluation of a run (kNN, linear probe, cross-view recall), the
command line over ``train.metrics``, which owns every number and states our protocol.

Beside the run itself it can evaluate baselines under the same protocol: the same encoders at random
initialisation (--random-init; reported with default batch-norm statistics and with statistics re-estimated
on unlabelled training images) and raw pixels (--pixels); and print the view-pair table (--view-pairs,
``train.viewpairs``). The paper's linear probe differs from ours: it trains with SGD for 60 epochs on random
crops and flips, so its figures are not directly comparable to ours.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from models import data as datasets
from models.data import DataError
from models.views import ViewError
from .config import ConfigError
from .metrics import evaluate, evaluate_pixels, sample
from .model import has_batch_norm, load_run, recalibrate_bn
from .plots import plot_run
from .viewpairs import format_view_pairs, plot_view_pairs, view_pair_table


def format_table(results: dict[str, dict]) -> str:
    """One row per (model, feature set): kNN and linear top-1 in percent; then cross-view recall."""
    lines = [f"{'model':<14} {'features':<16} {'kNN top-1':>10} {'linear top-1':>13}", "-" * 56]
    for model, r in results.items():
        for feat in r["knn"]:
            lin = r["linear"].get(feat)
            lines.append(f"{model:<14} {feat:<16} {100 * r['knn'][feat]:>9.1f}% "
                         f"{'' if lin is None else f'{100 * lin:>12.1f}%'}")
    rec = [(m, p, v) for m, r in results.items() for p, v in r.get("recall", {}).items()]
    if rec:
        lines += ["", f"{'model':<14} {'query->gallery':<16} {'R@1':>7} {'R@10':>7}", "-" * 47]
        lines += [f"{m:<14} {p:<16} {100 * v['R@1']:>6.1f}% {100 * v['R@10']:>6.1f}%" for m, p, v in rec]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run directory (or checkpoint.pt) of train.pretrain")
    p.add_argument("--data", default=None, help="data spec (default: the run's)")
    p.add_argument("--random-init", action="store_true", help="also evaluate the same encoders at random initialisation "
                   "(with default batch-norm statistics, and re-estimated on unlabelled training images)")
    p.add_argument("--pixels", action="store_true", help="also evaluate raw pixels")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--probe-epochs", type=int, default=30)
    p.add_argument("--limit-train", type=int, default=0, help="use N training items, drawn at random (seeded; 0 = all)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plots", default=None, help="write training curves and a retrieval grid (PNG) here")
    p.add_argument("--view-pairs", action="store_true", help="also print the view-pair table (train/viewpairs.py): "
                   "MI bound, cross-view recall and accuracy for every pair of views; with --plots, MI vs accuracy")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, state = load_run(a.model, a.device)
        spec = a.data or state["config"]["data"]
        size = state["image_size"]
        train = datasets.load(spec, "train", image_size=size, progress=True)
        test = datasets.load(spec, "test", image_size=size, progress=True)
        train = sample(train, a.limit_train)
        results = {"cmc": evaluate(model, train, test, a.device, a.knn_k, a.probe_epochs, not a.no_linear)}
        if a.random_init:
            rnd, _ = load_run(a.model, a.device, random_init=True)
            results["random-init"] = evaluate(rnd, train, test, a.device, a.knn_k, a.probe_epochs, not a.no_linear)
            if has_batch_norm(rnd):  # unlabelled images: the labels are not used
                rnd = recalibrate_bn(rnd, train, a.device)
                results["random-init-bn"] = evaluate(rnd, train, test, a.device, a.knn_k, a.probe_epochs,
                                                     not a.no_linear)
            else:  # nothing to re-estimate: the same model, the same numbers
                results["random-init-bn"] = results["random-init"]
        if a.pixels:
            results["pixels"] = evaluate_pixels(train, test, a.knn_k, a.probe_epochs)
        pair_rows = None
        if a.view_pairs:  # the k of the MI bound is the training batch (in-batch negatives), at the training tau
            pair_rows = view_pair_table(model, train, test, state["config"]["tau"], state["config"]["batch_size"],
                                        a.device, not a.no_linear, a.probe_epochs, a.knn_k,
                                        single=results["cmc"]["knn" if a.no_linear else "linear"])
    except (ConfigError, DataError, ViewError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if pair_rows:
        print("\n" + format_view_pairs(pair_rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"model": str(a.model), "data": spec, "results": results,
                                            **({"view_pairs": pair_rows} if pair_rows else {})}, indent=2))
        print(f"wrote {a.json}")
    if a.plots:
        for f in plot_run(a.model, model, test, a.plots):
            print(f"wrote {f}")
        if pair_rows:
            print(f"wrote {plot_view_pairs(pair_rows, Path(a.plots) / 'view_pairs.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
