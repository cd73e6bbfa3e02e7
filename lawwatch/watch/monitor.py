"""LawWatch: measure the law on a schedule during training, on one process or many.

The coordinator of a snapshot: each rank measures its shard of the probe (with the RNG state
left as found), one vote decides whether every rank succeeded, the statistics are reduced to
the ranks that solve them, the solved record is stamped with its series, and rank 0 writes it
to the sinks. When to measure is :mod:`lawwatch.watch.schedule`'s, the process layout and the
vote :mod:`lawwatch.watch.distributed`'s, the background thread :mod:`lawwatch.watch.worker`'s,
the settings :class:`~lawwatch.watch.config.WatchConfig`'s. A failure on any rank, in the
measurement or in its share of the solve, makes every rank skip that snapshot, and training
goes on. Nothing here touches gradients, the optimizer or the RNG state.
"""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lawwatch.config import MeasureConfig
from lawwatch.history import History, Snapshot, identity, series, series_change
from lawwatch.measurement import prepare, solve
from lawwatch.models import measured_module
from lawwatch.output.console import ConsoleSink
from lawwatch.output.sinks import Rewindable, Sink, Sinks
from lawwatch.output.store import HistoryBusy, LocalHistory
from lawwatch.output.trackers import Tracker, check_trackers, open_trackers
from lawwatch.precision import forward_precision
from lawwatch.probe import ProbeSet
from lawwatch.stats import Statistics
from lawwatch.watch.config import WatchConfig, build_configs
from lawwatch.watch.distributed import Layout, layout, together
from lawwatch.watch.schedule import Budget, planned
from lawwatch.watch.shard import measure_shard
from lawwatch.watch.worker import Pending, Worker

log = logging.getLogger("lawwatch")


