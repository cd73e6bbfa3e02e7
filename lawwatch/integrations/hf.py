"""LawWatchCallback: the law of equi-learning, measured live inside a Hugging Face ``Trainer``.

A thin adapter around :class:`lawwatch.monitor.LawWatch`: it decides *when* (step 0 before any
update, the schedule after each optimizer step, the final step) and *where* results go (local
history always; the Trainer's own W&B run when ``report_to`` includes ``"wandb"``; a PNG of the
law at train end). Every process measures (the probe is sharded and the statistics reduced);
only the main process writes. Nothing here may stop training: a failure is logged to the
``"lawwatch"`` logger and training goes on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lawwatch.config import MeasureConfig
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
from lawwatch.monitor import LawWatch, Schedule
from lawwatch.probe import ProbeSet
from lawwatch.sinks import LocalHistory, Sink, Sinks, WandbSink

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
    each measures its shard of the probe), and the final step (``state.max_steps``, or
    ``state.global_step`` at ``on_train_end`` when training stops early).

    Written by the main process:

    - ``<output_dir>/lawwatch/history.jsonl`` and ``pr.safetensors`` (see
      :class:`lawwatch.sinks.LocalHistory`), and ``law.png`` at train end
      (:func:`lawwatch.report.plot_law`, when matplotlib is installed);
    - with ``"wandb"`` in ``args.report_to``: the scalars, table, chart and summary of
      :class:`lawwatch.sinks.WandbSink`, in the run the Trainer's ``WandbCallback`` created
      (it runs first: the Trainer puts its reporting callbacks before the user's).

    Resume (``trainer.train(resume_from_checkpoint=...)``): the local history is the record.
    Records after the checkpoint's step are dropped (they are measured again), a fresh W&B run
    is given the history up to the checkpoint, and a resumed W&B run is not sent a step twice.
    A run started from step 0 replaces any history left in the directory. A history measured
    with another probe, other options or at another precision is not continued: it is moved to
    ``<directory>/series-<n>/`` and a new series starts (with a warning). Two callbacks never
    share a directory: the second one's local history is refused (logged), so give each its own
    ``directory=``.

    Args:
        probe: The held-out probe set.
        config: The measurement options (default: the paper's protocol), see
            :class:`~lawwatch.config.MeasureConfig`.
        every: Snapshot period after the log-spaced start (see
            :class:`lawwatch.monitor.Schedule`).
        schedule: Instead of the default: a predicate ``step -> bool`` or a collection of
            steps. Step 0 and the final step are measured in any case.
        directory: Where the local files go. Default: ``<args.output_dir>/lawwatch``.
        sinks: More sinks for every snapshot (main process only), e.g. a live display.
        emergence_threshold: r at or below which the law counts as emerged.
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` overriding ``config``'s
            (``batch_size``, ``target``, ``layers``, …).

    Raises:
        TypeError: An option that is not a field of MeasureConfig, or a probe that is not a
            :class:`~lawwatch.ProbeSet`.
        ValueError: An invalid option value or schedule period, or an empty probe.

    Attributes:
        monitor: The :class:`lawwatch.monitor.LawWatch` of the current ``train()`` call.
        directory: Where the local files are (set at train begin on the main process).
        report_path: The PNG written at train end, if any.
        wandb: The W&B sink, when logging to W&B.
    """

    def __init__(
        self,
        probe: ProbeSet,
        config: MeasureConfig | None = None,
        *,
        every: int = 100,
        schedule: Callable[[int], bool] | Iterable[int] | None = None,
        directory: str | Path | None = None,
        sinks: list[Sink] | None = None,
        emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
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
        Schedule(every)  # validates every
        self.config = MeasureConfig.build(config, **options)
        self.probe, self.every, self.schedule = probe, every, schedule
        self.emergence_threshold = emergence_threshold
        self.extra_sinks = list(sinks or [])
        self._directory = None if directory is None else Path(directory)
        self.monitor: LawWatch | None = None
        self.directory: Path | None = None
        self.local: LocalHistory | None = None
        self.wandb: WandbSink | None = None
        self.report_path: Path | None = None

    @property
    def emergence_step(self) -> int | None:
        """First step from which r stays at or below the threshold (main process)."""
        return None if self.monitor is None else self.monitor.emergence_step

    # -- Trainer events -----------------------------------------------------------------------

    @_never_raises
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Open the sinks (main process), restore a resumed history, measure step 0."""
        if self.local is not None:  # a previous train() that ended without on_train_end
            self.local.close()
        self.monitor, self.local, self.wandb, self.report_path = None, None, None, None
        start = state.global_step  # > 0 when resuming from a checkpoint
        self.monitor = LawWatch(
            kwargs["model"],
            self.probe,
            self.config,
            every=self.every,
            schedule=self.schedule,
            last_step=state.max_steps or None,
            emergence_threshold=self.emergence_threshold,
        )
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
        """Measure when the schedule says so (on every process)."""
        if self.monitor is not None:
            self.monitor.maybe_snapshot(state.global_step)

    @_never_raises
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Measure the final step if not yet done; write the PNG; close the sinks."""
        if self.monitor is None:
            return
        try:
            self._measure(state.global_step)
            if state.is_world_process_zero and self.local is not None and self.local.records:
                self.report_path = self._plot(self.local.records)
                if self.report_path is not None and self.wandb is not None:
                    self.wandb.log_image(self.report_path)
        finally:
            self.monitor.close()

    # -- helpers ------------------------------------------------------------------------------

    def _measure(self, step: int) -> None:
        """Measure ``step`` unless already attempted (on or off the schedule)."""
        last = self.monitor.last_step
        if last is None or step > last:
            self.monitor.snapshot(step)

    def _open_sinks(self, args: Any, start: int) -> list[Sink]:
        """The main process's sinks; one that fails to open is reported and left out."""
        sinks: list[Sink] = []
        try:
            self.directory = self._directory or Path(args.output_dir) / "lawwatch"
            # records of another probe, options or precision are set aside: a new series
            self.local = LocalHistory(self.directory, series=self._series())
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
        if "wandb" in (args.report_to or []):
            try:
                self.wandb = self._wandb_sink(self.local.records if self.local else [])
                if self.wandb is not None:
                    sinks.append(self.wandb)
            except Exception:
                log.exception("lawwatch: not logging to W&B")
        return sinks + self.extra_sinks

    def _series(self) -> dict[str, Any] | None:
        """What this run's records will say they were measured with (None: not known yet)."""
        try:
            return self.monitor.series()
        except Exception:
            return None

    def _wandb_sink(self, records: list[dict[str, Any]]) -> WandbSink | None:
        import wandb

        if wandb.run is None:
            log.warning(
                "lawwatch: report_to includes wandb but no W&B run is active; "
                "writing the local history only"
            )
            return None
        return WandbSink(wandb.run, history=records, emergence_threshold=self.emergence_threshold)

    def _plot(self, records: list[dict[str, Any]]) -> Path | None:
        try:
            from lawwatch.report import plot_law

            return plot_law(
                records, self.directory / "law.png", emergence_threshold=self.emergence_threshold
            )
        except ImportError as error:  # matplotlib is an optional dependency
            log.warning("lawwatch: no plot of the law (%s; pip install matplotlib)", error)
            return None
