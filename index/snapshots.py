"""Snapshots of an index directory: FAISS files named by ``manifest.json`` (``index/manifest.py``), the one
commit point.

A snapshot never moves or overwrites a file that the committed manifest names. It writes each view to a new
file ``<view>.<seq>.<token>.faiss`` (fsync), fsyncs the directory, then has ``index.manifest`` commit the next
manifest (tmp + fsync + rename + directory fsync): it names, per view, the new file as ``snapshot`` and the old
current one as ``previous`` (each ``{file, sha256, seq}``). Only then are files that the new manifest does not
name deleted. A crash or an ``OSError`` at any step leaves the old manifest and every file it names
intact; stray files are removed by the next snapshot.

One process at a time writes snapshots: :class:`SnapshotLock` flocks ``LOCK`` and writes the holder's pid
into it, so a "lock held" error names the holder. The same class flocks ``BUILD`` for the one process that
trains or rebuilds a view's index (``index/maintenance.py``).

Each snapshot entry may carry ``build``: the number of the index structure it holds (0 for the structure the
view was created with; the view's ``builds`` counts the trainings and rebuilds committed so far), so that
every process can tell that another one committed a new structure and load it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Collection

import faiss
import numpy as np

from index import manifest as mf
from index.durable import _fsync_path, _sha256

LOG = logging.getLogger(__name__)


class SnapshotLockHeld(RuntimeError):
    """Another process holds the snapshot lock (the message names its pid)."""


class SnapshotLock:
    """``flock(LOCK)``: exclusive, held only while a snapshot is written; the file holds the holder's pid.
    ``name="BUILD"``: the lock of the process that builds a view's new index."""

    def __init__(self, path: Path, name: str = "LOCK") -> None:
        self.file = path / name
        self.what = "snapshot" if name == "LOCK" else name.lower()
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            return self.file.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self, timeout: float = 0.0) -> None:
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 >= timeout:
                    os.close(fd)
                    raise SnapshotLockHeld(f"the {self.what} lock {self.file} is held by pid {self.holder()}") from None
                time.sleep(0.05)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def read_view(path: Path, spec: dict[str, Any], which: str) -> tuple[faiss.Index, str] | None:
    """The index of ``spec[which]`` from the first candidate file whose sha256 matches, else None."""
    snap = spec.get(which)
    if not snap:
        return None
    for name in mf.candidates(spec, which):
        fp = path / name
        try:
            if _sha256(fp) != snap["sha256"]:
                continue
        except OSError as e:  # missing, or deleted by a newer snapshot meanwhile
            LOG.debug("%s: %s", fp, e)
            continue
        try:
            return faiss.read_index(str(fp)), name
        except (OSError, RuntimeError) as e:  # its checksum matched, yet FAISS cannot read it: real damage
            LOG.warning("%s: checksum matches but FAISS cannot read it: %s", fp, e)
    return None


def write_file(fp: Path, blob: np.ndarray) -> None:
    """Write and fsync one snapshot file (a new name: nothing named by the manifest is touched)."""
    with open(fp, "wb") as f:
        f.write(memoryview(blob))
        f.flush()
        os.fsync(f.fileno())


def write_snapshot(path: Path, disk: dict[str, Any], blobs: dict[str, np.ndarray], seq: int,
                   states: dict[str, dict[str, Any]], bad: Collection[tuple] = ()) -> dict[str, Any]:
    """Write ``blobs[view]`` (serialized indexes at ``seq``; any subset of the views) as new files, commit a
    manifest whose previous snapshots are ``disk``'s current ones, delete unnamed files; returns the committed
    manifest. A current snapshot in ``bad`` (by ``entry_id``: its file was found corrupt) never becomes a
    previous one: that view keeps its previous snapshot, the one a recovery loaded. ``states[view]`` updates
    the view's spec; its ``build`` goes into the new snapshot entry. The caller holds the snapshot lock; on
    OSError the committed state is unchanged and the new files are removed."""
    token = os.urandom(3).hex()
    written: list[Path] = []
    entries: dict[str, dict[str, Any]] = {}
    try:
        for name, blob in blobs.items():
            fname = f"{name}.{seq}.{token}.faiss"
            fp = path / fname
            written.append(fp)
            write_file(fp, blob)
            entries[name] = {"file": fname, "sha256": hashlib.sha256(memoryview(blob)).hexdigest(), "seq": seq}
        _fsync_path(path)
        new = mf.advance(disk, entries, states, bad)
        mf.commit_manifest(path, new)
    except BaseException:
        # the rename may have happened before the failure (e.g. of the directory fsync): keep what it names;
        # when it cannot be read, delete nothing now (the next snapshot collects the garbage)
        keep = mf.committed_files(path)
        for fp in written if keep is not None else []:
            if fp.name not in keep:
                with contextlib.suppress(OSError):
                    fp.unlink()
        raise
    collect_garbage(path, new)
    return new


def collect_garbage(path: Path, manifest: dict[str, Any]) -> None:
    """Delete snapshot files (and temporaries) that ``manifest`` does not name."""
    keep = mf.named_files(manifest)
    for fp in path.iterdir():
        n = fp.name
        if n in keep or not (n.endswith(".faiss") or n.endswith(".faiss.prev") or n.endswith(".faiss.tmp")
                             or mf.is_temporary(n)):
            continue
        with contextlib.suppress(OSError):
            fp.unlink()
