"""A Lightning run's loggers (``trainer.loggers``, ``fabric.loggers``) as lawwatch sinks.

A logger whose class lawwatch has a tracker for gets that tracker's sink on its run
(:meth:`Tracker.on_lightning <lawwatch.output.trackers.Tracker.on_lightning>`): ``WandbLogger``,
``TensorBoardLogger``, ``MLFlowLogger`` and ``CometLogger`` are matched by their class's name
(``<Name>Logger`` is the tracker ``name``, subclasses included). Any other logger (``CSVLogger``,
Neptune, a logger of your own) gets :func:`~lawwatch.output.sinks.scalars` through its own
``log_metrics(metrics, step)`` and ``save()``, the calls Lightning itself makes of every logger.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, ClassVar

from lawwatch.history import Snapshot
from lawwatch.output.sinks import Sink, scalars
from lawwatch.output.trackers.base import TRACKERS, Tracker
from lawwatch.output.trackers.opening import TrainerRun

log = logging.getLogger("lawwatch")

_SUFFIX = "Logger"


def tracker_class(logger: Any) -> type[Tracker] | None:
    """The tracker class of a Lightning logger (``WandbLogger`` -> ``"wandb"``), or None."""
    for cls in type(logger).__mro__:
        if cls.__name__.endswith(_SUFFIX):
            found = TRACKERS.get(cls.__name__.removesuffix(_SUFFIX).lower())
            if found is not None:
                return found
    return None


class LoggerSink(Tracker):
    """Snapshots into any Lightning logger: ``log_metrics(scalars, step)``, then ``save()``.

    Args:
        logger: A Lightning (or Fabric) logger.
        history: Records to replay first (a resumed run).
    """

    name = "lightning_logger"
    names: ClassVar[tuple[str, ...]] = ()  # reached through a logger, never by name

    def __init__(self, logger: Any, *, history: Iterable[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.logger = logger
        self.replay(history)

    def _log(self, snapshot: Snapshot, record: dict[str, Any]) -> None:
        self.logger.log_metrics(scalars(snapshot), step=record["step"])
        save = getattr(self.logger, "save", None)
        if callable(save):  # CSVLogger writes its file here
            save()


def lightning_trackers(loggers: Iterable[Any], run: TrainerRun | None = None) -> list[Sink]:
    """A sink for each logger (main process: the loggers' runs exist only there).

    A logger that cannot be attached is reported and skipped; the others still get the law.
    """
    run = run or TrainerRun()
    sinks: list[Sink] = []
    for logger in loggers:
        cls = tracker_class(logger)
        try:
            sinks.append(LoggerSink(logger) if cls is None else cls.on_lightning(logger, run))
        except Exception:
            log.exception("lawwatch: not logging to %s", type(logger).__name__)
    return sinks
