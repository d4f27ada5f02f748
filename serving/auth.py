"""ASGI middleware of the CMC server: who may call a route, a request-body size limit and one error shape.

* :class:`AccessControl` - the access class of each path comes from the route table (serving/routes.py).
  With a token (CMC_API_TOKEN), every non-public route requires ``Authorization: Bearer <token>`` (constant-time
  comparison), else 401. Without one the server is in protected mode (like Redis's): reads are open, and a
  write is accepted only when it cannot have been forged by a web page or come from another host: a direct
  loopback connection (no ``X-Forwarded-For``/``Forwarded``/``X-Real-IP``: a proxied request is not a local
  user's, whatever ``FORWARDED_ALLOW_IPS`` made of its client address), a ``Host`` that is a loopback name or
  address (DNS rebinding), no cross-site ``Origin`` or ``Sec-Fetch-Site``, else 403; and, for every write in any
  mode, ``Content-Type: application/json`` (serving/guard.py; a browser must preflight that, and the server
  grants no CORS).
* :class:`BodyLimit` - bodies over ``max_bytes`` (CMC_MAX_BODY_MB) get 413 before anything parses them.
* :class:`ErrorEnvelope` - rewrites the error answers BentoML and Starlette produce themselves (pydantic
  validation errors, malformed JSON, unknown routes) into ``{"error", "detail", "field"}``; a list over its
  length limit is a 413, as the handlers answer it.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

from .errors import ApiError, send_error
from .routes import access_of

FORWARD_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")


def _ip_loopback(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def is_loopback(client: Any) -> bool:
    """An ASGI ``scope["client"]`` (host, port) from this machine (127.0.0.0/8, ::1, ::ffff:127.x)."""
    return bool(client) and _ip_loopback(str(client[0]))


def loopback_host(host: str) -> bool:
    """A Host header or an origin's host part (with or without a port) that names this machine."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:port
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host == "localhost" or _ip_loopback(host)


def _header(scope: dict, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v
    return None


def forged_write(scope: dict) -> str | None:
    """Why a write in protected mode (no token) is refused, or None when it is a direct local one."""
    path = scope.get("path", "")
    if not is_loopback(scope.get("client")):
        return (f"{path} is accepted only from this machine (loopback) while CMC_API_TOKEN is unset; set a token "
                "to allow writes from other hosts")
    for name in FORWARD_HEADERS:
        if _header(scope, name) is not None:
            return (f"{path} came through a proxy ({name.decode()}); behind a proxy or load balancer, writes need "
                    "CMC_API_TOKEN")
    host = _header(scope, b"host")
    if host is not None and not loopback_host(host.decode("latin-1")):
        return (f"{path} was addressed to Host {host[:100].decode('latin-1')!r}, not to this machine by a "
                "loopback name or address (a DNS-rebinding page?); set CMC_API_TOKEN to write by another name")
    origin = _header(scope, b"origin")
    if origin is not None:
        o = origin.decode("latin-1").strip()
        try:
            netloc = urlsplit(o).netloc if o != "null" else ""
        except ValueError:
            netloc = ""
        if not netloc or not loopback_host(netloc):
            return f"{path} was sent by a web page of another site (Origin {o[:100]!r}); writes from pages are refused"
    site = _header(scope, b"sec-fetch-site")
    if site is not None and site.strip().lower() == b"cross-site":
        return f"{path} was sent by a web page of another site (Sec-Fetch-Site: cross-site)"
    return None


class AccessControl:
    """Token or protected mode over the route table's access classes (see the module docstring)."""

    def __init__(self, app: Any, token: str | None = None):
        self.app = app
        self.token = token.encode() if token else None

    def _token_ok(self, scope: dict) -> bool:
        auth = _header(scope, b"authorization") or b""
        scheme, _, given = auth.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token or b"")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        access = access_of(scope.get("path", ""))
        if access != "public" and self.token is not None and not self._token_ok(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send_error(send, ApiError("unauthorized", "missing or invalid bearer token (send "
                                            "'Authorization: Bearer <CMC_API_TOKEN>')", "Authorization",
                                            headers={"www-authenticate": 'Bearer realm="cmc"'}))
            return
        if access == "write" and self.token is None:
            why = forged_write(scope)
            if why is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send_error(send, ApiError("forbidden", why, None))
                return
        await self.app(scope, receive, send)


def _too_large(n: int | str, limit: int) -> ApiError:
    return ApiError("too_large", f"request body of {n} bytes is over the limit of {limit} bytes (CMC_MAX_BODY_MB)",
                    "body")


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int = 32 << 20):
        self.app, self.max_bytes = app, int(max_bytes)

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
                await send_error(send, _too_large(n, self.max_bytes))
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
                        await send_error(send, _too_large(f"more than {self.max_bytes}", self.max_bytes))
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
            too_long = all(isinstance(e, dict) and e.get("type") == "too_long" for e in detail) and detail
            return {"error": "too_large" if too_long else "invalid_input",
                    "detail": "; ".join(parts[:3]) + more or err, "field": field or "body"}
        if detail is None:
            detail, err = err, ("invalid_input" if status == 400 else _KIND.get(status, "error"))
        return {"error": err, "detail": str(detail), "field": field}
    text = body.decode("utf-8", "replace").strip() if body else ""
    return {"error": _KIND.get(status, "error"), "detail": text or f"HTTP {status}", "field": None}


_KIND = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
         413: "too_large",
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
                out = normalize_error(held["status"], b"".join(chunks))
                status = 413 if out["error"] == "too_large" else held["status"]  # a list over its length limit
                body = json.dumps(out).encode()
                hdrs = [(k, v) for k, v in held.get("headers", [])
                        if k.lower() not in (b"content-length", b"content-type")]
                hdrs += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({**held, "status": status, "headers": hdrs})
                await send({"type": "http.response.body", "body": body})
                return
            await send(msg)

        await self.app(scope, receive, wrapped)
