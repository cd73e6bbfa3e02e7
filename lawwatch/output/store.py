"""The local history store: ``history.jsonl`` and ``pr.safetensors`` in a directory, crash-safe.

One directory holds one series of records (see :func:`lawwatch.history.series_diff`; the names
are :mod:`lawwatch.output.layout`'s): ``history.jsonl`` (one record a line, each appended,
flushed and synced), ``pr.safetensors`` (the PR matrix, steps × entries, float64, replaced
whole), ``probe.safetensors`` (the probe the records were measured with, when the writer is
given it) and, when another series came, ``series-<n>/`` directories holding the earlier ones,
each with its own probe. :func:`read_history` and :func:`write_history` read and replace a
directory's history; :class:`LocalHistory` is the sink that keeps one during training or a
sweep, one writer per directory: it repairs what a crash left when it opens a directory, and
holds the records a full or read-only disk refuses until they can be written. The crash-safe
writes and the directory lock are :mod:`lawwatch.output.files`'.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lawwatch.history import History, Snapshot, series, series_diff
from lawwatch.output.files import (
    DirectoryLocked,
    Holder,
    ShortWrite,
    append_bytes,
    append_lines,
    file_size,
    free_name,
    lock_directory,
    remove_leftovers,
    replace_file,
    replace_lines,
)
from lawwatch.output.layout import (
    HISTORY_FILE,
    MATRIX_FILE,
    PROBE_FILE,
    SERIES_FILES,
    SERIES_PREFIX,
)

if TYPE_CHECKING:
    from lawwatch.probe import ProbeSet

__all__ = [
    "HistoryBusy",
    "LocalHistory",
    "keep_probe",
    "read_history",
    "write_history",
]

MATRIX_FORMAT = "lawwatch.history/1"

log = logging.getLogger("lawwatch")


# -- reading and replacing a directory's history ----------------------------------------------


def read_history(directory: str | Path) -> History:
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


def write_history(history: History, directory: str | Path) -> None:
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

    The record is one line written and synced at once: after a crash it is whole or (but for
    a torn tail, which the next :class:`LocalHistory` sets aside) absent; a write that fails
    (a full disk) leaves no part of it, in the file or in ``history``, and raises. The PR
    matrix is then replaced whole.
    """
    path = directory / HISTORY_FILE
    try:
        append_bytes(path, (json.dumps(record) + "\n").encode(), file_size(path) or 0)
    except BaseException:
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


# -- the sink ---------------------------------------------------------------------------------


