"""index.build / search / evaluate on a real trained model: cross-view recall beats random embeddings,
and the CLIs work end to end through the ONNX runtime."""
import json

import numpy as np
import pytest

from conftest import run_cli
from index.build import build_index
from index.evaluate import cross_view
from index.store import IndexStore, StoreError
from models.runtime import Runtime


def test_cross_view_recall_on_held_out_scenes_beats_random(trained_artifact, tmp_path):
    rt = Runtime(trained_artifact["dir"])
    test = trained_artifact["test"]
    out = build_index(rt, test, ["L", "ab", "depth"], tmp_path / "idx", progress=False)
    store = IndexStore.open(out, fingerprint=rt.fingerprint, readonly=True)
    assert len(store) == len(test) and store.count("ab") == len(test)
    xq = rt.embed_sources("L", test.sources)
    D, I = store.search(xq, "ab", 10)
    truth = np.array(store.ids_of(test.keys))
    r10 = float((I == truth[:, None]).any(1).mean())
    r1 = float((I[:, 0] == truth).mean())
    rnd = np.random.default_rng(0).standard_normal(xq.shape).astype(np.float32)
    rnd /= np.linalg.norm(rnd, axis=1, keepdims=True)
    base = float((store.search(rnd, "ab", 10)[1] == truth[:, None]).any(1).mean())
    print(f"L->ab on {len(test)} held-out scenes: R@1 {r1:.3f} R@10 {r10:.3f}, random R@10 {base:.3f}")
    assert r10 >= max(4 * base, 0.15), (r10, base)  # chance is 10/256 = 0.04; the tiny model reaches ~0.2-0.3
    # an item is its own top hit in its own view
    xs = rt.embed_sources("ab", test.subset(np.arange(20)).sources)
    assert (store.search(xs, "ab", 1)[1][:, 0] == truth[:20]).all()
    # metadata came along
    hit = store.search_items(xs[:1], "ab", 1)[0][0]
    assert hit["key"] == test.keys[0] and hit["metadata"]["label"] == int(test.y[0])
    store.close()


def test_keyless_data_is_numbered_across_chunks(trained_artifact, tmp_path):
    import dataclasses
    rt = Runtime(trained_artifact["dir"])
    keyless = dataclasses.replace(trained_artifact["test"].subset(np.arange(10)), keys=[])
    out = build_index(rt, keyless, ["L"], tmp_path / "idx", batch_size=4, progress=False)  # chunks of 4, 4, 2
    with IndexStore.open(out, readonly=True) as store:
        assert len(store) == 10 and None not in store.ids_of([f"item-{i}" for i in range(10)])


def test_index_of_another_model_is_refused(trained_artifact, tmp_path):
    rt = Runtime(trained_artifact["dir"])
    out = build_index(rt, trained_artifact["test"].subset(np.arange(10)), ["L"], tmp_path / "idx", progress=False)
    with pytest.raises(StoreError, match="model space"):
        IndexStore.open(out, fingerprint="0123456789abcdef")


def test_cli_build_search_evaluate(trained_artifact, tmp_path):
    model, data = str(trained_artifact["dir"]), trained_artifact["data"]
    r = run_cli(["-m", "index.build", "--model", model, "--data", data, "--views", "L,ab", "--out", str(tmp_path / "i")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "256 items" in r.stdout
    r = run_cli(["-m", "index.search", "--index", str(tmp_path / "i"), "--view", "L", "--target-view", "ab",
                 "--data", data, "--items", "0,1", "-k", "3", "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert len(res) == 2 and all(len(h) == 3 for h in res)
    r = run_cli(["-m", "index.evaluate", "--model", model, "--data", data, "--pairs", "L:ab,depth:L",
                 "--json", str(tmp_path / "e.json")])
    assert r.returncode == 0, r.stderr[-2000:]
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["pairs"]["L->ab"]["cmc"]["R@10"] > max(4 * e["pairs"]["L->ab"]["random"]["R@10"], 0.15)
    r = run_cli(["-m", "index.build", "--model", model, "--data", data, "--views", "L,nope", "--out", str(tmp_path / "j")])
    assert r.returncode == 2 and "unknown view 'nope'" in r.stderr


def test_ann_search_parameters_are_tuned_to_recall(trained_artifact, tmp_path):
    """An IVF gallery larger than the tuning sample: nprobe is tuned against exhaustive IVF search and
    then reaches recall@10 >= 0.95 of it."""
    rt = Runtime(trained_artifact["dir"])
    test = trained_artifact["test"]
    out = build_index(rt, test, ["ab"], tmp_path / "ivf", factory="IVF4,Flat", tune_sample=128, batch_size=64,
                      progress=False)
    store = IndexStore.open(out, readonly=True)
    params = store.manifest["views"]["ab"]["search_params"]
    assert set(params) == {"nprobe"} and 1 <= params["nprobe"] <= 4
    xq = rt.embed_sources("ab", test.subset(np.arange(100)).sources)
    exact = store.search(xq, "ab", 10, nprobe=4)[1]
    tuned = store.search(xq, "ab", 10)[1]  # the stored default
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(tuned.tolist(), exact.tolist())])
    assert recall >= 0.9, recall
    store.close()
