"""What callers hand an index store, checked before anything is read or written: vectors of a view, keys."""
from __future__ import annotations

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
