"""Torch-free image decoding, PNG encoding and THE resize rule shared by training, index and server.

Everything here is numpy + pillow only, so the server can import it without torch.
"""
from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

LOG = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
# No image larger than this (by its header) is decoded here, whatever max_pixels a caller passes. It is also
# Pillow's own MAX_IMAGE_PIXELS in this process, so that Pillow's checks (Image.open elsewhere, a plugin's
# load) never refuse or warn about an image that this module accepts, and error out on twice this size.
MAX_PIXELS = DEFAULT_MAX_PIXELS
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# What the server decodes (the README's promise): everything else is refused before any decoder runs.
SERVED_FORMATS = ("PNG", "JPEG", "WEBP")
# Local training files (models/data readers) may also be in these; never EPS (Ghostscript), JPEG 2000, DDS, ...
LOCAL_FORMATS = SERVED_FORMATS + ("BMP", "GIF", "TIFF", "PPM")

# magic bytes -> Pillow format name (the accepted ones and the common others, to name them in errors)
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "PNG"), (0, b"\xff\xd8\xff", "JPEG"), (8, b"WEBP", "WEBP"),
    (0, b"GIF87a", "GIF"), (0, b"GIF89a", "GIF"), (0, b"BM", "BMP"), (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"), (0, b"\x00\x00\x00\x0cjP  ", "JPEG2000"), (0, b"\xffO\xffQ", "JPEG2000"),
    (0, b"DDS ", "DDS"), (0, b"%!PS", "EPS"), (0, b"\xc5\xd0\xd3\xc6", "EPS"), (0, b"8BPS", "PSD"),
    (0, b"\x01\xda", "SGI"), (0, b"qoif", "QOI"), (0, b"%PDF", "PDF"), (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"icns", "ICNS"), (0, b"\x76\x2f\x31\x01", "OpenEXR"), (4, b"ftypavif", "AVIF"), (4, b"ftypheic", "HEIC"),
    (0, b"P1", "PPM"), (0, b"P2", "PPM"), (0, b"P3", "PPM"), (0, b"P4", "PPM"), (0, b"P5", "PPM"), (0, b"P6", "PPM"),
)


# every plugin registered now: _header looks readers up in Image.OPEN (at import, not from the decode threads)
Image.preinit()
if not all(f in Image.OPEN for f in LOCAL_FORMATS):
    Image.init()


class ImageError(ValueError):
    """Bytes that are not a usable image; the message names the problem."""


def sniff_format(data: bytes) -> str | None:
    """The image format that ``data`` starts with (a Pillow format name), or None if unknown."""
    head = bytes(data[:16])
    for off, magic, name in _MAGIC:
        if head[off:off + len(magic)] == magic and (name != "WEBP" or head[:4] == b"RIFF"):
            return name
    return None


def _names(formats: tuple[str, ...]) -> str:
    n = [{"WEBP": "WebP"}.get(f, f) for f in formats]
    return ", ".join(n[:-1]) + " or " + n[-1] if len(n) > 1 else n[0]


def _header(data: bytes, fmt: str) -> Image.Image:
    """Pillow's reader of ``fmt`` on ``data``, lazily: it reads the header (size, mode), no pixel data.

    The plugin is called directly rather than through ``Image.open``, whose own bomb check *warns* between
    ``Image.MAX_IMAGE_PIXELS`` and twice that: the caller checks the size itself, against its own limit, and no
    warning (nor any ``warnings`` filter, which is process-wide and not thread-safe) is involved."""
    factory, accept = Image.OPEN[fmt]
    prefix = bytes(data[:16])
    ok = accept(prefix) if accept else True
    if not ok or isinstance(ok, str):
        raise ImageError(f"cannot read {fmt} image ({len(data)} bytes): not a {fmt} header")
    try:
        return factory(io.BytesIO(bytes(data)), "")
    except Image.DecompressionBombError as e:  # a plugin's own check (a GIF frame beyond its screen...)
        raise ImageError(f"image too large (decompression bomb): {e}") from None
    except Exception as e:  # SyntaxError, OSError, struct.error...
        raise ImageError(f"cannot read {fmt} image ({len(data)} bytes): {e}") from None


