"""The model card: everything a consumer of an exported model needs, beside the ONNX files (no torch).

``card.json`` holds the views (name, source, input spec, file, sha256), the feature dim, tau, the loss,
the training config, evaluation results, the git commit and the creation time. Loading verifies every
file's sha256; the *fingerprint* (a hash of the ONNX hashes and the dim) names the embedding space, so an
index built with one model refuses queries from another.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .views import ViewSpec, spec_from_dict

FORMAT = "cmc-card/1"
CARD = "card.json"


class CardError(ValueError):
    """A missing, malformed or tampered model artifact."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class Card:
    views: list[dict]  # [{name, source, channels, description, file, sha256, input}]
    feat_dim: int
    image_size: int
    tau: float
    loss: dict  # {graph, negatives, nce_k, nce_momentum}
    config: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    data: str = ""
    epochs: int = 0
    seed: int = 0
    commit: str | None = None
    created: str = ""
    name: str = "cmc"
    fused: dict | None = None  # {file, sha256, views}: all views' embeddings concatenated
    format: str = FORMAT

    @property
    def view_names(self) -> list[str]:
        return [v["name"] for v in self.views]

    def spec(self, name: str) -> ViewSpec:
        for v in self.views:
            if v["name"] == name:
                return spec_from_dict(v)
        raise KeyError(name)

    def view(self, name: str) -> dict:
        for v in self.views:
            if v["name"] == name:
                return v
        raise KeyError(name)

    @property
    def fingerprint(self) -> str:
        """The embedding space: a hash of the view names, their ONNX hashes and the dim."""
        h = hashlib.sha256(json.dumps([[v["name"], v["sha256"]] for v in self.views] + [self.feat_dim]).encode())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"fingerprint": self.fingerprint}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CARD
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        os.replace(tmp, path)
        return path

    def summary(self) -> dict:
        """Key facts, as BentoML labels and metadata."""
        ev = self.evaluation or {}
        return {"views": ",".join(self.view_names), "feat_dim": self.feat_dim, "image_size": self.image_size,
                "tau": self.tau, "graph": self.loss.get("graph"), "negatives": self.loss.get("negatives"),
                "data": self.data, "epochs": self.epochs, "fingerprint": self.fingerprint,
                "commit": (self.commit or "")[:12], **{f"eval.{k}": v for k, v in ev.items() if isinstance(v, (int, float))}}


def load_card(directory: str | Path, verify: bool = True) -> Card:
    """Read ``card.json`` from an artifact directory and (by default) check every file's sha256."""
    d = Path(directory)
    path = d / CARD
    if not path.is_file():
        raise CardError(f"no {CARD} in {d}: not a CMC model artifact")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CardError(f"cannot read {path}: {e}") from None
    if raw.get("format") != FORMAT:
        raise CardError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}")
    raw.pop("fingerprint", None)
    try:
        card = Card(**raw)
    except TypeError as e:
        raise CardError(f"{path}: malformed card ({e})") from None
    if verify:
        files = [(v["file"], v["sha256"]) for v in card.views]
        if card.fused:
            files.append((card.fused["file"], card.fused["sha256"]))
        for name, want in files:
            f = d / name
            if not f.is_file():
                raise CardError(f"model file {f} is missing")
            got = sha256_file(f)
            if got != want:
                raise CardError(f"model file {f} has sha256 {got[:12]}..., the card says {want[:12]}...: "
                                f"the artifact was modified or corrupted")
    return card
