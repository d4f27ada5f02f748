"""Views that outgrow their type or their memory budget are re-chosen as items arrive (issue 21).

A real IndexStore on disk: items are added through ``add`` (as the server's /index/add does), the background
build re-chooses the view (``index.maintenance``, ``index.viewindex.retyped_copy``), and a second store on
the same directory (another worker) follows it. Recall is checked against exact search
(``index.recall.exact_knn``), the vectors against the ones added.
"""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from index import factory as fac
from index.choose import density_k
from index.recall import exact_knn, overlap
from index.store import IndexStore, StoreError
from index.viewindex import _chunks

D = 32


def _clustered(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 64 fixed centres (the same for every seed: queries come from the data's distribution)."""
    centres = np.random.default_rng(0).standard_normal((64, D)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, 64, n)] + 0.3 * rng.standard_normal((n, D)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _add(store: IndexStore, x: np.ndarray, start: int = 0, batch: int = 1000) -> None:
    for i in range(0, len(x), batch):
        store.add([f"k{start + j}" for j in range(i, min(i + batch, len(x)))], {"v": x[i:i + batch]})


def _recall(store: IndexStore, xb: np.ndarray, xq: np.ndarray, k: int = 10) -> float:
    gt = exact_knn(xq, xb, k, "ip")[1]  # positions in xb == ids k0.. (keys added in order)
    hits = store.search_items(xq, "v", k)
    got = np.array([[int(h["key"][1:]) for h in row] + [-1] * (k - len(row)) for row in hits])
    return overlap(got, gt, k)


def test_retype_due_rules() -> None:
    assert fac.retype_due("Flat", 1_000, D, 0.01) is None  # too few items to train or measure on
    assert "over the view's budget" in fac.retype_due("Flat", 10_000, D, 1.0)  # 10k x (128 + 56) B = 1.75 MiB
    assert fac.retype_due("Flat", 10_000, D, 2.0) is None
    assert "slow" in fac.retype_due("Flat", fac.RETYPE_FLAT_AT, D, 10_000)
    assert fac.retype_due("IVF256,Flat", fac.RETYPE_FLAT_AT * 4, D, 10_000) is None  # IVF-Flat: only the budget
    assert fac.retype_due("IVF256,Flat", 100_000, D, 10.0) is not None  # 100k x 136 B x 1.4 = 18 MiB
    assert fac.retype_due("IVF256,SQ8", 10**7, D, 1.0) is None  # compressed: raw vectors gone, never re-chosen


def test_ivf_flat_lists_give_back_every_vector() -> None:
    x = _clustered(3000, seed=3)
    idx = fac.make_index("IVF16,Flat", D)
    idx.train(x)
    ids = np.arange(3000, dtype=np.int64) * 7 + 5
    idx.add_with_ids(x, ids)
    got_ids, got_x = zip(*_chunks(idx))
    got_ids, got_x = np.concatenate(got_ids), np.concatenate(got_x)
    order = np.argsort(got_ids)
    assert np.array_equal(got_ids[order], ids)
    assert np.array_equal(got_x[order], x)


def test_flat_view_over_budget_is_rechosen_and_followed(tmp_path) -> None:
    x, xq = _clustered(12_000), _clustered(200, seed=1)
    s = IndexStore.create(tmp_path / "idx", views={"v": D}, fingerprint="f", model_ref="m", memory_budget_mb=1)
    other = IndexStore.open(tmp_path / "idx")  # another worker on the same directory
    try:
        assert s.manifest["views"]["v"]["factory"] == "IDMap2,Flat"  # chosen for n_hint 0
        _add(s, x)
        s.snapshot()  # builds what is due first: the re-choice, once per index
        spec = s.manifest["views"]["v"]
        choice = spec["choice"]
        assert spec["factory"].startswith("IVF") and spec["factory"] == choice["factory"]
        assert not fac.holds_raw(spec["factory"])  # 1 MiB cannot hold 12k raw vectors: compressed codes
        assert choice["retyped_from"] == "IDMap2,Flat" and "over the view's budget" in choice["retype_reason"]
        assert choice["est_bytes"] <= 1 * 2**20 and choice["chosen_for_count"] == 2 * choice["retyped_at_count"]
        # measured at the density of twice the items on a budget-bounded sample: the target, or the best recall
        # and the reason saying so
        assert choice["measured_at_k"] == density_k(10, choice["sample"], choice["chosen_for_count"]) < 10, choice
        assert choice["measured_recall"] >= 0.95 or "no compressed candidate" in choice["reason"], choice
        assert choice["measured_recall"] >= 0.9 and spec["search_params"] == {"nprobe": choice["nprobe"]}
        assert s.count("v") == 12_000
        r = _recall(s, x, xq)
        # 1 MiB for 12k items holds codes of about 50 bytes (SQ8 at 32 d): recall 0.89 here, measured 0.95 at
        # recall@2 on the 6k-item sample the re-choice saw
        assert r >= 0.85, (r, choice)
        # the other worker loads the same build and answers the same
        assert _recall(other, x, xq) == r
        assert other.index_types()["v"] == s.index_types()["v"] != "IndexIDMap2"
        # writes go on: adds and removes on the new type, visible to both
        more = _clustered(500, seed=2)
        _add(other, more, start=12_000, batch=100)
        s.remove(["k0", "k1"])
        assert s.count("v") == other.count("v") == 12_498
        top = s.search_items(more[:20], "v", 1)
        assert np.mean([row[0]["key"] == f"k{12_000 + i}" for i, row in enumerate(top)]) >= 0.9
    finally:
        other.close()
        s.close()
    again = IndexStore.open(tmp_path / "idx")
    try:
        assert again.manifest["views"]["v"]["factory"] == spec["factory"] and again.count("v") == 12_498
    finally:
        again.close()


def test_given_factory_is_never_rechosen(tmp_path) -> None:
    s = IndexStore.create(tmp_path / "idx", views={"v": D}, fingerprint="f", model_ref="m", factory="Flat",
                          memory_budget_mb=1)
    try:
        _add(s, _clustered(8_000))
        s.snapshot()
        assert s.manifest["views"]["v"]["factory"] == "IDMap2,Flat" and s.count("v") == 8_000
    finally:
        s.close()


def test_exact_view_past_its_limit_becomes_ivf_flat_then_compressed_under_a_smaller_budget(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(fac, "FLAT_MAX", 2_500)  # the rules at 50k and 100k items, scaled down
    monkeypatch.setattr(fac, "RETYPE_FLAT_AT", 5_000)
    x, xq = _clustered(10_000), _clustered(200, seed=1)
    s = IndexStore.create(tmp_path / "idx", views={"v": D}, fingerprint="f", model_ref="m")  # 2048 MB
    try:
        _add(s, x)
        s.snapshot()
        spec = s.manifest["views"]["v"]
        assert fac.IVF_RE.match(spec["factory"]) and spec["factory"].endswith(",Flat")  # raw vectors fit
        assert "slow" in spec["choice"]["retype_reason"]
        assert _recall(s, x, xq) >= 0.9
    finally:
        s.close()
    with pytest.raises(StoreError, match="memory_budget_mb"):
        IndexStore.open(tmp_path / "idx", memory_budget_mb=-1)
    # the server's CMC_INDEX_MEMORY_MB: a smaller budget than the manifest's, for this process
    s = IndexStore.open(tmp_path / "idx", memory_budget_mb=1.5)  # IVF-Flat at 10k: 1.9 MiB; SQ8 at 20k: 1.1
    try:
        assert s.view_budget_mb() == 1.5
        s.snapshot()
        spec = s.manifest["views"]["v"]
        assert spec["choice"]["retyped_from"].endswith(",Flat") and not fac.holds_raw(spec["factory"])
        assert s.count("v") == 10_000 and _recall(s, x, xq) >= 0.85
        ivf = faiss.extract_index_ivf(s.index_of("v"))
        assert ivf.ntotal == 10_000
    finally:
        s.close()


def test_server_setting_reaches_the_store(tmp_path, monkeypatch) -> None:
    from serving.core import Core
    from serving.settings import Settings

    monkeypatch.setenv("CMC_INDEX_MEMORY_MB", "lots")
    with pytest.raises(RuntimeError, match="CMC_INDEX_MEMORY_MB"):
        Settings()
    monkeypatch.setenv("CMC_INDEX_MEMORY_MB", "-3")
    with pytest.raises(RuntimeError, match="CMC_INDEX_MEMORY_MB"):
        Settings()
    monkeypatch.setenv("CMC_INDEX_MEMORY_MB", "96")
    assert Settings().index_memory_mb == 96
    IndexStore.create(tmp_path / "idx", views={"a": D, "b": D}, fingerprint="f", model_ref="m").close()
    store, _ = Core.open_index(str(tmp_path / "idx"), "f", 96)
    try:
        assert store.view_budget_mb() == 48.0  # shared equally by the two views
    finally:
        store.close()
    store, _ = Core.open_index(str(tmp_path / "idx"), "f")
    try:
        assert store.view_budget_mb() == 1024.0  # the manifest's 2048 MB
    finally:
        store.close()
