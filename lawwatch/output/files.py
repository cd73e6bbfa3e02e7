"""Crash-safe file primitives: whole-or-absent writes, and one writer per directory.

:func:`replace_file` replaces a file atomically (a synced temporary file renamed over it),
:func:`append_bytes` appends synced bytes that are whole or absent, :func:`append_lines` and
:func:`replace_lines` write as many whole lines as a refusing disk takes, :func:`remove_leftovers`
removes the temporary files of writers that were killed, and :func:`lock_directory` takes an
advisory lock on a directory that the system releases when its process ends (even by
``kill -9``), which the children it forks do not hold, and which names its holders when
refused. :mod:`lawwatch.output.store` keeps a history with them; they know nothing of
records.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DirectoryLock",
    "DirectoryLocked",
    "Holder",
    "ShortWrite",
    "append_bytes",
    "append_lines",
    "file_size",
    "free_name",
    "lock_directory",
    "lock_holders",
    "remove_leftovers",
    "replace_file",
    "replace_lines",
]

log = logging.getLogger("lawwatch")


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a synced temporary file renamed over it.

    The temporary file is ``.<name>.<pid>.tmp`` beside it; one a killed process left is removed
    by :func:`remove_leftovers`.
    """
    with _temporary(path) as tmp:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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


class ShortWrite(OSError):
    """Lines written up to the one a disk refused: the first ``written`` are in the file.

    Raised by :func:`append_lines` and :func:`replace_lines` with the disk's error (its
    ``errno`` and message); ``size`` is the file's size in bytes, ending with the last whole
    line written.
    """

    def __init__(self, error: OSError, written: int, size: int) -> None:
        super().__init__(error.errno, error.strerror)
        self.written, self.size = written, size


def append_lines(path: Path, lines: Sequence[bytes], at: int) -> int:
    """Write ``lines`` from byte ``at`` of ``path`` (created if missing), as many as fit, synced.

    Bytes past ``at`` are cut away first. A disk that refuses part way (full, a file size
    limit) keeps the lines written whole before the refusal, in order, and no part of the next
    one: the file is cut back to the end of the last whole line and synced.

    Returns:
        The file's size after the lines.

    Raises:
        ShortWrite: The disk refused; its ``written`` lines (possibly none) are in the file.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    ends = list(itertools.accumulate(map(len, lines), initial=at))[1:]  # each line's end
    done = at
    try:
        try:
            if os.fstat(fd).st_size != at:
                os.ftruncate(fd, at)
            os.lseek(fd, at, os.SEEK_SET)
            view = memoryview(b"".join(lines))
            while view:  # a short write returns what fit; the next call raises the error
                written = os.write(fd, view)
                done += written
                view = view[written:]
            os.fsync(fd)
            return done
        except OSError as error:
            whole = bisect.bisect_right(ends, done)  # lines wholly written before the refusal
            size = ends[whole - 1] if whole else at
            try:
                os.ftruncate(fd, size)  # needs no space (shrinking frees it)
                os.fsync(fd)
            except OSError:
                whole, size = 0, at
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, at)
            raise ShortWrite(error, whole, size) from error
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, at)
            raise
    finally:
        os.close(fd)


def replace_lines(path: Path, lines: Sequence[bytes]) -> int:
    """Replace ``path`` by ``lines`` atomically, or by as many of them as fit.

    As :func:`replace_file`, through a synced temporary file renamed over ``path``; a disk
    that refuses part way renames the temporary file holding the lines written whole, so
    ``path`` holds the first lines, in order (none fit: ``path`` stays as it was).

    Returns:
        The file's size.

    Raises:
        ShortWrite: The disk refused; ``path`` holds its ``written`` first lines (none:
            unchanged).
    """
    with _temporary(path) as tmp:
        try:
            size = append_lines(tmp, lines, 0)
        except ShortWrite as short:
            if short.written:  # the lines written whole replace path; none: path unchanged
                os.replace(tmp, path)
                _sync_directory(path.parent)
            raise
        os.replace(tmp, path)
    _sync_directory(path.parent)
    return size


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """The temporary file a rewrite of ``path`` is written to, removed if the rewrite fails.

    A directory that went away or went read-only: the original error says it.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


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


