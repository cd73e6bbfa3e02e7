"""Every tracker lawwatch logs to: one class per tracker, one key scheme, the training step.

Each class takes the tracker's run, writer or experiment and logs every snapshot's
:func:`~lawwatch.output.sinks.scalars` (``lawwatch/rho``, ``lawwatch/pearson_r``, …,
``lawwatch/pr/layer_XX``) at the snapshot's training step, a table of PRs where the tracker has
tables, the report PNG and history files (:meth:`~Reporting.log_report`) and, where the tracker
has alerts, lawwatch's alerts (``alert``). The Trainer callback and the accelerate watch feed
the same classes:

| tracker | class | Trainer (``report_to``) | accelerate (``get_tracker(name, unwrap=True)``) |
|---|---|---|---|
| W&B | :class:`WandbSink` | ``wandb.run`` | the run |
| TensorBoard | :class:`TensorBoardSink` | lawwatch's writer, the Trainer's dir | the writer |
| MLflow, DagsHub | :class:`MlflowSink` | ``mlflow.active_run()`` | the active run |
| trackio | :class:`TrackioSink` | trackio's current run | the run |
| Comet | :class:`CometSink` | ``comet_ml.get_running_experiment()`` | the experiment |
| ClearML | :class:`ClearMLSink` | ``clearml.Task.current_task()`` | the task |
| DVCLive | :class:`DVCLiveSink` | ``dvclive_live=`` given, or lawwatch's own ``Live`` | the Live |

A class closes only what it opened. Each tracker package is imported only when its sink is
made. A sink holds the history it has logged: a resumed run hands it the records up to the
checkpoint (:meth:`Tracker.replay`), so a fresh tracker run holds the whole history, and a step
the tracker already holds (a run reattached to, where the tracker can say so) is not logged
twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lawwatch.alerts import Alert
from lawwatch.history import History, Snapshot, entries, law_points
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
from lawwatch.output.sinks import PREFIX, STEP_KEY, Sink, scalars

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
    "TrainerRun",
    "WandbSink",
    "accelerate_tracker",
    "open_tracker",
    "reported_trackers",
]

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


# -- Weights & Biases ---------------------------------------------------------------------------


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


# -- TensorBoard --------------------------------------------------------------------------------


class TensorBoardSink(Tracker):
    """Snapshots into a TensorBoard ``SummaryWriter`` (torch's or tensorboardX's).

    Each snapshot: every :func:`~lawwatch.output.sinks.scalars` key as a scalar at the snapshot's
    step (TensorBoard stores float32), and ``lawwatch/pr_table`` as a text (a markdown table of
    layer, PR, log10 PR). On creation a custom-scalars layout puts every ``lawwatch/pr/layer_XX``
    on one chart ("lawwatch / PR by layer", the CUSTOM SCALARS tab). At train end the report PNG
    goes in as the image ``lawwatch/report``.

    Args:
        writer: The writer.
        history: Records to replay first (a resumed run).
        own: Whether :meth:`close` closes the writer (lawwatch opened it).
    """

    name = "tensorboard"

    def __init__(
        self, writer: Any, *, history: Iterable[dict[str, Any]] | None = None, own: bool = False
    ) -> None:
        super().__init__()
        self.writer, self.own = writer, own
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
        """Close the writer if lawwatch opened it."""
        if self.own:
            self.writer.close()


# -- MLflow -------------------------------------------------------------------------------------


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
        run: The run (trackio's current run).
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
        """A trackio alert (stored with the run), at the step of the snapshot that raised it."""
        from trackio import AlertLevel

        level = AlertLevel.INFO if alert.level == "INFO" else AlertLevel.WARN
        self.run.alert(title=alert.title, text=alert.text, level=level, step=alert.at)


# -- Comet --------------------------------------------------------------------------------------


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

    DVCLive takes the step of a metric from ``live.step`` (a training loop advances it once per
    log call): for each snapshot the sink sets it to the snapshot's training step, logs every
    :func:`~lawwatch.output.sinks.scalars` key (files ``<live dir>/plots/metrics/lawwatch/
    ...tsv``), and puts the step back. The report PNG goes to
    ``<live dir>/plots/images/lawwatch/law.png`` and the latest values to the summary
    (``metrics.json``, key ``lawwatch``).

    A Live lawwatch opened itself (:meth:`open`, beside the training loop's own Live in the same
    directory) resumes the directory, so it removes nothing of the other's, and writes no
    ``dvc.yaml`` and no experiment; as the summary file is written whole by every Live of the
    directory, lawwatch merges its ``lawwatch`` key into the file on disk at :meth:`log_report`
    and :meth:`close`.

    Args:
        live: The Live.
        history: Records to replay first (a resumed run).
        own: Whether lawwatch opened ``live`` (:meth:`open`).
    """

    name = "dvclive"

    def __init__(
        self, live: Any, *, history: Iterable[dict[str, Any]] | None = None, own: bool = False
    ) -> None:
        super().__init__()
        self.live, self.own = live, own
        self.replay(history)

    @classmethod
    def open(
        cls, directory: str | Path = "dvclive", *, history: Iterable[dict[str, Any]] | None = None
    ) -> DVCLiveSink:
        """A sink on lawwatch's own Live in ``directory`` (DVCLive's default: ``./dvclive``)."""
        from dvclive import Live

        live = Live(str(directory), resume=True, save_dvc_exp=False, dvcyaml=None)
        return cls(live, history=history, own=True)

    def _log(self, snapshot: Snapshot, record: dict[str, Any]) -> None:
        before = self.live.step
        self.live.step = record["step"]
        try:
            for key, value in scalars(snapshot).items():
                self.live.log_metric(key, value)
        finally:
            self.live.step = before

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """The PNG as an image; the summary written."""
        if image is not None:
            self.live.log_image(f"{PREFIX}law.png", str(image))
        self._summarize()

    def close(self) -> None:
        """Write the summary once more, if lawwatch opened the Live."""
        if self.own:
            self._summarize()

    def _summarize(self) -> None:
        if not self.own:
            self.live.make_summary()
            return
        key = PREFIX.rstrip("/")
        path = Path(self.live.metrics_file)
        summary = json.loads(path.read_text()) if path.is_file() else {}
        summary[key] = self.live.summary.get(key, {})
        path.write_text(json.dumps(summary, indent=4))


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
        task: The task (``clearml.Task.current_task()``).
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