class LocalHistory:
    """A :class:`~lawwatch.history.History` kept in files in a directory: one series, whole.

    On creation it reads what a previous run left; :meth:`drop_after` forgets records past a
    resume point, so a resumed run writes one increasing sequence of steps with no duplicates.

    - **Crash-safe.** Each record is one line written and synced; rewrites replace whole
      files. When the directory is opened, lines a crash cut short (or any line that holds no
      record) are moved to ``history.jsonl.torn-<n>`` with a warning, a last record that lacks
      its newline gets it, a ``pr.safetensors`` that describes other records than
      ``history.jsonl`` (a kill between the two files' writes) is rebuilt from it, and the
      temporary files of killed writers are removed: recording goes on.
    - **A full or read-only disk.** A record that cannot be written (no space, a file size
      limit, a read-only or removed directory) leaves no part of it in the file: one warning
      says the history is not being written (later outages are logged at INFO), the records
      are held in memory, and they are
      written in order at the first write that succeeds (a removed directory is made again):
      as many whole records as the disk takes, the rest held for the next write. A probe the
      disk refused when the directory opened is held too, and written with the records.
      ``pr.safetensors`` then describes the records in ``history.jsonl``, or is absent.
    - **One series.** A snapshot of another series than the records held (see
      :func:`~lawwatch.history.series_diff`) starts a new one: the files held so far move to
      ``<directory>/series-<n>/`` and a warning says what changed. ``series=`` checks the
      records already there when the directory opens.
    - **One writer.** Two open ``LocalHistory`` never share a directory, in one process or
      in two (an advisory lock on the directory, which the system releases when its process
      ends, even by ``kill -9``, and which the children it forks do not hold): the second is
      refused until the first is closed, with the holding process named.

    Args:
        directory: Where the files live (created if missing).
        series: The identity (``probe``, ``config``, ``precision``) of what will be written, to
            check the records already there against at once (a resumed run); default: checked
            at the first write.
        probe: The probe the records will be measured with, kept as ``probe.safetensors`` (written
            atomically, only when absent or of another content hash; a probe file of the records
            of another series stays with them and moves to their ``series-<n>/``). A probe that
            cannot be written is logged; recording goes on.

    Raises:
        ValueError: Another open LocalHistory of this process writes to ``directory``.
        HistoryBusy: Another process writes to ``directory`` (a monitor logs it and writes
            no files, training goes on).
    """

    threadsafe = True  # lawwatch's own files: the background worker may write them

    def __init__(
        self,
        directory: str | Path,
        *,
        series: dict[str, Any] | None = None,
        probe: ProbeSet | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.closed = False
        self._unwritten: list[dict[str, Any]] = []  # held, not yet in history.jsonl, in order
        self._size = 0  # the bytes of history.jsonl that hold the written records
        self._whole = False  # history.jsonl must be rewritten from the records held
        self._matrix = False  # pr.safetensors must be written again
        self._failing: OSError | None = None  # why the files are not being written (warned)
        self._outages = 0  # times the disk began refusing (the first is warned about)
        self._lock: weakref.finalize | None = None  # closes the descriptor holding the lock
        self._probe = probe
        self._probe_held = False  # the disk refused the probe: written with the records
        _claim(self)
        try:
            self.history = self._open()
            if series is not None and self.history.records:
                self._check_series(series, "this run")
        except BaseException:
            _release(self)
            raise
        self._keep_probe()

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records, steps increasing (those a full disk holds back included)."""
        return self.history.records

    @property
    def last_step(self) -> int | None:
        """The latest step recorded, or None."""
        return self.history.last_step

    @property
    def unwritten(self) -> list[int]:
        """The steps held in memory that ``history.jsonl`` lacks (a full or read-only disk)."""
        return [r["step"] for r in self._unwritten]

    def drop_after(self, step: int) -> None:
        """Forget (and rewrite the files without) every record with a step above ``step``."""
        if self.history.drop_after(step):
            self._rewrite()

    def write(self, snapshot: Snapshot) -> None:
        """Append the snapshot; a step at or before the last recorded one is refused.

        A snapshot of another series first sets the records held so far aside (see the class
        documentation). A disk that refuses the write does not raise: the record is held (see
        the class documentation).
        """
        record = snapshot.to_record()
        if self.history.records:
            self._check_series(series(record), f"step {snapshot.step}")
        self._unwritten.append(self.history.append(record))
        self._flush()

    def replace(self, records: Iterable[dict[str, Any]]) -> None:
        """Hold ``records`` (steps increasing) instead, and rewrite the files with them."""
        self.history = History(records)
        self._rewrite()

    def close(self) -> None:
        """Release the directory; records a full disk still holds back are tried once more."""
        try:
            self._flush()
            if self._probe_held:
                log.error(
                    "lawwatch: %s was never written (%s); analyze measures this run with its "
                    "probe only once you save it there (ProbeSet.save).",
                    self.directory / PROBE_FILE,
                    self._failing or "the disk refused it",
                )
            if self._unwritten:
                log.error(
                    "lawwatch: %s lacks %s (steps %s to %s): %s. They are in the monitor's "
                    "history (LawWatch.history, state_dict()).",
                    self.directory / HISTORY_FILE,
                    _plural(len(self._unwritten), "record"),
                    self._unwritten[0]["step"],
                    self._unwritten[-1]["step"],
                    self._failing,
                )
        finally:
            self.closed = True
            _release(self)

    # -- the files ----------------------------------------------------------------------------

    def _rewrite(self) -> None:
        """Replace both files with the records held (raises if the disk refuses)."""
        self._unwritten, self._whole = [], True
        write_history(self.history, self.directory)
        self._whole = self._matrix = False
        self._size = file_size(self.directory / HISTORY_FILE) or 0

    def _flush(self) -> None:
        """Write what the files lack; a disk that refuses is warned about once, not raised."""
        if not (self._unwritten or self._whole or self._matrix):
            self._keep_held_probe()
            return
        path, held = self.directory / HISTORY_FILE, len(self._unwritten)
        try:
            on_disk = file_size(path)
            if not self._whole and (on_disk or 0) < self._size:
                # removed or cut by someone else: every record held goes back
                log.warning(
                    "lawwatch: %s was removed or cut during the run; writing it again from "
                    "the %s held",
                    path,
                    _plural(len(self.history), "record"),
                )
                self._whole = True
            records = self.history.records if self._whole else self._unwritten
            lines = [(json.dumps(r) + "\n").encode() for r in records]
            try:
                if self._whole:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    size = replace_lines(path, lines)
                else:
                    size = append_lines(path, lines, self._size)
            except ShortWrite as short:
                if short.written:  # those that fit are in the file, in order; the rest held
                    self._size, self._whole = short.size, False
                    self._unwritten = list(records[short.written :])
                    self._matrix = True  # it describes other records now
                raise
            self._size, self._unwritten, self._whole = size, [], False
            self._matrix = True
            write_matrix(self.history, self.directory)
            self._matrix = False
        except OSError as error:
            self._refused(error)
            return
        self._keep_held_probe()  # with the records, now that the disk takes them
        if self._failing is not None:
            log.log(
                logging.INFO if self._outages > 1 else logging.WARNING,
                "lawwatch: %s is written again; what was held meanwhile (%s) is in it, in order",
                path,
                _plural(held, "record"),
            )
            self._failing = None

    def _refused(self, error: OSError) -> None:
        """The disk refused a write: hold the records, warn once, never describe others."""
        if self._matrix:  # history.jsonl moved on without it
            # a read-only or removed directory: the matrix is then as old as the file
            with contextlib.suppress(OSError):
                (self.directory / MATRIX_FILE).unlink(missing_ok=True)
        if self._failing is None:
            # a disk on the edge of full refuses and accepts by turns: one warning, then info
            self._outages += 1
            log.log(
                logging.INFO if self._outages > 1 else logging.WARNING,
                "lawwatch: %s is not being written (%s). The records are held in memory and "
                "written, in order, as soon as a write succeeds; until then the file lacks "
                "them.",
                self.directory / HISTORY_FILE,
                error,
            )
        self._failing = error

    def _open(self) -> History:
        """The records in the directory, repaired first: torn lines, the matrix, leftovers."""
        remove_leftovers(self.directory, (HISTORY_FILE, MATRIX_FILE, PROBE_FILE))
        path = self.directory / HISTORY_FILE
        parsed = parse(path)
        if not parsed.clean:
            if parsed.rejected:
                torn = free_name(self.directory, f"{HISTORY_FILE}.torn-")
                torn.write_bytes(b"".join(raw + b"\n" for _, raw in parsed.rejected))
                log.warning(
                    "lawwatch: %s held %s (%s); moved to %s, the %s kept",
                    path,
                    _plural(len(parsed.rejected), "unreadable line"),
                    parsed.describe(),
                    torn,
                    _plural(len(parsed.history), "whole record"),
                )
            write_history(parsed.history, self.directory)  # whole lines only, each with its newline
        elif not _matrix_matches(parsed.history, self.directory):
            log.warning(
                "lawwatch: %s did not describe the %s in %s (a process killed between the "
                "two files' writes); rebuilt from it",
                self.directory / MATRIX_FILE,
                _plural(len(parsed.history), "record"),
                path,
            )
            write_matrix(parsed.history, self.directory)
        self._size = file_size(path) or 0
        return parsed.history

    def _check_series(self, identity: dict[str, Any], what: str) -> None:
        """Start a new series if ``identity`` is not the series of the records held."""
        changes = series_diff(series(self.history[-1]), identity)
        if not changes:
            return
        self._flush()  # the old series whole in its files, if the disk lets it
        lost = self.unwritten
        moved = free_name(self.directory, SERIES_PREFIX)
        moved.mkdir()
        held = self.history
        for name in SERIES_FILES:
            if (self.directory / name).exists():
                os.replace(self.directory / name, moved / name)
        self.history, self._unwritten, self._size = History(), [], 0
        self._whole = self._matrix = False
        self._keep_probe()
        log.warning(
            "lawwatch: %s differs from the %s in %s (steps %s to %s): %s. Those moved to %s "
            "and a new series starts here. One directory holds one series: to continue the "
            "old one, measure with the probe, options and precision it was measured with; to "
            "keep series apart from the start, give each its own directory.%s",
            what,
            _plural(len(held), "record"),
            self.directory,
            held.steps[0],
            held.last_step,
            "; ".join(map(str, changes)),
            moved,
            f" The disk refused steps {lost} of the old series: they are not in it."
            if lost
            else "",
        )

    def _keep_probe(self) -> None:
        """Write the probe beside the records (see ``probe``); a failure is logged, not raised.

        A probe the disk refused (full, read-only) is held, as records are, and written with
        them when a write succeeds (:meth:`_flush`).
        """
        if self._probe is None:
            return
        try:
            keep_probe(self._probe, self.directory, self.history)
            self._probe_held = False
        except Exception as error:  # a monitor failure never stops the run
            self._probe_held = isinstance(error, OSError)
            log.warning(
                "lawwatch: the probe was not saved in %s (%s: %s); the history is written "
                "without it%s",
                self.directory / PROBE_FILE,
                type(error).__name__,
                error,
                ", until a write succeeds" if self._probe_held else "",
            )

    def _keep_held_probe(self) -> None:
        """Write the probe a refusing disk held, now that the records are written."""
        if not self._probe_held or self._probe is None:
            return
        try:
            keep_probe(self._probe, self.directory, self.history)
        except OSError as error:  # still refused: held, said once already
            log.debug("lawwatch: %s still not written: %s", self.directory / PROBE_FILE, error)
            return
        except Exception:  # written or not, not the disk's doing: said once already
            self._probe_held = False
            return
        self._probe_held = False
        log.info("lawwatch: %s is written, with the records held", self.directory / PROBE_FILE)


def keep_probe(probe: ProbeSet, directory: Path, history: History | None = None) -> bool:
    """Write ``probe`` to ``directory/probe.safetensors`` unless that file already holds it.

    A probe file of other content is replaced, unless ``history``'s records say they were
    measured with that other probe (they are another series: the file stays with them until
    they move to a ``series-<n>/``). Written atomically
    (:func:`~lawwatch.output.files.replace_file`).

    Returns:
        Whether the file was written.
    """
    from lawwatch.probe import ProbeSet

    path = directory / PROBE_FILE
    wanted = probe.content_hash()
    if path.is_file():
        try:
            found = ProbeSet.load(path).content_hash()
        except (ValueError, OSError):
            found = None  # damaged: replaced
        if found == wanted:
            return False
        measured = {r.get("probe") for r in (history or ())} - {None}
        if found is not None and found in measured and wanted not in measured:
            return False  # the other series' probe, kept with its records
    replace_file(path, probe.to_bytes())
    return True


def _matrix_matches(history: History, directory: Path) -> bool:
    """Whether ``pr.safetensors`` in ``directory`` is the matrix of ``history`` (absent if none)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / MATRIX_FILE
    expected = history.pr_matrix()
    if expected is None or not path.exists():
        return expected is None and not path.exists()
    try:
        found = load_file(path)
        return all(
            torch.equal(found[name], tensor)
            for name, tensor in zip(("steps", "layers", "pr"), expected, strict=True)
        )
    except (SafetensorError, OSError, KeyError, RuntimeError):
        return False  # unreadable: rebuilt


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# the directories open LocalHistory objects of this process write to (weakly: a history nobody
# holds any more frees its directory)
_OPEN: dict[Path, weakref.ref[LocalHistory]] = {}


class HistoryBusy(ValueError):
    """Another process holds the directory: an open :class:`LocalHistory` writes it there."""


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
    _lock(local)
    _OPEN[key] = weakref.ref(local)


def _release(local: LocalHistory) -> None:
    key = local.directory.resolve()
    ref = _OPEN.get(key)
    if ref is not None and ref() is local:
        del _OPEN[key]
    if local._lock is not None:
        local._lock()  # closes the descriptor: the lock is released
        local._lock = None


def _lock(local: LocalHistory) -> None:
    """Take ``local``'s directory's lock for this process, or refuse: another process writes it.

    See :func:`~lawwatch.output.files.lock_directory`: a file system without locks (some
    network mounts) leaves the directory unlocked.
    """
    try:
        lock = lock_directory(local.directory)
    except DirectoryLocked as locked:
        raise HistoryBusy(_busy(local.directory, locked.holders)) from None
    if lock is not None:
        local._lock = weakref.finalize(local, lock.release)  # a history nobody holds frees it


def _busy(directory: Path, holders: list[Holder]) -> str:
    """Why ``directory`` is refused: who holds it, and what to do."""
    message = (
        f"{directory} is already written by another process; two processes writing one "
        "directory would interleave one history.jsonl, so this one writes nothing there. "
    )
    if holders:
        message += f"It is held by {'; '.join(h.describe() for h in holders)}. "
    if any(h.inherited_from is not None for h in holders):
        # a forked child that outlived its trainer: not two trainers at all
        return message + "End that process (or wait for it to end) to free the directory."
    return message + (
        "If they are one training run, they did not form a process group (each trains "
        "alone): launch them so that they do (torchrun, or accelerate launch with "
        "ACCELERATE_USE_CPU=1 on a machine without GPUs). If they are separate runs, give "
        "each its own directory."
    )
