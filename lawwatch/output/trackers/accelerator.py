"""An accelerate loop's trackers as one lawwatch sink, looked up at each snapshot."""

from __future__ import annotations

import logging
from typing import Any

from lawwatch.alerts import Alert, Alerting
from lawwatch.history import Snapshot
from lawwatch.output.sinks import Sink, scalars
from lawwatch.output.trackers.base import TRACKERS, Tracker
from lawwatch.output.trackers.opening import TrainerRun

log = logging.getLogger("lawwatch")


def accelerate_tracker(name: str, tracker: Any, run: TrainerRun | None = None) -> Sink | None:
    """The sink on an accelerate tracker's object (:meth:`Tracker.on_accelerate`), or None.

    None for a tracker lawwatch has no class for (its own ``log`` gets the scalars).
    """
    cls: type[Tracker] | None = TRACKERS.get(name)
    return None if cls is None else cls.on_accelerate(tracker, run or TrainerRun())


class AcceleratorTrackers:
    """The accelerator's trackers as lawwatch sinks (main process only), at the training step.

    Each tracker gets the sink of :mod:`lawwatch.output.trackers` made on its object
    (``accelerator.get_tracker(name, unwrap=True)``: the classes the Trainer callback uses, see
    :meth:`Tracker.on_accelerate <lawwatch.output.trackers.Tracker.on_accelerate>`); a tracker
    lawwatch has no class for gets :func:`~lawwatch.output.sinks.scalars` through its own
    ``log(values, step=step)``. Trackers are looked up at each snapshot and alert, so
    ``init_trackers`` may come after the watch; until then this does nothing. A tracker that
    fails is reported, the others still get the snapshot.

    Args:
        accelerator: The ``accelerate.Accelerator`` of the training run.
        run: What the sinks attach with (the emergence threshold for W&B's summary).
    """

    def __init__(self, accelerator: Any, run: TrainerRun | None = None) -> None:
        self.accelerator = accelerator
        self.run = run or TrainerRun()
        self.sinks: dict[str, Sink | None] = {}  # tracker name -> its sink (None: its own log)

    def _trackers(self) -> list[Any]:
        trackers = list(getattr(self.accelerator, "trackers", None) or [])
        for tracker in trackers:
            if tracker.name not in self.sinks:
                try:
                    unwrapped = self.accelerator.get_tracker(tracker.name, unwrap=True)
                    self.sinks[tracker.name] = accelerate_tracker(tracker.name, unwrapped, self.run)
                except Exception:
                    log.exception("lawwatch: not logging to %s", tracker.name)
                    self.sinks[tracker.name] = None
        return trackers

    def write(self, snapshot: Snapshot) -> None:
        """Log the snapshot to every tracker at its training step."""
        for tracker in self._trackers():
            try:
                sink = self.sinks[tracker.name]
                if sink is not None:
                    sink.write(snapshot)
                else:
                    tracker.log(scalars(snapshot), step=snapshot.step)
            except Exception:
                log.exception("lawwatch: tracker %s failed at step %s", tracker.name, snapshot.step)

    def alert(self, alert: Alert) -> None:
        """Pass the alert to each tracker that has alerts (W&B, trackio)."""
        self._trackers()
        for sink in self.sinks.values():
            if isinstance(sink, Alerting):
                sink.alert(alert)

    def close(self) -> None:
        """Nothing to release: ``accelerator.end_training()`` finishes the trackers."""
