"""The index writes of the server (/index/add, /index/remove): inputs checked and embedded in every indexed view,
one durable store write, then the web page's thumbnails from the same decoded inputs, under the new item ids."""
from __future__ import annotations

import asyncio
from typing import Any

import anyio
import numpy as np

from index import thumbs  # thumbs.add_items at call time (tests defer it to force interleavings)
from models.views import source_key

from .errors import ApiError
from .inputs import Inputs
from .limits import check_key, check_keys, check_metadata


async def index_add(inputs: Inputs, store: Any, items: list) -> dict:
    items = [it.model_dump() if hasattr(it, "model_dump") else it for it in inputs.check_count(items, "items")]
    indexed = {v: source_key(v, inputs.rt.views[v])
               for v in store.views if v in inputs.rt.views}
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
        given_now = it.get("inputs") or {}
        if not isinstance(given_now, dict) or not given_now:
            raise ApiError("invalid_input", f"items[{i}] has no inputs", f"items[{i}].inputs")
        unknown = sorted(set(given_now) - sources)
        if unknown:
            raise ApiError("invalid_input", f"items[{i}].inputs has {unknown}; the indexed views take "
                                            f"{sorted(sources)}", f"items[{i}].inputs.{unknown[0]}")
        if given is None:
            given = set(given_now)
        elif set(given_now) != given:
            raise ApiError("invalid_input", "all items of one request must give the same inputs",
                           f"items[{i}].inputs")
        keys.append(key)
        metas.append(check_metadata(it.get("metadata"), f"items[{i}].metadata",
                                    inputs.settings.max_metadata_bytes)[0])
    by_source: dict[str, list[str]] = {}
    for v, src in indexed.items():
        if src in (given or ()):
            by_source.setdefault(src, []).append(v)

    decoded: dict[str, list] = {src: [] for src in by_source}  # each source as decoded, for the thumbnails

    async def one(src: str, views: list[str]) -> list[tuple[str, np.ndarray]]:
        """Decode a source once for all its views (L and ab read the same rgb image), then embed each view."""
        vals = [it["inputs"][src] for it in items]
        kind = "arrays" if inputs.rt.views[views[0]]["source"] == "vector" else "images"
        x = await inputs.decode(lambda: inputs.prepare(views[0], **{kind: vals}, field=f"items.inputs.{src}.",
                                                    decoded=decoded[src]))
        zs = await asyncio.gather(*(inputs.embed(v, x) for v in views))
        return [(v, inputs.finite(z, f"items.inputs.{src}")) for v, z in zip(views, zs)]

    parts = await asyncio.gather(*(one(src, vs) for src, vs in by_source.items()))
    vectors = dict(p for part in parts for p in part)
    ids = await anyio.to_thread.run_sync(lambda: store.add(keys, vectors, metas))
    # the web page's thumbnails, from the same decoded inputs, and the vectors just indexed (for /search_by_key),
    # under the ids just added
    await inputs.decode(lambda: thumbs.add_items(store.path, keys, decoded, inputs.rt, ids, vectors))
    return {"added": len(keys), "ids": [int(i) for i in ids], "views": sorted(vectors)}


async def index_remove(inputs: Inputs, store: Any, keys: list) -> dict:
    keys = check_keys(inputs.check_count(keys, "keys"), "keys")
    n = await anyio.to_thread.run_sync(lambda: store.remove(list(keys)))
    await anyio.to_thread.run_sync(lambda: thumbs.remove_items(store.path, list(keys)))
    return {"removed": int(n)}

