"""serving.core / serving.auth without a server: the math, the micro-batcher, the error mapping, the middleware."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest

from server_fixtures import ROOT, build_index, build_model, echo_app, png_b64, scenes


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
    return middleware_cls(echo_app(), **kw)


def _post(app, path="/x", **kw):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(path, **kw)
    return run(go())


def test_bearer_auth():
    from serving.auth import AccessControl
    app = _asgi(AccessControl, token="s3cret")
    assert _post(app).status_code == 401
    assert _post(app, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert _post(app, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert _post(app, "/readyz").status_code == 200
    assert _post(_asgi(AccessControl, token=None), "/search").status_code == 200


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


# ---------------------------------------------------------------------------------------------- hostile input (issue 9)
def _api_error(coro):
    """Run an endpoint coroutine through respond(): (status, body)."""
    from serving.core import respond
    r = run(respond(coro))
    return r.status_code, (json.loads(r.body) if r.status_code != 200 else r)


def _b64(data: bytes) -> str:
    import base64
    return base64.b64encode(data).decode()


def _img_bytes(fmt: str, arr) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_item7_other_formats_are_400_naming_them(core):
    img = core.ds.sources["rgb"][0]
    for fmt in ("GIF", "BMP", "TIFF", "SGI"):
        status, body = _api_error(core.embed("L", [_b64(_img_bytes(fmt, img))]))
        assert status == 400 and fmt in body["detail"] and body["field"] == "images", body


def test_item8_pixel_limit_sized_to_the_model_and_bounded_decode_pool(core):
    import threading
    import time
    from serving.limits import decode_pixels
    assert core.max_pixels == decode_pixels(core.settings.max_pixels, 32) == core.settings.max_pixels
    assert decode_pixels(16_000_000, 224) == 16_000_000 and decode_pixels(500_000, 224) == 500_000
    # a 5000x4000 PNG of a few KB: refused from its header, quickly, naming the limit
    big = _img_bytes("PNG", np.zeros((4000, 5000, 3), np.uint8))
    assert len(big) < 150_000
    t0 = time.perf_counter()
    status, body = _api_error(core.embed("L", [_b64(big)]))
    assert status == 400 and "5000x4000" in body["detail"] and "max_pixels=16000000" in body["detail"]
    assert time.perf_counter() - t0 < 2.0
    # decoding runs on the pool of CMC_DECODE_THREADS threads, not the default pool
    names = []
    orig = core.rt.preprocess

    def spy(*a, **kw):
        names.append(threading.current_thread().name)
        return orig(*a, **kw)
    core.rt.preprocess = spy
    try:
        run(core.embed("L", [png_b64(core.ds.sources["rgb"][1])]))
    finally:
        core.rt.preprocess = orig
    assert names and all(n.startswith("cmc-decode") for n in names)
    assert core._decoders._max_workers == core.settings.decode_threads


def test_item8_index_add_decodes_each_source_once(core, monkeypatch):
    """L and ab both read the rgb image, and the thumbnails read it too: one decode of each image, not one per
    view or per use; the result equals embedding each view separately."""
    import models.imageio as imageio
    from index.thumbs import ThumbStore
    from models.imageio import encode_png
    opened = []
    orig = imageio._open

    def spy(data, *a, **kw):
        opened.append(threading.current_thread().name)
        return orig(data, *a, **kw)
    ds = core.ds
    items = [{"key": f"once-{i}", "inputs": {"rgb": png_b64(ds.sources["rgb"][i]),
                                             "depth": _b64(encode_png(ds.sources["depth"][i]))}} for i in (20, 21)]
    assert ThumbStore.exists(core.store.path)  # the fixture's index keeps thumbnails: they are written too
    monkeypatch.setattr(imageio, "_open", spy)
    d = run(core.index_add(items))
    monkeypatch.setattr(imageio, "_open", orig)
    try:
        assert d["added"] == 2 and set(d["views"]) == {"L", "ab", "depth"}
        assert len(opened) == 4 and all(n.startswith("cmc-decode") for n in opened), opened  # 2 items x 2 images
        for view in ("L", "ab"):
            z = core.rt.embed_items(view, [ds.sources["rgb"][21]])
            with ThumbStore(core.store.path, readonly=True) as ts:  # the stored vector is what was indexed
                np.testing.assert_allclose(ts.get_embedding("once-21", view), z[0], rtol=2.0 ** -11, atol=1e-6)
            hit = run(core.search({"view": view, "array": None, "image": png_b64(ds.sources["rgb"][21])}, view, 1))
            assert hit["results"][0]["key"] == "once-21" and hit["results"][0]["score"] == pytest.approx(
                float(z[0] @ z[0]), abs=1e-4)
    finally:
        run(core.index_remove(["once-20", "once-21"]))


def _item(key="k-ok", metadata=None, core=None):
    return {"key": key, "metadata": metadata or {}, "inputs": {"rgb": png_b64(core.ds.sources["rgb"][0])}}


@pytest.mark.parametrize("key,status", [("x" * 257, 413), ("", 400), ("a\x00b", 400), ("tab\there", 400),
                                        ("lone\ud800surrogate", 400), (12, 400)])
def test_item9_10_key_limits_name_the_field(core, key, status):
    got, body = _api_error(core.index_add([_item(key, core=core)]))
    assert got == status and body["field"] == "items[0].key", body
    got, body = _api_error(core.index_remove(["item-0", key]))
    assert got == status and body["field"] == "keys[1]", body


def test_item9_metadata_limits_and_optional_metadata_in_search(core):
    from serving.limits import trim_hits
    big = {"blob": "x" * (16 << 10)}
    status, body = _api_error(core.index_add([_item(metadata=big, core=core)]))
    assert status == 413 and body["field"] == "items[0].metadata" and "16384" in body["detail"]
    deep: dict = {}
    node = deep
    for _ in range(9):
        node["a"] = {}
        node = node["a"]
    status, body = _api_error(core.index_add([_item(metadata=deep, core=core)]))
    assert status == 400 and body["field"] == "items[0].metadata" and "deeper than 8" in body["detail"]
    status, body = _api_error(core.index_add([_item(metadata={"s": "\udcff"}, core=core)]))
    assert status == 400 and "surrogate" in body["detail"]
    q = {"view": "L", "image": png_b64(core.ds.sources["rgb"][4])}
    with_meta = run(core.search(q, None, 5))["results"]
    without = run(core.search(q, None, 5, include_metadata=False))["results"]
    assert [h["key"] for h in with_meta] == [h["key"] for h in without] and "metadata" in with_meta[0]
    assert all(set(h) == {"id", "key", "score"} for h in without)
    hits = [{"id": i, "key": str(i), "score": 0.0, "metadata": {"m": "y" * 1000}} for i in range(10)]
    with pytest.raises(Exception, match="include_metadata=false"):
        trim_hits(hits, True, budget=5000)
    assert len(trim_hits(hits, False, budget=5000)) == 10


def test_item10_huge_integers_and_lone_surrogates_are_400(core):
    status, body = _api_error(core.embed("fou", None, [[10 ** 400] * 8]))
    assert status == 400 and body["field"] == "arrays" and "OverflowError" in body["detail"]
    status, body = _api_error(core.index_add([{"key": "big-int", "inputs": {"fou": [10 ** 400] * 8}}]))
    assert status == 400  # fou is not indexed here: named as an unknown input, never a 500
    status, body = _api_error(core.index_remove(["\ud800"]))
    assert status == 400 and body["field"] == "keys[0]"


def test_item11_non_finite_embeddings_are_400_naming_the_input(core):
    ok = [0.5] * 8
    status, body = _api_error(core.embed("fou", None, [ok, [3e38] * 8]))
    assert status == 400 and body["field"] == "arrays[1]" and "non-finite" in body["detail"]
    status, body = _api_error(core.similarity(a={"view": "fou", "array": [3e38] * 8},
                                              b={"view": "L", "image": png_b64(core.ds.sources["rgb"][0])}))
    assert status == 400 and body["field"].startswith("a.arrays")
    status, body = _api_error(core.embed("fou", None, [[1e39] * 8]))  # beyond float32: inf on conversion
    assert status == 400 and body["field"] == "arrays"
    assert np.isfinite(run(core.embed("fou", None, [ok]))["embeddings"]).all()


def test_item14_duplicate_keys_in_remove_are_400_keys(core):
    status, body = _api_error(core.index_remove(["item-1", "item-2", "item-1"]))
    assert status == 400 and body["field"] == "keys" and "keys[0] and keys[2]" in body["detail"]
    assert core.store.ids_of(["item-1"])[0] is not None  # nothing removed
    status, body = _api_error(core.index_add([_item("dup", core=core), _item("dup", core=core)]))
    assert status == 400 and body["field"] == "items[1].key"


def test_item13_protected_mode_writes_only_from_loopback():
    """No token: reads from anywhere, writes (/index/add, /index/remove) only from loopback (403 otherwise);
    a token opens everything to its holder."""
    from serving.auth import AccessControl, is_loopback

    def post_from(app, host, path, **kw):
        async def go():
            t = httpx.ASGITransport(app=app, client=(host, 40000))
            async with httpx.AsyncClient(transport=t, base_url="http://127.0.0.1:3000") as c:
                return await c.post(path, **kw)
        return run(go())

    open_app = _asgi(AccessControl, token=None)
    for path in ("/index/add", "/index/remove"):
        r = post_from(open_app, "203.0.113.7", path, content=b"{}")
        assert r.status_code == 403 and r.json()["error"] == "forbidden" and "CMC_API_TOKEN" in r.json()["detail"]
        for host in ("127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"):
            assert post_from(open_app, host, path, content=b"{}").status_code == 200, host
    for path in ("/search", "/embed", "/info"):
        assert post_from(open_app, "203.0.113.7", path, content=b"{}").status_code == 200
    tok = _asgi(AccessControl, token="s3")
    assert post_from(tok, "203.0.113.7", "/index/add", content=b"{}").status_code == 401
    assert post_from(tok, "203.0.113.7", "/index/add", content=b"{}",
                     headers={"Authorization": "Bearer s3"}).status_code == 200
    assert not is_loopback(None) and not is_loopback(("10.0.0.1", 1)) and not is_loopback(("unix", 0))


GUARD_JSON = ("/embed", "/similarity", "/search", "/index/add", "/index/remove", "/info")


def _guarded():
    from serving.guard import ContentGuard
    return _asgi(ContentGuard)


def test_item10_malformed_content_type_and_multipart_are_4xx_on_every_endpoint():
    app = _guarded()
    for path in GUARD_JSON + ("/embed_file",):
        multipart = 400 if path in ("/embed_file", "/embed") else 415  # /embed takes multipart too (binary.py)
        for ct, status in [("multipart/form-data", multipart), ("multipart/form-data; boundary=", multipart),
                           ("text/plain", 415), ("application/x-www-form-urlencoded", 415),
                           ("garbage", 400), ("application/json; charset", 400)]:
            r = _post(app, path, content=b"{}", headers={"content-type": ct})
            assert r.status_code == status and r.json()["field"] == "Content-Type", (path, ct, r.text)
    assert _post(app, "/embed", content=b"{}", headers={"content-type": "application/json; charset=utf-8"}
                 ).status_code == 200
    assert _post(app, "/embed", content=b"{}").status_code == 200  # no Content-Type: JSON, as BentoML reads it
    assert _post(app, "/embed_file", content=b"{}", headers={"content-type": "application/json"}).status_code == 415
    # broken multipart bodies on /embed_file: 400, never passed on
    ct = {"content-type": "multipart/form-data; boundary=XyZ"}
    for body in [b"--XyZ\r\nContent-Disposition: form-data; name=\"view\"\r\n\r\nL",  # no closing boundary
                 b"garbage without any boundary",
                 b"--XyZ\r\nno-colon-header\r\n\r\nL\r\n--XyZ--\r\n",
                 b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nL\r\n--XyZ--\r\n"]:  # part without a name
        r = _post(app, "/embed_file", content=body, headers=ct)
        assert r.status_code == 400, (body, r.text)


def _multipart_text(fields: dict, boundary: str = "b0undary") -> bytes:
    """A multipart/form-data body of text parts only (as `curl -F image=https://...` sends)."""
    out = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                   for k, v in fields.items())
    return out + f"--{boundary}--\r\n".encode()


def test_item6_10_embed_file_takes_an_uploaded_file_only():
    app = _guarded()
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 40
    ok_r = _post(app, "/embed_file", files={"image": ("x.png", png, "image/png")}, data={"view": "L"})
    assert ok_r.status_code == 200 and int(ok_r.text) > len(png)  # replayed whole to the app
    assert _post(app, "/embed_file", data={"image": "http://127.0.0.1:9/x.png", "view": "L"}).status_code == 415
    r = _post(app, "/embed_file", content=_multipart_text({"image": "http://127.0.0.1:9/x.png", "view": "L"}),
              headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 400 and r.json()["field"] == "image" and "uploaded file" in r.json()["detail"]
    deep = "[" * 5000 + "]" * 5000  # BentoML would json.loads this form field: RecursionError
    r = _post(app, "/embed_file", files={"image": ("x.png", png, "image/png")}, data={"view": deep})
    assert r.status_code == 400
    r = _post(app, "/embed_file", files={"image": ("x.png", png, "image/png")}, data={"view": "L", "extra": "1"})
    assert r.status_code == 400 and r.json()["field"] == "extra"
    two = [("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))]
    r = _post(app, "/embed_file", files=two, data={"view": "L"})
    assert r.status_code == 400 and r.json()["field"] == "image"


def test_issue23_info_reports_the_providers_the_sessions_got(core, monkeypatch):
    """Asked for CUDA where it cannot load, onnxruntime runs on the CPU: /info says so, not the request."""
    from models import runtime
    monkeypatch.setattr(runtime, "providers", lambda device="auto": ["CUDAExecutionProvider", "CPUExecutionProvider"])
    rt = runtime.Runtime(core.rt.path)  # auto: the quiet fallback
    assert rt.providers == rt.sessions[next(iter(rt.views))].get_providers()
    assert rt.requested[0] == "CUDAExecutionProvider"
    if "CUDAExecutionProvider" not in rt.providers:  # this machine has no usable CUDA provider
        assert rt.providers == ["CPUExecutionProvider"]
        from serving.core import Core, Settings
        c = Core(rt, None, Settings())
        try:
            assert run(c.info())["providers"] == ["CPUExecutionProvider"]
        finally:
            c.close()


def test_issue23_cmc_device_cuda_fails_at_start_without_cuda(core, monkeypatch):
    from models import runtime
    from serving.core import Core, Settings
    if runtime.gpu_usable():
        pytest.skip("a usable CUDA provider: the fallback cannot happen here")
    monkeypatch.setenv("CMC_DEVICE", "cuda")
    monkeypatch.setenv("CMC_MODEL", str(core.rt.path))
    with pytest.raises(RuntimeError, match="^CMC_DEVICE=cuda: device 'cuda': onnxruntime did not give"):
        Core.load(Settings())
    with pytest.raises(runtime.DeviceError, match="'cuda'.*CUDA provider.*CPUExecutionProvider"):
        runtime.Runtime(core.rt.path, device="cuda")
