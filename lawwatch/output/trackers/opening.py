"""Opening a tracker's sink: by name (a Trainer's ``report_to``, a raw loop's ``trackers``).

Or on an accelerate tracker's object (:func:`accelerate_tracker`).
The Trainer callback and :class:`~lawwatch.LawWatch` (``trackers=["wandb", ...]``) open a
tracker by name the same way (:func:`open_tracker`): global-run trackers log into their current
run, TensorBoard into lawwatch's own writer, DVCLive into the Live given or lawwatch's own.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
from lawwatch.output.sinks import Sink
from lawwatch.output.trackers.base import (
    STEP_METRIC,
)
from lawwatch.output.trackers.clearml import ClearMLSink
from lawwatch.output.trackers.comet import CometSink
from lawwatch.output.trackers.dvclive import DVCLiveSink
from lawwatch.output.trackers.mlflow import MlflowSink
from lawwatch.output.trackers.tensorboard import TensorBoardSink
from lawwatch.output.trackers.trackio import TrackioSink
from lawwatch.output.trackers.wandb import WandbSink


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
        args: The ``TrainingArguments`` (None for a loop without a Trainer).
        since: A time (``time.time()``) before this training began: event files written since
            are this training's.
        dvclive_live: A ``dvclive.Live`` to log into (the one given to the Trainer's
            ``DVCLiveCallback``); None: lawwatch opens its own in ``./dvclive``.
        logging_dir: TensorBoard's directory for a loop without a Trainer (a raw loop's
            ``<directory>/tensorboard``); None: the Trainer's, or ``runs/<time>_<host>``.
    """

    args: Any = None
    since: float = 0.0
    dvclive_live: Any = None
    logging_dir: Path | None = None

    def tensorboard_dir(self) -> Path:
        """The Trainer's TensorBoard directory, where lawwatch's own writer writes too.

        ``TENSORBOARD_LOGGING_DIR``, else ``args.logging_dir`` (transformers before 5), else
        the ``<output_dir>/runs/<time>_<host>`` directory the Trainer's writer made for this
        training, else a new one named alike. TensorBoard reads every event file of a directory
        as one run. Without a Trainer: ``TENSORBOARD_LOGGING_DIR``, else :attr:`logging_dir`,
        else ``runs/<time>_<host>`` (``SummaryWriter``'s default).
        """
        chosen = (
            os.getenv("TENSORBOARD_LOGGING_DIR")
            or self.logging_dir
            or getattr(self.args, "logging_dir", None)
        )
        if chosen:
            return Path(chosen).expanduser()
        if self.args is None:
            return Path("runs") / f"{datetime.now():%b%d_%H-%M-%S}_{socket.gethostname()}"
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
        raise LookupError("no W&B run is active: call wandb.init(project=...) before training")
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
        raise LookupError("no MLflow run is active: call mlflow.start_run() before training")
    return MlflowSink(active.info.run_id, tracking_uri=mlflow.get_tracking_uri(), history=history)


def _open_trackio(run: TrainerRun, history: list[dict[str, Any]], _: float) -> Sink:
    from trackio import context_vars

    current = context_vars.current_run.get()
    if current is None:
        raise LookupError(
            "no trackio run is active: call trackio.init(project=...) before training"
        )
    return TrackioSink(current, history=history)


def _open_comet(run: TrainerRun, history: list[dict[str, Any]], _: float) -> Sink:
    import comet_ml

    experiment = comet_ml.get_running_experiment()
    if experiment is None:
        raise LookupError(
            "no Comet experiment is running: call comet_ml.start(...) before training"
        )
    return CometSink(experiment, history=history)


def _open_dvclive(run: TrainerRun, history: list[dict[str, Any]], _: float) -> Sink:
    if run.dvclive_live is not None:
        return DVCLiveSink(run.dvclive_live, history=history)
    return DVCLiveSink.open(history=history)


def _open_clearml(run: TrainerRun, history: list[dict[str, Any]], _: float) -> Sink:
    from clearml import Task

    task = Task.current_task()
    if task is None:
        raise LookupError("no ClearML task is running: call clearml.Task.init(...) before training")
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


# names a raw loop may also use for a tracker (the Trainer spells it as its callback does)
ALIASES = {"comet": "comet_ml"}


def check_trackers(trackers: Sequence[str | Sink] | None) -> list[str | Sink]:
    """A raw loop's ``trackers``, checked before anything opens: names known, sinks sinks.

    Raises:
        TypeError: ``trackers`` not a list, or an item neither a name nor a sink.
        ValueError: A name lawwatch has no tracker for.
    """
    if trackers is None:
        return []
    if isinstance(trackers, str | bytes) or not isinstance(trackers, Sequence):
        raise TypeError(
            f"trackers must be a list of tracker names or sinks, got {trackers!r}; "
            'e.g. trackers=["tensorboard"].'
        )
    known = sorted({*TRACKERS, *ALIASES})
    for item in trackers:
        if isinstance(item, str):
            if ALIASES.get(item, item) not in TRACKERS:
                raise ValueError(f"trackers: unknown tracker {item!r}; choose from {known}.")
        elif not all(callable(getattr(item, verb, None)) for verb in ("write", "close")):
            raise TypeError(
                f"trackers: {item!r} is neither a tracker name ({known}) nor a sink (an "
                "object with write(snapshot) and close(), see lawwatch.output.sinks.Sink)."
            )
    return list(trackers)


def open_trackers(
    trackers: Sequence[str | Sink],
    *,
    directory: Path | None = None,
    emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
) -> dict[str, Sink]:
    """The sinks of a raw loop's ``trackers`` (main process), opened by name or given.

    Each name is opened as the Trainer's ``report_to`` is (:func:`open_tracker`); a sink is
    kept as given.

    Args:
        trackers: Names and sinks, checked by :func:`check_trackers`.
        directory: The loop's local directory: TensorBoard writes in ``<directory>/tensorboard``
            (default ``runs/<time>_<host>``).
        emergence_threshold: r at or below which the law counts as emerged (W&B's summary).

    Returns:
        Name (a sink's class name for a sink given) -> its sink, in the order given.

    Raises:
        LookupError: A tracker has no current run; the message says how to start one.
        ImportError: A tracker's package is not installed.
    """
    run = TrainerRun(logging_dir=None if directory is None else Path(directory) / "tensorboard")
    opened: dict[str, Sink] = {}
    for item in trackers:
        if not isinstance(item, str):
            opened[f"{type(item).__name__}#{len(opened)}"] = item
            continue
        name = ALIASES.get(item, item)
        if name in opened:
            continue
        try:
            sink = open_tracker(name, run, emergence_threshold=emergence_threshold)
        except LookupError as error:
            raise LookupError(f"trackers includes {item!r}, but {error}") from None
        except ImportError as error:
            raise ImportError(
                f"trackers includes {item!r}, but its package is not installed ({error})"
            ) from error
        if sink is not None:
            opened[name] = sink
    return opened


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
