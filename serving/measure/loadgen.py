"""Load generators for serving.measure.bench that measure the server rather than themselves.

* :func:`run_wrk` - throughput from ``wrk`` (a C generator using little CPU; Debian package ``wrk``) with a Lua
  script that sets the POST body. Only its requests/s is read: its latency percentiles are wrong against
  BentoML (docs/ARCHITECTURE.md), so latency comes from :func:`probe`.
* :func:`run_raw` - the fallback without wrk: an asyncio raw-socket HTTP/1.1 keep-alive client, which reports
  its own CPU time so a reader can see how much of the 2 cores it took from the server.
* :func:`probe` - one sequential keep-alive ``http.client`` connection: the latency a client sees, alone or
  beside a load.
"""
from __future__ import annotations

import asyncio
import http.client
import os
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Req:
    """One POST to replay: path with query, body, headers (content-type, accept, authorization)."""
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    items: int = 1  # images per request


def host_port(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _lua_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(url: str, req: Req, connections: int, duration: float, threads: int = 1) -> dict:
    """``wrk -t threads -c connections -d duration`` replaying ``req``; requests/s, errors and wrk's CPU time."""
    with tempfile.TemporaryDirectory(prefix="cmc-wrk-") as d:
        body = os.path.join(d, "body.bin")
        with open(body, "wb") as f:
            f.write(req.body)
        lines = ['wrk.method = "POST"', f'local f = io.open({_lua_quote(body)}, "rb")', "wrk.body = f:read('*a')",
                 "f:close()"] + [f"wrk.headers[{_lua_quote(k)}] = {_lua_quote(v)}" for k, v in req.headers.items()]
        script = os.path.join(d, "post.lua")
        with open(script, "w") as f:
            f.write("\n".join(lines) + "\n")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(["wrk", "-t", str(max(1, min(threads, connections))), "-c", str(connections),
                            "-d", f"{max(1, round(duration))}s", "--timeout", "60s", "-s", script, url + req.path],
                           capture_output=True, text=True, timeout=duration + 120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stderr[-1000:] or r.stdout[-1000:]}")
    out = r.stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    n = int(m.group(1)) if m else 0
    secs = float(m.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}.get(m.group(3), 1.0) if m else duration
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"generator": "wrk", "requests": n, "seconds": secs, "rps": (n - errors) / secs if secs else 0.0,
            "errors": errors, "generator_cpu_s": cpu}


def _raw_request(host: str, port: int, req: Req) -> bytes:
    head = [f"POST {req.path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(req.body)}"]
    head += [f"{k}: {v}" for k, v in req.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + req.body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in hdrs:
        await reader.readexactly(int(hdrs["content-length"]))
    elif hdrs.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


def run_raw(url: str, req: Req, connections: int, duration: float) -> dict:
    """Asyncio raw-socket keep-alive client: requests/s, errors, its own latencies and its own CPU time."""
    host, port = host_port(url)
    raw = _raw_request(host, port, req)

    async def main() -> tuple[int, int, list[float], float]:
        stop = time.perf_counter() + duration
        done, errors, lat = 0, 0, []

        async def conn() -> None:
            nonlocal done, errors
            reader, writer = await asyncio.open_connection(host, port)
            try:
                while time.perf_counter() < stop:
                    t = time.perf_counter()
                    writer.write(raw)
                    status = await _read_response(reader)
                    lat.append(time.perf_counter() - t)
                    if status == 200:
                        done += 1
                    else:
                        errors += 1
            finally:
                writer.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(conn() for _ in range(connections)))
        return done, errors, lat, time.perf_counter() - t0

    cpu0 = time.process_time()
    done, errors, lat, wall = asyncio.run(main())
    cpu = time.process_time() - cpu0
    ms = np.asarray(lat) * 1000
    return {"generator": "asyncio-raw", "requests": done + errors, "seconds": wall, "rps": done / wall,
            "errors": errors, "generator_cpu_s": cpu,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None}


def probe(url: str, req: Req, n: int | None = None, duration: float | None = None, warmup: int = 5,
          stop: threading.Event | None = None) -> dict:
    """Sequential requests on one keep-alive http.client connection: latencies (ms) and requests/s.
    Runs ``n`` requests, or for ``duration`` seconds, or until ``stop`` is set."""
    host, port = host_port(url)
    c = http.client.HTTPConnection(host, port, timeout=120)
    lat: list[float] = []
    errors, first = 0, None
    try:
        for _ in range(warmup):
            c.request("POST", req.path, req.body, req.headers)
            r = c.getresponse()
            first = (r.status, r.read()[:300])
            if r.status != 200:
                raise RuntimeError(f"POST {req.path} answered {r.status}: {first[1]!r}")
        t_end = time.perf_counter() + duration if duration else None
        t0 = time.perf_counter()
        while True:
            if n is not None and len(lat) + errors >= n:
                break
            if t_end is not None and time.perf_counter() >= t_end:
                break
            if stop is not None and stop.is_set():
                break
            t = time.perf_counter()
            c.request("POST", req.path, req.body, req.headers)
            r = c.getresponse()
            r.read()
            dt = time.perf_counter() - t
            if r.status == 200:
                lat.append(dt * 1000)
            else:
                errors += 1
        wall = time.perf_counter() - t0
    finally:
        c.close()
    a = np.asarray(lat)
    return {"requests": len(lat) + errors, "errors": errors, "seconds": wall, "rps": len(lat) / wall if wall else 0.0,
            "p50_ms": float(np.percentile(a, 50)) if len(a) else None,
            "p99_ms": float(np.percentile(a, 99)) if len(a) else None}


def load_with_probe(url: str, req: Req, clients: int, duration: float, use_wrk: bool | None = None) -> dict:
    """``clients`` concurrent keep-alive clients for ``duration`` s. With wrk: wrk holds clients-1 connections
    and a sequential probe the last one (its latency is what a client sees under this load); without wrk: the
    raw asyncio client holds all of them and reports its own latencies."""
    use_wrk = wrk_path() is not None if use_wrk is None else use_wrk
    if not use_wrk:
        r = run_raw(url, req, clients, duration)
        return r | {"clients": clients, "latency_from": "asyncio-raw (same process)"}
    if clients == 1:
        p = probe(url, req, duration=duration)
        return {"generator": "http.client", "clients": 1, "rps": p["rps"], "errors": p["errors"],
                "p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"], "generator_cpu_s": None, "latency_from": "probe"}
    stop, box = threading.Event(), {}
    th = threading.Thread(target=lambda: box.update(probe(url, req, stop=stop, warmup=1)), daemon=True)
    th.start()
    try:
        w = run_wrk(url, req, clients - 1, duration)
    finally:
        stop.set()
        th.join(120)
    p = box or {"rps": 0.0, "errors": 0, "p50_ms": None, "p99_ms": None}
    return w | {"clients": clients, "rps": w["rps"] + p["rps"], "errors": w["errors"] + p["errors"],
                "p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"], "latency_from": "probe beside wrk"}
