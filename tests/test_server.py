"""The CMC server against real `bentoml serve` processes (started and stopped by fixtures).

Main server: a random-init exported model, a 20-item scenes gallery index, a bearer token, small limits
(CMC_MAX_ITEMS=8, CMC_MAX_PIXELS=1e6, CMC_MAX_BODY_MB=1) and adaptive batching. Second server: no index, no
token, batching off.
"""
from __future__ import annotations

import base64
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from server_fixtures import Server, build_index, build_model, png_b64, scenes

pytestmark = pytest.mark.server
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_INDEXED = 20


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("server")
    model, card = build_model(base / "model")
    ds = scenes(24)
    keys = build_index(base / "index", base / "model", ds, N_INDEXED)
    common = {"CMC_MODEL": str(base / "model"), "BENTOML_HOME": str(base / "bentoml"), "CMC_HOME": str(base / "cmc"),
              "CMC_THREADS": "1"}
    main = Server(common | {"CMC_INDEX": str(base / "index"), "CMC_API_TOKEN": TOKEN, "CMC_MAX_ITEMS": "8",
                            "CMC_MAX_PIXELS": "1000000", "CMC_MAX_BODY_MB": "1", "CMC_INDEX_MEMORY_MB": "400"},
                  base / "main.log")
    bare = Server(common | {"CMC_INDEX": "none", "CMC_BATCHING": "0"}, base / "bare.log")
    try:
        main.wait_ready()
        bare.wait_ready()
        yield {"main": main, "bare": bare, "model": model, "card": card, "ds": ds, "keys": keys,
               "model_dir": base / "model"}
    finally:
        main.stop()
        bare.stop()


def post(server, path, body=None, headers=AUTH, raw: bytes | None = None, timeout=60):
    content = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
    return httpx.post(server.url + path, content=content, timeout=timeout,
                      headers={"content-type": "application/json", **(headers or {})})


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def rgb(world, i):
    return png_b64(world["ds"].sources["rgb"][i])


def depth_b64(world, i):
    from models.imageio import encode_png
    return base64.b64encode(encode_png(world["ds"].sources["depth"][i])).decode()


# ---------------------------------------------------------------------------------------------- health, auth, info
def test_health_endpoints_need_no_token(world):
    for path in ("/readyz", "/livez", "/metrics"):
        assert httpx.get(world["main"].url + path).status_code == 200, path


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": TOKEN}])
def test_token_required(world, headers):
    for path in ("/info", "/embed", "/search", "/index/add"):
        r = post(world["main"], path, {}, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"] == "unauthorized"
    assert httpx.get(world["main"].url + "/docs.json", headers=headers).status_code == 401


def test_info(world):
    d = ok(post(world["main"], "/info"))
    assert d["dim"] == 128 and d["image_size"] == 32 and d["fingerprint"] == world["card"].fingerprint
    assert set(d["views"]) == {"L", "ab", "depth", "fou"}
    assert d["views"]["fou"]["source"] == "vector" and d["views"]["L"]["input"]
    assert d["index"]["counts"]["L"] >= N_INDEXED - 1
    # CMC_INDEX_MEMORY_MB reaches the store: shared by the index's views when one is re-chosen as it grows
    assert d["settings"]["index_memory_mb"] == 400
    assert d["index"]["memory_budget_mb_per_view"] == pytest.approx(400 / len(d["index"]["views"]), abs=1e-3)
    assert d["batching"]["enabled"] and d["card"]["tau"] == pytest.approx(d["tau"])
    bare = ok(post(world["bare"], "/info", headers={}))
    assert not bare["index"]["available"] and not bare["batching"]["enabled"]


# ---------------------------------------------------------------------------------------------- /embed
def test_embed_equals_runtime_and_torch(world):
    import torch

    from models.runtime import Runtime
    img = world["ds"].sources["rgb"][3]
    d = ok(post(world["main"], "/embed", {"view": "L", "images": [png_b64(img)]}))
    z = np.asarray(d["embeddings"], np.float32)
    assert z.shape == (1, 128) and d["dim"] == 128
    assert np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    rt = Runtime(world["model_dir"])
    assert np.abs(z - rt.embed_items("L", [img])).max() < 1e-4
    x = torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1)[None] / 255.0)
    with torch.no_grad():
        zt = world["model"].views["L"](x)
    zt = torch.nn.functional.normalize(zt, dim=1).numpy()
    assert np.abs(z - zt).max() < 1e-4
    # the same through the server without batching, and through the multipart form
    zb = np.asarray(ok(post(world["bare"], "/embed", {"view": "L", "images": [png_b64(img)]}, headers={}))
                    ["embeddings"], np.float32)
    assert np.abs(z - zb).max() < 1e-5
    r = httpx.post(world["main"].url + "/embed_file", headers=AUTH, data={"view": "L"},
                   files={"image": ("x.png", base64.b64decode(png_b64(img)), "image/png")})
    assert np.abs(np.asarray(ok(r)["embeddings"], np.float32) - z).max() < 1e-5


