import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_npz(path: Path, n: int = 256, seed: int = 0) -> Path:
    """Two vector views of one latent (very different scales), with labels: a small tabular multi-view set."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    latent = rng.standard_normal((n, 6)) + 2 * np.eye(4, 6)[y]
    a = (latent @ rng.standard_normal((6, 10))) * 1000 + 5
    b = (latent @ rng.standard_normal((6, 7))) * 0.001
    np.savez(path, fa=a.astype(np.float32), fb=b.astype(np.float32), y=y)
    return path
