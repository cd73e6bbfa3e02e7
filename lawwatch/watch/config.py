"""WatchConfig: the monitor's settings (when to measure, at what cost, what counts as emerged).

:class:`~lawwatch.watch.monitor.LawWatch`, :class:`~lawwatch.integrations.hf.LawWatchCallback`,
:class:`~lawwatch.integrations.accelerate.AcceleratorWatch` and the recipes' YAML (the
``lawwatch:`` section) take a :class:`WatchConfig`; their keyword arguments build one, routed
next to the measurement's (:func:`build_configs`). Each field's docstring is its documentation;
every value is checked once, when the config is built.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from lawwatch.config import MeasureConfig, Options
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD

__all__ = ["DEFAULT_MAX_OVERHEAD", "WatchConfig", "build_configs", "check_every"]

DEFAULT_MAX_OVERHEAD = 0.1
"""The default overhead budget (``WatchConfig.max_overhead``): a tenth of training time."""

ScheduleSpec = Collection[int] | Callable[[int], bool] | None


def _is_step(value: Any) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_every(every: Any) -> None:
    """Refuse a snapshot period that is not a positive int (shared with ``Schedule``).

    Raises:
        TypeError: Not an int (a bool or a float included).
        ValueError: Below 1.
    """
    if not _is_step(every):
        raise TypeError(f"every must be a whole number of steps (an int), got {every!r}.")
    if every < 1:
        raise ValueError(f"every must be a positive number of steps, got {every}.")


@dataclass(frozen=True)
class WatchConfig(Options):
    """When the monitor measures, at what cost, and what counts as the law having emerged.

    Immutable; derive variants with :meth:`replace`. Invalid values are refused when the config
    is built, with the fix, so a bad setting fails before training starts.
    """

    _what: ClassVar[str] = "monitor settings"
    _argument: ClassVar[str] = "watch"

    every: int = 100
    """Snapshot period once past the log-spaced start: step 0, the powers of two below
    ``every``, then every ``every`` steps (:class:`~lawwatch.watch.schedule.Schedule`). The law
    emerges early in training, so the early snapshots matter."""
    schedule: ScheduleSpec = None
    """Instead of ``every``'s schedule: a collection of steps (kept sorted, without repeats) or
    a predicate ``step -> bool``. The final step (``last_step``) is measured in any case."""
    last_step: int | None = None
    """The final training step, always measured when reached. The Trainer callback takes the
    Trainer's ``max_steps`` when it is not given."""
    emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD
    """Pearson r (of log10 PR against depth) at or below which the law counts as emerged: the
    emergence step, the alerts, the plot's line and the trackers' summary use it."""
    max_overhead: float | None = DEFAULT_MAX_OVERHEAD
    """A budget for the monitor's share of training time, decided once
    (:class:`~lawwatch.watch.schedule.Budget`): the first snapshot's time ``S`` and the next 3
    training steps' time ``T`` (the largest over the processes: one 2-element all-reduce) give
    a gap ``g = ceil(S / (max_overhead · T))``; from the 3rd timed step on, the scheduled steps
    measured are those at least ``g`` apart, counted from the first snapshot's step (the 3
    timed steps are not measured). The decision is said once on the main process (the console
    line, else a WARNING on the ``"lawwatch"`` logger) and kept in :meth:`LawWatch.state_dict
    <lawwatch.watch.monitor.LawWatch.state_dict>` (the Trainer callback: in each checkpoint's
    Trainer state), so a resumed run measures the steps its first pass measured. What a run
    pays: the budgeted snapshots, at most ``max_overhead`` of training time, plus the first
    snapshot and the final step's (measured in any case), plus each checkpointed scheduled
    step the budget would skip (``maybe_snapshot(step, checkpoint=True)``; the callback passes
    the Trainer's saves): a run shorter than ``2·S / (max_overhead · T)`` steps pays more
    than ``max_overhead``. With ``background`` ``S`` is what training waited for (the
    forwards and the collectives). None: no budget (every scheduled step)."""
    background: bool = False
    """Run the solve, the law's fit and the writing of the thread-safe sinks (the local
    history) on one worker thread, so training waits only for the probe's forwards and the
    statistics' reduction. The record of a snapshot taken at step s says step s and is the same
    as without it (only ``seconds``, the time training waited, may differ); it reaches the
    history and the trackers on the training thread a few steps later: on one process at the
    first call after its solve has finished; on several, at the first call at or after step s +
    ``background_lag``. Before the next snapshot, and in ``flush``, ``close`` and
    ``state_dict``, every pending result is collected (on several processes these are
    collective: call them on every process). The statistics (entries · d² · 8 bytes) stay
    allocated until their solve is done: worth it where the solve is a noticeable share of a
    training step (large d, a slow float64 device). A failing solve or sink in the worker is
    logged and training goes on."""
    background_lag: int = 4
    """On several processes, the steps after a background snapshot at which its PRs are
    gathered (a step every process agrees on without communicating; waits for the solve if it
    is not done)."""

    console: bool = True
    """Print one line per snapshot on the main process (``lawwatch step 200: r = -0.982 ±
    0.006, rho = 0.71, 1.4 s``; :class:`~lawwatch.output.console.ConsoleSink`), through
    ``tqdm.write`` while a progress bar is open. False: no line (trackers and files only)."""

    step_key: str | None = None
    """The key of the training step in lawwatch's tracker rows, the x-axis of its charts (W&B:
    the ``step_metric`` of ``lawwatch/*``). A raw loop that logs its loss to W&B with its own
    step key (``wandb.log({"train/step": step, "loss": loss})``) names it here, so lawwatch's
    curves and the loss share one axis. None: ``train/global_step`` (the Trainer's, which the
    callback follows). W&B can say no run's defined step metric, so it is not guessed."""

    def __post_init__(self) -> None:
        check_every(self.every)
        if self.step_key is not None and (not isinstance(self.step_key, str) or not self.step_key):
            raise TypeError(
                f"step_key is the name of your loop's step in the tracker rows (e.g. "
                f"'train/step'), or None, got {self.step_key!r}."
            )
        if self.schedule is not None and not callable(self.schedule):
            object.__setattr__(self, "schedule", _steps(self.schedule))
        if self.last_step is not None and (not _is_step(self.last_step) or self.last_step < 0):
            raise ValueError(
                f"last_step is the final training step (an int >= 0) or None, got "
                f"{self.last_step!r}."
            )
        threshold = self.emergence_threshold
        if not _is_real(threshold):
            raise TypeError(f"emergence_threshold is a number (a Pearson r), got {threshold!r}.")
        if not math.isfinite(threshold) or not -1 <= threshold <= 1:
            raise ValueError(
                f"emergence_threshold is a Pearson r in [-1, 1] (default "
                f"{DEFAULT_EMERGENCE_THRESHOLD}: log10 PR falls with depth almost on a line), got "
                f"{threshold!r}."
            )
        if self.max_overhead is not None and not (
            _is_real(self.max_overhead) and 0.0 < self.max_overhead < 1.0
        ):
            raise ValueError(
                f"max_overhead is a fraction of training time in (0, 1) (0.02: 2%), or None for "
                f"no budget, got {self.max_overhead!r}."
            )
        if not isinstance(self.console, bool):
            raise TypeError(f"console is True or False, got {self.console!r}.")
        if not isinstance(self.background, bool):
            raise TypeError(f"background is True or False, got {self.background!r}.")
        if not _is_step(self.background_lag):
            raise TypeError(f"background_lag is a number of steps, got {self.background_lag!r}.")
        if self.background_lag < 1:
            raise ValueError(f"background_lag must be at least 1 step, got {self.background_lag}.")


