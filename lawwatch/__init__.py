"""lawwatch: watch the law of equi-learning emerge while a language model trains.

He & Su, "A Law of Next-Token Prediction in Large Language Models" (arXiv 2408.13442): the
prediction residual of a linear probe for the next token falls geometrically with depth in a
trained LLM. lawwatch measures it exactly, cheaply and repeatedly during training.

The top level holds what a user types; each concept's own package holds the rest:
:mod:`lawwatch.stats` (the statistics and their solve), :mod:`lawwatch.watch` (the monitor's
schedule, budget and worker), :mod:`lawwatch.output` (sinks, the history store, trackers),
:mod:`lawwatch.probe` (building probes), :mod:`lawwatch.integrations` (Trainer, accelerate).
"""

from lawwatch._version import __version__
from lawwatch.config import MeasureConfig
from lawwatch.history import History, Snapshot
from lawwatch.law import LawFit, fit_law
from lawwatch.measurement import measure, measure_lens
from lawwatch.norms import NormSpec
from lawwatch.output.store import read_history
from lawwatch.probe import ProbeSet
from lawwatch.watch.config import WatchConfig
from lawwatch.watch.monitor import LawWatch

__all__ = [
    "AcceleratorWatch",
    "Alerts",
    "History",
    "LawFit",
    "LawWatch",
    "LawWatchCallback",
    "MeasureConfig",
    "NormSpec",
    "ProbeSet",
    "Snapshot",
    "WatchConfig",
    "__version__",
    "fit_law",
    "measure",
    "measure_lens",
    "read_history",
]

# loaded on first use: the Trainer callback pulls in transformers' training stack (~1 s)
_LAZY = {
    "LawWatchCallback": "lawwatch.integrations.hf",
    "AcceleratorWatch": "lawwatch.integrations.accelerate",
    "Alerts": "lawwatch.alerts",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lawwatch' has no attribute {name!r}")
