"""🤗 Accelerate custom loops: the monitor wired to the accelerator's trackers and local files.

A custom training loop needs three lines::

    watch = AcceleratorWatch(accelerator, model, probe, every=500, directory="run/lawwatch")
    accelerator.register_for_checkpointing(watch)  # the history survives save_state/load_state
    ...
    watch.maybe_snapshot(step)  # on every process, after each optimizer step

Every snapshot goes, on the main process, to the accelerator's trackers through
:class:`TrackerSink` (once ``accelerator.init_trackers`` has been called: W&B, TensorBoard, any
``GeneralTracker``; keys from :func:`lawwatch.scalars`) and, with ``directory``, to a
:class:`~lawwatch.sinks.LocalHistory` there, besides any sinks given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from lawwatch.config import MeasureConfig
from lawwatch.history import Snapshot
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
from lawwatch.monitor import LawWatch
from lawwatch.probe import ProbeSet
from lawwatch.sinks import LocalHistory, Sink, Sinks, scalars


class TrackerSink:
    """Writes snapshots through ``accelerator.log`` (its trackers, main process only).

    Does nothing while the accelerator has no tracker (``init_trackers`` not called, or
    ``log_with`` unset), so it can always be attached.

    Args:
        accelerator: The ``accelerate.Accelerator`` of the training run.
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def write(self, snapshot: Snapshot) -> None:
        """Log the snapshot's :func:`~lawwatch.sinks.scalars` at its training step."""
        if not getattr(self.accelerator, "trackers", None):
            return
        self.accelerator.log(scalars(snapshot), step=snapshot.step)

    def close(self) -> None:
        """Nothing to release: ``accelerator.end_training()`` finishes the trackers."""


class AcceleratorWatch(LawWatch):
    """:class:`~lawwatch.LawWatch` for an accelerate loop: its layout, trackers and files.

    Args:
        accelerator: The run's ``accelerate.Accelerator``: process layout, and the trackers
            every snapshot is logged to (main process).
        model: The model as ``accelerator.prepare`` returned it.
        probe: The full probe set; each process measures its shard.
        config: The measurement options (see :class:`~lawwatch.config.MeasureConfig`).
        directory: Where the main process keeps ``history.jsonl`` and ``pr.safetensors``
            (:class:`~lawwatch.sinks.LocalHistory`: one series, one writer); None for none.
        sinks: More sinks (main process only).
        every, schedule, last_step, emergence_threshold, unwrap: As in
            :class:`~lawwatch.LawWatch`.
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` overriding ``config``'s.
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        probe: ProbeSet,
        config: MeasureConfig | None = None,
        *,
        directory: str | Path | None = None,
        sinks: list[Sink] | None = None,
        every: int = 100,
        schedule: Callable[[int], bool] | Iterable[int] | None = None,
        last_step: int | None = None,
        emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
        unwrap: Callable[[nn.Module], nn.Module] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            model,
            probe,
            config,
            every=every,
            schedule=schedule,
            last_step=last_step,
            accelerator=accelerator,
            emergence_threshold=emergence_threshold,
            unwrap=unwrap,
            **options,
        )
        # opened once the options are known good; records of another series are set aside
        chosen: list[Sink] = []
        if accelerator.is_main_process:
            if directory is not None:
                chosen.append(LocalHistory(directory, series=self.series()))
            chosen += [TrackerSink(accelerator), *(sinks or [])]
        self.sinks = Sinks(chosen)
