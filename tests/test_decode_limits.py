"""Issue 18 item 6: what ``models.runtime.to_source`` keeps of each decoded image for ``/index/add``.

The server used to keep every full-size decode of a request (up to 64 x max_pixels x 3 bytes) until the
thumbnails were written. Now each decode is reduced at once to at most ``keep_pixels(S)`` pixels, and
the model's input made from it is identical (fit_image of the kept array is what was embedded), and so are
the thumbnails ``index.thumbs.item_rows`` makes when the image is small enough to be kept as decoded.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from index.thumbs import THUMB_PX, item_rows
from models.imageio import SERVED_FORMATS, decode_depth, decode_image, encode_png, fit_image
from models.runtime import to_source

S = 32
RGB_VIEWS = {"L": "rgb", "ab": "rgb"}
DEPTH_VIEWS = {"depth": "depth", "normals": "depth"}


def _rgb(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(h * 7919 + w).integers(0, 40, (h, w, 3))
    return (np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=2)
            * 0.85 + noise).astype(np.uint8)


def _depth(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(h * 104729 + w).integers(0, 2000, (h, w))
    return (xx * 40000 // max(w - 1, 1) + yy * 20000 // max(h - 1, 1) + noise).astype(np.uint16)


def _jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _decode_full(src: str, data: bytes) -> np.ndarray:
    """What the server decoded and used to keep: the same decode to_source makes (draft included)."""
    if src == "rgb":
        return decode_image(data, 1 << 24, SERVED_FORMATS, draft=S)
    return decode_depth(data, 1 << 24, SERVED_FORMATS)


def _rows(src: str, a: np.ndarray) -> dict[str, tuple]:
    views = RGB_VIEWS if src == "rgb" else DEPTH_VIEWS
    return {r[1]: r for r in item_rows("k", {src: a}, views)}


def test_a_1024px_image_for_a_32px_model_keeps_32px():
    """The issue's case: a 1024x1024 input (PNG, 16-bit depth PNG) to a 32 px model keeps a 32x32 array that
    owns its memory (nothing refers to the full decode), and the batch embedded is unchanged. A JPEG decodes
    in draft mode at 1/8 (128x128), small enough to be kept as decoded."""
    rgb, depth = _rgb(1024, 1024), _depth(1024, 1024)
    for src, data, shape in (("rgb", encode_png(rgb), (S, S, 3)), ("depth", encode_png(depth), (S, S)),
                             ("rgb", _jpeg(rgb), (128, 128, 3))):
        full = _decode_full(src, data)
        decoded: list = []
        x = to_source({"name": "v", "source": src}, [data, data], S, 1 << 24, decoded)
        assert len(decoded) == 2
        for k in decoded:
            assert k.shape == shape and k.dtype == full.dtype and k.base is None
        want = fit_image(full, S)
        want = want.transpose(2, 0, 1) / np.float32(255.0) if src == "rgb" else want[None] / np.float32(65535.0)
        np.testing.assert_array_equal(x[0], want)
        np.testing.assert_array_equal(fit_image(decoded[0], S), fit_image(full, S))  # the model's input


# (h, w): larger than the model (square, landscape, portrait, a strip too long to keep whole), the model's size,
# smaller (upscaled), and a small picture larger than the model (kept as decoded: its thumbnail is 96 px)
SHAPES = [(1024, 1024), (768, 1024), (1024, 600), (40, 5000), (S, S), (20, 30), (200, 120)]


@pytest.mark.parametrize("src", ["rgb", "depth"])
@pytest.mark.parametrize("h,w", SHAPES)
@pytest.mark.parametrize("as_bytes", [True, False])
def test_kept_array_is_bounded_and_gives_the_same_rows(src, h, w, as_bytes):
    """The kept array gives the model the same input as the full decode (fit_image), for rgb and 16-bit depth,
    larger and smaller than the model, and item_rows the same kinds; every row is identical when the image is small
    enough to be kept as decoded. A larger image keeps the whole picture with its shorter side S (its thumbnail
    shows all of it, at the aspect of the original), or, for a long strip, the model's input itself."""
    from models.runtime import keep_pixels
    full = _rgb(h, w) if src == "rgb" else _depth(h, w)
    decoded: list = []
    to_source({"name": "v", "source": src}, [encode_png(full) if as_bytes else full], S, 1 << 24, decoded)
    (k,) = decoded
    assert k.base is None and k.dtype == full.dtype and k.ndim == full.ndim
    assert k.shape[0] * k.shape[1] <= keep_pixels(S)
    if h * w <= keep_pixels(S):
        np.testing.assert_array_equal(k, full)
    elif S * max(h, w) // min(h, w) * S <= keep_pixels(S):
        assert min(k.shape[:2]) == S and abs(k.shape[0] / k.shape[1] - h / w) < 0.05
    else:
        assert k.shape[:2] == (S, S)
    got, want = _rows(src, k), _rows(src, full)
    assert sorted(got) == sorted(want)
    np.testing.assert_array_equal(fit_image(k, S), fit_image(full, S))  # what was embedded
    if h * w <= keep_pixels(S):
        assert got == want
    for kind, row in got.items():
        assert max(Image.open(io.BytesIO(row[3])).size) <= THUMB_PX


def test_keep_bound():
    from models.runtime import keep_pixels
    assert keep_pixels(32) == 256 * 256 and keep_pixels(224) == 4 * 224 * 224
