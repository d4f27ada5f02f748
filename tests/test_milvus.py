"""The Milvus backend (index/milvus.py) against a real Milvus-protocol server: ``milvus-lite server`` started as a
process. Its semantics are checked call by call against the FAISS store on the same vectors, and two real
`bentoml serve` replicas that share nothing but the Milvus collection see each other's writes at once.

Needs the optional extra: ``pip install -e ".[dev,milvus]"`` (CI installs it); skipped without pymilvus.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
if shutil.which("milvus-lite") is None and not (Path(sys.executable).parent / "milvus-lite").exists():
    pytest.skip("milvus-lite is not installed", allow_module_level=True)

from index.errors import DuplicateKeyError, NotWritableError, StoreError, UnknownKeyError  # noqa: E402
from index.milvus import MilvusStore, choose_index, is_milvus, parse_url  # noqa: E402
from index.store import IndexStore  # noqa: E402
from serving.measure.launch import MilvusLite as MilvusServer  # noqa: E402

FP = "fp-test"


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    base = tmp_path_factory.mktemp("milvus")
    srv = MilvusServer(base / "data").wait_ready()
    try:
        yield srv
    finally:
        srv.stop()


def _data(n=240, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 16)).astype(np.float32)
    b = rng.standard_normal((n, 8)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    keys = [f"k-{i}" if i % 7 else f'odd "key" \\ {i} é' for i in range(n)]  # quotes, backslashes in keys
    return keys, a, b, rng


def _same_hits(s1, s2, xq, view, k):
    """Both stores answer the same keys and metadata in the same order, with the same scores (within 1e-5)."""
    h1, h2 = s1.search_items(xq, view, k), s2.search_items(xq, view, k)
    assert [[(h["key"], h["metadata"]) for h in row] for row in h1] == [[(h["key"], h["metadata"]) for h in row]
                                                                         for row in h2]
    np.testing.assert_allclose([h["score"] for row in h1 for h in row], [h["score"] for row in h2 for h in row],
                               atol=1e-5)


def test_url_parsing():
    assert is_milvus("milvus://h:1/db?collection=c") and not is_milvus("/tmp/index")
    assert parse_url("milvus://h:1/db?collection=c")["uri"] == "http://h:1"
    assert parse_url("milvus://h:1/db?collection=c")["db"] == "db"
    assert parse_url("milvus://h?collection=c")["uri"] == "http://h:19530"
    with pytest.raises(StoreError):
        parse_url("milvus://h:1/db")
    with pytest.raises(StoreError):
        parse_url("milvus://h:1?collection=bad-name")
    assert [choose_index(n, 128)["type"] for n in (0, 49_999, 50_000, 3_999_999, 4_000_000, 10**9)] == [
        "FLAT", "FLAT", "IVF_FLAT", "IVF_FLAT", "HNSW", "HNSW"]
    assert choose_index(1_000_000, 128)["params"]["nlist"] >= 1024


def test_concurrent_writers_and_readers(milvus):
    """Threads of one client add and search at once (as a server's worker threads do): every add is found."""
    from concurrent.futures import ThreadPoolExecutor
    s = MilvusStore.create(milvus.url("threads"), views={"a": 16}, fingerprint=FP, model_ref="m")
    keys, a, _, _ = _data(96, seed=9)
    try:
        def one(i):
            s.add([keys[i]], {"a": a[i:i + 1]}, [{"i": i}])
            return s.search_items(a[i:i + 1], "a", 1)[0][0]["key"] == keys[i]

        with ThreadPoolExecutor(8) as ex:
            assert all(ex.map(one, range(96)))
        assert s.count("a") == 96 and len(set(s.ids_of(keys))) == 96
    finally:
        s.close()


def test_same_answers_as_the_faiss_store(milvus, tmp_path):
    keys, a, b, rng = _data()
    views = {"a": 16, "b": 8}
    fs = IndexStore.create(tmp_path / "faiss", views=views, fingerprint=FP, model_ref="m", factory="Flat")
    ms = MilvusStore.create(milvus.url("same_answers"), views=views, fingerprint=FP, model_ref="m", factory="Flat")
    try:
        for s in (fs, ms):
            meta = [{"i": i, "tag": ["x", i % 3]} for i in range(200)]
            s.add(keys[:100], {"a": a[:100], "b": b[:100]}, meta[:100])
            s.add(keys[100:200], {"a": a[100:200]}, meta[100:200])  # some items in one view only
            assert s.remove([keys[3], keys[150], keys[7]]) == 3
            s.add([keys[3]], {"a": a[3:4], "b": b[3:4]}, [{"again": True}])
        assert fs.count() == ms.count() == {"a": 198, "b": 99}
        assert len(ms) == len(fs) == 198
        xa, xb = a[200:210], b[200:210]
        for view, xq, k in (("a", xa, 10), ("b", xb, 10), ("a", a[:3], 1), ("b", xb[:2], 150)):
            _same_hits(ms, fs, xq, view, k)
        D1, I1 = fs.search(xa, "a", 5)
        D2, I2 = ms.search(xa, "a", 5)
        np.testing.assert_allclose(D1, D2, atol=1e-5)
        assert [[it["key"] for it in fs.lookup(r)] for r in I1] == [[it["key"] for it in ms.lookup(r)] for r in I2]
        probe = [keys[0], keys[3], keys[150], "never"]
        absent = [False, False, True, True]
        assert [i is None for i in ms.ids_of(probe)] == [i is None for i in fs.ids_of(probe)] == absent
        ids = ms.ids_of([keys[0], keys[3]])
        assert ms.lookup([ids[1], -1, 12345, ids[0]]) == [
            {"id": ids[1], "key": keys[3], "metadata": {"again": True}}, None, None,
            {"id": ids[0], "key": keys[0], "metadata": {"i": 0, "tag": ["x", 0]}}]
        assert ms.views == fs.views == views
        assert ms.index_types() == {"a": "milvus FLAT", "b": "milvus FLAT"}
        for s in (fs, ms):  # the same errors, and nothing changed by a refused write
            with pytest.raises(DuplicateKeyError):
                s.add([keys[0]], {"a": a[:1]})
            with pytest.raises(DuplicateKeyError):
                s.add(["new", "new"], {"a": a[:2]})
            with pytest.raises(UnknownKeyError):
                s.remove([keys[1], "never"])
            with pytest.raises(StoreError):
                s.add(["x"], {"zz": a[:1]})
            with pytest.raises(StoreError):
                s.add(["x"], {"a": b[:1]})
            with pytest.raises(StoreError):
                s.search(xa, "a", 0)
            with pytest.raises(StoreError):
                s.add(["x"], {"a": a[:1]}, [{"m": float("nan")}])
            assert s.count("a") == 198 and s.ids_of([keys[1]])[0] is not None
    finally:
        fs.close()
        ms.close()


def test_open_create_readonly_and_index_types(milvus):
    url = milvus.url("lifecycle")
    views = {"L": 4, "ab.x": 4}
    s = MilvusStore.create(url, views=views, fingerprint=FP, model_ref="m")
    s.close()
    with pytest.raises(StoreError, match="already exists"):
        MilvusStore.create(url, views=views, fingerprint=FP, model_ref="m")
    with pytest.raises(StoreError, match="model space"):
        MilvusStore.open(url, fingerprint="other")
    with pytest.raises(StoreError, match="does not exist"):
        MilvusStore.open(milvus.url("absent"))
    with MilvusStore.open(url, fingerprint=FP) as w, pytest.raises(StoreError, match="bytes per JSON field"):
        w.add(["x"], {"L": np.ones((1, 4), np.float32)}, [{"m": "x" * 70_000}])
    r = MilvusStore.open(url, fingerprint=FP, readonly=True)
    with pytest.raises(NotWritableError):
        r.add(["x"], {"L": np.ones((1, 4), np.float32)})
    r.close()
    with pytest.raises(NotWritableError):
        r.search(np.ones(4, np.float32), "L", 1)
    big = MilvusStore.create(milvus.url("big"), views={"L": 32, "ab": 32}, fingerprint=FP, model_ref="m",
                             n_hint=200_000)
    hnsw = MilvusStore.create(milvus.url("hnsw"), views={"L": 8}, fingerprint=FP, model_ref="m", factory="HNSW32")
    try:
        assert big.manifest["views"]["L"]["factory"] == "IVF_FLAT"
        assert big.index_types()["L"].startswith("milvus IVF_FLAT nlist=")
        assert hnsw.index_types()["L"].startswith("milvus HNSW M=32")
        rng = np.random.default_rng(1)
        x = rng.standard_normal((50, 32)).astype(np.float32)
        for s in (big, hnsw):
            dim = s.views["L"]
            s.add([f"i{i}" for i in range(50)], {"L": x[:, :dim]})
            assert s.search_items(x[:2, :dim], "L", 1)[0][0]["key"] == "i0"
            assert s.search_items(x[:2, :dim], "L", 1)[1][0]["key"] == "i1"
    finally:
        big.close()
        hnsw.close()


def test_acknowledged_writes_survive_a_kill9_of_the_milvus_server(tmp_path):
    """kill -9 of the server right after the acknowledgements: a restart on the same data directory has every
    acknowledged add and remove (Milvus Lite's write-ahead log), and a client opened before reconnects."""
    srv = MilvusServer(tmp_path / "data").wait_ready()
    url = srv.url("restart")
    keys, a, b, _ = _data(60, seed=4)
    s = MilvusStore.create(url, views={"a": 16}, fingerprint=FP, model_ref="m", factory="Flat")
    try:
        for lo in range(0, 60, 20):
            s.add(keys[lo:lo + 20], {"a": a[lo:lo + 20]}, [{"i": i} for i in range(lo, lo + 20)])
        s.remove(keys[10:15])
        srv.kill9()
        srv = MilvusServer(tmp_path / "data", port=srv.port).wait_ready()
        s2 = MilvusStore.open(url, fingerprint=FP)
        try:
            assert len(s2) == 55 and s2.ids_of(keys[10:15]) == [None] * 5 and None not in s2.ids_of(keys[:10])
            hits = s2.search_items(a, "a", 1)
            assert all((hits[i][0]["key"] == k) == (not 10 <= i < 15) for i, k in enumerate(keys))
            s2.add(["after"], {"a": a[:1]})
            assert s.search_items(a[:1], "a", 2)[0][1]["key"] in ("after", keys[0])  # the old client reconnected
        finally:
            s2.close()
    finally:
        s.close()
        srv.stop()


# ------------------------------------------------------------------------------------------ two real replicas
@pytest.fixture(scope="module")
def replicas(milvus, tmp_path_factory):
    from server_fixtures import Server, build_model, scenes
    from models.runtime import Runtime
    from models.views import source_key

    base = tmp_path_factory.mktemp("replicas")
    build_model(base / "model")
    rt = Runtime(base / "model")
    ds = scenes(24)
    url = milvus.url("replicas")
    src = {v: source_key(v, rt.views[v]) for v in rt.views}
    vecs = {v: rt.embed_sources(v, {src[v]: ds.sources[src[v]][:16]}) for v in rt.views if src[v] in ds.sources}
    store = MilvusStore.create(url, views={v: rt.dim for v in rt.views}, fingerprint=rt.fingerprint,
                               model_ref=str(base / "model"))
    store.add([f"item-{i}" for i in range(16)], vecs, [{"i": i} for i in range(16)])
    store.close()
    servers = []
    try:
        for name in ("a", "b"):  # as two machines: nothing shared but the Milvus server
            d = base / name
            d.mkdir()
            servers.append(Server({"CMC_MODEL": str(base / "model"), "CMC_INDEX": url, "CMC_THREADS": "1",
                                   "BENTOML_HOME": str(d / "bentoml"), "CMC_HOME": str(d / "cmc")}, d / "server.log"))
        for s in servers:
            s.wait_ready()
        yield {"a": servers[0], "b": servers[1], "ds": ds, "url": url, "dim": rt.dim, "model": base / "model"}
    finally:
        for s in servers:
            s.stop()


def _post(server, path, body):
    import httpx
    r = httpx.post(server.url + path, json=body, timeout=60)
    return r


def _ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.server
def test_replicas_info_and_thumbnails(replicas):
    import httpx
    info = _ok(_post(replicas["a"], "/info", {}))["index"]
    assert info["path"] == replicas["url"] and info["counts"]["L"] >= 16
    assert info["types"]["L"] == "milvus FLAT"
    r = httpx.get(replicas["b"].url + "/thumb/item-0", timeout=30)
    assert r.status_code == 404 and "no thumbnails" in r.json()["detail"]
    r = httpx.get(replicas["b"].url + "/gallery/random", timeout=30)
    assert r.status_code == 404 and "no thumbnails" in r.json()["detail"]


@pytest.mark.server
def test_an_add_through_a_is_found_through_b_at_once(replicas):
    """100 adds in a row through A, each searched through B right after A's acknowledgement."""
    from server_fixtures import png_b64
    a, b = replicas["a"], replicas["b"]
    xs = np.random.default_rng(7).standard_normal((100, 8)).round(4).tolist()
    for i, x in enumerate(xs):  # vector-view items: each add through A, then at once a search through B
        d = _ok(_post(a, "/index/add", {"items": [{"key": f"v-{i}", "metadata": {"n": i}, "inputs": {"fou": x}}]}))
        assert d["added"] == 1 and d["views"] == ["fou"]
        hit = _ok(_post(b, "/search", {"query": {"view": "fou", "array": x}, "k": 1}))["results"][0]
        assert hit["key"] == f"v-{i}" and hit["metadata"] == {"n": i}, i
    ds = replicas["ds"]  # an image item in every view of its sources, then the conflict and the remove
    item = {"key": "img-20", "metadata": {"note": "added"},
            "inputs": {"rgb": png_b64(ds.sources["rgb"][20])}}
    assert set(_ok(_post(a, "/index/add", {"items": [item]}))["views"]) == {"L", "ab"}
    q = {"query": {"view": "L", "image": item["inputs"]["rgb"]}, "k": 1}
    assert _ok(_post(b, "/search", q))["results"][0]["key"] == "img-20"
    r = _post(b, "/index/add", {"items": [item]})
    assert r.status_code == 409 and r.json()["error"] == "conflict"
    assert _ok(_post(b, "/index/remove", {"keys": ["img-20", "v-3"]}))["removed"] == 2
    assert _ok(_post(a, "/search", q))["results"][0]["key"] != "img-20"
    assert _ok(_post(a, "/search", {"query": {"view": "fou", "array": xs[3]}, "k": 1}))["results"][0]["key"] != "v-3"
    r = _post(a, "/index/remove", {"keys": ["img-20"]})
    assert r.status_code == 404


@pytest.mark.server
def test_index_build_writes_a_collection(replicas, milvus, tmp_path):
    """``python -m index.build --out milvus://...`` indexes what a directory build indexes, and answers alike."""
    from conftest import run_cli
    url = milvus.url("built")
    common = ["-m", "index.build", "--model", str(replicas["model"]), "--data", "scenes:n=64,size=32,seed=5,test_n=24",
              "--views", "L,ab,depth", "--out"]
    for out in (url, str(tmp_path / "faiss")):
        r = run_cli(common + [out], timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "24 items" in r.stdout
    ms, fs = MilvusStore.open(url, readonly=True), IndexStore.open(tmp_path / "faiss", readonly=True)
    try:
        assert len(ms) == len(fs) == 24 and ms.count() == fs.count() and ms.views == fs.views
        assert ms.manifest["fingerprint"] == fs.manifest["fingerprint"]
        xq = np.random.default_rng(3).standard_normal((5, replicas["dim"])).astype(np.float32)
        for v in fs.views:
            _same_hits(ms, fs, xq, v, 8)
    finally:
        ms.close()
        fs.close()
    found = []
    for index in (url, str(tmp_path / "faiss")):  # python -m index.search reads either
        r = run_cli(["-m", "index.search", "--index", index, "--model", str(replicas["model"]), "--data",
                     "scenes:n=64,size=32,seed=5,test_n=24", "--view", "L", "--target-view", "ab", "--items", "0,5",
                     "-k", "3", "--json"], timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        found.append([h for row in json.loads(r.stdout) for h in row])
    assert [h["key"] for h in found[0]] == [h["key"] for h in found[1]] and len(found[0]) == 6
    np.testing.assert_allclose([h["score"] for h in found[0]], [h["score"] for h in found[1]], atol=1e-5)


@pytest.mark.server
def test_fuzz_against_the_milvus_backend(replicas):
    """The schemathesis fuzz of tests/test_fuzz.py (no request answered 5xx), against replica B, at half its
    examples per operation (the handlers are the same code; what differs is the store behind them)."""
    import test_fuzz
    test_fuzz.fuzz_server(replicas["b"], test_fuzz.EXAMPLES // 2)


@pytest.mark.server
def test_kill9_of_a_replica_mid_load_loses_no_acknowledged_write(replicas):
    """Adds stream through A; A is killed (-9) mid-load; every add A acknowledged is found through B, which
    keeps serving reads and writes. Kills A: the last test of this module."""
    import httpx
    a, b = replicas["a"], replicas["b"]
    xs = np.random.default_rng(11).standard_normal((400, 8)).round(4).tolist()
    acked: list[int] = []

    def load():
        for i, x in enumerate(xs):
            try:
                r = httpx.post(a.url + "/index/add", timeout=30,
                               json={"items": [{"key": f"k9-{i}", "inputs": {"fou": x}}]})
            except httpx.HTTPError:
                return
            if r.status_code == 200:
                acked.append(i)

    t = threading.Thread(target=load)
    t.start()
    t0 = time.time()
    while len(acked) < 20 and time.time() - t0 < 120:
        time.sleep(0.05)
    os.killpg(a.proc.pid, signal.SIGKILL)
    t.join(timeout=60)
    assert 20 <= len(acked) < len(xs)
    for i in acked:
        hit = _ok(_post(b, "/search", {"query": {"view": "fou", "array": xs[i]}, "k": 1}))["results"][0]
        assert hit["key"] == f"k9-{i}"
    assert httpx.get(b.url + "/readyz", timeout=10).status_code == 200
    assert _ok(_post(b, "/index/remove", {"keys": [f"k9-{acked[0]}"]}))["removed"] == 1


@pytest.mark.slow  # trains a small model (as tests/test_web.py does) and drives Chromium: about 2 minutes
@pytest.mark.server
def test_the_web_page_on_the_milvus_backend(milvus, tmp_path_factory):
    """The web page's browser flow on a Milvus collection: an uploaded gallery image finds itself first across
    views; the random-item button, which needs thumbnails, shows the server's 'keeps no thumbnails' error."""
    import test_web as tw
    if not (Path(tw.CHROMIUM).exists() and Path(tw.CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver")
    pytest.importorskip("selenium")
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from index.build import build_index
    from models.runtime import Runtime
    from server_fixtures import Server
    base = tmp_path_factory.mktemp("web_milvus")
    ds = tw._train(base)
    url = milvus.url("web")
    build_index(Runtime(base / "model"), ds, ["L", "ab", "depth"], url, split="train", progress=False)
    srv = Server({"CMC_MODEL": str(base / "model"), "CMC_INDEX": url, "CMC_API_TOKEN": tw.TOKEN,
                  "BENTOML_HOME": str(base / "bentoml"), "CMC_HOME": str(base / "cmc"), "CMC_THREADS": "1"},
                 base / "server.log")
    opts = webdriver.ChromeOptions()
    opts.binary_location = tw.CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--window-size=1200,900", f"--user-data-dir={base / 'chrome'}"):
        opts.add_argument(arg)
    drv = None
    try:
        srv.wait_ready()
        drv = webdriver.Chrome(service=Service(tw.CHROMEDRIVER), options=opts)
        drv.set_page_load_timeout(60)
        drv.get(srv.url + "/")
        tw._wait(drv, lambda d: tw._el(d, "#error").is_displayed())
        tw._el(drv, "#token").send_keys(tw.TOKEN + "\t")
        tw._wait(drv, lambda d: "dim" in tw._el(d, "#card").text and not tw._el(d, "#error").is_displayed())
        assert "L 16" in tw._el(drv, "#card").text
        i = 5
        Image.fromarray(ds.sources["rgb"][i]).save(base / "query.png")
        before = tw._mark_status(drv)
        tw._el(drv, "#file").send_keys(str(base / "query.png"))
        tw._search_done(drv, before)
        assert not tw._el(drv, "#error").is_displayed(), tw._el(drv, "#error").text
        keys = tw._results(drv)
        assert keys[0] == ds.keys[i] and len(keys) == 12
        tw._el(drv, "#random").click()
        tw._wait(drv, lambda d: tw._el(d, "#error").is_displayed())
        assert "404" in tw._el(drv, "#error").text and "no thumbnails" in tw._el(drv, "#error").text
    finally:
        if drv is not None:
            drv.quit()
        srv.stop()
