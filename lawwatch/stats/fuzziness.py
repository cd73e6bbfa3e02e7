"""Separation fuzziness: He & Su's alternative to PR, from streaming per-class statistics.

For the features ``x_i`` of one entry and the classes ``c`` of their target ids (the next token
by default; with ``onehot_top_k`` the rarer ids pooled in one class),

    ``SS_w = (1/n) Σ_c Σ_{i∈c} (x_i − x̄_c)(x_i − x̄_c)ᵀ``,
    ``SS_b = (1/n) Σ_c n_c (x̄_c − x̄)(x̄_c − x̄)ᵀ``,
    ``SF = Tr(SS_w · SS_b⁺)``.

Small SF means classes well separated relative to their spread. The one-hot statistics of
:class:`~lawwatch.stats.residual.ResidualStats` hold everything: per-class counts ``n_c`` (``Σy``)
and feature sums (``Σx yᵀ``), and the total scatter from ``Σxxᵀ``. With ``b_c = Σ_{i∈c}(x_i − x̄)``
(the centered cross term) and ``M = [b_c / √n_c]``, ``n·SS_b = M Mᵀ`` and
``n·SS_w = n·SS_total − M Mᵀ`` (the scatter decomposes exactly); the factors ``n`` cancel in
the product.

**Rank rule of the pseudo-inverse.** ``SS_b`` has rank at most ``min(d, classes − 1)`` (the
``b_c`` sum to zero). ``SS_b = V Λ Vᵀ``; eigenvalues at or below ``rtol · λ_max`` (the
measurement's ``rtol``, default 1e-11) are dropped, the rest inverted:
``SF = Σ_{λ_j > cut} v_jᵀ SS_w v_j / λ_j``. The structural null directions have eigenvalues at
the float64 noise floor (~1e-16 of ``λ_max``) and are always dropped. SF is computed in the raw
feature coordinates (it is not invariant to rescaling features when ``SS_b`` is singular).
Precision: ``SS_w`` along ``v_j`` is a difference of total and between-class scatter, so the
absolute error of each term is about ``eps`` times its total-scatter part (``≲ 1e-15 ×
rank`` in SF on the normalized features measured here).
"""

from __future__ import annotations

import torch

from lawwatch.stats.residual import ResidualStats

__all__ = ["separation_fuzziness"]


def separation_fuzziness(stats: ResidualStats) -> torch.Tensor:
    """``Tr(SS_w SS_b⁺)`` of every entry of one-hot statistics.

    Args:
        stats: Statistics with ``target="onehot"`` (the classes are the one-hot classes).

    Returns:
        ``(entries,)`` float64 separation fuzziness, on the statistics' device.

    Raises:
        ValueError: Statistics without per-class sums, no examples, or all examples in one
            class (``SS_b = 0``).
    """
    if stats.target != "onehot":
        raise ValueError(
            "Separation fuzziness needs per-class sums: statistics with target='onehot'."
        )
    n = stats.count
    counts = stats.sum_y  # (K,) examples per class (shift_y is 0 for one-hot)
    if n.item() == 0 or int((counts > 0).sum().item()) < 2:  # host sync
        raise ValueError(
            "Separation fuzziness needs examples of at least two target classes; use a longer "
            "probe."
        )
    weight = torch.where(counts > 0, counts.clamp_min(1.0).rsqrt(), 0.0)  # (K,) 1/√n_c
    out = []
    for part in stats._entry_groups(4 * stats.dim * (stats.dim + stats.num_outputs) * 8):
        sx = stats.sum_x[part]  # (l, d)
        total = stats.sum_xx[part] - sx.unsqueeze(2) * sx.unsqueeze(1) / n  # n·SS_total
        centered = stats.sum_xy[part] - sx.unsqueeze(2) * (counts / n).view(1, 1, -1)  # b_c
        m = centered * weight.view(1, 1, -1)  # (l, d, K)
        between = m @ m.transpose(1, 2)  # (l, d, d) n·SS_b
        within = total - between  # n·SS_w
        evals, evecs = torch.linalg.eigh(between)
        keep = evals > stats.rtol * evals[:, -1:].clamp_min(0.0)
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)  # (l, d)
        spread = (evecs * (within @ evecs)).sum(dim=1)  # (l, d): v_jᵀ W v_j
        out.append((spread * inv).sum(dim=1))
    return torch.cat(out)
