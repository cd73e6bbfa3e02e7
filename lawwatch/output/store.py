"""The local history store: ``history.jsonl`` and ``pr.safetensors`` in a directory, crash-safe.

One directory holds one series of records (see :func:`lawwatch.history.series_change`):
``history.jsonl`` (one record a line, each appended, flushed and synced), ``pr.safetensors``
(the PR matrix, steps × entries, float64, replaced whole) and, when another series came,
``series-<n>/`` directories holding the earlier ones. :func:`read` and :func:`write` read and
replace a directory's history; :class:`LocalHistory` is the sink that keeps one during training
or a sweep, one writer per directory.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lawwatch.history import History, Snapshot, series, series_change

__all__ = ["HISTORY_FILE", "MATRIX_FILE", "LocalHistory", "read", "write"]

HISTORY_FILE = "history.jsonl"
MATRIX_FILE = "pr.safetensors"
MATRIX_FORMAT = "lawwatch.history/1"
# files of one series besides the two above (the callback's report), moved with them
_SERIES_FILES = (HISTORY_FILE, MATRIX_FILE, "law.png")

log = logging.getLogger("lawwatch")


# -- reading and replacing a directory's history ----------------------------------------------


def read(directory: str | Path) -> History:
    """The history in ``directory`` (its ``history.jsonl``; empty if there is none).

    Lines that hold no record (a write cut short by a crash, garbage) are skipped with a
    warning on the ``"lawwatch"`` logger; the file is left as it is (:class:`LocalHistory`
    repairs it when it opens the directory).
    """
    path = Path(directory) / HISTORY_FILE
    parsed = parse(path)
    if parsed.rejected:
        log.warning(
            "lawwatch: skipped %s of %s: %s",
            _plural(len(parsed.rejected), "unreadable line"),
            path,
            parsed.describe(),
        )
    return parsed.history


def write(history: History, directory: str | Path) -> None:
    """Replace ``history.jsonl`` and ``pr.safetensors`` in ``directory`` (created if missing).

    Each file is written whole to a temporary file and then renamed over the old one, so a
    crash leaves either the old file or the new one, never a part.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in history.records).encode()
    replace_file(directory / HISTORY_FILE, data)
    write_matrix(history, directory)


def append(history: History, directory: Path, record: dict[str, Any]) -> None:
    """Append ``record`` (the last of ``history`` already) to the files in ``directory``.

    The record is one line written, flushed and synced at once: after a crash it is whole or
    (but for a torn tail, which the next :class:`LocalHistory` sets aside) absent; a write that
    fails (a full disk) leaves no part of it, in the file or in ``history``. The PR matrix is
    then replaced whole.
    """
    line = (json.dumps(record) + "\n").encode()
    with (directory / HISTORY_FILE).open("ab") as f:
        end = f.tell()
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:  # a full disk: no part of a record stays to join the next one
            f.truncate(end)
            if history.records and history.records[-1] is record:
                history.records.pop()  # nor does the record stay (it would reach the matrix)
            raise
    write_matrix(history, directory)


def write_matrix(history: History, directory: Path) -> None:
    """Replace ``pr.safetensors`` (``steps``, ``layers``, ``pr``), whole.

    Removed when the records hold no matrix, so the file never describes other records.
    """
    from safetensors.torch import save

    path = directory / MATRIX_FILE
    matrix = history.pr_matrix()
    if matrix is None:
        path.unlink(missing_ok=True)
        return
    steps, layers, pr = matrix
    tensors = {"steps": steps, "layers": layers, "pr": pr}
    replace_file(path, save(tensors, metadata={"format": MATRIX_FORMAT}))


