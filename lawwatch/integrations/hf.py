"""LawWatchCallback: the law of equi-learning, measured live inside a Hugging Face ``Trainer``.

A thin adapter: it says *when* to measure and passes *where* records go to
:class:`~lawwatch.LawWatch` (see :mod:`lawwatch.output.run`). Nothing here may stop training:
a failure is logged to the ``"lawwatch"`` logger and training goes on.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lawwatch.alerts import Alerts
from lawwatch.config import MeasureConfig
from lawwatch.integrations.framework import (
    checked_probe,
    monitor_attribute,
    never_raises,
    refused,
)
from lawwatch.measurement import check_options
from lawwatch.output.layout import run_directory
from lawwatch.output.run import Outputs
from lawwatch.output.sinks import Sink
from lawwatch.output.trackers import TrainerRun, reported_trackers
from lawwatch.probe import ProbeSet
from lawwatch.watch.config import WatchConfig, build_configs
from lawwatch.watch.monitor import LawWatch


class LawWatchCallback(TrainerCallback):
    """Measure the law of equi-learning while a ``transformers.Trainer`` trains.

    ``Trainer(..., callbacks=[LawWatchCallback(probe, every=100)])``. Every process measures its
    shard of the probe: step 0 before any update, the schedule after each step, and the final
    step (``max_steps`` in its own ``on_step_end``, while the trackers' runs are open; after an
    early stop, at ``on_train_end``). With ``background``, pending results are recorded before
    each checkpoint is written. The main process writes ``<output_dir>/lawwatch/`` (history,
    PR matrix, ``law.png`` at the end) and every ``report_to`` tracker lawwatch logs to, in its
    current run (one that cannot be opened is reported; the others run).

    On resume the local history is the record: records after the checkpoint are redone, a
    fresh tracker run gets the history up to it, a reattached W&B or MLflow run no step twice,
    and old alerts are not raised again. A run from step 0 replaces the history left in the
    directory; another series moves to ``series-<n>/``. Two callbacks never share a directory:
    the second one's local history is refused (logged); give each its own ``directory=``.

    Args:
        probe: The held-out probe set.
        config: The measurement options (:class:`~lawwatch.config.MeasureConfig`).
        watch: When to measure and at what cost (:class:`~lawwatch.watch.config.WatchConfig`;
            ``last_step`` defaults to the Trainer's ``max_steps``).
        directory: Where the local files go. Default: ``<args.output_dir>/lawwatch``.
        sinks: More sinks for every snapshot (main process only), e.g. a live display.
        dvclive_live: The ``dvclive.Live`` given to the Trainer's ``DVCLiveCallback``, to log
            into with ``report_to`` dvclive; default: lawwatch's own in ``./dvclive``.
        alerts: ``True`` (or an :class:`~lawwatch.alerts.Alerts`) raises an alert when the law
            emerges, breaks after emerging, or a layer's PR stops falling. Off by default.
        **options: Fields of either config overriding ``config``'s or ``watch``'s.

    Raises:
        TypeError: An unknown option, a probe not a :class:`~lawwatch.ProbeSet`, ``sinks``
            not sinks, or ``alerts`` neither a bool nor an ``Alerts``.
        ValueError: An invalid option value, an empty probe, targets of a single value, or a
            ``stats_device`` this process lacks. What needs the model (the lens's head, the
            blocks, the probe against the model) is checked at train begin: a refusal there is
            one ERROR line with its reason, and training goes on unmeasured.

    Attributes:
        monitor: The :class:`~lawwatch.LawWatch` of the current ``train()`` call.
    """

    def __init__(
        self,
        probe: ProbeSet,
        config: MeasureConfig | None = None,
        watch: WatchConfig | None = None,
        *,
        directory: str | Path | None = None,
        sinks: list[Sink] | None = None,
        dvclive_live: Any = None,
        alerts: bool | Alerts = False,
        **options: Any,
    ) -> None:
        # bad settings fail here, where the user builds the callback, not mid-training
        self.probe, self.dvclive_live = checked_probe(probe), dvclive_live
        self.config, self.watch = build_configs(config, watch, **options)
        check_options(self.probe, self.config)  # what needs no model; the rest at train begin
        self.outputs = Outputs(directory, sinks=sinks, alerts=Alerts.of(alerts), strict=False)
        self._built = time.time()  # event files written since are of this callback's trainings
        self.monitor: LawWatch | None = None

    trackers = monitor_attribute("trackers", "``report_to`` name -> its sink (main process).")
    directory = monitor_attribute("directory", "Where the local files are (from train begin).")
    report_path = monitor_attribute("report_path", "The PNG written at train end, if any.")
    emergence_step = monitor_attribute(
        "emergence_step", "First step from which r stays at or below the threshold."
    )

    @never_raises
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Open the outputs (main process), restore a resumed history, measure step 0."""
        if self.monitor is not None:  # a train() that ended without on_train_end: its files
            self.monitor.outputs.close(report=False)
        self.monitor, start = None, state.global_step
        watch = self.watch
        if watch.last_step is None:  # the Trainer knows the final step
            watch = watch.replace(last_step=state.max_steps or None)
        run = TrainerRun(args, since=self._built, dvclive_live=self.dvclive_live)
        outputs = replace(
            self.outputs,
            directory=self.outputs.directory or run_directory(args.output_dir),
            trackers=reported_trackers(args.report_to),
            run=run,
            resume_step=start if start > 0 else None,
        )
        with refused("this training is not measured"):  # the reason, in one line
            self.monitor = LawWatch(
                kwargs["model"], self.probe, self.config, watch, outputs=outputs
            )
        if self.monitor is None:
            return
        if start > 0:  # the budget's decision, as the checkpoint's Trainer state kept it
            self.monitor.load_schedule(_kept(state).get("schedule"))
        self.monitor.measure_at(0)

    @never_raises
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Measure when the schedule says so (on every process); the last step is the final one."""
        if self.monitor is None:
            return
        # a checkpoint is written after this step: measured if scheduled, whatever the budget
        self.monitor.maybe_snapshot(state.global_step, checkpoint=bool(control.should_save))
        plan = self.monitor.schedule_state()
        if plan is not None:  # in the Trainer state of every checkpoint written from now on
            _kept(state)["schedule"] = plan
        self._before_checkpoint(control)
        if 0 < state.max_steps <= state.global_step or control.should_training_stop:
            self._finish(state)

    @never_raises
    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """An epoch's checkpoint comes next: its step measured if scheduled, records first."""
        if self.monitor is not None and control.should_save:  # decided at the epoch's end
            self.monitor.maybe_snapshot(state.global_step, checkpoint=True)
        self._before_checkpoint(control)

    @never_raises
    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """``save_strategy="best"`` decides to save after evaluating: the records first."""
        strategy = getattr(args, "save_strategy", None)
        if getattr(strategy, "value", strategy) == "best":
            self._before_checkpoint(control, always=True)

    @never_raises
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The final snapshot and the report if not yet done (an early stop); close the sinks."""
        if self.monitor is None:
            return
        try:
            self._finish(state)
        finally:
            self.monitor.close()

    def _before_checkpoint(self, control: Any, *, always: bool = False) -> None:
        """Pending records first: the Trainer writes the checkpoint after this callback runs."""
        if self.monitor is not None and (always or control.should_save):
            self.monitor.flush()

    def _finish(self, state: Any) -> None:
        """Measure the final step if not yet done; the PNG and the report to the trackers."""
        if self.monitor is not None:
            self.monitor.finish(state.global_step)


_STATE_KEY = "lawwatch"
"""The key of what the callback keeps in ``TrainerState.stateful_callbacks`` (no class's name,
so ``restore_callback_states_from_checkpoint`` never rebuilds a callback from it)."""


def _kept(state: Any) -> dict[str, Any]:
    """What the callback keeps in the Trainer state.

    Saved in each checkpoint's ``trainer_state.json``, loaded on every process on resume.
    """
    kept = getattr(state, "stateful_callbacks", None)
    if not isinstance(kept, dict):
        return {}
    value = kept.setdefault(_STATE_KEY, {})
    return value if isinstance(value, dict) else {}