# -- opening a tracker ------------------------------------------------------------------------


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


@dataclass
class TrainerRun:
    """What a Trainer's tracker sinks are opened from.

    Attributes:
        args: The ``TrainingArguments``.
        since: A time (``time.time()``) before this training began: event files written since
            are this training's.
        dvclive_live: A ``dvclive.Live`` to log into (the one given to the Trainer's
            ``DVCLiveCallback``); None: lawwatch opens its own in ``./dvclive``.
    """

    args: Any = None
    since: float = 0.0
    dvclive_live: Any = None

    def tensorboard_dir(self) -> Path:
        """The Trainer's TensorBoard directory, where lawwatch's own writer writes too.

        ``TENSORBOARD_LOGGING_DIR``, else ``args.logging_dir`` (transformers before 5), else
        the ``<output_dir>/runs/<time>_<host>`` directory the Trainer's writer made for this
        training, else a new one named alike. TensorBoard reads every event file of a directory
        as one run.
        """
        chosen = os.getenv("TENSORBOARD_LOGGING_DIR") or getattr(self.args, "logging_dir", None)
        if chosen:
            return Path(chosen).expanduser()
        runs = Path(self.args.output_dir) / "runs"
        made = [
            events.parent
            for events in runs.glob("*/events.out.tfevents.*")
            if events.stat().st_mtime >= self.since
        ]
        if made:
            return max(made, key=lambda d: d.stat().st_mtime)
        from transformers.integrations.integration_utils import default_logdir

        return Path(self.args.output_dir) / default_logdir()


def _open_wandb(run: TrainerRun, history: list[dict[str, Any]], threshold: float) -> Sink:
    import wandb

    if wandb.run is None:
        raise LookupError("report_to includes wandb but no W&B run is active")
    return WandbSink(wandb.run, history=history, emergence_threshold=threshold)


