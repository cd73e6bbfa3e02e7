"""🤗 Accelerate custom loops: the monitor wired to the accelerator's trackers and local files.

A custom training loop needs three lines::

    watch = AcceleratorWatch(accelerator, model, probe, every=500, directory="run/lawwatch")
    accelerator.register_for_checkpointing(watch)  # the history survives save_state/load_state
    ...
    watch.maybe_snapshot(step)  # on every process, after each optimizer step

Every snapshot goes, on the main process, to the accelerator's trackers through
:class:`~lawwatch.output.trackers.AcceleratorTrackers` (once ``accelerator.init_trackers`` has
been called: the tracker classes of :mod:`lawwatch.output.trackers`, at the training step) and,
with ``directory``, to a :class:`~lawwatch.output.store.LocalHistory` there, besides any sinks
given. ``alerts=True`` adds :class:`~lawwatch.alerts.AlertSink` (W&B and trackio trackers get
the alerts). Where records go is :mod:`lawwatch.output.run`'s; this adapter only says which.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lawwatch.alerts import Alerts
from lawwatch.config import MeasureConfig
from lawwatch.output.run import Outputs
from lawwatch.output.sinks import Sink
from lawwatch.output.trackers import AcceleratorTrackers
from lawwatch.probe import ProbeSet
from lawwatch.watch.config import WatchConfig
from lawwatch.watch.monitor import LawWatch

__all__ = ["AcceleratorTrackers", "AcceleratorWatch"]


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
            (:class:`~lawwatch.output.store.LocalHistory`: one series, one writer) and, at
            :meth:`~lawwatch.LawWatch.close`, ``law.png``; None for none.
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
        # checked on every process, before anything opens
        outputs = Outputs(directory, accelerator=accelerator, sinks=sinks, alerts=Alerts.of(alerts))
        super().__init__(
            model,
            probe,
            config,
            watch,
            accelerator=accelerator,
            unwrap=unwrap,
            outputs=outputs,
            **options,
        )
