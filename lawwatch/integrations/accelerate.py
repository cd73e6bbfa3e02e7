"""🤗 Accelerate custom loops: the monitor wired to the accelerator's trackers and local files.

A custom training loop needs three lines::

    watch = AcceleratorWatch(accelerator, model, probe, every=500, directory="run/lawwatch")
    accelerator.register_for_checkpointing(watch)  # the history survives save_state/load_state
    ...
    watch.maybe_snapshot(step)  # on every process, after each optimizer step

Every snapshot goes, on the main process, to the accelerator's trackers through
:class:`AcceleratorTrackers` (once ``accelerator.init_trackers`` has been called: the tracker
classes of :mod:`lawwatch.output.trackers`, at the training step) and, with ``directory``, to a
:class:`~lawwatch.output.store.LocalHistory` there, besides any sinks given.
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
from lawwatch.output.console import ConsoleSink
from lawwatch.output.sinks import Sink, Sinks, scalars
from lawwatch.output.store import LocalHistory
from lawwatch.output.trackers import accelerate_tracker
from lawwatch.probe import ProbeSet
from lawwatch.watch.config import WatchConfig
from lawwatch.watch.monitor import LawWatch

log = logging.getLogger("lawwatch")


class AcceleratorTrackers:
    """The accelerator's trackers as lawwatch sinks (main process only), at the training step.

    Each tracker gets the sink of :mod:`lawwatch.output.trackers` made on its object
    (``accelerator.get_tracker(name, unwrap=True)``: the classes the Trainer callback uses, see
    :func:`~lawwatch.output.trackers.accelerate_tracker`); a tracker lawwatch has no class for
    gets :func:`~lawwatch.output.sinks.scalars` through its own ``log(values, step=step)``.
    Trackers are looked up at each snapshot and alert, so ``init_trackers`` may come after the
    watch; until then this does nothing. A tracker that fails is reported, the others still
    get the snapshot.

    Args:
        accelerator: The ``accelerate.Accelerator`` of the training run.
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.sinks: dict[str, Sink | None] = {}  # tracker name -> its sink (None: its own log)

    def _trackers(self) -> list[Any]:
        trackers = list(getattr(self.accelerator, "trackers", None) or [])
        for tracker in trackers:
            if tracker.name not in self.sinks:
                try:
                    unwrapped = self.accelerator.get_tracker(tracker.name, unwrap=True)
                    self.sinks[tracker.name] = accelerate_tracker(tracker.name, unwrapped)
                except Exception:
                    log.exception("lawwatch: not logging to %s", tracker.name)
                    self.sinks[tracker.name] = None
        return trackers

    def write(self, snapshot: Snapshot) -> None:
        """Log the snapshot to every tracker at its training step."""
        for tracker in self._trackers():
            try:
                sink = self.sinks[tracker.name]
                if sink is not None:
                    sink.write(snapshot)
                else:
                    tracker.log(scalars(snapshot), step=snapshot.step)
            except Exception:
                log.exception("lawwatch: tracker %s failed at step %s", tracker.name, snapshot.step)

    def alert(self, alert: Alert) -> None:
        """Pass the alert to each tracker that has alerts (W&B, trackio)."""
        self._trackers()
        for sink in self.sinks.values():
            if isinstance(sink, Alerting):
                sink.alert(alert)

    def close(self) -> None:
        """Nothing to release: ``accelerator.end_training()`` finishes the trackers."""


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
            (:class:`~lawwatch.output.store.LocalHistory`: one series, one writer); None for none.
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
        extra = Sinks(sinks).sinks
        super().__init__(
            model, probe, config, watch, accelerator=accelerator, unwrap=unwrap, **options
        )
        # opened once the options are known good; records of another series are set aside
        chosen: list[Sink] = []
        if accelerator.is_main_process:
            if directory is not None:
                chosen.append(LocalHistory(directory, series=self.series()))
            trackers = AcceleratorTrackers(accelerator)
            chosen += [trackers, *extra]
            if self.watch.console:
                chosen.append(ConsoleSink())
            if wanted is not None:
                targets = [trackers] + [s for s in extra if isinstance(s, Alerting)]
                chosen.append(
                    AlertSink(wanted, threshold=self.watch.emergence_threshold, targets=targets)
                )
        self.sinks = Sinks(chosen)
