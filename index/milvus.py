"""An index store in a Milvus collection, with the surface of :class:`index.store.IndexStore` that serving and
``index.build`` use (``add``, ``remove``, ``search``, ``search_items``, ``lookup``, ``ids_of``, ``count``,
``views``, ``manifest``, ``index_types``, ``close``, ``readonly``, ``path``).

Chosen by the index location ``milvus://HOST:PORT[/DB]?collection=NAME`` (``CMC_INDEX``, ``index.build --out``);
pymilvus comes with the optional extra (``pip install -e ".[milvus]"``) and is imported only here, when used.
The same client code talks to Milvus Lite's server (``milvus-lite server``, what the tests run), Milvus
Standalone, Distributed or a managed Milvus. ``CMC_MILVUS_TOKEN`` (or ``?token=``) authenticates if needed.

Layout: one entity per item. ``key`` (VARCHAR) is the primary key, ``id`` (INT64) a random 63-bit id drawn at
each add (the ids ``add`` returns and ``lookup`` takes, new for a key added again), ``metadata`` (JSON), and per
view ``i`` (in the order of the manifest's views) a vector field ``vec_<i>`` and a BOOL ``has_<i>`` (an item may
be added in some views only: its other vectors are zeros, never searched). One insert is therefore one
acknowledged write of every view of the item. The manifest (fingerprint, model_ref, views, index types, search
parameters) is the collection property ``cmc.manifest``.

Consistency: every search and query runs at Milvus's Strong level (the collection's default too), so a write
acknowledged to any client is seen by every search that starts after the acknowledgement, on any replica.
Duplicate keys are refused by a Strong query before the insert; two replicas adding the same new key at the same
moment can both pass that check, and then the later insert replaces the earlier entity (Milvus keeps one entity
per primary key), so the collection never holds a key twice. Index types are chosen by size as
``index/factory.py`` chooses FAISS ones: FLAT, IVF_FLAT (nlist ~ 4 sqrt(N)), HNSW (M = 32), and recorded in the
manifest with their search parameters. Thumbnails are kept by index directories only: this backend keeps none.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import time
from types import SimpleNamespace
from typing import Any, Iterable, Iterator
from urllib.parse import parse_qs, urlsplit

import numpy as np

from index import factory as fac
from index.errors import DuplicateKeyError, NotWritableError, StoreError, UnknownKeyError, WriteFailed
from index.inputs import check_add, check_keys, check_vectors

LOG = logging.getLogger(__name__)

SCHEME = "milvus://"
PROPERTY = "cmc.manifest"
KEY_MAX_BYTES = 65535  # Milvus's VARCHAR limit
JSON_MAX_BYTES = 65536  # Milvus's default limit of a JSON field
CHUNK = 1000  # keys or ids per filter expression
CONNECT_TRIES = 3
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_VIEW_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def is_milvus(ref: Any) -> bool:
    """Whether an index location names a Milvus collection (``milvus://...``)."""
    return isinstance(ref, str) and ref.strip().lower().startswith(SCHEME)


def parse_url(url: str) -> dict[str, str]:
    """``milvus://HOST:PORT[/DB]?collection=NAME[&token=T]`` -> uri, db, collection, token."""
    u = urlsplit(url.strip())
    q = {k: v[-1] for k, v in parse_qs(u.query).items()}
    name = q.get("collection", "")
    if not _NAME.match(name):
        raise StoreError(f"{url!r}: expected milvus://HOST:PORT[/DB]?collection=NAME with a collection name of "
                         f"letters, digits and underscores")
    try:
        host, port = u.hostname or "127.0.0.1", u.port or 19530
    except ValueError as e:
        raise StoreError(f"{url!r}: {e}") from None
    db = u.path.strip("/")
    return {"uri": f"http://{host}:{port}", "db": db, "collection": name,
            "token": q.get("token") or os.environ.get("CMC_MILVUS_TOKEN", "")}


def _lit(values: Iterable[Any]) -> str:
    """A Milvus expression list literal (strings JSON-quoted, which Milvus's parser reads back exactly)."""
    return "[" + ",".join(json.dumps(v, ensure_ascii=False) if isinstance(v, str) else str(int(v))
                          for v in values) + "]"


def choose_index(n: int, dim: int) -> dict[str, Any]:
    """A Milvus index (type, build params, search params) for ``n`` vectors, by ``factory.choose_factory``'s size
    rules: FLAT, IVF_FLAT, then HNSW. The vectors live in the Milvus server's memory, not this process's, so this
    process's memory budget does not apply (and never turns them into PQ codes)."""
    return index_from_factory(fac.choose_factory(n, dim, memory_budget_mb=2**40))


def index_from_factory(f: str) -> dict[str, Any]:
    """A FAISS factory string (``Flat``, ``IVF<n>,Flat``, ``HNSW<M>``) or a Milvus index type -> index entry."""
    s = f.strip()
    up = s.upper()
    if up in ("FLAT", "IVF_FLAT", "HNSW"):
        s = {"FLAT": "Flat", "IVF_FLAT": "IVF1024,Flat", "HNSW": f"HNSW{fac.HNSW_M}"}[up]
    s = fac.normalize_factory(s).replace(fac.ID_PREFIX, "")
    m = re.match(r"^IVF(\d+),", s)
    if m:
        nlist = int(m.group(1))
        return {"type": "IVF_FLAT", "params": {"nlist": nlist},
                "search": {"nprobe": min(nlist, max(16, nlist // 8))}}
    m = re.match(r"^HNSW(\d+)", s)
    if m:
        return {"type": "HNSW", "params": {"M": int(m.group(1)), "efConstruction": 200}, "search": {"ef": 128}}
    if s == "Flat":
        return {"type": "FLAT", "params": {}, "search": {}}
    raise StoreError(f"index type {f!r} has no Milvus counterpart here; use Flat, IVF<nlist>,Flat or HNSW<M>")


@contextlib.contextmanager
def _closed_on_error(client: Any, what: str) -> Iterator[None]:
    """Close ``client`` when the block fails; a failure other than StoreError becomes one, prefixed ``what``."""
    try:
        yield
    except StoreError:
        client.close()
        raise
    except Exception as e:  # noqa: BLE001 - the client's own errors: all are a failure to create or open
        client.close()
        raise StoreError(f"{what}: {e}") from None


class MilvusStore:
    """See the module docstring. Construct with :meth:`create` or :meth:`open`."""

    def __init__(self, url: str, client: Any, collection: str, manifest: dict[str, Any], readonly: bool):
        self.path, self.readonly = url, readonly
        self._c, self._name, self._manifest = client, collection, manifest
        self._fields = {v: i for i, v in enumerate(manifest["views"])}
        self._dims = {v: SimpleNamespace(dim=int(e["dim"])) for v, e in manifest["views"].items()}
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    @staticmethod
    def _connect(url: str) -> tuple[Any, str]:
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise StoreError(f"{url}: the Milvus backend needs pymilvus: pip install -e \".[milvus]\"") from None
        p = parse_url(url)
        for attempt in range(CONNECT_TRIES):  # a busy server can miss the handshake's deadline: try again
            try:
                return MilvusClient(uri=p["uri"], db_name=p["db"], token=p["token"], timeout=30), p["collection"]
            except Exception as e:  # noqa: BLE001 - pymilvus raises MilvusException or grpc errors
                if attempt == CONNECT_TRIES - 1:
                    raise StoreError(f"cannot connect to Milvus at {p['uri']}: {e}") from None
                LOG.warning("connecting to Milvus at %s failed (%s); trying again", p["uri"], e)
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable")

    @classmethod
    def create(cls, url: str, *, views: dict[str, int], fingerprint: str, model_ref: str,
               factory: str | dict[str, str] | None = None, n_hint: int = 0, memory_budget_mb: int = 2048,
               metric: str = "ip", **_: Any) -> "MilvusStore":
        """Create the collection (it must not exist yet) with a vector field per view, and open it for writing."""
        from pymilvus import DataType
        if metric != "ip":
            raise StoreError(f"the Milvus backend indexes inner products only, not {metric!r}")
        if not views:
            raise StoreError("an index needs at least one view")
        client, name = cls._connect(url)
        with _closed_on_error(client, f"cannot create the collection {name!r} at {url}"):
            if client.has_collection(name):
                raise StoreError(f"an index already exists at {url}")
            entries: dict[str, Any] = {}
            for v, dim in views.items():
                if not _VIEW_NAME.match(str(v)):
                    raise StoreError(f"invalid view name {v!r}")
                if not isinstance(dim, (int, np.integer)) or dim <= 0:
                    raise StoreError(f"view {v!r}: dim must be a positive int, got {dim!r}")
                f = factory.get(v) if isinstance(factory, dict) else factory
                ix = index_from_factory(f) if f else choose_index(n_hint, int(dim))
                entries[v] = {"dim": int(dim), "metric": "ip", "field": f"vec_{len(entries)}", **ix}
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=KEY_MAX_BYTES)
            schema.add_field("id", DataType.INT64)
            schema.add_field("metadata", DataType.JSON)
            ip = client.prepare_index_params()
            for i, (v, e) in enumerate(entries.items()):
                schema.add_field(f"has_{i}", DataType.BOOL)
                schema.add_field(e["field"], DataType.FLOAT_VECTOR, dim=e["dim"])
                ip.add_index(field_name=e["field"], index_type=e["type"], metric_type="IP", params=e["params"])
            manifest = {"backend": "milvus", "model_ref": model_ref, "fingerprint": fingerprint,
                        "n_hint": int(n_hint), "views": entries}
            client.create_collection(name, schema=schema, index_params=ip, consistency_level="Strong")
            client.alter_collection_properties(name, properties={PROPERTY: json.dumps(manifest)})
        LOG.info("created Milvus index %s: %s", url, {v: e["type"] for v, e in entries.items()})
        return cls(url, client, name, manifest, False)

    @classmethod
    def open(cls, url: str, *, fingerprint: str | None = None, readonly: bool = False, **_: Any) -> "MilvusStore":
        """Open an existing collection made by :meth:`create` (any number of clients at once)."""
        client, name = cls._connect(url)
        with _closed_on_error(client, f"cannot open the index {url}"):
            if not client.has_collection(name):
                raise StoreError(f"no index at {url}: the collection {name!r} does not exist (build it with "
                                 f"python -m index.build --out '{url}')")
            props = client.describe_collection(name).get("properties") or {}
            if PROPERTY not in props:
                raise StoreError(f"the collection {name!r} at {url} is not a CMC index (no {PROPERTY} property)")
            manifest = json.loads(props[PROPERTY])
            if fingerprint is not None and fingerprint != manifest["fingerprint"]:
                raise StoreError(f"index at {url} was built with model space {manifest['fingerprint']}, this model "
                                 f"is {fingerprint}; rebuild the index with this model")
            client.load_collection(name)
        return cls(url, client, name, manifest, readonly)

    def close(self, snapshot: bool = True) -> None:
        if not self._closed:
            self._closed = True
            self._c.close()

    def __enter__(self) -> "MilvusStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def snapshot(self, *a: Any, **kw: Any) -> None:
        """Seal what was inserted (Milvus's flush); every acknowledged write is durable in its log already."""
        self._call(lambda: self._c.flush(self._name))

    # ------------------------------------------------------------------ calls
    def _call(self, fn: Any, write: bool = False) -> Any:
        if self._closed:
            raise NotWritableError("index is closed")
        try:
            return fn()
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - MilvusException, grpc errors: the server did not answer
            if write:
                raise WriteFailed(f"the write was not acknowledged by Milvus ({self.path}): {e}") from e
            raise NotWritableError(f"Milvus ({self.path}) did not answer: {e}") from e

    def _query(self, expr: str, fields: list[str]) -> list[dict]:
        return list(self._call(lambda: self._c.query(self._name, filter=expr, output_fields=fields,
                                                     consistency_level="Strong")))

    def _rows_for(self, keys: list[str], fields: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for lo in range(0, len(keys), CHUNK):
            for r in self._query(f"key in {_lit(keys[lo:lo + CHUNK])}", fields):
                out[r["key"]] = r
        return out

    # ------------------------------------------------------------------ writes
    def _writable(self) -> None:
        if self.readonly:
            raise NotWritableError("index is open readonly")
        if self._closed:
            raise NotWritableError("index is closed")

    def add(self, keys: list[str], vectors: dict[str, np.ndarray], metadata: list[dict] | None = None) -> np.ndarray:
        """Add items (one entity each, every view in it); returns their int64 ids. Acknowledged = visible."""
        self._writable()
        keys, xs, metadata, texts = check_add(keys, vectors, metadata, self._dims)
        n = len(keys)
        long = next((k for k in keys if len(k.encode("utf-8")) > KEY_MAX_BYTES), None)
        if long is not None:
            raise StoreError(f"key {long[:40]!r}... is longer than {KEY_MAX_BYTES} bytes")
        if any(len(t.encode("utf-8")) > JSON_MAX_BYTES for t in texts):
            raise StoreError(f"metadata of an item is longer than Milvus's {JSON_MAX_BYTES} bytes per JSON field")
        metadata = [json.loads(t) for t in texts]
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        present = self._rows_for(keys, ["key"])
        if present:
            raise DuplicateKeyError(f"key {next(k for k in keys if k in present)!r} already exists "
                                    f"({len(present)} of {n} keys already exist)")
        ids = np.asarray([secrets.randbits(63) for _ in keys], dtype=np.int64)
        rows = []
        for j, k in enumerate(keys):
            row: dict[str, Any] = {"key": k, "id": int(ids[j]), "metadata": metadata[j]}
            for v, i in self._fields.items():
                e = self._manifest["views"][v]
                row[f"has_{i}"] = v in xs
                row[e["field"]] = xs[v][j].tolist() if v in xs else [0.0] * int(e["dim"])
            rows.append(row)
        self._call(lambda: self._c.insert(self._name, rows), write=True)
        return ids

    def remove(self, keys: list[str]) -> int:
        """Remove items by key (all of them, or none if a key is unknown)."""
        self._writable()
        keys = check_keys(keys)
        if not keys:
            return 0
        rows = self._rows_for(keys, ["key"])
        missing = [k for k in keys if k not in rows]
        if missing:
            raise UnknownKeyError(f"unknown key {missing[0]!r} ({len(missing)} of {len(keys)} keys unknown); "
                                  "nothing removed")
        for lo in range(0, len(keys), CHUNK):
            self._call(lambda: self._c.delete(self._name, filter=f"key in {_lit(keys[lo:lo + CHUNK])}"), write=True)
        return len(keys)

    # ------------------------------------------------------------------ reads
    def _search(self, xq: Any, view: str, k: int, fields: list[str]) -> list[list[dict]]:
        xq = check_vectors(xq, view, self._dims, None)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise StoreError(f"k must be a positive int, got {k!r}")
        e = self._manifest["views"][view]
        params = dict(e.get("search") or {})
        if "ef" in params:
            params["ef"] = max(int(params["ef"]), int(k))
        return self._call(lambda: self._c.search(
            self._name, data=xq.tolist(), anns_field=e["field"], limit=int(k),
            filter=f"has_{self._fields[view]} == true",
            output_fields=fields, search_params={"metric_type": "IP", "params": params}, consistency_level="Strong"))

    def search(self, xq: np.ndarray, view: str, k: int, **_: Any) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query: D (nq, k) float32 scores, I (nq, k) int64 ids, -1 padded."""
        res = self._search(xq, view, k, ["id"])
        D = np.full((len(res), int(k)), -np.inf, dtype=np.float32)
        I = np.full((len(res), int(k)), -1, dtype=np.int64)
        for q, hits in enumerate(res):
            for j, h in enumerate(hits):
                D[q, j], I[q, j] = h["distance"], h["entity"]["id"]
        return D, I

    def search_items(self, xq: np.ndarray, view: str, k: int, **_: Any) -> list[list[dict]]:
        """Per query ``[{'id', 'key', 'metadata', 'score'}]``, best first (as ``IndexStore.search_items``)."""
        res = self._search(xq, view, k, ["id", "metadata"])
        return [[{"id": int(h["entity"]["id"]), "key": h["key"], "metadata": h["entity"].get("metadata") or {},
                  "score": float(h["distance"])} for h in hits] for hits in res]

    def lookup(self, ids: Iterable[int]) -> list[dict | None]:
        """``[{'id', 'key', 'metadata'}]`` per id (None for -1 or unknown ids)."""
        ids = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel()]
        want = sorted({i for i in ids if i >= 0})
        found: dict[int, dict] = {}
        for lo in range(0, len(want), CHUNK):
            for r in self._query(f"id in {_lit(want[lo:lo + CHUNK])}", ["key", "id", "metadata"]):
                found[int(r["id"])] = {"id": int(r["id"]), "key": r["key"], "metadata": r.get("metadata") or {}}
        return [found.get(i) for i in ids]

    def ids_of(self, keys: list[str]) -> list[int | None]:
        """The id of each key (None if absent)."""
        rows = self._rows_for(list(keys), ["key", "id"])
        return [int(rows[k]["id"]) if k in rows else None for k in keys]

    # ------------------------------------------------------------------ info
    def _count(self, expr: str) -> int:
        return int(self._query(expr, ["count(*)"])[0]["count(*)"])

    def count(self, view: str | None = None) -> int | dict[str, int]:
        """Live vectors in ``view``, or a dict for all views."""
        if view is None:
            return {v: self.count(v) for v in self._fields}
        if view not in self._fields:
            raise StoreError(f"unknown view {view!r}; this index has views {sorted(self._fields)}")
        return self._count(f"has_{self._fields[view]} == true")

    def __len__(self) -> int:
        return self._count("")

    @property
    def views(self) -> dict[str, int]:
        return {v: int(e["dim"]) for v, e in self._manifest["views"].items()}

    @property
    def manifest(self) -> dict[str, Any]:
        out = json.loads(json.dumps(self._manifest))
        for e in out["views"].values():  # as IndexStore's manifest names them (index.build prints "factory")
            e["factory"], e["search_params"] = e["type"], e["search"]
        return out

    def index_types(self) -> dict[str, str]:
        """Per view, the Milvus index type with its build and search parameters (for /info)."""
        return {v: "milvus " + e["type"] + "".join(f" {k}={x}" for k, x in {**e["params"], **e["search"]}.items())
                for v, e in self._manifest["views"].items()}
