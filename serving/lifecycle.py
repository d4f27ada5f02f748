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
_started = False


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


def die_with_parent(poll_s: float = 0.5, grace_s: float = 10.0) -> None:
    """Make this process exit when its parent dies (idempotent; a no-op for a process whose parent is init)."""
    global _started
    if _started:
        return
    ppid = os.getppid()
    if ppid == 1:
        return  # started by init (a container's PID 1 runs us directly): nothing to follow
    _started = True
    pdeath = _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != ppid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=_watch, args=(ppid, poll_s, grace_s), name="parent-watchdog", daemon=True).start()
    LOG.info("worker %d follows parent %d (PR_SET_PDEATHSIG %s)", os.getpid(), ppid, "on" if pdeath else "off")
