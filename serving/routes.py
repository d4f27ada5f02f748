"""The route table of the CMC server: every HTTP route declared once, with who may call it and what body it takes.

Everything at the HTTP edge derives from :data:`ROUTES`: the access check (:class:`serving.auth.Access`: public,
read or write), the admission control (:class:`serving.admission.Admission`), the body screening and per-route
body limits (:class:`serving.guard.ContentGuard`), the labels of ``/metrics`` (:func:`serving.guard.
install_route_metrics`) and the fast JSON path (:class:`serving.fastjson.FastJSON` serves the ``json`` routes of
the service). A path missing from the table is treated as a write (token, or loopback in protected mode), so a
forgotten route fails closed; ``tests/test_routes.py`` fails when a route the server serves is not in the table.

Per-route budgets (:func:`budget`) bound the memory a request can cost before any parser runs: the largest valid
body of each route (its item count, image size, vector length and metadata size limits), and the largest number of
JSON values such a body can hold (pydantic-core builds the whole JSON tree before it checks a list's length, so
``max_length`` alone does not stop a 30 MiB array of zeros from costing ~16x its size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp"})  # the raw-image bodies /embed takes
Access = Literal["public", "read", "write"]
# JSON: a JSON object; form: multipart/form-data with declared fields; binary: /embed's raw-image/multipart forms
BodyForm = Literal["json", "form", "binary"]


@dataclass(frozen=True)
class FormSpec:
    """A multipart endpoint's fields: each appears exactly once; ``files`` must be uploaded file parts and
    ``texts`` short text parts (at most ``max_text`` characters)."""
    files: tuple[str, ...]
    texts: tuple[str, ...]
    max_text: int = 64


@dataclass(frozen=True)
class Route:
    path: str
    access: Access
    methods: tuple[str, ...] = ("POST",)
    body: tuple[BodyForm, ...] = ()  # the body forms a POST takes; () for none
    form: FormSpec | None = None  # for body "form"
    prefix: bool = False  # matches path + anything (e.g. /thumb/{key})
    service: bool = False  # a BentoML API of serving.service (the rest: BentoML's own routes or serving.web)


ROUTES: tuple[Route, ...] = (
    # the JSON API (serving/service.py)
    Route("/embed", "read", body=("json", "binary"), service=True),
    Route("/embed_file", "read", body=("form",), form=FormSpec(files=("image",), texts=("view",)), service=True),
    Route("/similarity", "read", body=("json",), service=True),
    Route("/search", "read", body=("json",), service=True),
    Route("/index/add", "write", body=("json",), service=True),
    Route("/index/remove", "write", body=("json",), service=True),
    Route("/info", "read", body=("json",), service=True),
    # BentoML's own
    Route("/readyz", "public", ("GET",)),
    Route("/livez", "public", ("GET",)),
    Route("/healthz", "public", ("GET",)),
    Route("/metrics", "public", ("GET",)),
    Route("/docs.json", "read", ("GET",)),
    # the web page and its routes (serving/web.py)
    Route("/", "public", ("GET",)),
    Route("/ui", "public", ("GET",)),
    Route("/ui/app.js", "public", ("GET",)),
    Route("/ui/app.css", "public", ("GET",)),
    Route("/docs", "read", ("GET",)),
    Route("/thumb/", "read", ("GET",), prefix=True),
    Route("/thumbs", "read", body=("json",)),
    Route("/gallery/random", "read", ("GET",)),
    Route("/search_by_key", "read", body=("json",)),
)
_EXACT = {r.path: r for r in ROUTES if not r.prefix}
_PREFIX = tuple(r for r in ROUTES if r.prefix)
# what an unknown path is treated as: a write (fail closed)
UNKNOWN = Route("", "write", ("GET", "POST"))


def route_of(path: str) -> Route | None:
    """The route serving ``path``, or None when the table has none."""
    r = _EXACT.get(path)
    if r is None:
        r = next((p for p in _PREFIX if path.startswith(p.path) and len(path) > len(p.path)), None)
    return r


def access_of(path: str) -> Access:
    r = route_of(path)
    return (r or UNKNOWN).access


def paths(access: Access | None = None, body: BodyForm | None = None) -> frozenset[str]:
    """Exact paths of the table, optionally only those of one access class or body form."""
    return frozenset(r.path for r in ROUTES if not r.prefix and (access is None or r.access == access)
                     and (body is None or body in r.body))


def metric_paths() -> tuple[str, ...]:
    """Paths labelled in /metrics (prefix routes count under /other: their keys are unbounded)."""
    return tuple(r.path for r in ROUTES if not r.prefix)


def forms() -> dict[str, FormSpec]:
    return {r.path: r.form for r in ROUTES if r.form is not None}


# ---------------------------------------------------------------------------------------------- budgets
JSON_OVERHEAD = 4 << 10  # field names, view names, k, flags, whitespace of any valid body
NUMBER_CHARS = 26  # the longest JSON number a float32 round-trips through, with its separator
KEY_BYTES = 256 * 6 + 2  # a key of 256 characters, each escaped as \uXXXX at worst


@dataclass(frozen=True)
class Budget:
    """The largest valid request of a route: body bytes and JSON values (commas + brackets + 1 bounds them)."""
    max_bytes: int
    max_values: int


def image_chars(max_image_bytes: int) -> int:
    """Characters of one base64 image of ``max_image_bytes`` (with a data: URL prefix)."""
    return -(-max_image_bytes // 3) * 4 + 128


def budget(path: str, *, max_items: int, max_image_bytes: int, max_vector_dim: int, max_metadata_bytes: int,
           max_k: int, max_body: int, vector_dims_total: int = 0) -> Budget:
    """The largest valid body of ``path`` (capped at ``max_body``, CMC_MAX_BODY_MB) and its JSON value count.

    ``max_vector_dim``: the longest vector input of the model's vector views (0 without any);
    ``vector_dims_total``: their sum (an /index/add item gives each vector view's input once)."""
    img = image_chars(max_image_bytes)
    vec_bytes = max_vector_dim * NUMBER_CHARS + 2
    one = max(img, vec_bytes) + 64  # one input: {"view": ..., "image"|"array": ...}
    one_values = max_vector_dim + 4
    if path == "/embed":
        b, v = max_items * (max(img, vec_bytes) + 2), max_items * (max_vector_dim + 1) + 8
    elif path == "/embed_file":
        b, v = max_image_bytes + 1024, 8
    elif path == "/similarity":
        b, v = (max_items + 3) * one, (max_items + 3) * one_values + 8
    elif path == "/search":
        b, v = one, one_values + 8
    elif path == "/index/add":
        # an item: key, metadata, one image per image source (at most 3: rgb, depth, normals) and each vector view
        item = KEY_BYTES + max_metadata_bytes + 3 * img + vector_dims_total * NUMBER_CHARS + 256
        b, v = max_items * item, max_items * (max_metadata_bytes + vector_dims_total + 16) + 8
    elif path == "/index/remove":
        b, v = max_items * (KEY_BYTES + 2), max_items + 8
    elif path == "/thumbs":
        b, v = max_k * (KEY_BYTES + 2), max_k + 8
    elif path == "/search_by_key":
        b, v = KEY_BYTES, 8
    else:  # /info and anything without a declared body
        b, v = 0, 8
    return Budget(min(b + JSON_OVERHEAD, max_body), v + 16)


def vector_dims(views: dict[str, dict]) -> list[int]:
    """Input lengths of a model's vector views (a served model's ``Runtime.views``)."""
    return [int(v["input"]["shape"][-1]) for v in views.values() if v.get("source") == "vector"]


def budgets(settings: object, views: dict[str, dict]) -> dict[str, Budget]:
    """Every body-taking route's :class:`Budget` for a served model (``views``) under ``settings``."""
    dims = vector_dims(views)
    kw = dict(max_items=settings.max_items, max_image_bytes=settings.max_image_bytes,  # type: ignore[attr-defined]
              max_vector_dim=max(dims, default=0), max_metadata_bytes=settings.max_metadata_bytes,  # type: ignore
              max_k=settings.max_k, max_body=settings.max_body_mb << 20, vector_dims_total=sum(dims))  # type: ignore
    return {r.path: budget(r.path, **kw) for r in ROUTES if r.body}
