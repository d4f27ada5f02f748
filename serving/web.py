"""The web page of the CMC server and the few routes it needs beside the JSON API (a Starlette app mounted on
the BentoML service, so one ``bentoml serve`` process serves both).

Routes (declared with their access class in serving/routes.py; all but the page's own files need the token):

* ``GET /`` and ``GET /ui``: the page (serving/static/index.html); ``/ui/app.js``, ``/ui/app.css``: its code.
  Public: the page asks for the token itself and sends it as ``Authorization: Bearer``.
* ``GET /docs``: BentoML's own OpenAPI page (which ``/`` used to be).
* ``GET /thumb/{key}?view=V`` (or ``?kind=rgb|depth|normals``): an item's thumbnail (WebP/PNG, <= 96 px).
* ``POST /thumbs {"keys": [...], "view": V}``: ``{"thumbs": {key: data URI or null}}``, one request per result grid.
* ``GET /gallery/random``: ``{"key", "metadata", "thumb"}`` of a random stored item.
* ``POST /search_by_key {"key", "view", "target_view", "k"}``: search with a stored item as the query in ``view``.
  The query is the item's indexed vector in that view, which index/thumbs.py keeps (float16: scores within
  2^-11 of a search with the float32 vector, ``thumbs.FLOAT16_SCORE_BOUND``) - so it works for every index type
  (FAISS ``reconstruct`` does not, for IVF/PQ/HNSW-with-tombstones) and nothing is re-embedded. Files written
  before kept a lossless copy of the item's input instead: it is re-embedded, as it was then.

Errors use the service's ``{"error", "detail", "field"}`` shape.
"""
from __future__ import annotations

import base64
import functools
import logging
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from index.thumbs import ThumbStore, kind_of_view
from models.views import source_key

from . import reads
from .core import ApiError, current_core
from .errors import error_response as _err
from .limits import check_key as _key
from .schemas import error_body

LOG = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"

_thumbs: dict[str, ThumbStore] = {}


def thumbs_of(store: Any) -> ThumbStore | None:
    """The (cached, read-only) thumbnail file of an index directory, or None when it has none yet."""
    path = str(store.path)
    ts = _thumbs.get(path)
    if ts is None and ThumbStore.exists(path):
        ts = _thumbs[path] = ThumbStore(path, readonly=True)
    return ts


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError("invalid_input", "the body must be a JSON object", "body") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_input", "the body must be a JSON object", "body")
    return body


def _kind(core: Any, view: Any, kind: Any) -> str | None:
    if kind not in (None, ""):
        if kind not in ("rgb", "depth", "normals"):
            raise ApiError("invalid_input", f"kind must be rgb, depth or normals, not {kind!r}", "kind")
        return kind
    if view in (None, ""):
        return None
    return kind_of_view(view, core.view_spec(view)["source"])


def _lookup_thumb(ts: ThumbStore | None, key: str, kind: str | None) -> tuple[str, str, bytes] | None:
    if ts is None:
        return None
    return ts.get(key, kind) or (ts.get(key) if kind else None)  # fall back to any picture of the item


def _data_uri(t: tuple[str, str, bytes] | None) -> str | None:
    return None if t is None else f"data:{t[1]};base64,{base64.b64encode(t[2]).decode()}"


# ---------------------------------------------------------------------------------------------- routes
def _index_route(fn: Any) -> Any:
    """A route over the served index: ``fn(request, core, store)``; every failure becomes the error envelope."""
    @functools.wraps(fn)
    async def route(request: Request) -> Response:
        try:
            core = current_core()
            return await fn(request, core, core.need_store())
        except Exception as e:  # noqa: BLE001 - every failure becomes an answer
            return _err(e)
    return route


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    types = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
    if name not in types:
        return JSONResponse(error_body("not_found", f"no file {name!r}"), status_code=404)
    return FileResponse(STATIC / name, media_type=types[name])


async def docs(request: Request) -> Response:
    import _bentoml_impl.server as srv
    return FileResponse(Path(srv.__file__).parent / "main-openapi.html", media_type="text/html; charset=utf-8")


