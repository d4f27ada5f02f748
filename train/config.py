"""The run's configuration: one frozen dataclass whose fields are the CLI flags, and the one check of their
types (``coerce``) that flags, config files and overrides all go through. ``asdict(cfg)`` goes into the
checkpoint, ``metrics.jsonl``'s header and the model card. Nothing mutates it after parsing."""
from __future__ import annotations

import argparse
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import get_type_hints

import yaml
from pydantic import TypeAdapter, ValidationError


class ConfigError(ValueError):
    """A bad flag or config file: the CLI prints the message and exits 2."""


@dataclass(frozen=True)
class Config:
    # --- data and views
    data: str = "scenes"  # data spec: scenes[:n=..,seed=..], cifar10:PATH, imagefolder:PATH, paired:PATH, npz:PATH
    views: str = "auto"  # comma-separated views (the first is the core view of --graph core); auto = what the data provides: L,ab (+depth) for images, depth,normals for depth only, every vector view
    image_size: int = 0  # input size of image views; 0 = the data's native size (64 for scenes)
    limit: int = 0  # use N training samples, a seeded random sample (the same for every seed; 0 = all)
    # --- model
    arch: str = "resnet10"  # encoder of image views: alexnet, resnet10, resnet18, resnet34 (vector views use mlp)
    width: float = 0.25  # channel width multiplier (0.5 = the paper's per-view "half" network; 0.25 keeps the default fast on CPU)
    feat_dim: int = 128  # embedding dimension shared by all views
    # --- objective
    tau: float = 0.07  # temperature of the critic exp(cos / tau)
    graph: str = "full"  # core (first view against each other) or full (every pair)
    negatives: str = "batch"  # batch (other samples of the global batch) or memory (momentum memory bank)
    nce_k: int = 4096  # memory-bank negatives per anchor
    nce_momentum: float = 0.5  # memory-bank momentum
    negatives_sharing: str = "shared"  # memory-bank negatives: shared (K drawn once per batch, one (B,D)x(D,K) product; an anchor's own sample is masked out) or per-sample (K per anchor, a (B,K,D) gather)
    # --- augmentation (applied to the source before it is split into views, so views stay aligned)
    crop_min: float = 0.2  # random resized crop: smallest area fraction (0.08 for ResNets in the paper)
    flip: bool = True  # random horizontal flip
    vector_corrupt: float = 0.1  # vector views: fraction of features replaced by the same feature of random training rows (SCARF)
    vector_noise: float = 0.1  # vector views: Gaussian noise, in units of each feature's std
    mlp_layers: int = 2  # hidden layers of the MLP encoder of vector views (hidden width 1024 * --width, at least 128)
    mlp_dropout: float = 0.0  # dropout after each hidden layer of the MLP encoder
    # --- optimisation
    epochs: int = 3  # passes over the training data
    batch_size: int = 128  # global batch (split across ranks under torchrun)
    optimizer: str = "adamw"  # adamw or sgd (the paper: sgd, lr 0.03, momentum 0.9)
    lr: float = 2e-3  # peak learning rate (cosine decay after a linear warm-up)
    warmup_steps: int = 50  # linear warm-up steps
    momentum: float = 0.9  # sgd momentum
    weight_decay: float = 1e-4  # weight decay
    max_steps: int = 0  # stop after this many steps (0 = run all epochs); for smoke tests
    schedule_steps: int = 0  # steps the cosine learning-rate decay spans (0 = epochs x steps per epoch); a budget of steps ends at lr 0
    seed: int = 0  # seed of initialisation, data order, augmentation and negatives
    val_fraction: float = -1.0  # training items held out to select the epoch with the best cross-view recall@1; -1 = auto (0.1 when every view is a vector view, else 0)
    patience: int = 0  # with validation: stop after this many epochs without a better recall (0 = run all epochs)
    # --- runtime
    device: str = "auto"  # auto (cuda when present, else cpu), cpu, cuda, cuda:1
    amp: str = "auto"  # auto (bf16 on cuda; on CPUs with native bf16 for conv encoders; else fp32), bf16, off
    channels_last: bool = True  # channels_last memory format for conv encoders (CPU and CUDA)
    compile: bool = False  # torch.compile the model for training (slower start, faster steps on GPUs)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    out: str = "runs/default"  # run directory: checkpoint.pt, metrics.jsonl, export/
    resume: bool = False  # continue from OUT/checkpoint.pt
    # --- after training
    export: bool = True  # export ONNX + card into OUT/export and the BentoML model store
    index: bool = True  # build the default gallery index of held-out data (every view)
    evaluate: bool = True  # kNN of held-out data against the same encoder at random initialisation

    def validate(self) -> "Config":
        checks = [
            (self.graph in ("core", "full"), f"--graph must be core or full, not {self.graph!r}"),
            (self.negatives in ("batch", "memory"), f"--negatives must be batch or memory, not {self.negatives!r}"),
            (self.optimizer in ("adamw", "sgd"), f"--optimizer must be adamw or sgd, not {self.optimizer!r}"),
            (self.schedule_steps >= 0, f"--schedule-steps must be >= 0, not {self.schedule_steps}"),
            (self.amp in ("auto", "bf16", "off"), f"--amp must be auto, bf16 or off, not {self.amp!r}"),
            (self.epochs >= 1, f"--epochs must be >= 1, not {self.epochs}"),
            (self.batch_size >= 2, f"--batch-size must be >= 2, not {self.batch_size}"),
            (self.tau > 0, f"--tau must be > 0, not {self.tau}"),
            (self.lr > 0, f"--lr must be > 0, not {self.lr}"),
            (0 < self.crop_min <= 1, f"--crop-min must be in (0, 1], not {self.crop_min}"),
            (0 <= self.nce_momentum < 1, f"--nce-momentum must be in [0, 1), not {self.nce_momentum}"),
            (self.nce_k >= 1, f"--nce-k must be >= 1, not {self.nce_k}"),
            (self.image_size == 0 or 16 <= self.image_size <= 512, f"--image-size must be 0 or 16..512, not {self.image_size}"),
            (self.width > 0, f"--width must be > 0, not {self.width}"),
            (self.negatives_sharing in ("shared", "per-sample"),
             f"--negatives-sharing must be shared or per-sample, not {self.negatives_sharing!r}"),
            (0 <= self.vector_corrupt < 1, f"--vector-corrupt must be in [0, 1), not {self.vector_corrupt}"),
            (self.vector_noise >= 0, f"--vector-noise must be >= 0, not {self.vector_noise}"),
            (self.mlp_layers >= 1, f"--mlp-layers must be >= 1, not {self.mlp_layers}"),
            (0 <= self.mlp_dropout < 1, f"--mlp-dropout must be in [0, 1), not {self.mlp_dropout}"),
            (self.val_fraction == -1 or 0 <= self.val_fraction < 0.5,
             f"--val-fraction must be -1 (auto) or in [0, 0.5), not {self.val_fraction}"),
            (self.patience >= 0, f"--patience must be >= 0, not {self.patience}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


FIELD_TYPES: dict[str, type] = get_type_hints(Config)
_ADAPTERS = {name: TypeAdapter(t) for name, t in FIELD_TYPES.items()}
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def coerce(values: Mapping[str, object], where: Callable[[str], str]) -> dict:
    """Typed values of config fields, checked against the fields' types (pydantic, built from the dataclass).
    Text is read as a flag's value would be ('3' -> 3, 'false' -> False, '2e-3' -> 0.002; 'maybe' for a bool is
    refused); any other value must already have the field's type (an int for a float is fine, a bool for an
    int is not). ``where(field)`` names the field's origin in the ConfigError: a flag, a file's field."""
    out, errors = {}, []
    for name, v in values.items():
        if name not in _ADAPTERS:
            errors.append(f"{where(name)}: unknown config field {name!r}")
            continue
        try:
            out[name] = _ADAPTERS[name].validate_python(v, strict=not isinstance(v, str))
        except ValidationError:
            errors.append(f"{where(name)}: expected {_EXPECTED[FIELD_TYPES[name]]}, not {v!r}")
    if errors:
        raise ConfigError("; ".join(errors))
    return out


def _comments() -> dict[str, str]:
    """Field comments from the source, used as flag help."""
    out = {}
    for line in inspect.getsource(Config).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith("#"):
            out[line.split(":")[0].strip()] = line.split("#", 1)[1].strip()
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, no usage dump
        self.exit(2, f"error: {message}\n")


def build_parser(prog: str = "python -m train.pretrain") -> argparse.ArgumentParser:
    """One flag per field; values stay text here and are typed by ``coerce`` (as a config file's are)."""
    p = _Parser(prog=prog, description="Pretrain CMC encoders.")
    p.add_argument("--config", default=None, help="YAML or JSON file of config fields; flags override it")
    helps = _comments()
    for f in fields(Config):
        kw = {"default": None, "help": f"{helps.get(f.name, '')} (default: {f.default})"}
        if FIELD_TYPES[f.name] is bool:  # --flag alone means true
            p.add_argument(_flag(f.name), nargs="?", const=True, metavar="BOOL", **kw)
        else:
            p.add_argument(_flag(f.name), **kw)
    return p


def load_file(path: str) -> dict:
    """The typed fields of a YAML or JSON config file; ConfigError naming the file (and the field)."""
    fp = Path(path)
    if not fp.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = fp.read_text()
    try:
        d = (yaml.safe_load(text) or {}) if fp.suffix in (".yaml", ".yml") else json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the file's problem
        raise ConfigError(f"cannot parse config file {path}: {e}".splitlines()[0]) from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold a mapping of fields")
    unknown = sorted(set(d) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown field(s) in {path}: {', '.join(unknown)}")
    return coerce(d, lambda name: f"config file {path}: field {name}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Flags over a --config file over the defaults, each value typed by ``coerce``, then range-checked."""
    ns = build_parser().parse_args(argv)
    values = load_file(ns.config) if ns.config else {}
    flags = {k: v for k, v in vars(ns).items() if k != "config" and v is not None}
    values.update(coerce(flags, _flag))
    return Config(**values).validate()


def from_dict(d: dict) -> Config:
    """The config saved in a checkpoint or card (fields it does not know are ignored)."""
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in names})


def to_dict(cfg: Config) -> dict:
    return asdict(cfg)


assert all(f.default is not MISSING for f in fields(Config))
