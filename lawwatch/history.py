"""The record of a snapshot, and a history of them: what ``history.jsonl`` holds.

A :class:`Snapshot` is one measurement; its *record* is the JSON object of one ``history.jsonl``
line (:meth:`Snapshot.to_record`, :meth:`Snapshot.from_record`: lossless both ways). A
:class:`History` is the records of one series in increasing step order: the monitor keeps one,
the local and W&B sinks keep one, the report and the demo read one. On disk a history is two
files in a directory: ``history.jsonl`` (one record a line) and ``pr.safetensors`` (the PR
matrix, steps × entries, float64).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD, LawFit, emergence_step

__all__ = [
    "HISTORY_FILE",
    "MATRIX_FILE",
    "SERIES_FIELDS",
    "History",
    "Snapshot",
    "entries",
    "law_points",
    "series",
    "series_change",
]

HISTORY_FILE = "history.jsonl"
MATRIX_FILE = "pr.safetensors"
MATRIX_FORMAT = "lawwatch.history/1"

log = logging.getLogger("lawwatch")

_FIT_FIELDS = tuple(LawFit.__dataclass_fields__)  # rho, pearson_r, slope, intercept, r2
_CORE_FIELDS = ("step", "pr", "layers", *_FIT_FIELDS, "n_tokens", "seconds")


@dataclass
class Snapshot:
    """The law measured once.

    Attributes:
        pr: ``(entries,)`` float64 prediction residual of every measured hidden-state entry,
            on CPU.
        fit: The law fitted to ``pr`` at the true entry indices (entry 0 dropped).
        n_tokens: Examples (position, target) the statistics hold.
        seconds: Wall time of the measurement.
        step: Training step, when taken during training.
        extra: More fields of the record (JSON-ready values).
        layers: The true hidden-state entry index of each value of ``pr`` (entry 0 = the
            embeddings); default ``0 … len(pr)-1``.
    """

    pr: torch.Tensor
    fit: LawFit
    n_tokens: int
    seconds: float
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self.layers = tuple(range(len(self.pr))) if self.layers is None else tuple(self.layers)
        if len(self.layers) != len(self.pr):
            raise ValueError(f"{len(self.layers)} layers for {len(self.pr)} PR values.")

    def to_record(self) -> dict[str, Any]:
        """The ``history.jsonl`` record.

        Holds step, pr (a list), layers, the fit's fields, n_tokens, seconds, then ``extra``.
        """
        return {
            "step": self.step,
            "pr": self.pr.tolist(),
            "layers": list(self.layers),
            **self.fit.as_dict(),
            "n_tokens": self.n_tokens,
            "seconds": self.seconds,
            **self.extra,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Snapshot:
        """The snapshot a record was written from (``from_record(s.to_record()) == s``).

        Raises:
            ValueError: The record lacks a field every record has.
        """
        missing = [name for name in _CORE_FIELDS if name not in record and name != "layers"]
        if missing:
            raise ValueError(f"Not a snapshot record: it lacks {missing}.")
        return cls(
            pr=torch.tensor(record["pr"], dtype=torch.float64),
            fit=LawFit(**{name: record[name] for name in _FIT_FIELDS}),
            n_tokens=record["n_tokens"],
            seconds=record["seconds"],
            step=record["step"],
            extra={k: v for k, v in record.items() if k not in _CORE_FIELDS},
            layers=record.get("layers") or None,
        )


def entries(record: dict[str, Any]) -> list[int]:
    """The true hidden-state entry index of each PR in a record (entry 0 = the embeddings)."""
    layers = record.get("layers")
    return list(layers) if layers else list(range(len(record["pr"])))


def law_points(record: dict[str, Any]) -> tuple[list[int], list[float]]:
    """``(layers, log10 PR)`` of the entries the law is fitted on (the embeddings left out)."""
    pairs = [(e, v) for e, v in zip(entries(record), record["pr"], strict=True) if e != 0]
    return [e for e, _ in pairs], [math.log10(v) for _, v in pairs]


# -- series -----------------------------------------------------------------------------------

# what every record says it was measured with: the probe's content hash, the measurement options
# (MeasureConfig.to_dict()) and the precision of the forward (lawwatch.precision)
SERIES_FIELDS = ("probe", "config", "precision")
# options that change what a snapshot costs, not what it measures: a change keeps the series
COST_OPTIONS = frozenset({"batch_size", "max_onehot_bytes", "stats_device"})


def series(record: Mapping[str, Any]) -> dict[str, Any]:
    """The series identity a record carries: those of :data:`SERIES_FIELDS` it holds."""
    return {k: record[k] for k in SERIES_FIELDS if record.get(k) is not None}


def series_change(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """How two series identities differ, one phrase per difference; empty for one series.

    Only what both carry is compared (records written before these fields existed carry none;
    an option one of them lacks came with another version), and options that change only the
    cost (``batch_size``, ``max_onehot_bytes``, ``stats_device``) are left out.
    """
    changes = []
    if before.get("probe") and after.get("probe") and before["probe"] != after["probe"]:
        changes.append(f"probe (content hash {before['probe'][:12]}… → {after['probe'][:12]}…)")
    old, new = before.get("config") or {}, after.get("config") or {}
    for name in old:
        if name in new and name not in COST_OPTIONS and old[name] != new[name]:
            changes.append(f"{name}={old[name]!r} → {new[name]!r}")
    old, new = before.get("precision"), after.get("precision")
    if old and new and old != new:
        changes.append(f"precision {old} → {new}")
    return changes


class History:
    """The records of one series of snapshots, steps strictly increasing.

    A record is a dict with at least ``step``; a full one is :meth:`Snapshot.to_record`'s.
    Iterating yields the records, indexing gives one, ``len`` counts them.

    Args:
        records: Records to start from, steps increasing.
    """

    def __init__(self, records: Iterable[dict[str, Any]] = ()) -> None:
        self.records: list[dict[str, Any]] = []
        for record in records:
            self.append(record)

    # -- the sequence -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, History):
            return self.records == other.records
        return NotImplemented

    def __repr__(self) -> str:
        return f"History({len(self)} snapshots, steps {self.steps})"

    @property
    def steps(self) -> list[int]:
        """The step of every record, in order."""
        return [r["step"] for r in self.records]

    @property
    def last_step(self) -> int | None:
        """The latest step, or None when empty."""
        return self.records[-1]["step"] if self.records else None

    def append(self, item: Snapshot | dict[str, Any]) -> dict[str, Any]:
        """Add a snapshot (or its record) after the last one.

        Returns:
            The record added.

        Raises:
            ValueError: Its step is missing, or not after the last step held.
        """
        record = item.to_record() if isinstance(item, Snapshot) else dict(item)
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"A history record needs a training step (an int), got {step!r}.")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"Step {step} is not after the last recorded step {self.last_step}; a resumed "
                "run first drops what follows its checkpoint (drop_after)."
            )
        self.records.append(record)
        return record

    def drop_after(self, step: int) -> bool:
        """Forget every record with a step above ``step``; whether any was dropped."""
        kept = [r for r in self.records if r["step"] <= step]
        dropped = len(kept) != len(self.records)
        self.records = kept
        return dropped

    # -- what the records say -----------------------------------------------------------------

    def emergence_step(self, threshold: float = DEFAULT_EMERGENCE_THRESHOLD) -> int | None:
        """First step from which r stays at or below ``threshold`` (see :func:`emergence_step`)."""
        return emergence_step(
            self.steps, [r["pearson_r"] for r in self.records], threshold=threshold
        )

    def snapshots(self) -> list[Snapshot]:
        """Every record as a :class:`Snapshot`."""
        return [Snapshot.from_record(r) for r in self.records]

    def pr_matrix(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(steps (S,), entries (E,), pr (S, E) float64)`` of the records holding PRs.

        None when there are none, or when the measured entries changed along the series (then
        only the records hold the PRs).
        """
        rows = [r for r in self.records if r.get("pr")]
        if not rows or len({tuple(entries(r)) for r in rows}) != 1:
            return None
        return (
            torch.tensor([r["step"] for r in rows]),
            torch.tensor(entries(rows[0])),
            torch.tensor([r["pr"] for r in rows], dtype=torch.float64),
        )

    # -- files --------------------------------------------------------------------------------

    @classmethod
    def read(cls, directory: str | Path) -> History:
        """The history in ``directory`` (its ``history.jsonl``; empty if there is none).

        Lines that hold no record (a write cut short by a crash, garbage) are skipped with a
        warning on the ``"lawwatch"`` logger; the file is left as it is
        (:class:`~lawwatch.output.sinks.LocalHistory` repairs it when it opens the directory).
        """
        parsed = parse(Path(directory) / HISTORY_FILE)
        if parsed.rejected:
            log.warning(
                "lawwatch: skipped %s of %s: %s",
                _count(len(parsed.rejected), "unreadable line"),
                Path(directory) / HISTORY_FILE,
                parsed.describe(),
            )
        return parsed.history

    def write(self, directory: str | Path) -> None:
        """Replace ``history.jsonl`` and ``pr.safetensors`` in ``directory`` (created if missing).

        Each file is written whole to a temporary file and then renamed over the old one, so a
        crash leaves either the old file or the new one, never a part.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r) + "\n" for r in self.records).encode()
        replace_file(directory / HISTORY_FILE, data)
        self.write_matrix(directory)

    def append_to(self, directory: str | Path, record: dict[str, Any]) -> None:
        """Append ``record`` (already added with :meth:`append`) to the files in ``directory``.

        The record is one line written, flushed and synced to disk at once: after a crash it is
        whole or (but for a torn tail, which the next :class:`~lawwatch.output.sinks.LocalHistory`
        sets aside) absent; a write that fails (a full disk) leaves no part of it, in the file
        or in this history. The PR matrix is then replaced whole.
        """
        line = (json.dumps(record) + "\n").encode()
        with (Path(directory) / HISTORY_FILE).open("ab") as f:
            end = f.tell()
            try:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:  # a full disk: no part of a record stays to join the next one
                f.truncate(end)
                if self.records and self.records[-1] is record:
                    self.records.pop()  # nor does the record stay here (it would reach the matrix)
                raise
        self.write_matrix(directory)

    def write_matrix(self, directory: str | Path) -> None:
        """Write ``pr.safetensors`` (``steps``, ``layers``, ``pr``) if :meth:`pr_matrix` has one.

        Replaced whole (see :meth:`write`); removed when the records hold no matrix, so the
        file never describes another set of records.
        """
        from safetensors.torch import save

        path = Path(directory) / MATRIX_FILE
        matrix = self.pr_matrix()
        if matrix is None:
            path.unlink(missing_ok=True)
            return
        steps, layers, pr = matrix
        tensors = {"steps": steps, "layers": layers, "pr": pr}
        replace_file(path, save(tensors, metadata={"format": MATRIX_FORMAT}))


# -- files on disk ----------------------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
            record = json.loads(raw)
            history.append(record)  # refuses a record without an int step, or out of order
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
