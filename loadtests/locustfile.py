"""Locust users for the CMC server: /embed (one input, a batch of 16), /similarity (pair, rank), /search and
/index/add, built for whatever model is served. Each user reads ``/info`` at start and takes its views, sources
and index from there (``loadtests/plan.py``): rgb-source views get generated RGB PNGs, depth-source views 16-bit
PNG depth maps, vector views arrays of the card's length; adds carry exactly the sources the index's views take.
Every answer is checked for its shape, and a wrong answer counts as a failure.

Weights by environment variable: CMC_W_EMBED, CMC_W_EMBED16, CMC_W_PAIR, CMC_W_RANK, CMC_W_SEARCH, CMC_W_ADD
(0 disables a task). CMC_CHURN=N: each user keeps at most N of the items it added and removes the oldest
(/index/remove) after each add beyond that, so the index stays the same size (a soak for leaks, not data
growth); 0 (the default) removes nothing. CMC_API_TOKEN is sent as a bearer token when set. CMC_LOAD_REPORT
names a JSON file that receives, at the end, the plan and the requests per view and endpoint (loadtests/run.py prints it), and
CMC_LOAD_STATS a CSV file for locust's final statistics (its periodic --csv file can lag by a second).
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import random
import sys
import uuid
from collections import Counter, deque
from pathlib import Path

from locust import FastHttpUser, between, events, task
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's packages without installing

from loadtests.plan import Plan  # noqa: E402

_PLANS: dict[str, Plan] = {}
SENT: Counter = Counter()  # (endpoint, view) -> requests answered
CHURN = int(os.environ.get("CMC_CHURN", "0"))  # items a user keeps before removing its oldest


def plan_for(info: dict) -> Plan:
    """One plan per served model and process (image generation is done once)."""
    key = str(info.get("fingerprint")) + json.dumps(info.get("index", {}).get("views"), sort_keys=True)
    if key not in _PLANS:
        _PLANS[key] = Plan(info)
    return _PLANS[key]


def weight(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _headers() -> dict:
    tok = os.environ.get("CMC_API_TOKEN")
    return {"Authorization": f"Bearer {tok}"} if tok else {}


def _unit(e: list) -> bool:
    return abs(sum(x * x for x in e) - 1) < 1e-3


class CMCUser(FastHttpUser):
    """FastHttpUser (geventhttpclient): less client CPU on the cores the server shares. Every request is a JSON
    POST (``json=``: the same body and Content-Type: application/json as HttpUser sent); nothing is uploaded as
    multipart or a file, which FastHttpUser could not send."""

    wait_time = between(0, 0)
    _ids = itertools.count()

    def on_start(self) -> None:
        self.h = _headers()
        r = self.client.post("/info", json={}, headers=self.h)
        r.raise_for_status()  # no plan without /info: the user stops and locust reports the error
        self.plan = plan_for(r.json())
        self.mine: deque[str] = deque()  # keys this user added and has not removed (CMC_CHURN)

    def _post(self, name: str, body: dict, check, views: tuple[str, ...]) -> bool:
        """POST, count it, check the answer; True when it succeeded."""
        with self.client.post(name, json=body, headers=self.h, catch_response=True) as r:
            for v in set(views):  # answered requests only, as locust's statistics count them
                SENT[(name, v)] += 1
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return False
            try:
                problem = check(r.json())
            except Exception as e:  # noqa: BLE001 - any malformed answer is a failure
                problem = f"bad answer: {e!r}"
            if problem:
                r.failure(problem)
            return not problem

    def _items(self, k: int) -> list[int]:
        return random.sample(range(self.plan.n), k)

    @task(weight("CMC_W_EMBED", 4))
    def embed_one(self) -> None:
        v = self.plan.pick_view()
        dim = self.plan.dim
        self._post("/embed", self.plan.embed_body(v, self._items(1)),
                   lambda j: None if j["view"] == v and len(j["embeddings"]) == 1 and len(j["embeddings"][0]) == dim
                   and _unit(j["embeddings"][0]) else f"wrong embedding: {str(j)[:120]}", (v,))

    @task(weight("CMC_W_EMBED16", 1))
    def embed_16(self) -> None:
        v = self.plan.pick_view()
        dim = self.plan.dim
        self._post("/embed", self.plan.embed_body(v, self._items(16)),
                   lambda j: None if len(j["embeddings"]) == 16 and all(len(e) == dim and _unit(e)
                                                                         for e in j["embeddings"])
                   else "wrong batch of embeddings", (v,))

    @task(weight("CMC_W_PAIR", 2))
    def similarity_pair(self) -> None:
        i = self._items(1)[0]
        a, b = self.plan.pick_pair()
        self._post("/similarity", {"a": self.plan.one(a, i), "b": self.plan.one(b, i)},
                   lambda j: None if -1.0001 <= j["cosine"] <= 1.0001 and j["critic"] > 0 else "bad similarity", (a, b))

    @task(weight("CMC_W_RANK", 1))
    def similarity_rank(self) -> None:
        items = self._items(8)
        a, b = self.plan.pick_pair()
        body = {"query": self.plan.one(a, items[0]), "candidates": [self.plan.one(b, i) for i in items]}

        def check(j):
            s = [r["score"] for r in j["ranking"]]
            return None if len(s) == 8 and s == sorted(s, reverse=True) else "ranking not sorted or wrong length"
        self._post("/similarity", body, check, (a, b))

    @task(weight("CMC_W_SEARCH", 3))
    def search(self) -> None:
        if not self.plan.index_views:
            return
        q, t = self.plan.pick_view(), random.choice(self.plan.index_views)
        least = min(10, self.plan.index_counts.get(t, 0))  # adds only grow the index during the run

        def check(j):
            s = [r["score"] for r in j["results"]]
            if j["target_view"] != t or not least <= len(s) <= 10 or not all("key" in r for r in j["results"]):
                return f"wrong search answer: {str(j)[:120]}"
            return None if s == sorted(s, reverse=True) else "search results not sorted by score"
        self._post("/search", {"query": self.plan.one(q, self._items(1)[0]), "target_view": t, "k": 10}, check,
                   (q, t))

    @task(weight("CMC_W_ADD", 1))
    def index_add(self) -> None:
        if not self.plan.can_add:
            return
        key = f"load-{uuid.uuid4().hex[:12]}-{next(self._ids)}"
        item = {"key": key, "metadata": {"source": "locust"}, "inputs": self.plan.add_inputs(self._items(1)[0])}
        views = tuple(self.plan.index_views)
        added = self._post("/index/add", {"items": [item]},
                           lambda j: None if j["added"] == 1 and sorted(j["views"]) == sorted(views)
                           else f"not added to every indexed view: {str(j)[:120]}", views)
        if added and CHURN > 0:
            self.mine.append(key)
            while len(self.mine) > CHURN:
                old = self.mine.popleft()
                self._post("/index/remove", {"keys": [old]},
                           lambda j: None if j["removed"] == 1 else f"{old!r} not removed: {str(j)[:120]}", views)


@events.quitting.add_listener
def _fail_on_errors(environment, **_kw) -> None:
    """Exit non-zero on any failure, or when CMC_P99_MS is set and the total p99 exceeds it; write the report."""
    stats = environment.stats.total
    bound = os.environ.get("CMC_P99_MS")
    if stats.num_failures:
        environment.process_exit_code = 1
    elif bound and stats.get_response_time_percentile(0.99) > float(bound):
        environment.process_exit_code = 3
    final_csv = os.environ.get("CMC_LOAD_STATS")
    if final_csv:
        with open(final_csv, "w", newline="") as f:
            StatsCSV(environment, PERCENTILES_TO_REPORT).requests_csv(csv.writer(f))
    report = os.environ.get("CMC_LOAD_REPORT")
    if report:
        plan = next(iter(_PLANS.values()), None)
        views: dict[str, dict] = {}
        for (endpoint, view), n in sorted(SENT.items()):
            views.setdefault(view, {})[endpoint] = n
        Path(report).write_text(json.dumps({
            "plan": plan.describe() if plan else None,
            "views": {v: {"source": plan.views[v]["source"], "requests": views.get(v, {})} for v in plan.views}
            if plan else {},
            "index_views": plan.index_views if plan else [], "add_sources": plan.add_sources if plan else [],
        }, indent=2))
