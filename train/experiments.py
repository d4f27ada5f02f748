"""python -m train.experiments NAME [--quick] [--data SPEC] [--out DIR] [--seeds S ...]: the CMC analyses
(their budgets, runs and cached rows; training is ``train.pretrain.train``, every number ``train.metrics``).

- ``views``: more views, better representations? L plus ab, depth, normals (2, 3, 4 views, L first) under the
  core-view (L_C) and full-graph (L_F) objectives at an equal budget of optimiser steps; held-out linear and
  kNN top-1 of the L encoder and of all views' encoders concatenated.
- ``predictive``: contrastive L<->ab against predicting ab from L with the same L encoder (regression, and
  per-pixel classification over quantised ab bins; ``train.predictive``) at the same budget, and the L
  encoder at random initialisation.
- ``patches``: two patches of one image at diagonal offsets d as the views (``train.patches``): the MI
  bound log(k) - L on held-out pairs at a fixed k, and the patch encoder's linear top-1, for each d.

Every training run goes through ``train.pretrain.train`` and every evaluation through ``train.metrics``.
Each command writes DIR/NAME.json (one row per configuration and seed), DIR/NAME.png and prints a table;
finished runs are cached in DIR/runs/NAME/<run>/row.json and reused when their config is unchanged.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from models.data import DataError, Dataset
from models.encoders import CMCModel
from models.views import BUILTIN, ViewError, parse_views
from .config import Config, ConfigError
from .distributed import resolve_device
from .experiment_plots import PLOTS, TABLES
from . import mi_check
from .metrics import evaluate, sample
from .model import build_model, recalibrate_bn
from .patches import distances, mi_bound, patch_loss, patch_model
from .predictive import PredictiveModel, predictive_loss
from .pretrain import TrainingError, train
from .setup import prepare

LOG = logging.getLogger(__name__)

NAMES = ("views", "predictive", "patches")
CIFAR = "cifar10:../shared/data/cifar10.npz"


@dataclass(frozen=True)
class Budget:
    data: str  # data spec
    steps: int  # optimiser steps of every training run (the equal budget)
    batch_size: int  # batch (and the k of the MI bounds: in-batch negatives)
    limit: int  # training items used for pretraining (0 = all)
    eval_train: int  # training items the linear probe and the kNN gallery use (0 = all)
    eval_test: int  # held-out items evaluated (0 = all)
    probe_epochs: int  # linear-probe epochs
    seeds: tuple[int, ...]  # seeds of every configuration (the spread is over these)


# The default budgets each fit about an hour of 2 CPU cores (both seeds); --quick runs the whole pipeline in a few
# minutes. Encoders: ResNet-10 at width 0.25 (the project's default), AdamW lr 2e-3, tau 0.07, in-batch negatives.
BUDGETS: dict[str, dict[str, Budget]] = {
    "views": {"full": Budget("scenes", 300, 128, 0, 5000, 0, 30, (0, 1)),
              "quick": Budget("scenes:n=512,size=32,seed=0,test_n=256", 30, 32, 0, 0, 0, 10, (0,))},
    "predictive": {"full": Budget(CIFAR, 1000, 128, 0, 10000, 0, 30, (0, 1)),
                   "quick": Budget("scenes:n=512,size=32,seed=0,test_n=256", 30, 32, 0, 0, 0, 10, (0,))},
    "patches": {"full": Budget(CIFAR, 1500, 128, 0, 10000, 0, 30, (0, 1)),
                "quick": Budget("scenes:n=512,size=32,seed=0,test_n=256", 30, 32, 0, 0, 0, 10, (0,))},
}
BASE = Config(arch="resnet10", width=0.25, feat_dim=128, tau=0.07, graph="full", negatives="batch", optimizer="adamw",
              lr=2e-3, export=False, index=False, evaluate=False)


@dataclass
class Context:
    name: str
    budget: Budget
    out: Path
    device: torch.device
    base: Config
    fresh: bool = False
    patch: int = 0  # patches: patch size (0 = half the image)
    n_distances: int = 5  # patches: number of offsets

    def config(self, run: str, seed: int, n_train: int, **kw) -> Config:
        """The training config of one run: the equal step budget, cosine decay over exactly those steps."""
        b = self.budget
        epochs = max(1, math.ceil(b.steps / max(1, n_train // b.batch_size)))
        return replace(self.base, data=b.data, batch_size=b.batch_size, max_steps=b.steps, epochs=epochs, seed=seed,
                       warmup_steps=min(self.base.warmup_steps, max(1, b.steps // 10)),
                       out=str(self.out / "runs" / self.name / f"{run}_s{seed}"), device=str(self.device), **kw
                       ).validate()

    def cached(self, cfg: Config, compute) -> dict:
        """The row of a finished run with this exact config, else ``compute()`` (and remember it)."""
        path = Path(cfg.out) / "row.json"
        budget = {k: v for k, v in asdict(self.budget).items() if k != "seeds"}  # a new seed keeps the others
        key = {"config": asdict(cfg), "budget": budget, "patch": self.patch}
        if path.is_file() and not self.fresh:
            saved = json.loads(path.read_text())
            if saved.get("key") == json.loads(json.dumps(key)):
                LOG.info("reusing %s", path)
                return saved["row"]
        row = compute()
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "row": row}, indent=1))
        return row


def load_data(ctx: Context, views: str) -> tuple[Dataset, Dataset, Dataset, list, int]:
    """(pretraining set, probe/gallery training set, held-out set, view specs, image size) of the budget."""
    b = ctx.budget
    cfg = replace(ctx.base, data=b.data, views=views, limit=b.limit).validate()
    ds, test, specs, size = prepare(cfg, progress=True)
    if test is None or test.y is None or ds.y is None:
        raise DataError(f"data {b.data!r} needs labels and a held-out split for evaluation")
    ev, test = sample(ds, b.eval_train), sample(test, b.eval_test)  # random: CIFAR-10's files are sorted by class
    if len(ds) < b.batch_size or len(test) < b.batch_size:
        raise DataError(f"data {b.data!r} has {len(ds)} training / {len(test)} held-out items: fewer than one "
                        f"batch of {b.batch_size}")
    return ds, ev, test, specs, size


def scores(model: CMCModel, ev: Dataset, test: Dataset, ctx: Context) -> dict:
    return evaluate(model.to(ctx.device), ev, test, ctx.device, probe_epochs=ctx.budget.probe_epochs, recall=False)


def one_view(model: CMCModel, view: str, features: bool = False) -> CMCModel:
    """A copy of one view's encoder as a one-view model; ``features`` makes its embedding the (normalised)
    penultimate features, so that kNN reads the same layer for encoders trained without a head."""
    m = copy.deepcopy(model)
    for v in [v for v in m.specs if v != view]:
        del m.views[v]
        del m.specs[v]
    if features:
        m.views[view].encoder.head = nn.Identity()
    return m


# --------------------------------------------------------------------------------------------------- views
def run_views(ctx: Context) -> list[dict]:
    all_views = ["L", "ab", "depth", "normals"]
    ds, ev, test, _, size = load_data(ctx, ",".join(all_views))
    plan = [(n, g) for n in (2, 3, 4) for g in (("full",) if n == 2 else ("core", "full"))]
    rows = []
    for (n, graph), seed in tqdm([(p, s) for p in plan for s in ctx.budget.seeds], desc="views", unit="run"):
        views = all_views[:n]
        cfg = ctx.config(f"{n}views_{graph}", seed, len(ds), views=",".join(views), graph=graph)

        def compute() -> dict:
            model = train(cfg, ds, parse_views(cfg.views), size, ctx.device)
            r = scores(model, ev, test, ctx)
            cat = "+".join(views)
            return {"linear_top1": r["linear"]["L"], "knn_top1": r["knn"]["L"], "concat_linear_top1": r["linear"][cat],
                    "concat_knn_top1": r["knn"][cat], "per_view": {v: {"linear_top1": r["linear"][v],
                                                                      "knn_top1": r["knn"][v]} for v in views}}

        row = {"n_views": n, "graph": graph, "views": views, "seed": seed, "steps": ctx.budget.steps,
               **ctx.cached(cfg, compute)}
        rows.append(row)
        if n == 2:  # with two views the core view's only pair is the whole graph: L_C = L_F, one run
            rows.append(row | {"graph": "core", "same_run_as": "full"})
    return rows


# ---------------------------------------------------------------------------------------------- predictive
def run_predictive(ctx: Context) -> list[dict]:
    ds, ev, test, specs, size = load_data(ctx, "L,ab")
    methods = ["contrastive", "predictive-regression", "predictive-classification", "random-init", "random-init-bn"]
    rows = []
    for method, seed in tqdm([(m, s) for m in methods for s in ctx.budget.seeds], desc="predictive", unit="run"):
        cfg = ctx.config(method, seed, len(ds), views="L,ab")

        def compute() -> dict:
            if method == "contrastive":
                model = train(cfg, ds, specs, size, ctx.device)
            elif method.startswith("random-init"):  # the same L encoder at its initial weights (the contrastive
                model = build_model(cfg, specs, size)  # run's seed); -bn: batch-norm statistics re-estimated on ds
            else:
                torch.manual_seed(seed)
                pm = PredictiveModel(method.split("-")[1], cfg.arch, cfg.feat_dim, size, cfg.width)
                model = train(cfg, ds, specs, size, ctx.device, model=pm, loss_fn=predictive_loss).cmc
            m = one_view(model, "L", features=True)
            if method == "random-init-bn":
                m = recalibrate_bn(m, ds, ctx.device)
            r = scores(m, ev, test, ctx)
            return {"linear_top1": r["linear"]["L"], "knn_top1": r["knn"]["L"]}

        steps = 0 if method.startswith("random-init") else ctx.budget.steps
        rows.append({"method": method, "seed": seed, "steps": steps, **ctx.cached(cfg, compute)})
    return rows


# ------------------------------------------------------------------------------------------------- patches
def run_patches(ctx: Context) -> list[dict]:
    ds, ev, test, _, size = load_data(ctx, "L,ab")  # any rgb data; the views are the patches
    patch = ctx.patch or size // 2
    if not 8 <= patch < size:
        raise ConfigError(f"--patch must be in [8, {size - 1}] for {size}px images, not {patch}")
    specs = [BUILTIN["rgb"]]
    rows = []
    plan = [(d, s) for d in distances(size, patch, ctx.n_distances) for s in ctx.budget.seeds]
    for d, seed in tqdm(plan, desc="patches", unit="run"):
        # no zoom (crop_min 1): d stays d pixels of the image; flip (and a mild aspect jitter) only
        cfg = ctx.config(f"d{d}", seed, len(ds), views="patch1,patch2", crop_min=1.0)

        def compute() -> dict:
            model = patch_model(cfg.arch, cfg.feat_dim, patch, cfg.width, seed)
            model = train(cfg, ds, specs, size, ctx.device, model=model, loss_fn=patch_loss(patch, d, cfg.tau))
            k = ctx.budget.batch_size
            mi = mi_bound(model, test, patch, d, k, cfg.tau, ctx.device, seed=seed)
            r = scores(model, ev, test, ctx)
            return {"mi_bound": mi, "k": k, "log_k": math.log(k), "linear_top1": r["linear"]["rgb"],
                    "knn_top1": r["knn"]["rgb"]}

        rows.append({"distance": d, "seed": seed, "patch": patch, "image_size": size, "steps": ctx.budget.steps,
                     **ctx.cached(cfg, compute)})
    return rows


RUNNERS = {"views": run_views, "predictive": run_predictive, "patches": run_patches}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["mi-check"]:  # the known-MI check: no data, no model (train/mi_check.py)
        return mi_check.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m train.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=NAMES, help="the analysis to run")
    p.add_argument("--quick", action="store_true", help="a tiny budget: the whole pipeline in a few minutes")
    p.add_argument("--data", default=None, help="data spec (default: the budget's; views needs rgb and depth)")
    p.add_argument("--out", default="runs/experiments", help="output directory (NAME.json, NAME.png, runs/)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1, or 0 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="override the optimiser steps of every run")
    p.add_argument("--batch-size", type=int, default=None, help="override the batch (and the k of the MI bound)")
    p.add_argument("--probe-epochs", type=int, default=None, help="override the linear-probe epochs")
    p.add_argument("--patch", type=int, default=0, help="patches: patch size in pixels (default: half the image)")
    p.add_argument("--distances", type=int, default=5, help="patches: number of offsets d (>= 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that have a cached result")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    b = BUDGETS[a.name]["quick" if a.quick else "full"]
    over = {k: v for k, v in (("data", a.data), ("steps", a.steps), ("batch_size", a.batch_size),
                              ("probe_epochs", a.probe_epochs)) if v is not None}
    b = replace(b, **over, **({"seeds": tuple(a.seeds)} if a.seeds else {}))
    try:
        if b.steps < 1 or b.batch_size < 2 or b.probe_epochs < 1 or a.distances < 2:
            raise ConfigError("--steps and --probe-epochs must be >= 1, --batch-size and --distances >= 2")
        if a.threads:
            torch.set_num_threads(a.threads)
        out = Path(a.out)
        ctx = Context(a.name, b, out, resolve_device(a.device), BASE, a.fresh, a.patch, a.distances)
        rows = RUNNERS[a.name](ctx)
    except (ConfigError, DataError, ViewError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(rows, indent=1))
    png = PLOTS[a.name](rows, out / f"{a.name}.png", b)
    print(TABLES[a.name](rows, b))
    print(f"wrote {out / f'{a.name}.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