def test_embed_batch_depth_and_vector(world):
    from models.runtime import Runtime
    rt = Runtime(world["model_dir"])
    d = ok(post(world["main"], "/embed", {"view": "depth", "images": [depth_b64(world, i) for i in range(3)]}))
    ref = rt.embed_sources("depth", {"depth": world["ds"].sources["depth"][:3]})
    assert np.abs(np.asarray(d["embeddings"]) - ref).max() < 1e-4
    v = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    d = ok(post(world["main"], "/embed", {"view": "fou", "arrays": v.tolist()}))
    assert np.abs(np.asarray(d["embeddings"]) - rt.embed("fou", v)).max() < 1e-4


def test_concurrent_requests_are_batched_and_correct(world):
    imgs = [rgb(world, i) for i in range(16)]
    single = [np.asarray(ok(post(world["bare"], "/embed", {"view": "ab", "images": [b]}, headers={}))["embeddings"])
              for b in imgs]
    with ThreadPoolExecutor(16) as ex:
        outs = list(ex.map(lambda b: ok(post(world["main"], "/embed", {"view": "ab", "images": [b]})), imgs))
    for o, s in zip(outs, single):
        assert np.abs(np.asarray(o["embeddings"]) - s).max() < 1e-4
    b = ok(post(world["main"], "/info"))["batching"]
    assert b["rows"] >= 16 and b["batches"] >= 1 and b["mean_batch_size"] >= 1


# ---------------------------------------------------------------------------------------------- /similarity
def test_similarity_pair_and_rank(world):
    a, b = rgb(world, 0), rgb(world, 1)
    za = np.asarray(ok(post(world["main"], "/embed", {"view": "L", "images": [a]}))["embeddings"][0])
    zb = np.asarray(ok(post(world["main"], "/embed", {"view": "ab", "images": [b]}))["embeddings"][0])
    d = ok(post(world["main"], "/similarity", {"a": {"view": "L", "image": a}, "b": {"view": "ab", "image": b}}))
    assert d["cosine"] == pytest.approx(float(za @ zb), abs=1e-5)
    assert d["critic"] == pytest.approx(math.exp(d["cosine"] / d["tau"]), rel=1e-6)
    cands = [{"view": "ab", "image": rgb(world, i)} for i in range(4)] + [{"view": "fou", "array": [0.5] * 8}]
    d = ok(post(world["main"], "/similarity", {"query": {"view": "L", "image": a}, "candidates": cands}))
    scores = [r["score"] for r in d["ranking"]]
    assert scores == sorted(scores, reverse=True) and sorted(r["index"] for r in d["ranking"]) == list(range(5))
    top = d["ranking"][0]
    assert top["critic"] == pytest.approx(math.exp(top["score"] / d["tau"]), rel=1e-6)


