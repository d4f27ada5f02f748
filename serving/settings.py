"""Server settings from the environment (read once, at import of the service and at start)."""
from __future__ import annotations

import functools
import os


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    try:
        return int(v) if v else default
    except ValueError:
        raise RuntimeError(f"environment variable {name}={v!r} is not an integer") from None


def env_flag(name: str, default: bool | None) -> bool | None:
    v = os.environ.get(name, "").strip().lower()
    if not v:
        return default
    return v not in ("0", "false", "no", "off")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class Settings:
    """Server settings from the environment (read once, at import of the service and at start)."""

    def __init__(self) -> None:
        # one worker per CPU (up to 4) with one onnxruntime thread each: measured on 2 cores (BENCHMARKS.md,
        # "Server"), 2 workers x 1 thread served 1.6x the items/s of 1 worker x 2 threads at 32 clients
        self.workers = max(1, env_int("CMC_WORKERS", min(cpu_count(), 4)))
        self.threads = env_int("CMC_THREADS", 0) or max(1, cpu_count() // self.workers)
        self.spin = env_flag("CMC_SPIN", None)  # onnxruntime intra-op spinning; unset: its default
        # image decoding runs on its own pool of this many threads (not the 40-thread default pool)
        self.decode_threads = max(1, env_int("CMC_DECODE_THREADS", 0) or max(1, cpu_count() // self.workers))
        self.batching = env_flag("CMC_BATCHING", True)
        self.max_batch_size = max(2, env_int("CMC_MAX_BATCH_SIZE", 64))
        self.max_latency_ms = max(1, env_int("CMC_MAX_LATENCY_MS", 3000))
        self.max_items = max(1, env_int("CMC_MAX_ITEMS", 64))
        # an upper cap; the decode limit is also sized to the model's input (serving.limits.decode_pixels)
        self.max_pixels = max(1, env_int("CMC_MAX_PIXELS", 16_000_000))
        self.max_k = max(1, env_int("CMC_MAX_K", 1000))
        self.max_body_mb = max(1, env_int("CMC_MAX_BODY_MB", 32))
        # one input image's encoded bytes (its base64 is 4/3 of that); the per-route body budgets derive from it
        self.max_image_bytes = max(1, env_int("CMC_MAX_IMAGE_MB", 8)) << 20
        # admission control per worker (serving/admission.py): requests and request-body bytes in flight
        self.max_concurrency = max(1, env_int("CMC_MAX_CONCURRENCY", 64))
        self.max_inflight_mb = max(1, env_int("CMC_MAX_INFLIGHT_MB", 64))
        self.max_metadata_bytes = max(2, env_int("CMC_MAX_METADATA_BYTES", 16 << 10))
        self.timeout_s = max(1, env_int("CMC_TIMEOUT_S", 60))
        self.device = os.environ.get("CMC_DEVICE", "auto")
        self.model = os.environ.get("CMC_MODEL") or None
        self.index = os.environ.get("CMC_INDEX")
        # MiB for all views of a FAISS index together, when the server re-chooses a view that outgrew its type or
        # its budget (index.factory.retype_due); unset: the budget the index was built with (its manifest)
        self.index_memory_mb = env_int("CMC_INDEX_MEMORY_MB", 0) or None
        if self.index_memory_mb is not None and self.index_memory_mb < 1:
            raise RuntimeError(f"environment variable CMC_INDEX_MEMORY_MB={self.index_memory_mb} must be a positive "
                               "number of MiB")
        self.token = os.environ.get("CMC_API_TOKEN") or None
        # speed switches, handed to serving/fastjson.py and serving/observability.py by the service
        self.fast_json = env_flag("CMC_FAST_JSON", True)
        self.access_log = env_flag("CMC_ACCESS_LOG", False)
        self.trace_hot = env_flag("CMC_TRACE_HOT", False)

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "token"} | {"auth": self.token is not None}


@functools.cache
def from_env() -> Settings:
    """The server's settings, read from the environment once per process (the service and its schemas)."""
    return Settings()
