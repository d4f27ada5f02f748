"""Binary request and response forms of POST /embed, beside its JSON form.

Requests (the view in the query string, or a ``view`` form field):

* raw image bytes: ``Content-Type: image/png | image/jpeg | image/webp``, ``POST /embed?view=L``;
* ``multipart/form-data`` with one or more ``images`` file parts (and optional ``view``/``encoding`` fields);
* JSON, as the BentoML endpoint takes it (``{"view", "images" | "arrays", "encoding"}``).

Responses: JSON floats by default; ``"encoding": "base64"`` (JSON field, form field or ``?encoding=base64``)
gives one base64 string of little-endian float32 per embedding; ``Accept: application/x-npy`` gives the
(N, D) float32 array as an .npy file.

Design: BentoML 1.4 endpoints parse JSON (or multipart into declared fields) and serialise through pydantic,
so a raw body cannot reach the ``embed`` endpoint on the same route. :class:`BinaryEmbed`, an ASGI middleware
innermost in the service's stack (inside auth, the body limit and the error envelope; inside BentoML's
metrics, tracing and concurrency limits), answers the binary forms of ``POST /embed`` itself through the
service's :class:`serving.core.Core` (same validation, decode place, micro-batcher and error envelope) and
lets every JSON request without a binary response through to BentoML untouched. That skips BentoML's
routing, pydantic parsing and response serialisation for the binary forms, and costs a JSON request one
header scan. It also completes the OpenAPI document (``/docs.json``) with the extra content types and query
parameters, which BentoML cannot declare for one route.
"""
from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import parse_qs

import numpy as np

from .core import current_core
from .errors import ApiError, respond, send_bytes, send_error
from .routes import IMAGE_TYPES

LOG = logging.getLogger(__name__)

Encoding = Literal["float", "base64"]
ENCODINGS = ("float", "base64")
NPY = "application/x-npy"
FORM_FIELDS = frozenset({"images", "image", "view", "encoding"})


def embeddings_body(view: str, z: np.ndarray, encoding: str = "float") -> dict:
    """(N, D) float32 -> the JSON answer of /embed in ``encoding`` (floats, or base64 of '<f4' per row)."""
    if encoding == "base64":
        z = np.ascontiguousarray(z, dtype="<f4")
        return {"view": view, "dim": int(z.shape[1]), "encoding": "base64", "dtype": "<f4",
                "embeddings": [base64.b64encode(row.tobytes()).decode("ascii") for row in z]}
    return {"view": view, "dim": int(z.shape[1]), "embeddings": z.tolist()}


def npy_bytes(z: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(z, dtype="<f4"), allow_pickle=False)
    return buf.getvalue()


def decode_base64_embeddings(body: dict) -> np.ndarray:
    """Client side: a base64 /embed answer -> (N, D) float32."""
    return np.stack([np.frombuffer(base64.b64decode(e), "<f4") for e in body["embeddings"]]).reshape(
        -1, int(body["dim"]))


async def embed_answer(core: Any, view: str, images: list | None = None, arrays: list | None = None,
                       encoding: str = "float") -> dict:
    """The JSON answer of /embed: Core.embed for floats, Core.embed_batch + base64 otherwise."""
    if encoding == "float":
        return await core.embed(view, images, arrays)
    return embeddings_body(view, await core.embed_batch(view, images, arrays), encoding)


def _headers(scope: dict) -> tuple[str, str]:
    ctype, accept = "", ""
    for k, v in scope.get("headers", ()):
        if k == b"content-type":
            ctype = v.decode("latin-1")
        elif k == b"accept":
            accept = v.decode("latin-1")
    return ctype, accept


