"""Access logging and tracing of the CMC server: both off for the hot embedding endpoints by default, errors
always logged.

BentoML's access log costs about 15% of a small request's throughput (measured on 2 cores, docs/ARCHITECTURE.md). With
``CMC_ACCESS_LOG`` unset or false, :func:`logging_config` turns it off and :class:`QuietAccessLog` logs instead:
every answer of 400 or more on any path, and every request on the paths that are neither hot (``HOT_PATHS``, the
embedding endpoints) nor health checks, so writes such as /index/add stay in the log. ``CMC_ACCESS_LOG=1`` gives
BentoML's own access log of every request. (BentoML's ``skip_paths`` is not used for this: its Prometheus
middleware skips the same paths, so the request metrics of the hot endpoints would vanish from /metrics.)

Tracing: BentoML wraps every request in an OpenTelemetry span even when nothing is sampled (its default sample
rate is 0); that cost about 0.4 ms of server CPU per /embed request on the dev box (2 busy cores, noisy).
Unless ``CMC_TRACE_HOT=1``, :func:`tracing_config` excludes the hot paths from tracing (this replaces a
``tracing.excluded_urls`` from a BentoML configuration file).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from .settings import env_flag

LOG = logging.getLogger("bentoml.access")  # BentoML configures this one (INFO) in server processes

HOT_PATHS = ("/embed", "/embed_file", "/similarity", "/search")
QUIET_PATHS = HOT_PATHS + ("/readyz", "/livez", "/healthz", "/metrics")


def access_log_enabled() -> bool:
    return env_flag("CMC_ACCESS_LOG", False)


def logging_config(access_log: bool | None = None) -> dict:
    """The ``logging`` entry of ``@bentoml.service``: BentoML's access log only when CMC_ACCESS_LOG is on
    (``Settings.access_log``; read from the environment when not given)."""
    return {"access": {"enabled": access_log_enabled() if access_log is None else access_log}}


def tracing_config(trace_hot: bool | None = None) -> dict:
    """The ``tracing`` entry of ``@bentoml.service``: the hot paths excluded unless CMC_TRACE_HOT is on
    (``Settings.trace_hot``; read from the environment when not given)."""
    if env_flag("CMC_TRACE_HOT", False) if trace_hot is None else trace_hot:
        return {}
    return {"excluded_urls": [f"{p}$" for p in HOT_PATHS]}  # regexes over scheme://host/path (no query)


class QuietAccessLog:
    """ASGI middleware: one line (client, method, path, status, ms) per error answer anywhere and per request on
    the paths not in ``quiet``; does nothing when BentoML's own access log is on (CMC_ACCESS_LOG=1)."""

    def __init__(self, app: Any, quiet: tuple[str, ...] = QUIET_PATHS, enabled: bool | None = None):
        self.app, self.quiet = app, frozenset(quiet)
        self.enabled = (not access_log_enabled()) if enabled is None else enabled

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not self.enabled or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, every = time.perf_counter(), scope.get("path") not in self.quiet

        async def watched(msg: dict) -> None:
            if msg["type"] == "http.response.start" and (every or msg["status"] >= 400):
                client = scope.get("client") or ("-", 0)
                LOG.log(logging.WARNING if msg["status"] >= 400 else logging.INFO,
                        "%s:%s (scheme=%s,method=%s,path=%s) (status=%d) %.3fms", client[0], client[1],
                        scope.get("scheme"), scope.get("method"), scope.get("path"), msg["status"],
                        1000 * (time.perf_counter() - t0))
            await send(msg)

        await self.app(scope, receive, watched)