def _open_tensorboard(run: TrainerRun, history: list[dict[str, Any]], _: float) -> Sink:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter

    writer = SummaryWriter(log_dir=str(run.tensorboard_dir()))
    return TensorBoardSink(writer, history=history, own=True)


def _open_mlflow(run: TrainerRun, history: list[dict[str, Any]], _: float) -> Sink:
    import mlflow

    active = mlflow.active_run()
    if active is None:
        raise LookupError("report_to includes mlflow but no MLflow run is active")
    return MlflowSink(active.info.run_id, tracking_uri=mlflow.get_tracking_uri(), history=history)


def _open_trackio(run: TrainerRun, history: list[dict[str, Any]], _: float) -> Sink:
    from trackio import context_vars

    current = context_vars.current_run.get()
    if current is None:
        raise LookupError("report_to includes trackio but no trackio run is active")
    return TrackioSink(current, history=history)


def _open_comet(run: TrainerRun, history: list[dict[str, Any]], _: float) -> Sink:
    import comet_ml

    experiment = comet_ml.get_running_experiment()
    if experiment is None:
        raise LookupError("report_to includes comet_ml but no Comet experiment is running")
    return CometSink(experiment, history=history)


def _open_dvclive(run: TrainerRun, history: list[dict[str, Any]], _: float) -> Sink:
    if run.dvclive_live is not None:
        return DVCLiveSink(run.dvclive_live, history=history)
    return DVCLiveSink.open(history=history)


def _open_clearml(run: TrainerRun, history: list[dict[str, Any]], _: float) -> Sink:
    from clearml import Task

    task = Task.current_task()
    if task is None:
        raise LookupError("report_to includes clearml but no ClearML task is running")
    return ClearMLSink(task, history=history)


Opener = Callable[[TrainerRun, list[dict[str, Any]], float], Sink]

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
"""``report_to`` name -> how its sink is opened for a Trainer."""


def open_tracker(
    name: str,
    run: TrainerRun | None = None,
    *,
    history: list[dict[str, Any]] | None = None,
    emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
) -> Sink | None:
    """The sink of one ``report_to`` tracker of a Trainer.

    Global-run trackers (W&B, MLflow, trackio, Comet, ClearML) log into their current run, as
    the Trainer's own callbacks do; TensorBoard into lawwatch's own writer in the Trainer's
    directory; DVCLive into the Live given, or lawwatch's own.

    Args:
        name: A ``report_to`` name.
        run: The Trainer's arguments and what the user gave (see :class:`TrainerRun`).
        history: Records to replay (a resumed run).
        emergence_threshold: r at or below which the law counts as emerged (W&B's summary).

    Returns:
        The sink, or None for a tracker lawwatch does not log to (e.g. "codecarbon").

    Raises:
        LookupError: The tracker has no current run.
        ImportError: Its package is not installed.
    """
    opener = TRACKERS.get(name)
    if opener is None:
        return None
    return opener(run or TrainerRun(), list(history or []), emergence_threshold)


def accelerate_tracker(name: str, tracker: Any) -> Sink | None:
    """The sink on an accelerate tracker's object (``accelerator.get_tracker(name, unwrap=True)``).

    accelerate logs each row at the training step (``accelerator.log(values, step=step)``):
    W&B's rows are logged at it too, with ``lawwatch/step`` as the charts' x-axis (see
    :class:`WandbSink`). The tracker stays accelerate's: ``accelerator.end_training()`` ends it.

    Returns:
        The sink, or None for a tracker lawwatch has no class for.
    """
    if name == "wandb":
        return WandbSink(tracker, step_metric=STEP_METRIC, run_step=True)
    if name == "tensorboard":
        return TensorBoardSink(tracker)
    if name == "mlflow":
        import mlflow

        return MlflowSink(tracker.info.run_id, tracking_uri=mlflow.get_tracking_uri())
    makers: dict[str, Callable[[Any], Sink]] = {
        "trackio": TrackioSink,
        "comet_ml": CometSink,
        "clearml": ClearMLSink,
        "dvclive": DVCLiveSink,
    }
    maker = makers.get(name)
    return None if maker is None else maker(tracker)
