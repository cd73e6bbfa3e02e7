"""lawwatch: watch the law of equi-learning emerge while a language model trains.

He & Su, "A Law of Next-Token Prediction in Large Language Models" (arXiv 2408.13442): the
prediction residual of a linear probe for the next token falls geometrically with depth in a
trained LLM. lawwatch measures it exactly, cheaply and repeatedly during training.
"""

from lawwatch.law import LawFit, emergence_step, fit_law
from lawwatch.measure import Snapshot, measure
from lawwatch.norms import NormSpec
from lawwatch.probe import ProbeSet
from lawwatch.residual import ResidualStats, prediction_residuals

__version__ = "0.1.0"

__all__ = [
    "LawFit",
    "NormSpec",
    "ProbeSet",
    "ResidualStats",
    "Snapshot",
    "emergence_step",
    "fit_law",
    "measure",
    "prediction_residuals",
]
