"""Helpers for the server tests: a small exported model, a gallery index, a real `bentoml serve` process."""
from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VIEWS = "L,ab,depth,fou"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(out_dir: Path, image_size: int = 32, seed: int = 0):
    """A random-init CMC model (L, ab, depth, fou[8]) exported to ONNX; returns (torch model in eval, card)."""
    from dataclasses import asdict

    import torch

    from models.encoders import CMCModel
    from models.views import parse_views
    from train.config import Config
    from train.export import export_model

    torch.manual_seed(seed)
    m = CMCModel(parse_views(VIEWS, {"fou": 8}), "resnet10", 128, image_size, 0.25)
    card = export_model(m, image_size, out_dir, asdict(Config(image_size=image_size)))
    return m.eval(), card


def png_b64(arr: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def scenes(n: int = 24, size: int = 32, seed: int = 5, split: str = "test"):
    from models.data import load
    return load(f"scenes:n={max(n, 64)},size={size},seed={seed},test_n={n}", split)


def build_index(index_dir: Path, model_dir: Path, ds, n: int) -> list[str]:
    """Index the first n items of a dataset in every view of the model (keys 'item-<i>'); returns the keys."""
    from index.store import IndexStore
    from models.runtime import Runtime

    rt = Runtime(model_dir)
    keys = [f"item-{i}" for i in range(n)]
    vecs = {}
    for v in rt.views:
        src = rt.views[v]["source"]
        key = src if src != "vector" else v
        if key in ds.sources:
            vecs[v] = rt.embed_sources(v, {key: ds.sources[key][:n]})
    store = IndexStore.create(index_dir, views={v: rt.dim for v in vecs}, fingerprint=rt.fingerprint,
                              model_ref=str(model_dir))
    try:
        store.add(keys, vecs, [{"i": i, "label": int(ds.y[i])} for i in range(n)])
    finally:
        store.close()
    return keys


class Server:
    """`bentoml serve serving.service:CMCService` on a free port, from the project root."""

    def __init__(self, env: dict, log: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        e = os.environ.copy() | {"BENTOML_DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"} | env
        self._f = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serving.service:CMCService",
                                      "--port", str(self.port), "--host", "127.0.0.1"],
                                     cwd=ROOT, env=e, stdout=self._f, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> "Server":
        import httpx
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self._f.close()
