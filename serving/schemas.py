"""Request and response models of the CMC server (pydantic; they document the OpenAPI page) and the error shape.

Every error the server answers is ``{"error": <short kind>, "detail": <message>, "field": <offending field or null>}``
with a 4xx status (503 when the index is missing or the server is overloaded).
"""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, Field


class Input(BaseModel):
    """One input in one view: ``{"view", "image"}`` (base64 PNG/JPEG/WebP, or a 16-bit PNG for depth views)
    or ``{"view", "array"}`` (numbers, for vector views)."""
    view: str = Field(description="view name, e.g. 'L', 'ab', 'depth'")
    image: Optional[str] = Field(None, description="base64-encoded image bytes")
    array: Optional[list[Any]] = Field(None, description="a vector, for vector views")


class AddItem(BaseModel):
    key: str = Field(description="unique key of the item")
    metadata: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, Union[str, list[Any]]] = Field(
        description="by source ('rgb', 'depth': base64 image) or by vector view name (a list of numbers)")


# HTTP status per error kind
STATUS = {
    "bad_request": 400,
    "invalid_input": 400,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "no_index": 503,
    "unavailable": 503,
}


def error_body(error: str, detail: str, field: str | None = None) -> dict:
    return {"error": error, "detail": detail, "field": field}
