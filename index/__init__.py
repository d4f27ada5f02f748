"""FAISS-per-view vector index with SQLite metadata (no torch, no model code)."""
from index.factory import choose_factory
from index.store import IndexStore, StoreError

__all__ = ["IndexStore", "StoreError", "choose_factory"]