def _steps(schedule: Any) -> tuple[int, ...]:
    """A collection of steps, sorted and without repeats; refuses anything else."""
    if _is_step(schedule):
        raise TypeError(
            f"schedule={schedule!r} is one number: for a period use every={schedule}, for that "
            f"one step schedule=[{schedule}]."
        )
    if isinstance(schedule, str | bytes) or not isinstance(schedule, Iterable):
        raise TypeError(
            f"schedule must be a collection of steps (e.g. [0, 10, 100]) or a predicate "
            f"step -> bool, got {schedule!r}."
        )
    steps = list(schedule)
    if not all(_is_step(s) for s in steps):
        bad = [s for s in steps if not _is_step(s)][:5]
        raise TypeError(f"schedule's steps must be ints (>= 0), got {bad!r} among them.")
    if any(s < 0 for s in steps):
        raise ValueError(f"schedule's steps must be >= 0, got {[s for s in steps if s < 0][:5]}.")
    return tuple(sorted({int(s) for s in steps}))


def build_configs(
    config: MeasureConfig | None, watch: WatchConfig | None, **options: Any
) -> tuple[MeasureConfig, WatchConfig]:
    """``config`` and ``watch`` with ``options`` overriding their fields, each routed by name.

    Raises:
        TypeError: A name that is a field of neither (both lists are given), or a config of
            the wrong type.
        ValueError: An invalid value (see the field's documentation).
    """
    measuring, watching = MeasureConfig.names(), WatchConfig.names()
    unknown = sorted(set(options) - set(measuring) - set(watching))
    if unknown:
        raise TypeError(
            f"Unknown measurement options {unknown}; the options are the fields of "
            f"lawwatch.MeasureConfig: {list(measuring)}, and the monitor's settings those of "
            f"lawwatch.WatchConfig: {list(watching)}."
        )
    return (
        MeasureConfig.build(config, **{k: v for k, v in options.items() if k in measuring}),
        WatchConfig.build(watch, **{k: v for k, v in options.items() if k in watching}),
    )
