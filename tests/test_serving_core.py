"""serving.core / serving.auth without a server: the math, the micro-batcher, the error mapping, the middleware."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from server_fixtures import ROOT, build_index, build_model, png_b64, scenes


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    from models.runtime import Runtime
    from serving.core import Core, Settings
    base = tmp_path_factory.mktemp("core")
    build_model(base / "model")
    ds = scenes(24)
    build_index(base / "index", base / "model", ds, 10)
    c = Core(Runtime(base / "model"), None, Settings())
    c.store, c.index_note = Core.open_index(str(base / "index"), c.rt.fingerprint)
    c.ds = ds
    yield c
    c.close()


def run(coro):
    return asyncio.run(coro)


def test_serving_does_not_import_torch():
    code = "import serving.service, sys; assert 'torch' not in sys.modules and 'train' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "BENTOML_DO_NOT_TRACK": "true"})
    assert r.returncode == 0, r.stderr[-2000:]


def test_micro_batcher_coalesces_concurrent_requests_exactly(core):
    """32 concurrent requests of two views: fewer model calls than requests, results equal direct calls."""
    import time

    from serving.batcher import MicroBatcher, Overloaded
    rt = core.rt
    xl = rt.preprocess("L", [core.ds.sources["rgb"][i] for i in range(16)])
    xf = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    calls = []

    def slow_embed(view, x):
        calls.append(len(x))
        time.sleep(0.02)  # a model call long enough for requests to queue behind it
        return rt.embed(view, x)

    b = MicroBatcher(slow_embed, max_batch=8, max_latency_ms=10_000)

    async def go():
        reqs = [b("L", xl[i:i + 1]) for i in range(16)] + [b("fou", xf[i:i + 1]) for i in range(16)]
        return await asyncio.gather(*reqs)

    out = run(go())
    assert np.abs(np.concatenate(out[:16]) - rt.embed("L", xl)).max() < 1e-5
    assert np.abs(np.concatenate(out[16:]) - rt.embed("fou", xf)).max() < 1e-5
    assert sum(calls) == 32 and max(calls) <= 8 and len(calls) < 32
    s = b.snapshot()
    assert s["rows"] == 32 and s["batches"] == len(calls) and s["mean_batch_size"] > 1

    tight = MicroBatcher(slow_embed, max_batch=1, max_latency_ms=1)

    async def flood():
        return await asyncio.gather(*[tight("L", xl[i:i + 1]) for i in range(6)], return_exceptions=True)

    res = run(flood())
    assert any(isinstance(r, Overloaded) for r in res) and isinstance(res[0], np.ndarray)


def test_embed_and_similarity_math(core):
    img = [png_b64(core.ds.sources["rgb"][i]) for i in range(3)]
    d = run(core.embed("ab", img))
    ref = core.rt.embed_items("ab", [core.ds.sources["rgb"][i] for i in range(3)])
    assert np.abs(np.asarray(d["embeddings"]) - ref).max() < 1e-5
    s = run(core.similarity(a={"view": "L", "image": img[0]}, b={"view": "ab", "image": img[1]}))
    zl = core.rt.embed_items("L", [core.ds.sources["rgb"][0]])[0]
    assert s["cosine"] == pytest.approx(float(zl @ ref[1]), abs=1e-5)
    assert s["critic"] == pytest.approx(np.exp(s["cosine"] / core.tau))
    r = run(core.similarity(query={"view": "L", "image": img[0]},
                            candidates=[{"view": "ab", "image": b} for b in img]))
    assert [x["index"] for x in r["ranking"]] == list(np.argsort(-(ref @ zl), kind="stable"))


def test_search_own_item(core):
    d = run(core.search({"view": "L", "image": png_b64(core.ds.sources["rgb"][4])}, None, 3))
    assert d["results"][0]["key"] == "item-4"


@pytest.mark.parametrize("call,status,field", [
    (lambda c: c.embed("L", ["@@"]), 400, "images[0]"),
    (lambda c: c.embed("L", None, [[1.0] * 8]), 400, "arrays"),
    (lambda c: c.embed("fou", None, [[1.0] * 9]), 400, "arrays"),
    (lambda c: c.embed("L", ["aGVsbG8="] * 100), 413, "images"),
    (lambda c: c.search({"view": "L", "array": [1.0]}, None, 0), 400, "k"),
    (lambda c: c.index_remove(["nope"]), 404, "keys"),
    (lambda c: c.index_add([{"key": "item-0", "inputs": {"fou": [0.0] * 8}}]), 400, "items[0].inputs.fou"),
])
def test_errors_map_to_status(core, call, status, field):
    from serving.core import respond
    r = run(respond(call(core)))
    assert r.status_code == status, r.body
    body = json.loads(r.body)
    assert body["field"] == field and body["error"] and body["detail"]


def test_no_index_503(core):
    from serving.core import Core, respond
    bare = Core(core.rt, None, core.settings)
    r = run(respond(bare.search({"view": "L", "image": "x"}, None, 1)))
    assert r.status_code == 503 and json.loads(r.body)["error"] == "no_index"


def test_store_error_mapping():
    from index.store import DuplicateKeyError, NotWritableError, StoreError, UnknownKeyError
    from serving.core import to_api_error
    assert to_api_error(DuplicateKeyError("key 'a' already exists (1 of 1 keys already exist)")).status == 409
    assert to_api_error(UnknownKeyError("unknown key 'a' (1 of 1 keys unknown); nothing removed")).status == 404
    assert to_api_error(NotWritableError("index is open readonly")).status == 503
    assert to_api_error(StoreError("view 'x': 3 vectors for 2 keys")).status == 400
    assert to_api_error(KeyError("bug")) is None


def test_normalize_error_shapes():
    from serving.auth import normalize_error
    assert normalize_error(400, b'[{"error": "bad json"}]') == {"error": "invalid_input", "detail": "bad json",
                                                                 "field": None}
    d = normalize_error(400, json.dumps({"error": "1 validation error", "detail": [
        {"type": "missing", "loc": ["view"], "msg": "Field required"}]}).encode())
    assert d == {"error": "invalid_input", "detail": "view: Field required", "field": "view"}
    assert normalize_error(404, b"Not Found")["error"] == "not_found"


def _asgi(middleware_cls, **kw):
    async def app(scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})
    return middleware_cls(app, **kw)


def _post(app, path="/x", **kw):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(path, **kw)
    return run(go())


def test_bearer_auth():
    from serving.auth import BearerAuth
    app = _asgi(BearerAuth, token="s3cret")
    assert _post(app).status_code == 401
    assert _post(app, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert _post(app, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert _post(app, "/readyz").status_code == 200
    assert _post(_asgi(BearerAuth, token=None)).status_code == 200


def test_body_limit():
    from serving.auth import BodyLimit
    app = _asgi(BodyLimit, max_bytes=100)
    assert _post(app, content=b"a" * 50).text == "50"
    r = _post(app, content=b"a" * 101)
    assert r.status_code == 413 and r.json()["error"] == "too_large"

    async def chunks():  # no content-length: counted while streaming
        for _ in range(5):
            yield b"a" * 40
    assert _post(app, content=chunks()).status_code == 413
