"""Everything the CMC service does, without BentoML specifics and without torch.

:class:`Core` holds the ONNX runtime (``models.runtime``) and the index store (``index.store``) and answers the
endpoints: decoding and validating inputs, cosine/critic/rank math, search/add/remove. Settings live in
:mod:`serving.settings`, the error envelope in :mod:`serving.errors`, input limits in :mod:`serving.limits`.
The service file only delegates here.

Image decoding runs on a bounded pool (CMC_DECODE_THREADS, default CPUs / workers), never on the default
40-thread pool, and decodes at most :func:`serving.limits.decode_pixels` pixels per image.

Adaptive batching: with CMC_BATCHING on (the default), embeddings go through a per-view in-process micro-batcher
(:mod:`serving.batcher`), else straight to onnxruntime, one call at a time.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
from concurrent.futures import ThreadPoolExecutor
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import anyio
import numpy as np

from index import manifest as index_manifest
from models.artifact import default_index_dir
from models.card import CardError
from models.runtime import InputError, Runtime
from models.views import source_key

from .batcher import MicroBatcher, Overloaded
from .errors import ApiError, respond, to_api_error  # noqa: F401 - re-exported (the service imports respond here)
from .routes import budgets
from .limits import check_key, check_keys, check_metadata, decode_pixels, trim_hits
from .settings import Settings, cpu_count, env_flag, env_int  # noqa: F401 - re-exported

LOG = logging.getLogger(__name__)
T = TypeVar("T")


def b64decode(s: Any, field: str) -> bytes:
    if not isinstance(s, str):
        raise ApiError("invalid_input", f"{field} must be a base64 string, got {type(s).__name__}", field)
    if s.startswith("data:") and "," in s[:200]:
        s = s.split(",", 1)[1]
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError("invalid_input", f"{field} is not valid base64: {e}", field) from None


def current_core() -> "Core":
    """The running BentoML service's Core (503 while the service is still starting)."""
    import bentoml
    try:
        return bentoml.get_current_service().core
    except Exception:  # noqa: BLE001 - not instantiated yet
        raise ApiError("unavailable", "the service is still starting", None) from None


def _relabel(e: InputError, field: str) -> ApiError:
    return ApiError("invalid_input", str(e), field)


