"""Real server processes on free loopback ports: `bentoml serve` (started, awaited on /readyz, stopped) and
`milvus-lite server` (``index/milvus_lite.py``, re-exported here: index/ must not import serving/).

One helper for everything that needs a live server: the server tests, `python -m serving.measure.bench` and
`loadtests/run.py`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from index.milvus_lite import MilvusLite, free_port, milvus_lite_exe, wait_port  # noqa: F401 - re-exported

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`bentoml serve serving.service:CMCService` from the project root; ``env`` overrides the environment;
    ``cwd``: the process's own working directory (as on another machine; the service is still imported from the
    project root through ``--working-dir``)."""

    def __init__(self, env: dict | None, log: str | Path, port: int | None = None, cwd: str | Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        e = os.environ.copy() | {"BENTOML_DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"} | (env or {})
        self._f = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serving.service:CMCService",
                                      "--port", str(self.port), "--host", "127.0.0.1", "--working-dir", str(ROOT)],
                                     cwd=cwd or ROOT, env=e, stdout=self._f, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        import httpx
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process below it (BentoML's workers do not stay in its
        process group, so the group's sum misses them); 0 once it is gone."""
        import psutil  # bentoml's dependency
        try:
            p = psutil.Process(self.proc.pid)
            return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
        except psutil.Error:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self._f.close()
