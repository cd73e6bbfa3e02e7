"""An independent float64 numpy reference of the residual stream's vital signs.

Computed from every row of an entry at once (two-pass central moments, no shift, no sums
carried between chunks), as the definitions in ``lawwatch/stats/health.py``'s docstring read.
"""

from __future__ import annotations

import math

import numpy as np

CONSTANT_RTOL = 2.0**-40
MASSIVE_K = 4


def vital_signs(x: np.ndarray) -> dict:
    """The vital signs of one entry's ``(n, d)`` rows."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    nonfinite = int((~np.isfinite(x)).sum())
    nan = math.nan
    if n == 0 or nonfinite:  # undefined: no examples, or a non-finite value among them
        share = nan if n == 0 else nonfinite / x.size
        return {"rms": nan, "max_abs": nan, "kurtosis": nan, "nonfinite": share, "constant": 0}
    with np.errstate(all="ignore"):  # a feature of zeros: 0/0 in no ratio used
        mean = x.mean(axis=0)
        c = x - mean
        m2 = (c**2).mean(axis=0)
        m4 = (c**4).mean(axis=0)
        square = (x**2).mean(axis=0)
        spread = (m2 > 0) & (np.sqrt(m2) > CONSTANT_RTOL * np.sqrt(square))
        kurt = m4[spread] / m2[spread] ** 2 - 3
        mean_abs = np.abs(x).mean(axis=0)
        order = sorted(range(d), key=lambda j: -mean_abs[j])[:MASSIVE_K]
        return {
            "rms": math.sqrt(float((x**2).mean())),
            "max_abs": float(np.abs(x).max()),
            "kurtosis": float(kurt.mean()) if spread.any() else math.nan,
            "nonfinite": nonfinite / x.size,
            "constant": int(d - spread.sum()),
            "massive": [[j, float(mean_abs[j])] for j in order],
        }


def stack(entries: list[np.ndarray]) -> dict:
    """A record's ``health`` field (per-entry lists) from each entry's rows."""
    signs = [vital_signs(x) for x in entries]
    out = {key: [s[key] for s in signs] for key in ("rms", "max_abs", "kurtosis", "nonfinite")}
    out["constant"] = [s["constant"] for s in signs]
    out["massive"] = [s.get("massive", []) for s in signs]
    out["examples"] = entries[0].shape[0] if entries else 0
    return out


def close(a: float, b: float, rtol: float) -> bool:
    """Equal within ``rtol`` (relative, absolute below 1), NaN equal to NaN, Inf to Inf."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(1.0, abs(b))


def assert_matches(got: dict, want: dict, *, rtol: float = 1e-10, krtol: float = 1e-8) -> None:
    """Every vital sign of ``got`` (a record's ``health``) against ``want`` (:func:`stack`)."""
    assert got["examples"] == want["examples"]
    for key, tol in (("rms", rtol), ("max_abs", rtol), ("kurtosis", krtol), ("nonfinite", 0.0)):
        assert len(got[key]) == len(want[key]), key
        for i, (a, b) in enumerate(zip(got[key], want[key], strict=True)):
            assert close(a, b, tol), f"{key}[{i}]: {a!r} vs reference {b!r}"
    assert got["constant"] == want["constant"]
    for i, (a, b) in enumerate(zip(got["massive"], want["massive"], strict=True)):
        assert [j for j, _ in a] == [j for j, _ in b], f"massive[{i}]: {a} vs {b}"
        for (_, va), (_, vb) in zip(a, b, strict=True):
            assert close(va, vb, rtol), f"massive[{i}]: {a} vs {b}"
