"""Cross-view search: a FAISS index per view with SQLite metadata (``store.py`` and the modules it names), no torch.

The store itself takes vectors and knows no model; the command lines over it (``build``, ``search``, ``evaluate``)
embed their inputs through ``models.runtime`` (onnxruntime). ``manifest.py`` alone reads and writes an index
directory's manifest."""
from index.factory import choose_factory
from index.store import IndexStore, StoreError

__all__ = ["IndexStore", "StoreError", "choose_factory"]
