"""Thumbnails of index items (index/thumbs.py): bounded size, colour-mapped depth and normals, stored and found
by key, query inputs that give the indexed embedding back, and the server hook that never fails an add."""
import io

import numpy as np
from PIL import Image

from index.thumbs import (THUMB_PX, VIRIDIS, ThumbStore, add_items, colormap_depth, item_rows,
                          kind_of_view, normals_from_depth, remove_items, render)
from index.store import IndexStore
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


def _index(path, keys=()):
    """An index directory (thumbnails belong to its items) holding ``keys``; returns the open store."""
    store = IndexStore.create(path, views={"v": 4}, fingerprint="fp", model_ref="t", follow=False)
    if keys:
        store.add(list(keys), {"v": np.eye(4, dtype=np.float32)[np.arange(len(keys)) % 4]})
    return store


def test_store_and_get_by_key(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    depth = rng.integers(0, 65536, (3, 40, 50), dtype=np.uint16)
    vec = rng.normal(size=(3, 8)).astype(np.float32)
    store = _index(tmp_path, ["a", "b", "c"])
    with ThumbStore(tmp_path) as ts:
        ts.add_sources(["a", "b", "c"], {"rgb": rgb, "depth": depth, "fou": vec}, VIEWS, image_size=32,
                       ids=store.ids_of(["a", "b", "c"]))
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
    with ThumbStore(tmp_path) as ts:  # re-writing an item's pictures replaces them
        ts.add_sources(["a"], {"rgb": rgb[1:2]}, {"L": "rgb"}, image_size=32, ids=store.ids_of(["a"]))
        assert (decode_image(ts.get_input("a", "rgb")) == fit_image(rgb[1], 32)).all()
    store.remove(["a", "c"])
    with ThumbStore(tmp_path, readonly=True) as ts:  # rows of removed items are never served
        assert ts.get("a") is None and ts.get_input("c", "rgb") is None and len(ts) == 1
    remove_items(tmp_path, ["a", "c"])  # /index/remove's hook: removed items lose their pictures and inputs
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert ts.get("a") is None and ts.get_input("c", "rgb") is None and len(ts) == 1
        assert ts.get("b", "rgb")[0] == "rgb"
        assert ts._db.execute("SELECT DISTINCT key FROM item_thumbs").fetchall() == [("b",)]  # deleted, not hidden
    store.close()


def test_a_late_thumbnail_of_a_removed_item_never_serves_a_later_item(tmp_path):
    """Issue 18 item 8, at the hooks' level: an add commits item A under key k; k is removed before A's thumbnail
    write (which lands afterwards); k is added again as item B, whose pictures are not written yet. k must not
    get A's pictures or query input; B's, once written, are k's."""
    rng = np.random.default_rng(3)
    a_rgb, b_rgb = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    store = _index(tmp_path, ["other"])
    ThumbStore(tmp_path).close()  # the index keeps thumbnails
    ids_a = store.add(["k"], {"v": np.ones((1, 4), np.float32)})
    store.remove(["k"])
    remove_items(tmp_path, ["k"])  # the remove's hook ran before A's thumbnails were written
    assert add_items(tmp_path, ["k"], {"rgb": [a_rgb]}, _Rt(), ids=ids_a) == 1  # A's late write
    ids_b = store.add(["k"], {"v": np.ones((1, 4), np.float32)})
    assert ids_b[0] != ids_a[0]
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert ts.get("k") is None and ts.get_input("k", "rgb") is None  # not A's
        assert ts._db.execute("SELECT count(*) FROM item_thumbs WHERE key = 'k'").fetchone()[0] == 0  # dropped
        add_items(tmp_path, ["k"], {"rgb": [b_rgb]}, _Rt(), ids=ids_b)
        assert (decode_image(ts.get_input("k", "rgb")) == fit_image(b_rgb, 16)).all()  # B's
        remove_items(tmp_path, ["k"])  # k is B's: nothing of it is dropped
        assert ts.get_input("k", "rgb") is not None
    store.close()


def test_thumbnails_of_an_older_index_are_migrated(tmp_path, monkeypatch):
    """thumbs.sqlite written by an older version (rows keyed by key) still serves its items: opened read-only
    (as the web page does) or for writing, its rows move to the current item ids; rows of gone keys are dropped;
    on a file that cannot be written, they are read by key."""
    import sqlite3
    store = _index(tmp_path, ["a", "b"])
    store.remove(["b"])
    store.add(["c"], {"v": np.ones((1, 4), np.float32)})
    rgb = np.random.default_rng(4).integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    old = sqlite3.connect(tmp_path / "thumbs.sqlite")
    old.executescript("CREATE TABLE thumbs(key TEXT NOT NULL, kind TEXT NOT NULL, mime TEXT NOT NULL, "
                      "data BLOB NOT NULL, UNIQUE(key, kind));")
    old.executemany("INSERT INTO thumbs VALUES (?, ?, ?, ?)",
                    [r for k, a in zip("abc", rgb) for r in item_rows(k, {"rgb": a}, {"L": "rgb"}, 12)])
    old.commit()
    old.close()
    connect = ThumbStore._connect

    def read_only_disk(path, meta, readonly):
        if not readonly:
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return connect(path, meta, readonly)

    monkeypatch.setattr(ThumbStore, "_connect", staticmethod(read_only_disk))
    with ThumbStore(tmp_path, readonly=True) as ts:  # cannot migrate: read by key
        assert (decode_image(ts.get_input("a", "rgb")) == fit_image(rgb[0], 12)).all()
        assert ts.get("b") is None and len(ts) == 2 and {ts.random_key() for _ in range(30)} <= {"a", "c"}
    monkeypatch.undo()
    with ThumbStore(tmp_path, readonly=True) as ts:  # the web page's open migrates it
        assert (decode_image(ts.get_input("a", "rgb")) == fit_image(rgb[0], 12)).all()
        assert (decode_image(ts.get_input("c", "rgb")) == fit_image(rgb[2], 12)).all()
        assert ts.get("b") is None and len(ts) == 2 and {ts.random_key() for _ in range(30)} <= {"a", "c"}
    with sqlite3.connect(tmp_path / "thumbs.sqlite") as db:
        assert not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'thumbs'").fetchall()
        got = db.execute("SELECT DISTINCT item_id, key FROM item_thumbs ORDER BY item_id").fetchall()
    assert got == [(0, "a"), (2, "c")]
    with ThumbStore(tmp_path) as ts:  # and opens for writing as it is
        assert len(ts) == 2
    store.close()


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
    store = _index(tmp_path, ["x", "y"])
    ids = store.ids_of(["x", "y"])
    # an index without thumbs.sqlite (built with --no-thumbs) keeps none: no file appears
    assert add_items(tmp_path, ["x"], decoded, _Rt(), ids[:1]) == 0 and not ThumbStore.exists(tmp_path)
    ThumbStore(tmp_path).close()  # what index.build does unless --no-thumbs
    assert add_items(tmp_path, ["x"], decoded, _Rt(), ids[:1]) == 1
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert {k for k in ("rgb", "depth", "normals") if ts.get("x", k)} == {"rgb", "depth", "normals"}
        assert (decode_image(ts.get_input("x", "rgb")) == fit_image(rgb, 16)).all()
        assert (np.frombuffer(ts.get_input("x", "fou"), "<f4") == 1).all()
    bad = {"rgb": [np.zeros((4,), np.float64)]}  # not an image: logged, not raised (the add already happened)
    assert add_items(tmp_path, ["y"], bad, _Rt(), ids[1:]) == 0
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert ts.get("y") is None
    assert add_items(tmp_path, ["y"], decoded, _Rt()) == 1  # without ids: under the key's current id
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert ts.get("y", "rgb")[0] == "rgb"
    store.close()


def test_server_remove_between_an_adds_commit_and_its_thumbnails(tmp_path, monkeypatch):
    """Issue 18 item 8 through the server's own code: /index/add commits item A under key k, and a /index/remove
    of k lands before A's thumbnails are written; k is then added again as item B, whose thumbnail write is lost.
    /search_by_key k must never query with A's stored input (a 404 until B's input is stored, then B's)."""
    import asyncio

    from starlette.testclient import TestClient

    import index.thumbs as thumbs
    import serving.web as web
    from models.imageio import encode_png
    from models.runtime import Runtime
    from serving.core import Core, Settings
    from server_fixtures import build_index, build_model, png_b64, scenes
    build_model(tmp_path / "model")
    ds = scenes(24)
    build_index(tmp_path / "index", tmp_path / "model", ds, 4)
    core = Core(Runtime(tmp_path / "model"), None, Settings())
    core.store, core.index_note = Core.open_index(str(tmp_path / "index"), core.rt.fingerprint)
    deferred, real_add_items = [], thumbs.add_items
    monkeypatch.setattr(thumbs, "add_items", lambda *a, **kw: deferred.append((a, kw)) or 0)  # written later
    for name in ("current_core", "_core"):  # the route's way to the running service's Core
        monkeypatch.setattr(web, name, lambda: core, raising=False)
    a_img, b_img = ds.sources["rgb"][10], ds.sources["rgb"][11]
    queried = []
    search = core.search

    async def spy(query, *a, **kw):
        queried.append(query.get("image"))
        return await search(query, *a, **kw)

    monkeypatch.setattr(core, "search", spy)
    client = TestClient(web.app)
    try:
        asyncio.run(core.index_add([{"key": "k", "inputs": {"rgb": png_b64(a_img)}}]))  # A committed
        asyncio.run(core.index_remove(["k"]))  # removed before A's thumbnails are written
        real_add_items(*deferred[0][0], **deferred[0][1])  # A's thumbnail write lands now
        asyncio.run(core.index_add([{"key": "k", "inputs": {"rgb": png_b64(b_img)}}]))  # B: its write is late
        r = client.post("/search_by_key", json={"key": "k", "view": "L", "k": 3})
        assert r.status_code == 404 and not queried, (r.status_code, r.text[:200])  # not A's input
        real_add_items(*deferred[1][0], **deferred[1][1])  # B's thumbnail write lands
        r = client.post("/search_by_key", json={"key": "k", "view": "L", "k": 3})
        assert r.status_code == 200, r.text[:300]
        assert queried == [encode_png(fit_image(b_img, core.rt.image_size))]  # B's stored input, exactly
        assert r.json()["results"][0]["key"] == "k" and r.json()["results"][0]["score"] > 0.999
    finally:
        client.close()
        core.close()
        for cache in (web._thumbs, thumbs._writers):  # this index's cached thumbnail files
            for path in [p for p in cache if str(tmp_path) in p]:
                cache.pop(path).close()
