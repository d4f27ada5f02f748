"""Request and response models of the CMC server (pydantic; they document the OpenAPI page) and the error shape.

Every error the server answers is ``{"error": <short kind>, "detail": <message>, "field": <offending field or null>}``
with a 4xx status (503 when the index is missing or the server is overloaded).

The constraints below make the OpenAPI schema describe what the handlers accept, so that generated requests
(a fuzzer's, a client generator's) mostly reach them. Lists, images and vectors are bounded inside the parser
(``max_length``, from the settings: a list over CMC_MAX_ITEMS is a 413); key and metadata limits are in the
schema only (``json_schema_extra``): the handlers enforce them with a 413 that names the setting. What the
parser builds at all is bounded before it runs, by the per-route budgets of serving/routes.py.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, Field

from .routes import image_chars
from .settings import from_env

_S = from_env()
MAX_ITEMS = _S.max_items
MAX_VECTOR = 65536  # a sanity bound of the parser; the model's own input length bounds the body (routes.budget)

KEY_MAX_CHARS = 256
VIEW_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$"
KEY_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]+$"

ViewName = Annotated[str, Field(min_length=1, max_length=64, pattern=VIEW_PATTERN,
                                description="a view of the model, e.g. 'L', 'ab', 'depth' (see /info)")]
Key = Annotated[str, Field(min_length=1, description="unique key of an item: printable text",
                           json_schema_extra={"maxLength": KEY_MAX_CHARS, "pattern": KEY_PATTERN})]
Base64Image = Annotated[str, Field(min_length=1, max_length=image_chars(_S.max_image_bytes),
                                   description="base64-encoded PNG, JPEG or WebP bytes "
                                   "(a 16-bit PNG for depth views); a data: URL prefix is allowed")]
Vector = Annotated[list[float], Field(min_length=1, max_length=MAX_VECTOR,
                                      description="a vector of numbers, for vector views")]



def items(t: object) -> object:
    """A list of ``t`` of at most CMC_MAX_ITEMS entries (a 413 beyond, serving/auth.py's envelope)."""
    return Annotated[list[t], Field(max_length=MAX_ITEMS)]  # type: ignore[valid-type]


class Input(BaseModel):
    """One input in one view: ``{"view", "image"}`` (base64 PNG/JPEG/WebP, or a 16-bit PNG for depth views)
    or ``{"view", "array"}`` (numbers, for vector views)."""
    view: ViewName
    image: Optional[Base64Image] = None
    array: Optional[Vector] = None


class AddItem(BaseModel):
    key: Key
    metadata: dict[str, Any] = Field(default_factory=dict, description="a JSON object stored with the item "
                                     "(at most CMC_MAX_METADATA_BYTES serialized, 8 levels deep)")
    inputs: dict[Annotated[str, Field(pattern=VIEW_PATTERN)], Union[Base64Image, Vector]] = Field(
        description="by source ('rgb', 'depth': base64 image) or by vector view name (a list of numbers)",
        max_length=64, json_schema_extra={"minProperties": 1})


# HTTP status per error kind
STATUS = {
    "bad_request": 400,
    "invalid_input": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "unsupported_media_type": 415,
    "no_index": 503,
    "unavailable": 503,
}


def error_body(error: str, detail: str, field: str | None = None) -> dict:
    return {"error": error, "detail": detail, "field": field}
