"""Where an exported model lives: a plain directory, or the BentoML model store as ``cmc:<version>``.

Every consumer resolves a model reference the same way, with :func:`resolve`: an existing directory that
holds ``card.json``, else a BentoML tag (default ``cmc:latest``). The service declares its model with
:func:`declared_model`, so that ``bentoml build`` packages it into the Bento.
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
    if _is_path(ref):
        raise CardError(f"model directory {ref} does not exist")
    import bentoml
    try:
        model = bentoml.models.get(ref)
    except Exception as e:  # noqa: BLE001 - bentoml raises NotFound / BentoMLException / ValueError
        raise CardError(f"no model {ref!r} in the BentoML model store ({type(e).__name__}: {e}); "
                        f"train one with `python -m train.pretrain` or pass a directory") from None
    return Path(model.path)


def _is_path(ref: str) -> bool:
    return Path(ref).expanduser().is_dir() or os.sep in ref or ref.startswith(".")


def bento_model_tag(project_root: str | Path) -> str | None:
    """Inside a built Bento (``<bento>/src`` is the project root, ``<bento>/bento.yaml`` its record): the tag of
    the model the Bento packaged; None outside a Bento or when it packaged none."""
    info_path = Path(project_root).parent / "bento.yaml"
    if not info_path.is_file():
        return None
    import yaml
    try:
        info = yaml.safe_load(info_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        LOG.warning("cannot read %s: %s", info_path, e)
        return None
    # the service's own declaration first (BentoML 1.4 records it per service), then bentofile-declared models
    models = [m for s in info.get("services") or [] if s.get("name") == "cmc" for m in s.get("models") or []]
    tags = [str(m["tag"]) for m in models + list(info.get("models") or []) if isinstance(m, dict) and m.get("tag")]
    return tags[0] if tags else None


def declared_model(project_root: str | Path) -> tuple[str | None, bool]:
    """The model tag the service declares (``bentoml.models.BentoModel``) and whether the store holds it now.

    Inside a Bento: the model it packaged. Elsewhere: ``CMC_MODEL`` when it is a tag, else ``cmc:latest``,
    resolved to its concrete version (``cmc:<version>``) so that ``bentoml build`` records that version.
    ``(None, False)`` when ``CMC_MODEL`` is a directory (nothing to package); ``(ref, False)`` when the store
    lacks the tag, so that importing the service still works and ``bentoml build`` fails naming the tag.
    """
    packaged = bento_model_tag(project_root)
    if packaged:
        return packaged, True
    ref = os.environ.get("CMC_MODEL") or DEFAULT_REF
    if _is_path(ref):
        LOG.info("CMC_MODEL is a directory (%s): the service declares no store model; bentoml build packages "
                 "none", ref)
        return None, False
    import bentoml
    try:
        bentoml.Tag.from_taglike(ref)
    except ValueError as e:
        LOG.warning("CMC_MODEL=%r is neither a directory nor a valid BentoML tag (%s)", ref, e)
        return None, False
    try:
        return str(bentoml.models.get(ref).tag), True
    except Exception as e:  # noqa: BLE001 - NotFound / BentoMLException
        LOG.info("model %s is not in the BentoML model store (%s)", ref, type(e).__name__)
        return ref, False


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
