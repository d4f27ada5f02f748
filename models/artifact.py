"""The front door to a model: one resolver from a reference to the files of the thing asked for.

A reference is a BentoML tag (``cmc:latest``, ``cmc:<version>``), a run directory of ``train.pretrain``
(``checkpoint.pt``, and ``export/`` once exported), a checkpoint file, or an exported artifact directory
(``card.json`` + one ONNX file per view); none means ``$CMC_MODEL``, else ``cmc:latest``. :func:`locate` turns it
into what a consumer loads: the artifact directory (``models.runtime.Runtime``, through :func:`resolve`) or the
run's checkpoint (``train.model.load_run``, the torch side, which models/ never imports), or raises
:class:`ModelNotFound` with one line that says what is missing and what to run. The service declares its
store model with :func:`declared_model` and :func:`store_model`, so that ``bentoml build`` packages it and
``bentoml serve`` without any model stops with that line, not with BentoML's search of a cloud registry.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .card import CARD, Card, CardError

LOG = logging.getLogger(__name__)
DEFAULT_REF = "cmc:latest"
CHECKPOINT = "checkpoint.pt"  # a run directory's weights (train.model saves and loads it)
RUN_EXPORT = "export"  # a run's artifact directory unless train.export is told another
TRAIN_FIRST = "train one first with `python -m train.pretrain`, or set CMC_MODEL to a model directory or tag"
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


class ModelNotFound(CardError):
    """A model reference that names nothing loadable; the message is one line: what is missing, what to run."""


def missing_model(ref: str | None) -> str:
    """The line for a tag the model store lacks (``None``: no reference at all, the default one missing)."""
    if ref is None or (ref == DEFAULT_REF and not os.environ.get("CMC_MODEL")):
        return f"no CMC model: {TRAIN_FIRST}"
    return (f"no model {ref!r} in the BentoML model store: train one with `python -m train.pretrain` (it saves "
            f"cmc:<version>), or set CMC_MODEL to a model directory or a tag that `bentoml models list` shows")


def locate(ref: str | Path | None = None, want: str = "artifact") -> Path:
    """The one resolver: a model reference -> the artifact directory holding card.json (``want="artifact"``) or
    the checkpoint file of its run (``want="checkpoint"``); :class:`ModelNotFound` (one line) otherwise.

    A run directory gives its checkpoint, or its ``export/`` artifact; an artifact directory gives itself, or
    the checkpoint of the run it sits in; a tag names an artifact in the BentoML model store (torch weights
    are never there)."""
    if want not in ("artifact", "checkpoint"):
        raise ValueError(f"want must be 'artifact' or 'checkpoint', not {want!r}")
    text = str(ref or os.environ.get("CMC_MODEL") or DEFAULT_REF)
    p = Path(text).expanduser()
    if p.is_dir():
        return _in_directory(p, want)
    if p.is_file():
        if want == "checkpoint":
            return p
        raise ModelNotFound(f"{p} is a file: give a model directory ({CARD} + ONNX files), a run directory or a tag")
    if want == "checkpoint":
        hint = (f": {text} names an exported model (ONNX only); torch weights are in the {CHECKPOINT} of the run "
                "directory it came from" if ":" in text and not _is_path(text) else "")
        raise ModelNotFound(f"no checkpoint at {p}{hint}")
    if _is_path(text):
        raise ModelNotFound(f"model directory {text} does not exist")
    return _in_store(text, explicit=bool(ref or os.environ.get("CMC_MODEL")))


def resolve(ref: str | Path | None = None) -> Path:
    """A model reference -> the artifact directory holding card.json (what ``models.runtime.Runtime`` loads)."""
    return locate(ref, "artifact")


def _in_directory(p: Path, want: str) -> Path:
    card, ckpt, export = p / CARD, p / CHECKPOINT, p / RUN_EXPORT / CARD
    if want == "artifact":
        if card.is_file():
            return p
        if export.is_file():
            return export.parent
        if ckpt.is_file():
            raise ModelNotFound(f"run {p} has no exported model yet: run `python -m train.export --run {p}`")
        raise ModelNotFound(f"{p} has no {CARD}: not a CMC model artifact (nor a run directory with {CHECKPOINT})")
    if ckpt.is_file():
        return ckpt
    if card.is_file() and (p.parent / CHECKPOINT).is_file():
        return p.parent / CHECKPOINT
    if card.is_file():
        raise ModelNotFound(f"{p} is an exported model (ONNX only): torch weights are in the {CHECKPOINT} of the run "
                            "directory it came from")
    raise ModelNotFound(f"no checkpoint at {ckpt}: train a run there with `python -m train.pretrain --out {p}`")


def _in_store(tag: str, explicit: bool) -> Path:
    import bentoml
    from bentoml.exceptions import NotFound
    try:
        return Path(bentoml.models.get(tag).path)
    except NotFound:
        raise ModelNotFound(missing_model(tag if explicit else None)) from None
    except Exception as e:  # noqa: BLE001 - an invalid tag (ValueError, BentoMLException)
        raise ModelNotFound(f"{tag!r} is neither a model directory nor a tag of the BentoML model store "
                            f"({type(e).__name__}: {e})") from None


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
    lacks the tag, so that importing the service still works, and ``bentoml serve`` and ``bentoml build`` stop
    with one line naming what to run (the service declares the tag through :func:`store_model`).
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


def store_model(tag: str) -> Any:
    """The service's declaration of its store model: a ``bentoml.models.BentoModel`` (``bentoml build`` packages
    it, ``self.model.path`` resolves it) which, when the store lacks the tag, stops ``bentoml serve`` and
    ``bentoml build`` with :func:`missing_model`'s line instead of trying a cloud registry."""
    return _declared_class()(tag)


@functools.cache
def _declared_class() -> type:
    import attrs
    from bentoml.exceptions import NotFound
    from bentoml.models import BentoModel

    @attrs.frozen
    class DeclaredModel(BentoModel):
        def _present(self) -> None:
            if self.stored is None:
                raise NotFound(missing_model(str(self.tag)))

        def to_info(self, alias: str | None = None) -> Any:
            self._present()
            return super().to_info(alias)

        def resolve(self, base_path: Any = None) -> Any:  # noqa: D102 - BentoModel's, after the check
            self._present()
            return super().resolve(base_path)

    return DeclaredModel


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