@_index_route
async def thumb(request: Request, core: Any, store: Any) -> Response:
    key = _key(request.path_params["key"], "key")
    kind = _kind(core, request.query_params.get("view"), request.query_params.get("kind"))
    t = await anyio.to_thread.run_sync(lambda: _lookup_thumb(thumbs_of(store), key, kind))
    if t is None and "://" in str(store.path):  # a Milvus collection (index/milvus.py): no thumbnail file
        raise ApiError("not_found", f"this index ({store.path}) keeps no thumbnails", "key")
    if t is None:
        raise ApiError("not_found", f"no thumbnail for key {key!r}", "key")
    return Response(t[2], media_type=t[1], headers={"cache-control": "private, max-age=300"})


@_index_route
async def thumbs(request: Request, core: Any, store: Any) -> Response:
    body = await _json_body(request)
    keys = body.get("keys")
    if not isinstance(keys, list) or len(keys) > core.settings.max_k:
        raise ApiError("invalid_input", f"keys must be a list of at most {core.settings.max_k} keys", "keys")
    keys = [_key(k, f"keys[{i}]") for i, k in enumerate(keys)]
    kind = _kind(core, body.get("view"), body.get("kind"))

    def run() -> dict:
        ts = thumbs_of(store)
        return {k: _data_uri(_lookup_thumb(ts, k, kind)) for k in keys}

    return JSONResponse({"thumbs": await anyio.to_thread.run_sync(run)})


@_index_route
async def random_item(request: Request, core: Any, store: Any) -> Response:
    def run() -> dict:
        ts = thumbs_of(store)
        if ts is None:
            raise ApiError("not_found", "this index keeps no thumbnails (built with --no-thumbs or before "
                                        "they existed): upload an image instead", None)
        for _ in range(50):  # an item removed by another tool (index.store directly) may keep its row: skip it
            key = ts.random_key()
            if key is None:
                break
            i = store.ids_of([key])[0]
            if i is not None:
                item = store.lookup([i])[0] or {}
                return {"key": key, "metadata": item.get("metadata", {}), "thumb": _data_uri(ts.get(key))}
        raise ApiError("not_found", "no stored item has a thumbnail", None)

    return JSONResponse(await anyio.to_thread.run_sync(run))


@_index_route
async def search_by_key(request: Request, core: Any, store: Any) -> Response:
    body = await _json_body(request)
    key = _key(body.get("key"), "key")
    view = body.get("view")
    spec = core.view_spec(view)
    src = source_key(view, spec)

    def load() -> tuple[Any, bytes | None]:
        if store.ids_of([key])[0] is None:
            raise ApiError("not_found", f"no stored item has key {key!r}", "key")
        ts = thumbs_of(store)
        if ts is None:
            return None, None
        z = ts.get_embedding(key, view)
        return (z, None) if z is not None else (None, ts.get_input(key, src))  # older files: the stored input

    z, data = await anyio.to_thread.run_sync(load)
    k = body.get("k", 10)
    if z is not None:  # the item's indexed vector in this view: no re-embedding
        out = await reads.search_embedding(core.inputs, store, z[None], view, body.get("target_view"), k)
        return JSONResponse(out | {"query_key": key})
    if data is None and view not in store.views:
        raise ApiError("not_found", f"view {view!r} is not indexed, so no item keeps a vector in it to search "
                                    f"with; search by key in one of {sorted(store.views)}", "view")
    if data is None:
        raise ApiError("not_found", f"item {key!r} has no stored vector in view {view!r} to search with", "view")
    if spec["source"] == "vector":
        import numpy as np
        query = {"view": view, "array": np.frombuffer(data, "<f4").tolist()}
    else:
        query = {"view": view, "image": data}  # Core.prepare takes raw bytes as they are
    out = await core.search(query, body.get("target_view"), k)
    return JSONResponse(out | {"query_key": key})


app = Starlette(routes=[
    Route("/", page, methods=["GET"]),
    Route("/ui", page, methods=["GET"]),
    Route("/ui/{name}", static_file, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
    Route("/thumb/{key:path}", thumb, methods=["GET"]),
    Route("/thumbs", thumbs, methods=["POST"]),
    Route("/gallery/random", random_item, methods=["GET"]),
    Route("/search_by_key", search_by_key, methods=["POST"]),
])
