"""ClearML: scalars, the PR table, the report image and files."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lawwatch.history import Snapshot
from lawwatch.output.sinks import PREFIX, scalars
from lawwatch.output.trackers.base import (
    Tracker,
    table_rows,
)

if TYPE_CHECKING:
    from lawwatch.output.trackers.opening import TrainerRun


class ClearMLSink(Tracker):
    """Snapshots into a ClearML task (online or offline), through its logger.

    Each key of :func:`~lawwatch.output.sinks.scalars` is reported as ``title/series`` (the split at
    its last ``/``, as the Trainer's ``ClearMLCallback`` reports ``train/loss`` as title
    ``train``, series ``loss``): every ``lawwatch/pr/layer_XX`` is one series of the chart
    ``lawwatch/pr``; the fit's values are series of the chart ``lawwatch``. The iteration is
    the training step. Each snapshot also reports the table ``lawwatch/pr_table`` (layer, pr,
    log10_pr); at train end the report PNG goes in as image ``lawwatch/report`` and the history
    files as artifacts.

    Args:
        task: The task (``clearml.Task.current_task()``).
        history: Records to replay first (a resumed run).
    """

    name = "clearml"
    names: ClassVar[tuple[str, ...]] = ("clearml",)

    @classmethod
    def current(cls, run: TrainerRun) -> ClearMLSink:
        """On ``clearml.Task.current_task()`` (the Trainer's ``ClearMLCallback``'s)."""
        from clearml import Task

        task = Task.current_task()
        if task is None:
            raise LookupError(
                "no ClearML task is running: call clearml.Task.init(...) before training"
            )
        return cls(task)

    def __init__(self, task: Any, *, history: Iterable[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.task = task
        self.logger = task.get_logger()
        self.replay(history)

    def _log(self, snapshot: Snapshot, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in scalars(snapshot).items():
            title, series = key.rsplit("/", 1)
            self.logger.report_scalar(title=title, series=series, value=value, iteration=step)
        rows = [["layer", "pr", "log10_pr"]]
        rows += [[layer, pr, lg] for _, layer, pr, lg in table_rows(record)]
        self.logger.report_table(
            title=f"{PREFIX}pr_table", series="pr", iteration=step, table_plot=rows
        )

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """The PNG as an image; the files as artifacts ``lawwatch_<name>``."""
        if image is not None:
            self.logger.report_image(
                title=f"{PREFIX}report",
                series="law",
                iteration=self.history.last_step or 0,
                local_path=str(image),
            )
        for path in files:
            self.task.upload_artifact(
                f"lawwatch_{Path(path).name}", artifact_object=str(path), wait_on_upload=True
            )
        self.logger.flush()
