"""Every number measured on frozen encoders, one implementation each: embeddings and probe features of a
dataset, weighted kNN, the linear probe, cross-view recall, the MI bound log(k) - L, and the evaluation
table they make up (our protocol; ``train.evaluate`` is its command line, which notes the paper's).

- weighted kNN (k=200, tau=0.07; Wu et al. 2018) on the L2-normalised embeddings,
- linear probe: multinomial logistic regression (AdamW, 30 epochs, cosine schedule, no augmentation) on
  standardised frozen features, per view and for all views concatenated, reported on the test split. The
  features are conv5 pooled to 6x6 for AlexNet (the layer of the CMC paper's AlexNet probe), the globally
  pooled last stage for ResNets and the last hidden layer for MLPs,
- cross-view retrieval recall@k (query in view i, gallery in view j, the same item is the positive),
- the contrastive lower bound log(k) - L on the mutual information of two views' embeddings.

Items without a label (y = -1, e.g. paired items missing from labels.csv) take part in pretraining but not
in the labelled metrics: they are left out, and the count is logged.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.data import DataError, Dataset
from models.encoders import CMCModel
from .losses import cmc_loss
from .pipeline import DeviceData

LOG = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ frozen outputs
@torch.no_grad()
def extract(model: CMCModel, ds: Dataset, device="cpu", batch_size: int = 256,
            features: bool = True) -> dict[str, dict[str, Tensor]]:
    """{'embed': {view: (N, D)}, 'features': {view: (N, C)}} of a dataset in eval mode, fp32 on the CPU
    (without 'features' when ``features`` is False). The model's train/eval mode is restored afterwards."""
    specs = list(model.specs.values())
    data = DeviceData(ds, specs, torch.device(device))
    was_training = model.training
    model.eval()
    emb: dict[str, list[Tensor]] = {s.name: [] for s in specs}
    feat: dict[str, list[Tensor]] = {s.name: [] for s in specs}
    for lo in range(0, len(ds), batch_size):
        b = data.batch(torch.arange(lo, min(lo + batch_size, len(ds))))
        for s in specs:
            m = model.views[s.name]
            f, z = m.encoder.probe(m.view_input(b[s.source_key]))  # probe features (N, C), embedding (N, D)
            emb[s.name].append(z.float().cpu())
            if features:
                feat[s.name].append(f.float().cpu())
    model.train(was_training)
    out = {"embed": {k: torch.cat(v) for k, v in emb.items()}}
    if features:
        out["features"] = {k: torch.cat(v) for k, v in feat.items()}
    return out


def embed_all(model: CMCModel, ds: Dataset, device, batch_size: int = 512) -> dict[str, Tensor]:
    """{view: (N, D)} embeddings of ``ds`` (``extract`` without the probe features)."""
    return extract(model, ds, device, batch_size, features=False)["embed"]


