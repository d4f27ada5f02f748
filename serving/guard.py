"""Request screening before BentoML parses a body, and metrics labelled by known routes only.

* :class:`ContentGuard` - JSON endpoints take ``application/json`` (or no Content-Type) and answer anything
  else 415; form endpoints (``/embed_file``) take ``multipart/form-data`` with a valid boundary, and their body
  is parsed and checked here first: a malformed body is a 400, and a file field sent as a text part (for
  example a URL, which BentoML would otherwise download) is a 400 - nothing is ever fetched. The checked body is
  then replayed to BentoML unchanged. Bodies are bounded by :class:`serving.auth.BodyLimit`, which runs outside.
* :func:`install_route_metrics` - BentoML's traffic-metrics middleware runs before every middleware of ours and
  labels its series by the raw request path, so random paths would each add series to ``/metrics`` forever.
  It is replaced (in BentoML's module, before the app is built) by a subclass that labels every path outside
  the known routes as ``/other``; routing still sees the real path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from .auth import _header, _send_json

OTHER_ROUTE = "/other"
# RFC 2046: 1-70 characters from this set, not ending in a space
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+/[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def parse_content_type(value: bytes) -> tuple[str, dict[str, str]] | None:
    """``b"multipart/form-data; boundary=x"`` -> ("multipart/form-data", {"boundary": "x"}); None if malformed."""
    try:
        text = value.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    media, *rest = text.split(";")
    media = media.strip().lower()
    if not _TOKEN.match(media):
        return None
    params: dict[str, str] = {}
    for p in rest:
        if not p.strip():
            continue
        k, eq, v = p.partition("=")
        k, v = k.strip().lower(), v.strip()
        if not eq or not k:
            return None
        if len(v) >= 2 and v[0] == v[-1] == '"':
            v = v[1:-1]
        params[k] = v
    return media, params


@dataclass(frozen=True)
class FormSpec:
    """A multipart endpoint's fields: each appears exactly once; ``files`` must be uploaded file parts and
    ``texts`` short text parts (at most ``max_text`` characters)."""
    files: tuple[str, ...]
    texts: tuple[str, ...]
    max_text: int = 64


def _error(status: int, error: str, detail: str, field: str | None) -> tuple[int, dict]:
    return status, {"error": error, "detail": detail, "field": field}


class ContentGuard:
    def __init__(self, app: Any, json_routes: Iterable[str] = (), form_routes: dict[str, FormSpec] | None = None):
        self.app = app
        self.json_routes = frozenset(json_routes)
        self.form_routes = dict(form_routes or {})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or \
                (path not in self.json_routes and path not in self.form_routes):
            await self.app(scope, receive, send)
            return
        raw = _header(scope, b"content-type")
        ct = parse_content_type(raw) if raw is not None and raw.strip() else None
        if raw is not None and raw.strip() and ct is None:
            await _send_json(send, 400, {"error": "bad_request", "detail": f"malformed Content-Type header "
                                         f"{raw[:100].decode('latin-1')!r}", "field": "Content-Type"})
            return
        if path in self.json_routes:
            if ct is not None and ct[0] != "application/json":
                await _send_json(send, 415, {"error": "unsupported_media_type", "detail": f"{path} takes "
                                             f"application/json, not {ct[0]}", "field": "Content-Type"})
                return
            await self.app(scope, receive, send)
            return
        await self._form(scope, receive, send, ct, self.form_routes[path])

    async def _form(self, scope: dict, receive: Any, send: Any, ct: tuple[str, dict] | None, spec: FormSpec) -> None:
        path = scope["path"]
        if ct is None or ct[0] != "multipart/form-data":
            await _send_json(send, 415, {"error": "unsupported_media_type", "detail": f"{path} takes "
                                         f"multipart/form-data (curl -F), not {ct[0] if ct else 'no Content-Type'}",
                                         "field": "Content-Type"})
            return
        boundary = ct[1].get("boundary", "")
        if not _BOUNDARY.match(boundary):
            await _send_json(send, 400, {"error": "bad_request", "detail": "multipart/form-data needs a boundary "
                                         "parameter of 1-70 allowed characters", "field": "Content-Type"})
            return
        chunks: list[bytes] = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        problem = await self._check_form(scope, body, spec)
        if problem is not None:
            await _send_json(send, problem[0], problem[1])
            return
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _check_form(scope: dict, body: bytes, spec: FormSpec) -> tuple[int, dict] | None:
        from starlette.datastructures import Headers, UploadFile
        from starlette.formparsers import MultiPartParser

        async def stream():
            yield body

        n_parts = len(spec.files) + len(spec.texts)
        try:
            form = await MultiPartParser(Headers(scope=scope), stream(), max_files=len(spec.files) + 1,
                                         max_fields=n_parts + 1, max_part_size=spec.max_text * 4 + 64).parse()
        except Exception as e:  # noqa: BLE001 - MultiPartException and the parser's own errors: all malformed bodies
            return _error(400, "bad_request", f"malformed multipart body: {str(e)[:200] or type(e).__name__}",
                          "body")
        try:
            for name in form.keys():
                if name not in spec.files and name not in spec.texts:
                    return _error(400, "invalid_input", f"unknown form field {name[:64]!r}; this endpoint takes "
                                  f"{', '.join(spec.files + spec.texts)}", name[:64])
            for name in spec.files + spec.texts:
                values = form.getlist(name)
                if len(values) != 1:
                    return _error(400, "invalid_input", f"form field {name!r} must be given exactly once "
                                  f"(got {len(values)})", name)
                v = values[0]
                if name in spec.files and not isinstance(v, UploadFile):
                    return _error(400, "invalid_input", f"form field {name!r} must be an uploaded file "
                                  f"(curl -F {name}=@file.png); a text value such as a URL is not accepted", name)
                if name in spec.texts:
                    if isinstance(v, UploadFile):
                        return _error(400, "invalid_input", f"form field {name!r} must be text, not a file", name)
                    if not 0 < len(v) <= spec.max_text:
                        return _error(400, "invalid_input", f"form field {name!r} must have 1-{spec.max_text} "
                                      "characters", name)
            return None
        finally:
            await form.close()


class _RestorePath:
    """Inside the metrics middleware: give routing back the real path that the metrics label replaced."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if "cmc.path" in scope:
            scope = {k: v for k, v in scope.items() if k != "cmc.path"} | {"path": scope["cmc.path"]}
        await self.app(scope, receive, send)


def install_route_metrics(known: Iterable[str]) -> None:
    """Label BentoML's traffic metrics by ``known`` paths, every other path as ``/other`` (idempotent)."""
    from bentoml._internal.server.http import instruments as ins
    base = ins.RunnerTrafficMetricsMiddleware
    if hasattr(base, "cmc_known"):
        base.cmc_known = frozenset(known)
        return

    class RouteLabelledMetrics(base):  # type: ignore[misc, valid-type]
        cmc_known = frozenset(known)

        def __init__(self, app: Any, *args: Any, **kw: Any):
            super().__init__(_RestorePath(app), *args, **kw)

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            path = scope.get("path", "")
            if scope["type"] in ("http", "websocket") and path not in self.cmc_known:
                scope = {**scope, "path": OTHER_ROUTE, "cmc.path": path}
            await super().__call__(scope, receive, send)

    ins.RunnerTrafficMetricsMiddleware = RouteLabelledMetrics
