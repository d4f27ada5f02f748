"""What callers hand an index store, checked before anything is read or written: vectors of a view, keys."""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from index.errors import DuplicateKeyError, StoreError


def check_vectors(x: Any, view: str, views: Mapping[str, Any], n: int | None) -> np.ndarray:
    """``x`` as contiguous float32 (n, dim) vectors of ``view`` (``views``: name -> an object with ``dim``); a
    single vector becomes one row when ``n`` is None (a query); ``n``: the number of keys they go with."""
    if view not in views:
        raise StoreError(f"unknown view {view!r}; this index has views {sorted(views)}")
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise StoreError(f"view {view!r}: vectors must be float32 or float64, got {x.dtype}")
    if x.ndim == 1 and n is None:
        x = x[None, :]
    dim = views[view].dim
    if x.ndim != 2 or x.shape[1] != dim:
        raise StoreError(f"view {view!r}: expected shape (n, {dim}), got {x.shape}")
    if n is not None and x.shape[0] != n:
        raise StoreError(f"view {view!r}: {x.shape[0]} vectors for {n} keys")
    if not np.isfinite(x).all():
        raise StoreError(f"view {view!r}: vectors contain NaN or inf")
    return np.ascontiguousarray(x, dtype=np.float32)


def check_keys(keys: Any) -> list[str]:
    """A list of distinct, non-empty, valid UTF-8 strings."""
    if isinstance(keys, str) or not all(isinstance(k, str) and k for k in keys):
        raise StoreError("keys must be a list of non-empty strings")
    keys = list(keys)
    for k in keys:
        try:
            k.encode("utf-8")
        except UnicodeEncodeError:
            raise StoreError(f"key {k!r} is not valid UTF-8 text (a lone surrogate)") from None
    if len(set(keys)) != len(keys):
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise DuplicateKeyError(f"duplicate key {dup!r} in the request")
    return keys


def check_add(keys: Any, vectors: Any, metadata: list[dict] | None, views: Mapping[str, Any]
              ) -> tuple[list[str], dict[str, np.ndarray], list[dict], list[str]]:
    """An add's arguments, checked for any backend: (keys, {view: (N, D) float32}, metadata, metadata as JSON)."""
    keys = check_keys(keys)
    n = len(keys)
    if not vectors:
        raise StoreError("vectors must give at least one view")
    xs = {view: check_vectors(x, view, views, n) for view, x in vectors.items()}
    metadata = metadata if metadata is not None else [{} for _ in keys]
    if len(metadata) != n:
        raise StoreError(f"{len(metadata)} metadata entries for {n} keys")
    try:
        meta_json = [json.dumps(m, allow_nan=False) for m in metadata]
    except (TypeError, ValueError) as e:
        raise StoreError(f"metadata must be JSON-serializable: {e}") from e
    return keys, xs, metadata, meta_json