def sample(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """``n`` items of ``ds`` drawn at random (seeded, kept in file order), or all of them when ``n`` is 0 or
    at least ``len(ds)``. Never the first ``n``: files may be sorted by class (CIFAR-10's npz is)."""
    return ds.sample(n, seed)


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


def pixel_features(ds: Dataset) -> Tensor:
    """Raw-pixel baseline: the flattened source image (RGB, else depth) in [0, 1]."""
    key = "rgb" if "rgb" in ds.sources else "depth"
    x = torch.from_numpy(ds.sources[key].reshape(len(ds), -1).astype(np.float32))
    return x / (255.0 if key == "rgb" else 65535.0)


# ------------------------------------------------------------------------------------------ classification
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


def top1(ftr: dict, fte: dict, ytr: Tensor, yte: Tensor, views: list[str], linear: bool = True,
         probe_epochs: int = 30, knn_k: int = 200) -> float:
    """Test top-1 of ``views`` together (their outputs concatenated), from ``extract`` results of the train and
    test items: the linear probe on probe features, or (``linear=False``) weighted kNN on embeddings."""
    key = "features" if linear else "embed"
    xtr = torch.cat([ftr[key][v] for v in views], 1)
    xte = torch.cat([fte[key][v] for v in views], 1)
    return linear_probe(xtr, ytr, xte, yte, probe_epochs) if linear else knn_accuracy(xtr, ytr, xte, yte, knn_k)


# ------------------------------------------------------------------------------------------ across views
def cross_view_recall(q: Tensor, g: Tensor, ks=(1, 10)) -> dict[str, float]:
    """Item n of view i queries the gallery of view j (q, g: (N, D)); the positive is item n. R@k: the share
    of queries whose positive ranks among the first k by cosine, equal scores ranked by gallery index (so
    R@1 is ``argmax == n``)."""
    q, g = F.normalize(q.float(), dim=1), F.normalize(g.float(), dim=1)
    hits = {k: 0 for k in ks}
    col = torch.arange(g.shape[0])[None, :]  # (1, N)
    for lo in range(0, q.shape[0], 1024):
        s = q[lo:lo + 1024] @ g.t()  # (q, N)
        target = torch.arange(lo, lo + s.shape[0])[:, None]  # (q, 1)
        pos = s.gather(1, target)  # (q, 1): each query's positive
        ahead = ((s > pos) | ((s == pos) & (col < target))).sum(1)  # (q,): items ranked before the positive
        for k in ks:
            hits[k] += int((ahead < k).sum())
    return {f"R@{k}": hits[k] / q.shape[0] for k in ks}


def recall_at_1(q: Tensor, g: Tensor) -> float:
    """``cross_view_recall``'s R@1 alone."""
    return cross_view_recall(q, g, (1,))["R@1"]


def mean_cross_view_recall(z: dict[str, Tensor]) -> tuple[float, dict[str, float]]:
    """Mean recall@1 over every ordered pair of views, and per pair 'a->b'."""
    per = {f"{a}->{b}": recall_at_1(z[a], z[b]) for a in z for b in z if a != b}
    return sum(per.values()) / max(1, len(per)), per


def mi_bound(za: Tensor, zb: Tensor, k: int, tau: float, seed: int = 0) -> float:
    """Mean over batches of k rows of log(k) - L(a, b)/2 (CMC eq. 6, both directions), where za, zb are (N, D)
    unit-norm embeddings of the same N items. The rows are shuffled first (seeded), so that a batch's negatives
    come from the marginal distribution, not from one class of a class-sorted file; the last incomplete batch is
    dropped so that k is fixed."""
    n = za.shape[0]
    if n < k or k < 2:
        raise DataError(f"the MI bound needs k >= 2 and at least k held-out items (k = {k}, items = {n})")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    za, zb = za[order.to(za.device)], zb[order.to(zb.device)]
    bounds = []
    for lo in range(0, n - k + 1, k):
        _, stats = cmc_loss({"a": za[lo:lo + k].float(), "b": zb[lo:lo + k].float()}, tau, "full")
        bounds.append(float(stats["mi/a~b"]))
    return float(np.mean(bounds))


# ------------------------------------------------------------------------------------------ the table
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
        res["knn"][name] = top1(ftr, fte, ytr, yte, vs, linear=False, knn_k=knn_k)
        if linear:
            res["linear"][name] = top1(ftr, fte, ytr, yte, vs, linear=True, probe_epochs=probe_epochs)
    if recall:
        for a in views:
            for b in views:
                if a != b:
                    res["recall"][f"{a}->{b}"] = cross_view_recall(fte["embed"][a], fte["embed"][b])
    return res


def evaluate_pixels(train: Dataset, test: Dataset, knn_k: int = 200, probe_epochs: int = 30) -> dict:
    """The raw-pixel baseline under the same kNN and linear probe."""
    train, test = labelled(train, "evaluation (train split)"), labelled(test, "evaluation (test split)")
    ytr, yte = torch.from_numpy(train.y).long(), torch.from_numpy(test.y).long()
    xtr, xte = pixel_features(train), pixel_features(test)
    return {"knn": {"pixels": knn_accuracy(xtr, ytr, xte, yte, knn_k)},
            "linear": {"pixels": linear_probe(xtr, ytr, xte, yte, probe_epochs)}, "recall": {}}
