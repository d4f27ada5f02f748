"""Two real `bentoml serve` replicas that share nothing but a Milvus server (milvus-lite), behind Debian's nginx
with the repository's config (deploy/nginx.conf, round-robin): writes through nginx are seen by the next search
through nginx whichever replica answers it, both replicas serve, and a short locust run (the model-aware mix with
adds) through nginx has no failure. The layout is loadtests/replicas.py's, which the benchmark uses too.

Needs nginx (apt-get install -y nginx) and the milvus extra; skipped without them.
"""
from __future__ import annotations

import pytest

pytest.importorskip("pymilvus")

from loadtests.replicas import milvus_lite_exe, nginx_exe  # noqa: E402

if nginx_exe() is None:
    pytest.skip("nginx is not installed", allow_module_level=True)
if milvus_lite_exe() is None:
    pytest.skip("milvus-lite is not installed", allow_module_level=True)

TOKEN = "nginx-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from loadtests.replicas import replicas_behind_nginx
    from server_fixtures import build_model
    base = tmp_path_factory.mktemp("nginx")
    build_model(base / "model")
    with replicas_behind_nginx(base / "model", base / "run", TOKEN, n_seed=16) as lay:
        yield lay


def _post(url, path, body, headers=AUTH):
    import httpx
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def _ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.server
def test_adds_through_nginx_are_found_by_the_next_search(cluster):
    """30 adds through nginx, each searched through nginx right after: found whichever replica answers."""
    url, nginx = cluster["url"], cluster["nginx"]
    before = nginx.upstream_counts()
    from server_fixtures import png_b64, scenes
    ds = scenes(30, seed=17)  # not the seeded gallery's scenes
    for i in range(30):
        img = png_b64(ds.sources["rgb"][i])
        d = _ok(_post(url, "/index/add", {"items": [{"key": f"ng-{i}", "metadata": {"n": i}, "inputs": {"rgb": img}}]}))
        assert d["added"] == 1 and set(d["views"]) == {"L", "ab"}
        hit = _ok(_post(url, "/search", {"query": {"view": "L", "image": img}, "k": 1}))["results"][0]
        assert hit["key"] == f"ng-{i}" and hit["metadata"] == {"n": i}, i
    spread = nginx.upstream_counts() - before
    assert len(spread) == 2 and min(spread.values()) >= 20, spread  # round-robin: both replicas answered
    pids = {_ok(_post(url, "/info", {}))["worker_pid"] for _ in range(6)}
    assert len(pids) == 2, pids  # two processes (one worker each) answered /info
    assert _ok(_post(url, "/index/remove", {"keys": [f"ng-{i}" for i in range(30)]}))["removed"] == 30


@pytest.mark.server
def test_writes_through_nginx_need_the_token(cluster):
    r = _post(cluster["url"], "/index/add", {"items": [{"key": "x", "inputs": {"rgb": "AAAA"}}]}, headers={})
    assert r.status_code == 401, r.text
    assert all(s.alive() for s in cluster["servers"])


@pytest.mark.server
def test_locust_through_nginx_has_no_failures(cluster, tmp_path):
    """loadtests/run.py --url nginx: the model-aware mix with adds, 4 users for 12 s, 0 failures."""
    from loadtests.replicas import locust
    before = cluster["nginx"].upstream_counts()
    rc, text = locust(cluster["url"], tmp_path / "out", TOKEN, users=4, spawn_rate=4, run_time="12s")
    assert rc == 0, text
    assert "POST /index/add" in text, text
    spread = cluster["nginx"].upstream_counts() - before
    assert len(spread) == 2 and min(spread.values()) > 10, spread
