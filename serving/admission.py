"""Admission control of one server worker: at most ``max_concurrency`` requests and ``max_bytes`` of request bodies
in flight; a request past either is answered 503 with ``Retry-After`` before its body is read.

A request reserves its declared ``Content-Length`` (or, for a chunked body, the body limit, CMC_MAX_BODY_MB) for
as long as it runs; a request that arrives while nothing else is in flight is always admitted, so a body up to the
limit can always be served. Public routes (health, metrics, the page's own files: serving/routes.py) bypass it,
so ``/readyz`` answers under any load. With the per-route budgets of serving/routes.py, this bounds what the
requests of one worker can hold at once (README, "Limits"): BentoML's own ``max_concurrency`` answers 429
without ``Retry-After`` and does not count bytes.
"""
from __future__ import annotations

import logging
from typing import Any

from .errors import ApiError, send_error
from .routes import access_of

LOG = logging.getLogger(__name__)


def _content_length(scope: dict) -> int | None:
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            try:
                return max(0, int(v))
            except ValueError:
                return None
    return None


class Admission:
    def __init__(self, app: Any, max_concurrency: int, max_bytes: int, chunked_bytes: int,
                 retry_after_s: int = 1):
        self.app = app
        self.max_concurrency, self.max_bytes = int(max_concurrency), int(max_bytes)
        self.chunked_bytes, self.retry_after = int(chunked_bytes), str(int(retry_after_s))
        self.requests = 0  # in flight now (one event loop: no lock needed)
        self.bytes = 0
        self.refused = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or access_of(scope.get("path", "")) == "public":
            await self.app(scope, receive, send)
            return
        n = _content_length(scope)
        reserve = self.chunked_bytes if n is None else min(n, self.chunked_bytes)
        if self.requests and (self.requests >= self.max_concurrency or self.bytes + reserve > self.max_bytes):
            self.refused += 1
            await send_error(send, ApiError(
                "unavailable", f"server busy: {self.requests} requests with {self.bytes >> 10} KiB of bodies in "
                f"flight on this worker (limits CMC_MAX_CONCURRENCY={self.max_concurrency}, CMC_MAX_INFLIGHT_MB="
                f"{self.max_bytes >> 20}); retry after {self.retry_after} s", None,
                headers={"retry-after": self.retry_after}))
            return
        self.requests += 1
        self.bytes += reserve
        try:
            await self.app(scope, receive, send)
        finally:
            self.requests -= 1
            self.bytes -= reserve

    def snapshot(self) -> dict:
        return {"in_flight": self.requests, "in_flight_bytes": self.bytes, "refused": self.refused,
                "max_concurrency": self.max_concurrency, "max_inflight_bytes": self.max_bytes}
