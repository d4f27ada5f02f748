"""python -m index.search: cross-view search from the command line.

    python -m index.search --index DIR --view L --target-view ab --image photo.png -k 5
    python -m index.search --index DIR --view depth --target-view rgb --data scenes --items 0,1,2

Queries are embedded through the ONNX runtime in their own view and searched in the index of
``--target-view`` (which may equal ``--view``); ``--nprobe`` / ``--ef-search`` override the tuned defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from models.card import CardError
from models.data import DataError
from models.runtime import InputError, Runtime
from models.views import source_key
from .build import store_class
from .store import IndexStore, StoreError


def search(store: IndexStore, rt: Runtime, view: str, target_view: str, items: list, k: int = 10,
           **kw) -> list[list[dict]]:
    """Embed ``items`` (bytes or arrays) in ``view``; top-k items of ``target_view`` per query."""
    xq = rt.embed_items(view, items)  # (nq, D)
    return store.search_items(xq, target_view, k, **kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m index.search", description="Search an index across views.")
    p.add_argument("--index", required=True, help="index directory, or milvus://HOST:PORT[/DB]?collection=NAME")
    p.add_argument("--model", default=None, help="model reference (default: the index's model)")
    p.add_argument("--view", required=True, help="view of the query")
    p.add_argument("--target-view", default=None, help="view to search in (default: the query's view)")
    p.add_argument("--image", action="append", default=[], help="query image file (repeatable)")
    p.add_argument("--vector", action="append", default=[], help="query vector as JSON list (vector views)")
    p.add_argument("--data", default=None, help="take queries from a data spec's test split...")
    p.add_argument("--items", default="0", help="...at these comma-separated positions")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--ef-search", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    try:
        store = store_class(a.index).open(a.index, readonly=True)  # a directory or milvus://...
        rt = Runtime(a.model or store.manifest["model_ref"])
        if store.manifest["fingerprint"] != rt.fingerprint:
            raise StoreError(f"index {a.index} was built with model space {store.manifest['fingerprint']}, "
                             f"model {rt.path} is {rt.fingerprint}")
        target = a.target_view or a.view
        if a.image:
            items = [Path(f).read_bytes() for f in a.image]
        elif a.vector:
            items = [json.loads(v) for v in a.vector]
        elif a.data:
            from models import data as datasets
            ds = datasets.load(a.data, "test", image_size=rt.image_size)
            pos = [int(i) for i in a.items.split(",")]
            arr = ds.sources[source_key(a.view, rt.view(a.view))]
            items = [arr[i] for i in pos]
        else:
            raise InputError("give --image, --vector or --data")
        res = search(store, rt, a.view, target, items, a.k, nprobe=a.nprobe, ef_search=a.ef_search)
    except (StoreError, CardError, InputError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    for qi, hits in enumerate(res):
        print(f"query {qi} ({a.view} -> {target})")
        print(f"  {'rank':>4} {'score':>7}  {'key':<28} metadata")
        for r, h in enumerate(hits, 1):
            print(f"  {r:>4} {h['score']:>7.4f}  {h['key']:<28} {json.dumps(h['metadata'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
