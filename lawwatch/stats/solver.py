"""The least-squares solve behind a prediction residual, for a batch of entries.

Owns the rank rule (``DEFAULT_RTOL``) and the two paths that apply it; the statistics call
:func:`explained_sum_of_squares`. For one entry, OLS with intercept explains ``E = bᵀ G⁺ b`` of
the target's sum of squares, where ``G`` is the centered Gram of the features (``d × d``) and
``b`` the centered cross term (``d × K``; ``bᵀ G⁺ b`` is summed over the ``K`` outputs).
:class:`~lawwatch.stats.residual.ResidualStats` turns it into ``PR = 1 - E / TSS``. Only this
number is needed, not eigenvectors, so the solve can be a Cholesky factorization (``d³/3``
flops) instead of an eigendecomposition (~9 d³, at a lower flop rate); BENCHMARKS.md ("The
solve") has the measured ratio.

**Scaling.** ``G`` is scaled to unit diagonal (a correlation matrix ``C = S G S``, ``b → S b``);
the least-squares projection does not depend on column scale, and the rank decision then does
not either. A column whose centered sum of squares is under ``64 * eps`` of its sum of squares
about the shift is constant up to rounding and is dropped as dead.

**Rank rule.** Directions of the (standardized) coefficient space whose Rayleigh quotient on
``C`` is below ``cut = rtol * λ_max(C)`` are dropped, and the target is projected onto the span
of the rest. Default ``rtol = 1e-11``, i.e. singular values of the standardized design under
~3e-6 of the largest. Why this value: the float64 Gram's noise floor is about ``d * eps``
relative (under 2e-12 even at d = 8192), so exact null directions are cut; genuine directions of
real features (tested down to ~6e-11 after a massive-activation LayerNorm) are kept; directions
holding only float32 rounding noise (singular value ~1e-7 of the largest, eigenvalue ~1e-14) are
dropped, where ``numpy.linalg.lstsq`` at machine precision keeps them and fits noise (an error
~1/n in PR). bf16 rounding noise (~1e-3) cannot be told from signal by any tolerance: compute
normalized features in float64.

Two paths apply the rule:

* **Eigendecomposition (the reference, ``method="eigh"``).** ``C = V Λ Vᵀ``; eigenvectors with
  ``λ < cut`` are dropped (the pseudo-inverse with a relative eigenvalue cutoff). It handles any
  spectrum, at several times the cost (BENCHMARKS.md).
* **Cholesky (the fast path, ``method="auto"``).** A LayerNorm output always has an exact null
  direction (its features sum to zero for every token), so a plain Cholesky of ``C`` would break
  down; the fast path takes one column out first. Let ``j`` be the live column with the largest
  variance (for a LayerNorm with unit weight the null direction is proportional to the column
  standard deviations, so ``j`` is its largest component: removing it removes the null
  direction) and ``A`` the correlation matrix of the other columns, ``c`` their correlations
  with column ``j``. ``A = R Rᵀ`` is factored, and the entry stays on this path only if:

  1. ``λ_min(A) ≥ 10 * rtol * ‖C‖_F`` (the factorization succeeded; the smallest squared pivot
     and two steps of block inverse iteration from random starts, both upper bounds on
     ``λ_min(A)`` and tight for an isolated small eigenvalue, pass). As ``‖C‖_F ≥ λ_max``, by
     eigenvalue interlacing every eigenvalue of ``C`` but the smallest is then at least ten
     times the cut: the eigen rule keeps them all, and the only candidate for the cut is the
     dependency of column ``j`` on the others, ``q = (-A⁻¹c, 1)``.
  2. Its Rayleigh quotient ``μ = z / (1 + |A⁻¹c|²)`` (``z = 1 - cᵀA⁻¹c``, column ``j``'s
     residual variance given the others) is decidable against the cut: ``μ < rtol`` (below the
     cut, as ``λ_max ≥ 1`` for a correlation matrix) drops ``q`` and the target is projected
     onto the other columns; ``μ ≥ rtol * ‖C‖_F`` (above the cut) keeps it: the exact inverse,
     through the Schur complement ``z``.

  As ``μ ≥ λ_min(C)``, a drop here is a drop for the eigen rule too. A keep can differ from it
  only if ``λ_min(C) < cut ≤ μ``; ``μ`` exceeds ``λ_min(C)`` by at most ``μ² |A⁻¹c|² /
  (λ_2 - μ)`` (Temple's bound), so only within a band of relative width ``μ |A⁻¹c|² / λ_min(A)
  ≤ |A⁻¹c|² / 10`` above the cut, where any tolerance is arbitrary. The result is always the
  exact least-squares projection onto a set of columns. Where both paths drop the direction,
  the fast path removes column ``j``'s residual given the others and the eigen path the exact
  eigenvector; the two differ by the small tilt between them (bounded in
  ``tests/test_solver.py`` for a direction at 1e-15 of ``λ_max`` that carries target signal;
  0 for an exact null direction).

The fast path is used for every entry that passes both checks. The others go to the
eigendecomposition: two or more (near-)dependent directions (duplicated or linearly dependent
columns, several exact null directions), a genuine direction within a factor ``10 ‖C‖_F / λ_max``
of the cut, or ``μ`` between ``rtol`` and ``rtol * ‖C‖_F``. So the rule applied is the eigen
rule wherever the fast path cannot show that it makes the same decision.

**Memory.** ``C`` is built in one ``(entries, d, d)`` buffer, or over the caller's scratch Gram
(``overwrite``), made exactly symmetric (its upper triangle is copied below, so both paths see
the same matrix to the bit), factored in place (panels of 96 columns: ``O(96 d)`` temporaries).
An entry for the eigen path is done alone, in its own ``(d, d)`` slot: ``C`` is rebuilt there
from the strict upper triangle and the diagonal kept aside, and LAPACK writes the eigenvectors
over it (the transpose of a symmetric row-major matrix is the column-major one it wants), so its
only other ``(d, d)`` memory is ``syevd``'s workspace, about ``2 d²`` float64.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

log = logging.getLogger(__name__)

Method = Literal["auto", "eigh"]
METHODS: tuple[str, ...] = ("auto", "eigh")

DEFAULT_RTOL = 1e-11
GUARD = 10.0  # the fast path needs λ_min(A) >= GUARD * rtol * ‖C‖_F
_EPS = torch.finfo(torch.float64).eps
_BLOCK = 4  # start vectors of the inverse iteration
_INVERSE_STEPS = 2  # block inverse iteration for λ_min(A)
_PANEL = 96  # columns per block of the Cholesky factorization (64–256 measured: 96 fastest)
_CACHE_ELEMENTS = 2**17  # ~1 MB of float64: a row block of C built while it sits in cache
_OUTPUT_CHUNKS = 8  # one-hot: the solve's workspace is ~1/8 of the cross term per copy


@dataclass(frozen=True)
class Solution:
    """Explained sums of squares of a batch of entries, and how each was solved.

    Attributes:
        explained: ``(entries,)`` float64 ``bᵀ G⁺ b`` (summed over outputs).
        eigh: ``(entries,)`` bool, True where the eigendecomposition solved the entry.
    """

    explained: torch.Tensor
    eigh: torch.Tensor


def explained_sum_of_squares(
    sum_uu: torch.Tensor,
    sum_u: torch.Tensor,
    count: torch.Tensor | float,
    cross: Callable[[slice], torch.Tensor],
    num_outputs: int,
    *,
    rtol: float = DEFAULT_RTOL,
    method: Method = "auto",
    overwrite: bool = False,
) -> Solution:
    """``bᵀ G⁺ b`` for every entry, under the rank rule of :mod:`lawwatch.stats.solver`.

    Args:
        sum_uu: ``(entries, d, d)`` float64 Gram ``Σuuᵀ`` of the features about a shift (not
            modified; only its upper triangle, diagonal included, is read). The centered
            Gram is ``G = Σuuᵀ - Σu Σuᵀ / n``.
        sum_u: ``(entries, d)`` the shifted features' sums ``Σu``.
        count: ``n``.
        cross: ``cross(part)`` returns the ``(entries, d, k)`` centered cross term ``b`` for
            the outputs ``part`` (a slice of ``range(num_outputs)``); called once per chunk
            of outputs, so a one-hot ``b`` is never copied whole.
        num_outputs: ``K``.
        rtol: Relative eigenvalue tolerance of the rank rule.
        method: ``"auto"`` (Cholesky fast path, eigendecomposition where it cannot be used)
            or ``"eigh"`` (the eigendecomposition for every entry).
        overwrite: ``sum_uu`` is the caller's scratch: the solve's matrices are built over it
            (no ``(entries, d, d)`` allocation; its values are lost).

    Returns:
        The explained sums of squares and which entries the eigendecomposition solved.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown solve method {method!r}; choose one of {METHODS}.")
    entries, device = sum_uu.shape[0], sum_uu.device
    raw = sum_uu.diagonal(dim1=1, dim2=2)  # (entries, d)
    var = raw - sum_u * sum_u / count  # the centered diagonal
    alive = var > 64 * _EPS * raw
    scale = torch.where(alive, var.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    # C (dead rows and columns 0), over sum_uu if it may be overwritten
    corr, frobenius = _correlation(sum_uu, sum_u, float(count), scale, overwrite)

    fast = None
    if method == "auto":
        fast = _Cholesky(corr, alive, var, frobenius, rtol)
        use_eigh = ~fast.ok
    else:
        use_eigh = torch.ones(entries, dtype=torch.bool)
    explained = torch.zeros(entries, dtype=torch.float64, device=device)
    chunk = max(1, -(-num_outputs // _OUTPUT_CHUNKS)) if num_outputs > 1 else 1
    if fast is not None and bool(fast.ok.any()):
        for start in range(0, num_outputs, chunk):
            b = cross(slice(start, start + chunk)) * scale.unsqueeze(2)  # (entries, d, k)
            explained += torch.where(fast.ok.to(device), fast.explained(b), 0.0)
    eigh_index = use_eigh.nonzero().flatten().tolist()
    if eigh_index and fast is not None:
        log.debug("lawwatch solve: entries %s use the eigendecomposition", eigh_index)
    # the eigen path one entry at a time, in that entry's own (d, d) slot: its factor is not
    # needed, C is rebuilt there from the strict upper triangle, and the eigenvectors are
    # written over it (LAPACK's workspace, ~2 d² for syevd, is the only other (d, d) memory)
    for e in eigh_index:
        c = corr[e]  # (d, d)
        if fast is not None:
            fast.restore_(e)
        inv, vectors = _eigh_in_place(c, rtol)
        for start in range(0, num_outputs, chunk):
            b = cross(slice(start, start + chunk))[e] * scale[e].unsqueeze(1)  # (d, k)
            proj = vectors.transpose(0, 1) @ b  # (d, k)
            explained[e] += (inv.unsqueeze(1) * proj * proj).sum()
        del vectors
    return Solution(explained, use_eigh.to(device))


def _correlation(
    sum_uu: torch.Tensor,
    sum_u: torch.Tensor,
    count: float,
    scale: torch.Tensor,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``C = S (Σuuᵀ - Σu Σuᵀ / n) S`` and its Frobenius norm, in one pass over memory.

    Reads the upper triangle (diagonal included) of ``sum_uu`` only, builds ``C``'s, and
    copies it below. On CPU the rows are built a cache-sized block at a time, so the three
    elementwise steps and the norm read the block from cache; on other devices in one go.
    """
    entries, d = sum_uu.shape[0], sum_uu.shape[1]
    corr = sum_uu if overwrite else torch.empty_like(sum_uu)  # each block read before written
    mean = sum_u * scale  # (entries, d): the scaled sums
    squares = torch.zeros(entries, dtype=sum_uu.dtype, device=sum_uu.device)
    step = max(1, _CACHE_ELEMENTS // (entries * d)) if sum_uu.device.type == "cpu" else d
    for lo in range(0, d, step):
        hi = min(lo + step, d)
        rows = slice(lo, hi)
        block = corr[:, rows, lo:]  # (entries, rows, d - lo) view: the rows' upper part
        torch.mul(sum_uu[:, rows, lo:], scale[:, rows].unsqueeze(2), out=block)
        block.mul_(scale[:, lo:].unsqueeze(1))
        block.addcmul_(mean[:, rows].unsqueeze(2), mean[:, lo:].unsqueeze(1), value=-1.0 / count)
        # ‖C‖²: the strict upper triangle twice, the diagonal once
        square = block[:, :, : hi - lo]  # (entries, rows, rows): the diagonal block
        squares += 2.0 * block[:, :, hi - lo :].square().sum(dim=(1, 2))
        squares += 2.0 * square.triu(1).square().sum(dim=(1, 2))
        squares += square.diagonal(dim1=1, dim2=2).square().sum(dim=1)
    _upper_to_lower_(corr)
    return corr, squares.sqrt()


def _upper_to_lower_(a: torch.Tensor) -> None:
    """Make each ``(d, d)`` of ``a`` exactly symmetric: its upper triangle copied below.

    ``C_ij`` and ``C_ji`` are computed in different orders and can differ in the last bit;
    with one exact ``C`` the fast path's copy of it and the eigen path's agree to the bit
    (a direction near the cut is sensitive to it). A panel at a time, no ``(d, d)``
    temporary.
    """
    d = a.shape[-1]
    for lo in range(0, d, _PANEL):
        hi = min(lo + _PANEL, d)
        a[..., lo:hi, :lo] = a[..., :lo, lo:hi].transpose(-1, -2)
        block = a[..., lo:hi, lo:hi]
        upper = block.triu(1)
        block.copy_(upper + upper.transpose(-1, -2) + torch.diag_embed(block.diagonal(0, -2, -1)))


def _eigh_in_place(c: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path for one entry: ``C = V Λ Vᵀ``, eigenvalues under the cut dropped.

    ``c`` (``(d, d)``, symmetric) is overwritten with the eigenvectors: LAPACK works on a
    column-major matrix, which the transpose of a symmetric row-major one is, so no copy is
    made. Returns the inverted kept eigenvalues ``(d,)`` (0 for dropped ones) and ``V`` (a
    view of ``c``'s memory; column ``i`` is eigenvector ``i``).
    """
    vectors = c.transpose(0, 1)  # column-major view: the same symmetric matrix
    evals = torch.empty(c.shape[0], dtype=c.dtype, device=c.device)
    torch.linalg.eigh(vectors, out=(evals, vectors))  # ascending
    keep = evals > rtol * evals[-1:].clamp_min(0.0)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)  # (d,)
    return inv, vectors


class _Cholesky:
    """The fast path: Cholesky of ``C`` without its largest-variance column, plus a border.

    Decides per entry whether the path applies (``ok``) and, if so, whether the removed
    column is kept (``keep``). The factor is written over the lower triangle of ``corr``; its
    strict upper triangle still holds ``C`` (restored where the factoring changed it), from
    which :meth:`restore_` rebuilds ``C`` in place for the entries the eigen path takes.
    """

    def __init__(
        self,
        corr: torch.Tensor,
        alive: torch.Tensor,
        var: torch.Tensor,
        frobenius: torch.Tensor,
        rtol: float,
    ) -> None:
        entries, d = corr.shape[0], corr.shape[1]
        device = corr.device
        rows = torch.arange(entries, device=device)
        # the column taken out: the live one of largest variance (dead columns have var ~ 0)
        last = torch.where(alive, var, -1.0).argmax(dim=1)  # (entries,)
        self.rows, self.last, self.alive = rows, last, alive
        column = corr[rows, :, last].clone()  # (entries, d), its own diagonal is 1
        self.diagonal = corr.diagonal(dim1=1, dim2=2).clone()  # (entries, d): C's, for restore_
        # A: C with row and column `last` replaced by a unit vector, dead columns by unit
        # vectors too (their rows and columns are already 0): the same inverse on the rest
        corr[rows, last, :] = 0.0
        corr[rows, :, last] = 0.0
        diagonal = corr.diagonal(dim1=1, dim2=2)
        diagonal[rows, last] = 1.0
        diagonal.masked_fill_(~alive, 1.0)
        failed = _cholesky_lower_(corr)  # lower triangle of corr := R, A = R Rᵀ
        self.factor = corr
        # the strict upper triangle of row and column `last`, zeroed above, holds C again
        index = torch.arange(d, device=device)
        above = index.unsqueeze(0) > last.unsqueeze(1)  # (entries, d): j > last
        corr[rows, last, :] = torch.where(above, column, corr[rows, last, :])
        below = index.unsqueeze(0) < last.unsqueeze(1)
        corr[rows, :, last] = torch.where(below, column, corr[rows, :, last])

        # border: A⁻¹c and the Schur complement z of the removed column, solved together
        # with the first step of the inverse iteration (one pass over R each way)
        c = column
        c[rows, last] = 0.0
        start = torch.randn(
            entries, d, _BLOCK, generator=_generator(device), dtype=corr.dtype, device=device
        )
        start = start / start.norm(dim=1, keepdim=True)
        forward = torch.linalg.solve_triangular(
            corr, torch.cat([c.unsqueeze(2), start], dim=2), upper=False
        )  # R⁻¹[c, Y]
        solved = _back(corr, forward)  # A⁻¹[c, Y]: (entries, d, 1 + _BLOCK)
        self.w = solved[:, :, :1]  # A⁻¹c
        self.z = 1.0 - forward[:, :, 0].square().sum(dim=1)  # (entries,)
        mu = self.z / (1.0 + self.w.square().sum(dim=(1, 2)))  # Rayleigh quotient of q
        y = solved[:, :, 1:]
        growth = y.norm(dim=1)  # (entries, block): |A⁻¹y| <= 1 / λ_min for |y| = 1
        for _ in range(_INVERSE_STEPS - 1):
            y = y / growth.unsqueeze(1)
            y = _back(corr, torch.linalg.solve_triangular(corr, y, upper=False))  # A⁻¹y
            growth = y.norm(dim=1)
        pivots = corr.diagonal(dim1=1, dim2=2).square().amin(dim=1)  # >= λ_min(A)
        smallest = torch.minimum(pivots, 1.0 / growth.amax(dim=1))  # both upper bounds

        high = rtol * frobenius  # >= the cut rtol·λ_max; rtol itself is <= it (λ_max >= 1)
        ok = ~failed & (smallest >= GUARD * high)
        ok &= (mu < rtol) | (mu >= high)  # else μ may lie on either side of the cut
        self.keep = alive[rows, last] & (mu >= high)
        self.ok = (ok & torch.isfinite(mu) & torch.isfinite(smallest)).cpu()  # host sync

    def restore_(self, entry: int) -> None:
        """Rebuild ``C`` of ``entry`` in place of its factor, from the strict upper triangle.

        For an entry the eigen path takes (its factor is no longer needed); no ``(d, d)``
        temporary (the lower triangle is copied from the upper one a panel at a time).
        """
        a = self.factor[entry]  # (d, d)
        _upper_to_lower_(a)
        a.diagonal().copy_(self.diagonal[entry])  # C's own (1 up to rounding; 0 if dead)

    def explained(self, b: torch.Tensor) -> torch.Tensor:
        """``bᵀ C⁺ b`` under the decision taken: ``|R⁻¹b_A|²`` plus the border's share."""
        b = b.clone()
        b_last = b[self.rows, self.last, :]  # (entries, k)
        b[self.rows, self.last, :] = 0.0  # b_A
        s = torch.linalg.solve_triangular(self.factor, b, upper=False)  # R⁻¹ b_A
        total = s.square().sum(dim=(1, 2))
        t = b_last - (self.w.transpose(1, 2) @ b).squeeze(1)  # b_last - cᵀA⁻¹b_A: (entries, k)
        z = torch.where(self.keep, self.z, 1.0)
        return total + torch.where(self.keep, t.square().sum(dim=1) / z, 0.0)


def _cholesky_lower_(a: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of each symmetric ``a`` written over its lower triangle, in place.

    Blocked, left-looking: block column ``j`` is updated by one matrix product with the
    finished columns to its left, its diagonal block factored, the rest solved against it.
    Only the lower triangle is read or written, so the strict upper triangle keeps ``a``.
    This runs at matrix-product speed (on CPU about twice LAPACK's ``potrf`` through torch).

    Returns:
        ``(entries,)`` bool: True where a diagonal block was not positive definite (that
        entry's factor is then meaningless, but finite).
    """
    entries, d = a.shape[0], a.shape[1]
    failed = torch.zeros(entries, dtype=torch.bool, device=a.device)
    eye = torch.eye(min(_PANEL, d), dtype=a.dtype, device=a.device)
    for j in range(0, d, _PANEL):
        jb = min(_PANEL, d - j)
        panel = a[:, j:, j : j + jb]  # (e, d - j, jb): still the original lower part
        if j > 0:
            left = a[:, j:, :j]  # finished factor columns, rows j..d
            panel = torch.baddbmm(panel, left, left[:, :jb].transpose(1, 2), alpha=-1.0)
        diag, info = torch.linalg.cholesky_ex(panel[:, :jb])  # reads the lower triangle
        bad = info != 0
        failed |= bad
        diag = torch.where(bad.view(-1, 1, 1), eye[:jb, :jb], diag)
        block = a[:, j : j + jb, j : j + jb]
        block.copy_(diag + block.triu(1))  # the factor below the diagonal, ``a`` above
        if j + jb < d:  # rows below the block: X Rⱼⱼᵀ = panel
            a[:, j + jb :, j : j + jb] = torch.linalg.solve_triangular(
                diag.transpose(1, 2), panel[:, jb:], upper=True, left=False
            )
    return failed


def _back(factor: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``R⁻ᵀ y`` (``torch.cholesky_solve`` is several times slower on CPU than two of these)."""
    return torch.linalg.solve_triangular(factor.transpose(1, 2), y, upper=True)


def _generator(device: torch.device) -> torch.Generator:
    """A fixed seed: the inverse iteration's start vectors, hence the results, reproducible."""
    return torch.Generator(device=device).manual_seed(0x5EED)
