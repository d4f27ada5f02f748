"""The request path of the server, on real `bentoml serve` processes.

Binary forms of POST /embed: raw image bodies, multipart with many files, base64 and .npy answers - each equal
to the JSON form within 1e-6 - and their bad inputs answered 4xx in the error envelope. The fast JSON layer
(serving/fastjson.py): the same answers as BentoML's own route for valid and invalid requests to every endpoint.

Two servers of one random-init model (L, ab, depth, fou) and a 12-item index, with a bearer token,
CMC_MAX_BODY_MB=1, CMC_MAX_ITEMS=4 and the access log at its default (off for /embed, errors still logged):
``srv`` with the defaults (CMC_FAST_JSON=1) and ``route`` with CMC_FAST_JSON=0.
"""
from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from server_fixtures import Server, model_and_index, png_b64, scenes
from serving.binary import decode_base64_embeddings

pytestmark = pytest.mark.server
TOKEN = "bin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("binary")
    ds = scenes(16)
    common = model_and_index(base, 12, ds) | {"CMC_API_TOKEN": TOKEN, "CMC_MAX_BODY_MB": "1", "CMC_MAX_ITEMS": "4"}
    srv = Server(common, base / "server.log")
    route = Server(common | {"CMC_FAST_JSON": "0"}, base / "route.log")  # serves the index read-only
    try:
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda s: s.wait_ready(), (srv, route)))
        pngs = [base64.b64decode(png_b64(ds.sources["rgb"][i])) for i in range(3)]
        yield {"srv": srv, "route": route, "pngs": pngs, "ds": ds}
    finally:
        srv.stop()
        route.stop()


def post(world, path="/embed", headers=None, auth=True, **kw) -> httpx.Response:
    h = (AUTH if auth else {}) | (headers or {})
    return httpx.post(world["srv"].url + path, headers=h, timeout=60, **kw)


