import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Servers started by the tests run one worker (quick to start on 2 cores) unless a test asks for more
# (tests/test_server_workers.py runs two); the product's default is one worker per CPU (serving/settings.py).
os.environ.setdefault("CMC_WORKERS", "1")
CIFAR = ROOT.parent / "shared" / "data" / "cifar10.npz"


@pytest.fixture(autouse=True, scope="session")
def _isolated_homes(tmp_path_factory):
    """Tests never touch the user's BentoML store, model index or data cache."""
    base = tmp_path_factory.mktemp("homes")
    for var, sub in (("BENTOML_HOME", "bentoml"), ("CMC_HOME", "cmc"), ("CMC_CACHE", "cache")):
        os.environ.setdefault(var, str(base / sub))
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    yield


def run_cli(args: list[str], timeout: int = 300, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` in a subprocess from the repository root."""
    e = os.environ.copy() | {"PYTHONUNBUFFERED": "1"} | (env or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e, **kw)


def make_npz(path: Path, n: int = 256, seed: int = 0) -> Path:
    """Two vector views of one latent (very different scales), with labels: a small tabular multi-view set."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    latent = rng.standard_normal((n, 6)) + 2 * np.eye(4, 6)[y]
    a = (latent @ rng.standard_normal((6, 10))) * 1000 + 5
    b = (latent @ rng.standard_normal((6, 7))) * 0.001
    np.savez(path, fa=a.astype(np.float32), fb=b.astype(np.float32), y=y)
    return path


TINY_DATA = "scenes:n=1536,size=32,seed=11,test_n=256"


@pytest.fixture(scope="session")
def trained_artifact(tmp_path_factory):
    """A small model actually trained with CMC on scenes (L, ab, depth at 32 px; about a minute on 2 cores),
    exported to ONNX. Shared by the index and server tests that need a real embedding space."""
    from dataclasses import asdict

    import torch

    from train.config import Config
    from train.export import export_model
    from train.pretrain import train
    from train.setup import prepare

    root = tmp_path_factory.mktemp("trained")
    cfg = Config(data=TINY_DATA, views="L,ab,depth", arch="resnet10", width=0.25, batch_size=64, epochs=5, lr=3e-3,
                 warmup_steps=10, tau=0.1, out=str(root / "run"), export=False, index=False, evaluate=False).validate()
    ds, test, specs, size = prepare(cfg, progress=False)
    model = train(cfg, ds, specs, size, torch.device("cpu"))
    card = export_model(model.eval(), size, root / "export", asdict(cfg), fused=False)
    return {"dir": root / "export", "card": card, "model": model, "test": test, "data": TINY_DATA}
