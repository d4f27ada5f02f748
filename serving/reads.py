"""The read answers of the server: embeddings (/embed, /embed_file), cross-view similarity (/similarity) and
cross-view search (/search), over :class:`serving.inputs.Inputs` and an index store."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from .errors import ApiError
from .inputs import Inputs
from .limits import trim_hits


async def embed(inputs: Inputs, view: str, images: list | None = None, arrays: list | None = None) -> dict:
    z = await inputs.embed_batch(view, images, arrays)
    return {"view": view, "dim": int(z.shape[1]), "embeddings": z.tolist()}


async def embed_file(inputs: Inputs, view: str, path: str | os.PathLike) -> dict:
    inputs.view_spec(view)
    data = await inputs.decode(Path(path).read_bytes)
    z = await inputs.embed_batch(view, [data])
    return {"view": view, "dim": int(z.shape[1]), "embeddings": z.tolist()}


def critic(cos: Any, tau: float) -> np.ndarray:
    """The CMC critic exp(cos / tau)."""
    return np.exp(np.asarray(cos, np.float64) / tau)


async def similarity(inputs: Inputs, tau: float, a: Any = None, b: Any = None, query: Any = None,
                     candidates: list | None = None) -> dict:
    pair, rank = a is not None or b is not None, query is not None or candidates is not None
    if pair == rank:
        raise ApiError("invalid_input", "give either a and b (pair form) or query and candidates (rank form)",
                       "a" if not pair else "query")
    if pair:
        if a is None or b is None:
            raise ApiError("invalid_input", "the pair form needs both a and b", "b" if a is not None else "a")
        (za, _), (zb, _) = await asyncio.gather(inputs.embed_inputs([a], "a"), inputs.embed_inputs([b], "b"))
        cos = float(np.dot(za[0], zb[0]))
        return {"cosine": cos, "critic": float(critic(cos, tau)), "tau": tau}
    if query is None:
        raise ApiError("invalid_input", "the rank form needs a query", "query")
    inputs.check_count(candidates, "candidates")
    (zq, qv), (zc, cv) = await asyncio.gather(inputs.embed_inputs([query], "query"),
                                              inputs.embed_inputs(candidates, "candidates"))
    scores = zc @ zq[0]
    order = np.argsort(-scores, kind="stable")
    crit = critic(scores, tau)
    return {"query_view": qv[0], "tau": tau,
            "ranking": [{"index": int(i), "view": cv[i], "score": float(scores[i]), "critic": float(crit[i])}
                        for i in order]}


def _check_k(inputs: Inputs, k: Any) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0 or k > inputs.settings.max_k:
        raise ApiError("invalid_input", f"k must be an integer in 1..{inputs.settings.max_k} (CMC_MAX_K), got {k!r}",
                       "k")


async def search(inputs: Inputs, store: Any, query: Any, target_view: str | None = None, k: int = 10,
                 include_metadata: bool = True) -> dict:
    _check_k(inputs, k)
    zq, qv = await inputs.embed_inputs([query], "query")
    return await search_embedding(inputs, store, zq, qv[0], target_view, k, include_metadata)


async def search_embedding(inputs: Inputs, store: Any, zq: np.ndarray, view: str, target_view: str | None = None,
                           k: int = 10, include_metadata: bool = True) -> dict:
    """/search with a query already embedded in ``view`` (``zq``: (1, D) float32), e.g. a stored item's
    indexed vector (/search_by_key)."""
    _check_k(inputs, k)
    target = target_view or view
    if target not in store.views:
        raise ApiError("invalid_input", f"target_view {target!r} is not indexed; the index has views "
                                        f"{sorted(store.views)}", "target_view")
    zq = np.ascontiguousarray(np.asarray(zq, np.float32).reshape(1, -1))
    hits = await anyio.to_thread.run_sync(lambda: store.search_items(zq, target, k))
    return {"query_view": view, "target_view": target, "k": k,
            "results": trim_hits(hits[0], bool(include_metadata))}

