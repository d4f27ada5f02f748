"""Adaptive batching inside the worker: concurrent requests of one view become one onnxruntime call.

Greedy, per view: while a batch runs on the model (in a thread), new requests queue; when it returns, the
next batch takes every queued row up to ``max_batch``. At concurrency 1 nothing waits (no timer, no
collection window: tests/test_batcher.py), so latency is that of a direct call; under load batches grow by
themselves. A request whose rows wait longer than ``max_latency_ms`` before their batch starts is answered
503 (overloaded), as BentoML's dispatcher does.

Why not BentoML's ``batchable`` API: it batches a method that takes exactly one list or array, so a JSON
endpoint with several fields must call that method through BentoML's client, crossing the framework a second
time per request; measured on the dev box that path served 3% of raw onnxruntime's throughput
(BENCHMARKS.md). This keeps one framework crossing per request and the same adaptive behaviour.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

LOG = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """A request waited past max_latency_ms before its batch started."""


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future
    t: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, fn: Callable[[str, np.ndarray], np.ndarray], max_batch: int = 64,
                 max_latency_ms: float = 3000.0):
        self.fn, self.max_batch, self.max_latency = fn, max_batch, max_latency_ms / 1000.0
        self._queues: dict[str, deque[_Pending]] = {}
        self._running: dict[str, bool] = {}
        self._lock = threading.Lock()
        self.stats = {"batches": 0, "rows": 0, "max_batch": 0}

    async def __call__(self, view: str, x: np.ndarray) -> np.ndarray:
        """Embed a preprocessed batch (n, ...) of one view; resolves once its rows have run."""
        loop = asyncio.get_running_loop()
        p = _Pending(x, loop.create_future())
        self._queues.setdefault(view, deque()).append(p)
        if not self._running.get(view):
            self._running[view] = True
            loop.create_task(self._drain(view))
        return await p.future

    async def _drain(self, view: str) -> None:
        q = self._queues[view]
        try:
            while q:
                batch, rows, now = [], 0, time.perf_counter()
                while q and (not batch or rows + len(q[0].x) <= self.max_batch):
                    p = q.popleft()
                    if now - p.t > self.max_latency:
                        if not p.future.done():
                            p.future.set_exception(Overloaded(
                                f"waited {1000 * (now - p.t):.0f} ms for a batch (max {1000 * self.max_latency:.0f} ms)"))
                        continue
                    batch.append(p)
                    rows += len(p.x)
                if not batch:
                    continue
                x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
                try:
                    z = await asyncio.to_thread(self.fn, view, x)  # (rows, D)
                except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(e)
                    continue
                with self._lock:
                    self.stats["batches"] += 1
                    self.stats["rows"] += rows
                    self.stats["max_batch"] = max(self.stats["max_batch"], rows)
                lo = 0
                for p in batch:
                    if not p.future.done():
                        p.future.set_result(z[lo:lo + len(p.x)])
                    lo += len(p.x)
        finally:
            self._running[view] = False

    def snapshot(self) -> dict:
        with self._lock:
            s = dict(self.stats)
        s["mean_batch_size"] = s["rows"] / s["batches"] if s["batches"] else 0.0
        return s
