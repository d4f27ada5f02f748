import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from models.imageio import ImageError, decode_depth, decode_image, encode_png, fit_image


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_png_round_trip_exact():
    a = _rgb()
    b = decode_image(encode_png(a))
    assert b.dtype == np.uint8 and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_depth_round_trip_exact_16bit():
    d = np.random.default_rng(1).integers(0, 65536, (17, 23), dtype=np.uint16)
    out = decode_depth(encode_png(d))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, d)


def test_depth_from_8bit_scaled():
    g = np.array([[0, 1, 255]], np.uint8)
    np.testing.assert_array_equal(decode_depth(encode_png(g)), [[0, 257, 65535]])


def test_depth_rejects_rgb():
    with pytest.raises(ImageError, match="mode"):
        decode_depth(encode_png(_rgb()))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA"])
def test_modes_converted_to_rgb(mode):
    im = Image.fromarray(_rgb(8, 9)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.shape == (8, 9, 3) and out.dtype == np.uint8


def test_jpeg_decodes():
    buf = io.BytesIO()
    Image.fromarray(_rgb(16, 12)).save(buf, format="JPEG")
    assert decode_image(buf.getvalue()).shape == (16, 12, 3)


def test_truncated_png_raises():
    data = encode_png(_rgb(64, 64))
    with pytest.raises(ImageError):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("data", [b"", b"not an image at all", bytes(range(256)) * 4])
def test_garbage_raises(data):
    with pytest.raises(ImageError):
        decode_image(data)


def test_header_bomb_rejected_without_decoding():
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 100)) + _chunk(b"IEND", b"")
    with pytest.raises(ImageError, match="too large"):
        decode_image(data)
    with pytest.raises(ImageError, match="too large"):
        decode_depth(data)


def test_max_pixels_argument():
    with pytest.raises(ImageError, match="too large"):
        decode_image(encode_png(_rgb(10, 10)), max_pixels=99)
    assert decode_image(encode_png(_rgb(10, 10)), max_pixels=100).shape == (10, 10, 3)


@pytest.mark.parametrize("shape", [(40, 100, 3), (100, 40, 3), (64, 64, 3), (7, 5, 3)])
def test_fit_image_shapes(shape):
    out = fit_image(_rgb(*shape[:2]), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_fit_image_unchanged_when_already_square():
    a = _rgb(32, 32)
    np.testing.assert_array_equal(fit_image(a, 32), a)


def test_fit_image_center_crop_takes_middle():
    # landscape: 32 x 96 with a distinct middle third; shorter side already 32, so only a crop
    a = np.zeros((32, 96, 3), np.uint8)
    a[:, 32:64] = 200
    np.testing.assert_array_equal(fit_image(a, 32), np.full((32, 32, 3), 200, np.uint8))
    # portrait
    p = np.zeros((96, 32, 3), np.uint8)
    p[32:64] = 100
    np.testing.assert_array_equal(fit_image(p, 32), np.full((32, 32, 3), 100, np.uint8))


def test_fit_image_depth_keeps_dtype_and_range():
    d = np.full((50, 80), 40000, np.uint16)
    out = fit_image(d, 20)
    assert out.shape == (20, 20) and out.dtype == np.uint16
    assert (out == 40000).all()
    ramp = np.tile(np.linspace(0, 65535, 100).astype(np.uint16), (100, 1))
    r = fit_image(ramp, 10)
    assert r.dtype == np.uint16 and r.min() < 8000 and r.max() > 57000


# ---------------------------------------------------------------------------------------------- hostile input (issue 9)
def _saved(fmt: str, arr: np.ndarray | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb(24, 24) if arr is None else arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,named", [("BMP", "BMP"), ("GIF", "GIF"), ("TIFF", "TIFF"), ("SGI", "SGI"),
                                       ("DDS", "DDS"), ("EPS", "EPS"), ("ICO", "ICO"), ("PPM", "PPM"),
                                       ("TGA", "unrecognised"), ("PCX", "unrecognised"), ("JPEG2000", "JPEG2000")])
def test_served_formats_refuse_every_other_format_by_name(fmt, named):
    """Item 7: only PNG, JPEG and WebP are decoded for the server; the refusal names the format."""
    from PIL import features

    from models.imageio import SERVED_FORMATS, sniff_format
    if fmt == "JPEG2000" and not features.check("jpg_2000"):
        data = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64)
    else:
        data = _saved(fmt)
    assert sniff_format(data) == (None if named == "unrecognised" else named)
    with pytest.raises(ImageError, match=f"{named}.*not accepted; send PNG, JPEG or WebP"):
        decode_image(data, formats=SERVED_FORMATS)
    with pytest.raises(ImageError, match="not accepted"):
        decode_depth(data, formats=SERVED_FORMATS)


def test_served_formats_decode_png_jpeg_webp_and_16bit_depth():
    from models.imageio import SERVED_FORMATS
    yy, xx = np.mgrid[0:24, 0:24]
    a = np.stack([xx * 10, yy * 10, (xx + yy) * 5], axis=2).astype(np.uint8)  # smooth: JPEG keeps it close
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True})):
        out = decode_image(_saved(fmt, a, **kw), formats=SERVED_FORMATS)
        assert out.shape == (24, 24, 3)
        assert np.abs(out.astype(int) - a).mean() < (4 if fmt == "JPEG" else 1e-9), fmt
    d = np.random.default_rng(1).integers(0, 65536, (9, 11), dtype=np.uint16)
    np.testing.assert_array_equal(decode_depth(encode_png(d), formats=SERVED_FORMATS), d)


def test_jpeg_draft_decodes_near_the_model_size_within_the_pixel_limit():
    """Item 8: a 2048x1536 JPEG (3.1 Mpx) for a 32 px model decodes at 1/8 scale (256x192), under a 1 Mpx limit
    that refuses the full decode; the drafted image fits to nearly the same model input."""
    yy, xx = np.mgrid[0:1536, 0:2048]
    big = np.stack([(xx // 8) % 256, (yy // 6) % 256, ((xx + yy) // 16) % 256], axis=2).astype(np.uint8)
    data = _saved("JPEG", big, quality=90)
    with pytest.raises(ImageError, match="too large"):
        decode_image(data, max_pixels=1 << 20)
    small = decode_image(data, max_pixels=1 << 20, draft=32)
    assert small.shape == (192, 256, 3)
    full = decode_image(data)
    diff = np.abs(fit_image(small, 32).astype(int) - fit_image(full, 32).astype(int))
    assert diff.mean() < 6, diff.mean()
    # a PNG has no draft mode: the same pixel count is refused before decoding
    with pytest.raises(ImageError, match="2048x1536 = 3145728 pixels > max_pixels=1048576"):
        decode_image(encode_png(big), max_pixels=1 << 20, draft=32)
