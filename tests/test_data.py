import logging
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from models.data import DataError, Dataset, iter_batches, load, parse_spec, provided_sources
from models.data.base import is_test_key
from models.data.scenes import CLASSES, FAR_PLANE, cache_path
from models.imageio import encode_png

CIFAR_REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10.npz"
SPEC = "scenes:n=64,size=32,test_n=32,seed=5"


# ---------------------------------------------------------------- specs
def test_parse_spec():
    assert parse_spec("cifar10:/x/y.npz") == ("cifar10", "/x/y.npz")
    assert parse_spec("scenes") == ("scenes", "")
    assert parse_spec("scenes:n=2000,seed=3,size=64") == ("scenes", "n=2000,seed=3,size=64")
    with pytest.raises(DataError, match="imagefolder"):
        parse_spec("mnist:/x")
    with pytest.raises(DataError, match="unknown"):
        load("nope:/x")


def test_missing_path_and_bad_options(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(f"cifar10:{tmp_path / 'missing.npz'}")
    with pytest.raises(DataError, match="bogus"):
        load("scenes:bogus=1", cache_dir=tmp_path)
    with pytest.raises(DataError, match="split"):
        load(SPEC, "val", cache_dir=tmp_path)


# ---------------------------------------------------------------- scenes
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    cache = tmp_path_factory.mktemp("scenes_cache")
    t0 = time.perf_counter()
    train = load(SPEC, "train", cache_dir=cache)
    t_gen = time.perf_counter() - t0
    return cache, train, t_gen


def test_scenes_shapes_and_types(scenes):
    _, ds, _ = scenes
    assert len(ds) == 64 and isinstance(ds, Dataset)
    assert ds.sources["rgb"].shape == (64, 32, 32, 3) and ds.sources["rgb"].dtype == np.uint8
    assert ds.sources["depth"].shape == (64, 32, 32) and ds.sources["depth"].dtype == np.uint16
    assert ds.sources["normals"].shape == (64, 32, 32, 3) and ds.sources["normals"].dtype == np.uint8
    assert ds.y.dtype == np.int64 and ds.classes == CLASSES and len(CLASSES) >= 6
    assert len(set(ds.keys)) == 64
    assert set(np.unique(ds.y)) == set(range(len(CLASSES)))  # every class present


def test_scenes_deterministic_and_cached(scenes, tmp_path):
    cache, ds, t_gen = scenes
    t0 = time.perf_counter()
    again = load(SPEC, "train", cache_dir=cache)  # cache hit
    t_hit = time.perf_counter() - t0
    assert t_hit < t_gen
    fresh = load(SPEC, "train", cache_dir=tmp_path)  # regenerated in another cache dir
    for k in ds.sources:
        np.testing.assert_array_equal(again.sources[k], ds.sources[k])
        np.testing.assert_array_equal(fresh.sources[k], ds.sources[k])
    np.testing.assert_array_equal(fresh.y, ds.y)
    other = load(SPEC.replace("seed=5", "seed=6"), "train", cache_dir=tmp_path)
    assert not np.array_equal(other.sources["rgb"], ds.sources["rgb"])
    assert len(list(Path(cache).glob("*.tmp*"))) == 0


def test_cache_key_covers_parameters(tmp_path):
    base = cache_path(64, 32, 5, 1, tmp_path)
    assert len({base, cache_path(65, 32, 5, 1, tmp_path), cache_path(64, 64, 5, 1, tmp_path),
                cache_path(64, 32, 6, 1, tmp_path), cache_path(64, 32, 5, 2, tmp_path)}) == 5


def test_scenes_train_test_disjoint(scenes):
    cache, train, _ = scenes
    test = load(SPEC, "test", cache_dir=cache)
    assert len(test) == 32
    assert not set(train.keys) & set(test.keys)
    tr = {im.tobytes() for im in train.sources["rgb"]}
    assert not any(im.tobytes() in tr for im in test.sources["rgb"])


def test_scenes_geometry_consistent(scenes):
    _, ds, _ = scenes
    depth = ds.sources["depth"].astype(np.float64)
    nz = ds.sources["normals"][..., 2].astype(np.float64) / 127.5 - 1
    # the object is near the centre and at z ~ 4-6; the wall is at z >= 6.5
    wall = depth > 6.2 / FAR_PLANE * 65535
    obj = depth < 6.0 / FAR_PLANE * 65535
    assert obj.any(axis=(1, 2)).mean() > 0.95  # nearly every scene shows a near object
    assert depth[obj].mean() < depth[wall].mean()
    assert (depth > 0).all()
    # normals of visible surfaces face the camera (z towards the camera is positive)
    assert (nz[obj] > -0.05).mean() > 0.99 and nz[obj].mean() > 0.3
    assert (nz[wall] > 0.8).all()
    # rgb is not trivially constant on objects
    assert ds.sources["rgb"].std() > 20


def test_scenes_iter_batches(scenes):
    cache, ds, _ = scenes
    parts = list(iter_batches(SPEC, "train", 20, cache_dir=cache))
    assert [len(p) for p in parts] == [20, 20, 20, 4]
    assert sum((p.keys for p in parts), []) == ds.keys
    assert provided_sources(SPEC) == {"rgb", "depth", "normals"}


def test_scenes_image_size(tmp_path):
    ds = load("scenes:n=8,test_n=8", image_size=24, cache_dir=tmp_path)
    assert ds.sources["rgb"].shape == (8, 24, 24, 3) and ds.info["params"]["size"] == 24
    ds = load("scenes:n=8,test_n=8,size=32", image_size=16, cache_dir=tmp_path)
    assert ds.sources["depth"].shape == (8, 16, 16) and ds.sources["depth"].dtype == np.uint16


def test_subset(scenes):
    _, ds, _ = scenes
    sub = ds.subset(np.array([3, 1]))
    assert len(sub) == 2 and sub.keys == [ds.keys[3], ds.keys[1]]
    np.testing.assert_array_equal(sub.sources["depth"][0], ds.sources["depth"][3])
    assert len(ds.subset(ds.y == 0)) == (ds.y == 0).sum()


# ---------------------------------------------------------------- cifar10
def _cifar_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def test_cifar_npz(tmp_path):
    xtr, ytr = _cifar_arrays(12, 0)
    xte, yte = _cifar_arrays(5, 1)
    p = tmp_path / "c.npz"
    np.savez(p, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    ds = load(f"cifar10:{p}")
    np.testing.assert_array_equal(ds.sources["rgb"], xtr)
    np.testing.assert_array_equal(ds.y, ytr)
    assert ds.keys[3] == "cifar10/train/000003" and ds.classes[0] == "airplane"
    te = load(f"cifar10:{p}", "test", image_size=48)
    assert te.sources["rgb"].shape == (5, 48, 48, 3)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=xtr.astype(np.float32), y_train=ytr, x_test=xte, y_test=yte)
    with pytest.raises(DataError, match="uint8"):
        load(f"cifar10:{bad}")
    np.savez(bad, x_train=xtr)
    with pytest.raises(DataError, match="missing"):
        load(f"cifar10:{bad}")


def test_cifar_batches_folder(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    all_x = []
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        x, y = _cifar_arrays(4, i)
        all_x.append(x)
        flat = x.transpose(0, 3, 1, 2).reshape(4, 3072)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": flat, b"labels": list(map(int, y))}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    tr = load(f"cifar10:{root}")
    assert tr.sources["rgb"].shape == (20, 32, 32, 3) and tr.classes[3] == "c3"
    np.testing.assert_array_equal(tr.sources["rgb"], np.concatenate(all_x[:5]))
    te = load(f"cifar10:{root}", "test")
    np.testing.assert_array_equal(te.sources["rgb"], all_x[5])


def test_real_cifar_if_present():
    if not CIFAR_REAL.exists():
        pytest.skip("shared cifar10.npz not present")
    tr = load(f"cifar10:{CIFAR_REAL}")
    te = load(f"cifar10:{CIFAR_REAL}", "test")
    assert tr.sources["rgb"].shape == (50000, 32, 32, 3) and len(te) == 10000
    assert len(tr.classes) == 10


# ---------------------------------------------------------------- imagefolder
def _write_png(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(arr))


def test_imagefolder_split_and_corrupt(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for i in range(30):
            h, w = rng.integers(20, 90, 2)
            _write_png(tmp_path / c / f"{i:03d}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    (tmp_path / "dog" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING):
        tr = load(f"imagefolder:{tmp_path}", image_size=24)
        te = load(f"imagefolder:{tmp_path}", "test", image_size=24)
    assert tr.sources["rgb"].shape[1:] == (24, 24, 3) and tr.classes == ["cat", "dog"]
    assert len(tr) + len(te) == 60
    assert all(is_test_key(k) for k in te.keys) and not any(is_test_key(k) for k in tr.keys)
    broken_split = "test" if is_test_key("dog/zz_broken.png") else "train"
    assert (tr if broken_split == "train" else te).info["skipped"] == 1
    assert "zz_broken" in caplog.text
    parts = list(iter_batches(f"imagefolder:{tmp_path}", "train", 16, image_size=24))
    assert sum(len(p) for p in parts) == len(tr) and max(len(p) for p in parts) <= 16


def test_imagefolder_explicit_splits_and_empty(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            _write_png(tmp_path / "root" / split / "a" / f"{i}.png", np.full((10, 12, 3), i, np.uint8))
    assert len(load(f"imagefolder:{tmp_path / 'root'}", "train")) == 3
    assert len(load(f"imagefolder:{tmp_path / 'root'}", "test")) == 2
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no train images"):
        load(f"imagefolder:{tmp_path / 'empty'}")
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    for i in range(20):
        (bad / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="imagefolder"):
        load(f"imagefolder:{tmp_path / 'bad'}")


# ---------------------------------------------------------------- paired
def test_paired_matches_stems_with_16bit_depth(tmp_path):
    rng = np.random.default_rng(0)
    depths = {}
    for i in range(40):
        stem = f"{i:04d}"
        _write_png(tmp_path / "rgb" / f"{stem}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        if i != 7:  # one unmatched item
            depths[stem] = rng.integers(0, 65536, (16, 16), dtype=np.uint16)
            _write_png(tmp_path / "depth" / f"{stem}.png", depths[stem])
    (tmp_path / "labels.csv").write_text("stem,label\n" + "".join(f"{i:04d},{'ab'[i % 2]}\n" for i in range(40)))
    tr = load(f"paired:{tmp_path}", image_size=16)
    te = load(f"paired:{tmp_path}", "test", image_size=16)
    assert len(tr) + len(te) == 39 and tr.info["dropped_unmatched"] == 1
    assert tr.sources["depth"].dtype == np.uint16 and tr.classes == ["a", "b"]
    for k, d in zip(tr.keys, tr.sources["depth"]):
        np.testing.assert_array_equal(d, depths[k])
    assert [tr.y[i] for i in range(3)] == [int(k) % 2 for k in tr.keys[:3]]
    assert provided_sources(f"paired:{tmp_path}") == {"rgb", "depth"}


def test_paired_keeps_unlabelled_items_for_pretraining(tmp_path, caplog):
    """200 paired items, 20 of them in labels.csv: pretraining sees all of them (y = -1 when unlabelled),
    evaluation only the labelled ones, and both counts are logged."""
    import logging
    from train.metrics import labelled
    rng = np.random.default_rng(1)
    for i in range(200):
        for src in ("rgb", "depth"):
            shape = (8, 8, 3) if src == "rgb" else (8, 8)
            _write_png(tmp_path / src / f"{i:04d}.png", rng.integers(0, 255, shape, dtype=np.uint8))
    (tmp_path / "labels.csv").write_text("stem,label\n" + "".join(f"{i:04d},{i % 3}\n" for i in range(0, 200, 10)))
    with caplog.at_level(logging.INFO):
        tr, te = load(f"paired:{tmp_path}", image_size=8), load(f"paired:{tmp_path}", "test", image_size=8)
    assert len(tr) + len(te) == 200  # was 20: the unlabelled items were dropped before the split
    n_lab = sum(int(k) % 10 == 0 for k in tr.keys)
    assert int((tr.y >= 0).sum()) == n_lab and int((tr.y == -1).sum()) == len(tr) - n_lab
    assert all(tr.y[i] == (int(k) % 3 if int(k) % 10 == 0 else -1) for i, k in enumerate(tr.keys))
    assert tr.info["unlabeled"] == len(tr) - n_lab
    assert f"{len(tr) - n_lab} of {len(tr)} item(s) have no label" in caplog.text
    ev = labelled(tr)
    assert len(ev) == n_lab and (ev.y >= 0).all()


# ---------------------------------------------------------------- npz
def test_npz_views(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "v.npz"
    np.savez(p, a=rng.normal(size=(50, 4)), b=rng.normal(size=(50, 7)).astype(np.float32), y=np.arange(50) % 3)
    tr, te = load(f"npz:{p}"), load(f"npz:{p}", "test")
    assert len(tr) + len(te) == 50 and tr.sources["a"].dtype == np.float32 and tr.sources["b"].shape[1] == 7
    p2 = tmp_path / "t.npz"
    np.savez(p2, a=np.ones((5, 2)), a_test=np.zeros((3, 2)), y=np.zeros(5, int), y_test=np.ones(3, int))
    assert len(load(f"npz:{p2}", "test")) == 3 and load(f"npz:{p2}", "test").y.tolist() == [1, 1, 1]


@pytest.mark.parametrize("arrays,match", [
    ({"a": np.array([[1.0, np.nan]] * 4)}, r"bad\.npz:a contains NaN"),
    ({"a": np.ones((4, 2)), "b": np.array([[np.inf]] * 4)}, r"bad\.npz:b contains NaN or inf"),
    ({"a": np.ones((4, 2)), "b": np.ones((5, 2))}, "length"),
    ({"a": np.ones((4, 2, 2))}, "2-D"),
    ({"y": np.ones(4, int)}, "no view"),
])
def test_npz_invalid(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=match):
        load(f"npz:{p}")


def test_scenes_workers_do_not_change_output():
    from models.data.scenes import CHUNK, generate
    one = generate(CHUNK + 40, 16, seed=3, workers=1)
    two = generate(CHUNK + 40, 16, seed=3, workers=2)
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])
