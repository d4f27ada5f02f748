"""Input limits of the CMC server: keys, metadata, decoded pixels and the size of search answers.

Each check raises :class:`serving.errors.ApiError` naming the offending field (400, or 413 for a size limit).
"""
from __future__ import annotations

import json
import unicodedata
from typing import Any

from .errors import ApiError
from .schemas import KEY_MAX_CHARS
METADATA_MAX_DEPTH = 8
# a search answer's metadata, all hits together (the rest of a hit is a few dozen bytes)
RESPONSE_METADATA_BYTES = 8 << 20


def decode_pixels(cap: int, image_size: int) -> int:
    """Pixels an input image may have, checked on its header before any decoding (models/imageio.py): the cap
    (CMC_MAX_PIXELS). Decoded images are reduced to the model's input at once (models/runtime.to_source), so a
    request holds at most one full-size decode per decode thread."""
    return max(1, int(cap))


def _bad_char(s: str, controls: bool = True) -> str | None:
    """The first lone surrogate (or, with ``controls``, control character) of s, else None."""
    for ch in s:
        cat = unicodedata.category(ch)
        if cat == "Cs" or (controls and cat == "Cc"):
            return ch
    return None


def check_key(key: Any, field: str) -> str:
    """A key: a string of 1..256 characters, none of them a control character or a lone surrogate."""
    if not isinstance(key, str) or not key:
        raise ApiError("invalid_input", f"{field} must be a non-empty string", field)
    if len(key) > KEY_MAX_CHARS:
        raise ApiError("too_large", f"{field} has {len(key)} characters; the limit is {KEY_MAX_CHARS}", field)
    bad = _bad_char(key)
    if bad is not None:
        raise ApiError("invalid_input", f"{field} contains the character U+{ord(bad):04X}; keys are printable text",
                       field)
    return key


def check_keys(keys: Any, field: str = "keys") -> list[str]:
    """A list of valid, distinct keys (a duplicate is a 400 naming its position)."""
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        check_key(k, f"{field}[{i}]")
        if k in seen:
            raise ApiError("invalid_input", f"duplicate key {k!r} at {field}[{seen[k]}] and {field}[{i}]", field)
        seen[k] = i
    return list(keys)


def _walk(x: Any, field: str, depth: int) -> None:
    if depth > METADATA_MAX_DEPTH:
        raise ApiError("invalid_input", f"{field} is nested deeper than {METADATA_MAX_DEPTH} levels", field)
    if isinstance(x, dict):
        for k, v in x.items():
            if not isinstance(k, str) or _bad_char(k, controls=False) is not None:
                raise ApiError("invalid_input", f"{field} has a key with a lone surrogate", field)
            _walk(v, field, depth + 1)
    elif isinstance(x, list):
        for v in x:
            _walk(v, field, depth + 1)
    elif isinstance(x, str):
        if _bad_char(x, controls=False) is not None:
            raise ApiError("invalid_input", f"{field} has a string with a lone surrogate", field)
    elif isinstance(x, float):
        if x != x or x in (float("inf"), float("-inf")):
            raise ApiError("invalid_input", f"{field} has a NaN or infinite number", field)
    elif x is not None and not isinstance(x, (bool, int)):
        raise ApiError("invalid_input", f"{field} has a value of type {type(x).__name__}", field)


def check_metadata(meta: Any, field: str, max_bytes: int) -> tuple[dict, int]:
    """Metadata: a JSON object at most METADATA_MAX_DEPTH deep and ``max_bytes`` serialized (413 beyond).
    Returns it and its serialized size."""
    if meta is None:
        return {}, 2
    if not isinstance(meta, dict):
        raise ApiError("invalid_input", f"{field} must be a JSON object", field)
    _walk(meta, field, 1)
    try:
        n = len(json.dumps(meta, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except (ValueError, TypeError, RecursionError, OverflowError) as e:
        raise ApiError("invalid_input", f"{field} is not serializable: {e}", field) from None
    if n > max_bytes:
        raise ApiError("too_large", f"{field} is {n} bytes serialized; the limit is {max_bytes} "
                                    "(CMC_MAX_METADATA_BYTES)", field)
    return meta, n


def trim_hits(hits: list[dict], include_metadata: bool, budget: int = RESPONSE_METADATA_BYTES) -> list[dict]:
    """Search hits as answered: without metadata if not asked for; 413 if their metadata exceeds the budget."""
    if not include_metadata:
        return [{k: v for k, v in h.items() if k != "metadata"} for h in hits]
    total = sum(len(json.dumps(h.get("metadata") or {}, ensure_ascii=False)) for h in hits)
    if total > budget:
        raise ApiError("too_large", f"the {len(hits)} hits carry {total} bytes of metadata, over the answer "
                                    f"limit of {budget}; ask for fewer (k) or set include_metadata=false", "k")
    return hits
