"""The CI smoke of the load test: loadtests/run.py starts a real server, runs locust for 20 s at low
concurrency, and every request of every endpoint succeeds with a correctly shaped answer."""
import json

import pytest

from conftest import run_cli
from server_fixtures import build_index, build_model, scenes


@pytest.mark.server
def test_locust_smoke_zero_failures(tmp_path):
    model_dir = tmp_path / "model"
    build_model(model_dir, image_size=32)
    build_index(tmp_path / "index", model_dir, scenes(n=64, size=32), 64)
    out = tmp_path / "out"
    r = run_cli(["loadtests/run.py", "--users", "2", "--spawn-rate", "2", "--run-time", "20s", "--out", str(out)],
                timeout=240, env={"CMC_MODEL": str(model_dir), "CMC_INDEX": str(tmp_path / "index"),
                                  "CMC_LOAD_DATA": "scenes:n=64,size=64,seed=2,test_n=32"})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    rows = {e["endpoint"]: e for e in summary["endpoints"]}
    assert rows["TOTAL"]["failures"] == 0 and rows["TOTAL"]["requests"] > 20
    for ep in ("POST /embed", "POST /similarity", "POST /search", "POST /index/add"):
        assert rows[ep]["requests"] > 0 and rows[ep]["failures"] == 0, ep
    assert (out / "report.html").stat().st_size > 1000
    assert "p99 ms" in r.stdout
