"""Thumbnails of index items (index/thumbs.py): bounded size, colour-mapped depth and normals, stored and found
by key, query inputs that give the indexed embedding back, and the server hook that never fails an add."""
import io

import numpy as np
from PIL import Image

from index.thumbs import (THUMB_PX, VIRIDIS, ThumbStore, add_items, colormap_depth, item_rows,
                          kind_of_view, normals_from_depth, remove_items, render)
from models.imageio import decode_depth, decode_image, fit_image

VIEWS = {"L": "rgb", "ab": "rgb", "depth": "depth", "normals": "depth", "fou": "vector"}


def _img(b: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(b))
    im.load()
    return im


def test_thumbnails_are_bounded_and_keep_aspect():
    rng = np.random.default_rng(0)
    for h, w in ((32, 32), (300, 200), (50, 400), (96, 97)):
        mime, data = render("rgb", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        im = _img(data)
        assert mime == "image/webp" and im.format == "WEBP"
        assert max(im.size) == min(THUMB_PX, max(h, w))
        assert abs(im.size[0] / im.size[1] - w / h) < 0.05 * max(w / h, h / w)
        for kind in ("depth", "normals"):
            _, data = render(kind, rng.integers(0, 65536, (h, w), dtype=np.uint16))
            assert max(_img(data).size) <= THUMB_PX


def test_depth_is_colour_mapped_near_dark_far_yellow():
    d = np.tile(np.linspace(1000, 60000, 40).astype(np.uint16), (10, 1))  # near on the left, far on the right
    _, data = render("depth", d)
    a = np.asarray(_img(data).convert("RGB"))
    assert a.shape == (10, 40, 3)
    assert (a[:, 0] == VIRIDIS[0]).all() and (a[:, -1] == VIRIDIS[255]).all()
    assert tuple(VIRIDIS[0]) == (68, 1, 84) and tuple(VIRIDIS[255]) == (253, 231, 37)
    assert np.ptp(a.astype(int), axis=2).max() > 100  # colours, not grey
    assert (colormap_depth(np.full((4, 4), 7, np.uint16)) == VIRIDIS[0]).all()  # a flat map does not divide by 0


def test_normals_of_a_plane():
    flat = np.full((8, 8), 30000, np.uint16)
    assert (normals_from_depth(flat) == [128, 128, 255]).all()  # facing the camera
    ramp = np.tile(np.arange(8, dtype=np.uint16) * 500, (8, 1))  # farther to the right: the normal turns left
    n = normals_from_depth(ramp).astype(int)
    assert (n[:, :, 0] < 128).all() and (n[:, :, 1] == 128).all()


def test_kind_of_view():
    assert [kind_of_view(v, s) for v, s in VIEWS.items()] == ["rgb", "rgb", "depth", "normals", None]


def test_store_and_get_by_key(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    depth = rng.integers(0, 65536, (3, 40, 50), dtype=np.uint16)
    vec = rng.normal(size=(3, 8)).astype(np.float32)
    with ThumbStore(tmp_path) as ts:
        ts.add_sources(["a", "b", "c"], {"rgb": rgb, "depth": depth, "fou": vec}, VIEWS, image_size=32)
        assert len(ts) == 3
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert ts.get("a")[0] == "rgb"  # the default: the rgb picture
        for kind, mime in (("rgb", "image/webp"), ("depth", "image/png"), ("normals", "image/png")):
            k, m, data = ts.get("b", kind)
            assert (k, m) == (kind, mime) and _img(data).size == (50, 40)
        assert ts.get("zzz") is None and ts.get("a", "nope") is None
        # query inputs: the source fitted to the model's input size, lossless, so the runtime sees it unchanged
        assert (decode_image(ts.get_input("c", "rgb")) == fit_image(rgb[2], 32)).all()
        assert (decode_depth(ts.get_input("c", "depth")) == fit_image(depth[2], 32)).all()
        assert (np.frombuffer(ts.get_input("c", "fou"), "<f4") == vec[2]).all()
        assert {ts.random_key() for _ in range(50)} <= {"a", "b", "c"}
    with ThumbStore(tmp_path) as ts:  # re-adding a key replaces its pictures
        ts.add_sources(["a"], {"rgb": rgb[1:2]}, {"L": "rgb"}, image_size=32)
        assert (decode_image(ts.get_input("a", "rgb")) == fit_image(rgb[1], 32)).all()
    remove_items(tmp_path, ["a", "c"])  # /index/remove's hook: removed items lose their pictures and inputs
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert ts.get("a") is None and ts.get_input("c", "rgb") is None and len(ts) == 1
        assert ts.get("b", "rgb")[0] == "rgb"


def test_only_the_kinds_the_views_need():
    rgb = np.zeros((16, 16, 3), np.uint8)
    depth = np.zeros((16, 16), np.uint16)
    kinds = {r[1] for r in item_rows("k", {"rgb": rgb, "depth": depth}, {"L": "rgb", "ab": "rgb"}, 16)}
    assert kinds == {"rgb", "input:rgb"}
    kinds = {r[1] for r in item_rows("k", {"rgb": rgb, "depth": depth}, {"L": "rgb", "normals": "depth"}, 16)}
    assert kinds == {"rgb", "input:rgb", "normals", "input:depth"}


class _Rt:
    views = {v: {"source": s} for v, s in VIEWS.items()}
    image_size = 16


def test_request_items_hook(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    depth = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    decoded = {"rgb": [rgb], "depth": [depth], "fou": [np.ones(8, np.float32)]}  # as the server decoded them
    # an index without thumbs.sqlite (built with --no-thumbs) keeps none: no file appears
    assert add_items(tmp_path, ["x"], decoded, _Rt()) == 0 and not ThumbStore.exists(tmp_path)
    ThumbStore(tmp_path).close()  # what index.build does unless --no-thumbs
    assert add_items(tmp_path, ["x"], decoded, _Rt()) == 1
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert {k for k in ("rgb", "depth", "normals") if ts.get("x", k)} == {"rgb", "depth", "normals"}
        assert (decode_image(ts.get_input("x", "rgb")) == fit_image(rgb, 16)).all()
        assert (np.frombuffer(ts.get_input("x", "fou"), "<f4") == 1).all()
    bad = {"rgb": [np.zeros((4,), np.float64)]}  # not an image: logged, not raised (the add already happened)
    assert add_items(tmp_path, ["y"], bad, _Rt()) == 0
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert ts.get("y") is None
