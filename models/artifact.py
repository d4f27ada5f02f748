"""Where an exported model lives: a plain directory, or the BentoML model store as ``cmc:<version>``.

Every consumer resolves a model reference the same way, with :func:`resolve`: an existing directory that
holds ``card.json``, else a BentoML tag (default ``cmc:latest``).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .card import CARD, Card, CardError

LOG = logging.getLogger(__name__)
DEFAULT_REF = "cmc:latest"
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def resolve(ref: str | Path | None = None) -> Path:
    """A model reference (directory or BentoML tag) -> the artifact directory holding card.json."""
    ref = str(ref or os.environ.get("CMC_MODEL") or DEFAULT_REF)
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / CARD).is_file():
            raise CardError(f"{p} has no {CARD}: not a CMC model artifact")
        return p
    if os.sep in ref or ref.startswith("."):
        raise CardError(f"model directory {ref} does not exist")
    import bentoml
    try:
        model = bentoml.models.get(ref)
    except Exception as e:  # noqa: BLE001 - bentoml raises NotFound / BentoMLException / ValueError
        raise CardError(f"no model {ref!r} in the BentoML model store ({type(e).__name__}: {e}); "
                        f"train one with `python -m train.pretrain` or pass a directory") from None
    return Path(model.path)


def cmc_home() -> Path:
    """Where the project keeps default indexes and caches: $CMC_HOME, default ~/.cmc."""
    return Path(os.environ.get("CMC_HOME", "~/.cmc")).expanduser()


def default_index_dir(fingerprint: str) -> Path:
    """The default gallery index of a model: built by train.pretrain, found by the server without flags."""
    return cmc_home() / "indexes" / fingerprint


def save_to_store(directory: str | Path, card: Card, name: str = "cmc") -> str:
    """Copy an artifact directory into the BentoML model store; returns the tag ``cmc:<version>``."""
    import bentoml
    labels = {k: str(v) for k, v in card.summary().items() if k in ("views", "data", "graph", "negatives", "fingerprint")}
    with bentoml.models.create(name=name, labels=labels, metadata=card.summary()) as model:
        for f in Path(directory).iterdir():
            if f.is_file():
                shutil.copy2(f, Path(model.path) / f.name)
    tag = str(model.tag)
    LOG.info("saved %s to the BentoML model store", tag)
    return tag
