"""The served model and index behind every endpoint, without BentoML specifics and without torch.

:class:`Core` holds the ONNX runtime (``models.runtime``), the index store (``index.store``) and the request
inputs' pipeline (:class:`serving.inputs.Inputs`: decode pool, micro-batcher, checks), and answers each endpoint
in one line through :mod:`serving.reads` (embed, similarity, search) and :mod:`serving.writes` (index add and
remove). Settings live in :mod:`serving.settings`, the error envelope in :mod:`serving.errors`, input limits in
:mod:`serving.limits`, the route table in :mod:`serving.routes`. The service file only delegates here.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from index import manifest as index_manifest
from models.artifact import default_index_dir
from models.card import CardError
from models.runtime import DeviceError, Runtime

from . import reads, writes
from .errors import ApiError, respond, to_api_error  # noqa: F401 - re-exported (the service imports respond here)
from .inputs import Inputs
from .routes import budgets
from .settings import Settings, cpu_count  # noqa: F401 - re-exported (tests, serving.measure.bench)

LOG = logging.getLogger(__name__)


def current_core() -> "Core":
    """The running BentoML service's Core (503 while the service is still starting)."""
    import bentoml
    try:
        return bentoml.get_current_service().core
    except Exception:  # noqa: BLE001 - not instantiated yet
        raise ApiError("unavailable", "the service is still starting", None) from None


