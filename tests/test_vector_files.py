"""index.build --data vectors:DIR (index/vector_files.py): embeddings computed elsewhere build the same index as
the model embedding the data itself, every bad file or row is refused by name before anything is written, and
a large file is read without its pages staying resident."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_cli
from index import factory as fac
from index.build import build_index
from index.store import IndexStore
from index.vector_files import VectorFiles, write_npy_header
from models.data import DataError
from models.runtime import Runtime


def _write(d, vectors: dict, keys=None):
    d.mkdir(parents=True, exist_ok=True)
    for v, x in vectors.items():
        np.save(d / f"{v}.npy", x)
    if keys is not None:
        (d / "keys.txt").write_text("\n".join(keys) + "\n")
    return d


def _stored(out):
    with IndexStore.open(out, readonly=True) as s:
        items = [m for m in s.lookup(range(len(s) + 5)) if m is not None]
        keys = sorted(m["key"] for m in items)
        ids = s.ids_of(keys)
        vec = {v: np.stack([s.index_of(v).reconstruct(int(i)) for i in ids]) for v in s.views}
        meta = {m["key"]: m["metadata"] for m in items}
    return keys, vec, meta


def test_vectors_build_equals_embedding_build(trained_artifact, tmp_path):
    """The model's own embeddings of 100 scenes, saved as L.npy (float32) and ab.npy (float64) with the data's
    keys: the index equals the one the model builds from the scenes (keys, vectors), and it answers alike."""
    rt = Runtime(trained_artifact["dir"])
    ds = trained_artifact["test"].subset(np.arange(100))
    emb = {"L": rt.embed_sources("L", ds.sources), "ab": rt.embed_sources("ab", ds.sources).astype(np.float64)}
    src = _write(tmp_path / "vec", emb, ds.keys)
    a = build_index(rt, ds, ["L", "ab"], tmp_path / "from_data", batch_size=32, progress=False)
    b = build_index(rt, f"vectors:{src}", ["L", "ab"], tmp_path / "from_vectors", batch_size=32, progress=False)
    ka, va, _ = _stored(a)
    kb, vb, meta = _stored(b)
    assert ka == kb == sorted(ds.keys)
    for v in ("L", "ab"):
        np.testing.assert_allclose(va[v], vb[v], atol=1e-6, rtol=0)
    assert all("split" not in m and "label" not in m for m in meta.values())  # no labels were given
    with IndexStore.open(b, fingerprint=rt.fingerprint, readonly=True) as s:  # the model's space
        hits = s.search_items(emb["L"][:5], "ab", 3)
    assert len(hits) == 5 and all(len(h) == 3 for h in hits)


def test_keyless_vectors_are_numbered_by_row(trained_artifact, tmp_path):
    rt = Runtime(trained_artifact["dir"])
    x = rt.embed_sources("L", trained_artifact["test"].subset(np.arange(30)).sources)
    out = build_index(rt, f"vectors:{_write(tmp_path / 'v', {'L': x})}", ["L"], tmp_path / "i", batch_size=7,
                      progress=False)
    keys, vec, _ = _stored(out)
    assert keys == sorted(f"vec-{i}" for i in range(30))
    with IndexStore.open(out, readonly=True) as s:
        np.testing.assert_allclose(s.index_of("L").reconstruct(int(s.ids_of(["vec-17"])[0])), x[17], atol=1e-6)


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file"),
    ("dim", "8-d vectors, but view 'L'"),
    ("rows", "different row counts"),
    ("nan", "row 41 holds NaN"),
    ("norm", "row 7 has L2 norm 2.0000"),
    ("fortran", "Fortran-order"),
    ("int", "dtype int32"),
    ("keys", "9 keys for 50 rows"),
    ("truncated", "truncated"),
    ("notnpy", "not a readable .npy"),
])
def test_bad_vector_files_are_refused_by_name_before_anything_is_written(trained_artifact, tmp_path, case, match):
    """Through the CLI: exit 2, one line naming the file and the problem, and no index directory."""
    dim = Runtime(trained_artifact["dir"]).dim
    d = tmp_path / "v"
    x, y = _unit(50, dim), _unit(50, dim, 1)
    if case == "missing":
        _write(d, {"L": x})
    elif case == "dim":
        _write(d, {"L": _unit(50, 8), "ab": y})
    elif case == "rows":
        _write(d, {"L": x, "ab": y[:40]})
    elif case == "nan":
        x[41, 3] = np.nan
        _write(d, {"L": x, "ab": y})
    elif case == "norm":
        x[7] *= 2
        _write(d, {"L": x, "ab": y})
    elif case == "fortran":
        _write(d, {"L": np.asfortranarray(x), "ab": y})
    elif case == "int":
        _write(d, {"L": (x * 100).astype(np.int32), "ab": y})
    elif case == "keys":
        _write(d, {"L": x, "ab": y}, keys=[f"k{i}" for i in range(9)])
    elif case == "truncated":
        _write(d, {"L": x, "ab": y})
        raw = (d / "L.npy").read_bytes()
        (d / "L.npy").write_bytes(raw[:-100])
    elif case == "notnpy":
        _write(d, {"ab": y})
        (d / "L.npy").write_text("L,1,2,3\n")
    r = run_cli(["-m", "index.build", "--model", str(trained_artifact["dir"]), "--data", f"vectors:{d}",
                 "--views", "L,ab", "--batch-size", "16", "--out", str(tmp_path / "idx")])
    assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
    assert match in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "idx").exists()


def test_ray_engine_with_vectors_is_refused(trained_artifact, tmp_path):
    dim = Runtime(trained_artifact["dir"]).dim
    d = _write(tmp_path / "v", {"L": _unit(10, dim)})
    r = run_cli(["-m", "index.build", "--model", str(trained_artifact["dir"]), "--data", f"vectors:{d}",
                 "--views", "L", "--engine", "ray", "--out", str(tmp_path / "idx")])
    assert r.returncode == 2 and "embedded already" in r.stderr, r.stderr[-2000:]


READ_CHILD = r"""
import json, sys
from pathlib import Path
from index.vector_files import VectorFiles

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

