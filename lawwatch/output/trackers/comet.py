"""Comet: metrics, the PR table, the report image and files."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lawwatch.history import Snapshot
from lawwatch.output.sinks import PREFIX, scalars
from lawwatch.output.trackers.base import (
    TABLE_COLUMNS,
    Tracker,
    table_rows,
)

if TYPE_CHECKING:
    from lawwatch.output.trackers.opening import TrainerRun


class CometSink(Tracker):
    """Snapshots into a Comet experiment (online or offline).

    Each snapshot: ``log_metrics`` of :func:`~lawwatch.output.sinks.scalars` at the snapshot's step
    (the Trainer's ``CometCallback`` logs at the global step too). At train end: the PR table
    of every snapshot as ``lawwatch_pr_table.csv``, the report PNG as image
    ``lawwatch/report`` and the history files as assets.

    Args:
        experiment: The experiment (``comet_ml.get_running_experiment()``).
        history: Records to replay first (a resumed run).
    """

    name = "comet_ml"
    # the Trainer spells it as its callback does; a raw loop may also say "comet"
    names: ClassVar[tuple[str, ...]] = ("comet_ml", "comet")

    @classmethod
    def current(cls, run: TrainerRun) -> CometSink:
        """On ``comet_ml.get_running_experiment()`` (the Trainer's ``CometCallback``'s)."""
        import comet_ml

        experiment = comet_ml.get_running_experiment()
        if experiment is None:
            raise LookupError(
                "no Comet experiment is running: call comet_ml.start(...) before training"
            )
        return cls(experiment)

    def __init__(self, experiment: Any, *, history: Iterable[dict[str, Any]] | None = None):
        super().__init__()
        self.experiment = experiment
        self.replay(history)

    def _log(self, snapshot: Snapshot, record: dict[str, Any]) -> None:
        self.experiment.log_metrics(scalars(snapshot), step=record["step"])

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """The PR table, the PNG and the files."""
        step = self.history.last_step
        rows = [list(row) for r in self.history for row in table_rows(r)]
        if rows:
            self.experiment.log_table(
                "lawwatch_pr_table.csv", tabular_data=rows, headers=list(TABLE_COLUMNS)
            )
        if image is not None:
            self.experiment.log_image(str(image), name=f"{PREFIX}report", step=step)
        for path in files:
            self.experiment.log_asset(str(path), file_name=f"lawwatch_{Path(path).name}")
