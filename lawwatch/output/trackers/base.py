"""What every tracker class shares: the base class and its registry, the PR table, the report.

A tracker class registers itself by name when it is defined (its ``names``), and knows how to
attach to a run that already exists: :meth:`Tracker.current` (the run a Trainer's ``report_to``
logs into, or the one the process started: ``wandb.run``, ``mlflow.active_run()``, …) and
:meth:`Tracker.on_accelerate` (an accelerate tracker's object) and :meth:`Tracker.on_lightning` (a
Lightning logger). A new integration adds a
classmethod here and in the classes, not a table row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from lawwatch.history import History, Snapshot, entries
from lawwatch.output.sinks import PREFIX

if TYPE_CHECKING:
    from lawwatch.output.trackers.opening import TrainerRun

log = logging.getLogger("lawwatch")

TABLE_COLUMNS = ("step", "layer", "pr", "log10_pr")
STEP_METRIC = f"{PREFIX}step"  # every lawwatch row carries its training step under this key


@runtime_checkable
class Reporting(Protocol):
    """A sink that takes the end-of-training report: the PNG and the history files."""

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """Log the report PNG (when there is one) and the files (history, PR matrix)."""


def table_rows(record: dict[str, Any]) -> list[tuple[int, int, float, float | None]]:
    """``(step, layer, pr, log10_pr)`` for each entry of a record (the PR table's rows)."""
    return [
        (record["step"], entry, pr, math.log10(pr) if pr > 0 else None)
        for entry, pr in zip(entries(record), record["pr"], strict=True)
    ]


TRACKERS: dict[str, type[Tracker]] = {}
"""Tracker name (a ``report_to`` name, an accelerate tracker's ``name``, or an alias) -> class.

Filled as each class of :mod:`lawwatch.output.trackers` is defined (its ``names``)."""


class Tracker:
    """Base of the tracker sinks: a history, each step logged once, in increasing order.

    Subclasses set :attr:`names` (registered in :data:`TRACKERS` when the class is defined),
    implement :meth:`current` (and :meth:`on_accelerate` when the tracker's object is not what
    ``__init__`` takes), :meth:`_log` (one snapshot) and optionally :meth:`log_report`; they
    call :meth:`replay` at the end of ``__init__``.

    Args:
        logged_step: The latest step the tracker already holds (a reattached run), if known.
    """

    name = "tracker"
    names: ClassVar[tuple[str, ...]] = ()
    """The names this class is opened by: first its own, then aliases (``"dagshub"``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for alias in cls.__dict__.get("names", ()):  # only a class that names itself registers
            if TRACKERS.setdefault(alias, cls) is not cls:
                raise ValueError(f"Two tracker classes named {alias!r}.")

    @classmethod
    def current(cls, run: TrainerRun) -> Tracker:
        """A sink on the tracker's run that exists now: the one a Trainer's callback logs into.

        Args:
            run: The Trainer's arguments and what the user gave (see
                :class:`~lawwatch.output.trackers.TrainerRun`).

        Raises:
            LookupError: The tracker has no current run (the message says how to start one).
            ImportError: Its package is not installed.
        """
        raise NotImplementedError(f"{cls.__name__} cannot attach to a current run.")

    @classmethod
    def on_accelerate(cls, tracker: Any, run: TrainerRun) -> Tracker:
        """A sink on an accelerate tracker's object (``get_tracker(name, unwrap=True)``).

        The tracker stays accelerate's: ``accelerator.end_training()`` ends it.
        """
        return cls(tracker)

    @classmethod
    def on_lightning(cls, logger: Any, run: TrainerRun) -> Tracker:
        """A sink on a Lightning logger's run (``logger.experiment``, on the main process).

        The run stays the logger's: Lightning finalizes it.
        """
        return cls(logger.experiment)

    def __init__(self, *, logged_step: int | None = None) -> None:
        self.history = History()
        self.logged_step = logged_step

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records this sink holds (replayed and written), steps increasing."""
        return self.history.records

    def replay(self, history: Iterable[dict[str, Any]] | None) -> None:
        """Log records measured before this sink existed (a resumed run's history)."""
        for record in history or []:
            self._add(Snapshot.from_record(record))

    def write(self, snapshot: Snapshot) -> None:
        """Log one snapshot (rank 0 calls this through :class:`~lawwatch.output.sinks.Sinks`)."""
        self._add(snapshot)

    def _add(self, snapshot: Snapshot) -> None:
        record = self.history.append(snapshot)
        if self.logged_step is not None and record["step"] <= self.logged_step:
            return  # the tracker already holds this step (a reattached run)
        self._log(snapshot, record)
        self.logged_step = record["step"]

    def _log(self, snapshot: Snapshot, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """Log the end-of-training report; the base class has nowhere to put it."""

    def close(self) -> None:
        """Nothing to release: the tracker belongs to whoever created it."""
