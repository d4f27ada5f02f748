"""Index builds on Ray (index/ray_engine.py): the vectors equal the single-process build's, and on a two-node
local cluster (ray.cluster_utils.Cluster) the embedding runs on both nodes. Skipped without the ray extra.

Which node ran what is read two ways: the node id each embedding actor records with its output (always), and Ray's
state API (``ray.util.state.list_tasks``), which queries the dashboard's API server and so needs ``ray[default]``
(aiohttp_cors, opencensus, py-spy, ...): without it that test is skipped, saying so."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from index.build import build_index  # noqa: E402
from index.ray_engine import start_with_retry  # noqa: E402
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


def test_start_with_retry():
    """Ray's startup timeout is retried after a stop, up to the limit; any other error is raised at once."""
    calls = {"start": 0, "stop": 0}

    def flaky(fail: int, msg: str = "The current node timed out during startup. This could happen ..."):
        def start():
            calls["start"] += 1
            if calls["start"] <= fail:
                raise Exception(msg)
            return "up"
        return start

    def stop():
        calls["stop"] += 1

    assert start_with_retry(flaky(2), stop, tries=3) == "up" and calls == {"start": 3, "stop": 2}
    calls.update(start=0, stop=0)
    with pytest.raises(Exception, match="timed out during startup"):
        start_with_retry(flaky(3), stop, tries=3)
    assert calls == {"start": 3, "stop": 2}
    calls.update(start=0, stop=0)  # the GCS's port file late: the same kind of startup timeout
    gcs = "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_b71d. The file was never written."
    assert start_with_retry(flaky(1, gcs), stop, tries=3) == "up" and calls == {"start": 2, "stop": 1}
    calls.update(start=0, stop=0)
    with pytest.raises(Exception, match="port in use"):
        start_with_retry(flaky(1, "port in use"), stop, tries=3)
    assert calls == {"start": 1, "stop": 0}


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


def _state_api_error() -> str | None:
    """Why Ray's state API cannot answer here (None when it can): it needs the dashboard, i.e. ray[default]."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - the check Ray itself makes before starting a dashboard
    except ImportError as e:
        return f"Ray's state API needs the dashboard: pip install 'ray[default]' ({e})"
    return None


RAY_BATCH = 8  # items per map_batches call in the two-node build: 64 items -> 8 embedding tasks
SUBMIT = "MapWorker(MapBatches(Embedder)).submit"  # Ray Data's name of one map_batches call on an actor


@pytest.fixture(scope="module")
def two_node_build(model_dir, tmp_path_factory):
    """`index.build --engine ray` on a two-node local cluster of 1 CPU per node (the head with a dashboard when
    ray[default] is installed), beside the single-process build: the index directories, the items embedded per
    node (as the actors recorded their node ids), the alive nodes, and Ray's state API's embedding tasks."""
    from ray.cluster_utils import Cluster
    tmp = tmp_path_factory.mktemp("raybuild")
    build_index(model_dir, DATA, VIEWS, tmp / "local", split="train", batch_size=24, progress=False)
    state_err = _state_api_error()
    def start() -> Cluster:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": state_err is None})
        started.append(c)
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        return c

    def stop() -> None:  # a head that failed inside Cluster() left nothing to hold on to
        if started:
            started.pop().shutdown()

    started: list = []
    cluster = start_with_retry(start, stop)
    ray.init(address=cluster.address)
    try:
        nodes: Counter = Counter()
        build_index(model_dir, DATA, VIEWS, tmp / "ray", split="train", batch_size=24, progress=False,
                    engine="ray", ray_options={"batch_size": RAY_BATCH, "nodes": nodes})
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        tasks = _finished_tasks(SUBMIT, -(-sum(nodes.values()) // RAY_BATCH)) if state_err is None else None
        yield {"local": tmp / "local", "ray": tmp / "ray", "nodes": nodes, "alive": alive, "tasks": tasks,
               "state_err": state_err}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _finished_tasks(name: str, want: int, timeout: float = 60.0) -> list:
    """Ray's state API's FINISHED tasks called ``name``, once it reports ``want`` of them (task events reach the
    API server a few seconds after the tasks end) or after ``timeout`` s."""
    import time

    from ray.util.state import list_tasks
    t0 = time.time()
    while True:
        tasks = list_tasks(filters=[("name", "=", name), ("state", "=", "FINISHED")], limit=10_000)
        if len(tasks) >= want or time.time() - t0 > timeout:
            return tasks
        time.sleep(1.0)


def test_two_node_build_equals_local(two_node_build):
    """`index.build --engine ray` on two nodes of 1 CPU: its actors ran on both nodes (the node id each actor
    recorded with its output, against ray.nodes), and the index equals the local build's."""
    b = two_node_build
    assert len(b["alive"]) == 2
    assert set(b["nodes"]) == b["alive"], (b["nodes"], b["alive"])  # items were embedded on both nodes
    assert sum(b["nodes"].values()) == 64
    _same_index(b["local"], b["ray"])


def test_two_node_build_seen_by_state_api(two_node_build):
    """Ray's own record of the same build (ray.util.state.list_tasks): the embedding tasks finished on both nodes,
    one per batch, and per node they account for exactly the items the actors say they embedded there."""
    b = two_node_build
    if b["state_err"]:
        pytest.skip(b["state_err"])
    per_node = Counter(t.node_id for t in b["tasks"])
    assert set(per_node) == b["alive"], per_node
    assert sum(per_node.values()) == 64 // RAY_BATCH
    assert {n: c * RAY_BATCH for n, c in per_node.items()} == dict(b["nodes"])
