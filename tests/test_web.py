"""The web page in a real browser against a real `bentoml serve`: headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium; nothing is downloaded) uploads a gallery image as an L query against the
ab gallery and must see that item first; a bad file shows the server's own error message.

The model is a small CMC trained here for a few seconds on 16 scenes (L, ab, depth) until L -> ab retrieval of
those 16 items is exact (checked through onnxruntime before the browser starts, so a failure below is the
page's); the gallery is built by `index.build`, which also writes the thumbnails the page shows.
"""
from __future__ import annotations

import base64
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import pytest

from server_fixtures import Server

pytestmark = [pytest.mark.browser, pytest.mark.server]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "web-token-7"
DATA = "scenes:n=16,size=32,seed=1,test_n=16"


def _train(out: Path):
    import torch

    from train import pretrain
    from train.config import Config
    from train.export import export_model
    from train.setup import prepare
    cfg = Config(data=DATA, views="L,ab,depth", arch="resnet10", width=0.25, batch_size=16, epochs=60, lr=3e-3,
                 warmup_steps=2, out=str(out / "run"), export=False, index=False, evaluate=False, threads=2,
                 crop_min=0.9, tau=0.2, flip=False).validate()
    ds, _, specs, size = prepare(cfg, progress=False)
    model = pretrain.train(cfg, ds, specs, size, torch.device("cpu"))
    export_model(model.eval(), size, out / "model", asdict(cfg))
    return ds


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    pytest.importorskip("selenium")
    from index.build import build_index
    from models.runtime import Runtime
    base = tmp_path_factory.mktemp("web")
    ds = _train(base)
    rt = Runtime(base / "model")
    zl, za = rt.embed_sources("L", ds.sources), rt.embed_sources("ab", ds.sources)  # (16, D) each
    assert ((zl @ za.T).argmax(1) == np.arange(len(ds))).all(), "the trained model does not retrieve L -> ab"
    build_index(rt, ds, ["L", "ab", "depth"], base / "index", split="train", progress=False)
    srv = Server({"CMC_MODEL": str(base / "model"), "CMC_INDEX": str(base / "index"), "CMC_API_TOKEN": TOKEN,
                  "BENTOML_HOME": str(base / "bentoml"), "CMC_HOME": str(base / "cmc"), "CMC_THREADS": "1"},
                 base / "server.log")
    try:
        srv.wait_ready()
        yield {"server": srv, "ds": ds, "base": base}
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser(world):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1200,900", f"--user-data-dir={world['base'] / 'chrome'}"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # explicit paths: no Selenium Manager
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def _wait(drv, cond, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(drv, timeout, poll_frequency=0.2).until(cond)


def _el(drv, css):
    from selenium.webdriver.common.by import By
    return drv.find_element(By.CSS_SELECTOR, css)


def _results(drv) -> list[str]:
    from selenium.webdriver.common.by import By
    return [e.get_attribute("data-key") for e in drv.find_elements(By.CSS_SELECTOR, "#results .result")]


def _mark_status(drv) -> str:
    """Blank the status line before an action: two searches can end with the same text ("12 results: L -> ab
    (9 ms)"), and waiting for the text to change would then time out."""
    drv.execute_script("document.getElementById('status').textContent = 'test: waiting';")
    return "test: waiting"


def _search_done(drv, before: str):
    """Wait until the status line changed from ``before`` to a finished search (or an error shows)."""
    def done(d):
        s = _el(d, "#status").text
        return (s != before and "results:" in s) or _el(d, "#error").is_displayed()
    _wait(drv, done)


def test_page_is_public_and_everything_else_needs_the_token(world):
    url = world["server"].url
    for path in ("/", "/ui", "/ui/app.js", "/ui/app.css"):
        r = httpx.get(url + path)
        assert r.status_code == 200 and len(r.content) > 500, path
    assert "CMC cross-view search" in httpx.get(url + "/").text
    key = world["ds"].keys[3]
    assert httpx.get(f"{url}/thumb/{key}").status_code == 401
    r = httpx.get(f"{url}/thumb/{key}", params={"view": "depth"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"  # colour-mapped, WebP
    r = httpx.get(f"{url}/thumb/nope", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_upload_a_gallery_image_as_L_query_finds_it_first_in_ab(world, browser):
    drv, ds = browser, world["ds"]
    drv.get(world["server"].url + "/")
    # no token yet: the page says so with the server's own message and opens the token field
    _wait(drv, lambda d: _el(d, "#error").is_displayed())
    assert "401" in _el(drv, "#error").text and "bearer token" in _el(drv, "#error").text
    _el(drv, "#token").send_keys(TOKEN + "\t")
    _wait(drv, lambda d: "dim" in _el(d, "#card").text and not _el(d, "#error").is_displayed())
    assert "index" in _el(drv, "#card").text and "L 16" in _el(drv, "#card").text
    assert _el(drv, "#query-view").get_attribute("value") == "L"
    assert _el(drv, "#target-view").get_attribute("value") == "ab"

    i = 5
    path = world["base"] / f"query-{i}.png"
    from PIL import Image
    Image.fromarray(ds.sources["rgb"][i]).save(path)
    before = _mark_status(drv)
    _el(drv, "#file").send_keys(str(path))
    _search_done(drv, before)
    assert not _el(drv, "#error").is_displayed(), _el(drv, "#error").text
    keys = _results(drv)
    assert keys[0] == ds.keys[i] and len(keys) == 12
    first = _el(drv, "#results .result")
    assert _el(first, "img").get_attribute("src").startswith("data:image/webp;base64,")  # its thumbnail
    assert "cos " in first.text and "critic " in first.text and "class: " in first.text
    cos = float(first.text.split("cos ")[1].split()[0])
    critic = float(first.text.split("critic ")[1].split()[0])
    assert abs(critic - np.exp(cos / 0.2)) <= 1e-3 * critic  # exp(cos / tau), tau of the card

    # click the third result: the page queries with that stored item (its L input), which comes first
    target = keys[2]
    before = _mark_status(drv)
    drv.find_elements("css selector", "#results .result")[2].click()
    _search_done(drv, before)
    assert _results(drv)[0] == target
    assert target in _el(drv, "#query-label").text

    # a random gallery item: it is the query, and it comes first
    before = _mark_status(drv)
    _el(drv, "#random").click()
    _search_done(drv, before)
    label = _el(drv, "#query-label").text
    assert label.startswith("query: gallery item ") and _results(drv)[0] == label.rsplit(" ", 1)[1]

    shot = os.environ.get("CMC_WEB_SCREENSHOT")
    drv.save_screenshot(str(world["base"] / "web.png"))
    if shot:
        shutil.copy(world["base"] / "web.png", shot)


def test_a_bad_file_shows_the_server_error(world, browser):
    drv = browser
    bad = world["base"] / "notes.png"
    bad.write_bytes(b"this is not an image at all")
    expected = httpx.post(world["server"].url + "/search", headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"query": {"view": "L", "image": base64.b64encode(bad.read_bytes()).decode()},
                                "target_view": "ab", "k": 12})
    assert expected.status_code == 400
    detail = re.sub(r" at 0x[0-9a-f]+", "", expected.json()["detail"])  # the message names a Python object
    _el(drv, "#file").send_keys(str(bad))
    _wait(drv, lambda d: _el(d, "#error").is_displayed())
    text = re.sub(r" at 0x[0-9a-f]+", "", _el(drv, "#error").text)
    assert text.startswith("400 invalid_input: ") and detail in text, (text, detail)
    assert _results(drv) == []


def test_web_routes_answer_bad_input_with_4xx(world):
    url, auth = world["server"].url, {"Authorization": f"Bearer {TOKEN}"}
    key = world["ds"].keys[1]
    cases = [
        ("/search_by_key", {"key": "nope", "view": "L", "target_view": "ab"}, 404, "key"),
        ("/search_by_key", {"key": key, "view": "rgbx", "target_view": "ab"}, 400, "view"),
        ("/search_by_key", {"key": key, "view": "L", "target_view": "zz"}, 400, "target_view"),
        ("/search_by_key", {"key": key, "view": "L", "k": 0}, 400, "k"),
        ("/search_by_key", {"key": 7, "view": "L"}, 400, "key"),
        ("/search_by_key", [1, 2], 400, "body"),
        ("/thumbs", {"keys": "abc"}, 400, "keys"),
        ("/thumbs", {"keys": [key], "kind": "x-ray"}, 400, "kind"),
    ]
    for path, body, status, field in cases:
        r = httpx.post(url + path, json=body, headers=auth)
        assert r.status_code == status and r.json()["field"] == field, (path, body, r.text)
    r = httpx.post(url + "/search_by_key", content=b"{not json", headers=auth | {"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"
    # a stored item queried by key in L comes first in ab, as in the page
    r = httpx.post(url + "/search_by_key", json={"key": key, "view": "L", "target_view": "ab", "k": 3}, headers=auth)
    assert r.status_code == 200 and r.json()["results"][0]["key"] == key and r.json()["query_key"] == key
    got = httpx.post(url + "/thumbs", json={"keys": [key, "nope"], "view": "depth"}, headers=auth).json()["thumbs"]
    assert got[key].startswith("data:image/webp;base64,") and got["nope"] is None
    r = httpx.get(url + "/gallery/random", headers=auth)
    assert r.status_code == 200 and r.json()["key"] in world["ds"].keys


def test_an_added_item_gets_a_thumbnail(world):
    url, auth = world["server"].url, {"Authorization": f"Bearer {TOKEN}"}
    from models.imageio import encode_png
    rgb = np.random.default_rng(3).integers(0, 256, (200, 120, 3), dtype=np.uint8)
    depth = (np.arange(200 * 120, dtype=np.uint16).reshape(200, 120) * 2)
    item = {"key": "added-1", "metadata": {"note": "from /index/add"},
            "inputs": {"rgb": base64.b64encode(encode_png(rgb)).decode(),
                       "depth": base64.b64encode(encode_png(depth)).decode()}}
    r = httpx.post(url + "/index/add", json={"items": [item]}, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    from PIL import Image
    import io
    for view, mime in (("ab", "image/webp"), ("depth", "image/webp")):
        r = httpx.get(url + "/thumb/added-1", params={"view": view}, headers=auth)
        assert r.status_code == 200 and r.headers["content-type"] == mime
        assert Image.open(io.BytesIO(r.content)).size == (58, 96)  # bounded to 96 px, aspect kept
    r = httpx.post(url + "/search_by_key", json={"key": "added-1", "view": "depth", "target_view": "depth", "k": 1},
                   headers=auth)
    assert r.status_code == 200 and r.json()["results"][0]["key"] == "added-1"
    assert r.json()["results"][0]["score"] > 0.999  # the stored (float16) indexed vector: itself first
