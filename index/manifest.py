"""The manifest of an index directory, ``manifest.json``: the one commit point of its snapshots. This module alone
reads and writes it and knows its fields; the store, snapshots, maintenance, loading and every tool ask it.

Fields: ``format_version``, ``model_ref``, ``fingerprint`` (the model's embedding space), ``created``,
``updated``, ``n_hint``, ``memory_budget_mb`` and, per view, ``dim``, ``metric``, ``factory``, ``storage`` (``"disk"``
for an IVF view whose lists are memory-mapped from its snapshot file; absent: in RAM), ``count``, ``file``
(the single file name of older manifests), ``snapshot`` and ``previous`` (``{file, sha256, seq, build}``: the
current snapshot file and the one before it), ``search_params``, ``pending_training`` and ``builds`` (how many
trainings and rebuilds were committed). A manifest is replaced atomically (:func:`commit_manifest`), never edited
in place; :func:`advance` makes the next one from the committed one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Collection

from index.durable import _atomic_write, _now, _sha256

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an index (a committed manifest)."""
    return (Path(path) / MANIFEST).exists()


def stat_key(path: Path) -> tuple | None:
    """What changes when another manifest is committed (inode, mtime, size); None when there is none."""
    try:
        st = os.stat(path / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_manifest(path: Path) -> dict[str, Any]:
    """The committed manifest (FileNotFoundError when there is none, ValueError for another format version)."""
    mpath = path / MANIFEST
    if not mpath.exists():
        raise FileNotFoundError(f"no index at {path} (missing {MANIFEST})")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"index at {path} has format version {manifest.get('format_version')}, "
                         f"this code reads {FORMAT_VERSION}")
    return normalize(path, manifest)


def committed_files(path: Path) -> set[str] | None:
    """The files the manifest on disk names, as it is (None when it cannot be read)."""
    try:
        return named_files(json.loads((path / MANIFEST).read_text()))
    except (OSError, ValueError, KeyError):
        return None


def commit_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """The commit point: atomically replace manifest.json (tmp, fsync, rename, fsync the directory)."""
    _atomic_write(path / MANIFEST, json.dumps(manifest, indent=2).encode())


def is_temporary(name: str) -> bool:
    """The manifest's temporary file (left by a crash before the rename)."""
    return name == MANIFEST + ".tmp"


def new_manifest(model_ref: str, fingerprint: str, views: dict[str, dict[str, Any]], n_hint: int,
                 memory_budget_mb: int) -> dict[str, Any]:
    """The manifest of a new index (no snapshot yet); ``views`` from :func:`view_entry`."""
    return {"format_version": FORMAT_VERSION, "model_ref": model_ref, "fingerprint": fingerprint, "created": _now(),
            "updated": _now(), "n_hint": n_hint, "memory_budget_mb": memory_budget_mb, "views": views}


def view_entry(name: str, dim: int, metric: str, factory: str, storage: str = "ram") -> dict[str, Any]:
    """A new view's entry (``factory`` already normalized; ``storage`` "disk": IVF lists memory-mapped)."""
    entry = {"dim": dim, "metric": metric, "factory": factory, "count": 0, "file": f"{name}.faiss", "snapshot": None,
             "previous": None, "search_params": {}, "pending_training": False, "builds": 0}
    return entry | ({"storage": storage} if storage != "ram" else {})


def storage(spec: dict[str, Any]) -> str:
    """Where a view's index lives: "ram" (older manifests name none), or "disk" (``index/ondisk.py``)."""
    return spec.get("storage") or "ram"


def manifest_seq(manifest: dict[str, Any]) -> int:
    """The seq that every view's current snapshot covers."""
    return min(((s.get("snapshot") or {}).get("seq", 0) for s in manifest["views"].values()), default=0)


def candidates(spec: dict[str, Any], which: str) -> list[str]:
    """File names that may hold ``spec[which]`` (older manifests named no file: ``<view>.faiss[.prev]``)."""
    snap = spec.get(which) or {}
    if snap.get("file"):
        return [snap["file"]]
    return [spec["file"], spec["file"] + ".prev"]


def entry_id(snap: dict[str, Any]) -> tuple:
    """What names one snapshot entry (file names are unique; older manifests may lack one)."""
    return snap.get("file"), snap.get("sha256"), snap.get("seq")


def named_files(manifest: dict[str, Any]) -> set[str]:
    return {f for s in manifest["views"].values() for w in ("snapshot", "previous") if s.get(w)
            for f in candidates(s, w)}


def set_search_params(manifest: dict[str, Any], view: str, params: dict[str, int]) -> None:
    """Record a view's tuned search parameters (committed with the next snapshot)."""
    manifest["views"][view]["search_params"] = params


def search_params(manifest: dict[str, Any], view: str) -> dict[str, int]:
    return dict(manifest["views"][view].get("search_params") or {})


def advance(disk: dict[str, Any], entries: dict[str, dict[str, Any]], states: dict[str, dict[str, Any]],
            bad: Collection[tuple] = ()) -> dict[str, Any]:
    """The manifest after a snapshot: ``entries[view]`` (``{file, sha256, seq}``, any subset of the views) become
    current, ``disk``'s current ones previous, except a current entry in ``bad`` (by :func:`entry_id`: its file
    was found corrupt), which never becomes a previous one: that view keeps its previous snapshot, the one a
    recovery loaded. ``states[view]`` updates the view's fields; its ``build`` goes into the new entry."""
    new = json.loads(json.dumps(disk))
    for name, entry in entries.items():
        spec, state = new["views"][name], dict(states[name])
        if not spec.get("snapshot") or entry_id(spec["snapshot"]) not in bad:
            spec["previous"] = dict(spec["snapshot"]) if spec.get("snapshot") else None
        spec["snapshot"] = {**entry, "build": int(state.pop("build", 0))}
        spec.update(state)
    new["updated"] = _now()
    return new


def normalize(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Older manifests name one file per view (``<view>.faiss``, rotated to ``.prev``): record in each
    snapshot entry the file that holds it now (by sha256), so that later snapshots never touch it."""
    for spec in manifest["views"].values():
        for which in ("snapshot", "previous"):
            snap = spec.get(which)
            if not snap or snap.get("file"):
                continue
            for name in candidates(spec, which):
                if (path / name).exists() and _sha256(path / name) == snap["sha256"]:
                    snap["file"] = name
                    break
    return manifest
