"""Worker process lifecycle: a server worker exits when the process that started it dies.

``bentoml serve`` starts its workers as child processes. When the main process is killed with SIGKILL, nothing
tells the workers, and an orphan would keep the port and keep serving a stale configuration. :func:`die_with_parent`
closes that gap twice over: on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` has the kernel send SIGTERM when the
parent goes away (strictly: when the parent *thread* that started us exits; BentoML's arbiter starts workers from
its main thread, so that is the process's death), and a daemon thread polls ``os.getppid()`` every ``poll_s``
(a change means the parent died; this also covers systems without prctl). On the parent's death
the worker first gets SIGTERM (a graceful shutdown: the index store is closed), then is ended with ``os._exit``
after ``grace_s`` if it is still alive. The index needs neither to be durable: every acknowledged write is in
SQLite.

The window before that is closed too (:func:`follow_serve_process`, the first statement of serving/service.py,
so the first code of ours that a worker runs): the ``bentoml serve`` process records its pid in the environment
(``CMC_SERVE_PID``) when it imports the service, before it starts any worker; a worker that finds its parent is
not that process any more (it died before the worker got here: the worker was re-parented) exits at once.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

LOG = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
SERVE_PID_ENV = "CMC_SERVE_PID"
_started = False


def is_worker() -> bool:
    """This process is a BentoML server worker (``python -m _bentoml_impl.worker.service``)."""
    arg0 = sys.argv[0] if sys.argv else ""
    return "_bentoml_impl" in arg0 and "worker" in arg0


def follow_serve_process() -> None:
    """In the ``bentoml serve`` process: record its pid for the workers it is about to start. In a worker:
    exit at once if that process is already gone, else follow it (:func:`die_with_parent`)."""
    if not is_worker():
        os.environ[SERVE_PID_ENV] = str(os.getpid())
        return
    pdeath = _set_pdeathsig(signal.SIGTERM)  # before anything else: from here on the kernel tells us
    expected = os.environ.get(SERVE_PID_ENV, "")
    if expected.isdigit() and os.getppid() != int(expected):
        LOG.warning("worker %d: `bentoml serve` (%s) is gone before start-up; exiting", os.getpid(), expected)
        os._exit(0)
    die_with_parent(pdeath=pdeath)


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        return False


def _watch(ppid: int, poll_s: float, grace_s: float) -> None:
    while os.getppid() == ppid:
        time.sleep(poll_s)
    LOG.warning("parent process %d is gone: worker %d shuts down", ppid, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    LOG.error("worker %d did not stop %.0f s after SIGTERM; exiting", os.getpid(), grace_s)
    os._exit(1)


def die_with_parent(poll_s: float = 0.5, grace_s: float = 10.0, pdeath: bool | None = None) -> None:
    """Make this process exit when its parent dies (idempotent; a no-op for a process whose parent is init).
    ``pdeath``: whether the parent-death signal is set already (None: set it here)."""
    global _started
    if _started:
        return
    ppid = os.getppid()
    if ppid == 1:
        return  # started by init (a container's PID 1 runs us directly): nothing to follow
    _started = True
    if pdeath is None:
        pdeath = _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != ppid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=_watch, args=(ppid, poll_s, grace_s), name="parent-watchdog", daemon=True).start()
    LOG.info("worker %d follows parent %d (PR_SET_PDEATHSIG %s)", os.getpid(), ppid, "on" if pdeath else "off")
