"""The view registry: a view is defined once, here, and every consumer reads it from this module or the card.

A view is a named modality with a *source* (what the server decodes: an RGB image, a depth map, or a
vector) and a *transform* (source batch -> the tensor the view's encoder sees). The transforms are torch
modules in :mod:`models.transforms`; this module is torch-free so that the ONNX runtime, the index and the
server can read view specs without importing torch.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

SOURCES = ("rgb", "depth", "vector")

# Lab normalisation of the reference implementation (HobbitLong/CMC): maps L, a, b to about [-1, 1].
LAB_MEAN = (50.0, 6.025, -6.6895)
LAB_STD = (50.0, 92.208, 101.1675)
# Plain RGB view: CIFAR/ImageNet-like statistics.
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)


class ViewError(ValueError):
    """An unknown view, or a view that the data or the model does not provide."""


@dataclass(frozen=True)
class ViewSpec:
    name: str
    source: str  # 'rgb' | 'depth' | 'vector': what the server decodes for this view
    channels: int  # channels the encoder sees (image views) or the vector's length (vector views)
    description: str = ""

    @property
    def is_image(self) -> bool:
        return self.source in ("rgb", "depth")

    @property
    def source_channels(self) -> int:
        return {"rgb": 3, "depth": 1}.get(self.source, self.channels)

    def input_spec(self, image_size: int | None = None) -> dict:
        """What the exported ONNX graph takes: shape (None = dynamic batch), dtype, value range, resize rule."""
        if self.is_image:
            if image_size is None:
                raise ViewError(f"view {self.name!r} is an image view and needs an image size")
            return {
                "source": self.source,
                "shape": [None, self.source_channels, image_size, image_size],
                "dtype": "float32",
                "range": [0.0, 1.0],
                "layout": "NCHW",
                "decode": "RGB uint8 / 255" if self.source == "rgb" else "16-bit PNG / 65535 (0 near, 1 far)",
                "resize": f"shorter side to {image_size} (bilinear), then center crop {image_size}x{image_size}",
            }
        return {"source": "vector", "shape": [None, self.channels], "dtype": "float32", "range": None,
                "resize": None, "decode": "JSON list of numbers, standardised inside the graph"}

    def to_dict(self) -> dict:
        return asdict(self)


BUILTIN: dict[str, ViewSpec] = {
    v.name: v
    for v in (
        ViewSpec("L", "rgb", 1, "CIE Lab lightness (D65), normalised to about [-1, 1]"),
        ViewSpec("ab", "rgb", 2, "CIE Lab chroma a, b (D65), normalised to about [-1, 1]"),
        ViewSpec("Y", "rgb", 1, "YCbCr luma (ITU-R BT.601)"),
        ViewSpec("CbCr", "rgb", 2, "YCbCr chroma (ITU-R BT.601)"),
        ViewSpec("rgb", "rgb", 3, "RGB, mean/std normalised"),
        ViewSpec("depth", "depth", 1, "depth map, standardised per image"),
        ViewSpec("normals", "depth", 3, "surface normals derived from depth by finite differences"),
    )
}

_VECTOR_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")


def get_view(name: str, vector_dims: dict[str, int] | None = None) -> ViewSpec:
    """The spec of a built-in view, or a vector view whose length the data gives (``vector_dims``)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if vector_dims and name in vector_dims:
        if not _VECTOR_NAME.match(name):
            raise ViewError(f"invalid vector view name {name!r} (letters, digits, '_' and '-')")
        return ViewSpec(name, "vector", int(vector_dims[name]), "numeric vector, standardised per feature")
    known = sorted(BUILTIN) + sorted(vector_dims or {})
    raise ViewError(f"unknown view {name!r}; known views: {', '.join(known)}")


def parse_views(text: str | list[str], vector_dims: dict[str, int] | None = None) -> list[ViewSpec]:
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if len(names) < 2:
        raise ViewError(f"CMC needs at least two views, got {names!r}")
    if len(set(names)) != len(names):
        raise ViewError(f"views repeat: {names!r}")
    return [get_view(n, vector_dims) for n in names]


def spec_from_dict(d: dict) -> ViewSpec:
    return ViewSpec(d["name"], d["source"], int(d["channels"]), d.get("description", ""))
