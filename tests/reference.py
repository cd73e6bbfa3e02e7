"""Independent float64 references the library is checked against (numpy, no lawwatch code)."""

from __future__ import annotations

import numpy as np


def ols_pr(x: np.ndarray, y: np.ndarray, rcond: float | None = None) -> float:
    """PR = RSS / TSS of OLS with intercept, via numpy.linalg.lstsq in float64.

    ``y`` is (n,) for a scalar target or (n, K) for a multi-output one.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    design = np.hstack([x, np.ones((x.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=rcond)
    resid = y - design @ coef
    centered = y - y.mean(axis=0)
    return float((resid**2).sum() / (centered**2).sum())


def onehot(ids: np.ndarray) -> np.ndarray:
    """(n,) ids -> (n, K) indicator over the distinct ids present."""
    distinct, index = np.unique(ids, return_inverse=True)
    out = np.zeros((ids.shape[0], distinct.shape[0]))
    out[np.arange(ids.shape[0]), index] = 1.0
    return out


def layer_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Freshly initialized LayerNorm (weight 1, bias 0) over the last axis."""
    x = x - x.mean(axis=-1, keepdims=True)
    return x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps)


def line_fit(pr: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept, pearson r) of log10 PR against 0..L-1 (entry 0 already dropped)."""
    y = np.log10(pr)
    x = np.arange(y.shape[0], dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    r = np.corrcoef(x, y)[0, 1]
    return float(slope), float(intercept), float(r)