def json_reference(world, view: str, images: list[bytes]) -> np.ndarray:
    r = post(world, json={"view": view, "images": [base64.b64encode(b).decode() for b in images]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == 128 and len(body["embeddings"]) == len(images)
    return np.asarray(body["embeddings"], np.float32)


def from_npy(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    z = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert z.dtype == np.dtype("<f4")
    return z


def from_b64(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["encoding"] == "base64" and body["dtype"] == "<f4"
    return decode_base64_embeddings(body)  # the client-side helper serving.binary offers


def multipart(pngs: list[bytes], **fields) -> dict:
    return {"files": [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)], "data": fields}


# ---------------------------------------------------------------------------------------------- equal to JSON
def test_raw_image_body_equals_json(world):
    png = world["pngs"][0]
    ref = json_reference(world, "L", [png])
    r = post(world, "/embed?view=L", {"content-type": "image/png"}, content=png)
    assert r.status_code == 200, r.text
    z = np.asarray(r.json()["embeddings"], np.float32)
    assert z.shape == (1, 128)
    np.testing.assert_allclose(z, ref, atol=1e-6)
    assert abs(np.linalg.norm(z[0]) - 1) < 1e-4


def test_jpeg_and_webp_bodies(world):
    from PIL import Image
    a = world["ds"].sources["rgb"][1]
    for fmt, ctype in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt)
        ref = json_reference(world, "ab", [buf.getvalue()])
        r = post(world, "/embed?view=ab", {"content-type": ctype}, content=buf.getvalue())
        np.testing.assert_allclose(np.asarray(r.json()["embeddings"], np.float32), ref, atol=1e-6)


def test_multipart_many_files_equals_json(world):
    ref = json_reference(world, "L", world["pngs"])
    r = post(world, **multipart(world["pngs"], view="L"))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.asarray(r.json()["embeddings"], np.float32), ref, atol=1e-6)
    r = post(world, "/embed?view=L", **multipart(world["pngs"]))  # the view in the query string
    np.testing.assert_allclose(np.asarray(r.json()["embeddings"], np.float32), ref, atol=1e-6)


def test_base64_answers_equal_json(world):
    pngs = world["pngs"]
    ref = json_reference(world, "L", pngs)
    b64 = [base64.b64encode(b).decode() for b in pngs]
    np.testing.assert_allclose(from_b64(post(world, json={"view": "L", "images": b64, "encoding": "base64"})),
                               ref, atol=1e-6)  # through the BentoML endpoint
    np.testing.assert_allclose(from_b64(post(world, "/embed?encoding=base64", json={"view": "L", "images": b64})),
                               ref, atol=1e-6)
    np.testing.assert_allclose(from_b64(post(world, "/embed?view=L&encoding=base64", {"content-type": "image/png"},
                                             content=pngs[0])), ref[:1], atol=1e-6)
    np.testing.assert_allclose(from_b64(post(world, **multipart(pngs, view="L", encoding="base64"))), ref, atol=1e-6)


def test_npy_answers_equal_json(world):
    pngs = world["pngs"]
    ref = json_reference(world, "L", pngs)
    npy = {"accept": "application/x-npy"}
    b64 = [base64.b64encode(b).decode() for b in pngs]
    np.testing.assert_allclose(from_npy(post(world, headers=npy, json={"view": "L", "images": b64})), ref, atol=1e-6)
    np.testing.assert_allclose(from_npy(post(world, "/embed?view=L", npy | {"content-type": "image/png"},
                                             content=pngs[2])), ref[2:], atol=1e-6)
    z = from_npy(post(world, headers=npy, **multipart(pngs, view="L")))
    assert z.shape == (3, 128)
    np.testing.assert_allclose(z, ref, atol=1e-6)


def test_depth_and_vector_views(world):
    from models.imageio import encode_png
    d = encode_png(world["ds"].sources["depth"][0])  # 16-bit PNG
    ref = json_reference(world, "depth", [d])
    z = from_npy(post(world, "/embed?view=depth", {"content-type": "image/png", "accept": "application/x-npy"},
                      content=d))
    np.testing.assert_allclose(z, ref, atol=1e-6)
    arrays = np.random.default_rng(0).standard_normal((2, 8)).tolist()
    r = post(world, json={"view": "fou", "arrays": arrays})
    ref = np.asarray(r.json()["embeddings"], np.float32)
    np.testing.assert_allclose(from_npy(post(world, headers={"accept": "application/x-npy"},
                                             json={"view": "fou", "arrays": arrays})), ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("case,status,field", [
    ("text/plain", 415, "Content-Type"),
    ("octet-stream", 415, "Content-Type"),
    ("empty", 400, "body"),
    ("too_large", 413, "body"),
    ("unknown_view", 400, "view"),
    ("no_view", 400, "view"),
    ("vector_view", 400, "images"),
    ("not_an_image", 400, "images"),
    ("bad_encoding", 400, "encoding"),
    ("multipart_no_images", 400, "images"),
    ("multipart_text_images", 400, "images"),
    ("multipart_unknown_field", 400, "extra"),
    ("multipart_too_many", 413, "images"),
])
def test_bad_binary_requests(world, case, status, field):
    png = world["pngs"][0]
    img = {"content-type": "image/png"}
    r = {
        "text/plain": lambda: post(world, "/embed?view=L", {"content-type": "text/plain"}, content=png),
        "octet-stream": lambda: post(world, "/embed?view=L", {"content-type": "application/octet-stream"},
                                     content=png),
        "empty": lambda: post(world, "/embed?view=L", img, content=b""),
        "too_large": lambda: post(world, "/embed?view=L", img, content=png + b"\0" * (1 << 20)),
        "unknown_view": lambda: post(world, "/embed?view=nope", img, content=png),
        "no_view": lambda: post(world, "/embed", img, content=png),
        "vector_view": lambda: post(world, "/embed?view=fou", img, content=png),
        "not_an_image": lambda: post(world, "/embed?view=L", img, content=b"GIF89a not really"),
        "bad_encoding": lambda: post(world, "/embed?view=L&encoding=hex", img, content=png),
        "multipart_no_images": lambda: post(world, "/embed", {"content-type": "multipart/form-data; boundary=xx"},
                                            content=b'--xx\r\nContent-Disposition: form-data; name="view"\r\n'
                                                    b'\r\nL\r\n--xx--\r\n'),
        "multipart_text_images": lambda: post(world, "/embed?view=L",
                                              {"content-type": "multipart/form-data; boundary=yy"},
                                              content=b'--yy\r\nContent-Disposition: form-data; name="images"\r\n'
                                                      b'\r\nabc\r\n--yy--\r\n'),
        "multipart_unknown_field": lambda: post(world, **multipart([png], view="L", extra="1")),
        "multipart_too_many": lambda: post(world, **multipart([png] * 6, view="L")),
    }[case]()
    assert r.status_code == status, (case, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail", "field"}, body
    assert body["field"] == field, body
    assert body["detail"]


def test_binary_needs_the_token(world):
    r = post(world, "/embed?view=L", {"content-type": "image/png"}, auth=False, content=world["pngs"][0])
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"


# ---------------------------------------------------------------------------------------------- docs, stack, logs
def test_openapi_documents_the_binary_forms(world):
    spec = httpx.get(world["srv"].url + "/docs.json", headers=AUTH, timeout=30).json()
    op = spec["paths"]["/embed"]["post"]
    assert {"application/json", "image/png", "image/jpeg", "image/webp", "multipart/form-data"} <= set(
        op["requestBody"]["content"])
    assert {p["name"] for p in op["parameters"]} >= {"view", "encoding"}
    assert "application/x-npy" in op["responses"]["200"]["content"]
    assert "415" in op["responses"] and "413" in op["responses"]
    assert "encoding" in json.dumps(op["requestBody"]["content"]["application/json"])


def test_server_runs_uvloop_and_httptools(world):
    info = post(world, "/info", json={}).json()
    assert info["server"] == {"event_loop": "uvloop", "http_parser": "httptools"}, info["server"]


def test_access_log_off_for_embed_but_errors_logged(world):
    post(world, "/embed?view=L", {"content-type": "image/png"}, content=world["pngs"][0])
    post(world, "/embed?view=L", {"content-type": "text/csv"}, content=b"a,b")
    post(world, "/info", json={})
    log = world["srv"].tail(10**7)
    lines = [ln for ln in log.splitlines() if "path=/embed" in ln]
    assert any("status=415" in ln for ln in lines), log[-3000:]
    assert not any("status=200" in ln for ln in lines), lines[:5]
    assert any("path=/info" in ln and "status=200" in ln for ln in log.splitlines())


# ---------------------------------------------------------------------------------------------- fast JSON layer
def json_cases(ds) -> list[tuple[str, bytes]]:
    good = png_b64(ds.sources["rgb"][0])
    q = {"view": "L", "image": good}
    j = lambda d: json.dumps(d).encode()  # noqa: E731
    return [
        ("/embed", j({"view": "L", "images": [good, png_b64(ds.sources["rgb"][1])]})),
        ("/embed", j({"view": "fou", "arrays": [[0.5] * 8]})),
        ("/embed", j({"view": "L", "images": [good], "encoding": "base64"})),
        ("/embed", j({"view": "L", "images": [good], "encoding": "hex"})),
        ("/embed", j({"view": "nope", "images": [good]})),
        ("/embed", j({"images": [good]})),
        ("/embed", j({"view": "fou", "arrays": [["a"] * 8]})),
        ("/embed", j({"view": "L", "images": [good] * 5})),
        ("/embed", j({"view": "L", "images": [base64.b64encode(b"junk").decode()]})),
        ("/embed", b'{"view": "L", "images": ['),
        ("/embed", b"[1, 2]"),
        ("/embed", b""),
        ("/similarity", j({"a": q, "b": {"view": "ab", "image": good}})),
        ("/similarity", j({"query": q, "candidates": [q, {"view": "ab", "image": good}]})),
        ("/similarity", j({"a": q})),
        ("/search", j({"query": q, "k": 3})),
        ("/search", j({"query": {"view": "ab", "image": good}, "target_view": "L", "k": 12})),
        ("/search", j({"query": q, "k": 0})),
        ("/search", j({"query": q, "target_view": "zz"})),
        ("/index/remove", j({"keys": []})),
        ("/info", b"{}"),
    ]


def close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-6
    if isinstance(a, str) and isinstance(b, str):  # messages may name an object's address
        return re.sub(r"0x[0-9a-f]+", "0x", a) == re.sub(r"0x[0-9a-f]+", "0x", b)
    return a == b


def test_fast_json_answers_equal_bentoml_route(world):
    h = AUTH | {"content-type": "application/json"}
    for path, body in json_cases(world["ds"]):
        rf = httpx.post(world["srv"].url + path, content=body, headers=h, timeout=60)
        rs = httpx.post(world["route"].url + path, content=body, headers=h, timeout=60)
        assert rf.status_code == rs.status_code, (path, body[:80], rf.text[:300], rs.text[:300])
        bf, bs = rf.json(), rs.json()
        if path == "/info":  # the settings and the index's writability differ between the two servers
            bf, bs = bf["card"], bs["card"]
        assert close(bf, bs), (path, body[:80], str(bf)[:300], str(bs)[:300])
        if rf.status_code >= 400:
            assert set(bf) == {"error", "detail", "field"}
        # BentoML's route adds its Server header; the fast layer does not: this shows which one answered
        assert "server" not in rf.headers and rs.headers.get("server", "").startswith("BentoML"), path


def test_fast_json_under_concurrency(world):
    imgs = [png_b64(world["ds"].sources["rgb"][i]) for i in range(12)]

    def one(i: int) -> np.ndarray:
        r = post(world, json={"view": "L", "images": [imgs[i]]})
        assert r.status_code == 200, r.text
        return np.asarray(r.json()["embeddings"][0])

    with ThreadPoolExecutor(12) as ex:
        got = np.stack(list(ex.map(one, range(12))))
    ref = np.asarray(post(world, json={"view": "L", "images": imgs[:4]}).json()["embeddings"])
    np.testing.assert_allclose(got[:4], ref, atol=1e-5)


def test_bentoml_client_through_fast_layer(world):
    import bentoml
    b64 = [base64.b64encode(p).decode() for p in world["pngs"]]
    with bentoml.SyncHTTPClient(world["srv"].url, token=TOKEN) as c:
        got = c.embed(view="L", images=b64)
        hits = c.search(query={"view": "L", "image": b64[0]}, k=2)
    np.testing.assert_allclose(np.asarray(got["embeddings"], np.float32), json_reference(world, "L", world["pngs"]),
                               atol=1e-6)
    assert len(hits["results"]) == 2