@dataclass
class Parsed:
    """What a ``history.jsonl`` holds, as read line by line.

    Attributes:
        history: The records of the lines that hold one, steps increasing.
        rejected: ``(line number, raw bytes)`` of every line that does not: not JSON (a write
            cut short, garbage), not a record with an integer step, or a step not after the
            one before.
        unterminated: The last line (a whole record) lacks its newline: the next append would
            join it.
    """

    history: History
    rejected: list[tuple[int, bytes]]
    unterminated: bool

    @property
    def clean(self) -> bool:
        """Whether the file can be appended to as it is."""
        return not self.rejected and not self.unterminated

    def describe(self) -> str:
        """The rejected lines, for a message."""
        shown = [f"line {n}: {_damage(raw)}" for n, raw in self.rejected[:3]]
        more = len(self.rejected) - len(shown)
        return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def _damage(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    if text.startswith("{") and not text.endswith("}"):
        return "a record cut short, as a crash during a write leaves it"
    return f"not a record: {text[:40]!r}"


def parse(path: Path) -> Parsed:
    """Read ``path`` (a ``history.jsonl``; missing means empty), keeping every whole record."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Parsed(History(), [], False)
    history, rejected = History(), []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            history.append(json.loads(raw))  # refuses a record without an int step, or out of order
        except (ValueError, TypeError, AttributeError):
            rejected.append((number, raw))
    # a whole last record without its newline (a torn one is rejected above)
    last = data.count(b"\n") + 1
    unterminated = not data.endswith(b"\n") and bool(data.rsplit(b"\n", 1)[-1].strip())
    unterminated = unterminated and not any(n == last for n, _ in rejected)
    return Parsed(history, rejected, unterminated)


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a synced temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


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


# -- the sink ---------------------------------------------------------------------------------


class LocalHistory:
    """A :class:`~lawwatch.history.History` kept in files in a directory: one series, whole.

    On creation it reads what a previous run left; :meth:`drop_after` forgets records past a
    resume point, so a resumed run writes one increasing sequence of steps with no duplicates.

    - **Crash-safe.** Each record is one line written, flushed and synced; rewrites replace
      whole files. Lines a crash cut short (or any line that holds no record) are moved to
      ``history.jsonl.torn-<n>`` with a warning when the directory is opened, and a last record
      that lacks its newline gets it: recording goes on.
    - **One series.** A snapshot of another series than the records held (see
      :func:`~lawwatch.history.series_change`) starts a new one: the files held so far move to
      ``<directory>/series-<n>/`` and a warning says what changed. ``series=`` checks the
      records already there when the directory opens.
    - **One writer.** Two open ``LocalHistory`` of one process never share a directory: the
      second is refused until the first is closed.

    Args:
        directory: Where the files live (created if missing).
        series: The identity (``probe``, ``config``, ``precision``) of what will be written, to
            check the records already there against at once (a resumed run); default: checked
            at the first write.

    Raises:
        ValueError: Another open LocalHistory of this process writes to ``directory``.
    """

    threadsafe = True  # lawwatch's own files: the background worker may write them

    def __init__(self, directory: str | Path, *, series: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.closed = False
        _claim(self)
        try:
            self.history = self._open()
            if series is not None and self.history.records:
                self._check_series(series, "this run")
        except BaseException:
            _release(self)
            raise

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records, steps increasing."""
        return self.history.records

    @property
    def last_step(self) -> int | None:
        """The latest step recorded, or None."""
        return self.history.last_step

    def drop_after(self, step: int) -> None:
        """Forget (and rewrite the files without) every record with a step above ``step``."""
        if self.history.drop_after(step):
            write(self.history, self.directory)

    def write(self, snapshot: Snapshot) -> None:
        """Append the snapshot; a step at or before the last recorded one is refused.

        A snapshot of another series first sets the records held so far aside (see the class
        documentation).
        """
        record = snapshot.to_record()
        if self.history.records:
            self._check_series(series(record), f"step {snapshot.step}")
        append(self.history, self.directory, self.history.append(record))

    def replace(self, records: Iterable[dict[str, Any]]) -> None:
        """Hold ``records`` (steps increasing) instead, and rewrite the files with them."""
        self.history = History(records)
        write(self.history, self.directory)

    def close(self) -> None:
        """Release the directory (every write is already complete on disk)."""
        self.closed = True
        _release(self)

    def _open(self) -> History:
        """The records in the directory; a torn or unterminated file is repaired first."""
        path = self.directory / HISTORY_FILE
        parsed = parse(path)
        if parsed.clean:
            return parsed.history
        if parsed.rejected:
            torn = _free_name(self.directory, f"{HISTORY_FILE}.torn-")
            torn.write_bytes(b"".join(raw + b"\n" for _, raw in parsed.rejected))
            log.warning(
                "lawwatch: %s held %s (%s); moved to %s, the %s kept",
                path,
                _plural(len(parsed.rejected), "unreadable line"),
                parsed.describe(),
                torn,
                _plural(len(parsed.history), "whole record"),
            )
        write(parsed.history, self.directory)  # whole lines only, each with its newline
        return parsed.history

    def _check_series(self, identity: dict[str, Any], what: str) -> None:
        """Start a new series if ``identity`` is not the series of the records held."""
        changes = series_change(series(self.history[-1]), identity)
        if not changes:
            return
        moved = _free_name(self.directory, "series-")
        moved.mkdir()
        held = self.history
        for name in _SERIES_FILES:
            if (self.directory / name).exists():
                os.replace(self.directory / name, moved / name)
        self.history = History()
        log.warning(
            "lawwatch: %s differs from the %s in %s (steps %s to %s): %s. Those moved to %s "
            "and a new series starts here. One directory holds one series: to continue the "
            "old one, measure with the probe, options and precision it was measured with; to "
            "keep series apart from the start, give each its own directory.",
            what,
            _plural(len(held), "record"),
            self.directory,
            held.steps[0],
            held.last_step,
            "; ".join(changes),
            moved,
        )


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _free_name(directory: Path, prefix: str) -> Path:
    """``directory / f"{prefix}{n}"`` for the first n >= 1 not taken."""
    n = 1
    while (directory / f"{prefix}{n}").exists():
        n += 1
    return directory / f"{prefix}{n}"


# the directories open LocalHistory objects of this process write to (weakly: a history nobody
# holds any more frees its directory)
_OPEN: dict[Path, weakref.ref[LocalHistory]] = {}


def _holder(key: Path) -> LocalHistory | None:
    ref = _OPEN.get(key)
    holder = ref() if ref is not None else None
    return None if holder is None or holder.closed else holder


def _claim(local: LocalHistory) -> None:
    """Register ``local``'s directory, refusing one another open LocalHistory writes to."""
    key = local.directory.resolve()
    if _holder(key) is not None:
        gc.collect()  # a holder only a reference cycle keeps alive is no holder
    holder = _holder(key)
    if holder is not None:
        raise ValueError(
            f"{local.directory} is already written by another lawwatch monitor of this process "
            f"(its LocalHistory holds {_plural(len(holder.records), 'record')}); two monitors "
            "in one directory would interleave one history.jsonl. Give each LawWatchCallback "
            "or AcceleratorWatch its own directory=, or close() the other monitor first."
        )
    _OPEN[key] = weakref.ref(local)


def _release(local: LocalHistory) -> None:
    key = local.directory.resolve()
    ref = _OPEN.get(key)
    if ref is not None and ref() is local:
        del _OPEN[key]