class Core:
    def __init__(self, rt: Runtime, store: Any = None, settings: Settings | None = None,
                 index_note: str = "no index configured"):
        self.rt = rt
        self.store = store
        self.settings = settings or Settings()
        self.index_note = index_note
        self.tau = float(rt.card.tau)
        self.max_pixels = decode_pixels(self.settings.max_pixels, rt.image_size)
        self.budgets = budgets(self.settings, rt.views)  # per-route body bounds (serving/routes.py)
        self._limiter: anyio.CapacityLimiter | None = None
        self._decoders = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="cmc-decode")
        self.batcher = MicroBatcher(rt.embed, self.settings.max_batch_size, self.settings.max_latency_ms) \
            if self.settings.batching else None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, settings: Settings | None = None) -> "Core":
        s = settings or Settings()
        try:
            rt = Runtime(s.model, device=s.device, intra_op_threads=s.threads, spin=s.spin)
        except CardError as e:
            raise RuntimeError(f"cannot load the model ({s.model or 'cmc:latest'}): {e}") from None
        rt.warmup()
        store, note = cls.open_index(s.index, rt.fingerprint)
        core = cls(rt, store, s, note)
        LOG.info("CMC core ready: model %s, %s, %d intra-op threads", rt.path, note, s.threads)
        return core

    @staticmethod
    def open_index(ref: str | None, fingerprint: str) -> tuple[Any, str]:
        """CMC_INDEX (a directory; '' or 'none' for none) or else the model's default index if it exists.

        Every worker opens the index for writing: SQLite arbitrates the writers and each worker follows the
        others' committed writes (see index/store.py), so all workers serve every endpoint."""
        from index.store import IndexStore, StoreError
        if ref is not None and ref.strip().lower() in ("", "none", "off"):
            return None, "index disabled (CMC_INDEX=none)"
        path = Path(ref).expanduser() if ref else default_index_dir(fingerprint)
        if not ref and not index_manifest.exists(path):
            return None, f"no index: CMC_INDEX is unset and the model's default index {path} does not exist"
        try:
            return IndexStore.open(path, fingerprint=fingerprint, follow=True), f"index {path}"
        except StoreError as e:
            raise RuntimeError(f"cannot open the index {path}: {e}") from None

    def close(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - shutting down: every acknowledged write is in the log already
                LOG.exception("closing the index failed")
        self._decoders.shutdown(wait=False)

    # ------------------------------------------------------------------ embedding
    async def _decode(self, fn: Callable[[], T]) -> T:
        """Run a decode/preprocess function on the bounded decode pool."""
        return await asyncio.get_running_loop().run_in_executor(self._decoders, fn)

    @staticmethod
    def _finite(z: np.ndarray, field: str) -> np.ndarray:
        """(N, D) embeddings -> the same, or a 400 naming the first input whose embedding is not finite."""
        ok = np.isfinite(z).all(axis=1)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ApiError("invalid_input", f"{field}[{i}] gives a non-finite embedding (NaN or inf): its values are "
                                            "too large for the model", f"{field}[{i}]")
        return z

    async def _embed(self, view: str, x: np.ndarray) -> np.ndarray:
        if self.batcher is not None:
            try:
                return await self.batcher(view, x)
            except Overloaded as e:
                raise ApiError("unavailable", f"server overloaded: {e}", None) from None
        return await self._direct(view, x)

    async def _direct(self, view: str, x: np.ndarray) -> np.ndarray:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(self.rt.embed, view, x, limiter=self._limiter)

    def _check_count(self, items: Any, field: str, limit: int | None = None) -> list:
        limit = limit or self.settings.max_items
        if not isinstance(items, list):
            raise ApiError("invalid_input", f"{field} must be a list", field)
        if len(items) == 0:
            raise ApiError("invalid_input", f"{field} is an empty list", field)
        if len(items) > limit:
            raise ApiError("too_large", f"{field} has {len(items)} entries; the limit is {limit} (CMC_MAX_ITEMS)",
                           field)
        return items

    def view_spec(self, name: Any, field: str = "view") -> dict:
        """A view of the served model by name (a 400 naming ``field`` when the model has no such view)."""
        if not isinstance(name, str):
            raise ApiError("invalid_input", f"{field} must be a string", field)
        try:
            return self.rt.view(name)
        except InputError as e:
            raise _relabel(e, field) from None

    def prepare(self, view: str, images: list | None = None, arrays: list | None = None,
                field: str = "", decoded: list | None = None) -> np.ndarray:
        """Validated inputs of one view -> its preprocessed float32 batch (raises ApiError naming the field);
        ``decoded`` receives the decoded inputs (``models.runtime.to_source``)."""
        v = self.view_spec(view, f"{field}view")
        is_vec = v["source"] == "vector"
        if images is not None and arrays is not None:
            raise ApiError("invalid_input", "give either images or arrays, not both", f"{field}images")
        if is_vec:
            if images is not None:
                raise ApiError("invalid_input", f"view {view!r} is a vector view: send arrays, not images",
                               f"{field}images")
            if arrays is None:
                raise ApiError("invalid_input", f"view {view!r} takes arrays", f"{field}arrays")
            self._check_count(arrays, f"{field}arrays")
            items: list = arrays
            fname = f"{field}arrays"
        else:
            if arrays is not None:
                raise ApiError("invalid_input", f"view {view!r} takes {v['source']} images (base64), not arrays",
                               f"{field}arrays")
            if images is None:
                raise ApiError("invalid_input", f"view {view!r} takes images (base64)", f"{field}images")
            self._check_count(images, f"{field}images")
            items = [it if isinstance(it, (bytes, bytearray)) else b64decode(it, f"{field}images[{i}]")
                     for i, it in enumerate(images)]
            fname = f"{field}images"
        try:
            return self.rt.preprocess(view, items, self.max_pixels, decoded)
        except InputError as e:
            raise _relabel(e, fname) from None

    async def embed_batch(self, view: str, images: list | None = None, arrays: list | None = None,
                          field: str = "") -> np.ndarray:
        x = await self._decode(lambda: self.prepare(view, images, arrays, field))
        return self._finite(await self._embed(view, x), f"{field}{'arrays' if arrays is not None else 'images'}")

    async def embed_inputs(self, inputs: list, field: str) -> tuple[np.ndarray, list[str]]:
        """``[{"view", "image"|"array"}]`` (dicts or schemas.Input) of mixed views -> (N, D), views."""
        groups: dict[str, tuple[list[int], list, list]] = {}
        views = []
        for i, inp in enumerate(inputs):
            d = inp.model_dump() if hasattr(inp, "model_dump") else inp
            f = f"{field}[{i}]" if field.endswith("candidates") else field
            if not isinstance(d, dict) or "view" not in d:
                raise ApiError("invalid_input", f"{f} must be an object with a view and an image or an array", f)
            view, image, array = d.get("view"), d.get("image"), d.get("array")
            self.view_spec(view, f"{f}.view")
            if (image is None) == (array is None):
                raise ApiError("invalid_input", f"{f} needs exactly one of image or array", f)
            idx, ims, arrs = groups.setdefault(view, ([], [], []))
            idx.append(i)
            (ims if image is not None else arrs).append(image if image is not None else array)
            views.append(view)
        out = np.empty((len(inputs), self.rt.dim), np.float32)

        async def one(view: str, idx: list[int], ims: list, arrs: list) -> None:
            if ims and arrs:
                raise ApiError("invalid_input", f"inputs of view {view!r} mix images and arrays", field)
            out[idx] = await self.embed_batch(view, ims or None, arrs or None, field=f"{field}.")

        await asyncio.gather(*(one(v, *g) for v, g in groups.items()))
        return out, views

    # ------------------------------------------------------------------ endpoints
    async def embed(self, view: str, images: list | None = None, arrays: list | None = None) -> dict:
        z = await self.embed_batch(view, images, arrays)
        return {"view": view, "dim": int(z.shape[1]), "embeddings": z.tolist()}

    async def embed_file(self, view: str, path: str | os.PathLike) -> dict:
        self.view_spec(view)
        data = await self._decode(Path(path).read_bytes)
        z = await self.embed_batch(view, [data])
        return {"view": view, "dim": int(z.shape[1]), "embeddings": z.tolist()}

    def critic(self, cos: np.ndarray) -> np.ndarray:
        return np.exp(np.asarray(cos, np.float64) / self.tau)

    async def similarity(self, a: Any = None, b: Any = None, query: Any = None,
                         candidates: list | None = None) -> dict:
        pair, rank = a is not None or b is not None, query is not None or candidates is not None
        if pair == rank:
            raise ApiError("invalid_input", "give either a and b (pair form) or query and candidates (rank form)",
                           "a" if not pair else "query")
        if pair:
            if a is None or b is None:
                raise ApiError("invalid_input", "the pair form needs both a and b", "b" if a is not None else "a")
            (za, _), (zb, _) = await asyncio.gather(self.embed_inputs([a], "a"), self.embed_inputs([b], "b"))
            cos = float(np.dot(za[0], zb[0]))
            return {"cosine": cos, "critic": float(self.critic(cos)), "tau": self.tau}
        if query is None:
            raise ApiError("invalid_input", "the rank form needs a query", "query")
        self._check_count(candidates, "candidates")
        (zq, qv), (zc, cv) = await asyncio.gather(self.embed_inputs([query], "query"),
                                                  self.embed_inputs(candidates, "candidates"))
        scores = zc @ zq[0]
        order = np.argsort(-scores, kind="stable")
        crit = self.critic(scores)
        return {"query_view": qv[0], "tau": self.tau,
                "ranking": [{"index": int(i), "view": cv[i], "score": float(scores[i]), "critic": float(crit[i])}
                            for i in order]}

    def need_store(self) -> Any:
        if self.store is None:
            raise ApiError("no_index", f"this server has no index ({self.index_note}); set CMC_INDEX to an index "
                                       f"directory or build the default one with `python -m train.pretrain`", None)
        return self.store

    async def search(self, query: Any, target_view: str | None = None, k: int = 10,
                     include_metadata: bool = True) -> dict:
        store = self.need_store()
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0 or k > self.settings.max_k:
            raise ApiError("invalid_input", f"k must be an integer in 1..{self.settings.max_k} (CMC_MAX_K), got {k!r}",
                           "k")
        zq, qv = await self.embed_inputs([query], "query")
        target = target_view or qv[0]
        if target not in store.views:
            raise ApiError("invalid_input", f"target_view {target!r} is not indexed; the index has views "
                                            f"{sorted(store.views)}", "target_view")
        hits = await anyio.to_thread.run_sync(lambda: store.search_items(zq, target, k))
        return {"query_view": qv[0], "target_view": target, "k": k,
                "results": trim_hits(hits[0], bool(include_metadata))}

    async def index_add(self, items: list) -> dict:
        store = self.need_store()
        items = [it.model_dump() if hasattr(it, "model_dump") else it for it in self._check_count(items, "items")]
        indexed = {v: source_key(v, self.rt.views[v])
                   for v in store.views if v in self.rt.views}
        sources = set(indexed.values())
        keys: list[str] = []
        metas: list[dict] = []
        given: set | None = None
        first: dict[str, int] = {}
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise ApiError("invalid_input", f"items[{i}] must be an object", f"items[{i}]")
            key = check_key(it.get("key"), f"items[{i}].key")
            if key in first:
                raise ApiError("invalid_input", f"duplicate key {key!r} at items[{first[key]}] and items[{i}]",
                               f"items[{i}].key")
            first[key] = i
            inputs = it.get("inputs") or {}
            if not isinstance(inputs, dict) or not inputs:
                raise ApiError("invalid_input", f"items[{i}] has no inputs", f"items[{i}].inputs")
            unknown = sorted(set(inputs) - sources)
            if unknown:
                raise ApiError("invalid_input", f"items[{i}].inputs has {unknown}; the indexed views take "
                                                f"{sorted(sources)}", f"items[{i}].inputs.{unknown[0]}")
            if given is None:
                given = set(inputs)
            elif set(inputs) != given:
                raise ApiError("invalid_input", "all items of one request must give the same inputs",
                               f"items[{i}].inputs")
            keys.append(key)
            metas.append(check_metadata(it.get("metadata"), f"items[{i}].metadata",
                                        self.settings.max_metadata_bytes)[0])
        by_source: dict[str, list[str]] = {}
        for v, src in indexed.items():
            if src in (given or ()):
                by_source.setdefault(src, []).append(v)

        decoded: dict[str, list] = {src: [] for src in by_source}  # each source as decoded, for the thumbnails

        async def one(src: str, views: list[str]) -> list[tuple[str, np.ndarray]]:
            """Decode a source once for all its views (L and ab read the same rgb image), then embed each view."""
            vals = [it["inputs"][src] for it in items]
            kind = "arrays" if self.rt.views[views[0]]["source"] == "vector" else "images"
            x = await self._decode(lambda: self.prepare(views[0], **{kind: vals}, field=f"items.inputs.{src}.",
                                                        decoded=decoded[src]))
            zs = await asyncio.gather(*(self._embed(v, x) for v in views))
            return [(v, self._finite(z, f"items.inputs.{src}")) for v, z in zip(views, zs)]

        parts = await asyncio.gather(*(one(src, vs) for src, vs in by_source.items()))
        vectors = dict(p for part in parts for p in part)
        ids = await anyio.to_thread.run_sync(lambda: store.add(keys, vectors, metas))
        from index.thumbs import add_items  # thumbnails for the web page, from the same decoded inputs
        await self._decode(lambda: add_items(store.path, keys, decoded, self.rt, ids))  # under the ids just added
        return {"added": len(keys), "ids": [int(i) for i in ids], "views": sorted(vectors)}

    async def index_remove(self, keys: list) -> dict:
        store = self.need_store()
        keys = check_keys(self._check_count(keys, "keys"), "keys")
        n = await anyio.to_thread.run_sync(lambda: store.remove(list(keys)))
        from index.thumbs import remove_items  # the web page's thumbnails go with their items
        await anyio.to_thread.run_sync(lambda: remove_items(store.path, list(keys)))
        return {"removed": int(n)}

    def batch_stats(self) -> dict:
        if self.batcher is None:
            return {"batches": 0, "rows": 0, "max_batch": 0, "mean_batch_size": 0.0}
        return self.batcher.snapshot()

    async def info(self) -> dict:
        rt = self.rt
        index: dict[str, Any] = {"available": self.store is not None, "note": self.index_note}
        if self.store is not None:
            index |= {"path": str(self.store.path), "views": dict(self.store.views),
                      "types": {v: type(self.store.index_of(v)).__name__ for v in self.store.views},
                      "counts": {v: int(self.store.count(v)) for v in self.store.views},
                      "readonly": bool(getattr(self.store, "readonly", False))}
        return {
            "card": rt.card.to_dict(),
            "fingerprint": rt.fingerprint,
            "dim": rt.dim,
            "image_size": rt.image_size,
            "tau": self.tau,
            "views": {n: {"source": v["source"], "channels": v.get("channels"), "input": v.get("input"),
                          "description": v.get("description")} for n, v in rt.views.items()},
            "providers": list(rt.providers),
            "server": {"pid": os.getpid(), "event_loop": type(asyncio.get_running_loop()).__module__,  # uvloop?
                       "http_parser": "httptools" if "uvicorn.protocols.http.httptools_impl" in sys.modules else "h11"},
            "index": index,
            "settings": self.settings.as_dict(),
            "batching": {"enabled": self.batcher is not None, "max_batch_size": self.settings.max_batch_size,
                         "max_latency_ms": self.settings.max_latency_ms} | self.batch_stats(),
        }