vf = VectorFiles("vectors:" + sys.argv[1], ["L"], int(sys.argv[2]))
base = rss()
vf.check(batch_size=8192)
total = 0
for c in vf.chunks(8192):
    total += len(c)
print(json.dumps({"rows": total, "rss_growth": rss() - base}))
"""


def test_a_large_file_is_read_without_staying_resident(tmp_path):
    """A 160 MiB vectors file, written chunk by chunk (write_npy_header), is checked and read in full, and the
    reader's resident memory grows by a small part of the file (a mapped file's pages would stay counted)."""
    n, dim, chunk = 327_680, 128, 32_768
    d = tmp_path / "v"
    d.mkdir()
    with open(d / "L.npy", "wb") as f:
        write_npy_header(f, n, dim)
        for lo in range(0, n, chunk):
            f.write(_unit(chunk, dim, lo).tobytes())
    size = (d / "L.npy").stat().st_size
    assert VectorFiles(f"vectors:{d}", ["L"], dim).n == n
    np.testing.assert_array_equal(np.load(d / "L.npy", mmap_mode="r")[chunk:chunk + 3], _unit(chunk, dim, chunk)[:3])
    r = subprocess.run([sys.executable, "-c", READ_CHILD, str(d), str(dim)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["rows"] == n
    assert got["rss_growth"] < size / 8, (got, size)  # one chunk is 4 MiB of a 160 MiB file


def test_vector_files_api_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        VectorFiles(f"vectors:{tmp_path / 'nope'}", ["L"], 4)


def test_build_tunes_nprobe_for_queries_that_are_not_stored(trained_artifact, tmp_path):
    """The build tunes nprobe on stored items leave-one-out: each finds itself in its own list at any nprobe,
    so self-queries tuned nprobe 1. On uniform random vectors (no cluster structure to help), the tuned nprobe
    gives held-out queries recall@10 near the 0.95 target, where nprobe 1 gives far less."""
    from index.recall import exact_knn, overlap
    dim = Runtime(trained_artifact["dir"]).dim
    x, q = _unit(20_000, dim, 3), _unit(200, dim, 4)
    d = _write(tmp_path / "v", {"L": x})
    out = build_index(Runtime(trained_artifact["dir"]), f"vectors:{d}", ["L"], tmp_path / "i", factory="IVF64,Flat",
                      batch_size=4096, progress=False)
    gt = exact_knn(q, x, 10)[1]
    with IndexStore.open(out, readonly=True) as s:
        rows = lambda ids: np.array([[int(m["key"][4:]) for m in s.lookup(r)] for r in ids])  # noqa: E731
        choice = s.manifest["views"]["L"]["choice"]
        tuned = overlap(rows(s.search(q, "L", 10)[1]), gt, 10)
        one = overlap(rows(s.search(q, "L", 10, nprobe=1)[1]), gt, 10)
    assert choice["built_nprobe"] > 1 and choice["built_recall"] >= 0.95, choice
    assert tuned >= 0.9 and one < 0.6, (tuned, one, choice)


def test_given_queries_choose_and_tune_the_build(trained_artifact, tmp_path):
    """``index.build --queries vectors:DIR``: rows unlike the queries (tests/test_index_budget.py's ``_expanded``:
    each item indexed with its noisy copies) within 2 MiB. The choice and the nprobe tuning measure the 200 given
    queries (recorded as such), the recall the build records is the given queries' recall through the store
    against exact search, and 100 other queries of their distribution get it within 0.07 at the tuned default.
    A query file of the wrong width is refused by name, before anything is written."""
    from test_index_budget import _expanded
    from index.recall import exact_knn, overlap
    rt = Runtime(trained_artifact["dir"])
    x, q = _expanded(rt.dim, copies=12)
    data, qdir = _write(tmp_path / "rows", {"L": x}), _write(tmp_path / "queries", {"L": q[:200]})
    out = build_index(rt, f"vectors:{data}", ["L"], tmp_path / "idx", memory_budget_mb=2, queries=f"vectors:{qdir}",
                      batch_size=2000, progress=False)
    with IndexStore.open(out, readonly=True) as s:
        spec = s.manifest["views"]["L"]
        c = spec["choice"]
        assert not fac.holds_raw(spec["factory"]), spec  # 12k x 128 floats (6 MiB) over 2 MiB: compressed
        assert c["queries_from"] == "given" and c["built_queries_from"] == "given" and c["built_queries"] == 200, c

        def recall(qs: np.ndarray) -> float:  # at the store's default (tuned) nprobe; keys vec-<row> -> rows
            ids = s.search(qs, "L", 10)[1]
            got = np.array([int(m["key"][4:]) if m else -1 for m in s.lookup(ids.ravel())]).reshape(ids.shape)
            return overlap(got, exact_knn(qs, x, 10)[1], 10)

        mine, other = recall(q[:200]), recall(q[200:])
    print(spec["factory"], c["built_recall"], "given", mine, "other", other)
    assert abs(mine - c["built_recall"]) <= 0.01, (mine, c)
    assert other >= c["built_recall"] - 0.07, (other, c)
    bad = _write(tmp_path / "badq", {"L": q[:10, :rt.dim // 2]})
    r = run_cli(["-m", "index.build", "--model", str(trained_artifact["dir"]), "--data", f"vectors:{data}",
                 "--views", "L", "--queries", f"vectors:{bad}", "--out", str(tmp_path / "idx2")])
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "idx2").exists()