class Core:
    def __init__(self, rt: Runtime, store: Any = None, settings: Settings | None = None,
                 index_note: str = "no index configured"):
        self.rt = rt
        self.store = store
        self.settings = settings or Settings()
        self.index_note = index_note
        self.tau = float(rt.card.tau)
        self.budgets = budgets(self.settings, rt.views)  # per-route body bounds (serving/routes.py)
        self.inputs = Inputs(rt, self.settings)  # decode pool, micro-batcher, input checks
        self.max_pixels, self.batcher = self.inputs.max_pixels, self.inputs.batcher
        self._decoders = self.inputs._decoders

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, settings: Settings | None = None) -> "Core":
        s = settings or Settings()
        try:
            rt = Runtime(s.model, device=s.device, intra_op_threads=s.threads, spin=s.spin)
        except CardError as e:
            raise RuntimeError(f"cannot load the model ({s.model or 'cmc:latest'}): {e}") from None
        except DeviceError as e:  # CMC_DEVICE=cuda without a usable CUDA provider: fail at start, not on the CPU
            raise RuntimeError(f"CMC_DEVICE={s.device}: {e}") from None
        # on CUDA every batch size the batcher can form (no per-shape stall on a first request); on CPU batch 1
        rt.warmup(s.max_batch_size if rt.providers[0] == "CUDAExecutionProvider" else None)
        store, note = cls.open_index(s.index, rt.fingerprint, s.index_memory_mb)
        core = cls(rt, store, s, note)
        LOG.info("CMC core ready: model %s, %s, %d intra-op threads", rt.path, note, s.threads)
        return core

    @staticmethod
    def open_index(ref: str | None, fingerprint: str, memory_budget_mb: int | None = None) -> tuple[Any, str]:
        """CMC_INDEX (a directory, or milvus://HOST:PORT[/DB]?collection=NAME; '' or 'none' for none) or else the
        model's default index if it exists. ``memory_budget_mb`` (CMC_INDEX_MEMORY_MB) bounds a FAISS index's
        views when they are re-chosen as they grow (``IndexStore.open``); Milvus sizes its own indexes.

        Every worker opens the index for writing: SQLite arbitrates the writers and each worker follows the
        others' committed writes (see index/store.py), so all workers serve every endpoint."""
        from index.store import IndexStore, StoreError
        if ref is not None and ref.strip().lower() in ("", "none", "off"):
            return None, "index disabled (CMC_INDEX=none)"
        if ref and ref.strip().lower().startswith("milvus://"):  # a Milvus collection (index/milvus.py)
            from index.milvus import MilvusStore
            try:
                return MilvusStore.open(ref.strip(), fingerprint=fingerprint), f"index {ref.strip()}"
            except StoreError as e:
                raise RuntimeError(f"cannot open the index {ref}: {e}") from None
        path = Path(ref).expanduser() if ref else default_index_dir(fingerprint)
        if not ref and not index_manifest.exists(path):
            return None, f"no index: CMC_INDEX is unset and the model's default index {path} does not exist"
        try:
            return (IndexStore.open(path, fingerprint=fingerprint, follow=True, memory_budget_mb=memory_budget_mb),
                    f"index {path}")
        except StoreError as e:
            raise RuntimeError(f"cannot open the index {path}: {e}") from None

    def close(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - shutting down: every acknowledged write is in the log already
                LOG.exception("closing the index failed")
        self.inputs.close()

    # ------------------------------------------------------------------ the endpoints (serving/reads.py, writes.py)
    def view_spec(self, name: Any, field: str = "view") -> dict:
        return self.inputs.view_spec(name, field)

    async def embed_batch(self, view: str, images: list | None = None, arrays: list | None = None,
                          field: str = "") -> np.ndarray:
        return await self.inputs.embed_batch(view, images, arrays, field)

    async def embed(self, view: str, images: list | None = None, arrays: list | None = None) -> dict:
        return await reads.embed(self.inputs, view, images, arrays)

    async def embed_file(self, view: str, path: str | os.PathLike) -> dict:
        return await reads.embed_file(self.inputs, view, path)

    async def similarity(self, a: Any = None, b: Any = None, query: Any = None,
                         candidates: list | None = None) -> dict:
        return await reads.similarity(self.inputs, self.tau, a, b, query, candidates)

    def need_store(self) -> Any:
        if self.store is None:
            raise ApiError("no_index", f"this server has no index ({self.index_note}); set CMC_INDEX to an index "
                                       f"directory or build the default one with `python -m train.pretrain`", None)
        return self.store

    async def search(self, query: Any, target_view: str | None = None, k: int = 10,
                     include_metadata: bool = True) -> dict:
        return await reads.search(self.inputs, self.need_store(), query, target_view, k, include_metadata)

    async def index_add(self, items: list) -> dict:
        return await writes.index_add(self.inputs, self.need_store(), items)

    async def index_remove(self, keys: list) -> dict:
        return await writes.index_remove(self.inputs, self.need_store(), keys)

    def batch_stats(self) -> dict:
        if self.batcher is None:
            return {"batches": 0, "rows": 0, "max_batch": 0, "mean_batch_size": 0.0}
        return self.batcher.snapshot()

    async def info(self) -> dict:
        rt = self.rt
        index: dict[str, Any] = {"available": self.store is not None, "note": self.index_note}
        if self.store is not None:
            index |= {"path": str(self.store.path), "views": dict(self.store.views),
                      "types": self.store.index_types(),
                      "counts": {v: int(self.store.count(v)) for v in self.store.views},
                      "readonly": bool(getattr(self.store, "readonly", False))}
            from index.store import IndexStore
            if isinstance(self.store, IndexStore):  # the FAISS backend: how each view's index type was chosen
                index["choice"] = {v: s.get("choice") for v, s in self.store.manifest["views"].items()}
                index["memory_budget_mb_per_view"] = round(self.store.view_budget_mb(), 3)  # for re-choosing views
        return {
            "card": rt.card.to_dict(),
            "fingerprint": rt.fingerprint,
            "dim": rt.dim,
            "image_size": rt.image_size,
            "tau": self.tau,
            "views": {n: {"source": v["source"], "channels": v.get("channels"), "input": v.get("input"),
                          "description": v.get("description")} for n, v in rt.views.items()},
            "providers": list(rt.providers),  # what the sessions got (session.get_providers()), not what was asked
            "worker_pid": os.getpid(),  # which worker answered (one process of `bentoml serve`)
            "server": {"event_loop": type(asyncio.get_running_loop()).__module__,  # uvloop when installed
                       "http_parser": "httptools" if "uvicorn.protocols.http.httptools_impl" in sys.modules else "h11"},
            "index": index,
            "settings": self.settings.as_dict(),
            "batching": {"enabled": self.batcher is not None, "max_batch_size": self.settings.max_batch_size,
                         "max_latency_ms": self.settings.max_latency_ms} | self.batch_stats(),
        }

