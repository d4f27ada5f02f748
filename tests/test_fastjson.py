"""serving.fastjson: the JSON endpoints answered without BentoML's per-request machinery give the same answers
(status, error envelope, numbers) as BentoML's own route. Two real servers of one model and index:
CMC_FAST_JSON=1 (the default) and CMC_FAST_JSON=0."""
from __future__ import annotations

import base64
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from server_fixtures import Server, build_index, build_model, png_b64, scenes

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("fastjson")
    build_model(base / "model")
    ds = scenes(16)
    build_index(base / "index", base / "model", ds, 12)
    common = {"CMC_MODEL": str(base / "model"), "CMC_INDEX": str(base / "index"), "CMC_THREADS": "1",
              "CMC_MAX_ITEMS": "4", "BENTOML_HOME": str(base / "bentoml"), "CMC_HOME": str(base / "cmc")}
    # the index is opened for writing by one server; the other serves it read-only, which /search needs only
    fast = Server(common | {"CMC_FAST_JSON": "1"}, base / "fast.log")
    slow = Server(common | {"CMC_FAST_JSON": "0"}, base / "slow.log")
    try:
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda s: s.wait_ready(), (fast, slow)))
        yield fast, slow, ds
    finally:
        fast.stop()
        slow.stop()


def cases(ds) -> list[tuple[str, bytes]]:
    import json
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


def test_fast_path_answers_equal_bentoml_route(pair):
    fast, slow, ds = pair
    h = {"content-type": "application/json"}
    for path, body in cases(ds):
        rf = httpx.post(fast.url + path, content=body, headers=h, timeout=60)
        rs = httpx.post(slow.url + path, content=body, headers=h, timeout=60)
        assert rf.status_code == rs.status_code, (path, body[:80], rf.text[:300], rs.text[:300])
        bf, bs = rf.json(), rs.json()
        if path == "/info":  # differs in the settings' own flag and the index's writability only
            bf, bs = bf["card"], bs["card"]
        assert close(bf, bs), (path, body[:80], str(bf)[:300], str(bs)[:300])
        if rf.status_code >= 400:
            assert set(bf) == {"error", "detail", "field"}
        # BentoML's route adds its Server header; the fast path does not, which shows which path answered
        assert "server" not in rf.headers and rs.headers.get("server", "").startswith("BentoML"), path


def test_fast_path_under_concurrency(pair):
    fast, _, ds = pair
    imgs = [png_b64(ds.sources["rgb"][i]) for i in range(12)]

    def one(i: int) -> np.ndarray:
        r = httpx.post(fast.url + "/embed", json={"view": "L", "images": [imgs[i]]}, timeout=60)
        assert r.status_code == 200, r.text
        return np.asarray(r.json()["embeddings"][0])

    with ThreadPoolExecutor(12) as ex:
        got = np.stack(list(ex.map(one, range(12))))
    ref = np.asarray(httpx.post(fast.url + "/embed", json={"view": "L", "images": imgs[:4]}).json()["embeddings"])
    np.testing.assert_allclose(got[:4], ref, atol=1e-5)
