"""serving.batcher.MicroBatcher without a model: no waiting at low load, greedy batches under load, errors shared.
(Coalescing with the real runtime and the overload answer: tests/test_serving_core.py.)"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batcher import MicroBatcher


class TimerFreeLoop(asyncio.SelectorEventLoop):
    """An event loop that records every timer (call_at/call_later): a batcher that waited for more requests
    to arrive would have to set one."""

    def __init__(self) -> None:
        super().__init__()
        self.timers: list[float] = []

    def call_at(self, when, callback, *args, context=None):  # noqa: ANN001
        self.timers.append(when - self.time())
        return super().call_at(when, callback, *args, context=context)


def run_on(loop: asyncio.AbstractEventLoop, coro):
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def echo(calls: list):
    def fn(view: str, x: np.ndarray) -> np.ndarray:
        calls.append((view, len(x), time.perf_counter()))
        return x * 2
    return fn


def test_concurrency_one_runs_immediately_without_timers():
    """Sequential requests: each is its own batch, started at once (no timer, no collection window)."""
    calls: list = []
    b = MicroBatcher(echo(calls), max_batch=64, max_latency_ms=3000)
    loop = TimerFreeLoop()
    delays = []

    async def go() -> None:
        for i in range(30):
            x = np.full((1, 4), i, np.float32)
            t = time.perf_counter()
            z = await b("L", x)
            delays.append(calls[-1][2] - t)  # submit -> model call start
            np.testing.assert_array_equal(z, 2 * x)

    run_on(loop, go())
    assert loop.timers == [], f"the batcher set timers {loop.timers}"
    assert [c[1] for c in calls] == [1] * 30
    assert b.snapshot() == {"batches": 30, "rows": 30, "max_batch": 1, "mean_batch_size": 1.0}
    # the start is a thread hand-off, not a wait: a collection window of even 5 ms would show in the median
    assert float(np.median(delays)) < 0.005, delays


def test_greedy_batches_under_load_and_big_requests_alone():
    """While one batch runs, arrivals queue; the next batch takes them all up to max_batch, in order."""
    gate = threading.Event()
    calls: list = []

    def fn(view: str, x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        if len(calls) == 1:
            gate.wait(10)  # hold the first batch until the rest have queued
        return x + 1

    b = MicroBatcher(fn, max_batch=8, max_latency_ms=60_000)

    async def go() -> list:
        first = asyncio.ensure_future(b("L", np.zeros((1, 2), np.float32)))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b("L", np.full((n, 2), n, np.float32))) for n in (3, 4, 2, 20, 1)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *rest)

    out = asyncio.run(go())
    # batches: [1], then 3+4 (=7; +2 would pass 8), then 2 (20 does not fit), then 20 alone, then 1
    assert calls == [1, 7, 2, 20, 1], calls
    for z, n in zip(out[1:], (3, 4, 2, 20, 1)):
        np.testing.assert_array_equal(z, np.full((n, 2), n + 1, np.float32))


def test_an_error_reaches_every_request_of_its_batch_only():
    gate = threading.Event()
    calls: list = []

    def fn(view: str, x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        if len(calls) == 1:
            gate.wait(10)
            return x
        if len(calls) == 2:
            raise ValueError("model failed")
        return x

    b = MicroBatcher(fn, max_batch=4, max_latency_ms=60_000)

    async def go() -> list:
        first = asyncio.ensure_future(b("L", np.zeros((1, 1), np.float32)))
        await asyncio.sleep(0.05)
        failing = [asyncio.ensure_future(b("L", np.zeros((2, 1), np.float32))) for _ in range(2)]
        await asyncio.sleep(0.05)
        gate.set()
        res = await asyncio.gather(first, *failing, return_exceptions=True)
        res.append(await b("L", np.ones((1, 1), np.float32)))  # the batcher keeps serving
        return res

    res = asyncio.run(go())
    assert isinstance(res[0], np.ndarray)
    assert all(isinstance(r, ValueError) for r in res[1:3])
    np.testing.assert_array_equal(res[3], np.ones((1, 1), np.float32))


@pytest.mark.parametrize("views", [("L",), ("L", "ab")])
def test_views_batch_separately(views):
    calls: list = []
    b = MicroBatcher(echo(calls), max_batch=64)

    async def go() -> list:
        return await asyncio.gather(*(b(v, np.full((1, 3), i, np.float32)) for i, v in enumerate(views * 4)))

    out = asyncio.run(go())
    assert {c[0] for c in calls} == set(views)
    for i, z in enumerate(out):
        np.testing.assert_array_equal(z, np.full((1, 3), 2 * i, np.float32))
