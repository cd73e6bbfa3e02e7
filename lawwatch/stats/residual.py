"""Prediction residuals from additive sufficient statistics: the plain measurement's statistics.

Owns :class:`ResidualStats` (accumulation, merging, the distributed phases, the solve through
:mod:`lawwatch.stats.solver`) and :func:`prediction_residuals`; the streamed update of one
batch is :mod:`lawwatch.stats.update`'s. The prediction residual of layer ``l`` is
``PR_l = 1 - R^2`` of an ordinary least-squares fit, *with intercept*, of a target on that
layer's features (He & Su, arXiv 2408.13442). Everything OLS needs is a handful of sums over
examples, so a probe of any size streams through with memory independent of its length, and
statistics from several processes merge with one all-reduce (or a reduce to the process that
solves each entry).

Numerics (see docs/protocol.md §2):

* **Shifted accumulation.** Sums are taken about a per-layer shift (the mean of the first batch),
  not about zero, so a feature whose mean dwarfs its spread (a massive-activation dimension)
  does not lose its variance to cancellation in ``Σxxᵀ - ΣxΣxᵀ/n``. Statistics with different
  shifts are re-based exactly before they are added.
* **Precision.** Every sum is float64. With ``precision="mixed"`` each batch's Gram ``uᵀu`` of
  the shifted features (the shift subtracted in float64 first) is computed in float32, with TF32
  and bf16 matmul modes switched off for the product whatever the global setting
  (:func:`~lawwatch.precision.exact_float32_matmul`), and added into the float64 sums; ``Σu``,
  ``Σuwᵀ`` and the target sums stay float64. The float32 Gram's rounding moves the Rayleigh
  quotient of an exact null direction (a LayerNorm's) to a few 1e-9 of ``λ_max``, so the rank
  rule's default tolerance is ``MIXED_RTOL = 1e-7`` there: such directions are still cut, while
  genuine directions below ~1e-7 of ``λ_max`` are lost with them. That costs little on synthetic
  inputs but a trained model has many such directions (what it moves PR by, and the speed it
  buys: BENCHMARKS.md); the default stays ``"float64"``.
* **Rank rule and solve.** See :mod:`lawwatch.stats.solver`: directions of the standardized
  coefficient space with Rayleigh quotient under ``rtol * λ_max`` are dropped (least-squares
  projection onto the rest).
* **Gram.** ``uᵀu`` is symmetric: each batch computes its upper triangle only, in row panels
  (``gram_panel``: ``d / 8`` rows, at least 192, so about 9/16 of the full product's flops),
  and the lower triangle of ``Σuuᵀ`` is copied from the upper one, diagonal blocks included,
  once, when the sums are read (``sum_xx``), so they are exactly symmetric on any CPU.
* **Memory.** Batches are turned into products a few entries at a time (bounded workspace; a
  caller that owns float64 features, e.g. the hooks of :meth:`lawwatch.capture.Capture.stream`
  through :meth:`ResidualStats.begin`, has them shifted in place: no copy), and the solve and
  the collectives also go entry group by entry group: nothing of the size of the statistics is
  allocated twice. The solve holds one ``d × d`` matrix per entry of a group of at most
  ``WORKSPACE_BYTES / 2``, plus LAPACK's ``2 d²`` workspace for an entry that needs the
  eigendecomposition (one at a time; :mod:`lawwatch.stats.solver`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lawwatch.precision import exact_float32_matmul
from lawwatch.stats.owned import Owned, place
from lawwatch.stats.solver import DEFAULT_RTOL, Method, explained_sum_of_squares
from lawwatch.stats.update import (
    BatchUpdate,
    Cells,
    add_whole,
    gram_panel,
    mirror_upper,
    product_panel,
)

Target = Literal["token_id", "onehot"]
TARGETS: tuple[str, ...] = ("token_id", "onehot")
Precision = Literal["float64", "mixed"]
PRECISIONS: tuple[str, ...] = ("float64", "mixed")
ComputeOn = Literal["stats", "features"]
COMPUTE_ON: tuple[str, ...] = ("stats", "features")

__all__ = [
    "MIXED_RTOL",
    "ResidualStats",
    "Solved",
    "prediction_residuals",
]

_EPS = torch.finfo(torch.float64).eps
MIXED_RTOL = 1e-7
# workspace per group of entries: float64 features and products in `update`, the matrices of
# the solve in `compute`, one collective's payload in `all_reduce` / `reduce_scatter_compute`
WORKSPACE_BYTES = 256 * 2**20
COLLECTIVE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Solved:
    """Prediction residuals of some entries and how each was solved.

    Attributes:
        pr: ``(entries,)`` float64 ``RSS / TSS``.
        eigh: ``(entries,)`` bool, True where the eigendecomposition (not the Cholesky fast
            path) solved the entry; see :mod:`lawwatch.stats.solver` for when that happens.
    """

    pr: torch.Tensor
    eigh: torch.Tensor


class ResidualStats:
    """Additive sufficient statistics for per-layer OLS prediction residuals.

    Holds, per layer, the example count and the sums ``Σu``, ``Σuuᵀ``, ``Σu wᵀ`` of the shifted
    features ``u = x - shift_x`` and targets ``w = y - shift_y`` (plus ``Σw``, ``Σw²``, which
    every layer shares), all in float64. Like a torchmetrics ``Metric``: ``update`` with batches
    (or :meth:`begin` for a batch whose entries arrive one at a time), ``merge``, ``all_reduce``
    or ``reduce_scatter_compute`` across workers, ``compute`` once. The plain member of
    :class:`~lawwatch.stats.Statistics`.

    Args:
        num_layers: Number of layers (hidden-state entries) measured together.
        dim: Feature dimension ``d``.
        target: ``"token_id"`` regresses the scalar token id (the paper's target);
            ``"onehot"`` regresses the one-hot indicator of the target over ``classes``
            (multi-output PR, ``‖Y - XW‖²_F / ‖Y - Ȳ‖²_F``).
        classes: For ``"onehot"``: the distinct target ids (1-D integer tensor) the probe can
            produce. Memory grows as ``num_layers * dim * len(classes)``.
        device: Where the statistics live (default CPU).
        rtol: Relative eigenvalue tolerance of the rank rule (see :mod:`lawwatch.stats.solver`).
            Default ``DEFAULT_RTOL`` (1e-11) for ``precision="float64"``, ``MIXED_RTOL``
            (1e-7) for ``"mixed"``.
        layers: The hidden-state entry index of each layer, when a subset of entries is
            measured (default ``0 … num_layers-1``). Carried along (statistics of different
            entries refuse to merge) so the law is fitted on the true indices.
        precision: ``"float64"`` (every product in float64) or ``"mixed"`` (each batch's
            ``uᵀu`` in IEEE float32, accumulated in float64; see the module docstring).
        compute_on: Where each batch's products are computed. ``"stats"``: features are moved
            to ``device`` first. ``"features"``: on the features' device (e.g. the GPU that
            produced them), a few entries at a time; only the ``(d, d)`` products travel to
            ``device`` (e.g. host memory) and are added there.
    """

    def __init__(
        self,
        num_layers: int,
        dim: int,
        *,
        target: Target = "token_id",
        classes: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        rtol: float | None = None,
        layers: Sequence[int] | None = None,
        precision: Precision = "float64",
        compute_on: ComputeOn = "stats",
    ) -> None:
        if num_layers < 1 or dim < 1:
            raise ValueError(f"num_layers and dim must be positive, got {num_layers} and {dim}.")
        if target not in TARGETS:
            raise ValueError(f"Unknown target {target!r}; choose one of {TARGETS}.")
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}; choose one of {PRECISIONS}.")
        if compute_on not in COMPUTE_ON:
            raise ValueError(f"Unknown compute_on {compute_on!r}; choose one of {COMPUTE_ON}.")
        if rtol is None:
            rtol = MIXED_RTOL if precision == "mixed" else DEFAULT_RTOL
        if not 0.0 < rtol < 1.0:
            raise ValueError(f"rtol must lie in (0, 1), got {rtol}.")
        self.num_layers, self.dim, self.target, self.rtol = num_layers, dim, target, rtol
        self.precision, self.compute_on = precision, compute_on
        self.layers = tuple(range(num_layers)) if layers is None else tuple(map(int, layers))
        if (
            len(self.layers) != num_layers
            or any(b <= a for a, b in zip(self.layers[:-1], self.layers[1:], strict=True))
            or min(self.layers) < 0
        ):
            raise ValueError(
                f"layers must be {num_layers} increasing entry indices >= 0, got {layers}."
            )
        self.device = torch.device(device if device is not None else "cpu")
        if target == "onehot":
            if classes is None or classes.ndim != 1 or classes.numel() < 2:
                raise ValueError(
                    "target='onehot' needs `classes`: a 1-D tensor of at least two distinct "
                    "target ids (e.g. probe.target_ids())."
                )
            self.classes = torch.unique(classes.to(self.device, torch.long))
            k = self.classes.numel()
        else:
            if classes is not None:
                raise ValueError("`classes` is only used with target='onehot'.")
            self.classes = None
            k = 1
        self.num_outputs = k
        self._consumed = False
        f64 = {"dtype": torch.float64, "device": self.device}
        self.count = torch.zeros((), **f64)
        self.shift_x = torch.zeros(num_layers, dim, **f64)  # (L, d)
        self.shift_y = torch.zeros(k, **f64)  # (K,) stays 0 for one-hot: counts are exact
        self.sum_x = torch.zeros(num_layers, dim, **f64)  # (L, d)
        # (L, d, d) Σuuᵀ, read through `sum_xx`; batches add to its upper triangle only
        self._gram = torch.zeros(num_layers, dim, dim, **f64)
        self._lower_stale = False  # the lower triangle lags the upper one (see `sum_xx`)
        self.sum_xy = torch.zeros(num_layers, dim, k, **f64)  # (L, d, K)
        self.sum_y = torch.zeros(k, **f64)  # (K,)
        self.sum_yy = torch.zeros(k, **f64)  # (K,)

    @property
    def sum_xx(self) -> torch.Tensor:
        """``(L, d, d)`` float64 ``Σuuᵀ``, exactly symmetric.

        Batches add to the upper triangle only; the lower one is copied from it here, once,
        when the sums are next read (the solve, a merge, a collective), not after every batch
        and cell: the copy is a pass over ``L·d²`` values, as long as a thin batch's product.
        """
        if self._lower_stale:
            mirror_upper(self._gram, gram_panel(self.dim))
            self._lower_stale = False
        return self._gram

    @sum_xx.setter
    def sum_xx(self, value: torch.Tensor) -> None:
        self._gram, self._lower_stale = value, False

    # -- accumulation -------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._consumed:
            raise RuntimeError(
                "These statistics were consumed by reduce_scatter_compute (each process kept "
                "only its own entries' sums); call reset() before using them again."
            )

    def _targets(self, targets: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        """Integer ids (n,) -> float64 target matrix (n, K), or class indices for one-hot."""
        if classes is None:
            return targets.to(torch.float64).unsqueeze(1)  # (n, 1)
        index = torch.searchsorted(classes, targets)
        index_ok = index.clamp(max=classes.numel() - 1)
        if not bool((classes[index_ok] == targets).all()):  # host sync
            missing = targets[classes[index_ok] != targets].unique()[:10].tolist()
            raise ValueError(
                f"Target ids {missing} are not among the `classes` given for target='onehot'; "
                "build the statistics with every id the probe can produce."
            )
        return index

    def _entry_groups(self, per_entry_bytes: int, entries: range | None = None) -> list[slice]:
        """Consecutive entries in groups whose workspace stays under ``WORKSPACE_BYTES``."""
        entries = range(self.num_layers) if entries is None else entries
        size = max(1, WORKSPACE_BYTES // max(1, per_entry_bytes))
        starts = range(entries.start, entries.stop, size)
        return [slice(lo, min(lo + size, entries.stop)) for lo in starts]

    def update(
        self, features: torch.Tensor, targets: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> ResidualStats:
        """Add a batch of examples.

        Args:
            features: ``(num_layers, n, dim)`` features of any float dtype (upcast to float64),
                on any device (see ``compute_on``).
            targets: ``(n,)`` integer target token ids.
            sequences: Unused (every example goes to the same sums); accepted so that every
                :class:`~lawwatch.stats.Statistics` is fed alike.

        Returns:
            ``self``, so calls chain.

        Raises:
            ValueError: Features of the wrong shape, or NaN or Inf in them (refused before any
                sum changes).
        """
        return add_whole(self, features, targets, sequences)

    def begin(
        self,
        targets: torch.Tensor,
        sequences: torch.Tensor | None = None,
        *,
        deferred_check: bool = False,
        cells: Cells | None = None,
    ) -> BatchUpdate:
        """Start adding a batch whose entries arrive one call at a time (see :class:`BatchUpdate`).

        Args:
            targets: ``(n,)`` integer target token ids of the batch.
            sequences: Unused (see :meth:`update`).
            deferred_check: Check the features for NaN and Inf once, in
                :meth:`BatchUpdate.finish`, from a flag kept on the features' device, instead
                of before each group changes any sum (one host synchronization per group).
                A non-finite batch then leaves the statistics inconsistent: discard them when
                ``finish`` raises.
            cells: Statistics of parts of the batch's rows (the jackknife's groups) that take
                their sums from this batch too, about these statistics' shifts (see
                :class:`Cells`).
        """
        return BatchUpdate(self, targets, deferred_check=deferred_check, cells=cells)

    def _add_targets(
        self, targets: torch.Tensor, work: torch.device, first: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Add a batch's target sums: (shifted targets, targets or class index, classes)."""
        classes = None if self.classes is None else self.classes.to(work)
        y = self._targets(targets.to(work), classes)  # (n, 1) float64, or (n,) class index
        n = y.shape[0]
        w = None
        if first and classes is None:
            self.shift_y = y.mean(dim=0).to(self.device)
        if classes is None:
            w = y - self.shift_y.to(work)  # (n, 1)
            self.sum_y += w.sum(dim=0).to(self.device)
            self.sum_yy += (w * w).sum(dim=0).to(self.device)
        else:
            # one-hot without materializing (n, K): per-class counts and feature sums
            index = y.to(self.device)
            ones = torch.ones(n, dtype=torch.float64, device=self.device)
            self.sum_y.index_add_(0, index, ones)
            self.sum_yy.index_add_(0, index, ones)
        return w, y, classes

    def _add_cell_targets(self, w: torch.Tensor | None, y: torch.Tensor) -> None:
        """A cell's target sums: its rows' shifted targets ``w``, or their class index ``y``.

        ``w`` is about the shifts of the statistics that computed it, which are the cell's.
        """
        if w is not None:
            self.sum_y += w.sum(dim=0).to(self.device)
            self.sum_yy += (w * w).sum(dim=0).to(self.device)
        else:
            index = y.to(self.device)
            ones = torch.ones(index.shape[0], dtype=torch.float64, device=self.device)
            self.sum_y.index_add_(0, index, ones)
            self.sum_yy.index_add_(0, index, ones)

    def _add_features(
        self,
        part: slice,
        features: torch.Tensor,
        w: torch.Tensor | None,
        y: torch.Tensor,
        classes: torch.Tensor | None,
        work: torch.device,
        first: bool,
        owned: bool,
        cells: Cells | None = None,
    ) -> torch.Tensor:
        """Add the per-entry sums of the entries ``part`` from ``features`` (l, n, d).

        With ``cells``, each cell's sums of its rows are added too (see :class:`Cells`).

        Returns:
            ``(l, d)`` the batch's column sums ``Σu`` (on the statistics' device).
        """
        n = features.shape[1]
        # "features": each product is its own tensor, moved to `device` and added there (on
        # one device too, so the path a GPU takes is the one CPU tests run)
        staged = self.compute_on == "features"
        in_place = owned and features.dtype == torch.float64 and features.device == work
        gram_bytes = self.dim * self.dim * (4 if self.precision == "mixed" else 8)
        per_entry = n * self.dim * (4 if in_place else 12)
        per_entry += gram_bytes if staged or self.precision == "mixed" else 0
        per_entry += self.dim * self.num_outputs * 8 if staged and classes is not None else 0
        base = part.start or 0
        sums = []
        for sub in self._entry_groups(per_entry, range(base, part.stop)):
            rows = slice(sub.start - base, sub.stop - base)
            # (l, n, d) float64 that is ours to modify: the caller's, or a copy
            x = features[rows] if in_place else features[rows].to(work, torch.float64, copy=True)
            if first:
                self.shift_x[sub] = x.mean(dim=1).to(self.device)
            u = x.sub_(self.shift_x[sub].to(work).unsqueeze(1))  # shifted, in float64
            column_sums = u.sum(dim=1).to(self.device)  # (l, d)
            sums.append(column_sums)
            self.sum_x[sub] += column_sums
            if cells is None or cells.runs is None:
                self._add_gram(sub, u, staged)  # one product of all rows
            self._add_cross(sub, u, w, y, classes, work, staged)
            if cells is not None:
                for cell, new in zip(cells.stats, cells.new, strict=True):
                    if new:  # a cell's first examples: it takes these statistics' shifts
                        cell.shift_x[sub] = self.shift_x[sub]
                if cells.runs is None:  # each cell its own product of a copy of its rows
                    for cell, index in zip(cells.stats, cells.rows, strict=True):
                        v = u.index_select(1, index.to(work))
                        cell._add_column_sums(sub, v)
                        cell._add_gram(sub, v, staged)
                        cell._add_cross(sub, v, *cells.targets(index, w, y), classes, work, staged)
                else:  # per sequence: one product, added to these sums and to its cell's
                    for lo, hi, i in cells.runs:
                        v, cell = u[:, lo:hi], cells.stats[i]
                        cell._add_column_sums(sub, v)
                        self._add_gram(sub, v, staged, also=cell)
                        rows = slice(lo, hi)
                        cell._add_cross(sub, v, *cells.targets(rows, w, y), classes, work, staged)
            del x, u
        return torch.cat(sums)

    def _add_column_sums(self, part: slice, u: torch.Tensor) -> None:
        """``Σu[part] += u.sum(rows)`` for ``u`` of shape (l, n, d)."""
        self.sum_x[part] += u.sum(dim=1).to(self.device)

    def _add_cross(
        self,
        part: slice,
        u: torch.Tensor,
        w: torch.Tensor | None,
        y: torch.Tensor,
        classes: torch.Tensor | None,
        work: torch.device,
        staged: bool,
    ) -> None:
        """``Σuwᵀ[part]`` of ``u`` (l, n, d) and its targets: ``w`` (n, 1), or class index ``y``."""
        if classes is None:
            self.sum_xy[part] += (u.transpose(1, 2) @ w).to(self.device)  # (l, d, 1)
        elif staged:
            by_class = torch.zeros(
                u.shape[0], self.dim, self.num_outputs, dtype=u.dtype, device=work
            )
            by_class.index_add_(2, y, u.transpose(1, 2))  # (l, d, K): sums by class
            self.sum_xy[part] += by_class.to(self.device)
        else:
            self.sum_xy[part].index_add_(2, y, u.transpose(1, 2))

    def _add_gram(
        self, part: slice, u: torch.Tensor, staged: bool, also: ResidualStats | None = None
    ) -> None:
        """``Σuuᵀ[part] += uᵀu`` for ``u`` of shape (l, n, d), in the configured precision.

        With ``also`` (a cell about the same shifts), the same product is added to its sums.

        ``uᵀu`` is symmetric, so only its upper triangle is computed, in row panels of
        ``gram_panel(d)`` rows added in place (panel ``i`` times the columns from ``i`` on:
        about ``(1 + 1/panels) / 2`` of the flops of the full product), or of
        ``product_panel(d)`` rows where the product is formed apart (``also``, staged,
        float32: one panel at a time, in one reused buffer on the statistics' device); the
        lower triangle of the sums is copied from the upper one when they are next read
        (:attr:`sum_xx`).
        """
        d = self.dim
        into = [self] if also is None else [self, also]
        u32 = u.to(torch.float32) if self.precision == "mixed" else None  # after the shift
        if u32 is None and not staged and also is None:  # in place, no temporary
            step = gram_panel(d)
            for lo in range(0, d, step):
                target = self._gram[part][:, lo : lo + step, lo:]  # (l, t, d - lo): upper part
                target.baddbmm_(u[:, :, lo : lo + step].transpose(1, 2), u[:, :, lo:])
            self._lower_stale = True
            return
        # a product added twice (or moved, or float32): thinner panels, one reused buffer
        step = product_panel(d)
        buffer = None
        if u32 is None and u.device == self.device:
            buffer = torch.empty(u.shape[0] * step * d, dtype=u.dtype, device=u.device)
        for lo in range(0, d, step):
            hi = min(lo + step, d)
            if u32 is not None:
                with exact_float32_matmul():
                    product = u32[:, :, lo:hi].transpose(1, 2) @ u32[:, :, lo:]  # float32
            elif buffer is not None:
                shape = (u.shape[0], hi - lo, d - lo)
                product = buffer[: shape[0] * shape[1] * shape[2]].view(shape)
                torch.bmm(u[:, :, lo:hi].transpose(1, 2), u[:, :, lo:], out=product)
            else:
                product = u[:, :, lo:hi].transpose(1, 2) @ u[:, :, lo:]
            product = product.to(self.device)
            for stats in into:  # accumulated in float64
                stats._gram[part][:, lo:hi, lo:] += product
        for stats in into:
            stats._lower_stale = True

    def _rebase(self, shift_x: torch.Tensor, shift_y: torch.Tensor) -> None:
        """Re-base the sums on new shifts, exactly: Σ(u-δ)(u-δ)ᵀ = Σuuᵀ - Σuδᵀ - δΣuᵀ + nδδᵀ."""
        dx = shift_x - self.shift_x  # (L, d)
        dy = shift_y - self.shift_y  # (K,)
        n, sx, sy = self.count, self.sum_x, self.sum_y
        per_entry = 3 * self.dim * self.num_outputs * 8
        for part in self._entry_groups(per_entry):  # bounded temporaries, none (d, d)
            a, s = dx[part], sx[part]  # (l, d)
            # two rank-one updates in place: + (nδ - Σu) δᵀ - δ Σuᵀ
            self.sum_xx[part].baddbmm_((n * a - s).unsqueeze(2), a.unsqueeze(1))
            self.sum_xx[part].baddbmm_(a.unsqueeze(2), s.unsqueeze(1), alpha=-1.0)
            # Σ(u-δ)(w-ε)ᵀ = Σuwᵀ - Σu εᵀ - δ Σwᵀ + n δ εᵀ
            moved = (n * a - s).unsqueeze(2)  # (l, d, 1)
            self.sum_xy[part] += moved * dy.view(1, 1, -1) - a.unsqueeze(2) * sy.view(1, 1, -1)
        self.sum_yy += n * dy * dy - 2 * sy * dy
        self.sum_x -= n * dx
        self.sum_y -= n * dy
        self.shift_x, self.shift_y = shift_x.clone(), shift_y.clone()

    def _check_compatible(self, other: ResidualStats) -> None:
        same = (other.num_layers, other.dim, other.target, other.layers) == (
            self.num_layers,
            self.dim,
            self.target,
            self.layers,
        )
        if not same or (
            self.classes is not None
            and not torch.equal(self.classes, other.classes.to(self.device))
        ):
            raise ValueError(
                "Cannot merge statistics of different shape, target or entries: "
                f"({self.num_layers}, {self.dim}, {self.target}, layers {self.layers}) vs "
                f"({other.num_layers}, {other.dim}, {other.target}, layers {other.layers})."
            )

    def merge(self, other: ResidualStats) -> ResidualStats:
        """Add another worker's statistics, as if its examples had been passed to ``update``.

        Returns:
            ``self``, so calls chain.
        """
        self._check_compatible(other)
        self._check_usable()
        other._check_usable()
        if other.count.item() == 0:
            return self
        if self.count.item() == 0:
            self.shift_x = other.shift_x.to(self.device, copy=True)
            self.shift_y = other.shift_y.to(self.device, copy=True)
        for name, value in zip(_HELD, self._aligned(other), strict=True):
            getattr(self, name).add_(value)
        self._lower_stale |= other._lower_stale
        return self

    def subtract(self, other: ResidualStats) -> ResidualStats:
        """Remove the examples of ``other``, which these statistics hold too (undo a merge).

        E.g. a jackknife group from the statistics of every group. Exact in arithmetic; in
        floating point the error is that of the subtraction, relative to the larger sums
        (small while ``other`` holds a minor share of the examples).

        Returns:
            ``self``, so calls chain.
        """
        self._check_compatible(other)
        self._check_usable()
        other._check_usable()
        if other.count.item() == 0:
            return self
        for name, value in zip(_HELD, self._aligned(other), strict=True):
            getattr(self, name).sub_(value)
        self._lower_stale |= other._lower_stale
        return self

    def difference(
        self, other: ResidualStats, *, out: ResidualStats | None = None
    ) -> ResidualStats:
        """These statistics minus ``other`` (which these hold too), in one pass per sum.

        What ``self.clone().subtract(other)`` gives, without the copy: e.g. the totals with a
        jackknife group left out. Written into ``out`` (statistics of the same shape, e.g.
        the previous group's, whose sums are all replaced) if given, else into new ones.
        """
        self._check_compatible(other)
        self._check_usable()
        other._check_usable()
        new = object.__new__(ResidualStats)
        new.__dict__.update(self.__dict__)
        for name, mine, value in zip(
            _HELD, (getattr(self, name) for name in _HELD), self._aligned(other), strict=True
        ):
            setattr(
                new,
                name,
                mine - value if out is None else torch.sub(mine, value, out=getattr(out, name)),
            )
        new.shift_x, new.shift_y = self.shift_x.clone(), self.shift_y.clone()
        new._lower_stale = self._lower_stale or other._lower_stale
        return new

    def _aligned(self, other: ResidualStats) -> list[torch.Tensor]:
        """``other``'s sums (in the order of ``_HELD``) about this one's shifts, on its device.

        Statistics about the same shifts on the same device are read as they are (no copy; the
        Gram's lower triangle as it is: the caller carries ``other._lower_stale``); others are
        copied and re-based exactly (the copy's Gram made symmetric).
        """
        same = (
            other.device == self.device
            and torch.equal(other.shift_x, self.shift_x)
            and torch.equal(other.shift_y, self.shift_y)
        )
        if not same:
            other = other.clone().to(self.device)
            other._rebase(self.shift_x, self.shift_y)
        return [getattr(other, name) for name in _HELD]

    # -- distributed --------------------------------------------------------------------------

    def _rebase_on_global_mean(self, group: object | None) -> bool:
        """The small collective: every process re-bases on the global means; False if empty.

        Sums about different shifts cannot be added, so first a ``(L, 1 + d + K)`` all-reduce
        of the totals about zero finds the global means, and each process re-bases on them.
        """
        import torch.distributed as dist

        k = self.num_outputs
        head = torch.cat(
            [
                self.count.reshape(1, 1).expand(self.num_layers, 1),
                self.sum_x + self.count * self.shift_x,
                (self.sum_y + self.count * self.shift_y).expand(self.num_layers, k),
            ],
            dim=1,
        )  # (L, 1 + d + K)
        dist.all_reduce(head, group=group)
        total = head[0, 0]
        if total.item() == 0:  # host sync
            return False
        mean_x = head[:, 1 : 1 + self.dim] / total
        mean_y = head[0, 1 + self.dim :] / total if self.classes is None else self.shift_y
        self._rebase(mean_x, mean_y)
        return True

    def all_reduce(self, group: object | None = None) -> ResidualStats:
        """Sum the statistics of every process in ``group`` in place (``torch.distributed``).

        A small all-reduce finds the global means and each process re-bases its sums on them;
        then the sums are all-reduced in place, in slices of at most ``COLLECTIVE_BYTES``
        (no flat copy of the statistics). Every process then holds the statistics of all
        examples.

        Returns:
            ``self``, so calls chain.
        """
        import torch.distributed as dist

        self._check_usable()
        if not self._rebase_on_global_mean(group):
            return self
        for name in _SUMS:
            for piece in _slices(getattr(self, name).view(-1)):
                dist.all_reduce(piece, group=group)
        return self

    def owned_entries(self, rank: int, world: int) -> range:
        """The entries process ``rank`` of ``world`` solves in ``reduce_scatter_compute``.

        Consecutive blocks whose sizes differ by at most one (``num_layers`` need not divide
        by ``world``; processes beyond ``num_layers`` own none).
        """
        return range(rank * self.num_layers // world, (rank + 1) * self.num_layers // world)

    def reduce_scatter_compute(
        self, group: object | None = None, *, method: Method = "auto"
    ) -> torch.Tensor:
        """Sum the statistics across ``group`` entry by entry, solve a share, gather the PRs.

        The three phases, each also callable on its own (a monitor runs the solve beside
        training, between the collectives: :meth:`reduce_scatter`, :meth:`solve_owned`,
        :meth:`gather_owned`):

        1. The small all-reduce of :meth:`all_reduce` finds the global means; every process
           re-bases on them (sums about one shift add up).
        2. The count and the target sums are all-reduced (a few numbers). The per-entry sums
           ``Σu``, ``Σuuᵀ``, ``Σuwᵀ`` of the entries of :meth:`owned_entries` are *reduced* to
           their owner, in place, in slices of at most ``COLLECTIVE_BYTES``: no process holds
           a second copy of the statistics, and the traffic is that of a reduce-scatter
           (about half an all-reduce's).
        3. Each process solves its own entries (no communication), then the PRs are
           all-gathered. A failure of the solve on one process is raised on every process
           (none is left waiting).

        The statistics are consumed: afterwards each process holds complete sums only for its
        own entries, and this object refuses further use until :meth:`reset`.

        Args:
            group: The process group (default: the world).
            method: The solve method (see :mod:`lawwatch.stats.solver`).

        Returns:
            ``(num_layers,)`` float64 prediction residuals, the same on every process, on the
            statistics' device.

        Raises:
            ValueError: As :meth:`compute`, on every process alike.
        """
        self.reduce_scatter(group)
        return self.gather_owned(self.solve_owned(group, method=method), group)

    def reduce_scatter(self, group: object | None = None) -> None:
        """Phases 1 and 2 of :meth:`reduce_scatter_compute`: the collectives before the solve.

        Afterwards each process holds the summed statistics of its :meth:`owned_entries` (and
        the global count and target sums); the statistics are consumed.

        Raises:
            ValueError: As :meth:`compute` (too few examples, constant target), on every
                process alike.
        """
        import torch.distributed as dist

        self._check_usable()
        world = dist.get_world_size(group)
        if not self._rebase_on_global_mean(group):
            self._check_solvable()  # no examples anywhere: the same error on every process
        small = torch.cat([self.count.reshape(1), self.sum_y, self.sum_yy])  # (1 + 2K,)
        dist.all_reduce(small, group=group)
        k = self.num_outputs
        self.count.copy_(small[0])
        self.sum_y.copy_(small[1 : 1 + k])
        self.sum_yy.copy_(small[1 + k :])
        self._consumed = True  # from here on only the owned entries are complete
        for owner in range(world):
            entries = self.owned_entries(owner, world)
            for name in ("sum_x", "sum_xx", "sum_xy"):
                per_entry = getattr(self, name).view(self.num_layers, -1)  # (L, size)
                flat = per_entry[entries.start : entries.stop].view(-1)  # contiguous rows
                for piece in _slices(flat):
                    _reduce(piece, owner, group)
        self._check_solvable()  # global count and TSS: identical on every process

    def solve_owned(self, group: object | None = None, *, method: Method = "auto") -> Owned:
        """Phase 3a: solve this process's entries after :meth:`reduce_scatter`; no collective.

        Never raises: a failure is kept in the result (and becomes an error on every process
        in :meth:`gather_owned`). Safe to run on another thread than the collectives'. Without
        a process group, this process owns every entry (no :meth:`reduce_scatter` needed).
        """
        rank, world = place(group)
        mine = self.owned_entries(rank, world)
        share = -(-self.num_layers // world)  # the largest share: every buffer the same size

        def values() -> torch.Tensor | None:
            self._check_solvable()  # after reduce_scatter: the global sums, alike everywhere
            return self._solve(mine, method).pr if len(mine) > 0 else None

        return Owned.solve(share, self.device, values)

    def gather_owned(self, owned: Owned, group: object | None = None) -> torch.Tensor:
        """Phase 3b: all-gather every process's :meth:`solve_owned` result: all PRs.

        Raises:
            Exception: The solve failed on some process: its own error there, a
                ``RuntimeError`` naming the failed processes on the others.
        """
        import torch.distributed as dist

        world = place(group)[1]
        gathered = [owned.buffer]
        if world > 1:
            gathered = [torch.empty_like(owned.buffer) for _ in range(world)]
            dist.all_gather(gathered, owned.buffer, group=group)
        failed = [r for r, g in enumerate(gathered) if g[0].item() != 0.0]  # host sync
        owned.raise_failure(f"process(es) {failed}" if failed else None)
        return torch.cat(
            [g[1 : 1 + len(self.owned_entries(r, world))] for r, g in enumerate(gathered)]
        )

    # -- bookkeeping --------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every example (keeps shape, target, classes and device)."""
        for name in (*_SUMS, "shift_x", "shift_y"):
            getattr(self, name).zero_()
        self._consumed = False

    def clone(self) -> ResidualStats:
        """A deep copy."""
        new = object.__new__(ResidualStats)
        new.__dict__.update(self.__dict__)  # `_lower_stale` too: the Gram is copied as it is
        for name in (*_HELD, "shift_x", "shift_y"):
            setattr(new, name, getattr(self, name).clone())
        return new

    def to(self, device: torch.device | str) -> ResidualStats:
        """Move the statistics to ``device`` in place."""
        self.device = torch.device(device)
        for name in (*_SUMS, "shift_x", "shift_y", "classes"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(self.device))
        return self

    # -- the solve ----------------------------------------------------------------------------

    def _check_solvable(self) -> None:
        """Raise if PR is undefined: too few examples, or a constant target."""
        n = self.count.item()  # host sync
        if n <= self.dim + 1:
            raise ValueError(
                f"Too few probe examples: {int(n)} (position, next-token) pairs for hidden size "
                f"{self.dim}. OLS with intercept interpolates unless n > d + 1, so at least "
                f"{self.dim + 2} are needed (and ~{10 * self.dim} for a low-noise PR); use more "
                "or longer probe sequences."
            )
        sy = self.sum_y
        tss = (self.sum_yy - sy * sy / n).sum()
        if tss.item() <= _EPS * self.sum_yy.sum().item():  # host sync
            raise ValueError(
                "The targets take a single distinct value, so their variance is 0 and PR is "
                "undefined; the probe needs at least two different next tokens."
            )

    def _solve(self, entries: range, method: Method, overwrite: bool = False) -> Solved:
        """PR of ``entries`` from the sums, a bounded group of entries at a time.

        With ``overwrite`` the solve's matrices are built over the Gram (these statistics are
        a scratch copy: unusable afterwards).
        """
        n = self.count
        sy = self.sum_y
        tss = (self.sum_yy - sy * sy / n).sum()
        prs, eighs = [], []
        for part in self._entry_groups(2 * self.dim * self.dim * 8, entries):
            sx = self.sum_x[part]  # (l, d)

            def cross(outputs: slice, part: slice = part, sx: torch.Tensor = sx) -> torch.Tensor:
                return self.sum_xy[part, :, outputs] - sx.unsqueeze(2) * sy[outputs] / n

            solution = explained_sum_of_squares(  # reads the Gram's upper triangle only
                self._gram[part],
                sx,
                n,
                cross,
                self.num_outputs,
                rtol=self.rtol,
                method=method,
                overwrite=overwrite,
            )
            prs.append((tss - solution.explained) / tss)
            eighs.append(solution.eigh)
        return Solved(torch.cat(prs), torch.cat(eighs))

    def solve(self, *, method: Method = "auto") -> Solved:
        """Solve all layers: the PRs and, per entry, whether the eigendecomposition was used.

        Args:
            method: ``"auto"`` (Cholesky fast path, the eigendecomposition for entries it
                cannot prove safe) or ``"eigh"`` (the reference for every entry); see
                :mod:`lawwatch.stats.solver`.

        Raises:
            ValueError: Too few examples (``n <= d + 1`` interpolates and every PR would be 0),
                or a target with a single distinct value (TSS = 0).
        """
        self._check_usable()
        self._check_solvable()
        return self._solve(range(self.num_layers), method)

    def _compute_scratch(self, *, method: Method = "auto") -> torch.Tensor:
        """:meth:`compute`, building the solve's matrices over the Gram (no ``d²`` allocation).

        For a scratch copy (e.g. :meth:`difference`'s ``out``): afterwards its Gram holds no
        sums, and only a later ``difference(..., out=self)`` makes it usable again.
        """
        self._check_usable()
        self._check_solvable()
        pr = self._solve(range(self.num_layers), method, overwrite=True).pr
        self._lower_stale = False  # the Gram holds the solve's matrices: nothing to mirror
        return pr

    def compute(self, *, method: Method = "auto") -> torch.Tensor:
        """Solve all layers together.

        Returns:
            ``(num_layers,)`` float64 prediction residuals ``RSS / TSS`` on the statistics'
            device.

        Raises:
            ValueError: Too few examples (``n <= d + 1`` interpolates and every PR would be 0),
                or a target with a single distinct value (TSS = 0).
        """
        return self.solve(method=method).pr

    def replicates(self) -> None:
        """None: the plain statistics have no jackknife groups (see ``Statistics.replicates``)."""
        return None


_SUMS = ("count", "sum_x", "sum_xx", "sum_xy", "sum_y", "sum_yy")
# the sums as held: the Gram with its lower triangle possibly stale (see `sum_xx`)
_HELD = ("count", "sum_x", "_gram", "sum_xy", "sum_y", "sum_yy")


def _slices(flat: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous views of the 1-D ``flat``, of at most ``COLLECTIVE_BYTES`` each."""
    step = max(1, COLLECTIVE_BYTES // flat.element_size())
    return [flat[i : i + step] for i in range(0, flat.numel(), step)]


def _reduce(piece: torch.Tensor, owner: int, group: object | None) -> None:
    """Sum ``piece`` over ``group`` into process ``owner`` (a rank within the group)."""
    import torch.distributed as dist

    dist.reduce(
        piece, dst=dist.get_global_rank(group, owner) if group is not None else owner, group=group
    )


def prediction_residuals(
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    target: Target = "token_id",
    rtol: float | None = None,
    method: Method = "auto",
) -> torch.Tensor:
    """Prediction residual of every layer, in one batched computation.

    Args:
        features: ``(layers, n, d)`` features of any float dtype.
        targets: ``(n,)`` integer next-token ids.
        target: ``"token_id"`` (the paper's scalar id) or ``"onehot"`` (over the ids present).
        rtol: Relative eigenvalue tolerance (see :mod:`lawwatch.stats.solver`).
        method: ``"auto"`` or ``"eigh"`` (see :mod:`lawwatch.stats.solver`).

    Returns:
        ``(layers,)`` float64 ``PR = RSS / TSS = 1 - R²``, on ``features``' device.
    """
    if features.ndim != 3:
        raise ValueError(f"features must have shape (layers, n, d), got {tuple(features.shape)}.")
    classes = torch.unique(targets) if target == "onehot" else None
    stats = ResidualStats(
        features.shape[0],
        features.shape[2],
        target=target,
        classes=classes,
        device=features.device,
        rtol=rtol,
    )
    return stats.update(features, targets).compute(method=method)
