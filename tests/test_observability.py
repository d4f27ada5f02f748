"""serving.observability without a server: which requests are logged and traced by default."""
from __future__ import annotations

import asyncio
import logging

import pytest

from serving.observability import QuietAccessLog, logging_config, tracing_config


def test_tracing_excludes_exactly_the_hot_paths(monkeypatch):
    from opentelemetry.util.http import ExcludeList
    monkeypatch.delenv("CMC_TRACE_HOT", raising=False)
    ex = ExcludeList(tracing_config()["excluded_urls"])
    for path in ("/embed", "/embed_file", "/similarity", "/search"):
        assert ex.url_disabled(f"http://127.0.0.1:3000{path}"), path
    for path in ("/info", "/index/add", "/index/remove", "/embedding", "/search/x", "/readyz"):
        assert not ex.url_disabled(f"http://127.0.0.1:3000{path}"), path
    monkeypatch.setenv("CMC_TRACE_HOT", "1")
    assert tracing_config() == {}


@pytest.mark.parametrize("env,bentoml_on", [(None, False), ("0", False), ("1", True), ("true", True)])
def test_access_log_switch(monkeypatch, env, bentoml_on):
    if env is None:
        monkeypatch.delenv("CMC_ACCESS_LOG", raising=False)
    else:
        monkeypatch.setenv("CMC_ACCESS_LOG", env)
    assert logging_config() == {"access": {"enabled": bentoml_on}}
    assert QuietAccessLog(None).enabled is (not bentoml_on)


def _call(mw, path: str, status: int) -> None:
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(msg):
        pass

    mw.app = app
    scope = {"type": "http", "method": "POST", "path": path, "scheme": "http", "client": ("1.2.3.4", 5)}
    asyncio.run(mw(scope, None, send))


def test_quiet_access_log_lines(caplog):
    mw = QuietAccessLog(None, enabled=True)
    with caplog.at_level(logging.INFO, logger="bentoml.access"):
        _call(mw, "/embed", 200)       # hot and fine: no line
        _call(mw, "/readyz", 200)      # health: no line
        _call(mw, "/embed", 415)       # hot error: a warning
        _call(mw, "/index/add", 200)   # not hot: a line
    recs = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "bentoml.access"]
    assert len(recs) == 2, recs
    assert recs[0][0] == logging.WARNING and "path=/embed" in recs[0][1] and "status=415" in recs[0][1]
    assert recs[1][0] == logging.INFO and "path=/index/add" in recs[1][1] and "1.2.3.4:5" in recs[1][1]
