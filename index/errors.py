"""Typed errors of the index store (serving maps them to HTTP statuses)."""
from __future__ import annotations


class StoreError(ValueError):
    """A request or an index directory is invalid; the message names the problem."""


class DuplicateKeyError(StoreError):
    """An added key is already stored, or repeats within the request."""


class UnknownKeyError(StoreError):
    """A key to remove is not stored."""


class NotWritableError(StoreError):
    """The store is open read-only, closed, or cannot take writes right now (served as 503)."""


class WriteFailed(NotWritableError):
    """A write was not committed (rolled back): nothing changed, and it may be retried."""
