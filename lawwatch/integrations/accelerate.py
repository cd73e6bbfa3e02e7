"""🤗 Accelerate custom loops: snapshots go to the accelerator's own trackers.

A custom training loop needs three lines::

    watch = lawwatch.LawWatch(model, probe, every=500, accelerator=accelerator)
    accelerator.register_for_checkpointing(watch)  # the history survives save_state/load_state
    ...
    watch.maybe_snapshot(step)  # on every process, after each optimizer step

``LawWatch`` given an accelerator writes every snapshot through :class:`TrackerSink` (on the
main process, once ``accelerator.init_trackers`` has been called: W&B, TensorBoard, any
``GeneralTracker``) besides the sinks it was given.
"""

from __future__ import annotations

import math
from typing import Any

from lawwatch.measure import Snapshot

PREFIX = "lawwatch/"


def tracker_values(snapshot: Snapshot, prefix: str = PREFIX) -> dict[str, float | int]:
    """A snapshot as flat scalars, the form every accelerate tracker takes.

    Keys: ``{prefix}rho``, ``pearson_r``, ``slope``, ``intercept``, ``r2``, ``n_tokens``,
    ``seconds``, numeric ``extra`` fields, and ``{prefix}pr/NN`` for hidden-state entry ``NN``
    (``00`` = embeddings; zero-padded so dashboards sort them by depth). Non-finite fit values
    are left out (several trackers refuse NaN).
    """
    values: dict[str, float | int] = {}
    fields = {**snapshot.fit.as_dict(), "n_tokens": snapshot.n_tokens, "seconds": snapshot.seconds}
    fields.update({k: v for k, v in snapshot.extra.items() if isinstance(v, int | float)})
    for name, value in fields.items():
        if isinstance(value, bool) or not math.isfinite(value):
            continue
        values[prefix + name] = value
    width = max(len(str(snapshot.layers[-1])), 2)
    for entry, pr in zip(snapshot.layers, snapshot.pr.tolist(), strict=True):
        values[f"{prefix}pr/{entry:0{width}d}"] = pr
    return values


class TrackerSink:
    """Writes snapshots through ``accelerator.log`` (its trackers, main process only).

    Does nothing while the accelerator has no tracker (``init_trackers`` not called, or
    ``log_with`` unset), so it can always be attached.

    Args:
        accelerator: The ``accelerate.Accelerator`` of the training run.
        prefix: Prepended to every key.
    """

    def __init__(self, accelerator: Any, prefix: str = PREFIX) -> None:
        self.accelerator = accelerator
        self.prefix = prefix

    def write(self, snapshot: Snapshot) -> None:
        """Log the snapshot's scalars at its training step."""
        if not getattr(self.accelerator, "trackers", None):
            return
        self.accelerator.log(tracker_values(snapshot, self.prefix), step=snapshot.step)

    def close(self) -> None:
        """Nothing to release: ``accelerator.end_training()`` finishes the trackers."""
