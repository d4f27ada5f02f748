"""The inputs of a request, decoded, validated and embedded: one owner of the decode pool and the micro-batcher.

:class:`Inputs` turns base64 images, raw bytes or arrays of one view (or ``{"view", "image"|"array"}`` objects of
mixed views) into the served model's embeddings. Image decoding runs on a bounded pool (CMC_DECODE_THREADS,
default CPUs / workers), never on the default 40-thread pool; with CMC_BATCHING on (the default) embeddings go
through a per-view in-process micro-batcher (:mod:`serving.batcher`), else straight to onnxruntime, one call at a
time. Every problem is an :class:`serving.errors.ApiError` naming the field.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import anyio
import numpy as np

from models.runtime import InputError, Runtime

from .batcher import MicroBatcher, Overloaded
from .errors import ApiError
from .limits import decode_pixels
from .settings import Settings

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


def _relabel(e: InputError, field: str) -> ApiError:
    return ApiError("invalid_input", str(e), field)


class Inputs:
    def __init__(self, rt: Runtime, settings: Settings):
        self.rt, self.settings = rt, settings
        self.max_pixels = decode_pixels(settings.max_pixels, rt.image_size)
        self._limiter: anyio.CapacityLimiter | None = None
        self._decoders = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="cmc-decode")
        self.batcher = MicroBatcher(rt.embed, settings.max_batch_size, settings.max_latency_ms) \
            if settings.batching else None

    def close(self) -> None:
        self._decoders.shutdown(wait=False)

    async def decode(self, fn: Callable[[], T]) -> T:
        """Run a decode/preprocess function on the bounded decode pool."""
        return await asyncio.get_running_loop().run_in_executor(self._decoders, fn)

    @staticmethod
    def finite(z: np.ndarray, field: str) -> np.ndarray:
        """(N, D) embeddings -> the same, or a 400 naming the first input whose embedding is not finite."""
        ok = np.isfinite(z).all(axis=1)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ApiError("invalid_input", f"{field}[{i}] gives a non-finite embedding (NaN or inf): its values are "
                                            "too large for the model", f"{field}[{i}]")
        return z

    async def embed(self, view: str, x: np.ndarray) -> np.ndarray:
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

    def check_count(self, items: Any, field: str, limit: int | None = None) -> list:
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
        kind, other = ("arrays", "images") if is_vec else ("images", "arrays")
        given, wrong = (arrays, images) if is_vec else (images, arrays)
        if wrong is not None:
            why = "is a vector view: send arrays, not images" if is_vec else \
                f"takes {v['source']} images (base64), not arrays"
            raise ApiError("invalid_input", f"view {view!r} {why}", f"{field}{other}")
        if given is None:
            raise ApiError("invalid_input", f"view {view!r} takes {'arrays' if is_vec else 'images (base64)'}",
                           f"{field}{kind}")
        self.check_count(given, f"{field}{kind}")
        items: list = given if is_vec else [it if isinstance(it, (bytes, bytearray))
                                            else b64decode(it, f"{field}images[{i}]") for i, it in enumerate(given)]
        fname = f"{field}{kind}"
        try:
            return self.rt.preprocess(view, items, self.max_pixels, decoded)
        except InputError as e:
            raise _relabel(e, fname) from None

    async def embed_batch(self, view: str, images: list | None = None, arrays: list | None = None,
                          field: str = "") -> np.ndarray:
        x = await self.decode(lambda: self.prepare(view, images, arrays, field))
        return self.finite(await self.embed(view, x), f"{field}{'arrays' if arrays is not None else 'images'}")

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
