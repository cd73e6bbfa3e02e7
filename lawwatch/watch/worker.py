"""The background worker: one thread beside training that solves snapshots and writes sinks.

:class:`Worker` owns the thread (one, so its jobs run in the order given), the solves handed
to it and not yet recorded (:class:`Pending`, steps increasing), which of them are due at a
step, and the thread-safe sink writes. On CUDA each solve runs on its own stream
(:func:`side_stream`). Every job is a statistics' ``solve_owned``: its result is this
process's :class:`~lawwatch.stats.owned.Owned` share (every entry when alone), which the
monitor gathers and records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from lawwatch.stats import Statistics
from lawwatch.stats.owned import Owned
from lawwatch.watch.distributed import Layout

log = logging.getLogger("lawwatch")


@dataclass
class Pending:
    """A snapshot whose solve runs on the worker: its future and what recording it needs."""

    step: int
    future: Future  # Owned: this process's share of the solve
    stats: Statistics  # the statistics (their count, layers and ownership build the record)
    seconds: float
    precision: str | None
    where: Layout


class Worker:
    """One worker thread (started on first use) and the solves it has pending.

    Args:
        lag: On several processes, the steps after its own at which a pending solve is due.
    """

    def __init__(self, lag: int) -> None:
        self.lag = lag
        self.pending: list[Pending] = []  # solves handed to the worker, steps increasing
        self._thread: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []  # thread-safe sink writes handed to the worker

    def _executor(self) -> ThreadPoolExecutor:
        if self._thread is None:  # one thread: jobs run in the order given
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="lawwatch-worker")
        return self._thread

    def solve(
        self,
        job: Callable[..., Any],
        *args: Any,
        step: int,
        stats: Statistics,
        seconds: float,
        precision: str | None,
        where: Layout,
    ) -> None:
        """Run ``job(*args)`` (a solve of ``stats``) on the worker, pending until collected."""
        future = self._executor().submit(side_stream(stats.device), job, *args)
        self.pending.append(Pending(step, future, stats, seconds, precision, where))

    def write(self, job: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``job(*args, **kwargs)`` (a write of the thread-safe sinks) on the worker.

        At interpreter exit (threads no longer take jobs) it runs here, on the calling thread.
        """
        try:
            future = self._executor().submit(job, *args, **kwargs)
        except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
            job(*args, **kwargs)
            return
        self._writes.append(future)

    def due(self, step: int | None) -> Iterator[Pending]:
        """The pending solves due at ``step``, taken off in step order (None: all of them).

        One process: those whose solve has finished. Several: those taken at least ``lag``
        steps before ``step`` (finished or not: every process takes the same ones at the same
        call, as their PRs are then gathered).
        """
        while self.pending:
            pending = self.pending[0]
            if step is not None:
                if pending.where.world > 1:
                    if step < pending.step + self.lag:
                        return
                elif not pending.future.done():
                    return
            yield self.pending.pop(0)

    @staticmethod
    def result(pending: Pending) -> Owned | None:
        """The job's result, waiting for it; None when the job itself broke (logged)."""
        try:
            return pending.future.result()
        except Exception as error:  # the job itself broke (its own errors are caught)
            log.error("lawwatch: snapshot at step %d skipped: %r", pending.step, error)
            return None

    def finish_writes(self) -> None:
        """Wait for the sink writes handed to the worker (a broken one is logged)."""
        writes, self._writes = self._writes, []
        for write in writes:
            try:
                write.result()
            except Exception:  # Sinks.write reports its sinks' errors; this is the job's
                log.exception("lawwatch: a background sink write failed")

    def shutdown(self) -> None:
        """End the thread (joined); a later job starts a new one."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.shutdown(wait=True)


def side_stream(device: torch.device) -> Callable[..., Any]:
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
