import io
import struct
import time
import warnings
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


def test_jpeg_draft_decodes_near_the_model_size_and_the_limit_holds_on_the_original_size():
    """Item 8, as amended by issue 18 item 4: a 2048x1536 JPEG (3.1 Mpx) for a 32 px model decodes at 1/8 scale
    (256x192) when the limit admits its *original* size, and fits to nearly the same model input; under a 1 Mpx
    limit it is refused from its header, draft or not, as a PNG of that size is."""
    yy, xx = np.mgrid[0:1536, 0:2048]
    big = np.stack([(xx // 8) % 256, (yy // 6) % 256, ((xx + yy) // 16) % 256], axis=2).astype(np.uint8)
    data = _saved("JPEG", big, quality=90)
    for draft in (None, 32):
        with pytest.raises(ImageError, match="2048x1536 = 3145728 pixels > max_pixels=1048576"):
            decode_image(data, max_pixels=1 << 20, draft=draft)
    small = decode_image(data, max_pixels=4 << 20, draft=32)
    assert small.shape == (192, 256, 3)
    full = decode_image(data)
    diff = np.abs(fit_image(small, 32).astype(int) - fit_image(full, 32).astype(int))
    assert diff.mean() < 6, diff.mean()
    with pytest.raises(ImageError, match="2048x1536 = 3145728 pixels > max_pixels=1048576"):
        decode_image(encode_png(big), max_pixels=1 << 20, draft=32)


# ---------------------------------------------------------------------------------------------- issue 18, item 4
@pytest.fixture(scope="module")
def progressive_8000() -> bytes:
    """A progressive 8000x8000 JPEG: 64 Mpx that compress to a few hundred KB (the issue's was 0.72 MiB)."""
    buf = io.BytesIO()
    Image.new("RGB", (8000, 8000), (90, 120, 200)).save(buf, format="JPEG", progressive=True, quality=75)
    return buf.getvalue()


@pytest.fixture
def no_decoding(monkeypatch):
    """Records every pixel decode (ImageFile.load, a decoder made) instead of letting it happen silently."""
    from PIL import ImageFile
    calls: list[str] = []
    load, getdecoder = ImageFile.ImageFile.load, Image._getdecoder

    def spy_load(self, *a, **kw):
        calls.append(f"load {self.format} {self.size}")
        return load(self, *a, **kw)

    def spy_decoder(*a, **kw):
        calls.append(f"decoder {a[1] if len(a) > 1 else a}")
        return getdecoder(*a, **kw)
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    monkeypatch.setattr(Image, "_getdecoder", spy_decoder)
    return calls


def test_progressive_8000px_jpeg_refused_from_its_header_without_decoding(progressive_8000, no_decoding):
    """Issue 18 item 4: the pixel limit holds for JPEG. The server's limit for a 64 px model is 1 Mpx and it
    decodes JPEGs in draft mode at 64 px: 8000x8000 drafts to 1000x1000 (under 1 Mpx), which used to let the
    original through (a progressive JPEG buffers all its coefficients: +370 MiB RSS for one decode). The header
    size is what is checked, before any decoding, quickly."""
    from models.imageio import SERVED_FORMATS
    assert len(progressive_8000) < 1 << 20
    for draft in (64, None):
        t0 = time.perf_counter()
        with pytest.raises(ImageError, match=r"image too large: 8000x8000 = 64000000 pixels > max_pixels=1048576"):
            decode_image(progressive_8000, max_pixels=1 << 20, formats=SERVED_FORMATS, draft=draft)
        assert time.perf_counter() - t0 < 0.5
    assert no_decoding == []
    # beyond the module's own ceiling (and Pillow's, which is set to it) whatever max_pixels says
    from models.imageio import MAX_PIXELS
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS < 64_000_000
    with pytest.raises(ImageError, match=f"8000x8000 = 64000000 pixels > max_pixels={MAX_PIXELS}"):
        decode_image(progressive_8000, max_pixels=10 ** 9, draft=64)
    assert no_decoding == []


def _png_header(w: int, h: int, bit_depth: int = 8, color: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color, 0, 0, 0)
    idat = _chunk(b"IDAT", zlib.compress(b"\0" * 100))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + idat + _chunk(b"IEND", b"")


@pytest.mark.parametrize("w,h", [(4000, 4000), (10000, 10000), (60000, 60000), (1, 2 ** 31 - 1)])
def test_png_header_claiming_huge_size_refused_naming_it_without_decoding(w, h, no_decoding):
    """Likewise for a PNG whose header claims a huge size: refused naming the size (not Pillow's bomb text, which
    it used to be above Pillow's own limit), quickly, with no decoder ever made; 8- and 16-bit."""
    from models.imageio import SERVED_FORMATS
    for data, decode in ((_png_header(w, h), decode_image), (_png_header(w, h, 16, 0), decode_depth)):
        t0 = time.perf_counter()
        with pytest.raises(ImageError, match=f"image too large: {w}x{h} = {w * h} pixels > max_pixels=1048576"):
            decode(data, max_pixels=1 << 20, formats=SERVED_FORMATS)
        assert time.perf_counter() - t0 < 0.5
    assert no_decoding == []


def test_webp_and_local_formats_checked_from_the_header(no_decoding):
    """Every format: the header size is checked before decoding (WebP served; BMP, GIF, TIFF, PPM local)."""
    files = {fmt: _saved(fmt, _rgb(64, 48)) for fmt in ("WEBP", "BMP", "GIF", "TIFF", "PPM")}
    no_decoding.clear()  # making the files used Pillow's raw decoder (Image.fromarray)
    for fmt, data in files.items():
        with pytest.raises(ImageError, match="48x64 = 3072 pixels > max_pixels=3071"):
            decode_image(data, max_pixels=3071)
    assert no_decoding == []
    for fmt, data in files.items():
        assert decode_image(data, max_pixels=3072).shape == (64, 48, 3), fmt


def test_decoding_from_8_threads_never_touches_the_warnings_filters(progressive_8000, monkeypatch):
    """The server decodes on a thread pool; ``warnings.catch_warnings`` swaps the process-wide filter list, so
    one thread could restore another's list (or decode while another's filter is in force). Now no filter is
    installed at all: during and after 8 threads of decodes (accepted and refused, all formats served) the
    filters are the ones the test started with, and every result is right."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from PIL import ImageFile

    from models.imageio import SERVED_FORMATS
    before = list(warnings.filters)
    seen: list[object] = []
    load = ImageFile.ImageFile.load

    def spy_load(self, *a, **kw):
        if warnings.filters != before:
            seen.append(list(warnings.filters))
        return load(self, *a, **kw)
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    yy, xx = np.mgrid[0:300, 0:400]
    img = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=2).astype(np.uint8)
    jobs = [(_saved("JPEG", img, quality=90), (75, 100, 3)),  # drafted at 1/4 (_saved("PNG", img), (300, 400, 3)),
            (_saved("WEBP", img, lossless=True), (300, 400, 3)), (progressive_8000, "8000x8000"),
            (_png_header(10000, 10000), "10000x10000"), (_png_header(3000, 3000), "3000x3000")]
    barrier = threading.Barrier(8)

    def work(t: int) -> list[str]:
        barrier.wait()
        bad = []
        for r in range(6):
            data, want = jobs[(t + r) % len(jobs)]
            try:
                got = decode_image(data, max_pixels=1 << 20, formats=SERVED_FORMATS, draft=64).shape
                if got != want:
                    bad.append(f"{want}: decoded to {got}")
            except ImageError as e:
                if not (isinstance(want, str) and f"too large: {want}" in str(e)):
                    bad.append(f"{want}: {e}")
        return bad
    with ThreadPoolExecutor(8) as ex:
        bad = [b for r in ex.map(work, range(8)) for b in r]
    assert bad == []
    assert seen == [], "warnings filters changed while decoding"
    assert warnings.filters == before
