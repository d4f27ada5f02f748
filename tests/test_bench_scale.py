"""index.bench_scale and serving.measure.scale end to end at a small scale (the 10M figures are in BENCHMARKS.md):
real embeddings expanded with noisy copies, built by index.build --data vectors: within a budget, nprobe tuned on
held-out queries (given to the build: --given-queries), and the same queries through a real `bentoml serve` finding
what the store finds in process."""
import json

import numpy as np

from conftest import run_cli
from index.vector_files import VectorFiles
from models.runtime import Runtime


def test_bench_scale_and_its_server(trained_artifact, tmp_path):
    model, work = str(trained_artifact["dir"]), tmp_path / "work"
    r = run_cli(["-m", "index.bench_scale", "--model", model, "--real", "1500", "--n", "6000", "--noise", "0.3",
                 "--memory-mb", "2", "--cache", str(tmp_path / "cache"), "--work", str(work), "--workers", "1",
                 "--given-queries", "--out", str(tmp_path / "res.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "res.json").read_text())
    # the file: 1,500 real rows, then noisy unit copies of them
    vf = VectorFiles(f"vectors:{work / 'vectors'}", ["L"], Runtime(model).dim)
    x = vf.read("L", 0, 6000)
    assert vf.n == 6000 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    ip = np.sum(x[1500:3000] * x[:1500], axis=1)  # copy 1 of every real row against the row
    assert 0.9 < ip.mean() < 0.99, ip.mean()  # 1 / sqrt(1 + 0.3^2) = 0.958 expected
    s = res["search"]
    assert s["items"] == 6000 and ("SQ" in s["factory"] or "PQ" in s["factory"]), s["factory"]  # 2.9 MiB raw > 2 MB
    assert s["choice"]["est_bytes"] <= 2 * 2**20
    assert res["build"]["peak_rss_mib"] > 0 and res["tuned"]["queries"] == 500
    c = s["choice"]  # --given-queries: the tuning queries chose the type and tuned it in the build itself
    assert c["queries_from"] == c["built_queries_from"] == "given" and c["queries"] == c["built_queries"] == 500, c
    assert s["recall_at_10"] >= 0.85, s  # tuned to 0.95 on the 500 tuning queries; 1,000 other queries here
    r = run_cli(["-m", "serving.measure.scale", "--work", str(work), "--model", model, "--queries", "40",
                 "--json", str(tmp_path / "server.json")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    srv = json.loads((tmp_path / "server.json").read_text())
    gt = np.load(work / "gt.npy")[:40]
    assert srv["queries"] == 40 and srv["recall_at_10"] >= 0.8, srv
    assert abs(srv["recall_at_10"] - _store_recall(work, gt)) <= 0.03, srv  # the server answers as the store does


def _store_recall(work, gt):
    from index.store import IndexStore
    q = np.load(work / "queries.npy")[:len(gt)]
    with IndexStore.open(work / "index", readonly=True) as s:
        ids = s.search(q, "L", 10)[1]
        rows = np.array([[int(m["key"][4:]) for m in s.lookup(r)] for r in ids])
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, gt)]))
