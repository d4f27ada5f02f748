"""python -m train.experiments NAME [--quick] [--data SPEC] [--out DIR] [--seeds S ...]: the CMC analyses
(their budgets, runs and cached rows; training is ``train.pretrain.train``, every number ``train.metrics``).

- ``views``: more views, better representations? L plus ab, depth, normals (2, 3, 4 views, L first) under the
  core-view (L_C) and full-graph (L_F) objectives at an equal budget of optimiser steps; held-out linear and
  kNN top-1 of the L encoder and of all views' encoders concatenated.
- ``predictive``: contrastive L<->ab against predicting ab from L with the same L encoder (L1 and L2
  regression, per-pixel classification over quantised ab bins, hard or soft-encoded and rebalanced as Zhang
  et al. 2016; ``train.predictive``), the same encoder trained with labels (``supervised``), all at the same
  budget and probe, and the L encoder at random initialisation. Rows carry ``method``.
- ``patches``: two patches of one image at diagonal offsets d as the views (``train.patches``): the MI
  bound log(k) - L on held-out pairs at a fixed k, and the patch encoder's linear top-1, for each d, under
  each anchor-position scheme (``--positions fixed,shrinking``; rows carry ``positions``).
- ``negatives``: the number of negatives k: the memory bank with k - 1 bank negatives (k from 16 to 16,384)
  and in-batch negatives with the batch as k (16 up to the budget's batch); the held-out bound log(k) - L at
  the row's k (negatives drawn from training embeddings), linear and kNN top-1 of the L encoder.
- ``mi-check``: the known-MI check (``train.mi_check``).

Every training run goes through ``train.pretrain.train`` (the supervised baseline through its own loop,
``train.predictive.train_supervised``) and every evaluation through ``train.metrics``. Each command writes
DIR/NAME.json (one row per configuration and seed), DIR/NAME.png and prints a table, and copies the rows to
RESULTS/NAME.json (``--results``, default docs/results; NAME-quick.json under --quick); finished runs are cached
in DIR/runs/NAME/<run>/row.json and reused only when their config, budget, code version (a hash of the
training code, ``code_version``) and effective precision are unchanged. Rows carry the code version, the
git commit (with a dirty flag) and the precision. Tables give the mean and the sample standard deviation
(ddof 1) over seeds, 3 seeds by default.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import subprocess
import sys
from functools import lru_cache
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from models.data import DataError, Dataset
from models.encoders import CMCModel
from models.views import BUILTIN, ViewError, parse_views
from .config import Config, ConfigError
from .distributed import resolve_device
from .experiment_plots import PLOTS, TABLES
from . import mi_check
from .metrics import evaluate, sample
from .losses import cmc_loss
from .metrics import extract
from .model import build_model, recalibrate_bn
from .patches import SCHEMES, admissible, distances, fixed_distances, mi_bound, patch_loss, patch_model
from .predictive import PredictiveModel, predictive_loss, train_supervised
from .pretrain import TrainingError, train
from .setup import prepare
from .speed import use_amp

LOG = logging.getLogger(__name__)

NAMES = ("views", "predictive", "patches", "negatives")
CIFAR = "cifar10:../shared/data/cifar10.npz"
ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("train", "models")  # the training code: a change to any of its files retrains the cached runs
RESULTS = ROOT / "docs" / "results"


def code_files() -> list[Path]:
    """The files whose contents are the code version: every .py under train/ and models/, sorted."""
    return sorted(f for d in CODE_DIRS for f in (ROOT / d).rglob("*.py") if "__pycache__" not in f.parts)


@lru_cache(maxsize=None)
def _hash_files(files: tuple[Path, ...]) -> str:
    h = hashlib.sha256()
    for f in files:
        name = f.relative_to(ROOT) if f.is_relative_to(ROOT) else Path(f.name)
        h.update(str(name).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def code_version() -> str:
    """sha256 (16 hex digits) of the training code's paths and contents (``code_files``): part of every cache key,
    so fixed code never reuses a stale run. Hashed once per process, at its first use: the code this process
    imported, not edits made to the files while it runs."""
    return _hash_files(tuple(code_files()))


def git_state() -> dict:
    """{'commit', 'dirty'} of the working tree (for the rows' provenance; None where git is not available)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", *CODE_DIRS], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty if commit else None}


def precision(cfg: Config) -> str:
    """The precision the encoders of this config actually train in on its device: bf16 (autocast) or fp32
    (``train.speed.use_amp``; every analysis has convolutional encoders)."""
    return "bf16" if use_amp(cfg.amp, torch.device(cfg.device), True) else "fp32"


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


# The default budgets each fit one to two hours of 2 CPU cores (three seeds, the default for any claim); --quick
# runs the whole pipeline in a few minutes per seed. Encoders: ResNet-10 at width 0.25 (the project's default),
# AdamW lr 2e-3, tau 0.07, in-batch negatives (the negatives command varies them).
SEEDS = (0, 1, 2)
QUICK = "scenes:n=512,size=32,seed=0,test_n=256"
BUDGETS: dict[str, dict[str, Budget]] = {
    "views": {"full": Budget("scenes", 300, 128, 0, 5000, 0, 30, SEEDS),
              "quick": Budget(QUICK, 30, 32, 0, 0, 0, 10, SEEDS)},
    "predictive": {"full": Budget(CIFAR, 1000, 128, 0, 10000, 0, 30, SEEDS),
                   "quick": Budget(QUICK, 30, 32, 0, 0, 0, 10, SEEDS)},
    "patches": {"full": Budget(CIFAR, 1500, 128, 0, 10000, 0, 30, SEEDS),
                "quick": Budget(QUICK, 30, 32, 0, 0, 0, 10, SEEDS)},
    "negatives": {"full": Budget(CIFAR, 1000, 128, 0, 10000, 0, 30, SEEDS),
                  "quick": Budget(QUICK, 30, 32, 0, 0, 0, 10, SEEDS)},
}
MEMORY_K = (16, 64, 256, 1024, 4096, 16384)  # negatives: k of the memory-bank rows (k - 1 bank negatives)
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
    schemes: tuple[str, ...] = SCHEMES  # patches: anchor-position schemes
    ks: tuple[int, ...] = ()  # negatives: the k values to run (empty = the whole plan)

    def config(self, run: str, seed: int, n_train: int, **kw) -> Config:
        """The training config of one run: the equal step budget, cosine decay over exactly those steps."""
        b = self.budget
        epochs = max(1, math.ceil(b.steps / max(1, n_train // b.batch_size)))
        return replace(self.base, data=b.data, batch_size=b.batch_size, max_steps=b.steps, schedule_steps=b.steps,
                       epochs=epochs, seed=seed,
                       warmup_steps=min(self.base.warmup_steps, max(1, b.steps // 10)),
                       out=str(self.out / "runs" / self.name / f"{run}_s{seed}"), device=str(self.device), **kw
                       ).validate()

    def cached(self, cfg: Config, compute) -> dict:
        """The row of a finished run with this exact config, else ``compute()`` (and remember it)."""
        path = Path(cfg.out) / "row.json"
        key = self.key(cfg)
        if path.is_file() and not self.fresh:
            saved = json.loads(path.read_text())
            if saved.get("key") == json.loads(json.dumps(key)):
                LOG.info("reusing %s", path)
                return saved["row"]
        row = compute() | {"precision": key["precision"], "code_version": key["code"], **git_state()}
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "row": row}, indent=1))
        return row

    def key(self, cfg: Config) -> dict:
        """What a cached row must match: the config, the budget (but its seed list: a new seed keeps the
        others), the patch size, the code version and the effective precision."""
        budget = {k: v for k, v in asdict(self.budget).items() if k != "seeds"}
        return {"config": asdict(cfg), "budget": budget, "patch": self.patch, "code": code_version(),
                "precision": precision(cfg)}


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
PREDICTIVE = ("contrastive", "supervised", "regression_l1", "regression_l2", "classification",
              "classification_rebalanced", "random_init", "random_init_bn")
PRIOR_N = 2000  # classification_rebalanced: training images (a seeded random sample) whose targets give the prior


def run_predictive(ctx: Context) -> list[dict]:
    ds, ev, test, specs, size = load_data(ctx, "L,ab")
    rows = []
    for method, seed in tqdm([(m, s) for m in PREDICTIVE for s in ctx.budget.seeds], desc="predictive", unit="run"):
        cfg = ctx.config(method, seed, len(ds), views="L,ab")

        def compute() -> dict:
            if method == "contrastive":
                model = train(cfg, ds, specs, size, ctx.device)
            elif method == "supervised":  # the same L encoder, labels, the same steps, optimiser and augmentation
                model = train_supervised(cfg, ds, size, ctx.device)
            elif method.startswith("random_init"):  # the same L encoder at its initial weights (the contrastive
                model = build_model(cfg, specs, size)  # run's seed); _bn: batch-norm statistics re-estimated on ds
            else:
                prior = None
                if method == "classification_rebalanced":
                    prior = torch.from_numpy(ds.sample(PRIOR_N, seed).sources["rgb"]).permute(0, 3, 1, 2).float() / 255
                torch.manual_seed(seed)
                pm = PredictiveModel(method, cfg.arch, cfg.feat_dim, size, cfg.width, prior_rgb=prior)
                model = train(cfg, ds, specs, size, ctx.device, model=pm, loss_fn=predictive_loss).cmc
            m = one_view(model, "L", features=True)
            if method == "random_init_bn":
                m = recalibrate_bn(m, ds, ctx.device)
            r = scores(m, ev, test, ctx)
            return {"linear_top1": r["linear"]["L"], "knn_top1": r["knn"]["L"]}

        steps = 0 if method.startswith("random_init") else ctx.budget.steps
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
    try:
        curves = {sc: (distances if sc == "shrinking" else fixed_distances)(size, patch, ctx.n_distances)
                  for sc in ctx.schemes}
    except ValueError as e:
        raise ConfigError(f"--positions {','.join(ctx.schemes)}: {e}") from None
    plan = [(sc, d, s) for sc in ctx.schemes for d in curves[sc] for s in ctx.budget.seeds]
    for scheme, d, seed in tqdm(plan, desc="patches", unit="run"):
        d_max = max(curves["fixed"]) if scheme == "fixed" else None
        # no zoom (crop_min 1): d stays d pixels of the image; flip (and a mild aspect jitter) only
        run = f"d{d}" if scheme == "shrinking" else f"fixed_d{d}"  # the shrinking runs keep their old names
        cfg = ctx.config(run, seed, len(ds), views="patch1,patch2", crop_min=1.0)

        def compute() -> dict:
            model = patch_model(cfg.arch, cfg.feat_dim, patch, cfg.width, seed)
            model = train(cfg, ds, specs, size, ctx.device, model=model, loss_fn=patch_loss(patch, d, cfg.tau, d_max))
            k = ctx.budget.batch_size
            mi = mi_bound(model, test, patch, d, k, cfg.tau, ctx.device, seed=seed, d_max=d_max)
            r = scores(model, ev, test, ctx)
            return {"mi_bound": mi, "k": k, "log_k": math.log(k), "linear_top1": r["linear"]["rgb"],
                    "knn_top1": r["knn"]["rgb"]}

        rows.append({"positions": scheme, "distance": d, "seed": seed, "patch": patch, "image_size": size,
                     "anchor_positions": admissible(size, patch, d, d_max), "steps": ctx.budget.steps,
                     **ctx.cached(cfg, compute)})
    return rows


# ----------------------------------------------------------------------------------------------- negatives
def negatives_plan(n_train: int, batch_size: int) -> list[tuple[str, int]]:
    """(negatives, k) of the rows: the memory bank at ``MEMORY_K`` up to the training set's size, in-batch at
    powers of two from 16 up to the batch (and the batch itself)."""
    batch = sorted({k for k in (16, 32, 64, 128, 256, 512, 1024) if k <= batch_size} | {batch_size})
    return [("memory", k) for k in MEMORY_K if k <= n_train] + [("batch", k) for k in batch if k >= 2]


@torch.no_grad()
def pool_mi_bound(za: Tensor, zb: Tensor, pool_a: Tensor, pool_b: Tensor, k: int, tau: float, seed: int = 0,
                  chunk: int = 256) -> float:
    """log(k) - L/2 (both directions, ``train.losses.cmc_loss``'s memory form) of held-out pairs (za, zb), each
    anchor scored against its partner and k - 1 negatives of the other view drawn from training embeddings
    (pool_a, pool_b: the same items in both views), a fresh draw for every ``chunk`` anchors (without
    replacement when the pool holds k - 1). The InfoNCE bound at k with negatives from the marginal; it cannot
    pass log k."""
    if k < 2:
        raise DataError(f"the MI bound needs k >= 2, not {k}")
    g = torch.Generator().manual_seed(seed)
    n_pool, bounds, weights = pool_a.shape[0], [], []
    for lo in range(0, za.shape[0], chunk):
        neg = (torch.randperm(n_pool, generator=g)[:k - 1] if n_pool >= k - 1
               else torch.randint(0, n_pool, (k - 1,), generator=g))
        a, b = za[lo:lo + chunk].float(), zb[lo:lo + chunk].float()
        _, stats = cmc_loss({"a": a, "b": b}, tau, "full", targets={"a": a, "b": b},
                            negatives={"a": pool_a[neg].float(), "b": pool_b[neg].float()},
                            neg_mask=torch.zeros(a.shape[0], k - 1, dtype=torch.bool))
        bounds.append(float(stats["mi/a~b"]))
        weights.append(a.shape[0])
    return float(np.average(bounds, weights=weights))


def run_negatives(ctx: Context) -> list[dict]:
    ds, ev, test, specs, size = load_data(ctx, "L,ab")
    plan = negatives_plan(len(ds), ctx.budget.batch_size)
    pool_ds = ds.sample(max(k for _, k in plan), 0)  # training items whose embeddings are the bound's negatives
    if ctx.ks:  # --k: a subset of the rows (the pool stays the whole plan's, so a row equals its full-plan twin)
        missing = sorted(set(ctx.ks) - {k for _, k in plan})
        if missing:
            raise ConfigError(f"--k {','.join(map(str, missing))}: not in this budget's plan "
                              f"({', '.join(f'{kind} {k}' for kind, k in plan)})")
        plan = [(kind, k) for kind, k in plan if k in ctx.ks]
    rows = []
    for (kind, k), seed in tqdm([(p, s) for p in plan for s in ctx.budget.seeds], desc="negatives", unit="run"):
        if kind == "memory":
            cfg = ctx.config(f"memory_k{k}", seed, len(ds), views="L,ab", negatives="memory", nce_k=k - 1)
        else:  # in-batch: the batch is k (the same number of steps)
            cfg = replace(ctx.config(f"batch_k{k}", seed, len(ds), views="L,ab"), batch_size=k,
                          epochs=max(1, math.ceil(ctx.budget.steps / max(1, len(ds) // k)))).validate()

        def compute() -> dict:
            model = train(cfg, ds, specs, size, ctx.device)
            zt, zp = extract(model, test, ctx.device, features=False)["embed"], \
                extract(model, pool_ds, ctx.device, features=False)["embed"]
            mi = pool_mi_bound(zt["L"], zt["ab"], zp["L"], zp["ab"], k, cfg.tau, seed=seed)
            r = scores(one_view(model, "L", features=True), ev, test, ctx)
            return {"mi_bound": mi, "log_k": math.log(k), "linear_top1": r["linear"]["L"], "knn_top1": r["knn"]["L"]}

        rows.append({"negatives": kind, "k": k, "seed": seed, "batch_size": cfg.batch_size, "steps": ctx.budget.steps,
                     **ctx.cached(cfg, compute)})
    return rows


RUNNERS = {"views": run_views, "predictive": run_predictive, "patches": run_patches, "negatives": run_negatives}


def write_results(rows: list[dict], results: str, name: str, quick: bool) -> Path | None:
    """The raw rows under RESULTS/NAME.json (NAME-quick.json for --quick); ``results`` '' writes none."""
    if not results:
        return None
    path = Path(results) / f"{name}{'-quick' if quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["mi-check"]:  # the known-MI check: no data, no model (train/mi_check.py)
        return mi_check.main(argv[1:], default_results=str(RESULTS))
    p = argparse.ArgumentParser(prog="python -m train.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=NAMES, help="the analysis to run")
    p.add_argument("--quick", action="store_true", help="a tiny budget: the whole pipeline in a few minutes")
    p.add_argument("--data", default=None, help="data spec (default: the budget's; views needs rgb and depth)")
    p.add_argument("--out", default="runs/experiments", help="output directory (NAME.json, NAME.png, runs/)")
    p.add_argument("--results", default=str(RESULTS), help="directory of the raw JSON rows kept with the code "
                   "(NAME.json, NAME-quick.json with --quick; '' for none)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2)")
    p.add_argument("--steps", type=int, default=None, help="override the optimiser steps of every run")
    p.add_argument("--batch-size", type=int, default=None, help="override the batch (and the k of the MI bound)")
    p.add_argument("--probe-epochs", type=int, default=None, help="override the linear-probe epochs")
    p.add_argument("--limit", type=int, default=None, help="override the training items used for pretraining "
                   "(a seeded random sample; 0 = all): more passes over fewer images at the same steps")
    p.add_argument("--k", default="", help="negatives: comma-separated k values to run (default: the whole plan; "
                   "a k runs in every kind whose plan has it)")
    p.add_argument("--patch", type=int, default=0, help="patches: patch size in pixels (default: half the image)")
    p.add_argument("--distances", type=int, default=5, help="patches: number of offsets d (>= 2)")
    p.add_argument("--positions", default=",".join(SCHEMES),
                   help="patches: anchor-position schemes, comma-separated: fixed (the same positions for every d), "
                        "shrinking (the positions where the pair fits at d: fewer as d grows)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that have a cached result")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    b = BUDGETS[a.name]["quick" if a.quick else "full"]
    over = {k: v for k, v in (("data", a.data), ("steps", a.steps), ("batch_size", a.batch_size),
                              ("probe_epochs", a.probe_epochs), ("limit", a.limit)) if v is not None}
    b = replace(b, **over, **({"seeds": tuple(a.seeds)} if a.seeds else {}))
    try:
        if b.steps < 1 or b.batch_size < 2 or b.probe_epochs < 1 or a.distances < 2 or b.limit < 0:
            raise ConfigError("--steps and --probe-epochs must be >= 1, --batch-size and --distances >= 2, "
                              "--limit >= 0")
        try:
            ks = tuple(int(x) for x in a.k.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--k must be comma-separated integers, not {a.k!r}") from None
        if ks and a.name != "negatives":
            raise ConfigError(f"--k chooses rows of negatives, not of {a.name}")
        schemes = tuple(x.strip() for x in a.positions.split(",") if x.strip())
        if not schemes or any(x not in SCHEMES for x in schemes):
            raise ConfigError(f"--positions must be a comma-separated subset of {','.join(SCHEMES)}, not "
                              f"{a.positions!r}")
        if a.threads:
            torch.set_num_threads(a.threads)
        out = Path(a.out)
        ctx = Context(a.name, b, out, resolve_device(a.device), BASE, a.fresh, a.patch, a.distances, schemes, ks)
        rows = RUNNERS[a.name](ctx)
    except (ConfigError, DataError, ViewError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(rows, indent=1))
    kept = write_results(rows, a.results, a.name, a.quick)
    png = PLOTS[a.name](rows, out / f"{a.name}.png", b)
    print(TABLES[a.name](rows, b))
    print(f"wrote {out / f'{a.name}.json'} and {png}" + (f"; the rows also in {kept}" if kept else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
