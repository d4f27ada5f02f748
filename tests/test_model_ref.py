"""One front door to a model and one definition of a view.

``models.artifact.locate`` turns a tag, a run directory or an artifact directory into what the consumer loads (the
ONNX artifact for ``models.runtime.Runtime``, the checkpoint for ``train.model.load_run``) or one line that says
what is missing and what to run; ``bentoml serve`` with no model at all stops with that line, not with BentoML's
search of a cloud registry. A ViewSpec owns its source key and its transform; the card keeps its format."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from conftest import ROOT
from models.artifact import CHECKPOINT, ModelNotFound, locate, resolve
from models.views import BUILTIN, VECTOR_TRANSFORM, get_view, source_key, spec_from_dict

NO_MODEL = ("no CMC model: train one first with `python -m train.pretrain`, or set CMC_MODEL to a model directory "
            "or tag")


def empty_store_env(tmp_path: Path) -> dict:
    """A machine with an empty BentoML model store and no CMC_MODEL."""
    env = {k: v for k, v in os.environ.items() if k not in ("CMC_MODEL", "CMC_INDEX")}
    return env | {"BENTOML_HOME": str(tmp_path / "bentoml"), "CMC_HOME": str(tmp_path / "cmc"),
                  "BENTOML_DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as train.pretrain leaves it: checkpoint.pt, and export/ (card + ONNX) beside it."""
    import torch

    from models.views import parse_views
    from train.config import Config
    from train.export import export_model
    from train.model import build_model, save_checkpoint

    run = tmp_path_factory.mktemp("run")
    cfg = Config(views="L,ab", arch="resnet10", width=0.25, feat_dim=16, out=str(run))
    specs = parse_views(cfg.views)
    model = build_model(cfg, specs, 32)
    save_checkpoint({"config": asdict(cfg), "views": [s.to_dict() for s in specs], "image_size": 32,
                     "model": model.state_dict()}, run / CHECKPOINT)
    with torch.no_grad():
        export_model(model.eval(), 32, run / "export", asdict(cfg), fused=False)
    return run


def test_one_resolver_for_runs_artifacts_and_checkpoints(run_dir, tmp_path):
    export, ckpt = run_dir / "export", run_dir / CHECKPOINT
    assert locate(run_dir, "artifact") == export == resolve(run_dir) == resolve(export)
    assert locate(run_dir, "checkpoint") == ckpt == locate(export, "checkpoint") == locate(ckpt, "checkpoint")
    bare = tmp_path / "bare"
    (bare / "export").mkdir(parents=True)
    (bare / CHECKPOINT).write_bytes(b"")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "card.json").write_text("{}")
    for ref, want, line in (
            (bare, "artifact", f"run {bare} has no exported model yet: run `python -m train.export --run {bare}`"),
            (lone, "checkpoint", f"{lone} is an exported model (ONNX only): torch weights are in the"),
            (tmp_path, "artifact", f"{tmp_path} has no card.json: not a CMC model artifact"),
            (tmp_path, "checkpoint", f"no checkpoint at {tmp_path / CHECKPOINT}: train a run there"),
            (tmp_path / "nope", "artifact", f"model directory {tmp_path / 'nope'} does not exist"),
            ("cmc:abc", "checkpoint", "no checkpoint at cmc:abc: cmc:abc names an exported model (ONNX only)")):
        with pytest.raises(ModelNotFound) as e:
            locate(ref, want)
        assert str(e.value).startswith(line) and "\n" not in str(e.value), str(e.value)


def test_runtime_and_load_run_share_the_resolver(run_dir):
    """The ONNX runtime loads a run by its directory; the torch side loads the run of an artifact directory."""
    import torch

    from models.runtime import Runtime
    from train.config import ConfigError
    from train.model import load_run

    rt = Runtime(run_dir)
    assert rt.path == run_dir / "export" and list(rt.views) == ["L", "ab"]
    a, _ = load_run(run_dir)
    b, _ = load_run(run_dir / "export")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ConfigError, match="no checkpoint at"):
        load_run(run_dir / "missing")


def test_no_model_names_what_to_run(tmp_path):
    """An empty model store: the runtime's error is one line, the same one `bentoml serve` stops with."""
    code = ("from models.runtime import Runtime\nfrom models.artifact import ModelNotFound\n"
            "for ref in (None, 'cmc:nosuch'):\n"
            "    try:\n        Runtime(ref)\n    except ModelNotFound as e:\n        print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=empty_store_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == [
        NO_MODEL, "no model 'cmc:nosuch' in the BentoML model store: train one with `python -m train.pretrain` "
                  "(it saves cmc:<version>), or set CMC_MODEL to a model directory or a tag that `bentoml models "
                  "list` shows"]


def test_bentoml_serve_without_a_model_says_what_to_run(tmp_path):
    from serving.measure.launch import free_port
    r = subprocess.run([sys.executable, "-m", "bentoml", "serve", "--port", str(free_port())], cwd=ROOT,
                       env=empty_store_env(tmp_path), capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-2000:]
    assert NO_MODEL in out, out[-2000:]
    assert "cloud" not in out and "Traceback" not in out, out[-2000:]


def test_a_view_owns_its_source_key_and_transform():
    from models.transforms import DepthToNormals, Lab, VectorStandardize, make_transform

    vec = get_view("feat", {"feat": 7})
    assert vec.transform == VECTOR_TRANSFORM and vec.source_key == "feat" == source_key("feat", {"source": "vector"})
    assert BUILTIN["ab"].source_key == "rgb" == source_key("ab", {"source": "rgb", "channels": 2})
    assert BUILTIN["normals"].source_key == "depth"
    for spec in [*BUILTIN.values(), vec]:
        d = spec.to_dict()
        assert list(d) == ["name", "source", "channels", "description"]  # the card's view format is unchanged
        back = spec_from_dict(d)
        assert back == spec and back.transform == spec.transform
        assert make_transform(back) is not None
    assert isinstance(make_transform(BUILTIN["L"]), Lab) and make_transform(BUILTIN["L"]).keep == (0,)
    assert make_transform(BUILTIN["ab"]).keep == (1, 2)
    assert isinstance(make_transform(BUILTIN["normals"]), DepthToNormals)
    assert isinstance(make_transform(vec), VectorStandardize) and make_transform(vec).mean.shape == (7,)
