"""ASGI middleware of the CMC server: bearer-token access, a request-body size limit and one error shape.

* :class:`BearerAuth` - when a token is configured (CMC_API_TOKEN), every path except the health ones requires
  ``Authorization: Bearer <token>`` (constant-time comparison), else 401. Without a token the server is in
  protected mode (like Redis's): reads are open, but writes (``/index/add``, ``/index/remove``) are accepted
  only from loopback clients, else 403.
* :class:`BodyLimit` - bodies over ``max_bytes`` (CMC_MAX_BODY_MB) get 413 before the endpoint parses them.
* :class:`ErrorEnvelope` - rewrites the error answers BentoML and Starlette produce themselves (pydantic
  validation errors, malformed JSON, unknown routes) into ``{"error", "detail", "field"}``.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any

PUBLIC_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})
WRITE_PATHS = frozenset({"/index/add", "/index/remove"})


def is_loopback(client: Any) -> bool:
    """An ASGI ``scope["client"]`` (host, port) from this machine (127.0.0.0/8, ::1, ::ffff:127.x)."""
    if not client:
        return False
    try:
        ip = ipaddress.ip_address(str(client[0]).split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def _json(status: int, body: dict, headers: list | None = None) -> tuple[dict, dict]:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())] + (headers or [])
    return ({"type": "http.response.start", "status": status, "headers": hdrs},
            {"type": "http.response.body", "body": data})


async def _send_json(send: Any, status: int, body: dict, headers: list | None = None) -> None:
    start, body_msg = _json(status, body, headers)
    await send(start)
    await send(body_msg)


def _header(scope: dict, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v
    return None


class BearerAuth:
    def __init__(self, app: Any, token: str | None = None, public_paths: frozenset[str] = PUBLIC_PATHS,
                 write_paths: frozenset[str] = WRITE_PATHS):
        self.app, self.public, self.writes = app, public_paths, write_paths
        self.token = token.encode() if token else None

    def allowed(self, scope: dict) -> bool:
        if self.token is None or scope.get("path", "") in self.public:
            return True
        auth = _header(scope, b"authorization") or b""
        scheme, _, given = auth.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.token is None and scope["type"] == "http" and scope.get("path") in self.writes \
                and not is_loopback(scope.get("client")):
            await _send_json(send, 403, {"error": "forbidden", "detail": f"{scope['path']} is accepted only from "
                                         "this machine (loopback) while CMC_API_TOKEN is unset; set a token to "
                                         "allow writes from other hosts", "field": None})
            return
        if scope["type"] in ("http", "websocket") and not self.allowed(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await _send_json(send, 401, {"error": "unauthorized", "detail": "missing or invalid bearer token "
                                         "(send 'Authorization: Bearer <CMC_API_TOKEN>')", "field": "Authorization"},
                             [(b"www-authenticate", b'Bearer realm="cmc"')])
            return
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int = 32 << 20):
        self.app, self.max_bytes = app, int(max_bytes)

    def _too_large(self, n: int | str) -> dict:
        return {"error": "too_large", "detail": f"request body of {n} bytes is over the limit of {self.max_bytes} "
                "bytes (CMC_MAX_BODY_MB)", "field": "body"}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cl = _header(scope, b"content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                n = -1
            if n > self.max_bytes:
                await _send_json(send, 413, self._too_large(n))
                return
        seen, state = 0, {"responded": False, "started": False}

        async def limited_receive() -> dict:
            nonlocal seen
            if state["responded"]:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    if not state["started"]:
                        state["responded"] = True
                        await _send_json(send, 413, self._too_large(f"more than {self.max_bytes}"))
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: dict) -> None:
            if state["responded"]:
                return
            if msg["type"] == "http.response.start":
                state["started"] = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["responded"]:
                raise


def normalize_error(status: int, body: bytes) -> dict:
    """Any error body -> ``{"error", "detail", "field"}``."""
    try:
        data: Any = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]  # bentoml 1.4 answers some 4xx as a one-element list
    if isinstance(data, dict) and {"error", "detail", "field"} <= set(data):
        return data
    field = None
    if isinstance(data, dict):
        err, detail = str(data.get("error", "error")), data.get("detail")
        if isinstance(detail, list):  # pydantic errors: [{type, loc, msg}]
            parts = []
            for e in detail:
                loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",)) if isinstance(e, dict) else ""
                field = field or loc or None
                msg = e.get("msg") if isinstance(e, dict) else str(e)
                parts.append(f"{loc}: {msg}" if loc else str(msg))
            more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
            return {"error": "invalid_input", "detail": "; ".join(parts[:3]) + more or err, "field": field or "body"}
        if detail is None:
            detail, err = err, ("invalid_input" if status == 400 else _KIND.get(status, "error"))
        return {"error": err, "detail": str(detail), "field": field}
    text = body.decode("utf-8", "replace").strip() if body else ""
    return {"error": _KIND.get(status, "error"), "detail": text or f"HTTP {status}", "field": None}


_KIND = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
         415: "unsupported_media_type", 422: "invalid_input", 500: "internal", 503: "unavailable"}


class ErrorEnvelope:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict | None = None
        chunks: list[bytes] = []

        async def wrapped(msg: dict) -> None:
            nonlocal held
            if msg["type"] == "http.response.start":
                if msg["status"] >= 400:
                    held = msg
                    return
                await send(msg)
                return
            if held is not None and msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))
                if msg.get("more_body"):
                    return
                body = json.dumps(normalize_error(held["status"], b"".join(chunks))).encode()
                hdrs = [(k, v) for k, v in held.get("headers", [])
                        if k.lower() not in (b"content-length", b"content-type")]
                hdrs += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({**held, "headers": hdrs})
                await send({"type": "http.response.body", "body": body})
                return
            await send(msg)

        await self.app(scope, receive, wrapped)
