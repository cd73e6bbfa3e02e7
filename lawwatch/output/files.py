"""Crash-safe file primitives: whole-or-absent writes, and one writer per directory.

:func:`replace_file` replaces a file atomically (a synced temporary file renamed over it),
:func:`append_bytes` appends synced bytes that are whole or absent, :func:`remove_leftovers`
removes the temporary files of writers that were killed, and :func:`lock_directory` takes an
advisory lock on a directory that the system releases when its process ends (even by
``kill -9``). :mod:`lawwatch.output.store` keeps a history with them; they know nothing of
records.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "DirectoryLocked",
    "append_bytes",
    "file_size",
    "free_name",
    "lock_directory",
    "remove_leftovers",
    "replace_file",
]

log = logging.getLogger("lawwatch")


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a synced temporary file renamed over it.

    The temporary file is ``.<name>.<pid>.tmp`` beside it; one a killed process left is removed
    by :func:`remove_leftovers`.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a directory that went away or went read-only: the original error says it
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def append_bytes(path: Path, data: bytes, at: int) -> None:
    """Write ``data`` at byte ``at`` of ``path`` (created if missing), synced; whole or absent.

    Bytes past ``at`` (what an earlier write cut short left) are cut away first. A write that
    fails part way (a full disk writes what fits, then fails) is cut back to ``at``, so no
    partial line stays to join the next one; the error is raised.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        try:
            if os.fstat(fd).st_size != at:
                os.ftruncate(fd, at)
            os.lseek(fd, at, os.SEEK_SET)
            view = memoryview(data)
            while view:  # a short write returns what fit; the next call raises the error
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            # needs no space (shrinking frees it); if it fails, the next write cuts first
            with contextlib.suppress(OSError):
                os.ftruncate(fd, at)
            raise
    finally:
        os.close(fd)


def file_size(path: Path) -> int | None:
    """The size of ``path`` in bytes, or None when it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def free_name(directory: Path, prefix: str) -> Path:
    """``directory / f"{prefix}{n}"`` for the first n >= 1 not taken."""
    n = 1
    while (directory / f"{prefix}{n}").exists():
        n += 1
    return directory / f"{prefix}{n}"


def remove_leftovers(directory: Path, names: Iterable[str]) -> None:
    """Remove the temporary files :func:`replace_file` left for ``names`` in ``directory``.

    Only those of writers that are gone (killed during a replace): a process of the id in the
    name that is alive keeps its file (the id may have been reused: its file is then removed
    once that process ends); this process's own are leftovers, as the caller (the directory's
    one writer in this process) has no replace running.
    """
    # the temporary files of replace_file: the name replaced and the writer's process id
    pattern = re.compile(rf"\.({'|'.join(re.escape(name) for name in names)})\.(\d+)\.tmp")
    removed = []
    for path in directory.glob(".*.tmp"):
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            pass
    if removed:
        log.info("lawwatch: removed %s left by killed writers", ", ".join(removed))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot open)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DirectoryLocked(Exception):
    """Another process holds the lock of the directory (:func:`lock_directory`)."""


def lock_directory(directory: Path) -> int | None:
    """Take an exclusive advisory lock on ``directory`` for this process.

    The lock is a ``flock`` on the directory itself (no file to leave behind), held while the
    returned descriptor is open: close it to release the lock. The system releases it when the
    process ends, even by ``kill -9``.

    Returns:
        The descriptor holding the lock, or None where there is no lock to take (a directory
        that cannot be opened, a file system without locks such as some network mounts).

    Raises:
        DirectoryLocked: Another process holds the lock.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None  # no locks here
        raise DirectoryLocked(f"{directory} is locked by another process") from None
    return fd
