"""lawwatch: watch the law of equi-learning emerge while a language model trains.

He & Su, "A Law of Next-Token Prediction in Large Language Models" (arXiv 2408.13442): the
prediction residual of a linear probe for the next token falls geometrically with depth in a
trained LLM. lawwatch measures it exactly, cheaply and repeatedly during training.
"""

from lawwatch.config import MeasureConfig
from lawwatch.history import History, Snapshot
from lawwatch.law import LawFit, emergence_step, fit_law
from lawwatch.measurement import measure
from lawwatch.norms import NormSpec
from lawwatch.output.sinks import scalars
from lawwatch.probe import ProbeSet
from lawwatch.stats.residual import ResidualStats, prediction_residuals
from lawwatch.watch.config import WatchConfig
from lawwatch.watch.monitor import LawWatch
from lawwatch.watch.schedule import Schedule

__version__ = "0.1.0"

__all__ = [
    "History",
    "LawFit",
    "LawWatch",
    "LawWatchCallback",
    "MeasureConfig",
    "NormSpec",
    "ProbeSet",
    "ResidualStats",
    "Schedule",
    "Snapshot",
    "WatchConfig",
    "emergence_step",
    "fit_law",
    "measure",
    "prediction_residuals",
    "scalars",
]


def __getattr__(name: str) -> object:
    # the Trainer callback pulls in transformers' training stack (~1 s): load it on first use
    if name == "LawWatchCallback":
        from lawwatch.integrations.hf import LawWatchCallback

        return LawWatchCallback
    raise AttributeError(f"module 'lawwatch' has no attribute {name!r}")
