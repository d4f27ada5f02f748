"""Request screening before BentoML parses a body, and metrics labelled by known routes only.

* :class:`ContentGuard` - every POST route of the table (serving/routes.py) by its body forms: JSON routes take
  ``application/json`` (reads also no Content-Type, as BentoML reads it; writes must say it) and answer anything
  else 415; ``/embed`` also takes raw images and multipart (serving/binary.py); form endpoints (``/embed_file``)
  take ``multipart/form-data`` with a valid boundary, and their body is parsed and checked here first: a
  malformed body is a 400, and a file field sent as a text part (for example a URL, which BentoML would
  otherwise download) is a 400 - nothing is ever fetched. Each body is read up to its route's budget (413
  beyond: the largest valid request of that route), a JSON body's values are counted against the budget before
  any parser builds them (413), and the checked body is then replayed unchanged.
* :func:`install_route_metrics` - BentoML's traffic-metrics middleware runs before every middleware of ours and
  labels its series by the raw request path, so random paths would each add series to ``/metrics`` forever.
  It is replaced (in BentoML's module, before the app is built) by a subclass that labels every path outside
  the known routes as ``/other``; routing still sees the real path.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from .auth import _header
from .errors import ApiError, send_error, send_json
from .routes import IMAGE_TYPES, Budget, FormSpec, Route, route_of

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


def _error(status: int, error: str, detail: str, field: str | None) -> tuple[int, dict]:
    return status, {"error": error, "detail": detail, "field": field}


def json_values(body: bytes) -> int:
    """An upper bound of the number of values in a JSON text: one more than its commas and opening brackets
    (C-speed counts; strings' commas count too, which only overestimates)."""
    return body.count(b",") + body.count(b"[") + body.count(b"{") + 1


class ContentGuard:
    """Screens the body of every POST route of the table (serving/routes.py) before anything parses it:
    its Content-Type against the route's body forms, its size against the route's budget (413), a JSON body's
    value count against the budget (413), and a form's fields (see the module docstring). ``budgets``: a
    callable returning {path: Budget} (the served model's, ``Core.budgets``); it may raise ApiError (503)."""

    def __init__(self, app: Any, budgets: Callable[[], dict[str, Budget]] | dict[str, Budget] | None = None):
        self.app = app
        self._budgets = budgets

    def budget(self, path: str) -> Budget | None:
        b = self._budgets() if callable(self._budgets) else self._budgets
        return (b or {}).get(path)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        route = route_of(path) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if route is None or not route.body:
            await self.app(scope, receive, send)
            return
        try:
            media = self._media(scope, route)
            budget = self.budget(path)
            body = await _read_within(receive, budget.max_bytes if budget else None, path)
            if body is None:
                return  # the client went away
            if media == "json" and budget is not None and json_values(body) > budget.max_values:
                raise ApiError("too_large", f"the body holds more than {budget.max_values} JSON values, more than "
                               f"the largest valid {path} request (CMC_MAX_ITEMS and the model's input sizes)",
                               "body")
            if media == "form":
                problem = await self._check_form(scope, body, route.form)  # type: ignore[arg-type]
                if problem is not None:
                    await send_json(send, problem[0], problem[1])
                    return
        except ApiError as e:
            await send_error(send, e)
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
    def _media(scope: dict, route: Route) -> str:
        """The body form a request is read as ("json", "binary" or "form"); raises ApiError (400/415)."""
        path = route.path
        raw = _header(scope, b"content-type")
        ct = parse_content_type(raw) if raw is not None and raw.strip() else None
        if raw is not None and raw.strip() and ct is None:
            raise ApiError("bad_request", f"malformed Content-Type header {raw[:100].decode('latin-1')!r}",
                           "Content-Type")
        media = ct[0] if ct else None
        if "json" in route.body and media == "application/json":
            return "json"
        if "json" in route.body and media is None and route.access != "write":
            return "json"  # as BentoML reads it; writes must say so (a browser must preflight that)
        if media == "multipart/form-data" and ("binary" in route.body or "form" in route.body):
            if not _BOUNDARY.match(ct[1].get("boundary", "")):  # type: ignore[index]
                raise ApiError("bad_request", "multipart/form-data needs a boundary parameter of 1-70 allowed "
                               "characters", "Content-Type")
            return "form" if "form" in route.body else "binary"
        if "binary" in route.body and media in IMAGE_TYPES:
            return "binary"
        if "form" in route.body:
            raise ApiError("unsupported_media_type", f"{path} takes multipart/form-data (curl -F), not "
                           f"{media or 'no Content-Type'}", "Content-Type")
        if media is None:
            raise ApiError("unsupported_media_type", f"{path} is a write: send Content-Type: application/json",
                           "Content-Type")
        raise ApiError("unsupported_media_type", f"{path} takes application/json, not {media}", "Content-Type")

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


async def _read_within(receive: Any, limit: int | None, path: str) -> bytes | None:
    """The whole body, or ApiError 413 as soon as it passes ``limit``; None when the client went away."""
    chunks: list[bytes] = []
    n = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        n += len(chunk)
        if limit is not None and n > limit:
            raise ApiError("too_large", f"request body of more than {limit} bytes is over the largest valid {path} "
                           "request (CMC_MAX_ITEMS, CMC_MAX_IMAGE_MB, CMC_MAX_BODY_MB and the model's input sizes)",
                           "body")
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)
