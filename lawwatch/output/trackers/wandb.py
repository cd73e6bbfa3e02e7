"""Weights & Biases: scalars, the PR table, a summary, the report image, alerts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lawwatch.alerts import Alert
from lawwatch.history import Snapshot, law_points
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
from lawwatch.output.sinks import PREFIX, STEP_KEY, scalars
from lawwatch.output.trackers.base import (
    STEP_METRIC,
    TABLE_COLUMNS,
    Tracker,
    table_rows,
)

# the step every WandbLogger row carries, the x-axis of Lightning's charts
LIGHTNING_STEP = "trainer/global_step"

if TYPE_CHECKING:
    from lawwatch.output.trackers.opening import TrainerRun


class WandbSink(Tracker):
    """Snapshots into a live W&B run: scalars, a growing table, a chart of the law, the summary.

    Each snapshot is one ``run.log`` row holding :func:`~lawwatch.output.sinks.scalars`, the
    rows of the ``lawwatch/pr_table`` table (step, layer, pr, log10_pr; logged incrementally,
    so it grows), the ``lawwatch/law`` line chart (log10 PR against layer, one line per
    snapshot), and the training step as ``lawwatch/step`` and as ``step_metric``, the x-axis
    of the ``lawwatch/*`` charts. The run summary keeps the latest ``rho``, ``pearson_r`` and
    ``step`` and the ``lawwatch/emergence_step``; alerts are ``run.alert``.

    Where the run's own step is the training step (``run_step``: accelerate logs with
    ``step=``), a row is logged at it; W&B drops a row at a step it has passed, which is what a
    background snapshot is, so such a row goes into W&B's current row and lands at its own
    ``lawwatch/step`` on the charts. Otherwise (the Trainer counts W&B's rows itself) every row
    goes into W&B's current row.

    A run holds each step at most once, in increasing order: a step at or before the last one
    the run already holds (``lawwatch/step`` in its summary, which W&B restores when a run is
    resumed) is kept for the chart but not logged again.

    Args:
        run: The run to log into.
        history: Records measured before this sink existed (steps increasing), replayed.
        emergence_threshold: r at or below which the law counts as emerged.
        step_metric: The x-axis of the lawwatch charts: the Trainer's ``train/global_step``,
            so the law's charts share the loss's x-axis, or ``lawwatch/step``.
        run_step: Whether W&B's row index is the training step.
        max_lines: Most snapshots drawn in the chart, evenly spread over the history (the first
            and the latest always drawn); every snapshot stays in the table.
    """

    name = "wandb"
    names: ClassVar[tuple[str, ...]] = ("wandb",)

    @classmethod
    def current(cls, run: TrainerRun) -> WandbSink:
        """On ``wandb.run`` (the Trainer's ``WandbCallback`` logs into it too)."""
        import wandb

        if wandb.run is None:
            raise LookupError("no W&B run is active: call wandb.init(project=...) before training")
        return cls(
            wandb.run,
            emergence_threshold=run.emergence_threshold,
            step_metric=run.step_key or STEP_KEY,
        )

    @classmethod
    def on_accelerate(cls, tracker: Any, run: TrainerRun) -> WandbSink:
        """On accelerate's run, whose rows are logged at the training step (``step=``)."""
        return cls(
            tracker,
            emergence_threshold=run.emergence_threshold,
            step_metric=STEP_METRIC,
            run_step=True,
        )

    @classmethod
    def on_lightning(cls, logger: Any, run: TrainerRun) -> WandbSink:
        """On a ``WandbLogger``'s run, whose x-axis is ``trainer/global_step`` (the loss's too)."""
        return cls(
            logger.experiment,
            emergence_threshold=run.emergence_threshold,
            step_metric=LIGHTNING_STEP,
        )

    def __init__(
        self,
        run: Any,
        *,
        history: Iterable[dict[str, Any]] | None = None,
        emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
        step_metric: str = STEP_KEY,
        run_step: bool = False,
        max_lines: int = 16,
    ) -> None:
        import wandb

        if max_lines < 2:
            raise ValueError(f"max_lines must be at least 2 (first and latest), got {max_lines}.")
        super().__init__(logged_step=run.summary.get(STEP_METRIC))
        self.run, self.step_metric, self.run_step = run, step_metric, run_step
        self.emergence_threshold, self.max_lines = emergence_threshold, max_lines
        self.table = wandb.Table(columns=list(TABLE_COLUMNS), log_mode="INCREMENTAL")
        run.define_metric(step_metric)
        run.define_metric(f"{PREFIX}*", step_metric=step_metric)
        self.replay(history)

    def _log(self, snapshot: Snapshot, record: dict[str, Any]) -> None:
        step = record["step"]
        for row in table_rows(record):
            self.table.add_data(*row)
        row = {**scalars(snapshot), f"{PREFIX}pr_table": self.table, f"{PREFIX}law": self._chart()}
        self._row(row, step)
        self.run.summary.update(
            {
                STEP_METRIC: step,
                f"{PREFIX}rho": record["rho"],
                f"{PREFIX}pearson_r": record["pearson_r"],
                f"{PREFIX}emergence_step": self.history.emergence_step(self.emergence_threshold),
            }
        )

    def _row(self, row: dict[str, Any], step: int) -> None:
        row = {**row, STEP_METRIC: step, self.step_metric: step}
        if self.run_step and step >= self.run.step:  # W&B's row for this step is still open
            self.run.log(row, step=step)
        else:
            self.run.log(row)

    def _chart(self) -> Any:
        """``wandb.plot.line_series`` of log10 PR against layer (entries 1 … L: the law's fit)."""
        import wandb

        picked = self.history.records
        if len(picked) > self.max_lines:
            last = len(picked) - 1
            picked = [picked[round(i * last / (self.max_lines - 1))] for i in range(self.max_lines)]
        points = [law_points(r) for r in picked]
        return wandb.plot.line_series(
            xs=[xs for xs, _ in points],
            ys=[ys for _, ys in points],
            keys=[f"step {r['step']}" for r in picked],
            title="log10 PR vs layer over training",
            xname="layer",
        )

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """The PNG as ``lawwatch/report`` at the latest measured step (the files stay local)."""
        if image is not None:
            import wandb

            self._row({f"{PREFIX}report": wandb.Image(str(image))}, self.history.last_step or 0)

    def alert(self, alert: Alert) -> None:
        """A W&B alert (``run.alert``: e-mail or Slack, as the user's W&B settings say)."""
        import wandb

        level = wandb.AlertLevel.INFO if alert.level == "INFO" else wandb.AlertLevel.WARN
        # W&B holds back a second alert of the same title for wait_duration; lawwatch raises
        # each alert once, so none should wait (W&B titles: under 64 characters)
        self.run.alert(title=alert.title[:63], text=alert.text, level=level, wait_duration=1)
