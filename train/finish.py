"""The end of ``python -m train.pretrain`` on the main rank: a quick held-out kNN check against the same
encoders at random initialisation (default and re-estimated batch-norm statistics), the export (ONNX + card
+ BentoML store) and the default gallery index of held-out data in every view.

Running the same command twice gives the same model fingerprint: the gallery is then rebuilt and replaces
the previous one. A failure in the export or the gallery step is one line on stderr and exit code 2."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from models.artifact import default_index_dir, save_to_store
from models.data import DataError, Dataset
from models.encoders import CMCModel
from models.views import ViewSpec
from .config import Config
from .export import export_model
from .metrics import extract, knn_accuracy, labelled, sample
from .model import build_model, has_batch_norm, recalibrate_bn

LOG = logging.getLogger(__name__)


def quick_eval(cfg: Config, model: CMCModel, image_size: int, train: Dataset | None, test: Dataset | None,
               device) -> dict:
    """kNN top-1 of every view (labelled held-out queries, labelled training gallery) for the model and for
    the same encoders at random initialisation: ``random`` with default batch-norm statistics, ``random-bn``
    with statistics re-estimated on unlabelled training images."""
    if test is None or test.y is None or train is None or train.y is None:
        return {}
    try:
        gal, test = labelled(train, "quick evaluation (train split)"), labelled(test, "quick evaluation (test split)")
    except DataError as e:
        LOG.warning("%s: skipping the held-out kNN check", e)
        return {}
    gal = sample(gal, 5000)
    specs = list(model.specs.values())
    rnd = build_model(cfg, specs, image_size, train).to(device).eval()  # same seed: the initial weights
    res = {}
    for name in ("cmc", "random", "random-bn"):
        if name == "random-bn":
            if not has_batch_norm(rnd):  # nothing to re-estimate (LayerNorm MLPs): the same numbers
                res |= {k[:-len("random")] + "random-bn": v for k, v in res.items() if k.endswith(".random")}
                continue
            rnd = recalibrate_bn(rnd, train, device)
        m = model if name == "cmc" else rnd
        fg, ft = extract(m.to(device), gal, device), extract(m.to(device), test, device)
        for v in m.specs:
            res[f"knn.{v}.{name}"] = knn_accuracy(fg["embed"][v], torch.from_numpy(gal.y).long(),
                                                  ft["embed"][v], torch.from_numpy(test.y).long())
    return res


def build_gallery(export_dir: str | Path, test: Dataset, views: list[str], idx_dir: Path, tag: str) -> Path:
    """Build the default gallery into a fresh directory beside ``idx_dir``, then put it in place (replacing a
    gallery of an earlier run of the same model)."""
    from index.build import build_index  # lazy: FAISS and onnxruntime, needed only when a gallery is built
    idx_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = idx_dir.with_name(f"{idx_dir.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_index(export_dir, test, views, tmp, model_ref=tag, progress=True)
        if idx_dir.exists():
            old = idx_dir.with_name(f"{idx_dir.name}.old-{os.getpid()}")
            os.replace(idx_dir, old)
            os.replace(tmp, idx_dir)
            shutil.rmtree(old, ignore_errors=True)
            LOG.info("replaced the earlier gallery of this model at %s", idx_dir)
        else:
            os.replace(tmp, idx_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return idx_dir


def finish(cfg: Config, model: CMCModel, specs: list[ViewSpec], image_size: int, test: Dataset | None,
           device, train: Dataset | None = None) -> int:
    evaluation = {}
    if cfg.evaluate and test is not None:
        evaluation = quick_eval(cfg, model.eval(), image_size, train, test, device)
        rows = [f"  {v:<10} kNN top-1 {100 * evaluation[f'knn.{v}.cmc']:5.1f}%   random init "
                f"{100 * evaluation[f'knn.{v}.random']:5.1f}% (re-estimated BN "
                f"{100 * evaluation[f'knn.{v}.random-bn']:5.1f}%)" for v in model.specs if f"knn.{v}.cmc" in evaluation]
        if rows:
            print("held-out evaluation (weighted kNN, k=200):\n" + "\n".join(rows))
    if not cfg.export:
        return 0
    out = f"{cfg.out}/export"
    try:
        card = export_model(model, image_size, out, asdict(cfg), evaluation)
        tag = save_to_store(out, card)
    except Exception as e:  # noqa: BLE001 - the checkpoint is saved; say what failed in one line
        LOG.debug("export failed", exc_info=True)
        print(f"error: export of {cfg.out} failed: {_one_line(e)} (the checkpoint is saved; retry with "
              f"python -m train.export --run {cfg.out})", file=sys.stderr)
        return 2
    print(f"model: {out} (views {', '.join(card.view_names)}), saved to the BentoML model store as {tag}")
    if cfg.index and test is not None:
        idx_dir = default_index_dir(card.fingerprint)
        try:
            build_gallery(out, test, card.view_names, idx_dir, tag)
        except Exception as e:  # noqa: BLE001 - the model is exported; say what failed in one line
            LOG.debug("gallery index failed", exc_info=True)
            print(f"error: the gallery index at {idx_dir} failed: {_one_line(e)} (the model is exported; build "
                  f"one with python -m index.build)", file=sys.stderr)
            return 2
        print(f"index: {idx_dir} ({len(test)} held-out items in {', '.join(card.view_names)}); "
              f"`bentoml serve` finds it for this model")
    return 0


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
