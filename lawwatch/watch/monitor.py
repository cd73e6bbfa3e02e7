"""LawWatch: measure the law on a schedule during training, on one process or many.

The coordinator of a snapshot: each rank measures its shard of the probe (with the RNG state
left as found), one vote decides whether every rank succeeded, the statistics are reduced to
the ranks that solve them, the solved record is stamped with its series, and rank 0 writes it
to the sinks. When to measure is :mod:`lawwatch.watch.schedule`'s, the process layout and the
vote :mod:`lawwatch.watch.distributed`'s, the background thread :mod:`lawwatch.watch.worker`'s,
the settings :class:`~lawwatch.watch.config.WatchConfig`'s, where records go
:class:`~lawwatch.output.run.RunOutputs`'s (the one door of a run's outputs). A failure on any
rank, in the measurement or in its share of the solve, makes every rank skip that snapshot, and
training goes on. Nothing here touches gradients, the optimizer or the RNG state.
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

from lawwatch.alerts import Alerts
from lawwatch.config import MeasureConfig
from lawwatch.history import History, Snapshot, identity, series, series_diff
from lawwatch.measurement import prepare, solve
from lawwatch.models import check_whole, is_sharded, measured_module
from lawwatch.output.run import Outputs, RunOutputs
from lawwatch.output.sinks import Sink, Sinks
from lawwatch.output.store import LocalHistory
from lawwatch.output.trackers import check_trackers
from lawwatch.precision import forward_precision
from lawwatch.probe import ProbeSet
from lawwatch.stats import Statistics
from lawwatch.structure import locate
from lawwatch.watch.config import WatchConfig, build_configs
from lawwatch.watch.distributed import Arrivals, Layout, layout, together, uneven_blocks
from lawwatch.watch.mesh import find_mesh
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
            :meth:`close`, ``law.png`` (:func:`lawwatch.output.finish.finish_run`). None for no
            files.
        trackers: Tracker names (``"wandb"``, ``"tensorboard"``, ``"mlflow"``, ``"trackio"``,
            ``"comet"``, ``"dvclive"``, ``"clearml"``), opened on the main process as a
            Trainer's ``report_to`` is (:meth:`lawwatch.output.trackers.Tracker.current`: W&B,
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
        alerts: ``True`` (or an :class:`~lawwatch.alerts.Alerts` with its tolerances) raises
            an alert when the law emerges, breaks, or a layer's PR stops falling: a WARNING on
            the ``"lawwatch"`` logger and an alert in the trackers that have alerts (main
            process). Off by default.
        accelerator: An ``accelerate.Accelerator``, for the process layout. Without one, an
            initialized ``torch.distributed`` process group is detected.
        unwrap: Applied to ``model`` before the automatic unwrapping, for a wrapper lawwatch
            does not recognize. Rarely needed.
        outputs: Where records go, as a framework's adapter describes it (see
            :class:`~lawwatch.output.run.Outputs`), instead of ``directory``, ``trackers``,
            ``sinks`` and ``alerts``.
        mesh: The ``DeviceMesh`` a tensor-parallel model runs on; default: the mesh of its
            DTensor parameters, if any (:mod:`lawwatch.watch.mesh`, ``docs/scale.md``). The
            probe is then dealt over its data-parallel dimension(s) only.
        data_parallel: The mesh dimension name(s) that are data parallel; default: those named
            ``dp``, ``dp_replicate``, ``dp_shard``, ``data_parallel``, … and those the model's
            parameters are replicated along.
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` or of
            :class:`~lawwatch.watch.config.WatchConfig` overriding ``config``'s or ``watch``'s
            (``batch_size``, ``layers``, ``every``, ``background``, …).

    Raises:
        TypeError: An option that is a field of neither, ``trackers`` not names and sinks,
            or ``outputs`` given with ``directory``, ``trackers``, ``sinks`` or ``alerts``.
        ValueError: An invalid option, an unknown tracker name, a probe that does not fit the
            model, a ``directory`` another open monitor of this process writes to, a device
            mesh lawwatch cannot measure exactly (named), or a pipeline-parallel model (its
            blocks are not all on this process).
        LookupError: A tracker with no current run (the message says how to start one).

    Attributes:
        config: The measurement options.
        watch: The monitor's settings.
        history: The snapshots taken (identical on every rank).
        last_step: The last step attempted, success or not (identical on every rank).
        local: The :class:`~lawwatch.output.store.LocalHistory` in ``directory`` (main process),
            or None.
        trackers: Name -> tracker sink, opened from ``trackers`` (main process).
        outputs: Where records go (:class:`~lawwatch.output.run.RunOutputs`; on the main
            process, every sink).
        report_path: The ``law.png`` :meth:`finish` or :meth:`close` wrote, or None.
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
        alerts: bool | Alerts = False,
        accelerator: Any | None = None,
        unwrap: Callable[[nn.Module], nn.Module] | None = None,
        outputs: Outputs | None = None,
        mesh: Any | None = None,
        data_parallel: str | Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        if len(probe) == 0:
            raise ValueError("The probe set is empty.")
        self.config, self.watch = build_configs(config, watch, **options)
        self.model, self.probe = model, probe
        self.schedule = planned(self.watch)
        if outputs is None:  # checked on every process, before anything opens
            outputs = Outputs(
                directory, check_trackers(trackers), sinks=sinks, alerts=Alerts.of(alerts)
            )
        elif directory is not None or trackers or sinks or alerts:
            raise TypeError(
                "Give outputs=, or directory=, trackers=, sinks= and alerts=; not both."
            )
        self.accelerator, self.unwrap = accelerator, unwrap
        # resolved once, on the whole probe: every shard of every rank regresses the same targets
        module = measured_module(model, unwrap)
        if layout(accelerator).world > 1:
            check_whole(module)  # a pipeline stage holds only some blocks: refused
        self.targets = prepare(module, probe, self.config)
        self._mesh = find_mesh(module, mesh, data_parallel, fsdp=is_sharded(module))
        # compared across the processes at the first snapshot: a pipeline's stages differ
        self._blocks: int | None = len(
            locate(module, self.config.blocks, self.config.final_norm).blocks
        )
        self.history = History()
        self.last_step: int | None = None
        self._shards: dict[tuple[int, int], ProbeSet] = {}
        self._probe_hash = probe.content_hash()
        # 48 bits of the probe's content hash: the vote checks every rank holds the same probe
        self._probe_key = int(self._probe_hash[:12], 16)
        self._precision: str | None = None  # of the latest forward
        self._clock: Callable[[], float] = time.perf_counter
        self._budget = Budget(self.watch.max_overhead, self.schedule)
        self._seen: int | None = None  # the latest step maybe_snapshot was called with
        self._worker = Worker(self.watch.background_lag)
        self._said_empty = False  # a run that measured nothing says so once, at close
        self._arrivals = Arrivals()  # every rank checks in before a snapshot's collectives
        self._loaded = False  # state loaded (the same on every rank)
        self._uneven: str | None = None  # the processes hold different blocks (a pipeline)
        self.directory = None if outputs.directory is None else Path(outputs.directory)
        # opened once the options are known good; records of another series already in the
        # directory are set aside (see LocalHistory)
        self.outputs = RunOutputs(
            outputs,
            main=layout(accelerator).rank == 0,
            identity=self._identity(),
            probe=probe,
            console=self.watch.console,
            emergence_threshold=self.watch.emergence_threshold,
            step_key=self.watch.step_key,
        )
        if outputs.resume_step is not None:  # the directory's records are the history
            # the same last step on every process (only the main one has the records), so
            # every process agrees on the schedule and enters each snapshot together
            state = {"history": self.outputs.restored, "last_step": outputs.resume_step}
            self.load_state_dict(state, resume_step=outputs.resume_step)

    @property
    def sinks(self) -> Sinks:
        """Every sink of the main process (none elsewhere), see :class:`RunOutputs`."""
        return self.outputs.sinks

    @property
    def local(self) -> LocalHistory | None:
        """The :class:`~lawwatch.output.store.LocalHistory` of ``directory`` (main process)."""
        return self.outputs.local

    @property
    def trackers(self) -> dict[str, Sink]:
        """Name -> tracker sink (main process)."""
        return self.outputs.trackers

    @property
    def report_path(self) -> Path | None:
        """The ``law.png`` written at the end, or None."""
        return self.outputs.report_path

    # -- when ---------------------------------------------------------------------------------

    def should_snapshot(self, step: int, *, checkpoint: bool = False) -> bool:
        """Whether ``step`` is due and not already attempted.

        A scheduled step is due when the overhead budget measures it (see
        :class:`~lawwatch.watch.schedule.Budget`), or when it is the final step
        (``last_step``) or ``checkpoint`` (a checkpoint is written at it), whatever the budget.
        Decided from the step and the budget's decision (taken once, from times agreed on by
        every rank), identically on every rank, so all ranks enter a snapshot together (a rank
        entering alone would wait in its collectives forever).
        """
        if not ((self.last_step is None or step > self.last_step) and self.schedule(step)):
            return False
        if checkpoint or step == self.watch.last_step:
            return True
        return self._budget.allows(step)

    def maybe_snapshot(self, step: int, *, checkpoint: bool = False) -> Snapshot | None:
        """Snapshot if ``step`` is on the schedule; see :meth:`snapshot` for what is returned.

        The first call of a monitor that loaded no state measures whatever the schedule and the
        budget say: the history starts where training is when the loop first calls (step 1 of
        a loop that calls after each update; step 0 of one that calls before it), as the
        Trainer callback measures step 0. Decided from the calls, so alike on every rank.

        Background results due at ``step`` are recorded first. With ``max_overhead``, the time
        between calls measures a training step (the time of a snapshot itself excluded), until
        the budget is decided (announced once, on the main process).

        Args:
            step: The training step (the same on every process).
            checkpoint: The loop writes a checkpoint at this step: a scheduled step is then
                measured whatever the budget says, so the checkpoint has its live record
                (``lawwatch analyze`` compares them). The Trainer callback passes it.
        """
        self._seen = step if self._seen is None else max(self._seen, step)
        self._budget.called(step, self._clock())
        if self._worker.pending:
            self._collect(step)
        if self._budget.ready():  # once, at the same step on every process
            said = self._budget.decide(step, layout(self.accelerator))
            if said is not None:
                self.outputs.announce(said)
        first = self.last_step is None and not self._loaded and step >= 0
        due = first or self.should_snapshot(step, checkpoint=checkpoint)
        result = self.snapshot(step) if due else None
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
        where = self._where()
        if not self._arrivals.arrive(where, step):  # a rank is missing: no collective at all
            self.last_step = step
            return None
        if self._worker.pending:
            self._collect(None)  # every pending result first: one set of statistics at a time
        self.last_step = step
        began = self._clock()
        try:
            return self._snapshot(step, where)
        finally:
            now = self._clock()
            self._budget.spent(step, now - began)
            self._budget.returned(step, now)

    def _where(self) -> Layout:
        """The process layout, with the probe's shard and the reduction's group of the mesh."""
        where = layout(self.accelerator)
        return where if self._mesh is None or where.world == 1 else self._mesh.layout(where)

    def _snapshot(self, step: int, where: Layout) -> Snapshot | None:
        start = time.perf_counter()
        if self._uneven is not None:  # the same on every process: none enters a collective
            log.error("lawwatch: snapshot at step %d skipped: %s", step, self._uneven)
            return None
        shard = self._shard(*where.shards)
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
                if together(ok, where, step, key, lambda: self._reduced(stats, where, True)):
                    self._submit(step, stats, time.perf_counter() - start, where)
                return None
            # the one large collective of the snapshot (consumes the statistics): all PRs
            pr = together(ok, where, step, key, lambda: self._reduced(stats, where, False))
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

    def _reduced(self, stats: Statistics, where: Layout, background: bool) -> Any:
        """The snapshot's collective after the vote: the statistics reduced over the group.

        Solved too, in the foreground. At the first, every process compares its block count
        (:func:`~lawwatch.watch.distributed.uneven_blocks`; the vote has aligned them).
        """
        if self._blocks is not None:
            count, self._blocks = self._blocks, None
            self._uneven = uneven_blocks(count, where)
        if self._uneven is not None:  # raised on every process alike: all skip
            raise ValueError(self._uneven)
        if background:
            stats.reduce_scatter(where.group)
            return True
        return stats.reduce_scatter_compute(where.group)

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
        if self.watch.background:
            self.outputs.write(snapshot, threads=False)
            self._worker.write(self.outputs.write, snapshot, threads=True)
        else:
            self.outputs.write(snapshot)

    # -- background results -------------------------------------------------------------------

    def _submit(self, step: int, stats: Statistics, seconds: float, where: Layout) -> None:
        """Hand the solve of ``stats`` (reduced already) to the worker.

        On several processes this rank's share (the PRs are gathered when recorded), on one all.
        """
        _UNCLOSED.add(self)  # finished at interpreter exit if close() is never called
        self._worker.solve(
            stats.solve_owned,
            where.group,
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
            pr = pending.stats.gather_owned(owned, pending.where.group)
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

    def _identity(self) -> dict[str, Any]:
        """:meth:`series`, or without the precision while the model cannot say it yet.

        What is missing is compared at the first record (see :mod:`lawwatch.history`).
        """
        try:
            return self.series()
        except Exception:  # e.g. no parameter yet
            return {"probe": self._probe_hash, "config": self.config.to_dict()}

    # -- summary and state --------------------------------------------------------------------

    @property
    def emergence_step(self) -> int | None:
        """First step from which r stays at or below the threshold."""
        return self.history.emergence_step(self.watch.emergence_threshold)

    def schedule_state(self) -> dict[str, Any] | None:
        """The overhead budget's decision (plain values; None before the first snapshot).

        Part of :meth:`state_dict`; apart, for a framework that keeps it in its own state (the
        Trainer callback, in the Trainer's checkpoints).
        """
        return self._budget.state_dict()

    def load_schedule(self, state: dict[str, Any] | None) -> None:
        """Restore the budget's decision alone (:meth:`schedule_state`), e.g. after a resume."""
        self._budget.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the records, the last step attempted, the budget's decision.

        Plain Python values only (dicts, lists, strings, numbers, None), so a raw loop keeps it
        in its checkpoint and reads it back with ``torch.load(path, weights_only=True)``::

            ckpt["lawwatch"] = watch.state_dict()                          # torch.save(ckpt, …)
            watch.load_state_dict(ckpt["lawwatch"], resume_step=ckpt["step"])  # on resume

        With ``background`` the pending results are recorded first (:meth:`flush`; on several
        processes call it on every process, as ``accelerator.save_state`` does), so the state
        holds every snapshot attempted.
        """
        self.flush()
        state = {"history": [dict(r) for r in self.history], "last_step": self.last_step}
        decided = self.schedule_state()
        if decided is not None:  # the overhead budget's decision, once there is one
            state["schedule"] = decided
        return state

    def load_state_dict(self, state: dict[str, Any], *, resume_step: int | None = None) -> None:
        """Restore the history, dropping records after ``resume_step`` (they will be redone).

        Load the same state on every rank (e.g. rank 0's, as ``accelerator.load_state`` does):
        the schedule then agrees on every rank. On rank 0,
        :class:`~lawwatch.output.sinks.Rewindable` sinks (e.g.
        :class:`~lawwatch.output.store.LocalHistory`) drop what the run wrote after the restored
        point, so the resumed run continues one sequence of steps. A history measured
        with another probe, other options or at another precision is not continued: a new
        series starts (with a warning). The overhead budget's decision (``schedule``) is
        restored with it, so the resumed run measures the steps the first pass measured.
        """
        history = History(state.get("history", []))
        if history.records:
            history = self._same_series(history)
        last = state.get("last_step", history.last_step)
        if resume_step is not None:
            history.drop_after(resume_step)
            last = resume_step if last is None else min(last, resume_step)
        self.history, self.last_step = history, last
        self._budget.load_state_dict(state.get("schedule"))
        self._loaded = True
        if last is not None and layout(self.accelerator).rank == 0:
            self.outputs.resume(history, last)

    def _same_series(self, history: History) -> History:
        """``history`` if this monitor continues its series, else an empty one (with a warning)."""
        changes = series_diff(series(history[-1]), self._identity())
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
            "; ".join(map(str, changes)),
        )
        return History()

    def measure_at(self, step: int) -> None:
        """Measure ``step`` unless it was already attempted, whatever the schedule and budget say.

        For the steps a framework always measures (its start, its final step). On several
        processes every one of them must call it, with the same step.
        """
        if self.last_step is None or step > self.last_step:
            self.snapshot(step)

    def finish(self, step: int | None = None) -> Path | None:
        """The run's end before the sinks close: pending results recorded, then the report.

        ``step``: the final step, measured first unless already attempted (:meth:`measure_at`;
        on every process).

        With ``directory``, the main process writes ``law.png`` there and hands it and the
        history files to the trackers (:func:`lawwatch.output.finish.finish_run`), once;
        :meth:`close` does it if not done. For a framework whose trackers end their runs before
        the monitor is closed (the Trainer's callbacks, in ``on_train_end``). With
        ``background`` on several processes, call it on every process.

        A loop that never said its final step (no ``last_step``) has the latest step it called
        :meth:`maybe_snapshot` with measured here, if not yet attempted (see :meth:`close`).

        Returns:
            The ``law.png`` written (main process), or None.
        """
        if step is not None:
            self.measure_at(step)
        self._measure_last()
        self.flush()
        return self.outputs.finish()

    def _measure_last(self) -> None:
        """Measure the latest step seen, if not attempted: a run's history ends where it did.

        On one process only: on several, a snapshot is collective and ``close`` may be called
        on the main process alone, so the step is named in a warning instead (``last_step``
        measures it during training).
        """
        seen = self._seen
        if seen is None or (self.last_step is not None and seen <= self.last_step):
            return
        if layout(self.accelerator).world > 1:
            if layout(self.accelerator).rank == 0:
                log.warning(
                    "lawwatch: the last step called, %d, was not measured: on several processes "
                    "the end of training is measured only at last_step (pass last_step=%d).",
                    seen,
                    seen,
                )
            self._seen = self.last_step  # said once
            return
        self.snapshot(seen)

    def close(self) -> None:
        """End of training: record every pending result, end the worker, close the sinks.

        With ``directory``, the main process then writes ``law.png`` there and hands it and the
        history files to the trackers (:meth:`finish`, if not done yet). With ``background`` on
        several processes, call it on every process (the pending PRs are gathered). No thread
        of lawwatch's outlives it.

        On one process, the latest step :meth:`maybe_snapshot` was called with is measured
        first if it was not attempted (a loop without ``last_step`` still ends its history at
        its final step); on several, only ``last_step`` is (a warning names the step).
        """
        self._close(final=True)

    def _close(self, *, final: bool) -> None:
        _UNCLOSED.discard(self)
        if final:
            try:
                self._measure_last()
            except Exception:  # the end of training is never stopped by the monitor
                log.exception("lawwatch: the last step could not be measured")
        try:
            try:
                self.flush()
            finally:
                self._worker.shutdown()
        finally:
            self._say_if_empty()
            self.outputs.close()

    def _say_if_empty(self) -> None:
        """A run with no record says so once, on the main process (each failure was logged)."""
        if self.history.records or self._said_empty or layout(self.accelerator).rank != 0:
            return
        self._said_empty = True
        files = "" if self.directory is None else f" in {self.directory}"
        if self.last_step is None:
            log.warning(
                "lawwatch: closed with nothing measured: maybe_snapshot was never called, so "
                "no history or law.png was written%s.",
                files,
            )
            return
        log.error(
            "lawwatch: this run measured nothing: every snapshot failed or was skipped (the "
            "last attempted at step %d; the reason was logged at each), so no history or "
            "law.png was written%s.",
            self.last_step,
            files,
        )

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
        self._close(final=False)  # no new forward at interpreter exit


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
