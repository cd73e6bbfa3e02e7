"""When the monitor measures: the schedule of steps, and the overhead budget that thins it.

:class:`Schedule` is the default (log-spaced, then periodic); :func:`planned` turns a
:class:`~lawwatch.watch.config.WatchConfig` into the predicate the monitor asks. :class:`Budget`
keeps snapshots under ``max_overhead`` of training time: it measures the first snapshot and a
few training steps, then *decides* once which scheduled steps are measured (a minimum gap
between them), from times every process agrees on. The decision is kept in the monitor's state,
so a resumed run measures the steps its first pass measured, whatever its own timings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    """The overhead budget, decided once: the scheduled steps at least ``gap`` steps apart.

    The first snapshot (the *origin*) gives a snapshot's cost ``S``; the next
    :data:`TIMED_STEPS` training steps (nothing is measured there, unless checkpointed or final)
    give a step's ``T``. At the call that completes them the budget decides, once, the gap
    ``g = ceil(S / (max_overhead · T))``: from then on, a scheduled step is measured when it is
    at least ``g`` steps after the previous one of the chain (the scheduled steps kept greedily
    from the origin; a pure function of the origin, ``g`` and the schedule). Each snapshot of
    the chain is thus followed by at least ``S / max_overhead`` of training time. What a run
    pays on top, and says once when decided (:meth:`decide`): the final step's snapshot and
    the checkpointed steps' (the monitor measures both whatever the budget says).

    :meth:`called` and :meth:`returned` tell the time at each of the monitor's calls (the time
    between a return and the next call is training), :meth:`spent` each snapshot's duration.
    :meth:`state_dict` / :meth:`load_state_dict` keep the decision in the monitor's state.

    Args:
        max_overhead: The monitor's share of training time, in (0, 1), or None: no budget.
        schedule: The scheduled steps (the predicate the monitor asks).
    """

    TIMED_STEPS = 3
    """Training steps timed after the first snapshot before the schedule is decided."""

    def __init__(self, max_overhead: float | None, schedule: Callable[[int], bool]) -> None:
        self.max_overhead, self.schedule = max_overhead, schedule
        self.origin: int | None = None  # the first snapshot's step: the chain starts there
        self.snapshot_seconds: float | None = None  # that snapshot's duration
        self.decided_at: int | None = None  # the step at which the gap was decided
        self.gap: int | None = None  # the decided minimum gap between budgeted snapshots
        self.step_seconds: float | None = None  # the training step time the gap was decided on
        self._timed: tuple[int, float] = (0, 0.0)  # training steps timed, and their seconds
        self._returned: tuple[int, float] | None = None  # (step, time) of the last return
        self._chain: tuple[int, int] | None = None  # (next step to look at, last kept step)

    @property
    def decided(self) -> bool:
        """Whether the gap is decided (always, without a budget)."""
        return self.max_overhead is None or self.gap is not None

    def called(self, step: int, now: float) -> None:
        """A call at ``step``: the training steps since the last return are timed."""
        if self.decided or self.origin is None or self._returned is None:
            return
        last, then = self._returned
        if step > last:
            steps, seconds = self._timed
            self._timed = (steps + step - last, seconds + now - then)

    def returned(self, step: int, now: float) -> None:
        """The monitor's call (or snapshot) at ``step`` returns: training resumes."""
        self._returned = (step, now)

    def spent(self, step: int, seconds: float) -> None:
        """A snapshot at ``step`` took ``seconds``: the first one is the origin and its cost."""
        if self.origin is None:
            self.origin, self.snapshot_seconds = step, seconds

    def ready(self) -> bool:
        """Whether the gap is due to be decided now (the same on every process)."""
        return not self.decided and self.origin is not None and self._timed[0] >= self.TIMED_STEPS

    def decide(self, step: int, where: Layout) -> str | None:
        """Decide the gap at ``step``, once: the sentence that announces it, or None.

        On several processes the largest snapshot and step times decide (one 2-element
        all-reduce, at a step every process reaches together); if that fails, every scheduled
        step is measured (gap 1) and the failure is logged.
        """
        steps, seconds = self._timed
        try:
            snapshot_s, step_s = largest([self.snapshot_seconds or 0.0, seconds / steps], where)
        except Exception as error:
            log.error("lawwatch: the overhead budget could not be agreed on: %r", error)
            snapshot_s, step_s = math.nan, math.nan
        self.decided_at, self.snapshot_seconds, self.step_seconds = step, snapshot_s, step_s
        if not (step_s > 0.0 and math.isfinite(snapshot_s)):
            self.gap = 1
            return None
        # the steps of training a snapshot's time buys, rounded up (float noise aside)
        self.gap = max(1, math.ceil(snapshot_s / (self.max_overhead * step_s) - 1e-9))
        return self.announcement()

    def announcement(self) -> str:
        """The decision in one sentence: the costs, the gap, what is measured on top."""
        snapshot_s, step_s = self.snapshot_seconds, self.step_seconds
        if self.gap == 1:
            return (
                f"lawwatch: a snapshot takes {snapshot_s:.2f} s ({snapshot_s / step_s:.1f} "
                f"training steps of {step_s:.3g} s), within max_overhead={self.max_overhead:g} "
                f"of training time: every scheduled step from step {self.decided_at} is "
                "measured."
            )
        return (
            f"lawwatch: a snapshot takes {snapshot_s:.2f} s ({snapshot_s / step_s:.1f} training "
            f"steps of {step_s:.3g} s); to keep snapshots under max_overhead="
            f"{self.max_overhead:g} of training time, the scheduled steps measured from step "
            f"{self.decided_at} are at least {self.gap} steps apart, counted from step "
            f"{self.origin}; checkpointed steps on the schedule and the final step are measured "
            "on top. Decided once (a resumed run measures the same steps). To measure every "
            "scheduled step pass max_overhead=None, or a larger fraction."
        )

    def allows(self, step: int) -> bool:
        """Whether the budget measures the scheduled ``step``.

        Before any snapshot: yes (it becomes the origin). While the steps after the origin are
        timed: no. Once decided: the steps of the chain from the decision on.
        """
        if self.max_overhead is None or self.origin is None:
            return True
        if self.gap is None or self.decided_at is None:
            return False
        return step >= self.decided_at and self._on_chain(step)

    def _on_chain(self, step: int) -> bool:
        """Whether ``step`` is kept by the greedy chain of scheduled steps from the origin."""
        assert self.origin is not None and self.gap is not None
        if step <= self.origin:
            return step == self.origin
        if self._chain is None or step < self._chain[0]:  # from the start (e.g. after a resume)
            self._chain = (self.origin + 1, self.origin)
        cursor, kept = self._chain
        while cursor <= step:
            if cursor >= kept + self.gap and self.schedule(cursor):
                kept = cursor
            cursor += 1
        self._chain = (cursor, kept)
        return kept == step

    def state_dict(self) -> dict[str, Any] | None:
        """The decision (plain values), or None while nothing is decided."""
        if self.max_overhead is None or self.origin is None:
            return None
        return {
            "origin": self.origin,
            "snapshot_seconds": self.snapshot_seconds,
            "decided_at": self.decided_at,
            "gap": self.gap,
            "step_seconds": self.step_seconds,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a decision (None: nothing decided; the resumed run decides)."""
        self._timed, self._chain = (0, 0.0), None
        if not state or self.max_overhead is None:
            self.origin = self.snapshot_seconds = self.decided_at = self.gap = None
            self.step_seconds = None
            return
        self.origin, self.snapshot_seconds = state.get("origin"), state.get("snapshot_seconds")
        self.decided_at, self.gap = state.get("decided_at"), state.get("gap")
        self.step_seconds = state.get("step_seconds")