def _open(data: bytes, max_pixels: int, formats: tuple[str, ...] | None = None,
          draft: int | None = None) -> Image.Image:
    """Open and fully decode an image of one of ``formats``, checking its size from the header first.

    The limit is ``min(max_pixels, MAX_PIXELS)`` on the size the header declares, for every format and before
    any pixel is decoded: a JPEG is not let off by draft mode (a progressive JPEG buffers its coefficients at
    full size however small it decodes). ``draft``: decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8)
    that keeps both sides >= draft pixels, which makes an accepted JPEG cheaper to decode."""
    formats = tuple(formats or LOCAL_FORMATS)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("empty image data")
    fmt = sniff_format(data)
    if fmt not in formats:
        what = f"image format {fmt}" if fmt else f"unrecognised image data ({len(data)} bytes)"
        raise ImageError(f"{what} is not accepted; send {_names(formats)}")
    im = _header(data, fmt)
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has empty size {w}x{h}")
    limit = min(int(max_pixels), MAX_PIXELS)
    if w * h > limit:
        raise ImageError(f"image too large: {w}x{h} = {w * h} pixels > max_pixels={limit}")
    if draft and fmt == "JPEG" and im.mode in ("RGB", "L", "CMYK", "YCbCr"):
        im.draft(im.mode, (draft, draft))
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large (decompression bomb): {e}") from None
    except Exception as e:  # truncated / corrupt stream
        raise ImageError(f"cannot decode {fmt} {w}x{h}: {e}") from None
    return im


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] | None = None,
                 draft: int | None = None) -> np.ndarray:
    """Decode an image of one of ``formats`` (default LOCAL_FORMATS) to uint8 (H, W, 3) RGB.

    Palette, grayscale, CMYK and alpha images are converted (alpha is dropped);
    16-bit grayscale is scaled down to 8 bits. Raises ImageError on bad bytes, another format or
    more than ``max_pixels`` pixels (checked from the header before decoding, on the original size;
    at most MAX_PIXELS). ``draft``: see _open.
    """
    im = _open(data, max_pixels, formats, draft)
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        g = np.asarray(im).astype(np.uint32)
        if mode == "I":
            g = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        g8 = ((g + 128) // 257).astype(np.uint8)
        return np.repeat(g8[:, :, None], 3, axis=2)
    if mode == "F":
        g = np.asarray(im, dtype=np.float32)
        hi = float(g.max()) if g.size else 1.0
        g8 = np.clip(g / (hi if hi > 255 else 255.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g8[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.uint8)
    return np.ascontiguousarray(arr)


def decode_depth(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: tuple[str, ...] | None = None) -> np.ndarray:
    """Decode a depth map to uint16 (H, W).

    16-bit PNG ('I;16*' or 'I' modes) is taken as is (values clipped to 0..65535);
    8-bit grayscale is scaled by 257 so 255 -> 65535. Anything else raises ImageError.
    """
    im = _open(data, max_pixels, formats)
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(f"depth values out of 16-bit range [{a.min()}, {a.max()}]")
        return a.astype(np.uint16)
    if mode == "L":
        return np.asarray(im).astype(np.uint16) * np.uint16(257)
    raise ImageError(f"depth must be a 16-bit or 8-bit grayscale image, got mode {mode!r}")


def _resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """Shape after scaling so the shorter side is ``size``."""
    if h <= w:
        return size, max(size, int(round(w * size / h)))
    return max(size, int(round(h * size / w))), size


def _resize_channel_f(ch: np.ndarray, nh: int, nw: int) -> np.ndarray:
    return np.asarray(Image.fromarray(ch.astype(np.float32)).resize((nw, nh), Image.BILINEAR))


def _check_fit_args(img: np.ndarray, size: int) -> None:
    if img.ndim not in (2, 3):
        raise ValueError(f"fit_image expects (H, W) or (H, W, C), got shape {img.shape}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")


def scale_shorter(img: np.ndarray, size: int) -> np.ndarray:
    """The first step of THE resize rule: scale (PIL bilinear) so the shorter side == ``size``, aspect kept,
    nothing cropped. ``fit_image(scale_shorter(a, s), s)`` equals ``fit_image(a, s)`` exactly (its own scaling
    step is then the identity), so this is the smallest array that keeps both the model's input and the whole
    picture. Same dtypes as fit_image; an array whose shorter side is already ``size`` is returned unchanged."""
    _check_fit_args(img, size)
    h, w = img.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"cannot resize empty image of shape {img.shape}")
    nh, nw = _resized_shape(h, w, size)
    if (nh, nw) == (h, w):
        return img
    if img.dtype == np.uint8 and (img.ndim == 2 or img.shape[2] in (1, 3, 4)):
        src = img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img
        out = np.asarray(Image.fromarray(np.ascontiguousarray(src)).resize((nw, nh), Image.BILINEAR))
        if img.ndim == 3 and img.shape[2] == 1:
            out = out[:, :, None]
        return out
    chans = [img] if img.ndim == 2 else [img[:, :, c] for c in range(img.shape[2])]
    res = [_resize_channel_f(c, nh, nw) for c in chans]
    out_f = res[0] if img.ndim == 2 else np.stack(res, axis=2)
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        return np.clip(np.rint(out_f), info.min, info.max).astype(img.dtype)
    return out_f.astype(img.dtype)


def fit_image(img: np.ndarray, size: int) -> np.ndarray:
    """THE resize rule: scale so the shorter side == ``size`` (PIL bilinear), then center-crop size x size.

    uint8 (H, W, 3) or (H, W) is resized in PIL's 8-bit modes; uint16 (depth) and float
    arrays are resized per channel in PIL's 'F' mode and rounded/clipped back to their dtype.
    Returns the same dtype. An input already size x size is returned unchanged.
    """
    _check_fit_args(img, size)
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    out = scale_shorter(img, size)
    nh, nw = out.shape[:2]
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(out[top:top + size, left:left + size])


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB, uint8 (H, W) gray or uint16 (H, W) (16-bit PNG) -> PNG bytes."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        im = Image.fromarray(arr)
    elif arr.dtype == np.uint16 and arr.ndim == 2:
        im = Image.fromarray(arr)  # mode 'I;16' -> 16-bit grayscale PNG
    else:
        raise ValueError(f"encode_png expects uint8 (H,W[,3]) or uint16 (H,W), got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()

