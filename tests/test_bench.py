"""serving.measure.loadgen against a stub HTTP/1.1 server that counts what it answers (fast), and `python -m serving.measure.bench
--quick` end to end (slow: it starts a real server)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
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


# --- index.bench on real embeddings (index/bench_data.py): the data source, its cache, held-out queries ---

@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    from server_fixtures import build_model
    d = tmp_path_factory.mktemp("bench_model") / "model"
    build_model(d)  # random init, 32 px: embeddings are still a deterministic function of the input
    return d


def test_embeddings_equal_runtime_and_cache_is_reused(random_model, tmp_path):
    from index import bench_data
    from models.data.scenes import render_chunk
    from models.runtime import Runtime

    calls = []

    class Counting(Runtime):
        def embed_sources(self, view, sources):
            calls.append(len(next(iter(sources.values()))))
            return super().embed_sources(view, sources)

    spec = f"embeddings:{random_model}:scenes"
    x = bench_data.embeddings(spec, 64, ["L", "depth"], cache=tmp_path, workers=1, progress=False,
                              runtime_factory=Counting)
    assert sum(calls) == 2 * 64  # both views, every item once
    rt = Runtime(random_model, device="cpu")
    ref = render_chunk(bench_data.BENCH_SEED, 0, 256, rt.image_size)  # the same inputs, rendered independently
    for v in ("L", "depth"):
        want = rt.embed_sources(v, {"rgb": ref["rgb"][:64], "depth": ref["depth"][:64]})
        assert x[v].shape == (64, rt.dim)
        np.testing.assert_allclose(np.asarray(x[v]), want, atol=1e-5)
    files = sorted(tmp_path.rglob("*.npy"))
    assert [f.name for f in files] == ["L.npy", "depth.npy"]
    mtimes = [f.stat().st_mtime_ns for f in files]
    calls.clear()
    again = bench_data.embeddings(spec, 40, ["L"], cache=tmp_path, progress=False, runtime_factory=Counting)
    assert calls == [] and [f.stat().st_mtime_ns for f in files] == mtimes  # a prefix of the cache, no inference
    np.testing.assert_array_equal(np.asarray(again["L"]), np.asarray(x["L"])[:40])


def test_partial_cache_resumes(random_model, tmp_path):
    import json as js
    from index import bench_data
    spec = f"embeddings:{random_model}:scenes:seed=77"
    full = np.asarray(bench_data.embeddings(spec, 300, ["L"], cache=tmp_path / "a", workers=1, progress=False)["L"])
    d = next((tmp_path / "a").iterdir())
    meta = js.loads((d / "meta.json").read_text())
    meta["done"] = 256  # as if killed after the first chunk was recorded
    (d / "meta.json").write_text(js.dumps(meta))
    arr = np.lib.format.open_memmap(d / "L.npy", mode="r+")
    arr[256:] = 0
    arr.flush()
    del arr
    calls = []
    from models.runtime import Runtime

    class Counting(Runtime):
        def embed_sources(self, view, sources):
            calls.append(len(next(iter(sources.values()))))
            return super().embed_sources(view, sources)

    again = np.asarray(bench_data.embeddings(spec, 300, ["L"], cache=tmp_path / "a", workers=1, progress=False,
                                             runtime_factory=Counting)["L"])
    assert sum(calls) == 300 - 256
    np.testing.assert_allclose(again, full, atol=1e-6)


def test_holdout_disjoint_and_bench_cli(random_model, tmp_path):
    from index import bench_data
    from index.bench import holdout
    spec = f"embeddings:{random_model}:scenes"
    x = bench_data.embeddings(spec, 300, ["L"], cache=tmp_path, workers=1, progress=False)["L"]
    xq, xt, xb = holdout(x, 20, 30, 250)
    assert len(xq) == 20 and len(xt) == 30 and len(xb) == 250
    held = np.concatenate([xq, xt])
    d2 = ((held[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
    assert d2.min() > 1e-6  # no held-out query is an indexed item (every scene is distinct)
    with pytest.raises(SystemExit, match="31 held out"):
        holdout(x, 20, 31, 250)
    out = tmp_path / "r.json"
    r = run_cli(["-m", "index.bench", "--data", spec, "--n", "250", "--nq", "20", "--ntune", "30", "--cache",
                 str(tmp_path), "--types", "flat,ivf,auto", "--budgets", "1,0.5", "--no-compare-synthetic",
                 "--out", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {row["type"]: row for row in doc["results"]}
    assert set(rows) == {"flat", "ivf", "auto@1", "auto@0.5"}
    assert rows["flat"]["recall@10"] == 1.0 and rows["flat"]["n"] == 250
    assert rows["ivf"]["recall@10"] >= 0.95 and rows["ivf"]["target_reached"]
    assert rows["auto@0.5"]["budget_mb"] >= 1 and rows["ivf"]["build_peak_rss_bytes"] >= 0
    assert rows["auto@0.5"]["choice"]["budget_mb"] == rows["auto@0.5"]["budget_mb"] and "choice" not in rows["ivf"]
    st = doc["neighbour_stats"][spec]["250"]["data"]
    assert st["top1_mean"] >= st["top10_mean"] > st["random_mean"]


@pytest.mark.parametrize("spec, needle", [
    ("embeddings:nomodel", "embeddings:nomodel"),
    ("embeddings:default:cifar10", "cifar10:PATH"),
    ("embeddings:/no/such/model:scenes", "/no/such/model"),
    ("embeddings:default:scenes:seed=0", "seed 0"),
])
def test_bad_spec_one_line(spec, needle, tmp_path):
    from index.bench import main
    with pytest.raises(SystemExit) as e:
        main(["--data", spec, "--n", "10", "--cache", str(tmp_path), "--out", str(tmp_path / "o.json")])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and needle in msg