class LawWatch:
    """Measure the law of equi-learning on a schedule while a model trains.

    Call :meth:`maybe_snapshot` after each optimizer step on every process, with the same step
    count on every process; it measures when :attr:`watch` says so, and at its first call
    (a monitor that loaded no state measures the start of its history whatever the schedule
    says, as the Trainer callback measures step 0). Call :meth:`close` at the end of training.
    On several processes (an ``accelerate.Accelerator``, or any initialized
    ``torch.distributed`` process group) each measures a shard of the probe and solves its
    share of the entries (see :meth:`snapshot`); rank 0 alone writes to the sinks. The probe
    runs through the module the model's wrapping points to
    (:func:`lawwatch.models.measured_module`), eagerly with autocast off, in the weights' dtype
    (:mod:`lawwatch.precision`), and every record says what it was measured with
    (:meth:`series`): a resumed history of another series is not continued.

    Args:
        model: The model being trained, as the training framework wraps it (DDP, FSDP, …).
        probe: The full probe set; each process measures its shard.
        config: The measurement options (default: the paper's protocol), see
            :class:`~lawwatch.config.MeasureConfig`.
        watch: When to measure and at what cost (default: every 100 steps after the
            log-spaced start, in the foreground, snapshots under a tenth of training time), see
            :class:`~lawwatch.watch.config.WatchConfig`.
        directory: Where the main process keeps ``history.jsonl`` and ``pr.safetensors`` (a
            :class:`~lawwatch.output.store.LocalHistory`: one series, one writer) and, at
            :meth:`close`, ``law.png`` (:func:`lawwatch.report.finish_run`). None for no files.
        trackers: Tracker names (``"wandb"``, ``"tensorboard"``, ``"mlflow"``, ``"trackio"``,
            ``"comet"``, ``"dvclive"``, ``"clearml"``), opened on the main process as a
            Trainer's ``report_to`` is (:func:`lawwatch.output.trackers.open_trackers`: W&B,
            MLflow, trackio, Comet and ClearML log into their current run, so start it first;
            TensorBoard writes in ``<directory>/tensorboard``), or tracker sinks. A resumed
            run's trackers are given the restored history (:meth:`load_state_dict`); at
            :meth:`close` they get ``law.png`` and the history files.
        sinks: More sinks (rank 0 only). Default: none (results are still returned).
            For an accelerate loop's trackers, see
            :class:`lawwatch.integrations.accelerate.AcceleratorWatch`.
            A monitor that loads no state (:meth:`load_state_dict`) starts a new history: at
            its first record, :class:`~lawwatch.output.sinks.Rewindable` sinks (a
            :class:`~lawwatch.output.store.LocalHistory`) drop what an earlier run left, with
            a warning.
        accelerator: An ``accelerate.Accelerator``, for the process layout. Without one, an
            initialized ``torch.distributed`` process group is detected.
        unwrap: Applied to ``model`` before the automatic unwrapping, for a wrapper lawwatch
            does not recognize. Rarely needed.
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` or of
            :class:`~lawwatch.watch.config.WatchConfig` overriding ``config``'s or ``watch``'s
            (``batch_size``, ``layers``, ``every``, ``background``, …).

    Raises:
        TypeError: An option that is a field of neither, or ``trackers`` not names and sinks.
        ValueError: An invalid option, an unknown tracker name, a probe that does not fit the
            model, or a ``directory`` another open monitor of this process writes to.
        LookupError: A tracker with no current run (the message says how to start one).

    Attributes:
        config: The measurement options.
        watch: The monitor's settings.
        history: The snapshots taken (identical on every rank).
        last_step: The last step attempted, success or not (identical on every rank).
        local: The :class:`~lawwatch.output.store.LocalHistory` in ``directory`` (main process),
            or None.
        trackers: Name -> tracker sink, opened from ``trackers`` (main process).
        report_path: The ``law.png`` :meth:`close` wrote, or None.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: ProbeSet,
        config: MeasureConfig | None = None,
        watch: WatchConfig | None = None,
        *,
        directory: str | Path | None = None,
        trackers: Sequence[str | Sink] | None = None,
        sinks: list[Sink] | Sinks | None = None,
        accelerator: Any | None = None,
        unwrap: Callable[[nn.Module], nn.Module] | None = None,
        **options: Any,
    ) -> None:
        if len(probe) == 0:
            raise ValueError("The probe set is empty.")
        self.config, self.watch = build_configs(config, watch, **options)
        self.model, self.probe = model, probe
        self.schedule = planned(self.watch)
        self.sinks = sinks if isinstance(sinks, Sinks) else Sinks(sinks)
        wanted = check_trackers(trackers)  # on every process, before anything opens
        if self.watch.console:  # the one-line summary (main process: only rank 0 writes)
            self.sinks = Sinks([*self.sinks.sinks, ConsoleSink()])
        self.accelerator, self.unwrap = accelerator, unwrap
        # resolved once, on the whole probe: every shard of every rank regresses the same targets
        self.targets = prepare(measured_module(model, unwrap), probe, self.config)
        self.history = History()
        self.last_step: int | None = None
        self._shards: dict[tuple[int, int], ProbeSet] = {}
        self._probe_hash = probe.content_hash()
        # 48 bits of the probe's content hash: the vote checks every rank holds the same probe
        self._probe_key = int(self._probe_hash[:12], 16)
        self._precision: str | None = None  # of the latest forward
        self._clock: Callable[[], float] = time.perf_counter
        self._budget = Budget(self.watch.max_overhead, self.watch.last_step)
        self._worker = Worker(self.watch.background_lag)
        self._fresh = True  # no state loaded: the first record replaces what sinks hold
        self._loaded = False  # state loaded (the same on every rank, unlike _fresh)
        self.directory = None if directory is None else Path(directory)
        self.local: LocalHistory | None = None
        self.trackers: dict[str, Sink] = {}
        self.report_path: Path | None = None
        if layout(accelerator).rank == 0:
            self._open_outputs(wanted)

    def _open_outputs(self, trackers: list[str | Sink]) -> None:
        """The main process's files and trackers, ahead of the sinks given.

        Opened once the options are known good; records of another series already in the
        directory are set aside (see :class:`~lawwatch.output.store.LocalHistory`).
        """
        opened: list[Sink] = []
        if self.directory is not None:
            try:
                identity: dict[str, Any] | None = self.series()
            except Exception:  # the model cannot say its precision yet: checked at 1st write
                identity = None
            try:
                self.local = LocalHistory(self.directory, series=identity, probe=self.probe)
                opened.append(self.local)
            except HistoryBusy as busy:  # another writer there: this monitor writes none
                log.error("lawwatch: %s", busy)
        try:
            self.trackers = open_trackers(
                trackers,
                directory=self.directory,
                emergence_threshold=self.watch.emergence_threshold,
            )
        except BaseException:
            if self.local is not None:
                self.local.close()  # the directory is free for the monitor built after the fix
            raise
        self.sinks = Sinks([*opened, *self.trackers.values(), *self.sinks.sinks])

    # -- when ---------------------------------------------------------------------------------

    def should_snapshot(self, step: int) -> bool:
        """Whether ``step`` is due and not already attempted.

        Decided from the step (and, with ``max_overhead``, from times agreed on by every rank),
        identically on every rank, so all ranks enter a snapshot together (a rank entering
        alone would wait in its collectives forever).
        """
        due = (self.last_step is None or step > self.last_step) and self.schedule(step)
        return due and self._budget.allows(step, self.last_step)

    def maybe_snapshot(self, step: int) -> Snapshot | None:
        """Snapshot if ``step`` is on the schedule; see :meth:`snapshot` for what is returned.

        The first call of a monitor that loaded no state measures whatever the schedule and the
        budget say: the history starts where training is when the loop first calls (step 1 of
        a loop that calls after each update; step 0 of one that calls before it), as the
        Trainer callback measures step 0. Decided from the calls, so alike on every rank.

        Background results due at ``step`` are recorded first. With ``max_overhead``, the time
        between calls measures a training step (the time of a snapshot itself excluded).
        """
        self._budget.called(step, self._clock())
        if self._worker.pending:
            self._collect(step)
        first = self.last_step is None and not self._loaded and step >= 0
        result = self.snapshot(step) if first or self.should_snapshot(step) else None
        self._budget.returned(step, self._clock())
        return result

    # -- a snapshot: shard -> vote -> reduce -> solve -> record -------------------------------

    def snapshot(self, step: int) -> Snapshot | None:
        """Measure now; on several processes every one of them must call this.

        Each process measures its shard of the probe; then one vote (a 7-element all-reduce)
        decides whether every process succeeded, at the same step, on the same probe. If not —
        an exception, non-finite features, no statistics, a rank out of step — every process
        skips this snapshot. Otherwise the statistics are reduced entry by entry to the process
        that solves them (the snapshot's one large collective), each process solves its share
        and the PRs are gathered; a solve that fails on one process is reported on all of them.

        With ``background``, the results pending are collected first; this snapshot's solve
        then goes to the worker, and its record comes later (see
        :attr:`WatchConfig.background <lawwatch.watch.config.WatchConfig.background>`).

        Returns:
            The :class:`~lawwatch.history.Snapshot` on every process (the same PRs everywhere;
            only rank 0 writes it to the sinks), or None on every process when the snapshot was
            skipped (always None with ``background``). Never raises for a measurement failure:
            it is logged to the ``"lawwatch"`` logger and training goes on.
        """
        if self._worker.pending:
            self._collect(None)  # every pending result first: one set of statistics at a time
        self.last_step = step
        began = self._clock()
        where = layout(self.accelerator)
        try:
            return self._snapshot(step, where)
        finally:
            self._budget.spent(step, self._clock() - began, where)

    def _snapshot(self, step: int, where: Layout) -> Snapshot | None:
        start = time.perf_counter()
        shard = self._shard(where.rank, where.world)
        stats, error, precision = measure_shard(
            self.model, shard, self.config, self.targets, where, self.unwrap
        )
        if precision is not None:
            self._precision = precision
        if error is not None:
            log.error("lawwatch: rank %d could not measure step %d: %r", where.rank, step, error)
        ok, key, pr = error is None, self._probe_key, None
        if where.world > 1:
            if self.watch.background:
                # the reduction only: each rank then solves its share on the worker
                if together(ok, where, step, key, lambda: _reduced(stats)):
                    self._submit(step, stats, time.perf_counter() - start, where)
                return None
            # the one large collective of the snapshot (consumes the statistics): all PRs
            pr = together(ok, where, step, key, lambda: stats.reduce_scatter_compute())
            if pr is None:
                return None
        elif not ok:
            return None
        elif self.watch.background:
            self._submit(step, stats, time.perf_counter() - start, where)
            return None
        snapshot = self._solved(stats, step, time.perf_counter() - start, self._precision, pr)
        if snapshot is not None:
            self._record(snapshot, where)
        return snapshot

    def _shard(self, rank: int, world: int) -> ProbeSet:
        key = (rank, world)
        if key not in self._shards:
            # equal row counts, so equal forward counts
            self._shards[key] = self.probe if world == 1 else self.probe.shard(rank, world)
        return self._shards[key]

    def _solved(
        self,
        stats: Statistics,
        step: int,
        seconds: float,
        precision: str | None,
        pr: torch.Tensor | None = None,
    ) -> Snapshot | None:
        """The snapshot of ``stats`` (``pr``: already solved) with its series, or None.

        A failing solve is logged and gives None (identical statistics fail identically on
        every rank). Runs on the training thread or, with ``background``, on the worker.
        """
        try:
            snapshot = solve(stats, seconds=seconds, step=step, pr=pr)
        except Exception as error:
            log.error("lawwatch: snapshot at step %d skipped: %s", step, error)
            return None
        snapshot.extra.update(self.series(precision))
        return snapshot

    def _record(self, snapshot: Snapshot, where: Layout) -> None:
        """Add to the history; rank 0 writes the sinks (thread-safe ones on the worker)."""
        self.history.append(snapshot)
        if where.rank != 0:
            return
        if self._fresh:
            self._replace_earlier_run()
        if self.watch.background:
            self.sinks.write(snapshot, threads=False)
            self._worker.write(self.sinks.write, snapshot, threads=True)
        else:
            self.sinks.write(snapshot)

    # -- background results -------------------------------------------------------------------

    def _submit(self, step: int, stats: Statistics, seconds: float, where: Layout) -> None:
        """Hand the solve of ``stats`` (reduced already) to the worker.

        On several processes this rank's share (the PRs are gathered when recorded), on one all.
        """
        _UNCLOSED.add(self)  # finished at interpreter exit if close() is never called
        self._worker.solve(
            stats.solve_owned,
            step=step,
            stats=stats,
            seconds=seconds,
            precision=self._precision,
            where=where,
        )

    def _collect(self, step: int | None) -> None:
        """Record the pending results due at ``step`` (None: all of them, waiting)."""
        for pending in self._worker.due(step):
            snapshot = self._finish(pending)
            if snapshot is not None:
                self._record(snapshot, pending.where)

    def _finish(self, pending: Pending) -> Snapshot | None:
        """The snapshot of a pending solve, or None (the failure is logged)."""
        owned = self._worker.result(pending)
        if owned is None:
            return None
        try:  # the PR all-gather (alone: this process's own): every process is here at once
            pr = pending.stats.gather_owned(owned)
        except Exception as error:  # raised on every rank alike
            log.error("lawwatch: snapshot at step %d skipped: %r", pending.step, error)
            return None
        return self._solved(pending.stats, pending.step, pending.seconds, pending.precision, pr)

    def flush(self) -> None:
        """Record every pending background result and finish the worker's sink writes.

        Nothing to do without ``background``. On several processes the pending PRs are
        gathered: call it on every process.
        """
        self._collect(None)
        self._worker.finish_writes()

    # -- the series ----------------------------------------------------------------------------

    def series(self, precision: str | None = None) -> dict[str, Any]:
        """What this monitor's records say they were measured with (every record holds it).

        ``probe`` (the probe's content hash), ``config`` (:meth:`MeasureConfig.to_dict`) and
        ``precision`` (:func:`lawwatch.precision.forward_precision` of the module the probe
        runs through; given, or read off the model now). See :mod:`lawwatch.history`.
        """
        if precision is None:
            precision = forward_precision(measured_module(self.model, self.unwrap))
        return identity(self._probe_hash, self.config.to_dict(), precision)

    # -- summary and state --------------------------------------------------------------------

    @property
    def emergence_step(self) -> int | None:
        """First step from which r stays at or below the threshold."""
        return self.history.emergence_step(self.watch.emergence_threshold)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the snapshot records and the last step attempted.

        Plain Python values only (dicts, lists, strings, numbers, None), so a raw loop keeps it
        in its checkpoint and reads it back with ``torch.load(path, weights_only=True)``::

            ckpt["lawwatch"] = watch.state_dict()                          # torch.save(ckpt, …)
            watch.load_state_dict(ckpt["lawwatch"], resume_step=ckpt["step"])  # on resume

        With ``background`` the pending results are recorded first (:meth:`flush`; on several
        processes call it on every process, as ``accelerator.save_state`` does), so the state
        holds every snapshot attempted.
        """
        self.flush()
        return {"history": [dict(r) for r in self.history], "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any], *, resume_step: int | None = None) -> None:
        """Restore the history, dropping records after ``resume_step`` (they will be redone).

        Load the same state on every rank (e.g. rank 0's, as ``accelerator.load_state`` does):
        the schedule then agrees on every rank. On rank 0,
        :class:`~lawwatch.output.sinks.Rewindable` sinks (e.g.
        :class:`~lawwatch.output.store.LocalHistory`) drop what the run wrote after the restored
        point, so the resumed run continues one sequence of steps. A history measured
        with another probe, other options or at another precision is not continued: a new
        series starts (with a warning).
        """
        history = History(state.get("history", []))
        if history.records:
            history = self._same_series(history)
        last = state.get("last_step", history.last_step)
        if resume_step is not None:
            history.drop_after(resume_step)
            last = resume_step if last is None else min(last, resume_step)
        self.history, self.last_step = history, last
        self._fresh = last is None
        self._loaded = True
        if last is not None and layout(self.accelerator).rank == 0:
            self.sinks.drop_after(last)
            self._replay(history)

    def _replay(self, history: History) -> None:
        """Trackers opened by name that hold nothing yet get the restored history (a resume)."""
        for name, sink in self.trackers.items():
            if isinstance(sink, Tracker) and not sink.records:
                try:
                    sink.replay(history.records)
                except Exception:
                    log.exception("lawwatch: the restored history did not reach %s", name)

    def _replace_earlier_run(self) -> None:
        """A run that loaded no state starts a new history: rewindable sinks drop what they hold.

        As the Trainer callback does for a run from step 0 (with a warning), so an earlier
        run's records in the same directory are never continued by this one.
        """
        self._fresh = False
        for sink in self.sinks.sinks:
            held = getattr(sink, "records", None)
            if isinstance(sink, Rewindable) and held:
                log.warning(
                    "lawwatch: this monitor loaded no state, so it starts a new history; "
                    "replacing the %d records (steps %s to %s) in %s. To continue them, load "
                    "the run's state first (load_state_dict, accelerator.load_state).",
                    len(held),
                    held[0]["step"],
                    held[-1]["step"],
                    getattr(sink, "directory", type(sink).__name__),
                )
        self.sinks.drop_after(-1)

    def _same_series(self, history: History) -> History:
        """``history`` if this monitor continues its series, else an empty one (with a warning)."""
        try:
            current = self.series()
        except Exception:  # the model cannot say its precision (yet): compare the rest
            current = {"probe": self._probe_hash, "config": self.config.to_dict()}
        changes = series_change(series(history[-1]), current)
        if not changes:
            return history
        log.warning(
            "lawwatch: the restored history (%d records, steps %s to %s) is another series "
            "than this run's: %s. This run starts a new series from its checkpoint; to "
            "continue that history, resume with the probe, options and precision it was "
            "measured with.",
            len(history),
            history.steps[0],
            history.last_step,
            "; ".join(changes),
        )
        return History()

    def close(self) -> None:
        """End of training: record every pending result, end the worker, close the sinks.

        With ``directory``, the main process then writes ``law.png`` there and hands it and the
        history files to the trackers (:func:`lawwatch.report.finish_run`). With
        ``background`` on several processes, call it on every process (the pending PRs are
        gathered). No thread of lawwatch's outlives it.
        """
        _UNCLOSED.discard(self)
        try:
            try:
                self.flush()
            finally:
                self._worker.shutdown()
        finally:
            try:
                self._finish_run()
            finally:
                self.sinks.close()

    def _finish_run(self) -> None:
        """``law.png`` and the report to the trackers (main process, with records)."""
        if self.local is None or self.local.closed or not self.local.records:
            return
        try:
            from lawwatch.report import finish_run

            self.report_path = finish_run(
                self.local.directory,
                self.local.records,
                self.trackers,
                emergence_threshold=self.watch.emergence_threshold,
            )
        except Exception:  # the end-of-run picture never stops the run
            log.exception("lawwatch: no plot of the law in %s", self.local.directory)

    def _close_at_exit(self) -> None:
        """The interpreter exits and :meth:`close` was never called: finish what is pending.

        On one process the pending results are recorded and the sinks closed. On several the
        pending PRs would need a collective the other processes may never join: they are lost,
        and the warning says which.
        """
        steps = [pending.step for pending in self._worker.pending]
        if not steps:
            return
        if any(pending.where.world > 1 for pending in self._worker.pending):
            log.warning(
                "lawwatch: LawWatch(background=True) was not closed; the snapshots of steps %s "
                "are lost at exit. Call close() on every process at the end of training.",
                steps,
            )
            return
        log.warning(
            "lawwatch: LawWatch(background=True) was not closed; recording the snapshots of "
            "steps %s at exit. Call close() at the end of training.",
            steps,
        )
        self.close()


# background monitors with results pending and no close() yet (weakly held: a monitor that is
# collected has nothing left to record)
_UNCLOSED: weakref.WeakSet[LawWatch] = weakref.WeakSet()


@atexit.register
def _close_unclosed() -> None:
    for monitor in list(_UNCLOSED):
        try:
            monitor._close_at_exit()
        except Exception:  # exiting: report, never raise
            log.exception("lawwatch: the pending snapshots could not be recorded at exit")


def _reduced(stats: Statistics) -> bool:
    """Reduce ``stats`` to the processes that solve them (see ``Statistics.reduce_scatter``)."""
    stats.reduce_scatter()
    return True
