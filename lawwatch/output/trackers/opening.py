"""Opening trackers by name: the registry, a Trainer's ``report_to``, a raw loop's ``trackers``.

Each tracker class registers its names and attaches itself to a run (see
:class:`~lawwatch.output.trackers.base.Tracker`); this module only resolves names to classes,
de-duplicates them (``"mlflow"`` and ``"dagshub"``, ``"comet"`` and ``"comet_ml"`` are one
class, so one sink) and says what a failure to open costs. :class:`TrainerRun` is what a sink
attaches from.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
from lawwatch.output.sinks import Sink
from lawwatch.output.trackers import (  # noqa: F401  (each class registers itself)
    clearml,
    comet,
    dvclive,
    mlflow,
    tensorboard,
    trackio,
    wandb,
)
from lawwatch.output.trackers.base import TRACKERS

log = logging.getLogger("lawwatch")


def reported_trackers(report_to: str | Sequence[str] | None) -> list[str]:
    """``TrainingArguments.report_to`` as a list of names ("all" and "none" resolved)."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names in (["none"], []):
        return []
    if names == ["all"]:
        from transformers.integrations import get_available_reporting_integrations

        return list(get_available_reporting_integrations())
    return names


@dataclass
class TrainerRun:
    """What a tracker's sink attaches from: a Trainer's run, or a loop's.

    Attributes:
        args: The ``TrainingArguments`` (None for a loop without a Trainer).
        since: A time (``time.time()``) before this training began: event files written since
            are this training's.
        dvclive_live: A ``dvclive.Live`` to log into (the one given to the Trainer's
            ``DVCLiveCallback``); None: lawwatch opens its own in ``./dvclive``.
        logging_dir: TensorBoard's directory for a loop without a Trainer (a raw loop's
            ``<directory>/tensorboard``); None: the Trainer's, or ``runs/<time>_<host>``.
        emergence_threshold: r at or below which the law counts as emerged (W&B's summary).
        step_key: The training step's key in the rows (W&B's x-axis of the lawwatch charts);
            None: the Trainer's ``train/global_step`` (``WatchConfig.step_key``).
    """

    args: Any = None
    since: float = 0.0
    dvclive_live: Any = None
    logging_dir: Path | None = None
    emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD
    step_key: str | None = None

    def tensorboard_dir(self) -> Path:
        """The Trainer's TensorBoard directory, where lawwatch's own writer writes too.

        ``TENSORBOARD_LOGGING_DIR``, else ``args.logging_dir`` (transformers before 5), else
        the ``<output_dir>/runs/<time>_<host>`` directory the Trainer's writer made for this
        training, else a new one named alike. TensorBoard reads every event file of a directory
        as one run. Without a Trainer: ``TENSORBOARD_LOGGING_DIR``, else :attr:`logging_dir`,
        else ``runs/<time>_<host>`` (``SummaryWriter``'s default).
        """
        chosen = (
            os.getenv("TENSORBOARD_LOGGING_DIR")
            or self.logging_dir
            or getattr(self.args, "logging_dir", None)
        )
        if chosen:
            return Path(chosen).expanduser()
        if self.args is None:
            return Path("runs") / f"{datetime.now():%b%d_%H-%M-%S}_{socket.gethostname()}"
        runs = Path(self.args.output_dir) / "runs"
        made = [
            events.parent
            for events in runs.glob("*/events.out.tfevents.*")
            if events.stat().st_mtime >= self.since
        ]
        if made:
            return max(made, key=lambda d: d.stat().st_mtime)
        from transformers.integrations.integration_utils import default_logdir

        return Path(self.args.output_dir) / default_logdir()


def check_trackers(trackers: Sequence[str | Sink] | None) -> list[str | Sink]:
    """A raw loop's ``trackers``, checked before anything opens: names known, sinks sinks.

    Raises:
        TypeError: ``trackers`` not a list, or an item neither a name nor a sink.
        ValueError: A name lawwatch has no tracker for.
    """
    if trackers is None:
        return []
    if isinstance(trackers, str | bytes) or not isinstance(trackers, Sequence):
        raise TypeError(
            f"trackers must be a list of tracker names or sinks, got {trackers!r}; "
            'e.g. trackers=["tensorboard"].'
        )
    for item in trackers:
        if isinstance(item, str):
            if item not in TRACKERS:
                raise ValueError(
                    f"trackers: unknown tracker {item!r}; choose from {sorted(TRACKERS)}."
                )
        elif not all(callable(getattr(item, verb, None)) for verb in ("write", "close")):
            raise TypeError(
                f"trackers: {item!r} is neither a tracker name ({sorted(TRACKERS)}) nor a sink "
                "(an object with write(snapshot) and close(), see lawwatch.output.sinks.Sink)."
            )
    return list(trackers)


def open_trackers(
    trackers: Sequence[str | Sink], run: TrainerRun | None = None, *, strict: bool = True
) -> dict[str, Sink]:
    """The sinks of ``trackers`` (main process): each name on its current run, sinks as given.

    Each name opens its class's sink with :meth:`Tracker.current
    <lawwatch.output.trackers.Tracker.current>`, one sink per tracker class (``"mlflow"`` and
    ``"dagshub"`` share MLflow's run).

    Args:
        trackers: Names and sinks (a raw loop's, checked by :func:`check_trackers`, or a
            Trainer's ``report_to``).
        run: What the sinks attach from (default: a loop without a Trainer).
        strict: Raise when a tracker cannot be opened (a raw loop, where the user builds the
            monitor); otherwise the failure is logged and the others still open (a Trainer's
            ``report_to``, inside its training). A name lawwatch has no class for is skipped.

    Returns:
        Name (a sink's class name for a sink given) -> its sink, in the order given.

    Raises:
        LookupError: ``strict``: a tracker has no current run; the message says how to start one.
        ImportError: ``strict``: a tracker's package is not installed.
    """
    run = run or TrainerRun()
    opened: dict[str, Sink] = {}
    for item in trackers:
        if not isinstance(item, str):
            opened[f"{type(item).__name__}#{len(opened)}"] = item
            continue
        cls = TRACKERS.get(item)
        if cls is None:
            log.debug("lawwatch: %s has no lawwatch sink; not logging to it", item)
            continue
        if cls.names[0] in opened:
            continue  # one class, one run: "mlflow" and "dagshub", "comet" and "comet_ml"
        try:
            opened[cls.names[0]] = cls.current(run)
        except (LookupError, ImportError) as error:
            if not strict:
                log.warning("lawwatch: %s; not logging to %s", error, item)
                continue
            if isinstance(error, LookupError):
                raise LookupError(f"trackers includes {item!r}, but {error}") from None
            why = f"its package is not installed ({error})"
            raise ImportError(f"trackers includes {item!r}, but {why}") from error
        except Exception:
            if strict:
                raise
            log.exception("lawwatch: not logging to %s", item)
    return opened
