"""Index builds on Ray (index/ray_engine.py): the vectors equal the single-process build's, and on a two-node
local cluster (ray.cluster_utils.Cluster) the embedding runs on both nodes. Skipped without the ray extra."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from index.build import build_index  # noqa: E402
from index.store import IndexStore  # noqa: E402
from models.data import load  # noqa: E402
from models.runtime import Runtime  # noqa: E402

from server_fixtures import build_model  # noqa: E402

DATA = "scenes:n=64,size=32"
VIEWS = ["L", "ab", "depth"]  # the model's image views (its vector view fou is not in scenes)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("raymodel") / "model"
    build_model(d)
    return d


def _vectors(index_dir: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every item's key (sorted) and its stored vector per view in that order (reconstructed from FAISS)."""
    with IndexStore.open(index_dir, readonly=True) as s:
        keys = sorted(m["key"] for m in s.lookup(range(len(s) + 10)) if m is not None)
        ids = s.ids_of(keys)
        vecs = {v: np.stack([s.index_of(v).reconstruct(int(i)) for i in ids]) for v in s.views}
    return keys, vecs


def _same_index(a: Path, b: Path) -> None:
    ka, va = _vectors(a)
    kb, vb = _vectors(b)
    assert ka == kb and len(ka) > 0
    assert set(va) == set(vb)
    for v in va:
        np.testing.assert_allclose(va[v], vb[v], atol=1e-5, rtol=0)


def test_embed_chunks_equal_local(model_dir):
    """The engine's chunks without a cluster (a local Ray of 1 CPU): same chunks, in order, same vectors."""
    from index.ray_engine import embed_chunks
    rt = Runtime(model_dir)
    ds = load(DATA, "train")
    chunks = [ds.subset(np.arange(lo, min(lo + 20, len(ds)))) for lo in range(0, 60, 20)]
    nodes: Counter = Counter()
    out = list(embed_chunks(rt, iter(chunks), VIEWS, num_cpus=1, batch_size=16, window=40, nodes=nodes))
    assert not ray.is_initialized()  # it started Ray, so it shut it down
    assert [len(c) for c, _ in out] == [20, 20, 20]
    for (c, vec), want in zip(out, chunks):
        assert np.array_equal(c.sources["rgb"], want.sources["rgb"])
        for v in VIEWS:
            np.testing.assert_allclose(vec[v], rt.embed_sources(v, want.sources), atol=1e-5, rtol=0)
    assert sum(nodes.values()) == 60 and len(nodes) == 1


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_node_build_equals_local(model_dir, tmp_path, two_nodes):
    """`index.build --engine ray` on two nodes of 1 CPU: its actors ran on both nodes (Ray's view of the
    cluster and of the actors: ray.nodes, the actors' node ids), and the index equals the local build's."""
    build_index(model_dir, DATA, VIEWS, tmp_path / "local", split="train", batch_size=24, progress=False)
    nodes: Counter = Counter()
    build_index(model_dir, DATA, VIEWS, tmp_path / "ray", split="train", batch_size=24, progress=False,
                engine="ray", ray_options={"batch_size": 8, "nodes": nodes})
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2
    assert set(nodes) == alive, (nodes, alive)  # items were embedded on both nodes
    _same_index(tmp_path / "local", tmp_path / "ray")
