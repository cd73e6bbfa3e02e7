"""Snapshots of a chosen law, fitted for real (for alerts and trackers)."""

from __future__ import annotations

import numpy as np
import torch

from lawwatch import Snapshot, fit_law


def snap(step, log_pr, layers=None):
    """A snapshot whose log10 PR per entry is ``log_pr`` (entry 0 first), fitted for real."""
    pr = torch.tensor([10.0**v for v in log_pr], dtype=torch.float64)
    return Snapshot(
        pr=pr,
        fit=fit_law(pr, layers=layers),
        n_tokens=100,
        seconds=0.0,
        step=step,
        layers=layers,
    )


def line(slope=-0.05, entries=9, noise=0.0, seed=0, stall=None, lag=1.0):
    """log10 PR of a law with ``slope`` per layer; ``stall``: that entry lags by ``lag`` layers."""
    gen = np.random.default_rng(seed)
    values = [-0.01 + slope * (e - 1) + noise * gen.standard_normal() for e in range(entries)]
    values[0] = 0.0  # the embeddings: not part of the law
    if stall is not None:
        values[stall] -= slope * lag  # slope < 0: higher PR
    return values
