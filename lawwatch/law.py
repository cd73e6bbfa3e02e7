"""The law of equi-learning: a straight line through log10 PR against depth.

He & Su (arXiv 2408.13442): drop the embedding entry, fit ``log10 PR_l = intercept + slope * x``
with ``x = l - 1`` for hidden-state entry ``l`` (so ``x = 0 … L-1`` for entries ``1 … L``), and
report the decay ratio ``rho = 10**slope`` (``PR_l ≈ rho**(l-1) * PR_1``) and the Pearson
correlation ``r`` of ``x`` and ``log10 PR``. Pretrained LLMs give ``r`` between -0.983 and -0.997.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch

DEFAULT_EMERGENCE_THRESHOLD = -0.95

EMERGENCE_SE_MULTIPLE = 1.0
"""k in the rule ``r + k · se <= threshold`` that the law's emergence step must meet: r past the
threshold by more than its standard error, so one snapshot whose r touches the threshold within
its uncertainty (r = -0.9503 ± 0.05 at -0.95) declares nothing. One standard error, not a
one-sided 95% test (about 2 with the default 8 groups): r of the same probe at later steps must
also stay at or below the threshold, which a chance crossing rarely does."""

MIN_LAW_POINTS = 4
"""The fewest entries (after the embeddings) whose fit of the law means something. r of 3
points has one degree of freedom: for values that are pure noise, |r| > 0.9 in 29% of draws
(arccos(0.9)·2/π), so r from 3 entries says little about the law; from 4 points r of noise is
uniform on [-1, 1] (|r| > 0.9 in 10%), and from 6 |r| > 0.9 in 1.5%. Fewer than 3 cannot be
fitted at all."""

FIRST_LAW_ENTRY = 1
"""The entry at ``x = 0`` of the law's line (``x = l - FIRST_LAW_ENTRY`` for entry ``l``): the
first block's output, the embeddings (entry 0) being left out. :func:`fit_law` fits with it and
:meth:`LawFit.line` draws with it."""


@dataclass(frozen=True)
class LawFit:
    """A least-squares line through ``(x, log10 PR)``.

    Attributes:
        rho: Decay ratio per layer, ``10**slope``; below 1 when PR falls with depth.
        pearson_r: Pearson correlation of ``x`` and ``log10 PR``; near -1 when the law holds.
        slope: Slope of ``log10 PR`` per layer.
        intercept: ``log10 PR`` of the line at ``x = 0`` (entry 1, the first block's output).
        r2: Coefficient of determination of the line, ``pearson_r**2``.
    """

    rho: float
    pearson_r: float
    slope: float
    intercept: float
    r2: float

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, float]) -> LawFit:
        """The fit a record (or :meth:`as_dict`) holds in its fields of the same names.

        Raises:
            KeyError: A field of the fit is missing.
        """
        return cls(**{f.name: record[f.name] for f in fields(cls)})

    def line(self, layers: Iterable[int]) -> list[float]:
        """log10 PR of the fitted line at hidden-state entries ``layers``.

        ``intercept + slope · (l - 1)`` for entry ``l`` (:data:`FIRST_LAW_ENTRY`): the line
        :func:`fit_law` fitted, at the true entry indices it was fitted on.
        """
        return [self.intercept + self.slope * (layer - FIRST_LAW_ENTRY) for layer in layers]


def fit_law(
    pr: torch.Tensor | Sequence[float],
    *,
    skip_first: bool = True,
    layers: Sequence[int] | None = None,
) -> LawFit:
    """Fit the law of equi-learning to per-layer prediction residuals.

    Args:
        pr: Prediction residuals, one per hidden-state entry (entry 0 = embeddings).
        skip_first: Drop entry 0 (the embeddings), as the paper does.
        layers: The hidden-state entry index of each value in ``pr`` when only a subset of
            entries was measured (default ``0, 1, …, len(pr)-1``); the fit uses these true
            indices, so ``rho`` stays per layer.

    Returns:
        The fitted :class:`LawFit`, computed in float64.

    Raises:
        ValueError: Fewer than 3 points remain, a PR is not finite and positive, or ``layers``
            does not match ``pr``.
    """
    y = torch.as_tensor(pr, dtype=torch.float64).detach().cpu().flatten()
    x = (
        torch.arange(y.numel(), dtype=torch.float64)
        if layers is None
        else torch.as_tensor(list(layers), dtype=torch.float64)
    )
    if x.numel() != y.numel():
        raise ValueError(f"`layers` has {x.numel()} entries but `pr` has {y.numel()}.")
    if layers is not None and not bool((x[1:] > x[:-1]).all()):
        raise ValueError(f"`layers` must be strictly increasing, got {list(layers)}.")
    if skip_first:
        x, y = x[x != 0], y[x != 0]
    if y.numel() < 3:
        raise ValueError(
            f"Fitting the law needs at least 3 layers after dropping the embeddings, got "
            f"{y.numel()}; measure a deeper model or more layers."
        )
    if not bool(torch.isfinite(y).all() and (y > 0).all()):
        raise ValueError(
            f"Every PR must be finite and positive to take log10, got {y.tolist()}; a PR of 0 "
            "means the probe has too few examples for the hidden size (interpolation)."
        )
    x = x - float(FIRST_LAW_ENTRY)
    logy = torch.log10(y)
    xc, yc = x - x.mean(), logy - logy.mean()
    sxx, syy, sxy = (xc * xc).sum(), (yc * yc).sum(), (xc * yc).sum()
    slope = sxy / sxx
    intercept = logy.mean() - slope * x.mean()
    # a perfectly flat log PR has no correlation to speak of: report r = 0
    r = sxy / (sxx * syy).sqrt() if syy > 0 else torch.zeros((), dtype=torch.float64)
    return LawFit(
        rho=float(10.0**slope),
        pearson_r=float(r),
        slope=float(slope),
        intercept=float(intercept),
        r2=float(r * r),
    )


def passes(
    r: float, se: float | None = None, threshold: float = DEFAULT_EMERGENCE_THRESHOLD
) -> bool:
    """Whether ``r`` is below ``threshold`` by more than its uncertainty.

    ``r + k · se <= threshold`` with ``k =`` :data:`EMERGENCE_SE_MULTIPLE`; without a standard
    error (no jackknife), ``r <= threshold``. A non-finite ``r`` never passes; a non-finite
    ``se`` (an undefined uncertainty) neither.
    """
    if not math.isfinite(r):
        return False
    if se is None:
        return r <= threshold
    return math.isfinite(se) and r + EMERGENCE_SE_MULTIPLE * se <= threshold


def emergence_step(
    steps: Sequence[int],
    pearson_r: Sequence[float],
    *,
    threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
    se: Sequence[float | None] | None = None,
) -> int | None:
    """The step from which ``r`` stays below ``threshold``, first passed beyond its error.

    Every snapshot from that step on has ``r <= threshold``; the step's own snapshot must also
    pass :func:`passes` (with a standard error: ``r + k · se <= threshold``,
    :data:`EMERGENCE_SE_MULTIPLE`). So emergence is never declared from a snapshot within its
    error of the threshold, and a later one within its error does not undo it.

    Args:
        steps: Training steps of the snapshots, increasing.
        pearson_r: The law's Pearson ``r`` at each step.
        threshold: Emergence threshold on ``r`` (default -0.95).
        se: The standard error of each ``r`` (the record's ``pearson_r_se``; None where a
            snapshot has none), or None for none at all.

    Returns:
        The step, or ``None`` if the latest ``r`` is above ``threshold``, or no snapshot of
        the stretch at or below it ending with the latest passes beyond its error (or there are
        none).
    """
    if len(steps) != len(pearson_r):
        raise ValueError(f"{len(steps)} steps but {len(pearson_r)} values of r.")
    errors = [None] * len(steps) if se is None else list(se)
    if len(errors) != len(steps):
        raise ValueError(f"{len(steps)} steps but {len(errors)} standard errors of r.")
    found: int | None = None
    for step, r, error in zip(reversed(steps), reversed(pearson_r), reversed(errors), strict=True):
        if not passes(r, None, threshold):
            break
        if passes(r, error, threshold):
            found = int(step)
    return found
