"""serving.measure.loadgen against a stub HTTP/1.1 server that counts what it answers (fast), and `python -m serving.measure.bench
--quick` end to end (slow: it starts a real server)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import run_cli
from serving.measure.loadgen import Req, load_with_probe, probe, run_raw, run_wrk, wrk_path


class Stub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect
    seen = {"ok": 0, "bad": 0, "bodies": set()}
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        status = 500 if self.path.startswith("/fail") else 200
        with self.lock:
            self.seen["ok" if status == 200 else "bad"] += 1
            self.seen["bodies"].add(body)
        out = json.dumps({"n": len(body)}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a) -> None:  # quiet
        pass


@pytest.fixture()
def stub():
    Stub.seen = {"ok": 0, "bad": 0, "bodies": set()}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_raw_client_counts_exactly(stub):
    req = Req("/embed?view=L", b"\x89PNG" + bytes(range(256)) * 4, {"Content-Type": "image/png"})
    r = run_raw(stub, req, connections=4, duration=0.5)
    assert r["requests"] > 0 and r["errors"] == 0
    assert Stub.seen["ok"] == r["requests"]  # every request it counted reached the server, and no more
    assert Stub.seen["bodies"] == {req.body}
    assert r["generator_cpu_s"] >= 0 and r["p50_ms"] <= r["p99_ms"]
    bad = run_raw(stub, Req("/fail", b"{}"), connections=2, duration=0.3)
    assert bad["rps"] == 0 and bad["errors"] == Stub.seen["bad"] > 0


def test_probe_sequential(stub):
    p = probe(stub, Req("/x", b'{"a": 1}', {"Content-Type": "application/json"}), n=40, warmup=3)
    assert p["requests"] == 40 and p["errors"] == 0 and Stub.seen["ok"] == 43
    with pytest.raises(RuntimeError, match="500"):
        probe(stub, Req("/fail", b"{}"), n=3)


@pytest.mark.skipif(wrk_path() is None, reason="wrk is not installed (apt-get install wrk)")
def test_wrk_with_probe(stub):
    req = Req("/embed", b'{"view": "L"}', {"Content-Type": "application/json"}, items=1)
    w = run_wrk(stub, req, connections=2, duration=1)
    assert w["requests"] > 0 and w["errors"] == 0 and Stub.seen["bodies"] == {req.body}
    assert Stub.seen["ok"] >= w["requests"]
    r = load_with_probe(stub, req, clients=3, duration=1)
    assert r["latency_from"] == "probe beside wrk" and r["p50_ms"] is not None and r["errors"] == 0


@pytest.mark.slow
@pytest.mark.server
def test_bench_quick_runs(tmp_path):
    from server_fixtures import build_index, build_model, scenes
    build_model(tmp_path / "model")
    build_index(tmp_path / "index", tmp_path / "model", scenes(32), 32)
    out = tmp_path / "bench.json"
    r = run_cli(["-m", "serving.measure.bench", "--model", str(tmp_path / "model"), "--index", str(tmp_path / "index"),
                 "--quick", "--json", str(out)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    res = json.loads(out.read_text())
    rows = {(x["endpoint"], x["form"], x["images"], x["clients"]): x for x in res["rows"]}
    assert set(rows) == {("embed", f, n, c) for f in ("json", "binary") for n, c in ((1, 1), (1, 32), (16, 8))} | {
        ("search", "json", 1, 1)}
    for row in rows.values():
        assert row["errors"] == 0 and row["p50_ms"] > 0
    assert rows[("embed", "binary", 16, 8)]["inproc_batch"] == 64 and rows[("embed", "json", 1, 32)]["inproc_batch"] == 32
