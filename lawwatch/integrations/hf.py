"""LawWatchCallback: the law of equi-learning, measured live inside a Hugging Face ``Trainer``.

A thin adapter around :class:`lawwatch.watch.monitor.LawWatch`: it decides *when* (step 0 before
any update, the schedule after each optimizer step, the final step) and *where* results go (local
history always; every tracker in ``report_to`` that lawwatch logs to, see
:mod:`lawwatch.output.trackers`; a PNG of the law after the final snapshot; alerts when asked
for). Every process measures (the probe is sharded and the statistics reduced); only the main
process writes. Nothing here may stop training: a failure is logged to the ``"lawwatch"`` logger
and training goes on.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lawwatch.alerts import Alerting, Alerts, AlertSink
from lawwatch.config import MeasureConfig
from lawwatch.output.console import ConsoleSink
from lawwatch.output.finish import finish_run
from lawwatch.output.layout import run_directory
from lawwatch.output.sinks import Sink, Sinks
from lawwatch.output.store import LocalHistory
from lawwatch.output.trackers import (
    TRACKERS,
    TrainerRun,
    open_tracker,
    reported_trackers,
)
from lawwatch.probe import ProbeSet
from lawwatch.watch.config import WatchConfig, build_configs
from lawwatch.watch.monitor import LawWatch

log = logging.getLogger("lawwatch")


def _never_raises(event: Callable[..., None]) -> Callable[..., None]:
    """Report any exception of a callback event instead of raising it into the Trainer."""

    @functools.wraps(event)
    def guarded(self: LawWatchCallback, *args: Any, **kwargs: Any) -> None:
        try:
            event(self, *args, **kwargs)
        except Exception:
            log.exception("lawwatch: %s failed; training goes on", event.__name__)

    return guarded


class LawWatchCallback(TrainerCallback):
    """Measure the law of equi-learning while a ``transformers.Trainer`` trains.

    ``trainer = Trainer(..., callbacks=[LawWatchCallback(probe, every=100)])``. Snapshots: step 0
    (in ``on_train_begin``, before any update), the schedule (``on_step_end``, on every process:
    each measures its shard of the probe), and the final step: ``state.max_steps`` in its own
    ``on_step_end``, while every tracker's run is still open (the Trainer's callbacks end their
    runs in ``on_train_end``), or, when training stops early, ``state.global_step`` at
    ``on_train_end``. Step 0 and the final step are measured whatever the schedule and the
    overhead budget say. With ``background``, pending results are recorded at each checkpoint
    save (``on_save``) and at the final step, before the report; the worker is joined at train
    end.

    Written by the main process:

    - ``<output_dir>/lawwatch/history.jsonl`` and ``pr.safetensors`` (see
      :class:`lawwatch.output.store.LocalHistory`), and ``law.png`` after the final snapshot
      (:func:`lawwatch.output.finish.finish_run`, when matplotlib is installed);
    - for each tracker in ``args.report_to`` (``"all"`` included): the same keys
      (:func:`lawwatch.output.sinks.scalars`) at the training step: W&B, MLflow (and DagsHub),
      trackio, Comet and ClearML in their current run (the one the Trainer's own callback uses);
      TensorBoard through lawwatch's own writer in the Trainer's directory; DVCLive through
      ``dvclive_live`` or lawwatch's own Live (:mod:`lawwatch.output.trackers`). A tracker
      that cannot be opened is reported and the others still run. After the final snapshot the
      PNG (and, where the tracker keeps files, the history files) go to each of them;
    - with ``alerts``: each alert once, as a WARNING on the ``"lawwatch"`` logger and in the
      trackers that have alerts (W&B ``run.alert``, trackio), see :mod:`lawwatch.alerts`.

    Resume (``trainer.train(resume_from_checkpoint=...)``): the local history is the record.
    Records after the checkpoint's step are dropped (they are measured again), each tracker's
    fresh run is given the history up to the checkpoint, and a resumed W&B or MLflow run is not
    sent a step twice; alerts of the restored history are not raised again.
    A run started from step 0 replaces any history left in the directory.
    A history measured with another probe, other options or at another precision is not
    continued: it is moved to ``<directory>/series-<n>/`` and a new series starts (with a
    warning). Two callbacks never share a directory: the second one's local history is refused
    (logged), so give each its own ``directory=``.

    Args:
        probe: The held-out probe set.
        config: The measurement options (default: the paper's protocol), see
            :class:`~lawwatch.config.MeasureConfig`.
        watch: When to measure and at what cost, see
            :class:`~lawwatch.watch.config.WatchConfig` (``last_step`` defaults to the
            Trainer's ``max_steps``).
        directory: Where the local files go. Default: ``<args.output_dir>/lawwatch``.
        sinks: More sinks for every snapshot (main process only), e.g. a live display.
        dvclive_live: The ``dvclive.Live`` the Trainer's ``DVCLiveCallback`` was given, to log
            into with ``report_to`` dvclive; default: lawwatch opens its own in ``./dvclive``.
        alerts: ``True`` (or an :class:`~lawwatch.alerts.Alerts` with its tolerances) raises
            an alert when the law emerges, when it breaks after emerging, and when a layer's PR
            stops falling. Off by default.
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` or of
            :class:`~lawwatch.watch.config.WatchConfig` overriding ``config``'s or ``watch``'s
            (``batch_size``, ``layers``, ``every``, ``background``, …).

    Raises:
        TypeError: An option that is a field of neither config, a probe that is not a
            :class:`~lawwatch.ProbeSet`, or ``alerts`` neither a bool nor an ``Alerts``.
        ValueError: An invalid option value, or an empty probe.

    Attributes:
        config: The measurement options.
        watch: The monitor's settings.
        monitor: The :class:`lawwatch.watch.monitor.LawWatch` of the current ``train()`` call.
        directory: Where the local files are (set at train begin on the main process).
        report_path: The PNG written at train end, if any.
        trackers: ``report_to`` name -> its sink, for the trackers logged to.
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
        if not isinstance(probe, ProbeSet):
            raise TypeError(
                f"probe must be a lawwatch.ProbeSet, got {type(probe).__name__}; build one with "
                "ProbeSet.from_texts(...) or ProbeSet.from_tokens(...)."
            )
        if len(probe) == 0 or probe.num_examples() == 0:
            raise ValueError("The probe set has no (token, next token) pair to measure.")
        self.config, self.watch = build_configs(config, watch, **options)
        self.probe = probe
        self.alerts = Alerts.of(alerts)
        self.extra_sinks = Sinks(sinks).sinks  # refused now if not sinks
        self.dvclive_live = dvclive_live
        self._built = time.time()  # event files written since are of this callback's trainings
        self._directory = None if directory is None else Path(directory)
        self.monitor: LawWatch | None = None
        self.directory: Path | None = None
        self.local: LocalHistory | None = None
        self.trackers: dict[str, Sink] = {}
        self.report_path: Path | None = None
        self._finished = False

    @property
    def emergence_step(self) -> int | None:
        """First step from which r stays at or below the threshold (main process)."""
        return None if self.monitor is None else self.monitor.emergence_step

    # -- Trainer events -----------------------------------------------------------------------

    @_never_raises
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Open the sinks (main process), restore a resumed history, measure step 0.

        Settings that cannot work with this model (see
        :func:`lawwatch.measurement.check_settings`) are refused here, once: the error is
        logged and the run trains unmonitored (a monitor never stops training).
        """
        if self.local is not None:  # a previous train() that ended without on_train_end
            self.local.close()
        self.monitor, self.local, self.report_path = None, None, None
        self.trackers, self._finished = {}, False
        start = state.global_step  # > 0 when resuming from a checkpoint
        watch = self.watch
        if watch.last_step is None:  # the Trainer knows the final step
            watch = watch.replace(last_step=state.max_steps or None)
        self.monitor = LawWatch(kwargs["model"], self.probe, self.config, watch)
        # a sink that fails to open costs that sink only: every process must still take part
        # in every snapshot, or the others would wait for it forever
        sinks = self._open_sinks(args, start) if state.is_world_process_zero else []
        self.monitor.sinks = Sinks(sinks)
        records = self.local.records if self.local is not None else []
        # the same last step on every process (only the main one has the records), so every
        # process agrees on the schedule and enters each snapshot's collectives together
        if start > 0:
            self.monitor.load_state_dict(
                {"history": records, "last_step": start}, resume_step=start
            )
        else:
            self._measure(0)

    @_never_raises
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Measure when the schedule says so (on every process); the last step is the final one."""
        if self.monitor is None:
            return
        self.monitor.maybe_snapshot(state.global_step)
        self._before_checkpoint(control)
        if 0 < state.max_steps <= state.global_step or control.should_training_stop:
            self._finish(state)

    @_never_raises
    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """An epoch's checkpoint comes next: its records first."""
        self._before_checkpoint(control)

    @_never_raises
    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """``save_strategy="best"`` decides to save after evaluating: the records first."""
        strategy = getattr(args, "save_strategy", None)
        if getattr(strategy, "value", strategy) == "best":
            self._before_checkpoint(control, always=True)

    @_never_raises
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The final snapshot and the report if not yet done (an early stop); close the sinks."""
        if self.monitor is None:
            return
        try:
            self._finish(state)
        finally:
            self.monitor.close()

    # -- helpers ------------------------------------------------------------------------------

    def _before_checkpoint(self, control: Any, *, always: bool = False) -> None:
        """Record the pending background results before the Trainer writes a checkpoint.

        The Trainer decides ``should_save`` before this callback runs and writes the checkpoint
        after it, so a checkpoint never claims a step whose record is not on disk yet (a kill
        right after the write loses nothing). On every process: with several, it gathers.
        """
        if self.monitor is not None and (always or control.should_save):
            self.monitor.flush()

    def _finish(self, state: Any) -> None:
        """Measure the final step if not yet done; write the PNG; report to the trackers."""
        if self.monitor is None or self._finished:
            return
        self._finished = True
        self._measure(state.global_step)
        self.monitor.flush()  # the background results, before the report
        if state.is_world_process_zero and self.local is not None and self.local.records:
            self.report_path = finish_run(
                self.directory,
                self.local.records,
                self.trackers,
                emergence_threshold=self.watch.emergence_threshold,
            )

    def _measure(self, step: int) -> None:
        """Measure ``step`` unless already attempted (on or off the schedule)."""
        last = self.monitor.last_step
        if last is None or step > last:
            self.monitor.snapshot(step)

    def _open_sinks(self, args: Any, start: int) -> list[Sink]:
        """The main process's sinks; one that fails to open is reported and left out."""
        sinks: list[Sink] = []
        try:
            self.directory = self._directory or run_directory(args.output_dir)
            # records of another probe, options or precision are set aside: a new series
            self.local = LocalHistory(self.directory, series=self._series(), probe=self.probe)
            if start == 0 and self.local.records:
                log.warning(
                    "lawwatch: training starts from step 0; replacing the %d records in %s",
                    len(self.local.records),
                    self.local.directory,
                )
            self.local.drop_after(start if start > 0 else -1)  # what follows is redone
            sinks.append(self.local)
        except Exception:
            log.exception("lawwatch: no local history (%s)", self.directory)
            self.local = None
        records = self.local.records if self.local else []
        self.trackers = self._open_trackers(args, records)
        sinks += [*self.trackers.values(), *self.extra_sinks]
        if self.watch.console:
            sinks.append(ConsoleSink())
        if self.alerts is not None:
            targets = [s for s in sinks if isinstance(s, Alerting)]
            sinks.append(
                AlertSink(
                    self.alerts,
                    threshold=self.watch.emergence_threshold,
                    targets=targets,
                    history=records,
                )
            )
        return sinks

    def _series(self) -> dict[str, Any] | None:
        """What this run's records will say they were measured with (None: not known yet)."""
        try:
            return self.monitor.series()
        except Exception:
            return None

    def _open_trackers(self, args: Any, records: list[dict[str, Any]]) -> dict[str, Sink]:
        """A sink for each ``report_to`` tracker lawwatch logs to."""
        run = TrainerRun(args, since=self._built, dvclive_live=self.dvclive_live)
        opened: dict[str, Sink] = {}
        for name in reported_trackers(args.report_to):
            if TRACKERS.get(name) in {TRACKERS.get(n) for n in opened}:
                continue  # "mlflow" and "dagshub" share MLflow's run
            try:
                sink = open_tracker(
                    name,
                    run,
                    history=records,
                    emergence_threshold=self.watch.emergence_threshold,
                )
            except LookupError as error:
                log.warning("lawwatch: %s; not logging to %s", error, name)
                continue
            except Exception:
                log.exception("lawwatch: not logging to %s", name)
                continue
            if sink is None:
                log.debug("lawwatch: %s has no lawwatch sink; not logging to it", name)
                continue
            opened[name] = sink
        return opened
