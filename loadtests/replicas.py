"""python loadtests/replicas.py: the same locust mix against two Milvus replicas behind nginx and against one
replica on the FAISS backend, in one run on one machine, and a table for each.

Layout (a): ``milvus-lite server`` on a free port; two ``bentoml serve`` processes that share nothing but that
server (each its own working directory, CMC_HOME, BENTOML_HOME and port, as two machines would be), both with
CMC_INDEX=milvus://127.0.0.1:PORT?collection=NAME and a CMC_API_TOKEN; nginx (deploy/nginx.conf, round-robin)
in front. Layout (b): one ``bentoml serve`` on a FAISS index directory seeded with the same items. Each layout
is started, loaded for --run-time with loadtests/run.py --url (the model-aware mix, adds included), and
stopped before the next starts.

The helpers (MilvusLite, Nginx, render_nginx_conf, seed_index, replicas_behind_nginx) are what
tests/test_nginx.py uses.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.measure.launch import MilvusLite, ServerProcess, free_port, milvus_lite_exe, wait_port  # noqa: E402,F401

TEMPLATE = ROOT / "deploy" / "nginx.conf"
TOKEN_DEFAULT = "replicas-load-test-token"


def nginx_exe() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)


def render_nginx_conf(prefix: Path, listen: str, upstreams: list[str], template: Path = TEMPLATE) -> str:
    """deploy/nginx.conf with its placeholders filled: PREFIX, LISTEN (host:port), UPSTREAMS (host:port each)."""
    lines = "\n".join(f"        server {u} max_fails=1 fail_timeout=10s;" for u in upstreams)
    return (template.read_text().replace("{{PREFIX}}", str(prefix)).replace("{{LISTEN}}", listen)
            .replace("{{UPSTREAMS}}", lines))


class Nginx:
    """Debian's nginx in the foreground (daemon off) with its own prefix, pid, logs and temp dirs under
    ``prefix``, on a free loopback port, proxying round-robin to ``upstreams`` (host:port)."""

    def __init__(self, prefix: Path, upstreams: list[str], port: int | None = None):
        self.prefix = Path(prefix)
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = self.prefix / "nginx.conf"
        conf.write_text(render_nginx_conf(self.prefix, f"127.0.0.1:{self.port}", upstreams))
        glob = "daemon off;"
        if os.geteuid() == 0:  # workers would drop to `nobody`, who cannot write temp files under a private tmp
            glob += f" user {pwd.getpwuid(os.geteuid()).pw_name};"
        exe = nginx_exe()
        if exe is None:
            raise RuntimeError("nginx is not installed (apt-get install -y nginx)")
        self._out = open(self.prefix / "stdout.log", "wb")
        self.proc = subprocess.Popen([exe, "-p", str(self.prefix), "-c", str(conf), "-g", glob],
                                     stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_port(self.port, self.proc, "nginx", 30)
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {self.errors()}") from None

    def errors(self) -> str:
        return "".join(p.read_text(errors="replace")[-2000:] for p in (self.prefix / "stdout.log",
                                                                        self.prefix / "error.log") if p.exists())

    def upstream_counts(self) -> Counter:
        """Requests per upstream address, from the access log."""
        p = self.prefix / "access.log"
        return Counter(re.findall(r"upstream=(\S+)", p.read_text())) if p.exists() else Counter()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGQUIT)  # graceful: finish the requests in flight
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._out.close()


def seed_index(model: str | Path, location: str | Path, n: int = 64) -> None:
    """Create an index (a directory or a milvus:// collection) of ``n`` generated scenes in every view of the
    model, through index.build (the same items for either backend)."""
    from index.build import build_index
    from models.data import load
    from models.runtime import Runtime
    rt = Runtime(model)
    ds = load(f"scenes:n={max(n, 64)},size={rt.image_size},seed=5,test_n={n}", "test")
    sources = set(ds.sources)
    from models.views import source_key
    views = [v for v in rt.views if source_key(v, rt.views[v]) in sources]
    build_index(rt, ds, views, location, progress=False)


@contextlib.contextmanager
def replicas_behind_nginx(model: str | Path, base: Path, token: str, n_seed: int = 64, workers: int = 1,
                          collection: str = "replicas"):
    """milvus-lite, a seeded collection, two replicas (each its own cwd, CMC_HOME, BENTOML_HOME, port) and nginx
    before them; yields a dict with ``url`` (nginx), ``servers``, ``nginx``, ``milvus``, ``index``."""
    base = Path(base)
    milvus = MilvusLite(base / "milvus" / "data").wait_ready()
    servers: list[ServerProcess] = []
    nginx = None
    try:
        index = milvus.url(collection)
        seed_index(model, index, n_seed)
        for name in ("a", "b"):  # as two machines: nothing shared but the Milvus server
            d = base / f"replica-{name}"
            d.mkdir(parents=True, exist_ok=True)
            servers.append(ServerProcess({"CMC_MODEL": str(model), "CMC_INDEX": index, "CMC_API_TOKEN": token,
                                          "CMC_WORKERS": str(workers), "CMC_THREADS": "1",
                                          "BENTOML_HOME": str(d / "bentoml"), "CMC_HOME": str(d / "cmc")},
                                         d / "server.log", cwd=d))
        for s in servers:
            s.wait_ready()
        nginx = Nginx(base / "nginx", [f"127.0.0.1:{s.port}" for s in servers])
        yield {"url": nginx.url, "servers": servers, "nginx": nginx, "milvus": milvus, "index": index}
    finally:
        if nginx is not None:
            nginx.stop()
        for s in servers:
            s.stop()
        milvus.stop()


@contextlib.contextmanager
def one_replica(model: str | Path, base: Path, token: str, n_seed: int = 64, workers: int = 2,
                backend: str = "faiss", behind_nginx: bool = False):
    """One replica (``workers`` workers) on a FAISS index directory or a milvus-lite collection, seeded with the
    same items, optionally behind nginx (one upstream): the pieces of the two-replica layout one at a time."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    milvus = nginx = s = None
    try:
        if backend == "milvus":
            milvus = MilvusLite(base / "milvus" / "data").wait_ready()
            index = milvus.url("one")
        else:
            index = str(base / "index")
        seed_index(model, index, n_seed)
        s = ServerProcess({"CMC_MODEL": str(model), "CMC_INDEX": index, "CMC_API_TOKEN": token,
                           "CMC_WORKERS": str(workers), "CMC_THREADS": "1", "BENTOML_HOME": str(base / "bentoml"),
                           "CMC_HOME": str(base / "cmc")}, base / "server.log", cwd=base)
        s.wait_ready()
        if behind_nginx:
            nginx = Nginx(base / "nginx", [f"127.0.0.1:{s.port}"])
        yield {"url": nginx.url if nginx else s.url, "servers": [s]} | ({"nginx": nginx} if nginx else {})
    finally:
        if nginx is not None:
            nginx.stop()
        if s is not None:
            s.stop()
        if milvus is not None:
            milvus.stop()


def locust(url: str, out: Path, token: str, users: int, spawn_rate: float, run_time: str) -> tuple[int, str]:
    """loadtests/run.py --url: the model-aware mix (adds included), its table and exit code."""
    env = os.environ.copy() | {"CMC_API_TOKEN": token, "BENTOML_DO_NOT_TRACK": "true"}
    r = subprocess.run([sys.executable, str(ROOT / "loadtests" / "run.py"), "--url", url, "--users", str(users),
                        "--spawn-rate", str(spawn_rate), "--run-time", run_time, "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    return r.returncode, r.stdout + (r.stderr if r.returncode else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python loadtests/replicas.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("CMC_MODEL"),
                   help="an exported model (artifact directory, run directory or tag; default CMC_MODEL)")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--spawn-rate", type=float, default=4)
    p.add_argument("--run-time", default="30s")
    p.add_argument("--seed-items", type=int, default=64, help="items in each index before the load")
    p.add_argument("--workers", type=int, default=1,
                   help="workers per Milvus replica; the FAISS replica gets twice as many (the same total)")
    p.add_argument("--layouts", default="milvus-nginx,faiss-one",
                   help="comma-separated, run in this order: milvus-nginx (two Milvus replicas behind nginx), "
                        "faiss-one (one FAISS replica), faiss-nginx (one FAISS replica behind nginx), milvus-one "
                        "(one Milvus replica): the last two split the difference into nginx's and Milvus's shares")
    p.add_argument("--faiss-first", action="store_true", help="run the FAISS layouts first (to see order effects)")
    p.add_argument("--out", default="loadtest_out/replicas")
    a = p.parse_args(argv)
    if not a.model:
        p.error("--model (or CMC_MODEL) is required")
    from models.artifact import locate
    model = locate(a.model, want="artifact")
    if nginx_exe() is None or milvus_lite_exe() is None:
        print("error: needs nginx (apt-get install -y nginx) and milvus-lite (pip install -e '.[milvus]')",
              file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    token = os.environ.get("CMC_API_TOKEN") or TOKEN_DEFAULT
    results = {}
    layouts = {  # name: (title, workers per replica, start)
        "milvus-nginx": ("two Milvus replicas behind nginx", a.workers,
                         lambda d: replicas_behind_nginx(model, d, token, a.seed_items, a.workers)),
        "faiss-one": ("one replica, FAISS backend", 2 * a.workers,
                      lambda d: one_replica(model, d, token, a.seed_items, 2 * a.workers)),
        "faiss-nginx": ("one replica, FAISS backend, behind nginx", 2 * a.workers,
                        lambda d: one_replica(model, d, token, a.seed_items, 2 * a.workers, behind_nginx=True)),
        "milvus-one": ("one replica, Milvus backend", 2 * a.workers,
                       lambda d: one_replica(model, d, token, a.seed_items, 2 * a.workers, backend="milvus")),
    }
    names = [n.strip() for n in a.layouts.split(",") if n.strip()]
    if a.faiss_first:
        names = sorted(names, key=lambda n: not n.startswith("faiss"))
    unknown = [n for n in names if n not in layouts]
    if unknown:
        p.error(f"unknown layout(s) {unknown}; choose from {list(layouts)}")
    with tempfile.TemporaryDirectory(prefix="cmc-replicas-") as tmp:
        for name in names:
            title, workers, start = layouts[name]
            with start(Path(tmp) / name) as lay:
                rc, text = locust(lay["url"], out / name, token, a.users, a.spawn_rate, a.run_time)
                spread = lay["nginx"].upstream_counts() if "nginx" in lay else None
            results[name] = rc
            print(f"== {title} [{name}] ({a.users} users, {a.run_time}, {len(lay['servers'])} replica(s) x "
                  f"{workers} worker(s)) ==")
            print(text.rstrip())
            if spread:
                print("requests per replica (nginx access log): " + ", ".join(f"{k} {v}" for k, v in spread.items()))
            print()
    return 0 if all(rc == 0 for rc in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
