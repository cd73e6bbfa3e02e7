"""When the monitor measures: the schedule of steps, and the overhead budget that thins it.

:class:`Schedule` is the default (log-spaced, then periodic); :func:`planned` turns a
:class:`~lawwatch.watch.config.WatchConfig` into the predicate the monitor asks. :class:`Budget`
keeps snapshots under ``max_overhead`` of training time by skipping scheduled steps, from times
every process agrees on, so every process skips the same steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from lawwatch.watch.config import WatchConfig, check_every
from lawwatch.watch.distributed import Layout, largest

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
        check_every(self.every)

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


def planned(watch: WatchConfig) -> Callable[[int], bool]:
    """The steps ``watch`` schedules: its ``schedule`` (or ``every``'s), and its ``last_step``."""
    if watch.schedule is None:
        return Schedule(watch.every, watch.last_step)
    chosen = watch.schedule if callable(watch.schedule) else frozenset(watch.schedule).__contains__
    last = watch.last_step
    if last is None:
        return chosen
    return lambda step: step == last or chosen(step)  # the final step is always measured


class Budget:
    """The overhead budget: after a snapshot, the earliest step its cost leaves room for.

    The first scheduled step it skips is logged as a WARNING (the budget, the snapshot's cost,
    how to change it), later ones at DEBUG.

    Told the time at each of the monitor's calls (:meth:`called`, :meth:`returned`: the time
    between them is training) and each snapshot's duration (:meth:`spent`), it answers whether
    a scheduled step may be measured (:meth:`allows`). Without ``max_overhead`` it allows all.

    Args:
        max_overhead: The monitor's share of training time, in (0, 1), or None.
        final_step: Always allowed (the final step is measured in any case).
    """

    def __init__(self, max_overhead: float | None, final_step: int | None) -> None:
        self.max_overhead, self.final_step = max_overhead, final_step
        self._last_call: tuple[int, float] | None = None  # (step, time) after the last call
        self._step_seconds: float | None = None  # training time per step, latest measured
        self._not_before: int | None = None  # the earliest step the budget allows
        self._told: int | None = None  # the snapshot whose stretch was logged
        self._warned = False  # the first skip is a WARNING, later ones DEBUG
        self._cost: tuple[float, float] | None = None  # (snapshot s, step s) that set the stretch

    def called(self, step: int, now: float) -> None:
        """A call at ``step``: the training time per step since the previous call."""
        if self.max_overhead is None:
            return
        if self._last_call is not None and step > self._last_call[0]:
            self._step_seconds = (now - self._last_call[1]) / (step - self._last_call[0])

    def returned(self, step: int, now: float) -> None:
        """The call at ``step`` returns (a snapshot's own time is not training time)."""
        if self.max_overhead is not None:
            self._last_call = (step, now)

    def allows(self, step: int, last_attempted: int | None) -> bool:
        """Whether the budget leaves room for a snapshot at the scheduled ``step``.

        A skip is logged once per stretched snapshot (``last_attempted``), not once per step.
        """
        if self._not_before is None or step >= self._not_before or step == self.final_step:
            return True
        if self._told != last_attempted:
            self._told = last_attempted
            if not self._warned:
                self._warned = True
                snapshot_s, step_s = self._cost or (math.nan, math.nan)
                log.warning(
                    "lawwatch: scheduled step %d skipped to keep snapshots under max_overhead=%g "
                    "of training time (a snapshot took %.2f s, %.1f training steps); the next "
                    "snapshot comes at step %d or later. Later skips are not logged (DEBUG). To "
                    "measure every scheduled step pass max_overhead=None, or a larger fraction.",
                    step,
                    self.max_overhead,
                    snapshot_s,
                    snapshot_s / step_s if step_s else math.nan,
                    self._not_before,
                )
            else:
                log.debug(
                    "lawwatch: scheduled step %d skipped to keep snapshots under max_overhead=%g "
                    "of training time; the next snapshot comes at step %d or later.",
                    step,
                    self.max_overhead,
                    self._not_before,
                )
        return False

    def spent(self, step: int, seconds: float, where: Layout) -> None:
        """A snapshot at ``step`` took ``seconds``: the earliest step for the next one.

        On several processes the largest times decide (every rank is here after every
        snapshot); a broken process group leaves the budget as it was.
        """
        if self.max_overhead is None:
            return
        try:
            snapshot_s, step_s = largest([seconds, self._step_seconds or 0.0], where)
        except Exception as error:
            log.error("lawwatch: the overhead budget could not be agreed on: %r", error)
            return
        if step_s <= 0.0:  # no training step timed yet
            return
        self._cost = (snapshot_s, step_s)
        # steps of training the snapshot's time buys, rounded up (float noise aside)
        self._not_before = step + math.ceil(snapshot_s / (self.max_overhead * step_s) - 1e-9)
