"""Out-of-sample prediction residual: fit OLS on one part of the probe, score it on another.

In-sample PR is biased low: OLS with ``d`` features and an intercept fitted to ``n`` examples
explains, on pure noise, an expected ``R² ≈ d / (n - 1)`` of the target's variance, so PR of a
layer that knows nothing is about ``1 - d/n`` rather than 1. With ``split=`` the probe's
sequences are divided into a fit part A and an evaluation part B (see
:mod:`lawwatch.stats.partition`) and

    ``PR_out = Σ_{i∈B} ‖y_i − a − Bᵀx_i‖² / Σ_{i∈B} ‖y_i − ȳ_B‖²``

where ``(a, B)`` are part A's OLS intercept and coefficients (the least-squares solution under
the rank rule of :mod:`lawwatch.stats.solver`: the minimum-norm solution in correlation-scaled
coordinates, eigenvalues of part A's correlation matrix below ``rtol · λ_max`` dropped) and
``ȳ_B`` is part B's own mean. Everything comes from the two parts' sufficient statistics, in
float64: with part B's Gram ``G_B``, cross term ``b_B`` and target scatter ``g_B`` centered
about part B's means and ``m = (ȳ_B − ȳ_A) − Bᵀ(x̄_B − x̄_A)`` the mean residual,

    ``RSS_B = Σ_k [ g_Bk − 2 B_kᵀ b_Bk + B_kᵀ G_B B_k + n_B m_k² ]``.

The mean differences are formed from the shifts' difference plus the parts' shifted means, so a
massive-activation feature loses no precision. Where part A's features are rank deficient in a
way part B shares (a LayerNorm's null direction, dead or duplicated columns) every
least-squares solution predicts B alike and ``PR_out`` is unique; otherwise it is that of the
minimum-norm solution. The solve is an eigendecomposition per entry (about ``9 d³`` flops: a
few times the in-sample Cholesky path's cost).
"""

from __future__ import annotations

import torch

from lawwatch.stats.residual import ResidualStats

__all__ = ["out_of_sample_pr"]

_EPS = torch.finfo(torch.float64).eps


def _centered(stats: ResidualStats, part: slice) -> tuple[torch.Tensor, ...]:
    """Part ``part``'s centered Gram (l, d, d), cross term (l, d, K) and shifted means."""
    n = stats.count
    sx = stats.sum_x[part]  # (l, d)
    gram = stats.sum_xx[part] - sx.unsqueeze(2) * sx.unsqueeze(1) / n
    cross = stats.sum_xy[part] - sx.unsqueeze(2) * (stats.sum_y / n).view(1, 1, -1)
    return gram, cross, sx / n, stats.sum_y / n


def out_of_sample_pr(fit: ResidualStats, evaluate: ResidualStats) -> torch.Tensor:
    """``RSS / TSS`` of part ``evaluate`` under part ``fit``'s OLS solution, per entry.

    Args:
        fit: Statistics of the fit part (any shift).
        evaluate: Statistics of the evaluation part: same entries, dimension, target and
            classes (any shift).

    Returns:
        ``(entries,)`` float64 out-of-sample prediction residuals, on ``fit``'s device.

    Raises:
        ValueError: Incompatible statistics, a part with too few examples (the fit part needs
            ``n > d + 1``), or an evaluation part whose target does not vary.
    """
    fit._check_compatible(evaluate)
    evaluate = evaluate.clone().to(fit.device)
    fit._check_solvable()
    n_b = evaluate.count
    if n_b.item() < 2:  # host sync
        raise ValueError(
            f"The evaluation part holds {int(n_b.item())} examples; it needs at least 2 (use "
            "a larger split or more probe sequences)."
        )
    g_y = evaluate.sum_yy - evaluate.sum_y * evaluate.sum_y / n_b  # (K,)
    tss = g_y.sum()
    if tss.item() <= _EPS * evaluate.sum_yy.sum().item():  # host sync
        raise ValueError(
            "The evaluation part's targets take a single value (TSS = 0): PR is undefined; "
            "use a larger split or more probe sequences."
        )
    # mean of B minus mean of A, shift difference first (no cancellation of large means)
    dx = evaluate.shift_x - fit.shift_x + evaluate.sum_x / n_b - fit.sum_x / fit.count  # (L, d)
    dy = evaluate.shift_y - fit.shift_y + evaluate.sum_y / n_b - fit.sum_y / fit.count  # (K,)
    out = []
    for part in fit._entry_groups(4 * fit.dim * (fit.dim + fit.num_outputs) * 8):
        gram_a, cross_a, _, _ = _centered(fit, part)
        raw = fit.sum_xx[part].diagonal(dim1=1, dim2=2)  # (l, d)
        var = gram_a.diagonal(dim1=1, dim2=2)
        alive = var > 64 * _EPS * raw  # the solver's dead-column rule
        scale = torch.where(alive, var.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
        corr = gram_a * scale.unsqueeze(2) * scale.unsqueeze(1)  # (l, d, d)
        evals, evecs = torch.linalg.eigh(corr)
        keep = evals > fit.rtol * evals[:, -1:].clamp_min(0.0)
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)  # (l, d)
        proj = evecs.transpose(1, 2) @ (cross_a * scale.unsqueeze(2))  # (l, d, K)
        coef = scale.unsqueeze(2) * (evecs @ (inv.unsqueeze(2) * proj))  # (l, d, K) raw units
        gram_b, cross_b, _, _ = _centered(evaluate, part)
        mean_resid = dy.view(1, -1) - (coef * dx[part].unsqueeze(2)).sum(dim=1)  # (l, K)
        rss = (
            g_y.sum()
            - 2.0 * (coef * cross_b).sum(dim=(1, 2))
            + (coef * (gram_b @ coef)).sum(dim=(1, 2))
            + n_b * mean_resid.square().sum(dim=1)
        )
        out.append(rss / tss)
    return torch.cat(out)
