"""python -m index.evaluate: cross-view recall through real FAISS indexes, and ANN recall against exact.

    python -m index.evaluate --model cmc:latest --data scenes --pairs L:ab,depth:L,ab:L
    python -m index.evaluate --model DIR --data cifar10:../shared/data/cifar10.npz --pairs L:ab

For every pair q:g, the held-out items are indexed in view g; item n queried in view q must find item n
(recall@1, @10). A random-embedding baseline (random unit vectors, same protocol) is reported beside it.
``--ann FACTORY`` also builds that index type and reports its recall@10 against the exact index.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np

from models import data as datasets
from models.card import CardError
from models.data import DataError
from models.runtime import InputError, Runtime
from .recall import exact_knn, overlap
from .store import IndexStore, StoreError


def recall_at(I: np.ndarray, truth: np.ndarray, ks=(1, 10)) -> dict[str, float]:
    """I (nq, k) retrieved ids, truth (nq,) the positive's id."""
    return {f"R@{k}": float((I[:, :k] == truth[:, None]).any(1).mean()) for k in ks}


def cross_view(xq: np.ndarray, xb: np.ndarray, factory: str = "IDMap2,Flat", k: int = 10) -> tuple[dict, np.ndarray]:
    """Index xb (ids 0..n-1) in a temporary store and query with xq; recall of item n for query n."""
    with tempfile.TemporaryDirectory() as d:
        store = IndexStore.create(d, views={"g": xb.shape[1]}, fingerprint="eval", model_ref="eval", factory=factory)
        ids = store.add([str(i) for i in range(len(xb))], {"g": xb})
        if "HNSW" in factory or "IVF" in factory:
            gt = exact_knn(xq[:200], xb, k)[1]
            store.tune_search("g", xq[:200], ids[gt])
        _, I = store.search(xq, "g", k)
        store.close(snapshot=False)
    return recall_at(I, ids), I


def evaluate(rt: Runtime, spec: str, pairs: list[tuple[str, str]], limit: int = 0, ann: str | None = None,
             seed: int = 0) -> dict:
    ds = datasets.load(spec, "test", image_size=rt.image_size)
    if limit:
        ds = ds.subset(np.arange(min(limit, len(ds))))
    views = sorted({v for p in pairs for v in p})
    z = {v: rt.embed_sources(v, ds.sources) for v in views}
    rng = np.random.default_rng(seed)
    out = {"data": spec, "n": len(ds), "pairs": {}}
    for q, g in pairs:
        rec, I_exact = cross_view(z[q], z[g])
        rnd = rng.standard_normal((len(ds), rt.dim)).astype(np.float32)
        rnd /= np.linalg.norm(rnd, axis=1, keepdims=True)
        base, _ = cross_view(rnd, z[g])
        row = {"cmc": rec, "random": base}
        if ann:
            _, I_ann = cross_view(z[q], z[g], ann)
            row["ann_recall@10_vs_exact"] = overlap(I_ann, I_exact, 10)
        out["pairs"][f"{q}->{g}"] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m index.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model reference (default cmc:latest)")
    p.add_argument("--data", default="scenes", help="data spec; its test split is indexed")
    p.add_argument("--pairs", default="L:ab,ab:L", help="query:gallery view pairs")
    p.add_argument("--limit", type=int, default=0, help="use the first N held-out items")
    p.add_argument("--ann", default=None, help="also compare this faiss factory (e.g. IDMap2,HNSW32,Flat) to exact")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    try:
        rt = Runtime(a.model)
        pairs = [tuple(x.split(":")) for x in a.pairs.split(",")]
        for pr in pairs:
            if len(pr) != 2:
                raise InputError(f"--pairs wants query:gallery, got {':'.join(pr)!r}")
            rt.view(pr[0]), rt.view(pr[1])
        res = evaluate(rt, a.data, pairs, a.limit, a.ann)
    except (StoreError, CardError, InputError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"cross-view retrieval on {res['n']} held-out items of {res['data']}")
    print(f"{'query->gallery':<16} {'R@1':>7} {'R@10':>7} {'random R@1':>11} {'random R@10':>12}" +
          (f" {'ANN R@10 vs exact':>18}" if a.ann else ""))
    for name, r in res["pairs"].items():
        print(f"{name:<16} {100 * r['cmc']['R@1']:>6.1f}% {100 * r['cmc']['R@10']:>6.1f}% "
              f"{100 * r['random']['R@1']:>10.1f}% {100 * r['random']['R@10']:>11.1f}%" +
              (f" {100 * r['ann_recall@10_vs_exact']:>17.1f}%" if a.ann else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
