"""The server over the 10M-item view of ``python -m index.bench_scale``: searchable, how fast, in how much memory.

    python -m serving.measure.scale --work /work/scale --queries 200 --json docs/results/index_scale_10m_server.json

Starts ``bentoml serve`` (one worker: ``CMC_WORKERS=1``, the default model, ``CMC_INDEX=<work>/index``), renders
the first ``--queries`` held-out query scenes of the benchmark (the same rows ``index.bench_scale`` embedded as
its timed queries: ``index.bench_data``'s scenes, seed ``BENCH_SEED``), and sends each as a PNG to ``/search``
(view L, k = 10) over one sequential keep-alive connection: recall@10 of the answers against the exact ground
truth over the 10M rows (keys ``vec-<row>``), beside the store's own recall on the same queries' cached embeddings
(in this process, after the server stops), latency percentiles, the server's start time and resident
memory (the server and every process below it, ``ServerProcess.rss_bytes``).
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from index.bench_data import iter_scenes, scenes_options
from index.bench_scale import VIEW, rows_of
from index.recall import overlap
from index.store import IndexStore
from models.runtime import Runtime
from serving.measure.launch import ServerProcess

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def query_pngs(n: int, image_size: int) -> list[str]:
    """The first ``n`` benchmark scenes (index.bench_data's rows 0..n-1) as base64 PNGs of their rgb."""
    out: list[str] = []
    for _, src in iter_scenes(scenes_options("", image_size), 0, n, 1):
        for img in src["rgb"]:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
    return out[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.measure.scale", description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="index.bench_scale's work directory (index/, gt.npy)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--model", default=None, help="model reference (default: CMC_MODEL or cmc:latest)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    work = Path(a.work)
    gt = np.load(work / "gt.npy")[:a.queries]
    rt = Runtime(a.model)  # None: CMC_MODEL, else cmc:latest (models.artifact), as the server resolves it
    pngs = query_pngs(a.queries, rt.image_size)
    env = {"CMC_INDEX": str(work / "index"), "CMC_WORKERS": "1"} | ({"CMC_MODEL": a.model} if a.model else {})
    t0 = time.perf_counter()
    server = ServerProcess(env, work / "server.log").wait_ready(timeout=900)
    ready_s = time.perf_counter() - t0
    try:
        rss_ready = server.rss_bytes() / 2**20
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        lat, got = [], []
        for b64 in pngs:
            body = json.dumps({"query": {"view": VIEW, "image": b64}, "target_view": VIEW, "k": 10})
            t = time.perf_counter()
            conn.request("POST", "/search", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            lat.append(time.perf_counter() - t)
            if r.status != 200:
                raise RuntimeError(f"/search answered {r.status}: {data[:500]!r}")
            got.append([int(h["key"][4:]) for h in json.loads(data)["results"]])
        rss_after = server.rss_bytes() / 2**20
    finally:
        server.stop()
    recall = overlap(np.array(got), gt, 10)
    with IndexStore.open(work / "index", readonly=True) as store:  # the same queries' cached embeddings, in process
        q = np.load(work / "queries.npy")[:len(gt)]
        store_recall = overlap(rows_of(store, store.search(q, VIEW, 10)[1]), gt, 10)
    ms = np.array(lat) * 1000
    res = {"queries": len(pngs), "recall_at_10": round(recall, 4), "store_recall_at_10": round(store_recall, 4),
           "ready_seconds": round(ready_s, 1),
           "latency_ms": {"p50": round(float(np.median(ms)), 2), "p90": round(float(np.percentile(ms, 90)), 2),
                          "p99": round(float(np.percentile(ms, 99)), 2)},
           "rss_ready_mib": round(rss_ready), "rss_after_mib": round(rss_after), "workers": 1,
           "index": str(work / "index")}
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
