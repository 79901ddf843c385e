"""Atomic file writes: a reader, a crash or a kill sees the old file or the new one, never
half of one. Every file a run or the report writes goes through `atomic_file`.

    with atomic_file(path) as tmp: ...   # write tmp (a Path next to path); then synced and renamed
    write_json(data, path)               # indented JSON, atomically
    write_text(path, text)
    remove_files(folder, names)          # a run's old outputs and their temps, for --fresh
    remove_stale_temps(folder, names)    # what a kill mid-write left of atomic_file's temps
    with folder_lock(folder): ...        # one process at a time in a folder
    file_sha256(path)                    # which file a run started from (T4's --init)
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def previous_path(path: str | Path) -> Path:
    """Where atomic_file(keep_previous=True) keeps the file it replaces: last.pt -> last.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


@contextmanager
def atomic_file(dest: str | Path, keep_previous: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; once the block has written it, it is synced
    and renamed over `dest`, and the folder synced (_sync_folder). An error (or a kill)
    leaves `dest` as it was.

    keep_previous: first rename the current `dest` to previous_path(dest), so a file later
    damaged on disk (a cloud-drive sync, a full disk) has a good predecessor. A kill between
    the two renames leaves no `dest` but an intact predecessor.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; results are not
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        if keep_previous and dest.exists():
            os.replace(dest, previous_path(dest))
        os.replace(tmp, dest)
        _sync_folder(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that the renames in it survive a power loss too (the files' data
    already does). Some file systems (network and FUSE mounts) refuse it: then the renames
    are as durable as that file system makes them."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(data: Any, path: str | Path) -> None:
    """Indented JSON; values JSON cannot hold (paths, dtypes) are written as their str()."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def remove_files(folder: str | Path, names: Sequence[str]) -> list[str]:
    """Delete each of `names` that is a file in `folder`, and what a killed write left of it
    (remove_stale_temps); returns the names deleted. For --fresh: the caller is the one
    writer of these names in `folder`."""
    remove_stale_temps(folder, names)
    removed = [name for name in names if (Path(folder) / name).is_file()]
    for name in removed:
        (Path(folder) / name).unlink()
    return removed


def remove_stale_temps(folder: str | Path, names: Sequence[str], unchanged_for_s: float = 0.0) -> int:
    """Delete the temporary files that atomic_file left for each of `names` in `folder`
    when a kill came mid-write (a checkpoint's is as large as the checkpoint). Only for a
    folder no other process is writing, unless `unchanged_for_s` spares every temp written
    to within that many seconds: a live write's. Returns how many were deleted."""
    now = time.time()
    stale = [p for name in names for p in Path(folder).glob(f".{glob.escape(name)}.*.tmp")
             if p.is_file() and now - p.stat().st_mtime >= unchanged_for_s]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


# A temp this long untouched is no live write's (atomic_file writes in seconds): safe to delete
# in a folder other commands may be writing (T3's and T4's --out, the report's).
STALE_TEMP_S = 600.0


@contextmanager
def folder_lock(folder: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (flock on the folder itself, so no lock file is left;
    released when the block ends or the process does, however it ends). wait=False raises
    BlockingIOError at once if another process (or another open of it here) holds it.
    Without fcntl (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:  # BlockingIOError (held) is raised; a file system without flock is not
            if isinstance(err, BlockingIOError) or err.errno not in _NO_FLOCK:
                raise
            print(f"note: {folder} cannot be locked ({err.strerror}): nothing keeps a second "
                  f"process out of it", file=sys.stderr)
        yield
    finally:
        os.close(fd)


# What flock raises where the file system has none (Lustre without -o flock, NFS without
# lockd, some SMB and FUSE mounts): there the folder goes unlocked, as on Windows.
_NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
