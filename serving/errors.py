"""The one error type of the server and the one way to answer at the ASGI level.

:class:`ApiError` (status, kind, detail, field, extra headers) is raised by every layer: middlewares, the core,
the binary and web routes. :func:`to_api_error` maps known exceptions to it, :func:`respond` turns every failure
of an endpoint coroutine into a ``{"error", "detail", "field"}`` answer, and :func:`send_json` /
:func:`send_error` are the only senders the ASGI middlewares use."""
from __future__ import annotations

import json
import logging
from typing import Any, Awaitable

from models.runtime import InputError

from .schemas import STATUS, error_body

LOG = logging.getLogger(__name__)


class ApiError(Exception):
    """A failure with an HTTP status: ``error`` is a short kind (a key of schemas.STATUS)."""

    def __init__(self, error: str, detail: str, field: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.error, self.detail, self.field = error, detail, field
        self.status = status or STATUS.get(error, 400)
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.error, self.detail, self.field)


def to_api_error(e: BaseException) -> ApiError | None:
    """Known exceptions -> ApiError; None for a bug (500)."""
    from index.store import DuplicateKeyError, NotWritableError, StoreError, UnknownKeyError
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InputError):
        return ApiError("invalid_input", str(e), e.field)
    if isinstance(e, DuplicateKeyError):
        return ApiError("conflict", str(e), "items")
    if isinstance(e, UnknownKeyError):
        return ApiError("not_found", str(e), "keys")
    if isinstance(e, NotWritableError):
        return ApiError("unavailable", str(e), None)
    if isinstance(e, StoreError):
        return ApiError("bad_request", str(e), None)
    if isinstance(e, RecursionError):
        return ApiError("invalid_input", "input nested too deeply", None)
    return None


def error_response(e: BaseException) -> Any:
    """Any exception as the JSON error answer with its status: a known one as its ApiError, BentoML's
    dispatcher timeout as 503, anything else as a logged 500."""
    from starlette.responses import JSONResponse
    api = to_api_error(e)
    if api is None:
        if type(e).__name__ == "ServiceUnavailable":  # bentoml's dispatcher: waited past max latency
            api = ApiError("unavailable", f"server overloaded: {e}", None)
        else:
            LOG.exception("unexpected error")
            return JSONResponse(error_body("internal", f"{type(e).__name__}: {e}"), status_code=500)
    return JSONResponse(api.body(), status_code=api.status, headers=api.headers or None)


async def respond(coro: Awaitable[Any]) -> Any:
    """Await an endpoint coroutine; errors become a JSON response with their status (never a crash)."""
    try:
        return await coro
    except Exception as e:  # noqa: BLE001 - everything becomes an answer
        return error_response(e)


async def send_bytes(send: Any, status: int, body: bytes, content_type: str = "application/json",
                     headers: dict[str, str] | None = None) -> None:
    """An ASGI answer: status, Content-Type, Content-Length and ``headers``, then the body."""
    hdrs = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Any, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    await send_bytes(send, status, json.dumps(body).encode(), headers=headers)


async def send_error(send: Any, e: ApiError) -> None:
    """The error envelope of ``e`` with its status and headers."""
    await send_json(send, e.status, e.body(), e.headers)