class BinaryEmbed:
    """ASGI middleware answering the binary forms of ``POST /embed`` (see the module docstring).

    ``core``: a callable returning the Core (default: the running BentoML service's ``.core``)."""

    def __init__(self, app: Any, core: Callable[[], Any] | None = None, path: str = "/embed",
                 docs_path: str = "/docs.json", max_form_fields: int = 8):
        self.app, self.path, self.docs_path = app, path, docs_path
        self.core = core or current_core
        self.max_form_fields = max_form_fields

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == self.path and scope["method"] == "POST":
                ctype, accept = _headers(scope)
                media = ctype.split(";", 1)[0].strip().lower()
                if media in IMAGE_TYPES or media == "multipart/form-data" or NPY in accept \
                        or b"encoding=" in scope.get("query_string", b""):
                    await self.embed(scope, receive, send, media, ctype, accept)
                    return  # any other body goes on to ContentGuard, which answers a wrong Content-Type
            elif path == self.docs_path and scope["method"] == "GET":
                await self.docs(scope, receive, send)
                return
        await self.app(scope, receive, send)

    # ------------------------------------------------------------------ /embed
    async def embed(self, scope: dict, receive: Any, send: Any, media: str, ctype: str, accept: str) -> None:
        body = await _read_body(receive)
        if body is None:  # the client went away, or the body limit already answered 413
            return
        try:
            core = self.core()
            query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
            view, images, arrays, encoding = await self.parse(media, ctype, body, query, core)
        except ApiError as e:
            await send_error(send, e)
            return
        if NPY in accept:
            async def npy() -> Any:
                from starlette.responses import Response
                z = await core.embed_batch(view, images, arrays)  # (N, D)
                return Response(npy_bytes(z), media_type=NPY,
                                headers={"x-cmc-view": view, "x-cmc-dim": str(z.shape[1])})
            answer = await respond(npy())
        else:
            answer = await respond(embed_answer(core, view, images, arrays, encoding))
        if isinstance(answer, dict):
            await send_bytes(send, 200, json.dumps(answer).encode())
        else:  # a starlette Response: the npy answer or an error envelope
            await answer(scope, _empty_receive, send)

    async def parse(self, media: str, ctype: str, body: bytes, query: dict, core: Any
                    ) -> tuple[str, list | None, list | None, str]:
        """The request -> (view, images as bytes | None, arrays | None, encoding); raises ApiError."""
        if not body:
            raise ApiError("invalid_input", "empty request body", "body")
        fields: dict[str, Any] = dict(query)
        images: list | None = None
        arrays: list | None = None
        if media in IMAGE_TYPES:
            images = [body]
        elif media == "multipart/form-data":
            images = []
            for name, value in await self._form(ctype, body, core):
                if name in ("images", "image"):
                    if isinstance(value, str):
                        raise ApiError("invalid_input", f"form field {name!r} must be a file part", name)
                    images.append(value)
                else:
                    fields[name] = value
            if not images:
                raise ApiError("invalid_input", "multipart body has no 'images' file parts", "images")
        else:  # JSON asking for a binary answer
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise ApiError("invalid_input", f"body is not valid JSON: {str(e)[:200]}", "body") from None
            if not isinstance(data, dict):
                raise ApiError("invalid_input", "body must be a JSON object", "body")
            fields |= {k: v for k, v in data.items() if v is not None}
            images, arrays = data.get("images"), data.get("arrays")
        view, encoding = fields.get("view"), fields.get("encoding", "float")
        if not isinstance(view, str) or not view:
            where = {"multipart/form-data": "a 'view' form field or ?view="}.get(
                media, "the query string (?view=L)" if media in IMAGE_TYPES else "the JSON body")
            problem = "is required" if view is None else f"must be a view name, got {view!r}"
            raise ApiError("invalid_input", f"view {problem} (in {where})", "view")
        if encoding not in ENCODINGS:
            raise ApiError("invalid_input", f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}",
                              "encoding")
        return view, images, arrays, encoding

    async def _form(self, ctype: str, body: bytes, core: Any) -> list[tuple[str, Any]]:
        """multipart body -> [(name, bytes | str)] (at most max_items + 1 files, so Core names the count)."""
        from starlette.datastructures import Headers, UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():  # noqa: ANN202
            yield body
            yield b""

        max_files = int(getattr(getattr(core, "settings", None), "max_items", 64)) + 1
        parser = MultiPartParser(Headers({"content-type": ctype}), stream(), max_files=max_files,
                                 max_fields=self.max_form_fields)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            status = 413 if "Too many files" in str(e) else 400
            raise ApiError("too_large" if status == 413 else "invalid_input", f"multipart body: {e}", "images",
                           status) from None
        out: list[tuple[str, Any]] = []
        try:
            for name, value in form.multi_items():
                if name not in FORM_FIELDS:
                    raise ApiError("invalid_input", f"unknown form field {name!r}; /embed takes "
                                      f"{sorted(FORM_FIELDS)}", name)
                out.append((name, await value.read() if isinstance(value, UploadFile) else value))
        finally:
            await form.close()
        return out

    # ------------------------------------------------------------------ OpenAPI
    async def docs(self, scope: dict, receive: Any, send: Any) -> None:
        held: dict = {}
        chunks: list[bytes] = []

        async def capture(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                held.update(msg)
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if held.get("status") == 200:
            try:
                spec = json.loads(body)
                document(spec, self.path)
                body = json.dumps(spec).encode()
            except Exception:  # noqa: BLE001 - never break the docs page over the extra forms
                LOG.exception("could not add the binary forms of %s to the OpenAPI document", self.path)
        headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**held, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def document(spec: dict, path: str = "/embed") -> None:
    """Add the binary request/response forms and the query parameters of ``path`` to an OpenAPI document."""
    op = spec["paths"][path]["post"]
    binary = {"schema": {"type": "string", "format": "binary"}}
    content = op.setdefault("requestBody", {}).setdefault("content", {})
    for t in sorted(IMAGE_TYPES):
        content[t] = binary | {"description": "one raw image; the view in ?view="}
    content["multipart/form-data"] = {"schema": {
        "type": "object", "required": ["images"],
        "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"},
                                  "description": "one file part per image"},
                       "view": {"type": "string", "description": "view name (or ?view=)"},
                       "encoding": {"type": "string", "enum": list(ENCODINGS)}}}}
    op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") not in ("view", "encoding")] + [
        {"name": "view", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "the view of an image/* or multipart body"},
        {"name": "encoding", "in": "query", "required": False, "schema": {"type": "string", "enum": list(ENCODINGS)},
         "description": "float (default): JSON numbers; base64: one base64 string of little-endian float32 per "
                        "embedding"}]
    ok = op.setdefault("responses", {}).setdefault("200", {}).setdefault("content", {})
    ok[NPY] = binary | {"description": "with Accept: application/x-npy: the (N, D) float32 array as .npy"}
    err = {"application/json": {"schema": {"type": "object", "properties": {
        "error": {"type": "string"}, "detail": {"type": "string"}, "field": {"type": "string", "nullable": True}}}}}
    op["responses"].setdefault("413", {"description": "body or item count over the limit", "content": err})
    op["responses"].setdefault("415", {"description": "unsupported Content-Type", "content": err})


async def _read_body(receive: Any) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


async def _empty_receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


__all__ = ["BinaryEmbed", "Encoding", "embed_answer", "embeddings_body", "npy_bytes", "decode_base64_embeddings",
           "document"]
