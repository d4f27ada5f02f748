"""The view registry: a view is defined once, here, and every consumer reads it from this module or the card.

A view is a named modality with a *source* (what the server decodes: an RGB image, a depth map, or a
vector), the key its input has among a batch's sources (:func:`source_key`) and a *transform* (source batch ->
the tensor the view's encoder sees), all on its :class:`ViewSpec`. The spec names its transform as a recipe
(``("lab", 0)``: kind and arguments) that :func:`models.transforms.make_transform` builds as a torch module;
this module is torch-free so that the ONNX runtime, the index and the server can read view specs without
importing torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

SOURCES = ("rgb", "depth", "vector")

# Lab normalisation of the reference implementation (HobbitLong/CMC): maps L, a, b to about [-1, 1].
LAB_MEAN = (50.0, 6.025, -6.6895)
LAB_STD = (50.0, 92.208, 101.1675)
# Plain RGB view: CIFAR/ImageNet-like statistics.
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)


class ViewError(ValueError):
    """An unknown view, or a view that the data or the model does not provide."""


def source_key(name: str, spec: "ViewSpec | Mapping[str, Any]") -> str:
    """Which source a view reads: the key of its input among a batch's sources, in ``/index/add``'s ``inputs``
    and among an item's stored query inputs. Image views read their source ('rgb', 'depth'; L and ab share
    one image), a vector view its own vector, under its name. ``spec``: a ViewSpec or a view of the card or of
    ``/info`` (a mapping with ``source``)."""
    source = spec.source if isinstance(spec, ViewSpec) else spec["source"]
    return name if source == "vector" else source


@dataclass(frozen=True)
class ViewSpec:
    name: str
    source: str  # 'rgb' | 'depth' | 'vector': what the server decodes for this view
    channels: int  # channels the encoder sees (image views) or the vector's length (vector views)
    description: str = ""
    transform: tuple = ()  # (kind, *args): the recipe models.transforms.make_transform builds (not in the card)

    @property
    def is_image(self) -> bool:
        return self.source in ("rgb", "depth")

    @property
    def source_key(self) -> str:
        """The key of this view's input among a batch's sources (see :func:`source_key`)."""
        return source_key(self.name, self)

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
        """What the card and the checkpoint record of the view (the transform follows from name and source)."""
        return {"name": self.name, "source": self.source, "channels": self.channels, "description": self.description}


# The built-in views, one row each: name, source, channels, description, transform recipe (models/transforms.py).
BUILTIN: dict[str, ViewSpec] = {
    v.name: v
    for v in (
        ViewSpec("L", "rgb", 1, "CIE Lab lightness (D65), normalised to about [-1, 1]", ("lab", 0)),
        ViewSpec("ab", "rgb", 2, "CIE Lab chroma a, b (D65), normalised to about [-1, 1]", ("lab", 1, 2)),
        ViewSpec("Y", "rgb", 1, "YCbCr luma (ITU-R BT.601)", ("ycbcr", 0)),
        ViewSpec("CbCr", "rgb", 2, "YCbCr chroma (ITU-R BT.601)", ("ycbcr", 1, 2)),
        ViewSpec("rgb", "rgb", 3, "RGB, mean/std normalised", ("rgb_normalize",)),
        ViewSpec("depth", "depth", 1, "depth map, standardised per image", ("depth_standardize",)),
        ViewSpec("normals", "depth", 3, "surface normals derived from depth by finite differences", ("depth_normals",)),
    )
}
VECTOR_TRANSFORM = ("vector_standardize",)  # every vector view: per-feature standardisation fitted on its data

_VECTOR_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")


def get_view(name: str, vector_dims: dict[str, int] | None = None) -> ViewSpec:
    """The spec of a built-in view, or a vector view whose length the data gives (``vector_dims``)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if vector_dims and name in vector_dims:
        if not _VECTOR_NAME.match(name):
            raise ViewError(f"invalid vector view name {name!r} (letters, digits, '_' and '-')")
        return ViewSpec(name, "vector", int(vector_dims[name]), "numeric vector, standardised per feature",
                        VECTOR_TRANSFORM)
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


def spec_from_dict(d: Mapping[str, Any]) -> ViewSpec:
    """A view as the card or a checkpoint records it (:meth:`ViewSpec.to_dict`), with its transform recipe."""
    name, source = d["name"], d["source"]
    transform = VECTOR_TRANSFORM if source == "vector" else BUILTIN[name].transform if name in BUILTIN else ()
    return ViewSpec(name, source, int(d["channels"]), d.get("description", ""), transform)
