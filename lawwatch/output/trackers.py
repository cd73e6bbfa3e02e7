"""Every tracker the Trainer reports to: one small sink per tracker, one key scheme, one x-axis.

Each sink takes the tracker object the Trainer's own reporting callback made (its run, writer
or experiment), so no second run is opened, and logs every snapshot's
:func:`~lawwatch.output.sinks.scalars` (``lawwatch/rho``, ``lawwatch/pearson_r``, …,
``lawwatch/pr/layer_XX``) at the snapshot's training step, plus a table of PRs where the
tracker has tables, and the report PNG and history files at train end (:meth:`log_report`).

| ``report_to`` | sink | where the tracker object comes from |
|---|---|---|
| ``"wandb"`` | :class:`lawwatch.output.sinks.WandbSink` | ``wandb.run`` |
| ``"tensorboard"`` | :class:`TensorBoardSink` | ``TensorBoardCallback.tb_writer`` |
| ``"mlflow"``, ``"dagshub"`` | :class:`MlflowSink` | ``mlflow.active_run()`` |
| ``"trackio"`` | :class:`TrackioSink` | trackio's current run |
| ``"comet_ml"`` | :class:`CometSink` | ``comet_ml.get_running_experiment()`` |
| ``"dvclive"`` | :class:`DVCLiveSink` | ``DVCLiveCallback.live`` |
| ``"clearml"`` | :class:`ClearMLSink` | ``clearml.Task.current_task()`` |

Each tracker package is imported only when its sink is opened. A sink holds the history it
has logged: a resumed run hands it the records up to the checkpoint (:meth:`Tracker.replay`),
so a fresh tracker run holds the whole history, and a step the tracker already holds (a run
reattached to, where the tracker can say so) is not logged twice.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lawwatch.alerts import Alert
from lawwatch.history import History, Snapshot, entries
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
from lawwatch.output.sinks import PREFIX, STEP_KEY, Sink, WandbSink, scalars

__all__ = [
    "TRACKERS",
    "ClearMLSink",
    "CometSink",
    "DVCLiveSink",
    "MlflowSink",
    "Reporting",
    "TensorBoardSink",
    "Tracker",
    "TrackioSink",
    "open_tracker",
    "reported_trackers",
]

log = logging.getLogger("lawwatch")

TABLE_COLUMNS = ("step", "layer", "pr", "log10_pr")


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


class Tracker:
    """Base of the tracker sinks: a history, each step logged once, in increasing order.

    Subclasses implement :meth:`_log` (one snapshot) and optionally :meth:`log_report`; they
    call :meth:`replay` at the end of ``__init__``.

    Args:
        logged_step: The latest step the tracker already holds (a reattached run), if known.
    """

    name = "tracker"

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


# -- TensorBoard --------------------------------------------------------------------------------


class TensorBoardSink(Tracker):
    """Snapshots into a TensorBoard ``SummaryWriter`` (torch's or tensorboardX's).

    Each snapshot: every :func:`~lawwatch.output.sinks.scalars` key as a scalar at the snapshot's
    step (TensorBoard stores float32), and ``lawwatch/pr_table`` as a text (a markdown table of
    layer, PR, log10 PR). On creation a custom-scalars layout puts every ``lawwatch/pr/layer_XX``
    on one chart ("lawwatch / PR by layer", the CUSTOM SCALARS tab). At train end the report PNG
    goes in as the image ``lawwatch/report``.

    The Trainer's ``TensorBoardCallback`` closes its writer in its ``on_train_end``, before
    lawwatch's final snapshot: a closed ``SummaryWriter`` reopens a new event file in the same
    directory on the next write, which :meth:`close` closes again.

    Args:
        writer: The writer (the Trainer's: ``TensorBoardCallback.tb_writer``).
        history: Records to replay first (a resumed run).
    """

    name = "tensorboard"

    def __init__(self, writer: Any, *, history: Iterable[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.writer = writer
        writer.add_custom_scalars(
            {
                "lawwatch": {
                    "PR by layer": ["Multiline", [rf"{PREFIX}pr/layer_\d+"]],
                    "Pearson r": ["Multiline", [f"{PREFIX}pearson_r"]],
                    "decay ratio rho": ["Multiline", [f"{PREFIX}rho"]],
                }
            }
        )
        self.replay(history)

    def _log(self, snapshot: Snapshot, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in scalars(snapshot).items():
            self.writer.add_scalar(key, value, step)
        lines = [f"step {step}", "", "| layer | PR | log10 PR |", "|---:|---:|---:|"]
        lines += [
            f"| {layer} | {pr:.6f} | {'' if lg is None else f'{lg:.6f}'} |"
            for _, layer, pr, lg in table_rows(record)
        ]
        self.writer.add_text(f"{PREFIX}pr_table", "\n".join(lines), step)
        self.writer.flush()

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """The PNG as image ``lawwatch/report`` at the latest step."""
        if image is None:
            return
        from matplotlib.image import imread

        pixels = imread(str(image))  # (H, W, 4) float32 in [0, 1] for a PNG
        self.writer.add_image(
            f"{PREFIX}report", pixels, self.history.last_step or 0, dataformats="HWC"
        )
        self.writer.flush()

    def close(self) -> None:
        """Close the writer (harmless to its owner: a closed writer reopens when written to)."""
        self.writer.close()


# -- MLflow -------------------------------------------------------------------------------------


class MlflowSink(Tracker):
    """Snapshots into an MLflow run, through ``MlflowClient`` with the run's id.

    Each snapshot: one ``log_batch`` of every :func:`~lawwatch.output.sinks.scalars` key at the
    snapshot's step, and its rows appended to the table artifact ``lawwatch/pr_table.json``
    (``client.log_table``: step, layer, pr, log10_pr). At train end the report PNG and the
    history files are logged as artifacts under ``lawwatch/``. Working by run id, not through
    the fluent API, keeps logging after the Trainer's ``MLflowCallback`` has ended its run (it
    ends it in ``on_train_end``, before lawwatch's final snapshot).

    A run already holding lawwatch metrics (reattached with ``MLFLOW_RUN_ID``) is not sent a
    step at or before its latest one.

    Args:
        run_id: The run (the Trainer's: ``mlflow.active_run().info.run_id``).
        tracking_uri: Its tracking URI (default: MLflow's current one).
        history: Records to replay first (a resumed run).
    """

    name = "mlflow"

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


# -- trackio ------------------------------------------------------------------------------------


class TrackioSink(Tracker):
    """Snapshots into a trackio run.

    Each snapshot is one ``run.log`` row of :func:`~lawwatch.output.sinks.scalars` plus
    ``train/global_step``, as the Trainer's ``TrackioCallback`` logs its own rows (it lets
    trackio count its log calls, so an explicit step of lawwatch's would shift the Trainer's
    curves): choose ``train/global_step`` as the x-axis in the dashboard, as for the loss. The
    PR table goes in as ``lawwatch/pr_table`` (a ``trackio.Table`` of every snapshot so far),
    the report PNG as ``lawwatch/report``, and alerts as trackio alerts.

    Args:
        run: The run (the Trainer's: trackio's current run, kept after ``trackio.finish``).
        history: Records to replay first (a resumed run).
        step_key: The x-axis metric every row carries.
    """

    name = "trackio"

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
        """A trackio alert (stored with the run, shown in the dashboard)."""
        trackio_alert(self.run, alert)


def trackio_alert(run: Any, alert: Alert) -> None:
    """Raise a lawwatch alert in a trackio run, at the step of the snapshot that raised it."""
    from trackio import AlertLevel

    level = AlertLevel.INFO if alert.level == "INFO" else AlertLevel.WARN
    run.alert(title=alert.title, text=alert.text, level=level, step=alert.at)


# -- Comet --------------------------------------------------------------------------------------


class CometSink(Tracker):
    """Snapshots into a Comet experiment (online or offline).

    Each snapshot: ``log_metrics`` of :func:`~lawwatch.output.sinks.scalars` at the snapshot's step
    (the Trainer's ``CometCallback`` logs at the global step too). At train end: the PR table
    of every snapshot as ``lawwatch_pr_table.csv``, the report PNG as image
    ``lawwatch/report`` and the history files as assets.

    Args:
        experiment: The experiment (the Trainer's: ``comet_ml.get_running_experiment()``).
        history: Records to replay first (a resumed run).
    """

    name = "comet_ml"

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


# -- DVCLive ------------------------------------------------------------------------------------


class DVCLiveSink(Tracker):
    """Snapshots into a ``dvclive.Live``.

    DVCLive takes the step of a metric from ``live.step`` (the Trainer's ``DVCLiveCallback``
    advances it once per log call): for each snapshot the sink sets it to the snapshot's
    training step, logs every :func:`~lawwatch.output.sinks.scalars` key (files
    ``<live dir>/plots/metrics/lawwatch/...tsv``), and puts the step back. At train end the
    report PNG goes to ``<live dir>/plots/images/lawwatch/law.png`` and the summary
    (``metrics.json``) is rewritten with the latest values.

    Args:
        live: The Live (the Trainer's: ``DVCLiveCallback.live``).
        history: Records to replay first (a resumed run).
    """

    name = "dvclive"

    def __init__(self, live: Any, *, history: Iterable[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.live = live
        self.replay(history)

    def _log(self, snapshot: Snapshot, record: dict[str, Any]) -> None:
        before = self.live.step
        self.live.step = record["step"]
        try:
            for key, value in scalars(snapshot).items():
                self.live.log_metric(key, value)
        finally:
            self.live.step = before

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """The PNG as an image; the summary rewritten."""
        if image is not None:
            self.live.log_image(f"{PREFIX}law.png", str(image))
        self.live.make_summary()


# -- ClearML -----------------------------------------------------------------------------------


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
        task: The task (the Trainer's: ``clearml.Task.current_task()``).
        history: Records to replay first (a resumed run).
    """

    name = "clearml"

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


# -- choosing from report_to --------------------------------------------------------------------


def reported_trackers(report_to: str | Sequence[str] | None) -> list[str]:
    """``TrainingArguments.report_to`` as a list of names ("all" and "none" resolved)."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names in (["none"], []):
        return []
    if names == ["all"]:
        from transformers.integrations import get_available_reporting_integrations

        return list(get_available_reporting_integrations())
    return names


def _peer(peers: Sequence[Any], class_name: str) -> Any | None:
    """The Trainer's callback of that class, if any."""
    return next((p for p in peers if type(p).__name__ == class_name), None)


def _open_wandb(peers: Sequence[Any], history: list[dict[str, Any]], threshold: float) -> Any:
    import wandb

    if wandb.run is None:
        raise LookupError("report_to includes wandb but no W&B run is active")
    return WandbSink(wandb.run, history=history, emergence_threshold=threshold)


def _open_tensorboard(peers: Sequence[Any], history: list[dict[str, Any]], _: float) -> Any:
    callback = _peer(peers, "TensorBoardCallback")
    writer = getattr(callback, "tb_writer", None)
    if writer is None:
        raise LookupError("report_to includes tensorboard but the Trainer made no writer")
    return TensorBoardSink(writer, history=history)


def _open_mlflow(peers: Sequence[Any], history: list[dict[str, Any]], _: float) -> Any:
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise LookupError("report_to includes mlflow but no MLflow run is active")
    return MlflowSink(run.info.run_id, tracking_uri=mlflow.get_tracking_uri(), history=history)


def _open_trackio(peers: Sequence[Any], history: list[dict[str, Any]], _: float) -> Any:
    from trackio import context_vars

    run = context_vars.current_run.get()
    if run is None:
        raise LookupError("report_to includes trackio but no trackio run is active")
    return TrackioSink(run, history=history)


def _open_comet(peers: Sequence[Any], history: list[dict[str, Any]], _: float) -> Any:
    import comet_ml

    experiment = comet_ml.get_running_experiment()
    if experiment is None:
        raise LookupError("report_to includes comet_ml but no Comet experiment is running")
    return CometSink(experiment, history=history)


def _open_dvclive(peers: Sequence[Any], history: list[dict[str, Any]], _: float) -> Any:
    live = getattr(_peer(peers, "DVCLiveCallback"), "live", None)
    if live is None:
        raise LookupError("report_to includes dvclive but the Trainer made no dvclive.Live")
    return DVCLiveSink(live, history=history)


def _open_clearml(peers: Sequence[Any], history: list[dict[str, Any]], _: float) -> Any:
    from clearml import Task

    task = Task.current_task()
    if task is None:
        raise LookupError("report_to includes clearml but no ClearML task is running")
    return ClearMLSink(task, history=history)


Opener = Callable[[Sequence[Any], list[dict[str, Any]], float], Sink]

TRACKERS: dict[str, Opener] = {
    "wandb": _open_wandb,
    "tensorboard": _open_tensorboard,
    "mlflow": _open_mlflow,
    "dagshub": _open_mlflow,  # DagsHub's callback is MLflow's, with a remote tracking URI
    "trackio": _open_trackio,
    "comet_ml": _open_comet,
    "dvclive": _open_dvclive,
    "clearml": _open_clearml,
}
"""``report_to`` name -> how its sink is opened from the Trainer's callbacks."""


def open_tracker(
    name: str,
    *,
    peers: Sequence[Any] = (),
    history: list[dict[str, Any]] | None = None,
    emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
) -> Sink | None:
    """The sink of one ``report_to`` tracker, on the object the Trainer's callback created.

    Call it after the Trainer's reporting callbacks ran ``on_train_begin`` (they come before
    the user's callbacks).

    Args:
        name: A ``report_to`` name.
        peers: The Trainer's callbacks (where the TensorBoard writer and the DVCLive Live are).
        history: Records to replay (a resumed run).
        emergence_threshold: r at or below which the law counts as emerged (W&B's summary).

    Returns:
        The sink, or None for a tracker lawwatch does not log to (e.g. "codecarbon").

    Raises:
        LookupError: The tracker's object was not found (no active run, no writer).
        ImportError: Its package is not installed.
    """
    opener = TRACKERS.get(name)
    if opener is None:
        return None
    return opener(peers, list(history or []), emergence_threshold)
