"""Every tracker lawwatch logs to: one class per tracker, one key scheme, the training step.

Each class takes the tracker's run, writer or experiment and logs every snapshot's
:func:`~lawwatch.output.sinks.scalars` (``lawwatch/rho``, ``lawwatch/pearson_r``, …,
``lawwatch/pr/layer_XX``) at the snapshot's training step, a table of PRs where the tracker has
tables, the report PNG and history files (:meth:`~Reporting.log_report`) and, where the tracker
has alerts, lawwatch's alerts (``alert``). Each class registers its names and opens itself on
a run that exists (:meth:`Tracker.current`, :meth:`Tracker.on_accelerate`,
:meth:`Tracker.on_lightning`); the Trainer callback, the raw loop's ``trackers``, the accelerate
watch and the Lightning callback feed the same classes:

| tracker | class | ``current``: ``report_to``, ``trackers=`` | ``on_accelerate``: ``get_tracker`` |
|---|---|---|---|
| W&B | :class:`WandbSink` | ``wandb.run`` | the run |
| TensorBoard | :class:`TensorBoardSink` | lawwatch's writer, the Trainer's dir | the writer |
| MLflow, DagsHub | :class:`MlflowSink` | ``mlflow.active_run()`` | the active run |
| trackio | :class:`TrackioSink` | trackio's current run | the run |
| Comet | :class:`CometSink` | ``comet_ml.get_running_experiment()`` | the experiment |
| ClearML | :class:`ClearMLSink` | ``clearml.Task.current_task()`` | the task |
| DVCLive | :class:`DVCLiveSink` | ``dvclive_live=`` given, or lawwatch's own ``Live`` | the Live |

``on_lightning`` attaches to a Lightning logger's run (``logger.experiment``: ``WandbLogger``,
``TensorBoardLogger``, ``MLFlowLogger``, ``CometLogger``); any other Lightning logger
(``CSVLogger`` among them) gets the scalars through its own ``log_metrics``
(:mod:`lawwatch.output.trackers.lightning`).

A class closes only what it opened. Each tracker package is imported only when its sink is
made. A sink holds the history it has logged: a resumed run hands it the records up to the
checkpoint (:meth:`Tracker.replay`), so a fresh tracker run holds the whole history, and a step
the tracker already holds (a run reattached to, where the tracker can say so) is not logged
twice.
"""

from lawwatch.output.trackers.accelerator import AcceleratorTrackers, accelerate_tracker
from lawwatch.output.trackers.base import TRACKERS, Reporting, Tracker
from lawwatch.output.trackers.clearml import ClearMLSink
from lawwatch.output.trackers.comet import CometSink
from lawwatch.output.trackers.dvclive import DVCLiveSink
from lawwatch.output.trackers.mlflow import MlflowSink
from lawwatch.output.trackers.opening import (
    TrainerRun,
    check_trackers,
    open_trackers,
    reported_trackers,
)
from lawwatch.output.trackers.tensorboard import TensorBoardSink
from lawwatch.output.trackers.trackio import TrackioSink
from lawwatch.output.trackers.wandb import WandbSink

__all__ = [
    "TRACKERS",
    "AcceleratorTrackers",
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
    "check_trackers",
    "open_trackers",
    "reported_trackers",
]
