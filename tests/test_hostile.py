"""Hostile clients, round two (issue 18): memory per request bounded before parsing, writes no web page can forge,
no worker that outlives `bentoml serve`, and one route table from which the HTTP edge derives.

One real `bentoml serve` (protected mode: no token, one worker) for the server tests; the unit tests drive the
middlewares through ASGI directly.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import psutil
import pytest

from server_fixtures import Server, echo_app, model_and_index, png_b64, scenes

MiB = 1 << 20


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def _asgi_post(app, path, client=("127.0.0.1", 4000), base="http://127.0.0.1:3000", **kw):
    async def go():
        t = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=t, base_url=base) as c:
            return await c.post(path, **kw)
    return run(go())


# ---------------------------------------------------------------------------------------------- item 1: memory
def _budgets(**over):
    from serving.routes import ROUTES, budget
    kw = dict(max_items=64, max_image_bytes=8 * MiB, max_vector_dim=8, max_metadata_bytes=16 << 10, max_k=1000,
              max_body=32 * MiB, vector_dims_total=8) | over
    return {r.path: budget(r.path, **kw) for r in ROUTES if r.body}


def test_item1_json_value_budget_refuses_dense_bodies_before_parsing():
    """An 8 MiB array of zeros as /similarity candidates (about 50x its size once parsed) is a 413 from the
    value count, before any parser; the largest valid bodies of each route pass."""
    from serving.guard import ContentGuard, json_values
    app = ContentGuard(echo_app(), budgets=_budgets())
    dense = b'{"query": {"view": "L", "image": "aGk="}, "candidates": [' + b"0," * (4 * MiB) + b"0]}"
    r = _asgi_post(app, "/similarity", content=dense, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body" and "JSON values" in r.json()["detail"]
    # arrays for /embed: 64 vectors of the model's longest input (8) are fine, 64 of 9 numbers each are not
    ok = {"view": "fou", "arrays": [[1.0e-30] * 8] * 64}
    assert _asgi_post(app, "/embed", json=ok).status_code == 200
    budget = _budgets()["/embed"]
    over = {"view": "fou", "arrays": [[0] * (budget.max_values // 64 + 1)] * 64}
    assert json_values(json.dumps(over).encode()) > budget.max_values
    assert _asgi_post(app, "/embed", json=over).status_code == 413
    # a valid /index/add of 64 items, each with metadata at its byte limit made of commas, is within budget
    meta = {"m": [0] * ((16 << 10) // 2 - 8)}
    assert len(json.dumps(meta, separators=(",", ":"))) <= 16 << 10
    add = {"items": [{"key": f"k{i}", "metadata": meta, "inputs": {"rgb": "aGk="}} for i in range(64)]}
    r = _asgi_post(app, "/index/add", content=json.dumps(add, separators=(",", ":")).encode(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_item1_route_budgets_are_the_largest_valid_request():
    """/search takes one input: its body limit is one image, not the 32 MiB of a batch; /index/remove takes keys."""
    b = _budgets()
    img = -(-8 * MiB // 3) * 4
    assert img < b["/search"].max_bytes < img + 16 << 10
    assert b["/embed"].max_bytes == 32 * MiB  # 64 images of 8 MiB: capped by CMC_MAX_BODY_MB
    assert b["/index/remove"].max_bytes < 128 << 10
    assert b["/info"].max_bytes <= 8 << 10
    from serving.guard import ContentGuard
    app = ContentGuard(echo_app(), budgets=b)
    r = _asgi_post(app, "/search", content=b'{"query": {"view": "L", "image": "' + b"A" * (12 * MiB) + b'"}}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "largest valid /search" in r.json()["detail"]


def test_item1_admission_answers_503_with_retry_after_when_full():
    from serving.admission import Admission
    gate = asyncio.Event()  # rebound per loop below

    async def slow(scope, receive, send):
        if scope["path"] != "/readyz":
            await gate.wait()
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    adm = Admission(slow, max_concurrency=3, max_bytes=10 * MiB, chunked_bytes=32 * MiB)

    async def go():
        t = httpx.ASGITransport(app=adm, client=("127.0.0.1", 1))
        async with httpx.AsyncClient(transport=t, base_url="http://127.0.0.1") as c:
            held = [asyncio.create_task(c.post("/search", content=b"{}")) for _ in range(3)]
            await asyncio.sleep(0.05)
            busy = await c.post("/search", content=b"{}")  # 4th: over the count
            ready = await c.get("/readyz")  # public: never refused
            gate.set()
            done = await asyncio.gather(*held)
            return busy, done, ready
    busy, done, ready = run(go())
    assert ready.status_code == 200
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and busy.json()["error"] == "unavailable"
    assert [r.status_code for r in done] == [200, 200, 200] and adm.requests == 0 and adm.bytes == 0

    # bytes: one 8 MiB body in flight leaves no room for another 8 MiB body, but a lone one always passes
    gate = asyncio.Event()
    adm = Admission(slow, max_concurrency=64, max_bytes=10 * MiB, chunked_bytes=32 * MiB)

    async def go_bytes():
        t = httpx.ASGITransport(app=adm, client=("127.0.0.1", 1))
        async with httpx.AsyncClient(transport=t, base_url="http://127.0.0.1") as c:
            first = asyncio.create_task(c.post("/embed", content=b"x" * (8 * MiB)))
            await asyncio.sleep(0.05)
            second = await c.post("/embed", content=b"x" * (8 * MiB))
            small = asyncio.create_task(c.post("/embed", content=b"x" * 1000))
            await asyncio.sleep(0.05)
            gate.set()
            return await first, second, await small
    first, second, small = run(go_bytes())
    assert (first.status_code, second.status_code, small.status_code) == (200, 503, 200)
    lone = Admission(slow, max_concurrency=1, max_bytes=1 * MiB, chunked_bytes=32 * MiB)
    assert _asgi_post(lone, "/embed", content=b"x" * (4 * MiB)).status_code == 200  # alone: always admitted


# ---------------------------------------------------------------------------------------------- item 2: forgery
@pytest.mark.parametrize("headers,why", [
    ({"origin": "http://evil.example"}, "Origin"),
    ({"origin": "null"}, "Origin"),
    ({"sec-fetch-site": "cross-site"}, "Sec-Fetch-Site"),
    ({"host": "evil.example:3000"}, "Host"),
    ({"host": "rebind.attacker.example"}, "Host"),
    ({"x-forwarded-for": "127.0.0.1"}, "proxy"),
    ({"forwarded": "for=127.0.0.1"}, "proxy"),
])
def test_item2_protected_mode_refuses_writes_a_page_or_proxy_could_send(headers, why):
    from serving.auth import AccessControl
    app = AccessControl(echo_app(), token=None)
    for path in ("/index/add", "/index/remove", "/an-unknown-route"):  # unknown routes fail closed (item 10)
        r = _asgi_post(app, path, content=b"{}", headers={"content-type": "application/json"} | headers)
        assert r.status_code == 403 and r.json()["error"] == "forbidden" and why in r.json()["detail"], r.text
    # reads stay open; local pages of this machine and direct local clients may write
    assert _asgi_post(app, "/search", content=b"{}", headers=headers).status_code == 200
    for ok in ({"origin": "http://localhost:3000", "sec-fetch-site": "same-origin"},
               {"origin": "http://127.0.0.1:3000"}, {"host": "[::1]:3000"}, {"host": "localhost"}, {}):
        assert _asgi_post(app, "/index/add", content=b"{}", headers=ok).status_code == 200, ok
    # with a token, its holder may write from anywhere (a page cannot send Authorization without preflight)
    tok = AccessControl(echo_app(), token="s3")
    assert _asgi_post(tok, "/index/add", content=b"{}", client=("203.0.113.9", 1),
                      headers=headers | {"authorization": "Bearer s3"}).status_code == 200


def test_item2_writes_need_an_explicit_json_content_type():
    from serving.guard import ContentGuard
    app = ContentGuard(echo_app(), budgets=_budgets())
    for path in ("/index/add", "/index/remove"):
        r = _asgi_post(app, path, content=b'{"keys": ["a"]}')  # what fetch(no-cors, Blob) sends
        assert r.status_code == 415 and r.json()["field"] == "Content-Type"
        r = _asgi_post(app, path, content=b'{"keys": ["a"]}', headers={"content-type": "text/plain"})
        assert r.status_code == 415
    assert _asgi_post(app, "/search", content=b"{}").status_code == 200  # a read without one: JSON, as before


# ---------------------------------------------------------------------------------------------- item 10: one table
def test_item10_route_table_derives_access_and_metrics():
    from serving import routes, web
    assert routes.access_of("/index/add") == "write" and routes.access_of("/readyz") == "public"
    assert routes.access_of("/thumb/some/key") == "read" and routes.access_of("/thumb/") == "write"
    assert routes.access_of("/made-up") == "write"  # not in the table: treated as a write
    web_paths = {r.path for r in web.app.routes}
    for p in web_paths:
        probe = p.replace("{key:path}", "k").replace("{name}", "app.js")
        assert routes.route_of(probe) is not None, f"web route {p} is not in serving/routes.py"
    assert "/index/add" in routes.paths("write") and "/embed_file" in routes.forms()


# ---------------------------------------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    env = model_and_index(base, 8) | {"CMC_WORKERS": "1"}
    srv = Server(env, base / "server.log").wait_ready()
    try:
        yield {"srv": srv, "env": env, "base": base}
    finally:
        srv.stop()


def _worker(srv) -> psutil.Process:
    kids = psutil.Process(srv.proc.pid).children(recursive=True)
    return max(kids, key=lambda p: p.memory_info().rss)


def test_item10_every_route_the_server_serves_is_in_the_table(server):
    from serving import routes
    spec = httpx.get(server["srv"].url + "/docs.json", timeout=30).json()
    for path, ops in spec["paths"].items():
        r = routes.route_of(path)
        assert r is not None, f"{path} is served but missing from serving/routes.py"
        if "post" in ops:
            assert "POST" in r.methods and r.body, f"POST {path}: the table declares no body form"


@pytest.mark.server
def test_item1_dense_body_costs_the_worker_no_memory(server):
    """An 8 MiB body of zeros to /similarity took a worker from 196 to 577 MiB before (pydantic built it whole)."""
    srv = server["srv"]
    w = _worker(srv)
    before = w.memory_info().rss
    dense = b'{"candidates": [' + b"0," * (4 * MiB) + b"0]}"
    for _ in range(3):
        r = httpx.post(srv.url + "/similarity", content=dense, headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == 413, r.text
    grown = (w.memory_info().rss - before) / MiB
    assert grown < 40, f"worker RSS grew {grown:.0f} MiB for three refused 8 MiB bodies"


@pytest.mark.server
def test_item2_a_page_cannot_remove_items_through_the_browser_forms(server):
    """The reproduction: fetch(url, {mode: 'no-cors', body: Blob}) from a page on evil.example, sent from this
    machine: no Content-Type and a cross-site Origin. Refused, and the item is still there."""
    url = server["srv"].url
    body = json.dumps({"keys": ["item-1"]}).encode()
    for headers in ({"origin": "http://evil.example", "sec-fetch-site": "cross-site"},
                    {"origin": "http://evil.example", "content-type": "application/json"},
                    {"host": "evil.example"}, {"x-forwarded-for": "127.0.0.1", "content-type": "application/json"}):
        r = httpx.post(url + "/index/remove", content=body, headers=headers, timeout=30)
        assert r.status_code in (403, 415), (headers, r.status_code, r.text)
    img = png_b64(scenes(8).sources["rgb"][1])
    r = httpx.post(url + "/search", json={"query": {"view": "L", "image": img}, "k": 1}, timeout=30)
    assert r.status_code == 200 and r.json()["results"][0]["key"] == "item-1"  # still there
    r = httpx.post(url + "/index/remove", json={"keys": ["item-7"]}, timeout=30)  # a direct local client may
    assert r.status_code == 200 and r.json()["removed"] == 1


@pytest.mark.server
def test_item3_no_worker_outlives_a_serve_process_killed_during_start_up(server, tmp_path):
    """kill -9 `bentoml serve` as soon as its worker exists (long before the service is ready): the worker exits
    (it was alive 45 s later, re-parented to init, serving /readyz on the old port)."""
    srv = Server(server["env"], tmp_path / "early.log")
    kids: list[int] = []
    try:
        t0 = time.time()
        while not kids and time.time() - t0 < 60:
            try:
                kids = [p.pid for p in psutil.Process(srv.proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        assert kids, "bentoml serve started no worker"
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
        deadline = time.time() + 20
        alive = kids
        while alive and time.time() < deadline:
            alive = [p for p in kids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.2)
        assert not alive, f"workers {alive} outlived the killed `bentoml serve`"
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.url + "/readyz", timeout=2)
    finally:
        srv.stop()
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
