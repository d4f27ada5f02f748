"""Benchmark of the CMC server against raw onnxruntime in-process (no torch).

    python -m serving.bench [--model DIR|TAG] [--url URL] [--view L] [--requests 300] [--duration 15] [--json]

1. latency: p50/p99 of POST /embed with one 64x64 PNG at concurrency 1, beside the raw in-process call of the same
   model (decode + resize + onnxruntime, and onnxruntime alone);
2. throughput at 32 concurrent clients with adaptive batching on and off (two server starts, CMC_BATCHING=1/0),
   beside raw onnxruntime at the mean batch size that batching reached (read from /info).
Without --url it starts `bentoml serve` itself on free ports (model from --model, CMC_MODEL, or runs/default/export).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from serving.launch import ServerProcess

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
ROOT = Path(__file__).resolve().parents[1]


def png64(size: int = 64, seed: int = 0) -> bytes:
    from PIL import Image
    a = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


class Served(ServerProcess):
    """The service on a free port with this benchmark's settings (no index; batching on or off)."""

    def __init__(self, model: str, batching: bool, token: str | None, extra_env: dict | None = None):
        env = {"CMC_MODEL": model, "CMC_INDEX": "none", "CMC_BATCHING": "1" if batching else "0"} | (extra_env or {})
        if token:
            env["CMC_API_TOKEN"] = token
        log = tempfile.NamedTemporaryFile(prefix="cmc-bench-", suffix=".log", delete=False).name
        super().__init__(env, log)
        try:
            self.wait_ready()
        except RuntimeError as e:
            raise SystemExit(f"{e}\nlog: {log}") from None


def latency(url: str, body: bytes, headers: dict, n: int) -> np.ndarray:
    import httpx
    out = []
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        for i in range(n + 20):
            t = time.perf_counter()
            r = c.post("/embed", content=body)
            dt = time.perf_counter() - t
            if r.status_code != 200:
                raise SystemExit(f"/embed answered {r.status_code}: {r.text[:300]}")
            if i >= 20:  # warm-up
                out.append(dt * 1000)
    return np.asarray(out)


def throughput(url: str, body: bytes, headers: dict, clients: int, duration: float) -> dict:
    import httpx

    async def run() -> dict:
        done, errors, lat = 0, 0, []
        stop = time.perf_counter() + duration
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as c:
            async def worker() -> None:
                nonlocal done, errors
                while time.perf_counter() < stop:
                    t = time.perf_counter()
                    r = await c.post("/embed", content=body)
                    if r.status_code == 200:
                        done += 1
                        lat.append((time.perf_counter() - t) * 1000)
                    else:
                        errors += 1
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            el = time.perf_counter() - t0
        return {"rps": done / el, "errors": errors, "p50_ms": float(np.percentile(lat, 50)) if lat else None,
                "p99_ms": float(np.percentile(lat, 99)) if lat else None}
    return asyncio.run(run())


def info(url: str, headers: dict) -> dict:
    import httpx
    return httpx.post(url + "/info", content=b"{}", headers=headers, timeout=30).json()


def raw_numbers(model: str, view: str, img: bytes, threads: int, n: int, batch: int, seconds: float = 3.0) -> dict:
    from models.runtime import Runtime
    rt = Runtime(model, intra_op_threads=threads)
    rt.warmup()
    x1 = rt.preprocess(view, [img])
    full, ort = [], []
    for i in range(n + 20):
        t = time.perf_counter()
        rt.embed_items(view, [img])
        t2 = time.perf_counter()
        rt.embed(view, x1)
        t3 = time.perf_counter()
        if i >= 20:
            full.append((t2 - t) * 1000)
            ort.append((t3 - t2) * 1000)
    xb = np.repeat(x1, max(1, batch), axis=0)
    rt.embed(view, xb)
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rt.embed(view, xb)
        k += 1
    ips = k * len(xb) / (time.perf_counter() - t0)
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        rt.embed_items(view, [img] * max(1, batch))
        k += 1
    ips_dec = k * max(1, batch) / (time.perf_counter() - t0)
    return {"p50_ms": float(np.median(full)), "p99_ms": float(np.percentile(full, 99)),
            "ort_p50_ms": float(np.median(ort)), "ort_p99_ms": float(np.percentile(ort, 99)),
            "batch": len(xb), "ort_items_per_s": ips, "decode_ort_items_per_s": ips_dec}


