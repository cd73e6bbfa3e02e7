"""The one door of a run's outputs: where every record of a monitor goes, opened and closed here.

A training framework's adapter describes where records go (:class:`Outputs`: a directory, the
trackers and what they attach to, more sinks, alerts, the step a resumed run continues from);
:class:`RunOutputs` opens them on the main process, in this order::

    LocalHistory (directory) → trackers (by name, or given) → the accelerator's trackers
        → the sinks given → ConsoleSink (WatchConfig.console) → AlertSink (alerts)

and the monitor (:class:`~lawwatch.LawWatch`, which owns it) writes each record through it. It
keeps a resumed run one history (sinks rewound, fresh trackers given the restored records,
old alerts not raised again), replaces what an earlier run left when the run loaded no state
(one warning), and at the end writes ``law.png`` and hands the report to the trackers
(:func:`~lawwatch.output.finish.finish_run`), once, before closing every sink.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lawwatch.alerts import Alerting, Alerts, AlertSink
from lawwatch.history import History, Snapshot
from lawwatch.output.console import ConsoleSink
from lawwatch.output.finish import finish_run
from lawwatch.output.sinks import Rewindable, Sink, Sinks
from lawwatch.output.store import HistoryBusy, LocalHistory
from lawwatch.output.trackers import AcceleratorTrackers, Tracker, TrainerRun, open_trackers
from lawwatch.probe import ProbeSet

log = logging.getLogger("lawwatch")


@dataclass
class Outputs:
    """Where a monitor's records go: what an adapter passes to :class:`~lawwatch.LawWatch`.

    Attributes:
        directory: Where the main process keeps ``history.jsonl``, ``pr.safetensors`` and, at
            the end, ``law.png`` (a :class:`~lawwatch.output.store.LocalHistory`). None: no files.
        trackers: Tracker names (opened on their current run, :meth:`Tracker.current`) and
            tracker sinks (kept as given).
        run: What named trackers attach from (a Trainer's arguments, its ``dvclive.Live``);
            None: a loop without a Trainer (TensorBoard writes in ``<directory>/tensorboard``).
        accelerator: An ``accelerate.Accelerator`` whose trackers get every record
            (:class:`~lawwatch.output.trackers.AcceleratorTrackers`, looked up lazily).
        sinks: More sinks, after the trackers.
        alerts: Raise alerts (:class:`~lawwatch.alerts.AlertSink`) into the log and the sinks
            that take alerts; None for none.
        resume_step: The step a resumed run continues from, its records kept in ``directory``
            (the Trainer's checkpoint): the monitor restores them and every record after it is
            redone. None: the monitor's state is loaded, or the run starts anew.
        strict: Raise when the directory or a tracker cannot be opened (a monitor the user
            builds); otherwise the failure is logged and costs only that output (inside a
            framework's training, where every process must still take part in every snapshot).
    """

    directory: str | Path | None = None
    trackers: Sequence[str | Sink] = ()
    run: TrainerRun | None = None
    accelerator: Any = None
    sinks: Sequence[Sink] | Sinks | None = ()
    alerts: Alerts | None = None
    resume_step: int | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        """Refuse sinks that are not sinks now, where the adapter is built (kept as a list).

        Raises:
            TypeError: ``sinks`` not a list of sinks, or ``alerts`` not an ``Alerts``.
        """
        given = self.sinks
        self.sinks = list(given.sinks) if isinstance(given, Sinks) else Sinks(given).sinks
        if self.alerts is not None and not isinstance(self.alerts, Alerts):
            raise TypeError(f"alerts must be a lawwatch.Alerts, got {type(self.alerts).__name__}.")


class RunOutputs:
    """A run's outputs, opened from an :class:`Outputs` on the main process, then closed.

    Elsewhere (``main`` false) it holds no sink and writes nothing.

    Args:
        spec: Where records go.
        main: Whether this is the process that writes.
        identity: What the records will say they were measured with (probe, options and,
            when the model can say it yet, precision): records of another series already in
            the directory are set aside.
        probe: The probe, kept with the history.
        console: Whether to print one line per record (:class:`ConsoleSink`).
        emergence_threshold: r at or below which the law counts as emerged (alerts, W&B's
            summary, the figure).
        step_key: The training step's key in the trackers' rows (``WatchConfig.step_key``).

    Attributes:
        local: The :class:`~lawwatch.output.store.LocalHistory`, or None.
        trackers: Name -> tracker sink (by name, or given).
        sinks: Every sink, in the order above.
        report_path: The ``law.png`` :meth:`finish` wrote, or None.
    """

    def __init__(
        self,
        spec: Outputs,
        *,
        main: bool,
        identity: dict[str, Any],
        probe: ProbeSet,
        console: bool,
        emergence_threshold: float,
        step_key: str | None = None,
    ) -> None:
        self.spec, self.threshold, self.step_key = spec, emergence_threshold, step_key
        self.local: LocalHistory | None = None
        self.trackers: dict[str, Sink] = {}
        self.sinks = Sinks()
        self.report_path: Path | None = None
        self._alerts: AlertSink | None = None
        self._fresh = True  # nothing restored: the first record replaces what sinks hold
        self._finished = self._closed = False
        self.main = main
        if main:
            self._open(identity, probe, console)

    def _open(self, identity: dict[str, Any], probe: ProbeSet, console: bool) -> None:
        spec = self.spec
        directory = None if spec.directory is None else Path(spec.directory)
        if directory is not None:
            try:
                self.local = LocalHistory(directory, series=identity, probe=probe)
            except HistoryBusy as busy:  # another process writes there: this run writes none
                log.error("lawwatch: %s", busy)
            except Exception:
                if spec.strict:
                    raise
                log.exception("lawwatch: no local history (%s)", directory)
        run = spec.run or TrainerRun(
            logging_dir=None if directory is None else directory / "tensorboard"
        )
        run = replace(run, emergence_threshold=self.threshold, step_key=self.step_key)
        try:
            self.trackers = open_trackers(spec.trackers, run, strict=spec.strict)
        except BaseException:
            if self.local is not None:
                self.local.close()  # the directory is free for the monitor built after the fix
            raise
        sinks = [*([self.local] if self.local is not None else []), *self.trackers.values()]
        if spec.accelerator is not None:
            sinks.append(AcceleratorTrackers(spec.accelerator, run))
        sinks += spec.sinks
        if console:
            sinks.append(ConsoleSink())
        if spec.alerts is not None:
            targets = [sink for sink in sinks if isinstance(sink, Alerting)]
            self._alerts = AlertSink(spec.alerts, threshold=self.threshold, targets=targets)
            sinks.append(self._alerts)
        self.sinks = Sinks(sinks)

    @property
    def restored(self) -> list[dict[str, Any]]:
        """The records the directory holds up to :attr:`Outputs.resume_step` (main process)."""
        step = self.spec.resume_step
        if self.local is None or step is None:
            return []
        return [record for record in self.local.records if record["step"] <= step]

    # -- a resumed run, a new one -------------------------------------------------------------

    def resume(self, history: History, last: int) -> None:
        """The run continues ``history`` from step ``last``: one history in every output.

        :class:`~lawwatch.output.sinks.Rewindable` sinks forget what followed ``last``, a local
        history and tracker sinks that hold nothing yet (a new directory, a fresh tracker run)
        are given the restored records, and
        the alerts those records raised are not raised again.
        """
        self._fresh = False
        self.sinks.drop_after(last)
        if self.local is not None and not self.local.records and history.records:
            # a directory new to this run (a Lightning logger's next version): the whole history
            self.local.replace(history.records)
        for name, sink in self.trackers.items():
            if isinstance(sink, Tracker) and not sink.records:
                try:
                    sink.replay(history.records)
                except Exception:
                    log.exception("lawwatch: the restored history did not reach %s", name)
        if self._alerts is not None:  # raised by the run that measured them
            primed = AlertSink(
                self._alerts.alerts,
                threshold=self._alerts.threshold,
                targets=self._alerts.targets,
                history=history.records,
            )
            self.sinks.sinks[self.sinks.sinks.index(self._alerts)] = self._alerts = primed

    def announce(self, text: str) -> None:
        """Say ``text`` once for the run, on the main process (nothing elsewhere).

        Printed by the console, cleanly around a progress bar; without the console, a WARNING
        on the ``"lawwatch"`` logger.
        """
        if not self.main:
            return
        consoles = [sink for sink in self.sinks.sinks if isinstance(sink, ConsoleSink)]
        if consoles:
            consoles[0].say(text)
        else:
            log.warning("%s", text)

    def write(self, snapshot: Snapshot, *, threads: bool | None = None) -> None:
        """Write one record to the sinks (``threads``: see :meth:`Sinks.write`).

        The first record of a run that restored nothing replaces what the rewindable sinks hold
        (an earlier run's records in the same directory, never continued by this one).
        """
        if self._fresh:
            self._replace_earlier_run()
        self.sinks.write(snapshot, threads=threads)

    def _replace_earlier_run(self) -> None:
        self._fresh = False
        for sink in self.sinks.sinks:
            held = getattr(sink, "records", None)
            if isinstance(sink, Rewindable) and held:
                log.warning(
                    "lawwatch: this monitor loaded no state, so it starts a new history; "
                    "replacing the %d records (steps %s to %s) in %s. To continue them, load "
                    "the run's state first (load_state_dict, accelerator.load_state, "
                    "resume_from_checkpoint).",
                    len(held),
                    held[0]["step"],
                    held[-1]["step"],
                    getattr(sink, "directory", type(sink).__name__),
                )
        self.sinks.drop_after(-1)

    # -- the end ------------------------------------------------------------------------------

    def finish(self) -> Path | None:
        """``law.png`` and the report to the trackers (main process, with records), once."""
        if self._finished:
            return self.report_path
        self._finished = True
        local = self.local
        if local is None or local.closed or not local.records:
            return None
        try:
            self.report_path = finish_run(
                local.directory, local.records, self.trackers, emergence_threshold=self.threshold
            )
        except Exception:  # the end-of-run picture never stops the run
            log.exception("lawwatch: no plot of the law in %s", local.directory)
        return self.report_path

    def close(self, *, report: bool = True) -> None:
        """:meth:`finish` (unless ``report`` is false: a run abandoned), then close every sink.

        Once: a second call does nothing.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if report:
                self.finish()
        finally:
            self.sinks.close()
