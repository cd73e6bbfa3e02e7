"""LawWatch: measure the law on a schedule during training, on one process or many.

Every rank calls :meth:`LawWatch.maybe_snapshot` at the same steps. Each runs its shard of the
probe (all shards have the same number of batches: under FSDP and ZeRO-3 each forward is a
collective), one vote decides whether every rank succeeded, the per-layer statistics are
reduced entry by entry to the rank that solves them (each rank solves about entries / world of
them), the PRs are gathered on every rank and rank 0 writes to the sinks. A failure on any
rank, in the measurement or in its share of the solve, makes every rank skip that snapshot, and
training goes on. Nothing here touches
gradients, the optimizer or the RNG state.

With ``background=True`` what follows the collectives (the solve, the law's fit and the
writing of the thread-safe sinks) runs on one worker thread beside training, and each result
is recorded a few steps later under the step it was measured at (see :class:`LawWatch`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lawwatch.config import MeasureConfig
from lawwatch.history import History, Snapshot, series, series_change
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
from lawwatch.measurement import accumulate, identity, model_device, prepare, solve
from lawwatch.models import measured_module
from lawwatch.output.sinks import Sink, Sinks
from lawwatch.precision import forward_precision
from lawwatch.probe import ProbeSet
from lawwatch.stats.residual import Owned, ResidualStats
from lawwatch.watch.distributed import Layout, layout, vote

log = logging.getLogger("lawwatch")


@dataclass(frozen=True)
class Schedule:
    """When to snapshot: step 0, powers of two below ``every``, then every ``every`` steps.

    Plus ``last`` (the final step) when known. The law emerges early in training, so the
    log-spaced early snapshots matter.

    Attributes:
        every: Period once past the log-spaced warm-up.
        last: The final step (always measured), if known.
    """

    every: int
    last: int | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be a positive number of steps, got {self.every}.")

    def __call__(self, step: int) -> bool:
        """Whether ``step`` is on the schedule."""
        if step < 0:
            return False
        if step == 0 or step % self.every == 0 or step == self.last:
            return True
        return step < self.every and step & (step - 1) == 0  # a power of two

    def steps(self, until: int) -> list[int]:
        """The scheduled steps in ``[0, until]``."""
        return [s for s in range(until + 1) if self(s)]


@dataclass
class _Pending:
    """A snapshot whose solve runs on the worker: its future and what recording it needs."""

    step: int
    future: Future  # Snapshot | None (one process), or Owned (a sharded solve's share)
    stats: Any  # the statistics (their count, layers and ownership build the record)
    seconds: float
    precision: str | None
    where: Layout
    began: float = field(default_factory=time.perf_counter)


def check_monitor_settings(
    max_overhead: float | None, background: bool, background_lag: int
) -> None:
    """Refuse a bad overhead budget or background setting (LawWatch and the callback).

    Raises:
        TypeError: ``background`` not a bool, ``background_lag`` not an int.
        ValueError: ``max_overhead`` outside (0, 1), ``background_lag`` below 1.
    """
    if max_overhead is not None and not (
        isinstance(max_overhead, int | float) and 0.0 < max_overhead < 1.0
    ):
        raise ValueError(
            f"max_overhead is a fraction of training time in (0, 1) (0.02: 2%), got "
            f"{max_overhead!r}."
        )
    if not isinstance(background, bool):
        raise TypeError(f"background is True or False, got {background!r}.")
    if isinstance(background_lag, bool) or not isinstance(background_lag, int):
        raise TypeError(f"background_lag is a number of steps, got {background_lag!r}.")
    if background_lag < 1:
        raise ValueError(f"background_lag must be at least 1 step, got {background_lag}.")


def _as_schedule(
    every: int, schedule: Callable[[int], bool] | Iterable[int] | None, last: int | None
) -> Callable[[int], bool]:
    if schedule is None:
        return Schedule(every, last)
    chosen = schedule if callable(schedule) else frozenset(int(s) for s in schedule).__contains__
    if last is None:
        return chosen
    return lambda step: step == last or chosen(step)  # the final step is always measured


class LawWatch:
    """Measure the law of equi-learning on a schedule while a model trains.

    Call :meth:`maybe_snapshot` after each optimizer step on every process, with the same step
    count on every process; it measures when the schedule says so.

    On several processes (an ``accelerate.Accelerator``, or any initialized
    ``torch.distributed`` process group) each measures a shard of the probe; every shard has
    the same number of forward passes. The statistics are reduced entry by entry to the process
    that solves them (never a gather of hidden states, never a second copy of the statistics:
    :meth:`~lawwatch.stats.residual.ResidualStats.reduce_scatter_compute`), each process solves its
    share of the entries, the PRs are gathered on every process, and rank 0 alone writes to
    the sinks. Which module runs the probe is decided from the model's wrapping (see
    :func:`lawwatch.models.measured_module`): the module inside DDP; the root of an FSDP
    or ZeRO-3 model, on every rank. The probe forward runs eagerly with autocast off, in the
    weights' dtype (:mod:`lawwatch.precision`), and every record says what it was measured
    with (:meth:`series`): a resumed history of another series is not continued.

    Args:
        model: The model being trained, as the training framework wraps it (DDP, FSDP, …).
        probe: The full probe set; each process measures its shard.
        config: The measurement options (default: the paper's protocol), see
            :class:`~lawwatch.config.MeasureConfig`.
        every: Snapshot period after the log-spaced warm-up (see :class:`Schedule`).
        schedule: Instead of the default: a predicate ``step -> bool`` or a collection of steps.
        last_step: The final training step, always measured when reached.
        sinks: Where snapshots go (rank 0 only). Default: none (results are still returned).
            For an accelerate loop's trackers and local files, see
            :class:`lawwatch.integrations.accelerate.AcceleratorWatch`.
        accelerator: An ``accelerate.Accelerator``, for the process layout. Without one, an
            initialized ``torch.distributed`` process group is detected.
        emergence_threshold: r at or below which the law counts as emerged.
        max_overhead: A budget for the monitor's share of training time (e.g. ``0.02``): after
            each snapshot, scheduled steps are skipped until the training time since then is
            at least ``snapshot time / max_overhead`` (logged when it happens). Snapshot and
            step times are the largest over the processes (one 2-element all-reduce per
            snapshot), so every process skips the same steps. With ``background`` the
            snapshot time is what training waited for (the forwards and the collectives).
            Default: no budget.
        background: Run the solve, the law's fit and the writing of the thread-safe sinks
            (:func:`lawwatch.output.sinks.threadsafe`: the local history) on one worker thread, so
            training waits only for the probe's forwards and the statistics' reduction. The
            record of a snapshot taken at step ``s`` says step ``s`` and is the same as without
            ``background`` (same PRs, same fit; only ``seconds``, the time training waited
            before the solve, may differ); it is added to :attr:`history` and written to the
            other sinks (trackers) on the training thread a few steps later: on one process
            at the first call after its solve has finished; on several, at the first call at
            or after step ``s + background_lag`` (a step every process agrees on without
            communicating: the PRs are gathered there, waiting for the solve if it is not
            done). Before the next snapshot, and in :meth:`flush`, :meth:`close` and
            :meth:`state_dict`, every pending result is collected (on several processes these
            are collective: call them on every process). Off by default: results come late,
            :meth:`snapshot` returns None, and the statistics (``entries · d² · 8`` bytes)
            stay allocated until their solve is done; worth it where the solve is a
            noticeable share of a training step (large ``d``, a slow float64 device). A
            failing solve or sink in the worker is logged and training goes on.
        background_lag: On several processes, the steps after a background snapshot at which
            its PRs are gathered (see ``background``).
        unwrap: Applied to ``model`` before the automatic unwrapping, for a wrapper lawwatch
            does not recognize. Rarely needed.
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` overriding ``config``'s
            (``batch_size``, ``target``, ``layers``, …).

    Raises:
        TypeError: An option that is not a field of MeasureConfig.
        ValueError: An invalid option, or a probe that does not fit the model.

    Attributes:
        config: The measurement options.
        history: The snapshots taken (identical on every rank).
        last_step: The last step attempted, success or not (identical on every rank).
    """

    def __init__(
        self,
        model: nn.Module,
        probe: ProbeSet,
        config: MeasureConfig | None = None,
        *,
        every: int = 100,
        schedule: Callable[[int], bool] | Iterable[int] | None = None,
        last_step: int | None = None,
        sinks: list[Sink] | Sinks | None = None,
        accelerator: Any | None = None,
        emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
        unwrap: Callable[[nn.Module], nn.Module] | None = None,
        max_overhead: float | None = None,
        background: bool = False,
        background_lag: int = 4,
        **options: Any,
    ) -> None:
        if len(probe) == 0:
            raise ValueError("The probe set is empty.")
        check_monitor_settings(max_overhead, background, background_lag)
        self.config = MeasureConfig.build(config, **options)
        self.model, self.probe = model, probe
        self.schedule = _as_schedule(every, schedule, last_step)
        self.sinks = sinks if isinstance(sinks, Sinks) else Sinks(sinks)
        self.accelerator = accelerator
        self.emergence_threshold = emergence_threshold
        self.unwrap = unwrap
        # resolved once, on the whole probe: every shard of every rank regresses the same targets
        self.targets = prepare(measured_module(model, unwrap), probe, self.config)
        self.history = History()
        self.last_step: int | None = None
        self._shards: dict[tuple[int, int], ProbeSet] = {}
        self._probe_hash = probe.content_hash()
        # 48 bits of the probe's content hash: the vote checks every rank holds the same probe
        self._probe_key = int(self._probe_hash[:12], 16)
        self._precision: str | None = None  # of the latest forward
        # the overhead budget: training time per step, the earliest step it allows
        self.max_overhead, self._final_step = max_overhead, last_step
        self._clock: Callable[[], float] = time.perf_counter
        self._last_call: tuple[int, float] | None = None  # (step, time) after the last call
        self._step_seconds: float | None = None
        self._not_before: int | None = None
        self._told: int | None = None  # the snapshot whose stretch was logged
        # the background worker: one thread, so its jobs run in the order they were given
        self.background, self.background_lag = background, background_lag
        self._worker: ThreadPoolExecutor | None = None
        self._pending: list[_Pending] = []  # solves handed to the worker, steps increasing
        self._writes: list[Future] = []  # thread-safe sink writes handed to the worker

    # -- schedule -----------------------------------------------------------------------------

    def should_snapshot(self, step: int) -> bool:
        """Whether ``step`` is due and not already attempted.

        Decided from the step (and, with ``max_overhead``, from times agreed on by every rank),
        identically on every rank, so all ranks enter a snapshot together (a rank entering
        alone would wait in its collectives forever).
        """
        due = (self.last_step is None or step > self.last_step) and self.schedule(step)
        if not due or self._not_before is None or step >= self._not_before:
            return due
        if step == self._final_step:  # the final step is always measured
            return True
        if self._told != self.last_step:
            self._told = self.last_step
            log.info(
                "lawwatch: scheduled step %d skipped to keep snapshots under max_overhead=%g of "
                "training time; the next snapshot comes at step %d or later.",
                step,
                self.max_overhead,
                self._not_before,
            )
        return False

    def maybe_snapshot(self, step: int) -> Snapshot | None:
        """Snapshot if ``step`` is on the schedule; see :meth:`snapshot` for what is returned.

        With ``max_overhead``, the time between calls measures a training step (the time of a
        snapshot itself excluded).
        """
        if self.max_overhead is not None:
            now = self._clock()
            if self._last_call is not None and step > self._last_call[0]:
                self._step_seconds = (now - self._last_call[1]) / (step - self._last_call[0])
        if self._pending:
            self._collect(step)
        result = self.snapshot(step) if self.should_snapshot(step) else None
        if self.max_overhead is not None:
            self._last_call = (step, self._clock())
        return result

    # -- measurement --------------------------------------------------------------------------

    def _shard(self, rank: int, world: int) -> ProbeSet:
        key = (rank, world)
        if key not in self._shards:
            # equal row counts, so equal forward counts
            self._shards[key] = self.probe if world == 1 else self.probe.shard(rank, world)
        return self._shards[key]

    def snapshot(self, step: int) -> Snapshot | None:
        """Measure now; on several processes every one of them must call this.

        Each process measures its shard of the probe; then one vote (a 7-element all-reduce)
        decides whether every process succeeded, at the same step, on the same probe. If not —
        an exception, non-finite features, no statistics, a rank out of step — every process
        skips this snapshot. Otherwise the statistics are reduced entry by entry to the process
        that solves them (the snapshot's one large collective), each process solves its share
        and the PRs are gathered; a solve that fails on one process is reported on all of them.

        With ``background``, the results pending are collected first; this snapshot's solve
        then goes to the worker, and its record comes later (see :class:`LawWatch`).

        Returns:
            The :class:`~lawwatch.history.Snapshot` on every process (the same PRs everywhere;
            only rank 0 writes it to the sinks), or None on every process when the snapshot was
            skipped (always None with ``background``). Never raises for a measurement failure:
            it is logged to the ``"lawwatch"`` logger and training goes on.
        """
        if self._pending:
            self._collect(None)  # every pending result first: one set of statistics at a time
        self.last_step = step
        began = self._clock()
        where = layout(self.accelerator)
        try:
            return self._snapshot(step, where)
        finally:
            if self.max_overhead is not None:
                self._stretch(step, self._clock() - began, where)

    def _snapshot(self, step: int, where: Layout) -> Snapshot | None:
        start = time.perf_counter()
        stats, error = self._measure_shard(where)
        if error is not None:
            log.error("lawwatch: rank %d could not measure step %d: %r", where.rank, step, error)
        pr, key = None, self._probe_key
        if where.world > 1:
            if self.background:
                # the reduction only: each rank then solves its share on the worker
                if self._together(error is None, where, step, key, lambda: _reduce(stats)):
                    self._submit(step, stats, time.perf_counter() - start, where)
                return None
            # the one large collective of the snapshot (consumes the statistics): all PRs
            pr = self._together(
                error is None, where, step, key, lambda: stats.reduce_scatter_compute()
            )
            if pr is None:
                return None
        elif error is not None:
            return None
        elif self.background:
            self._submit(step, stats, time.perf_counter() - start, where)
            return None
        snapshot = self._solved(stats, step, time.perf_counter() - start, self._precision, pr)
        if snapshot is not None:
            self._record(snapshot, where)
        return snapshot

    def _solved(
        self,
        stats: Any,
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
        if self.background:
            self.sinks.write(snapshot, threads=False)
            self._writes.append(self._executor().submit(self.sinks.write, snapshot, threads=True))
        else:
            self.sinks.write(snapshot)

    # -- the background worker ------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        if self._worker is None:  # one thread: jobs run in the order given
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="lawwatch-worker")
        return self._worker

    def _submit(self, step: int, stats: Any, seconds: float, where: Layout) -> None:
        """Hand the solve of ``stats`` (reduced already) to the worker."""
        sharded = where.world > 1 and isinstance(stats, ResidualStats)
        job = _side_stream(stats.device)
        if sharded:
            future = self._executor().submit(job, stats.solve_owned)
        else:
            future = self._executor().submit(
                job, self._solved, stats, step, seconds, self._precision
            )
        self._pending.append(_Pending(step, future, stats, seconds, self._precision, where))

    def _collect(self, step: int | None) -> None:
        """Record the pending results that are due at ``step`` (None: all of them, waiting).

        One process: those whose solve has finished (in step order). Several: those taken at
        least ``background_lag`` steps before ``step`` (waiting for their solve: every
        process gathers the same snapshots at the same call).
        """
        while self._pending:
            pending = self._pending[0]
            if step is not None:
                if pending.where.world > 1:
                    if step < pending.step + self.background_lag:
                        return
                elif not pending.future.done():
                    return
            self._pending.pop(0)
            snapshot = self._finish(pending)
            if snapshot is not None:
                self._record(snapshot, pending.where)

    def _finish(self, pending: _Pending) -> Snapshot | None:
        """The snapshot of a pending solve, or None (the failure is logged)."""
        try:
            result = pending.future.result()
        except Exception as error:  # the job itself broke (its own errors are caught)
            log.error("lawwatch: snapshot at step %d skipped: %r", pending.step, error)
            result = None
        if not isinstance(result, Owned):
            return result
        try:  # the PR all-gather: every process is here at the same call
            pr = pending.stats.gather_owned(result)
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
        writes, self._writes = self._writes, []
        for write in writes:
            try:
                write.result()
            except Exception:  # Sinks.write reports its sinks' errors; this is the job's
                log.exception("lawwatch: a background sink write failed")

    def _shutdown(self) -> None:
        """Flush, then end the worker thread (joined)."""
        try:
            self.flush()
        finally:
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.shutdown(wait=True)

    def _stretch(self, step: int, seconds: float, where: Layout) -> None:
        """After a snapshot of ``seconds``: the earliest step the overhead budget allows."""
        times = torch.tensor([seconds, self._step_seconds or 0.0], dtype=torch.float64)
        if where.world > 1:
            import torch.distributed as dist

            try:  # every rank is here after every snapshot: the largest times decide
                times = times.to(where.device)
                dist.all_reduce(times, op=dist.ReduceOp.MAX)
            except Exception as error:  # a broken process group: no stretch from this one
                log.error("lawwatch: the overhead budget could not be agreed on: %r", error)
                return
        snapshot_s, step_s = times.tolist()
        if step_s <= 0.0:  # no training step timed yet
            return
        # steps of training the snapshot's time buys, rounded up (float noise aside)
        self._not_before = step + math.ceil(snapshot_s / (self.max_overhead * step_s) - 1e-9)

    def _measure_shard(self, where: Layout) -> tuple[ResidualStats | None, BaseException | None]:
        """This rank's statistics, or the first error (after every forward pass has run)."""
        errors: list[BaseException] = []
        stats = None
        try:
            model = measured_module(self.model, self.unwrap)
            self._precision = forward_precision(model)
            device = model_device(model)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                # the RNG state is left as found
                stats = accumulate(
                    model,
                    self._shard(where.rank, where.world),
                    self.config,
                    self.targets,
                    errors=errors,
                )
            if stats is not None and where.world > 1:
                stats.to(where.device)  # allocate before the vote, not inside the reduction
        except Exception as error:  # before or inside a forward pass
            errors.append(error)
        if stats is None and not errors:
            errors.append(RuntimeError("the probe shard gave no batch"))
        return stats, errors[0] if errors else None

    @staticmethod
    def _together(
        ok: bool, where: Layout, step: int, key: int, collective: Callable[[], Any]
    ) -> Any | None:
        """Vote, then (if every rank agrees) run ``collective`` on every rank.

        Returns its result, or None on every rank alike when the snapshot is skipped: a rank
        failed, or ``collective`` raised (the reductions and the sharded solve raise on every
        rank alike: too few examples, a constant target, a solve that failed on any rank).
        """
        try:
            reason = vote(ok, where, step=step, probe=key)
            if reason is None:
                return collective()
        except Exception as error:  # decided on every rank alike, or a broken process group
            log.error("lawwatch: snapshot at step %d skipped: %r", step, error)
            return None
        if ok:  # a failed rank has said why already
            log.error("lawwatch: snapshot at step %d skipped: %s", step, reason)
        return None

    # -- the series ----------------------------------------------------------------------------

    def series(self, precision: str | None = None) -> dict[str, Any]:
        """What this monitor's records say they were measured with (every record holds it).

        ``probe`` (the probe's content hash), ``config`` (:meth:`MeasureConfig.to_dict`) and
        ``precision`` (:func:`lawwatch.precision.forward_precision` of the module the probe
        runs through; given, or read off the model now). See :mod:`lawwatch.history`.
        """
        if precision is None:
            precision = forward_precision(measured_module(self.model, self.unwrap))
        return identity(self._probe_hash, self.config, precision)

    # -- summary and state --------------------------------------------------------------------

    @property
    def emergence_step(self) -> int | None:
        """First step from which r stays at or below the threshold."""
        return self.history.emergence_step(self.emergence_threshold)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the snapshot records and the last step attempted.

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
        if last is not None and layout(self.accelerator).rank == 0:
            self.sinks.drop_after(last)

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

        With ``background`` on several processes, call it on every process (the pending PRs
        are gathered). No thread of lawwatch's outlives it.
        """
        try:
            self._shutdown()
        finally:
            self.sinks.close()


def _reduce(stats: Any) -> bool:
    """The reduction before a background solve; returns True.

    ``ResidualStats`` are reduce-scattered by entry (each rank then solves its share),
    partitioned statistics all-reduced (every rank solves everything, identically).
    """
    if isinstance(stats, ResidualStats):
        stats.reduce_scatter()
    else:
        stats.all_reduce()
    return True


def _side_stream(device: torch.device) -> Callable[..., Any]:
    """A job runner for the worker: on CUDA, on its own stream, after the work queued so far.

    The statistics were produced on the training thread's stream; the worker's stream waits
    for an event recorded there now, and synchronizes before the job returns (so the tensors
    it used are not freed while its kernels run). On the CPU: the job as it is.
    """
    if device.type != "cuda":
        return lambda job, *args: job(*args)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))
    stream = torch.cuda.Stream(device)

    def run(job: Callable[..., Any], *args: Any) -> Any:
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            try:
                return job(*args)
            finally:
                stream.synchronize()

    return run
