"""What the end of ``python -m train.pretrain`` does on the main rank: a quick held-out kNN check against
the same encoders at random initialisation, the export (ONNX + card + BentoML store) and the default
gallery index of held-out data in every view."""
from __future__ import annotations

import logging
from dataclasses import asdict

import numpy as np
import torch

from models.artifact import default_index_dir
from models.data import Dataset
from models.encoders import CMCModel
from models.views import ViewSpec
from .config import Config

LOG = logging.getLogger(__name__)


def quick_eval(cfg: Config, model: CMCModel, image_size: int, train: Dataset | None, test: Dataset, device) -> dict:
    """kNN top-1 of every view (held-out queries, training gallery) for the model and for the same encoders at
    random initialisation."""
    from .evaluate import extract, knn_accuracy
    from .pretrain import build_model
    if test is None or test.y is None or train is None or train.y is None:
        return {}
    gal = train.subset(np.arange(min(len(train), 5000)))
    rnd = build_model(cfg, list(model.specs.values()), image_size, train)  # same seed: the initial weights
    res = {}
    for name, m in (("cmc", model), ("random", rnd)):
        fg, ft = extract(m.to(device), gal, device), extract(m.to(device), test, device)
        for v in m.specs:
            res[f"knn.{v}.{name}"] = knn_accuracy(fg["embed"][v], torch.from_numpy(gal.y).long(),
                                                  ft["embed"][v], torch.from_numpy(test.y).long())
    return res


def finish(cfg: Config, model: CMCModel, specs: list[ViewSpec], image_size: int, test: Dataset | None,
           device, train: Dataset | None = None) -> int:
    evaluation = {}
    if cfg.evaluate and test is not None:
        evaluation = quick_eval(cfg, model.eval(), image_size, train, test, device)
        rows = [f"  {v:<10} kNN top-1 {100 * evaluation[f'knn.{v}.cmc']:5.1f}%   random init "
                f"{100 * evaluation[f'knn.{v}.random']:5.1f}%" for v in model.specs if f"knn.{v}.cmc" in evaluation]
        if rows:
            print("held-out evaluation (weighted kNN, k=200):\n" + "\n".join(rows))
    if not cfg.export:
        return 0
    from .export import export_model
    from models.artifact import save_to_store
    out = f"{cfg.out}/export"
    card = export_model(model, image_size, out, asdict(cfg), evaluation)
    tag = save_to_store(out, card)
    print(f"model: {out} (views {', '.join(card.view_names)}), saved to the BentoML model store as {tag}")
    if cfg.index and test is not None:
        from index.build import build_index
        idx_dir = default_index_dir(card.fingerprint)
        build_index(out, test, card.view_names, idx_dir, model_ref=tag, progress=True)
        print(f"index: {idx_dir} ({len(test)} held-out items in {', '.join(card.view_names)}); "
              f"`bentoml serve` finds it for this model")
    return 0
