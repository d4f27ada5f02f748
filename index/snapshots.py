"""Snapshots of an index directory: FAISS files named by ``manifest.json`` (``index/manifest.py``), the one
commit point.

A snapshot never moves or overwrites a file that the committed manifest names. It writes each view to a new
file ``<view>.<seq>.<token>.faiss`` straight from the live index (:class:`NewFiles`; no serialized copy, so it
needs no second view's worth of memory), fsyncs and hashes it by streaming it back, fsyncs the directory, then
has ``index.manifest`` commit the next manifest (tmp + fsync + rename + directory fsync): it names, per view,
the new file as ``snapshot`` and the old current one as ``previous`` (each ``{file, sha256, seq}``). Only then
are files that the new manifest does not name deleted. A crash or an ``OSError`` at any step leaves the old
manifest and every file it names intact; stray files are removed by the next snapshot.

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
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Collection

import faiss

from index import manifest as mf
from index import ondisk
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
    """The index of ``spec[which]`` from the first candidate file whose sha256 matches, else None. The IVF
    file of an on-disk view (``storage: disk``) is memory-mapped (``index/ondisk.py``)."""
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
            return ondisk.read_index(fp, mf.storage(spec)), name
        except (OSError, RuntimeError) as e:  # its checksum matched, yet FAISS cannot read it: real damage
            LOG.warning("%s: checksum matches but FAISS cannot read it: %s", fp, e)
    return None


def write_file(fp: Path, writer: Callable[[Path], Any]) -> None:
    """Write one new snapshot file (a new name: nothing named by the manifest is touched); the fault tests
    replace this hook."""
    writer(fp)


class NewFiles:
    """The new files of one snapshot at ``seq``, written straight from the live indexes (no in-memory copy):
    :meth:`write` runs under the store's read lock (searches go on; writes wait for the disk write, where a
    serialized copy only made them wait for a memcpy but needed a second view's worth of memory);
    :func:`write_snapshot` then fsyncs and hashes them by streaming, with no store lock held, and commits."""

    def __init__(self, path: Path, seq: int) -> None:
        self.path, self.seq, self.token = path, seq, os.urandom(3).hex()
        self.files: dict[str, Path] = {}

    def write(self, name: str, writer: Callable[[Path], Any]) -> None:
        """``writer(fp)`` writes view ``name`` to the new file ``fp`` (``faiss.write_index``, or an on-disk
        view's list-by-list merge)."""
        fp = self.path / f"{name}.{self.seq}.{self.token}.faiss"
        self.files[name] = fp
        write_file(fp, writer)

    def write_index(self, name: str, index: faiss.Index) -> None:
        self.write(name, lambda fp: faiss.write_index(index, str(fp)))

    def finish(self) -> dict[str, dict[str, Any]]:
        """fsync every file and hash it (streamed): the manifest entries ``{file, sha256, seq}``."""
        entries = {}
        for name, fp in self.files.items():
            _fsync_path(fp)
            entries[name] = {"file": fp.name, "sha256": _sha256(fp), "seq": self.seq}
        return entries

    def discard(self, keep: Collection[str] = ()) -> None:
        for fp in self.files.values():
            if fp.name not in keep:
                with contextlib.suppress(OSError):
                    fp.unlink()


def write_snapshot(path: Path, disk: dict[str, Any], files: NewFiles, seq: int,
                   states: dict[str, dict[str, Any]], bad: Collection[tuple] = ()) -> dict[str, Any]:
    """Commit ``files`` (views written at ``seq``; any subset of the views): fsync and hash them, commit a
    manifest whose previous snapshots are ``disk``'s current ones, delete unnamed files; returns the committed
    manifest. A current snapshot in ``bad`` (by ``entry_id``: its file was found corrupt) never becomes a
    previous one: that view keeps its previous snapshot, the one a recovery loaded. ``states[view]`` updates
    the view's spec; its ``build`` goes into the new snapshot entry. The caller holds the snapshot lock; on
    OSError the committed state is unchanged and the new files are removed."""
    try:
        entries = files.finish()
        _fsync_path(path)
        new = mf.advance(disk, entries, states, bad)
        mf.commit_manifest(path, new)
    except BaseException:
        # the rename may have happened before the failure (e.g. of the directory fsync): keep what it names;
        # when it cannot be read, delete nothing now (the next snapshot collects the garbage)
        keep = mf.committed_files(path)
        if keep is not None:
            files.discard(keep)
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
