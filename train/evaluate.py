"""python -m train.evaluate: frozen-feature evaluation of a run (our protocol; see the notes on the paper's).

- weighted kNN (k=200, tau=0.07; Wu et al. 2018) on the L2-normalised embeddings,
- linear probe: multinomial logistic regression (AdamW, 30 epochs, cosine schedule, no augmentation) on
  standardised frozen features, per view and for all views concatenated, reported on the test split. The
  features are conv5 pooled to 6x6 for AlexNet (the layer of the CMC paper's AlexNet probe), the globally
  pooled last stage for ResNets and the last hidden layer for MLPs. The paper's probe differs: it trains
  with SGD for 60 epochs on random crops and flips, so its figures are not directly comparable to ours,
- cross-view retrieval recall@1/@10 (query in view i, gallery in view j, the same item is the positive),
- baselines under the same protocol: the same encoders at random initialisation (--random-init; reported
  with default batch-norm statistics and with statistics re-estimated on unlabelled training images) and
  raw pixels (--pixels).

Items without a label (y = -1, e.g. paired items missing from labels.csv) take part in pretraining but not
in the labelled metrics: they are left out here, and the count is logged.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.data import DataError, Dataset
from models.encoders import CMCModel, source_key
from models.views import ViewError, spec_from_dict
from .config import ConfigError, from_dict
from .pipeline import DeviceData

LOG = logging.getLogger(__name__)


def load_run(run: str | Path, device="cpu", random_init: bool = False) -> tuple[CMCModel, dict]:
    """The trained model of a run directory (or a checkpoint file) and its checkpoint dict."""
    p = Path(run)
    path = p / "checkpoint.pt" if p.is_dir() else p
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = from_dict(state["config"])
    specs = [spec_from_dict(d) for d in state["views"]]
    from .pretrain import build_model  # the same layers as training built (MLP depth, dropout), seeded
    model = build_model(replace(cfg, seed=cfg.seed + (9_999 if random_init else 0)), specs, state["image_size"])
    sd = state["model"]
    if random_init:  # keep the vector standardisation statistics, which are data, not learned weights
        sd = {k: v for k, v in sd.items() if ".transform." in k}
        model.load_state_dict(sd, strict=False)
    else:
        model.load_state_dict(sd)
    return model.to(device).eval(), state


@torch.no_grad()
def extract(model: CMCModel, ds: Dataset, device="cpu", batch_size: int = 256) -> dict[str, dict[str, Tensor]]:
    """{'embed': {view: (N, D)}, 'features': {view: (N, C)}} of a dataset, on the CPU."""
    model.eval()
    specs = list(model.specs.values())
    data = DeviceData(ds, specs, torch.device(device))
    emb: dict[str, list] = {s.name: [] for s in specs}
    feat: dict[str, list] = {s.name: [] for s in specs}
    for lo in range(0, len(ds), batch_size):
        b = data.batch(torch.arange(lo, min(lo + batch_size, len(ds))))
        for s in specs:
            m = model.views[s.name]
            f, z = m.encoder.probe(m.view_input(b[source_key(s)]))  # probe features (N, C), embedding (N, D)
            feat[s.name].append(f.cpu())
            emb[s.name].append(z.cpu())
    return {"embed": {k: torch.cat(v) for k, v in emb.items()}, "features": {k: torch.cat(v) for k, v in feat.items()}}


def sample(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """``n`` items of ``ds`` drawn at random (seeded, kept in file order), or all of them when ``n`` is 0 or
    at least ``len(ds)``. Never the first ``n``: files may be sorted by class (CIFAR-10's npz is)."""
    if n <= 0 or n >= len(ds):
        return ds
    return ds.subset(np.sort(np.random.default_rng(seed).permutation(len(ds))[:n]))


def labelled(ds: Dataset, what: str = "evaluation") -> Dataset:
    """The items of ``ds`` that have a label (y >= 0); DataError when there are none."""
    if ds.y is None:
        raise DataError(f"{what} needs labels ('y')")
    keep = ds.y >= 0
    if not keep.all():
        LOG.info("%s: leaving out %d unlabelled item(s) of %d", what, int((~keep).sum()), len(ds))
        ds = ds.subset(keep)
    if len(ds) == 0:
        raise DataError(f"{what} needs labelled items, and this split has none")
    return ds


@torch.no_grad()
def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``recalibrate_bn`` has anything to re-estimate (vector views' MLPs use LayerNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recalibrate_bn(model: CMCModel, ds: Dataset, device="cpu", n: int = 2048, batch_size: int = 256) -> CMCModel:
    """Re-estimate every batch-norm layer's running statistics on up to ``n`` (unlabelled) items of ``ds``,
    without augmentation (cumulative average over batches), and return the model in eval mode. A randomly
    initialised encoder's default statistics (mean 0, variance 1) mis-scale its features; this is the fair
    random-init baseline."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    data = DeviceData(ds, list(model.specs.values()), torch.device(device))
    stop = min(n, len(ds))
    for lo in range(0, stop, batch_size):
        hi = min(lo + batch_size, stop)
        if hi - lo >= 2 and bns:  # batch norm needs two samples
            model(data.batch(torch.arange(lo, hi)))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def knn_accuracy(train_z: Tensor, train_y: Tensor, test_z: Tensor, test_y: Tensor, k: int = 200,
                 tau: float = 0.07, n_classes: int | None = None) -> float:
    """Weighted kNN top-1 (Wu et al. 2018): neighbours vote with weight exp(cos / tau)."""
    c = int(n_classes or int(train_y.max()) + 1)
    train_z, test_z = F.normalize(train_z.float(), dim=1), F.normalize(test_z.float(), dim=1)
    k = min(k, train_z.shape[0])
    correct = 0
    for lo in range(0, test_z.shape[0], 512):
        sim = test_z[lo:lo + 512] @ train_z.t()  # (q, N)
        s, i = sim.topk(k, dim=1)
        votes = torch.zeros(s.shape[0], c).scatter_add_(1, train_y[i], (s / tau).exp())
        correct += int((votes.argmax(1) == test_y[lo:lo + 512]).sum())
    return correct / test_z.shape[0]


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, epochs: int = 30,
                 lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Multinomial logistic regression on standardised frozen features, fixed epochs; test top-1."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mu) / sd, (test_x - mu) / sd
    c = int(max(train_y.max(), test_y.max())) + 1
    torch.manual_seed(seed)
    clf = torch.nn.Linear(xtr.shape[1], c)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    n = xtr.shape[0]
    steps = epochs * ((n + 255) // 256)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for lo in range(0, n, 256):
            i = perm[lo:lo + 256]
            loss = F.cross_entropy(clf(xtr[i]), train_y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return float((clf(xte).argmax(1) == test_y).float().mean())


def cross_view_recall(q: Tensor, g: Tensor, ks=(1, 10)) -> dict[str, float]:
    """Item n of view i queries the gallery of view j; the positive is item n."""
    q, g = F.normalize(q.float(), dim=1), F.normalize(g.float(), dim=1)
    hits = {k: 0 for k in ks}
    for lo in range(0, q.shape[0], 1024):
        top = (q[lo:lo + 1024] @ g.t()).topk(max(ks), dim=1).indices  # (q, kmax)
        target = torch.arange(lo, lo + top.shape[0])[:, None]
        for k in ks:
            hits[k] += int((top[:, :k] == target).any(1).sum())
    return {f"R@{k}": hits[k] / q.shape[0] for k in ks}


def pixel_features(ds: Dataset) -> Tensor:
    """Raw-pixel baseline: the flattened source image (RGB, else depth) in [0, 1]."""
    key = "rgb" if "rgb" in ds.sources else "depth"
    x = torch.from_numpy(ds.sources[key].reshape(len(ds), -1).astype(np.float32))
    return x / (255.0 if key == "rgb" else 65535.0)


def evaluate(model: CMCModel, train: Dataset, test: Dataset, device="cpu", knn_k: int = 200, probe_epochs: int = 30,
             linear: bool = True, recall: bool = True) -> dict:
    """kNN and linear probe per view and for all views concatenated; cross-view recall for every ordered pair."""
    train, test = labelled(train, "evaluation (train split)"), labelled(test, "evaluation (test split)")
    ytr, yte = torch.from_numpy(train.y).long(), torch.from_numpy(test.y).long()
    ftr, fte = extract(model, train, device), extract(model, test, device)
    views = list(model.specs)
    res: dict = {"knn": {}, "linear": {}, "recall": {}}
    groups = {v: [v] for v in views}
    groups["+".join(views)] = views
    for name, vs in groups.items():
        ztr = torch.cat([ftr["embed"][v] for v in vs], 1)
        zte = torch.cat([fte["embed"][v] for v in vs], 1)
        res["knn"][name] = knn_accuracy(ztr, ytr, zte, yte, knn_k)
        if linear:
            xtr = torch.cat([ftr["features"][v] for v in vs], 1)
            xte = torch.cat([fte["features"][v] for v in vs], 1)
            res["linear"][name] = linear_probe(xtr, ytr, xte, yte, probe_epochs)
    if recall:
        for a in views:
            for b in views:
                if a != b:
                    res["recall"][f"{a}->{b}"] = cross_view_recall(fte["embed"][a], fte["embed"][b])
    return res


def evaluate_pixels(train: Dataset, test: Dataset, knn_k: int = 200, probe_epochs: int = 30) -> dict:
    train, test = labelled(train, "evaluation (train split)"), labelled(test, "evaluation (test split)")
    ytr, yte = torch.from_numpy(train.y).long(), torch.from_numpy(test.y).long()
    xtr, xte = pixel_features(train), pixel_features(test)
    return {"knn": {"pixels": knn_accuracy(xtr, ytr, xte, yte, knn_k)},
            "linear": {"pixels": linear_probe(xtr, ytr, xte, yte, probe_epochs)}, "recall": {}}


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
    from models import data as datasets
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
            from .viewpairs import view_pair_table
            pair_rows = view_pair_table(model, train, test, state["config"]["tau"], state["config"]["batch_size"],
                                        a.device, not a.no_linear, a.probe_epochs, a.knn_k,
                                        single=results["cmc"]["knn" if a.no_linear else "linear"])
    except (ConfigError, DataError, ViewError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if pair_rows:
        from .viewpairs import format_view_pairs
        print("\n" + format_view_pairs(pair_rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"model": str(a.model), "data": spec, "results": results,
                                            **({"view_pairs": pair_rows} if pair_rows else {})}, indent=2))
        print(f"wrote {a.json}")
    if a.plots:
        from .plots import plot_run
        for f in plot_run(a.model, model, test, a.plots):
            print(f"wrote {f}")
        if pair_rows:
            from .viewpairs import plot_view_pairs
            print(f"wrote {plot_view_pairs(pair_rows, Path(a.plots) / 'view_pairs.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
