"""The CMC server beside the same work done in-process, in one run (no torch).

    python -m serving.measure.bench [--model DIR|TAG] [--index DIR] [--url URL] [--device cpu|cuda] [--forms json,binary]
                            [--duration 10] [--requests 500] [--quick] [--json [PATH]]

Rows (each for every request form in --forms; /search in JSON only):
  1 image per request at 1 client, 1 image at 32 clients, 16 images at 8 clients, /search at 1 client (k=10).
Throughput comes from `wrk` when installed (a Lua script sets the body; wrk uses little CPU), else from an asyncio
raw-socket keep-alive client whose own CPU time is reported. Latency comes from one sequential keep-alive
http.client connection (alone at 1 client; beside wrk's clients-1 connections under load).
In-process: the same PNG decoded, resized and embedded by models.runtime (``--threads``, default all CPUs), at
batch 1 for latency and at the largest batch the server could form (clients x images, at most its max batch
size) for items/s; /search in-process adds the index search. Ratios: server / in-process.
Forms: json = base64 PNGs in JSON, float answers; binary = raw image/png (1 image) or multipart (16 images)
with an application/x-npy answer.
Without --url it starts `bentoml serve` on a free port with the model (--model, CMC_MODEL, runs/default/export),
the index (--index, CMC_INDEX, else the model's default index) and the caller's CMC_* environment (CMC_THREADS,
CMC_SPIN, CMC_WORKERS, CMC_BATCHING, CMC_FAST_JSON, CMC_TRACE_HOT, CMC_ACCESS_LOG...), recorded in the JSON.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from index import manifest as index_manifest
from serving.measure.launch import ServerProcess
from serving.measure.loadgen import Req, load_with_probe, probe, wrk_path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
ROOT = Path(__file__).resolve().parents[2]
ROWS = (("embed", 1, 1), ("embed", 1, 32), ("embed", 16, 8), ("search", 1, 1))  # (endpoint, images, clients)


def png64(size: int = 64, seed: int = 0) -> bytes:
    from PIL import Image
    a = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def default_model() -> str:
    for ref in (os.environ.get("CMC_MODEL"), str(ROOT / "runs" / "default" / "export")):
        if ref and (Path(ref) / "card.json").exists():
            return ref
    return os.environ.get("CMC_MODEL") or "cmc:latest"


def multipart(images: list[bytes], **fields: str) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts += [f'--{b}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode() + img + b"\r\n" for i, img in enumerate(images)]
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def request(endpoint: str, form: str, view: str, img: bytes, n: int, auth: dict) -> Req:
    if endpoint == "search":
        body = {"query": {"view": view, "image": base64.b64encode(img).decode()}, "k": 10}
        return Req("/search", json.dumps(body).encode(), {"Content-Type": "application/json"} | auth)
    if form == "json":
        body = {"view": view, "images": [base64.b64encode(img).decode()] * n}
        return Req("/embed", json.dumps(body).encode(), {"Content-Type": "application/json"} | auth, n)
    npy = {"Accept": "application/x-npy"} | auth
    if n == 1:
        return Req(f"/embed?view={view}", img, {"Content-Type": "image/png"} | npy, 1)
    body, ctype = multipart([img] * n, view=view)
    return Req("/embed", body, {"Content-Type": ctype} | npy, n)


def post_json(url: str, path: str, body: dict, auth: dict) -> dict:
    import httpx
    r = httpx.post(url + path, json=body, headers=auth, timeout=60)
    r.raise_for_status()
    return r.json()


# ------------------------------------------------------------------------------------------- in-process
def in_process(model: str, view: str, img: bytes, threads: int, device: str, batches: list[int], n: int,
               seconds: float, index: str | None) -> dict:
    """decode + resize + onnxruntime in this process: latency at batch 1, items/s at each batch size (and ORT
    alone); /search latency (embed + index search) when an index is given."""
    from models.runtime import Runtime
    rt = Runtime(model, device=device, intra_op_threads=threads)
    rt.warmup()
    lat = []
    for i in range(n + 10):
        t = time.perf_counter()
        rt.embed_items(view, [img])
        if i >= 10:
            lat.append((time.perf_counter() - t) * 1000)
    out: dict = {"threads": threads, "providers": rt.sessions[view].get_providers(), "p50_ms": float(np.median(lat)),
                 "p99_ms": float(np.percentile(lat, 99)), "items_per_s": {}, "ort_items_per_s": {}}
    for b in sorted(set(batches)):
        for key, fn in (("items_per_s", lambda: rt.embed_items(view, [img] * b)),
                        ("ort_items_per_s", lambda x=rt.preprocess(view, [img] * b): rt.embed(view, x))):
            fn()
            k, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fn()
                k += 1
            out[key][b] = k * b / (time.perf_counter() - t0)
    if index:
        from index.store import IndexStore
        store = IndexStore.open(Path(index), fingerprint=rt.fingerprint, readonly=True)
        try:
            target = view if view in store.views else next(iter(store.views))
            lat = []
            for i in range(n + 10):
                t = time.perf_counter()
                store.search_items(rt.embed_items(view, [img]), target, 10)
                if i >= 10:
                    lat.append((time.perf_counter() - t) * 1000)
            out["search_p50_ms"], out["search_p99_ms"] = float(np.median(lat)), float(np.percentile(lat, 99))
        finally:
            store.close()
    return out


# ------------------------------------------------------------------------------------------- server rows
def server_rows(url: str, forms: list[str], view: str, img: bytes, auth: dict, a: argparse.Namespace,
                has_index: bool, use_wrk: bool | None) -> list[dict]:
    rows = []
    for endpoint, n, clients in ROWS:
        for form in (["json"] if endpoint == "search" else forms):
            if endpoint == "search" and not has_index:
                rows.append({"endpoint": "search", "form": form, "images": 1, "clients": 1,
                             "skipped": "the server has no index"})
                continue
            req = request(endpoint, form, view, img, n, auth)
            probe(url, req, n=3, warmup=2)  # warm this form up (and fail early on a bad answer)
            before = post_json(url, "/info", {}, auth)["batching"]
            if clients == 1:
                r = probe(url, req, n=a.requests)
                r |= {"generator": "http.client", "latency_from": "probe", "generator_cpu_s": None}
            else:
                r = load_with_probe(url, req, clients, a.duration, use_wrk)
            after = post_json(url, "/info", {}, auth)["batching"]
            nb, nr = after["batches"] - before["batches"], after["rows"] - before["rows"]
            rows.append({"endpoint": endpoint, "form": form, "images": n, "clients": clients,
                         "requests_per_s": r["rps"], "items_per_s": r["rps"] * n, "p50_ms": r["p50_ms"],
                         "p99_ms": r["p99_ms"], "errors": r["errors"], "generator": r["generator"],
                         "latency_from": r["latency_from"], "generator_cpu_s": r.get("generator_cpu_s"),
                         "mean_batch": nr / nb if nb else None})
    return rows


def compare(rows: list[dict], ip: dict, max_batch: int) -> None:
    """Add the in-process reference and the server/in-process ratios to each row (in place)."""
    for r in rows:
        if "skipped" in r:
            continue
        if r["endpoint"] == "search":
            r["inproc_p50_ms"] = ip.get("search_p50_ms")
        else:
            b = min(r["images"] * r["clients"], max_batch)
            r["inproc_batch"], r["inproc_items_per_s"] = b, ip["items_per_s"][b]
            r["inproc_ort_items_per_s"] = ip["ort_items_per_s"][b]
            r["items_ratio"] = r["items_per_s"] / ip["items_per_s"][b]
            r["inproc_p50_ms"] = ip["p50_ms"] if r["images"] == 1 else None
        if r["inproc_p50_ms"] is not None and r["p50_ms"] is not None and r["clients"] == 1:
            r["p50_overhead_ms"] = r["p50_ms"] - r["inproc_p50_ms"]
        if r["p50_ms"] and r["p99_ms"]:
            r["p99_over_p50"] = r["p99_ms"] / r["p50_ms"]


def table(res: dict) -> str:
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    s, ip = res["server"], res["in_process"]
    lines = [f"model {res['model']}  view {res['view']}  {res['image']}  {res['cpus']} CPUs  device {res['device']}",
             f"server: {(s.get('providers') or ['?'])[0]}, {s.get('workers')} worker(s), {s.get('threads')} ORT "
             f"threads, spin {s.get('spin')}, batching {s.get('batching')} (max {s.get('max_batch_size')}), "
             f"loop {s.get('event_loop')}, parser {s.get('http_parser')}; load from {res['generator']}",
             f"in-process: {ip['providers'][0]}, {ip['threads']} ORT threads, decode+resize+ORT p50 "
             f"{f(ip['p50_ms'], 2)} ms, p99 {f(ip['p99_ms'], 2)} ms",
             f"{'row':28} {'form':6} {'items/s':>9} {'in-proc':>9} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'p99/p50':>7} {'+p50 ms':>8} {'batch':>6} {'gen cpu s':>9} {'err':>4}"]
    for r in res["rows"]:
        name = ("/search k=10, 1 client" if r["endpoint"] == "search"
                else f"{r['images']} img/req, {r['clients']} client{'s' if r['clients'] > 1 else ''}")
        if "skipped" in r:
            lines.append(f"{name:28} {r['form']:6} skipped: {r['skipped']}")
            continue
        lines.append(f"{name:28} {r['form']:6} {f(r['items_per_s']):>9} {f(r.get('inproc_items_per_s')):>9} "
                     f"{f(r.get('items_ratio'), 2):>6} {f(r['p50_ms'], 2):>7} {f(r['p99_ms'], 2):>7} "
                     f"{f(r.get('p99_over_p50'), 1):>7} {f(r.get('p50_overhead_ms'), 2):>8} "
                     f"{f(r.get('mean_batch'), 1):>6} {f(r.get('generator_cpu_s'), 2):>9} {r['errors']:>4}")
    lines.append("ratio: server items/s / in-process items/s at the largest batch the server could form; "
                 "+p50: server p50 - in-process p50 (1 client). Targets (issue 12): +p50 <= 1.0 ms; 32 clients "
                 ">= 0.40; 16x8 >= 0.85; p99/p50 at 32 clients <= 4.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir or BentoML tag (default: CMC_MODEL, runs/default/export)")
    ap.add_argument("--index", default=os.environ.get("CMC_INDEX"),
                    help="index dir for the server and the in-process /search (default: the model's default index)")
    ap.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    ap.add_argument("--token", default=os.environ.get("CMC_API_TOKEN"))
    ap.add_argument("--device", default=os.environ.get("CMC_DEVICE", "auto"), choices=("auto", "cpu", "cuda"))
    ap.add_argument("--view", default="L")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--forms", default="json,binary", help="request forms: json, binary or both")
    ap.add_argument("--requests", type=int, default=500, help="sequential requests per 1-client row")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per multi-client row")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per in-process throughput figure")
    ap.add_argument("--threads", type=int, default=0, help="in-process ORT threads (default: all CPUs)")
    ap.add_argument("--no-wrk", action="store_true", help="use the asyncio raw-socket client even if wrk is installed")
    ap.add_argument("--quick", action="store_true", help="short settings (about 30 s) to check that it runs")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the results as JSON to PATH (or stdout with no PATH)")
    a = ap.parse_args(argv)
    if a.quick:
        a.requests, a.duration, a.seconds = min(a.requests, 60), min(a.duration, 2.0), min(a.seconds, 0.5)
    forms = [f.strip() for f in a.forms.split(",") if f.strip()]
    if not set(forms) <= {"json", "binary"}:
        ap.error(f"--forms takes json and/or binary, got {a.forms!r}")
    from serving.core import cpu_count
    model = a.model or default_model()
    img = png64(a.image_size)
    auth = {"Authorization": f"Bearer {a.token}"} if a.token else {}
    use_wrk = False if a.no_wrk else (wrk_path() is not None)
    server = None
    if a.url is None:
        env = {"CMC_MODEL": model} | ({"CMC_INDEX": a.index} if a.index else {}) | \
              ({"CMC_DEVICE": a.device} if a.device != "auto" else {}) | ({"CMC_API_TOKEN": a.token} if a.token else {})
        log = tempfile.NamedTemporaryFile(prefix="cmc-bench-", suffix=".log", delete=False).name
        server = ServerProcess(env, log)
        try:
            server.wait_ready()
        except RuntimeError as e:
            raise SystemExit(f"{e}\nlog: {log}") from None
    url = a.url or server.url
    try:
        info = post_json(url, "/info", {}, auth)
        index = info["index"].get("path") if info["index"]["available"] else None
        rows = server_rows(url, forms, a.view, img, auth, a, index is not None, use_wrk)
    finally:
        if server is not None:
            server.stop()
    st = info["settings"]
    max_batch = int(st["max_batch_size"]) if info["batching"]["enabled"] else 1
    batches = sorted({min(r["images"] * r["clients"], max_batch) for r in rows if r["endpoint"] == "embed"} | {1})
    index = a.index or index
    ip = in_process(model, a.view, img, a.threads or cpu_count(), a.device, batches, a.requests, a.seconds,
                    index if index and index_manifest.exists(index) else None)
    compare(rows, ip, max_batch)
    res = {"model": model, "view": a.view, "image": f"{a.image_size}x{a.image_size} PNG", "cpus": cpu_count(),
           "device": a.device, "generator": "wrk + http.client probe" if use_wrk else "asyncio raw-socket client",
           "quick": a.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "server": {k: st.get(k) for k in ("workers", "threads", "spin", "batching", "max_batch_size")}
           | info.get("server", {}) | {"providers": info.get("providers"), "url": a.url or "started here"},
           "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("CMC_")} if a.url is None else None,
           "in_process": ip, "rows": rows}
    print(table(res))
    if a.json == "-":
        print(json.dumps(res, indent=2))
    elif a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {a.json}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