# ---------------------------------------------------------------------------------------------- /search and the index
@pytest.mark.parametrize("view,source", [("L", "rgb"), ("ab", "rgb"), ("depth", "depth")])
def test_indexed_item_is_its_own_top_hit(world, view, source):
    for i in (0, 7, 13):
        img = rgb(world, i) if source == "rgb" else depth_b64(world, i)
        d = ok(post(world["main"], "/search", {"query": {"view": view, "image": img}, "target_view": view, "k": 5}))
        assert d["results"][0]["key"] == f"item-{i}", d["results"][:2]
        assert d["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert d["results"][0]["metadata"]["i"] == i and len(d["results"]) == 5


def test_cross_view_search_answers(world):
    d = ok(post(world["main"], "/search", {"query": {"view": "L", "image": rgb(world, 2)}, "target_view": "ab",
                                           "k": 10}))
    assert d["target_view"] == "ab" and len(d["results"]) == 10
    assert {"id", "key", "score", "metadata"} <= set(d["results"][0])


def test_index_add_search_remove(world):
    i = 22  # not indexed
    item = {"key": "new-22", "metadata": {"note": "added"}, "inputs": {"rgb": rgb(world, i), "depth": depth_b64(world, i)}}
    d = ok(post(world["main"], "/index/add", {"items": [item]}))
    assert d["added"] == 1 and set(d["views"]) == {"L", "ab", "depth"}
    q = {"query": {"view": "L", "image": rgb(world, i)}, "k": 1}
    hit = ok(post(world["main"], "/search", q))["results"][0]
    assert hit["key"] == "new-22" and hit["metadata"] == {"note": "added"}
    r = post(world["main"], "/index/add", {"items": [item]})
    assert r.status_code == 409 and r.json()["error"] == "conflict"
    assert ok(post(world["main"], "/index/remove", {"keys": ["new-22"]}))["removed"] == 1
    assert ok(post(world["main"], "/search", q))["results"][0]["key"] != "new-22"
    r = post(world["main"], "/index/remove", {"keys": ["new-22"]})
    assert r.status_code == 404 and r.json()["field"] == "keys"


def test_no_index_is_503_and_the_rest_works(world):
    r = post(world["bare"], "/search", {"query": {"view": "L", "image": rgb(world, 0)}}, headers={})
    assert r.status_code == 503 and r.json()["error"] == "no_index" and "CMC_INDEX" in r.json()["detail"]
    assert post(world["bare"], "/index/add", {"items": [{"key": "x", "inputs": {"rgb": rgb(world, 0)}}]},
                headers={}).status_code == 503
    ok(post(world["bare"], "/similarity", {"a": {"view": "L", "image": rgb(world, 0)},
                                           "b": {"view": "depth", "image": depth_b64(world, 0)}}, headers={}))


# ---------------------------------------------------------------------------------------------- bad input
def _png_bytes(shape, mode=None) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bad_cases(world):
    good = rgb(world, 0)
    png = base64.b64decode(good)
    trunc = base64.b64encode(png[: len(png) // 2]).decode()
    bomb = base64.b64encode(_png_bytes((1200, 1000, 3))).decode()  # 1.2 Mpx > CMC_MAX_PIXELS=1e6, few KB
    q = {"view": "L", "image": good}
    return [
        ("undecodable", "/embed", {"view": "L", "images": [base64.b64encode(b"not an image").decode()]}, 400, "images"),
        ("truncated", "/embed", {"view": "L", "images": [trunc]}, 400, "images"),
        ("bad base64", "/embed", {"view": "L", "images": ["%%%not-base64"]}, 400, "images[0]"),
        ("bomb", "/embed", {"view": "L", "images": [bomb]}, 400, "images"),
        ("unknown view", "/embed", {"view": "nope", "images": [good]}, 400, "view"),
        ("vector for image view", "/embed", {"view": "L", "arrays": [[0.0] * 8]}, 400, "arrays"),
        ("image for vector view", "/embed", {"view": "fou", "images": [good]}, 400, "images"),
        ("wrong vector length", "/embed", {"view": "fou", "arrays": [[0.0] * 7]}, 400, "arrays"),
        ("nan", "/embed", {"view": "fou", "arrays": [[float("nan")] * 8]}, 400, "arrays"),
        ("inf", "/embed", {"view": "fou", "arrays": [[0.0] * 7 + [float("inf")]]}, 400, "arrays"),
        ("empty list", "/embed", {"view": "L", "images": []}, 400, "images"),
        ("no inputs", "/embed", {"view": "L"}, 400, "images"),
        ("batch over limit", "/embed", {"view": "L", "images": [good] * 9}, 413, "images"),
        ("missing field", "/embed", {"images": [good]}, 400, "view"),
        ("wrong type", "/embed", {"view": "fou", "arrays": [["a"] * 8]}, 400, "arrays.0.0"),
        ("k zero", "/search", {"query": q, "k": 0}, 400, "k"),
        ("k negative", "/search", {"query": q, "k": -3}, 400, "k"),
        ("k over limit", "/search", {"query": q, "k": 100000}, 400, "k"),
        ("unknown target view", "/search", {"query": q, "target_view": "fou"}, 400, "target_view"),
        ("search unknown view", "/search", {"query": {"view": "zz", "image": good}}, 400, "query.view"),
        ("similarity half pair", "/similarity", {"a": q}, 400, "b"),
        ("similarity nothing", "/similarity", {}, 400, "a"),
        ("similarity empty candidates", "/similarity", {"query": q, "candidates": []}, 400, "candidates"),
        ("similarity image+array", "/similarity", {"a": {"view": "L", "image": good, "array": [1]}, "b": q}, 400, "a"),
        ("add unknown source", "/index/add", {"items": [{"key": "z", "inputs": {"sound": good}}]}, 400,
         "items[0].inputs.sound"),
        ("add empty items", "/index/add", {"items": []}, 400, "items"),
        ("add bad image", "/index/add", {"items": [{"key": "z", "inputs": {"rgb": trunc}}]}, 400, None),
        ("duplicate key", "/index/add", {"items": [{"key": "item-1", "inputs": {"rgb": good}}]}, 409, "items"),
        ("unknown key", "/index/remove", {"keys": ["no-such-key"]}, 404, "keys"),
        ("remove empty", "/index/remove", {"keys": []}, 400, "keys"),
    ]


def test_bad_inputs_are_4xx_json_and_the_server_survives(world):
    srv = world["main"]
    failures = []
    for name, path, body, status, field in _bad_cases(world):
        r = post(srv, path, body)
        d = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or not {"error", "detail"} <= set(d) or (field and d.get("field") != field):
            failures.append((name, r.status_code, r.text[:300]))
    # raw-body cases
    for name, raw, status in [("malformed json", b'{"view": "L", "images": [', 400),
                              ("not an object", b"[1, 2, 3]", 400),
                              ("body over limit", b'{"view": "L", "images": ["' + b"A" * (2 << 20) + b'"]}', 413)]:
        r = post(srv, "/embed", raw=raw)
        if r.status_code != status or not {"error", "detail"} <= set(r.json()):
            failures.append((name, r.status_code, r.text[:300]))
    r = httpx.post(srv.url + "/embed_file", headers=AUTH, data={"view": "L"},
                   files={"image": ("x.png", b"garbage", "image/png")})
    if r.status_code != 400 or r.json().get("error") != "invalid_input":
        failures.append(("embed_file garbage", r.status_code, r.text[:300]))
    assert not failures, "\n".join(map(str, failures))
    # the same process still answers correctly
    assert srv.alive()
    img = world["ds"].sources["rgb"][5]
    from models.runtime import Runtime
    z = np.asarray(ok(post(srv, "/embed", {"view": "L", "images": [png_b64(img)]}))["embeddings"])
    assert np.abs(z - Runtime(world["model_dir"]).embed_items("L", [img])).max() < 1e-4
    d = ok(post(srv, "/search", {"query": {"view": "L", "image": png_b64(img)}, "k": 1}))
    assert d["results"][0]["key"] == "item-5"
    assert "Traceback" not in "\n".join(l for l in srv.tail(200000).splitlines() if "unexpected error" in l)
    assert "unexpected error" not in srv.tail(200000)


# ---------------------------------------------------------------------------------------------- hostile input (issue 9)
def test_item6_embed_file_never_fetches_a_url(world):
    """A text form part `image=http://...` is a 400, and the URL's server receives no request."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            hits.append(self.path)
            body = base64.b64decode(rgb(world, 0))
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/x.png"
        for srv, headers in ((world["main"], AUTH), (world["bare"], {})):
            r = httpx.post(srv.url + "/embed_file", headers=headers, files={"image": (None, url), "view": (None, "L")})
            assert r.status_code == 400 and r.json()["field"] == "image", r.text
            r = httpx.post(srv.url + "/embed_file", headers={**headers, "content-type": "application/json"},
                           content=json.dumps({"image": url, "view": "L"}).encode())
            assert r.status_code == 415, r.text
        httpx.get(url)  # the local server works: exactly this one request reached it
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert hits == ["/x.png"]


def test_item12_metrics_only_label_known_routes(world):
    import secrets
    srv = world["main"]
    paths = [f"/probe-{secrets.token_hex(6)}" for _ in range(20)]
    for i, p in enumerate(paths):
        r = (httpx.get if i % 2 else httpx.post)(srv.url + p, headers=AUTH if i % 4 < 2 else {})
        assert r.status_code in (401, 404, 405), (p, r.status_code)
    ok(post(srv, "/info"))
    text = httpx.get(srv.url + "/metrics").text
    assert not any(p in text for p in paths)
    assert 'endpoint="/other"' in text and 'endpoint="/info"' in text


def test_item10_malformed_bodies_are_4xx_through_the_real_server(world):
    srv = world["main"]
    for path in ("/embed", "/search", "/index/add", "/index/remove", "/info", "/embed_file", "/similarity"):
        r = httpx.post(srv.url + path, headers={**AUTH, "content-type": "multipart/form-data"}, content=b"x")
        assert r.status_code in (400, 415), (path, r.status_code, r.text)
    r = httpx.post(srv.url + "/embed_file", headers={**AUTH, "content-type": "multipart/form-data; boundary=zz"},
                   content=b"--zz\r\nContent-Disposition: form-data; name=\"view\"\r\n\r\nL")
    assert r.status_code == 400 and r.json()["error"] in ("bad_request", "invalid_input")
    deep = "[" * 100000 + "]" * 100000
    body = '{"items": [{"key": "d", "metadata": {"a": ' + deep + '}, "inputs": {}}]}'
    r = post(srv, "/index/add", raw=body.encode())
    assert r.status_code == 400, r.text
    r = post(srv, "/embed", raw=b'{"view": "fou", "arrays": [[' + b"9" * 500 + b', 1, 1, 1, 1, 1, 1, 1]]}')
    assert r.status_code == 400, r.text
    img = rgb(world, 0).encode()
    r = post(srv, "/index/add", raw=b'{"items": [{"key": "a\\ud800", "inputs": {"rgb": "' + img + b'"}}]}')
    assert r.status_code == 400, r.text  # refused by the JSON parser; Core refuses it too (test_serving_core)
    r = post(srv, "/index/remove", {"keys": ["item-1", "item-1"]})
    assert r.status_code == 400 and r.json()["field"] == "keys", r.text
    r = post(srv, "/embed", {"view": "fou", "arrays": [[3e38] * 8]})
    assert r.status_code == 400 and r.json()["field"] == "arrays[0]", r.text
    d = ok(post(srv, "/search", {"query": {"view": "L", "image": rgb(world, 3)}, "k": 3, "include_metadata": False}))
    assert d["results"][0]["key"] == "item-3" and "metadata" not in d["results"][0]
    assert srv.alive() and "unexpected error" not in srv.tail(10 ** 7)


# ---------------------------------------------------------------------------------------------- cross-view recall
@pytest.mark.slow
def test_cross_view_search_recall_trained(tmp_path):
    """A tiny model trained for 3 epochs on scenes: L query -> ab gallery through the server, recall@10 recorded."""
    import sys

    from conftest import run_cli
    from server_fixtures import ROOT as R
    export = R / "runs" / "default" / "export"
    default_model = (export / "card.json").exists()  # the default run's model: 88.5% L->ab R@10 on 2,000 scenes
    if not default_model:
        export = tmp_path / "run"
        r = run_cli(["-m", "train.pretrain", "--data", "scenes:n=2000,size=32,seed=3,test_n=200", "--epochs", "3",
                     "--image-size", "32", "--arch", "resnet10", "--width", "0.25", "--out", str(export),
                     "--index", "false"], timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        export = next(p.parent for p in export.rglob("card.json"))
    from models.card import load_card
    size = load_card(export).image_size
    ds = scenes(200, size=size, seed=3)
    n = 200
    build_index(tmp_path / "index", export, ds, n)
    srv = Server({"CMC_MODEL": str(export), "CMC_INDEX": str(tmp_path / "index"),
                  "BENTOML_HOME": str(tmp_path / "bentoml")}, tmp_path / "srv.log").wait_ready()
    try:
        hits = 0
        for i in range(n):
            d = ok(post(srv, "/search", {"query": {"view": "L", "image": png_b64(ds.sources["rgb"][i])},
                                         "target_view": "ab", "k": 10}, headers={}))
            hits += f"item-{i}" in [h["key"] for h in d["results"]]
    finally:
        srv.stop()
    recall = hits / n
    print(f"\ncross-view L->ab recall@10 over {n} scenes: {recall:.3f} (chance {10 / n:.3f})", file=sys.stderr)
    (tmp_path / "recall.txt").write_text(str(recall))
    # recorded: 0.115 with the 3-epoch fixture model (chance 0.05), on a loaded 2-core machine
    assert recall > (0.6 if default_model else 2 * 10 / n)
