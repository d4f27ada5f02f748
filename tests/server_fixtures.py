"""Helpers for the server tests: a small exported model, a gallery index, a real `bentoml serve` process."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from serving.measure.launch import ServerProcess, free_port  # noqa: F401 - re-exported for tests

ROOT = Path(__file__).resolve().parents[1]
VIEWS = "L,ab,depth,fou"


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
    from index.thumbs import ThumbStore
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
    ThumbStore(index_dir).close()  # as index.build does: items added over HTTP get thumbnails
    return keys


def model_and_index(base: Path, n: int, ds=None) -> dict:
    """A random-init model and an index of the first ``n`` items of ``ds`` (default: 24 held-out scenes) under
    ``base``; returns the server environment that serves them with their own BentoML and CMC homes."""
    build_model(base / "model")
    build_index(base / "index", base / "model", scenes(24) if ds is None else ds, n)
    return {"CMC_MODEL": str(base / "model"), "CMC_INDEX": str(base / "index"), "CMC_THREADS": "1",
            "BENTOML_HOME": str(base / "bentoml"), "CMC_HOME": str(base / "cmc")}


Server = ServerProcess  # a real `bentoml serve` on a free port (serving/measure/launch.py)


def echo_app():
    """An ASGI app that answers 200 with the length of the body it read: what a middleware under test wraps."""
    async def app(scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})
    return app
