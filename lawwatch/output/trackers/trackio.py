"""trackio: scalars, the PR table, the report image, alerts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lawwatch.alerts import Alert
from lawwatch.history import Snapshot
from lawwatch.output.sinks import PREFIX, STEP_KEY, scalars
from lawwatch.output.trackers.base import (
    TABLE_COLUMNS,
    Tracker,
    table_rows,
)

if TYPE_CHECKING:
    from lawwatch.output.trackers.opening import TrainerRun


class TrackioSink(Tracker):
    """Snapshots into a trackio run.

    Each snapshot is one ``run.log`` row of :func:`~lawwatch.output.sinks.scalars` plus
    ``train/global_step``, as the Trainer's ``TrackioCallback`` logs its own rows (it lets
    trackio count its log calls, so an explicit step of lawwatch's would shift the Trainer's
    curves): choose ``train/global_step`` as the x-axis in the dashboard, as for the loss. The
    PR table goes in as ``lawwatch/pr_table`` (a ``trackio.Table`` of every snapshot so far),
    the report PNG as ``lawwatch/report``, and alerts as trackio alerts.

    Args:
        run: The run (trackio's current run).
        history: Records to replay first (a resumed run).
        step_key: The x-axis metric every row carries.
    """

    name = "trackio"
    names: ClassVar[tuple[str, ...]] = ("trackio",)

    @classmethod
    def current(cls, run: TrainerRun) -> TrackioSink:
        """On trackio's current run (the Trainer's ``TrackioCallback`` logs into it too)."""
        from trackio import context_vars

        current = context_vars.current_run.get()
        if current is None:
            raise LookupError(
                "no trackio run is active: call trackio.init(project=...) before training"
            )
        return cls(current)

    def __init__(
        self,
        run: Any,
        *,
        history: Iterable[dict[str, Any]] | None = None,
        step_key: str = STEP_KEY,
    ) -> None:
        super().__init__()
        self.run, self.step_key = run, step_key
        self.replay(history)

    def _log(self, snapshot: Snapshot, record: dict[str, Any]) -> None:
        import trackio

        rows = [row for r in self.history for row in table_rows(r)]
        table = trackio.Table(columns=list(TABLE_COLUMNS), data=[list(row) for row in rows])
        self.run.log(
            {**scalars(snapshot), f"{PREFIX}pr_table": table, self.step_key: record["step"]}
        )

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """The PNG as ``lawwatch/report`` in a row at the latest step."""
        if image is None:
            return
        import trackio

        self.run.log(
            {f"{PREFIX}report": trackio.Image(str(image)), self.step_key: self.history.last_step}
        )

    def alert(self, alert: Alert) -> None:
        """A trackio alert (stored with the run), at the step of the snapshot that raised it."""
        from trackio import AlertLevel

        level = AlertLevel.INFO if alert.level == "INFO" else AlertLevel.WARN
        self.run.alert(title=alert.title, text=alert.text, level=level, step=alert.at)
