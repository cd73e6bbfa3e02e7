"""🤗 Accelerate custom loops: the monitor wired to the accelerator's trackers and local files.

A custom training loop needs three lines::

    watch = AcceleratorWatch(accelerator, model, probe, every=500, directory="run/lawwatch")
    accelerator.register_for_checkpointing(watch)  # the history survives save_state/load_state
    ...
    watch.maybe_snapshot(step)  # on every process, after each optimizer step

Every snapshot goes, on the main process, to the accelerator's trackers through
:class:`TrackerSink` (once ``accelerator.init_trackers`` has been called: W&B, TensorBoard, any
``GeneralTracker``; keys from :func:`lawwatch.scalars`, at the training step) and, with
``directory``, to a :class:`~lawwatch.output.sinks.LocalHistory` there, besides any sinks given.
``alerts=True`` adds :class:`~lawwatch.alerts.AlertSink` (W&B and trackio trackers get the alerts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lawwatch.alerts import Alert, Alerting, Alerts, AlertSink
from lawwatch.config import MeasureConfig
from lawwatch.history import Snapshot
from lawwatch.output.sinks import PREFIX, LocalHistory, Sink, Sinks, scalars, wandb_alert
from lawwatch.probe import ProbeSet
from lawwatch.watch.config import WatchConfig
from lawwatch.watch.monitor import LawWatch

log = logging.getLogger("lawwatch")

# the x-axis of lawwatch's W&B charts in an accelerate loop: the step each snapshot was taken at
STEP_METRIC = f"{PREFIX}step"


class TrackerSink:
    """Writes snapshots to the accelerator's trackers (main process only), at their step.

    Each tracker gets :func:`~lawwatch.output.sinks.scalars` with the snapshot's training step, as
    ``accelerator.log(values, step=step)`` would give it (a tracker that fails is reported,
    the others still get the snapshot). W&B is the exception: its rows have one increasing
    ``step`` and it drops a row logged at an earlier step than it holds, which is what a
    background snapshot is (``LawWatch(background=True)`` records step ``s`` a few steps
    later). So every lawwatch row in W&B also carries ``lawwatch/step``, the x-axis of the
    ``lawwatch/*`` charts (``define_metric``), and a row whose step W&B has passed is logged
    without ``step`` (into W&B's current row): it lands at its own ``lawwatch/step`` on the
    dashboard. TensorBoard, MLflow, Comet and ClearML take any step.

    Does nothing while the accelerator has no tracker (``init_trackers`` not called, or
    ``log_with`` unset), so it can always be attached.

    Args:
        accelerator: The ``accelerate.Accelerator`` of the training run.
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self._defined: set[int] = set()  # W&B runs given the lawwatch/step axis

    def write(self, snapshot: Snapshot) -> None:
        """Log the snapshot's :func:`~lawwatch.output.sinks.scalars` at its training step."""
        values = scalars(snapshot)
        for tracker in getattr(self.accelerator, "trackers", None) or []:
            try:
                if tracker.name == "wandb":
                    self._wandb(tracker.tracker, values, snapshot.step)
                else:
                    tracker.log(values, step=snapshot.step)
            except Exception:
                log.exception("lawwatch: tracker %s failed at step %s", tracker.name, snapshot.step)

    def _wandb(self, run: Any, values: dict[str, float], step: int) -> None:
        if id(run) not in self._defined:
            run.define_metric(STEP_METRIC)
            run.define_metric(f"{PREFIX}*", step_metric=STEP_METRIC)
            self._defined.add(id(run))
        row = {**values, STEP_METRIC: step}
        if step >= run.step:  # W&B's row for this step is still open (or to come)
            run.log(row, step=step)
        else:  # W&B has passed this step: its current row, at lawwatch/step = step
            run.log(row)

    def close(self) -> None:
        """Nothing to release: ``accelerator.end_training()`` finishes the trackers."""


class TrackerAlerts:
    """Raises lawwatch alerts in the accelerator's trackers that have alerts (W&B, trackio).

    The trackers are looked up at each alert, so ``init_trackers`` may come after the watch.

    Args:
        accelerator: The ``accelerate.Accelerator`` of the training run.
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def alert(self, alert: Alert) -> None:
        """Pass the alert to each W&B and trackio tracker."""
        for tracker in getattr(self.accelerator, "trackers", None) or []:
            if tracker.name == "wandb":
                wandb_alert(tracker.tracker, alert)
            elif tracker.name == "trackio":
                from lawwatch.output.trackers import trackio_alert

                trackio_alert(tracker.tracker, alert)


class AcceleratorWatch(LawWatch):
    """:class:`~lawwatch.LawWatch` for an accelerate loop: its layout, trackers and files.

    Args:
        accelerator: The run's ``accelerate.Accelerator``: process layout, and the trackers
            every snapshot is logged to (main process).
        model: The model as ``accelerator.prepare`` returned it.
        probe: The full probe set; each process measures its shard.
        config: The measurement options (see :class:`~lawwatch.config.MeasureConfig`).
        watch: When to measure and at what cost (see
            :class:`~lawwatch.watch.config.WatchConfig`); with ``background``, call
            :meth:`~lawwatch.LawWatch.close` on every process before
            ``accelerator.end_training()``, so the last records reach the trackers.
        directory: Where the main process keeps ``history.jsonl`` and ``pr.safetensors``
            (:class:`~lawwatch.output.sinks.LocalHistory`: one series, one writer); None for none.
        sinks: More sinks (main process only).
        alerts: ``True`` (or an :class:`~lawwatch.alerts.Alerts`) raises an alert when the law
            emerges, breaks, or a layer's PR stops falling: a WARNING on the ``"lawwatch"``
            logger and an alert in the W&B and trackio trackers (main process).
        unwrap: As in :class:`~lawwatch.LawWatch`.
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` or of
            :class:`~lawwatch.watch.config.WatchConfig` overriding ``config``'s or ``watch``'s.
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        probe: ProbeSet,
        config: MeasureConfig | None = None,
        watch: WatchConfig | None = None,
        *,
        directory: str | Path | None = None,
        sinks: list[Sink] | None = None,
        alerts: bool | Alerts = False,
        unwrap: Callable[[nn.Module], nn.Module] | None = None,
        **options: Any,
    ) -> None:
        wanted = Alerts.of(alerts)  # checked on every process, before anything opens
        super().__init__(
            model, probe, config, watch, accelerator=accelerator, unwrap=unwrap, **options
        )
        # opened once the options are known good; records of another series are set aside
        chosen: list[Sink] = []
        if accelerator.is_main_process:
            if directory is not None:
                chosen.append(LocalHistory(directory, series=self.series()))
            chosen += [TrackerSink(accelerator), *(sinks or [])]
            if wanted is not None:
                targets = [TrackerAlerts(accelerator)] + [
                    s for s in sinks or [] if isinstance(s, Alerting)
                ]
                chosen.append(
                    AlertSink(wanted, threshold=self.watch.emergence_threshold, targets=targets)
                )
        self.sinks = Sinks(chosen)
