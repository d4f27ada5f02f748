"""Binary forms of POST /embed on a real `bentoml serve`: raw image bodies, multipart with many files, base64 and
.npy answers - each equal to the JSON form within 1e-6 - and their bad inputs answered 4xx in the error envelope.

One server: a random-init exported model (L, ab, depth, fou), no index, a bearer token, CMC_MAX_BODY_MB=1,
CMC_MAX_ITEMS=4, access log at its default (off for /embed, errors still logged).
"""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest

from server_fixtures import Server, build_model, png_b64, scenes

pytestmark = pytest.mark.server
TOKEN = "bin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("binary")
    build_model(base / "model")
    srv = Server({"CMC_MODEL": str(base / "model"), "CMC_INDEX": "none", "CMC_THREADS": "1", "CMC_API_TOKEN": TOKEN,
                  "CMC_MAX_BODY_MB": "1", "CMC_MAX_ITEMS": "4", "BENTOML_HOME": str(base / "bentoml"),
                  "CMC_HOME": str(base / "cmc")}, base / "server.log")
    try:
        srv.wait_ready()
        ds = scenes(8)
        pngs = [base64.b64decode(png_b64(ds.sources["rgb"][i])) for i in range(3)]
        yield {"srv": srv, "pngs": pngs, "ds": ds}
    finally:
        srv.stop()


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
    return np.stack([np.frombuffer(base64.b64decode(e), "<f4") for e in body["embeddings"]])


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
