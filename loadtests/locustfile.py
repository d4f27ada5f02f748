"""Locust users for the CMC server: /embed (one image, a batch of 16), /similarity (pair, rank), /search and
/index/add. Bodies are built from real images of the default data (held-out `scenes`, or CMC_LOAD_DATA), sent
as base64 JSON; every answer is checked for its shape, and a wrong answer counts as a failure.

Weights by environment variable: CMC_W_EMBED, CMC_W_EMBED16, CMC_W_PAIR, CMC_W_RANK, CMC_W_SEARCH, CMC_W_ADD
(0 disables a task). CMC_API_TOKEN is sent as a bearer token when set.
"""
from __future__ import annotations

import base64
import itertools
import os
import random
import uuid

from locust import HttpUser, between, events, task

from models import data as datasets
from models.imageio import encode_png

_POOL: dict = {}


def pool() -> dict:
    """Encoded images of the load data, built once per process."""
    if not _POOL:
        spec = os.environ.get("CMC_LOAD_DATA", "scenes:n=256,size=64,seed=0,test_n=256")
        ds = datasets.load(spec, "test")
        b64 = lambda a: base64.b64encode(encode_png(a)).decode()  # noqa: E731
        n = min(len(ds), 128)
        _POOL["rgb"] = [b64(ds.sources["rgb"][i]) for i in range(n)]
        _POOL["depth"] = [b64(ds.sources["depth"][i]) for i in range(n)] if "depth" in ds.sources else []
    return _POOL


def weight(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _headers() -> dict:
    tok = os.environ.get("CMC_API_TOKEN")
    return {"Authorization": f"Bearer {tok}"} if tok else {}


class CMCUser(HttpUser):
    wait_time = between(0, 0)
    _ids = itertools.count()

    def on_start(self) -> None:
        self.p = pool()
        self.h = _headers()
        info = self.client.post("/info", json={}, headers=self.h).json()
        self.dim = info["dim"]
        self.views = list(info["views"])
        self.rgb_views = [v for v, s in info["views"].items() if s["source"] == "rgb"] or self.views
        self.dim_ok = lambda e: len(e) == self.dim  # noqa: E731
        self.has_index = bool(info.get("index", {}).get("available"))

    def _post(self, name: str, body: dict, check) -> None:
        with self.client.post(name, json=body, headers=self.h, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            try:
                problem = check(r.json())
            except Exception as e:  # noqa: BLE001 - any malformed answer is a failure
                problem = f"bad answer: {e!r}"
            if problem:
                r.failure(problem)

    def _img(self) -> str:
        return random.choice(self.p["rgb"])

    @task(weight("CMC_W_EMBED", 4))
    def embed_one(self) -> None:
        v = random.choice(self.rgb_views)
        self._post("/embed", {"view": v, "images": [self._img()]},
                   lambda j: None if j["view"] == v and len(j["embeddings"]) == 1 and self.dim_ok(j["embeddings"][0])
                   and abs(sum(x * x for x in j["embeddings"][0]) - 1) < 1e-3 else f"wrong embedding: {str(j)[:120]}")

    @task(weight("CMC_W_EMBED16", 1))
    def embed_16(self) -> None:
        imgs = random.sample(self.p["rgb"], 16)
        self._post("/embed", {"view": self.rgb_views[0], "images": imgs},
                   lambda j: None if len(j["embeddings"]) == 16 and all(map(self.dim_ok, j["embeddings"]))
                   else "wrong batch of embeddings")

    @task(weight("CMC_W_PAIR", 2))
    def similarity_pair(self) -> None:
        img = self._img()
        a, b = self.rgb_views[0], self.rgb_views[-1]
        self._post("/similarity", {"a": {"view": a, "image": img}, "b": {"view": b, "image": img}},
                   lambda j: None if -1.0001 <= j["cosine"] <= 1.0001 and j["critic"] > 0 else "bad similarity")

    @task(weight("CMC_W_RANK", 1))
    def similarity_rank(self) -> None:
        imgs = random.sample(self.p["rgb"], 8)
        a, b = self.rgb_views[0], self.rgb_views[-1]
        body = {"query": {"view": a, "image": imgs[0]}, "candidates": [{"view": b, "image": i} for i in imgs]}

        def check(j):
            s = [r["score"] for r in j["ranking"]]
            return None if len(s) == 8 and s == sorted(s, reverse=True) else "ranking not sorted or wrong length"
        self._post("/similarity", body, check)

    @task(weight("CMC_W_SEARCH", 3))
    def search(self) -> None:
        if not self.has_index:
            return
        q, t = self.rgb_views[0], self.rgb_views[-1]
        self._post("/search", {"query": {"view": q, "image": self._img()}, "target_view": t, "k": 10},
                   lambda j: None if len(j["results"]) == 10 and all("key" in r and "score" in r for r in j["results"])
                   else f"wrong search answer: {str(j)[:120]}")

    @task(weight("CMC_W_ADD", 1))
    def index_add(self) -> None:
        if not self.has_index:
            return
        i = random.randrange(len(self.p["rgb"]))
        inputs = {"rgb": self.p["rgb"][i]}
        if self.p["depth"]:
            inputs["depth"] = self.p["depth"][i]
        key = f"load-{uuid.uuid4().hex[:12]}-{next(self._ids)}"
        self._post("/index/add", {"items": [{"key": key, "metadata": {"source": "locust"}, "inputs": inputs}]},
                   lambda j: None if j["added"] == 1 else "not added")


@events.quitting.add_listener
def _fail_on_errors(environment, **_kw) -> None:
    """Exit non-zero on any failure, or when CMC_P99_MS is set and the total p99 exceeds it."""
    stats = environment.stats.total
    bound = os.environ.get("CMC_P99_MS")
    if stats.num_failures:
        environment.process_exit_code = 1
    elif bound and stats.get_response_time_percentile(0.99) > float(bound):
        environment.process_exit_code = 3
