"""MLflow (and DagsHub): metrics and artifacts in a run."""

from __future__ import annotations

import time
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


class MlflowSink(Tracker):
    """Snapshots into an MLflow run, through ``MlflowClient`` with the run's id.

    Each snapshot: one ``log_batch`` of every :func:`~lawwatch.output.sinks.scalars` key at the
    snapshot's step, and its rows appended to the table artifact ``lawwatch/pr_table.json``
    (``client.log_table``: step, layer, pr, log10_pr). At train end the report PNG and the
    history files are logged as artifacts under ``lawwatch/``. Working by run id, not through
    the fluent API, logs into that run whatever run is active in this thread.

    A run already holding lawwatch metrics (reattached with ``MLFLOW_RUN_ID``) is not sent a
    step at or before its latest one.

    Args:
        run_id: The run (``mlflow.active_run().info.run_id``).
        tracking_uri: Its tracking URI (default: MLflow's current one).
        history: Records to replay first (a resumed run).
    """

    name = "mlflow"
    # DagsHub's Trainer callback is MLflow's, with a remote tracking URI: one run, one sink
    names: ClassVar[tuple[str, ...]] = ("mlflow", "dagshub")

    @classmethod
    def current(cls, run: TrainerRun) -> MlflowSink:
        """On ``mlflow.active_run()`` (the Trainer's ``MLflowCallback`` logs into it too)."""
        import mlflow

        active = mlflow.active_run()
        if active is None:
            raise LookupError("no MLflow run is active: call mlflow.start_run() before training")
        return cls(active.info.run_id, tracking_uri=mlflow.get_tracking_uri())

    @classmethod
    def on_accelerate(cls, tracker: Any, run: TrainerRun) -> MlflowSink:
        """On the run accelerate started (its tracker's object is the active run)."""
        import mlflow

        return cls(tracker.info.run_id, tracking_uri=mlflow.get_tracking_uri())

    @classmethod
    def on_lightning(cls, logger: Any, run: TrainerRun) -> MlflowSink:
        """On an ``MLFlowLogger``'s run (its ``run_id``, at its tracking URI)."""
        client = logger.experiment  # an MlflowClient; the run is created on first access
        return cls(logger.run_id, tracking_uri=client.tracking_uri)

    def __init__(
        self,
        run_id: str,
        *,
        tracking_uri: str | None = None,
        history: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        held = self.client.get_metric_history(run_id, f"{PREFIX}pearson_r")
        super().__init__(logged_step=max((m.step for m in held), default=None))
        self.replay(history)

    def _log(self, snapshot: Snapshot, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, record["step"]) for k, v in scalars(snapshot).items()]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
        rows = table_rows(record)
        self.client.log_table(
            self.run_id,
            data={c: [row[i] for row in rows] for i, c in enumerate(TABLE_COLUMNS)},
            artifact_file=f"{PREFIX}pr_table.json",
        )

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """The PNG and the files as artifacts under ``lawwatch/``."""
        for path in [*([image] if image is not None else []), *files]:
            self.client.log_artifact(self.run_id, str(path), artifact_path="lawwatch")
