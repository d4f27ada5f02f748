"""python loadtests/run.py: drive the real CMC server with locust, headless, and print a table per endpoint.

Starts `bentoml serve` on a free port unless --url is given, waits for /readyz, runs locust (users, spawn
rate, run time; CSV and HTML report into --out), prints requests, failures, RPS, p50/p95/p99 per endpoint,
stops the server it started, and exits non-zero on any failure or when --p99-ms is exceeded. The requests are
built from the served model's /info (its views, sources and index; see loadtests/plan.py), and the views that
were exercised are printed with their request counts.
--soak samples the server's RSS every second into OUT/rss.csv and reports its growth after warm-up.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages import without installing

from serving.measure.launch import ServerProcess  # noqa: E402


def scratch_index(out: Path) -> dict:
    """Load tests add items: serve a copy of the model's index (CMC_INDEX, else its default gallery) so that
    the user's own index is left as it was. Returns the environment for the server."""
    import shutil

    from index import manifest as index_manifest
    from models.artifact import default_index_dir, resolve
    from models.card import load_card
    src = os.environ.get("CMC_INDEX")
    if src and src.lower() in ("none", "off", ""):
        return {}
    src_path = Path(src).expanduser() if src else default_index_dir(load_card(resolve(None), verify=False).fingerprint)
    if not index_manifest.exists(src_path):
        return {}
    dst = out / "index"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src_path, dst, ignore=shutil.ignore_patterns("LOCK"))
    return {"CMC_INDEX": str(dst)}


def table(stats_csv: Path) -> tuple[str, list[dict]]:
    rows = list(csv.DictReader(open(stats_csv)))
    out = [f"{'endpoint':<22} {'requests':>9} {'failures':>9} {'RPS':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}",
           "-" * 78]
    parsed = []
    for r in rows:
        name = r["Name"] if r["Type"] else "TOTAL"
        if r["Name"] == "Aggregated":
            name = "TOTAL"
        d = {"endpoint": (r["Type"] + " " + r["Name"]).strip() if name != "TOTAL" else "TOTAL",
             "requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
             "rps": float(r["Requests/s"]), "p50": float(r["50%"] or 0), "p95": float(r["95%"] or 0),
             "p99": float(r["99%"] or 0)}
        parsed.append(d)
        out.append(f"{d['endpoint']:<22} {d['requests']:>9} {d['failures']:>9} {d['rps']:>8.1f} {d['p50']:>8.0f} "
                   f"{d['p95']:>8.0f} {d['p99']:>8.0f}")
    return "\n".join(out), parsed


def views_table(report: dict) -> str:
    """The views the run exercised: source and requests sent per endpoint."""
    lines = [f"served model: {report.get('plan')}"]
    for v, d in report.get("views", {}).items():
        reqs = ", ".join(f"{ep} {n}" for ep, n in d["requests"].items()) or "no requests"
        lines.append(f"  view {v:<10} ({d['source']:<6}) {reqs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python loadtests/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="an already running server (default: start one on a free port)")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--spawn-rate", type=float, default=4)
    p.add_argument("--run-time", default="20s", help="e.g. 20s, 2m")
    p.add_argument("--p99-ms", type=float, default=None, help="fail when the overall p99 exceeds this")
    p.add_argument("--out", default="loadtest_out", help="folder for the CSV and HTML reports")
    p.add_argument("--soak", action="store_true", help="sample the server's RSS every second (needs a started server)")
    p.add_argument("--warmup-s", type=float, default=60.0, help="soak: RSS growth is measured after this")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("views.json", "locust_final_stats.csv"):  # written by this run's locust
        (out / name).unlink(missing_ok=True)
    server = None
    url = a.url
    if url is None:
        server = ServerProcess(scratch_index(out), out / "server.log")
        url = server.url
        print(f"started bentoml serve on {url} (log: {out / 'server.log'})")
    rss: list[tuple[float, int]] = []
    stop_flag = threading.Event()
    try:
        if server is not None:
            try:
                server.wait_ready()
            except RuntimeError as e:
                print(f"error: {str(e).splitlines()[0]} (log: {out / 'server.log'})", file=sys.stderr)
                return 2
        if a.soak and server is not None:
            def sample():
                t0 = time.time()
                while not stop_flag.wait(1.0):
                    rss.append((time.time() - t0, server.rss_bytes()))
            threading.Thread(target=sample, daemon=True).start()
        env = os.environ.copy() | {"PYTHONPATH": str(ROOT), "CMC_LOAD_REPORT": str(out / "views.json"),
                                   "CMC_LOAD_STATS": str(out / "locust_final_stats.csv")} \
            | ({"CMC_P99_MS": str(a.p99_ms)} if a.p99_ms else {})
        cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
               "--host", url, "-u", str(a.users), "-r", str(a.spawn_rate), "--run-time", a.run_time,
               "--csv", str(out / "locust"), "--html", str(out / "report.html"), "--only-summary",
               "--loglevel", "WARNING"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        stop_flag.set()
        if server is not None:
            server.stop()
    stats_csv = next((f for f in (out / "locust_final_stats.csv", out / "locust_stats.csv") if f.exists()), None)
    if stats_csv is None:
        print(r.stdout[-3000:], r.stderr[-3000:], sep="\n", file=sys.stderr)
        return 2
    text, rows = table(stats_csv)
    print(text)
    summary = {"users": a.users, "run_time": a.run_time, "url": url, "endpoints": rows, "locust_exit": r.returncode}
    if (out / "views.json").exists():
        summary["views"] = json.loads((out / "views.json").read_text())
        print(views_table(summary["views"]))
    if rss:
        with open(out / "rss.csv", "w") as f:
            f.write("t_s,rss_bytes\n" + "".join(f"{t:.1f},{b}\n" for t, b in rss))
        after = [b for t, b in rss if t >= a.warmup_s] or [b for _, b in rss]
        growth = (max(after) - after[0]) / max(after[0], 1)
        summary["rss"] = {"after_warmup_MB": after[0] / 2**20, "max_MB": max(after) / 2**20, "growth": growth}
        print(f"server RSS after warm-up {after[0] / 2**20:.0f} MB, max {max(after) / 2**20:.0f} MB, growth {100 * growth:.1f}%")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    failures = sum(x["failures"] for x in rows if x["endpoint"] == "TOTAL")
    if r.returncode != 0 or failures:
        print(f"FAILED: {failures} failed request(s); locust exit code {r.returncode}", file=sys.stderr)
        if r.stderr.strip():
            print(r.stderr[-2000:], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
