"""Schemathesis against a real `bentoml serve` (issue 9): every operation of the OpenAPI schema the server
publishes at /docs.json, about 50 generated requests each in the positive mode (requests the schema allows)
and 50 in the negative mode (requests it forbids), all checked with schemathesis's `not_a_server_error`:
no request may be answered 5xx. The server has an index (so /search and /index/* reach their handlers), no
token (protected mode lets this loopback client write) and the default limits.
"""
from __future__ import annotations

import sys

import pytest

from server_fixtures import Server, model_and_index

pytestmark = pytest.mark.server
EXAMPLES = 50


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    srv = Server(model_and_index(base, 12), base / "server.log")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def test_fuzz_no_server_errors(server):
    fuzz_server(server, EXAMPLES)


def fuzz_server(server, examples: int) -> None:
    """``examples`` generated requests per operation and mode against ``server``; none may be answered 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(server.url + "/docs.json")
    stats: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            counts = stats.setdefault(f"{op.method.upper()} {op.path}", {"requests": 0, "5xx": 0})

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case):
                resp = case.call(base_url=server.url, timeout=60)
                counts["requests"] += 1
                counts["5xx"] += resp.status_code >= 500
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                try:
                    case.validate_response(resp, checks=[not_a_server_error])
                except Exception as e:  # noqa: BLE001 - collected, reported below
                    if len(failures) < 20:
                        failures.append(f"{op.method.upper()} {op.path} [{mode.value}]: {resp.status_code} "
                                        f"{resp.text[:200]!r}\n  {case.as_curl_command()[:400]}\n  {str(e)[:200]}")

            try:
                fuzz()
            except Unsatisfiable:  # no schema-violating request exists (an operation without parameters)
                counts.setdefault("unsatisfiable", 0)
    total = sum(c["requests"] for c in stats.values())
    n5xx = sum(c["5xx"] for c in stats.values())
    lines = [f"{k}: {v['requests']} requests, {v['5xx']} 5xx" for k, v in sorted(stats.items())]
    print(f"\nschemathesis: {total} requests over {len(stats)} operations, {n5xx} answered 5xx; statuses "
          f"{dict(sorted(statuses.items()))}\n" + "\n".join(lines), file=sys.stderr)
    assert server.alive(), server.tail()
    assert not failures, "\n".join(failures) + "\n" + server.tail(3000)
    assert n5xx == 0 and total >= 5 * len(stats)
    assert "unexpected error" not in server.tail(10 ** 7)
