"""Thumbnails of index items (index/thumbs.py): bounded size in pixels and bytes, colour-mapped depth and normals,
stored and found by key, the indexed vectors that /search_by_key searches with (float16, within the stated bound),
files of the earlier format (lossless inputs) still served and compacted, and the server hook that never fails
an add."""
import io

import numpy as np
from PIL import Image

import pytest

from index.thumbs import (EMB_MIME, FLOAT16_SCORE_BOUND, THUMB_MAX_BYTES, THUMB_PX, VIRIDIS, ThumbStore, add_items,
                          colormap_depth, item_rows, kind_of_view, normals_from_depth, remove_items, render)
from index.store import IndexStore
from models.imageio import decode_image, encode_png, fit_image

VIEWS = {"L": "rgb", "ab": "rgb", "depth": "depth", "normals": "depth", "fou": "vector"}


def _img(b: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(b))
    im.load()
    return im


def test_thumbnails_are_bounded_and_keep_aspect():
    """Every kind is WebP, at most THUMB_PX on the longer side and THUMB_MAX_BYTES long, even for uniform noise
    (the worst case for a codec): a busy picture is stored at a lower quality, not larger."""
    rng = np.random.default_rng(0)
    for h, w in ((32, 32), (300, 200), (50, 400), (96, 97)):
        mime, data = render("rgb", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        im = _img(data)
        assert mime == "image/webp" and im.format == "WEBP" and len(data) <= THUMB_MAX_BYTES
        assert max(im.size) == min(THUMB_PX, max(h, w))
        assert abs(im.size[0] / im.size[1] - w / h) < 0.05 * max(w / h, h / w)
        for kind in ("depth", "normals"):
            mime, data = render(kind, rng.integers(0, 65536, (h, w), dtype=np.uint16))
            assert mime == "image/webp" and max(_img(data).size) <= THUMB_PX and len(data) <= THUMB_MAX_BYTES
    smooth = np.tile(np.linspace(0, 255, 96).astype(np.uint8)[None, :, None], (96, 1, 3))
    _, data = render("rgb", smooth)
    assert len(data) < 1000 and np.abs(np.asarray(_img(data), int) - smooth).max() <= 8  # a plain picture: q80


def test_depth_is_colour_mapped_near_dark_far_yellow():
    d = np.tile(np.linspace(1000, 60000, 40).astype(np.uint16), (10, 1))  # near on the left, far on the right
    _, data = render("depth", d)
    a = np.asarray(_img(data).convert("RGB")).astype(int)
    assert a.shape == (10, 40, 3)
    ends = (a[:, :2].reshape(-1, 3).mean(0), a[:, -2:].reshape(-1, 3).mean(0))  # lossy WebP: close, not equal
    assert np.abs(ends[0] - VIRIDIS[0]).max() < 16 and np.abs(ends[1] - VIRIDIS[255]).max() < 16
    assert tuple(VIRIDIS[0]) == (68, 1, 84) and tuple(VIRIDIS[255]) == (253, 231, 37)
    assert np.ptp(a, axis=2).max() > 100  # colours, not grey
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


def _unit(rng, n, d=8):
    z = rng.normal(size=(n, d)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_store_and_get_by_key(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    depth = rng.integers(0, 65536, (3, 40, 50), dtype=np.uint16)
    vec = {v: _unit(rng, 3) for v in VIEWS}  # the vectors the index received, by view
    store = _index(tmp_path, ["a", "b", "c"])
    with ThumbStore(tmp_path) as ts:
        ts.add_sources(["a", "b", "c"], {"rgb": rgb, "depth": depth}, VIEWS, ids=store.ids_of(["a", "b", "c"]),
                       vectors=vec)
        assert len(ts) == 3
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert ts.get("a")[0] == "rgb"  # the default: the rgb picture
        for kind in ("rgb", "depth", "normals"):
            k, m, data = ts.get("b", kind)
            assert (k, m) == (kind, "image/webp") and _img(data).size == (50, 40)
        assert ts.get("zzz") is None and ts.get("a", "nope") is None
        # the indexed vectors, float16: each component within float16's unit roundoff of the float32 one
        for v in VIEWS:
            z = ts.get_embedding("c", v)
            assert z.dtype == np.float32 and z.shape == (8,)
            np.testing.assert_allclose(z, vec[v][2], rtol=2.0 ** -11, atol=2.0 ** -25)
            assert ts.get("c", f"emb:{v}")[1] == EMB_MIME and len(ts.get("c", f"emb:{v}")[2]) == 2 * 8
        assert ts.get_embedding("c", "nope") is None and ts.get_input("c", "rgb") is None  # no lossless copy
        assert {ts.random_key() for _ in range(50)} <= {"a", "b", "c"}
    with ThumbStore(tmp_path) as ts:  # re-writing an item's rows replaces them
        ts.add_sources(["a"], {"rgb": rgb[1:2]}, {"L": "rgb"}, ids=store.ids_of(["a"]), vectors={"L": vec["L"][1:2]})
        np.testing.assert_allclose(ts.get_embedding("a", "L"), vec["L"][1], rtol=2.0 ** -11, atol=2.0 ** -25)
    store.remove(["a", "c"])
    with ThumbStore(tmp_path, readonly=True) as ts:  # rows of removed items are never served
        assert ts.get("a") is None and ts.get_embedding("c", "L") is None and len(ts) == 1
    remove_items(tmp_path, ["a", "c"])  # /index/remove's hook: removed items lose their pictures and vectors
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert ts.get("a") is None and ts.get_embedding("c", "L") is None and len(ts) == 1
        assert ts.get("b", "rgb")[0] == "rgb"
        assert ts._db.execute("SELECT DISTINCT key FROM item_thumbs").fetchall() == [("b",)]  # deleted, not hidden
    store.close()


def test_bytes_per_item_are_bounded(tmp_path):
    """What an item costs in thumbs.sqlite, on the load test's images (noisy colour patterns and depth planes,
    64 x 80, where the earlier format cost 24.9 KB per item, BENCHMARKS.md "Thumbnail storage"): at most
    THUMB_MAX_BYTES per display kind and 2 x dim bytes per view by construction, and the file (each row fits a
    page: no overflow pages) within 25% of its rows' bytes plus 100 bytes of row and index entries per row."""
    from loadtests.plan import synth_depth, synth_rgb
    rng = np.random.default_rng(0)
    n, d = 60, 128
    rgb, depth = map(np.stack, zip(*[(synth_rgb(rng, 64, 80), synth_depth(rng, 64, 80)) for _ in range(n)]))
    views = {"L": "rgb", "ab": "rgb", "depth": "depth"}
    vec = {v: _unit(rng, n, d) for v in views}
    keys = [f"loadtest-{i}" for i in range(n)]
    store = _index(tmp_path)
    ids = store.add(keys, {"v": np.eye(4, dtype=np.float32)[np.arange(n) % 4]})
    with ThumbStore(tmp_path) as ts:
        for i in range(n):  # one transaction per item, as the server's /index/add writes them
            ts.add_sources(keys[i:i + 1], {"rgb": rgb[i:i + 1], "depth": depth[i:i + 1]}, views, ids=ids[i:i + 1],
                           vectors={v: z[i:i + 1] for v, z in vec.items()})
        ts._db.execute("PRAGMA main.wal_checkpoint(TRUNCATE)")
        sizes = ts._db.execute("SELECT kind, max(length(data)), sum(length(data)) FROM item_thumbs "
                               "GROUP BY kind").fetchall()
    store.close()
    by = {k: (mx, tot) for k, mx, tot in sizes}
    assert set(by) == {"rgb", "depth", "emb:L", "emb:ab", "emb:depth"}  # no lossless input rows
    assert by["rgb"][0] <= THUMB_MAX_BYTES and by["depth"][0] <= THUMB_MAX_BYTES
    assert all(by[f"emb:{v}"][0] == 2 * d for v in views)
    data = sum(t for _, t in by.values()) / n
    assert data <= 2 * THUMB_MAX_BYTES + 3 * 2 * d
    file = (tmp_path / "thumbs.sqlite").stat().st_size / n
    assert file <= 1.25 * data + 100 * len(by) + 4096 * 4 / n, (file, data)  # + the schema's pages
    assert file < 24_854 / 4  # at least 4 times smaller than the earlier format on the same images


def test_a_late_thumbnail_of_a_removed_item_never_serves_a_later_item(tmp_path):
    """Issue 18 item 8, at the hooks' level: an add commits item A under key k; k is removed before A's thumbnail
    write (which lands afterwards); k is added again as item B, whose pictures are not written yet. k must not
    get A's pictures or vector; B's, once written, are k's."""
    rng = np.random.default_rng(3)
    a_rgb, b_rgb = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    store = _index(tmp_path, ["other"])
    ThumbStore(tmp_path).close()  # the index keeps thumbnails
    ids_a = store.add(["k"], {"v": np.ones((1, 4), np.float32)})
    store.remove(["k"])
    remove_items(tmp_path, ["k"])  # the remove's hook ran before A's thumbnails were written
    z_a, z_b = _unit(rng, 2)
    assert add_items(tmp_path, ["k"], {"rgb": [a_rgb]}, _Rt(), ids=ids_a, vectors={"L": z_a[None]}) == 1  # late
    ids_b = store.add(["k"], {"v": np.ones((1, 4), np.float32)})
    assert ids_b[0] != ids_a[0]
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert ts.get("k") is None and ts.get_embedding("k", "L") is None  # not A's
        assert ts._db.execute("SELECT count(*) FROM item_thumbs WHERE key = 'k'").fetchone()[0] == 0  # dropped
        add_items(tmp_path, ["k"], {"rgb": [b_rgb]}, _Rt(), ids=ids_b, vectors={"L": z_b[None]})
        np.testing.assert_allclose(ts.get_embedding("k", "L"), z_b, rtol=2.0 ** -11, atol=2.0 ** -25)  # B's
        remove_items(tmp_path, ["k"])  # k is B's: nothing of it is dropped
        assert ts.get_embedding("k", "L") is not None
    store.close()


def _old_rows(key: str, rgb: np.ndarray, size: int = 12) -> list[tuple]:
    """An item's rows as the earlier format wrote them: the picture, and the query input fitted to the model's
    input size as lossless PNG."""
    return [(key, "rgb", *render("rgb", rgb)), (key, "input:rgb", "image/png", encode_png(fit_image(rgb, size)))]


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
    old.executemany("INSERT INTO thumbs VALUES (?, ?, ?, ?)", [r for k, a in zip("abc", rgb) for r in _old_rows(k, a)])
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
    z = {v: np.ones(4, np.float32) / 2 for v in ("L", "ab")}
    kinds = {r[1] for r in item_rows("k", {"rgb": rgb, "depth": depth}, {"L": "rgb", "ab": "rgb"}, z)}
    assert kinds == {"rgb", "emb:L", "emb:ab"}
    kinds = {r[1] for r in item_rows("k", {"rgb": rgb, "depth": depth}, {"L": "rgb", "normals": "depth"})}
    assert kinds == {"rgb", "normals"}
    with pytest.raises(ValueError, match="finite"):
        item_rows("k", {}, {"L": "rgb"}, {"L": np.array([np.nan, 1], np.float32)})


class _Rt:
    views = {v: {"source": s} for v, s in VIEWS.items()}
    image_size = 16


def test_request_items_hook(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    depth = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    decoded = {"rgb": [rgb], "depth": [depth], "fou": [np.ones(8, np.float32)]}  # as the server decoded them
    z = {v: _unit(np.random.default_rng(5), 1) for v in VIEWS}  # as the server indexed them
    store = _index(tmp_path, ["x", "y"])
    ids = store.ids_of(["x", "y"])
    # an index without thumbs.sqlite (built with --no-thumbs) keeps none: no file appears
    assert add_items(tmp_path, ["x"], decoded, _Rt(), ids[:1], z) == 0 and not ThumbStore.exists(tmp_path)
    ThumbStore(tmp_path).close()  # what index.build does unless --no-thumbs
    assert add_items(tmp_path, ["x"], decoded, _Rt(), ids[:1], z) == 1
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert {k for k in ("rgb", "depth", "normals") if ts.get("x", k)} == {"rgb", "depth", "normals"}
        for v in VIEWS:  # every view's vector, the vector view's too
            np.testing.assert_allclose(ts.get_embedding("x", v), z[v][0], rtol=2.0 ** -11, atol=2.0 ** -25)
    bad = {"rgb": [np.zeros((4,), np.float64)]}  # not an image: logged, not raised (the add already happened)
    assert add_items(tmp_path, ["y"], bad, _Rt(), ids[1:]) == 0
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert ts.get("y") is None
    assert add_items(tmp_path, ["y"], decoded, _Rt()) == 1  # without ids: under the key's current id
    with ThumbStore(tmp_path, readonly=True) as ts:
        assert ts.get("y", "rgb")[0] == "rgb"
    store.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The server tests' random-init model (L, ab, depth, fou), exported once for this module's server tests."""
    from server_fixtures import build_model
    path = tmp_path_factory.mktemp("thumbs-model") / "model"
    build_model(path)
    return path


def _web_core(monkeypatch, index_dir, model):
    """A Core serving ``index_dir`` and the web routes' client, as the service wires them."""
    from starlette.testclient import TestClient

    import serving.web as web
    from models.runtime import Runtime
    from serving.core import Core, Settings
    core = Core(Runtime(model), None, Settings())
    core.store, core.index_note = Core.open_index(str(index_dir), core.rt.fingerprint)
    for name in ("current_core", "_core"):  # the route's way to the running service's Core
        monkeypatch.setattr(web, name, lambda: core, raising=False)
    return core, TestClient(web.app)


def _close_web(core, client, base) -> None:
    import index.thumbs as thumbs
    import serving.web as web
    client.close()
    core.close()
    for cache in (web._thumbs, thumbs._writers):  # this index's cached thumbnail files
        for path in [p for p in cache if str(base) in p]:
            cache.pop(path).close()


def _same_hits(got: list[dict], ref: list[dict], bound: float) -> None:
    """``got`` (a search with a perturbed query) against ``ref`` (k + 1 hits of the exact one): the sorted scores
    within ``bound`` place by place, and the same key at every place whose reference score is more than 2 x bound
    from its neighbours' (closer hits may swap)."""
    assert len(got) == len(ref) - 1
    s = [h["score"] for h in ref]
    for j, h in enumerate(got):
        assert abs(h["score"] - s[j]) <= bound, (j, h["score"], s[j], bound)
        near = (j > 0 and s[j - 1] - s[j] <= 2 * bound) or s[j] - s[j + 1] <= 2 * bound
        assert near or h["key"] == ref[j]["key"], (j, h["key"], ref[j]["key"])


def test_search_by_key_is_a_search_with_the_indexed_vector(tmp_path, monkeypatch, model_dir):
    """/search_by_key on an index.build index searches with the item's stored float16 vector: the hits are those
    of a search with the float32 vector the index holds, scores within FLOAT16_SCORE_BOUND (unit vectors), in
    the same order but for hits closer than twice that. An index written in the earlier format (lossless query
    inputs, PNG pictures) still answers by re-embedding its stored inputs (scores within 1e-4: a batch of one),
    and ``compact`` rewrites it in the current format, smaller, with the same answers."""
    import sqlite3

    from index.build import build_index
    from index.thumbs import compact, stats
    from models.runtime import Runtime
    from server_fixtures import scenes
    rt, ds, views = Runtime(model_dir), scenes(24), ["L", "ab", "depth"]
    build_index(rt, ds, views, tmp_path / "index", progress=False)
    z = {v: rt.embed_sources(v, ds.sources) for v in views}  # the vectors the build indexed (same batch)
    pairs = [("L", "ab"), ("ab", "L"), ("depth", "L"), ("L", "L"), ("depth", "depth")]
    core, client = _web_core(monkeypatch, tmp_path / "index", model_dir)

    def check(bound: float) -> int:
        exact = 0
        for i in range(0, 24, 6):
            key = ds.keys[i]
            for view, target in pairs:
                r = client.post("/search_by_key", json={"key": key, "view": view, "target_view": target, "k": 8})
                assert r.status_code == 200, r.text[:300]
                got = r.json()["results"]
                ref = core.store.search_items(z[view][i:i + 1], target, 9)[0]
                _same_hits(got, ref, bound)
                exact += [h["key"] for h in got] == [h["key"] for h in ref[:8]]
        return exact

    try:
        with ThumbStore(tmp_path / "index", readonly=True) as ts:
            for v in views:  # what is stored is the indexed vector, rounded to float16
                np.testing.assert_allclose(ts.get_embedding(ds.keys[5], v), z[v][5], rtol=2.0 ** -11, atol=2.0 ** -25)
        assert check(FLOAT16_SCORE_BOUND) == 4 * len(pairs)  # here no two hits are that close: every list equal
        r = client.post("/search_by_key", json={"key": ds.keys[0], "view": "fou", "target_view": "L"})
        assert r.status_code == 404 and r.json()["field"] == "view" and "not indexed" in r.json()["detail"]
        new = stats(tmp_path / "index")
        # the earlier format: lossless inputs at the model's input size, PNG pictures, no vectors
        with sqlite3.connect(tmp_path / "index" / "thumbs.sqlite") as db:
            ids = dict(db.execute("SELECT key, item_id FROM item_thumbs").fetchall())
            db.execute("DELETE FROM item_thumbs")
            rows = []
            for i, key in enumerate(ds.keys):
                rgb, d = ds.sources["rgb"][i], ds.sources["depth"][i]
                rows += [(ids[key], key, "rgb", "image/webp", render("rgb", rgb)[1]),
                         (ids[key], key, "depth", "image/png", encode_png(colormap_depth(d))),
                         (ids[key], key, "input:rgb", "image/png", encode_png(fit_image(rgb, rt.image_size))),
                         (ids[key], key, "input:depth", "image/png", encode_png(fit_image(d, rt.image_size)))]
            db.executemany("INSERT INTO item_thumbs VALUES (?, ?, ?, ?, ?)", rows)
        db.close()
        check(1e-4)
        old = stats(tmp_path / "index")
        out = compact(tmp_path / "index", model_dir)
        assert out["before"]["kinds"] == old["kinds"]
        after = out["after"]
        assert set(after["kinds"]) == {"rgb", "depth", "emb:L", "emb:ab", "emb:depth"} and after["items"] == 24
        assert after["kinds"]["depth"]["mean_bytes"] < old["kinds"]["depth"]["mean_bytes"] / 2  # WebP, not PNG
        assert after["data_bytes_per_item"] == pytest.approx(new["data_bytes_per_item"], rel=0.05)
        assert after["file_bytes"] + after["wal_bytes"] < (old["file_bytes"] + old["wal_bytes"]) / 2
        check(FLOAT16_SCORE_BOUND + 1e-4)  # vectors re-embedded from the inputs, then rounded
        with ThumbStore(tmp_path / "index", readonly=True) as ts:
            assert ts.get("x", "depth") is None and ts.get(ds.keys[0], "depth")[1] == "image/webp"
    finally:
        _close_web(core, client, tmp_path)


def test_server_remove_between_an_adds_commit_and_its_thumbnails(tmp_path, monkeypatch, model_dir):
    """Issue 18 item 8 through the server's own code: /index/add commits item A under key k, and a /index/remove
    of k lands before A's thumbnails are written; k is then added again as item B, whose thumbnail write is lost.
    /search_by_key k must never query with A's stored vector (a 404 until B's is stored, then B's)."""
    import asyncio

    import index.thumbs as thumbs
    import serving.reads as reads
    from server_fixtures import build_index, png_b64, scenes
    ds = scenes(24)
    build_index(tmp_path / "index", model_dir, ds, 4)
    core, client = _web_core(monkeypatch, tmp_path / "index", model_dir)
    deferred, real_add_items = [], thumbs.add_items
    monkeypatch.setattr(thumbs, "add_items", lambda *a, **kw: deferred.append((a, kw)) or 0)  # written later
    a_img, b_img = ds.sources["rgb"][10], ds.sources["rgb"][11]
    queried = []
    search = reads.search_embedding

    async def spy(inputs, store, zq, *a, **kw):
        queried.append(np.array(zq))
        return await search(inputs, store, zq, *a, **kw)

    monkeypatch.setattr(reads, "search_embedding", spy)
    try:
        asyncio.run(core.index_add([{"key": "k", "inputs": {"rgb": png_b64(a_img)}}]))  # A committed
        asyncio.run(core.index_remove(["k"]))  # removed before A's thumbnails are written
        real_add_items(*deferred[0][0], **deferred[0][1])  # A's thumbnail write lands now
        asyncio.run(core.index_add([{"key": "k", "inputs": {"rgb": png_b64(b_img)}}]))  # B: its write is late
        r = client.post("/search_by_key", json={"key": "k", "view": "L", "k": 3})
        assert r.status_code == 404 and not queried, (r.status_code, r.text[:200])  # not A's vector
        real_add_items(*deferred[1][0], **deferred[1][1])  # B's thumbnail write lands
        r = client.post("/search_by_key", json={"key": "k", "view": "L", "k": 3})
        assert r.status_code == 200, r.text[:300]
        z_b = core.rt.embed_items("L", [b_img])  # B's vector in L, as it was indexed
        assert len(queried) == 1
        np.testing.assert_allclose(queried[0], z_b, rtol=2.0 ** -11, atol=1e-6)  # float16, and a batch of one
        assert r.json()["results"][0]["key"] == "k" and r.json()["results"][0]["score"] > 0.999
    finally:
        _close_web(core, client, tmp_path)
