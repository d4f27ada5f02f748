"""Admission control of one server worker: at most ``max_concurrency`` requests and ``max_bytes`` of request bodies
in flight; a request past either is answered 503 with ``Retry-After`` before its body is read.

A request reserves its declared ``Content-Length`` (or, for a chunked body, the body limit, CMC_MAX_BODY_MB) for
as long as it runs (bodies of at most SMALL_BODY reserve nothing: the count bounds them, so ordinary searches
still get through while large uploads fill the byte budget); a request that arrives while nothing else is in
flight is always admitted, so a body up to the limit can always be served. Public routes (health, metrics, the
page's own files: serving/routes.py) bypass it, so ``/readyz`` answers under any load. With the per-route
budgets of serving/routes.py, this bounds what the requests of one worker can hold at once (README, "Limits"):
BentoML's own ``max_concurrency`` answers 429 without ``Retry-After`` and does not count bytes.
"""
from __future__ import annotations

import logging
from typing import Any

from .errors import ApiError, send_error
from .routes import access_of

LOG = logging.getLogger(__name__)

# The worst-case memory of one worker (README, "Limits"), held by tests/test_overload.py:
#   RSS <= idle RSS + PARSE_FACTOR x (CMC_MAX_INFLIGHT_MB + CMC_MAX_CONCURRENCY x SMALL_BODY)
#          + decode threads x CMC_MAX_PIXELS x DECODE_BYTES_PER_PIXEL + SLACK
# PARSE_FACTOR: what a request holds per byte of its body at most: the body itself, the JSON tree pydantic-core
# builds, the Python objects and the decoded base64 bytes (the per-route value budget, serving/routes.py, keeps
# number-dense bodies under it). DECODE_BYTES_PER_PIXEL: one full-size decode (Pillow's 4-byte RGBX buffer, the
# RGB array) before it is reduced to the model's input (models/runtime.to_source). SLACK: allocator and batching.
PARSE_FACTOR = 6
SMALL_BODY = 64 << 10  # bodies up to this size (a /search, a key list) are admitted by count alone
DECODE_BYTES_PER_PIXEL = 10
SLACK = 64 << 20


def worst_case_rss(idle_rss: int, settings: object) -> int:
    """The bound on one worker's RSS under any load, from its idle RSS and its settings (bytes)."""
    s: Any = settings
    return int(idle_rss + PARSE_FACTOR * ((s.max_inflight_mb << 20) + s.max_concurrency * SMALL_BODY)
               + s.decode_threads * s.max_pixels * DECODE_BYTES_PER_PIXEL + SLACK)


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
        over_bytes = reserve > SMALL_BODY and self.bytes + reserve > self.max_bytes
        if self.requests and (self.requests >= self.max_concurrency or over_bytes):
            self.refused += 1
            await send_error(send, ApiError(
                "unavailable", f"server busy: {self.requests} requests with {self.bytes >> 10} KiB of bodies in "
                f"flight on this worker (limits CMC_MAX_CONCURRENCY={self.max_concurrency}, CMC_MAX_INFLIGHT_MB="
                f"{self.max_bytes >> 20}); retry after {self.retry_after} s", None,
                headers={"retry-after": self.retry_after}))
            return
        self.requests += 1
        reserve = reserve if reserve > SMALL_BODY else 0  # small bodies: bounded by the count alone
        self.bytes += reserve
        try:
            await self.app(scope, receive, send)
        finally:
            self.requests -= 1
            self.bytes -= reserve

    def snapshot(self) -> dict:
        return {"in_flight": self.requests, "in_flight_bytes": self.bytes, "refused": self.refused,
                "max_concurrency": self.max_concurrency, "max_inflight_bytes": self.max_bytes}