def default_model() -> str:
    for ref in (os.environ.get("CMC_MODEL"), str(ROOT / "runs" / "default" / "export")):
        if ref and (Path(ref) / "card.json").exists():
            return ref
    return os.environ.get("CMC_MODEL") or "cmc:latest"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir or BentoML tag (default: CMC_MODEL, runs/default/export)")
    ap.add_argument("--url", default=None, help="benchmark a running server (batching as configured there)")
    ap.add_argument("--url-nobatch", default=None, help="with --url: a second server running with CMC_BATCHING=0")
    ap.add_argument("--token", default=os.environ.get("CMC_API_TOKEN"))
    ap.add_argument("--view", default="L")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default: all CPUs)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from serving.core import cpu_count
    model = a.model or default_model()
    threads = a.threads or cpu_count()
    img = png64(a.image_size)
    body = json.dumps({"view": a.view, "images": [base64.b64encode(img).decode()]}).encode()
    headers = {"content-type": "application/json"} | ({"Authorization": f"Bearer {a.token}"} if a.token else {})
    env = {"CMC_THREADS": str(threads)}
    res: dict = {"model": model, "view": a.view, "image": f"{a.image_size}x{a.image_size} PNG", "threads": threads,
                 "cpus": cpu_count(), "clients": a.clients}

    def measure(url: str) -> dict:
        lat = latency(url, body, headers, a.requests)
        before = info(url, headers)["batching"]
        tp = throughput(url, body, headers, a.clients, a.duration)
        after = info(url, headers)["batching"]
        nb, nr = after["batches"] - before["batches"], after["rows"] - before["rows"]
        return {"p50_ms": float(np.median(lat)), "p99_ms": float(np.percentile(lat, 99)), **{f"tp_{k}": v for k, v in tp.items()},
                "mean_batch": nr / nb if nb else None, "batching": after["enabled"]}

    if a.url:
        res["server_batching"] = measure(a.url)
        if a.url_nobatch:
            res["server_nobatch"] = measure(a.url_nobatch)
    else:
        for key, batching in (("server_batching", True), ("server_nobatch", False)):
            s = Served(model, batching, a.token, env)
            try:
                res[key] = measure(s.url)
            finally:
                s.stop()
    batch = res["server_batching"].get("mean_batch") or 1
    res["raw"] = raw_numbers(model, a.view, img, threads, a.requests, int(round(batch)))
    raw, sb = res["raw"], res["server_batching"]
    res["targets"] = {
        "p50_overhead_ms": sb["p50_ms"] - raw["p50_ms"], "p50_ok": sb["p50_ms"] <= raw["p50_ms"] + 5,
        "batching_vs_raw_ort": sb["tp_rps"] / raw["ort_items_per_s"],
        "batching_vs_raw_decode_ort": sb["tp_rps"] / raw["decode_ort_items_per_s"],
        "throughput_ok": sb["tp_rps"] >= 0.6 * raw["ort_items_per_s"]}
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(table(res))
    return res


def table(r: dict) -> str:
    raw = r["raw"]
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"model {r['model']}  view {r['view']}  image {r['image']}  {r['cpus']} CPUs, {r['threads']} ORT threads, "
             f"{r['clients']} clients",
             f"{'':34} {'p50 ms':>8} {'p99 ms':>8} {'items/s @' + str(r['clients']):>12} {'mean batch':>11}"]
    lines.append(f"{'raw onnxruntime (ORT only)':34} {f(raw['ort_p50_ms'], 2):>8} {f(raw['ort_p99_ms'], 2):>8} "
                 f"{f(raw['ort_items_per_s']):>12} {raw['batch']:>11}")
    lines.append(f"{'raw decode+resize+ORT':34} {f(raw['p50_ms'], 2):>8} {f(raw['p99_ms'], 2):>8} "
                 f"{f(raw['decode_ort_items_per_s']):>12} {raw['batch']:>11}")
    for key, name in (("server_batching", "server /embed, batching on"), ("server_nobatch", "server /embed, batching off")):
        if key in r:
            s = r[key]
            lines.append(f"{name:34} {f(s['p50_ms'], 2):>8} {f(s['p99_ms'], 2):>8} {f(s['tp_rps']):>12} "
                         f"{f(s['mean_batch'], 2):>11}" + (f"  ({s['tp_errors']} errors)" if s["tp_errors"] else ""))
    t = r["targets"]
    lines.append(f"p50 overhead vs raw decode+ORT: {t['p50_overhead_ms']:+.2f} ms (target <= +5 ms: "
                 f"{'met' if t['p50_ok'] else 'MISSED'}); batching throughput = {100 * t['batching_vs_raw_ort']:.0f}% "
                 f"of raw ORT at the same batch ({100 * t['batching_vs_raw_decode_ort']:.0f}% of raw decode+ORT) "
                 f"(target >= 60%: {'met' if t['throughput_ok'] else 'MISSED'})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