@dataclass(frozen=True)
class Holder:
    """A process that holds a directory's lock (:func:`lock_holders`).

    Attributes:
        pid: Its process id.
        command: Its command line (shortened), or "" where it cannot be read.
        inherited_from: The id of the process that took the lock, when that one has ended and
            this one kept it (a child it forked, holding a copy of the lock's descriptor);
            None when this process took it.
    """

    pid: int
    command: str
    inherited_from: int | None = None

    def describe(self) -> str:
        """``process <pid> (<command>)``, and whom it inherited the lock from."""
        what = f"process {self.pid}" + (f" ({self.command})" if self.command else "")
        if self.inherited_from is not None:
            what += (
                f", which kept it after process {self.inherited_from}, which took it, ended "
                "(a child it forked that outlived it)"
            )
        return what


class DirectoryLocked(Exception):
    """Another process holds the lock of the directory (:func:`lock_directory`).

    Attributes:
        holders: The processes found holding it (empty where they cannot be told).
    """

    def __init__(self, message: str, holders: list[Holder]) -> None:
        super().__init__(message)
        self.holders = holders


class DirectoryLock:
    """The lock of a directory, held by this process (:func:`lock_directory`).

    A child this process forks (a data-loader worker, a ``multiprocessing`` fork) does not
    hold it: a ``flock`` belongs to the open file, which a fork shares, so the child closes
    its copy of the descriptor as it starts (``os.register_at_fork``); the lock then ends with
    this process, even when a child outlives it.
    """

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        _HELD.add(self)

    def release(self) -> None:
        """Close the descriptor: the lock is released (once; later calls do nothing)."""
        fd, self.fd = self.fd, None
        _HELD.discard(self)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


# the locks this process holds: a forked child closes its copies (DirectoryLock)
_HELD: set[DirectoryLock] = set()


def _forked_child() -> None:
    for lock in list(_HELD):
        lock.release()  # the child's copy: the parent's descriptor still holds the lock


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked_child)


def lock_directory(directory: Path) -> DirectoryLock | None:
    """Take an exclusive advisory lock on ``directory`` for this process.

    The lock is a ``flock`` on the directory itself (no file to leave behind), held until the
    returned lock is released. The system releases it when the process ends, even by
    ``kill -9``; children the process forks do not hold it (see :class:`DirectoryLock`).

    Returns:
        The lock, or None where there is no lock to take (a directory that cannot be opened,
        a file system without locks such as some network mounts).

    Raises:
        DirectoryLocked: Another process holds the lock; it names the holders it finds.
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
        holders = lock_holders(directory)
        held = "; ".join(h.describe() for h in holders) or "another process"
        raise DirectoryLocked(f"{directory} is locked by {held}", holders) from None
    return DirectoryLock(fd)


def lock_holders(directory: Path) -> list[Holder]:
    """The processes holding ``directory``'s ``flock``, as far as ``/proc`` tells (Linux).

    ``/proc/locks`` names the process that took the lock; when that one is alive it is the
    holder. When it has ended, the holders are the processes with the directory open (its
    children that kept the lock's descriptor). Empty where ``/proc`` cannot tell.
    """
    try:
        st = os.stat(directory)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    takers = []
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters are marked "->"
        if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == wanted:
                takers.append(int(fields[4]))
        except ValueError:
            continue
    alive = [pid for pid in takers if pid > 0 and _running(pid)]
    if alive:
        return [Holder(pid, _command(pid)) for pid in alive]
    taker = takers[0] if takers else None
    return [
        Holder(pid, _command(pid), taker)
        for pid in _opened_by(st.st_dev, st.st_ino)
        if pid != os.getpid()
    ]


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, holds no lock)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return _alive(pid)  # no /proc entry to read: ask the system
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _opened_by(dev: int, inode: int) -> list[int]:
    """The processes with a descriptor open on the file ``(dev, inode)`` (those we may read)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                try:
                    st = os.stat(fd)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (dev, inode):
                    pids.append(int(proc.name))
                    break
        except OSError:  # gone, or another user's
            continue
    return sorted(pids)


def _command(pid: int, limit: int = 80) -> str:
    """The command line of process ``pid``, shortened; "" where it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    text = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return text if len(text) <= limit else text[: limit - 1] + "…"
