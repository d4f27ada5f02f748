"""What the load test sends, derived from the served model's ``/info``: no view or source is assumed.

Every view of the model gets a pool of inputs of its own kind: generated RGB PNGs for rgb-source views, 16-bit
PNG depth maps for depth-source views, arrays of the card's length for vector views. Items are aligned across
sources (item i has one RGB image, one depth map and one array per vector view), so a pair or an add uses one
item in several views. Adds carry exactly the sources that the index's views take (``index.views`` in /info).
Pure numpy, no locust: the locustfile and the tests import it.
"""
from __future__ import annotations

import base64
import random

import numpy as np

from models.data.synth import synth_depth, synth_rgb  # noqa: F401 - the load test's images, re-exported
from models.imageio import encode_png
from models.views import source_key


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Plan:
    """Inputs and request bodies for the model that a server describes in ``info`` (its /info answer)."""

    def __init__(self, info: dict, n: int = 32, seed: int = 0):
        self.dim = int(info["dim"])
        self.fingerprint = info.get("fingerprint")
        self.views: dict[str, dict] = dict(info["views"])
        if not self.views:
            raise ValueError("/info lists no views")
        size = int(info.get("image_size") or 32)
        h, w = size, size + size // 4  # not square: the server's resize and centre crop do work
        rng = np.random.default_rng(seed)
        self.n = n
        self.pool: dict[str, list] = {}  # source key ('rgb', 'depth' or a vector view's name) -> n inputs
        for name, spec in self.views.items():
            key = self.source_key(name)
            if key in self.pool:
                continue
            if spec["source"] == "rgb":
                self.pool[key] = [b64(encode_png(synth_rgb(rng, h, w))) for _ in range(n)]
            elif spec["source"] == "depth":
                self.pool[key] = [b64(encode_png(synth_depth(rng, h, w))) for _ in range(n)]
            elif spec["source"] == "vector":
                length = int(spec["channels"])
                self.pool[key] = [np.round(rng.standard_normal(length), 4).tolist() for _ in range(n)]
            else:
                raise ValueError(f"view {name!r} has an unknown source {spec['source']!r}")
        index = info.get("index") or {}
        self.index_views = [v for v in (index.get("views") or {}) if v in self.views] if index.get("available") else []
        self.index_counts = {v: int((index.get("counts") or {}).get(v, 0)) for v in self.index_views}
        self.can_add = bool(self.index_views) and not index.get("readonly")
        self.add_sources = sorted({self.source_key(v) for v in self.index_views})

    def source_key(self, view: str) -> str:
        """The key of a view's input in /index/add's ``inputs`` (models.views.source_key)."""
        return source_key(view, self.views[view])

    def is_vector(self, view: str) -> bool:
        return self.views[view]["source"] == "vector"

    def value(self, view: str, i: int):
        return self.pool[self.source_key(view)][i % self.n]

    def one(self, view: str, i: int) -> dict:
        """An input of /similarity and /search: ``{"view", "image"}`` or ``{"view", "array"}``."""
        return {"view": view, ("array" if self.is_vector(view) else "image"): self.value(view, i)}

    def embed_body(self, view: str, items: list[int]) -> dict:
        return {"view": view, ("arrays" if self.is_vector(view) else "images"): [self.value(view, i) for i in items]}

    def add_inputs(self, i: int) -> dict:
        """/index/add ``inputs`` of item i: one value per source the index's views take."""
        return {key: self.pool[key][i % self.n] for key in self.add_sources}

    def pick_view(self, rnd: random.Random = random) -> str:  # type: ignore[assignment]
        return rnd.choice(list(self.views))

    def pick_pair(self, rnd: random.Random = random) -> tuple[str, str]:  # type: ignore[assignment]
        """Two different views when the model has several (a cross-view pair), else one view twice."""
        names = list(self.views)
        return tuple(rnd.sample(names, 2)) if len(names) > 1 else (names[0], names[0])  # type: ignore[return-value]

    def describe(self) -> str:
        views = ", ".join(f"{v} ({s['source']}" + (f"[{s['channels']}])" if s["source"] == "vector" else ")")
                          for v, s in self.views.items())
        index = (f"index views {', '.join(self.index_views)}; adds send {', '.join(self.add_sources)}"
                 if self.index_views else "no index: /search and /index/add skipped")
        return f"views {views}; {index}"
