"""A local ``milvus-lite server`` process (the Milvus-protocol server of the ``[milvus]`` extra) for tests,
benchmarks (``index.bench --backend milvus``) and the replicas load test, with the two port helpers every
local process launcher here uses (``serving.measure.launch`` re-exports them for the ``bentoml serve`` one).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def milvus_lite_exe() -> str | None:
    return shutil.which("milvus-lite") or next(
        (str(p) for p in [Path(sys.executable).parent / "milvus-lite"] if p.exists()), None)


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} not listening on {port} after {timeout:.0f} s")


class MilvusLite:
    """``milvus-lite server`` on a free loopback port with its own data directory."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.port = port or free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir.parent / f"milvus-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([milvus_lite_exe(), "server", "--data-dir", str(data_dir), "--host",
                                      "127.0.0.1", "--port", str(self.port)], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def url(self, collection: str) -> str:
        return f"milvus://127.0.0.1:{self.port}?collection={collection}"

    def wait_ready(self, timeout: float = 60) -> "MilvusLite":
        from pymilvus import MilvusClient
        wait_port(self.port, self.proc, "milvus-lite", timeout)
        t0 = time.time()
        while True:
            try:
                c = MilvusClient(uri=f"http://127.0.0.1:{self.port}", timeout=5)
                c.list_collections()
                c.close()
                return self
            except Exception:  # noqa: BLE001 - not serving yet
                if time.time() - t0 > timeout:
                    raise
                time.sleep(0.3)

    def kill9(self) -> None:
        """SIGKILL the server (a crash: it must lose no acknowledged write)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
