"""The streamed update of :class:`~lawwatch.stats.residual.ResidualStats`: one batch at a time.

:class:`BatchUpdate` adds a batch whose entries arrive one call at a time (the capture's hooks
hand each entry's float64 features as its block runs), optionally feeding the jackknife's
:class:`Cells` from the same products; the Gram is formed as its upper triangle in row panels
(:func:`gram_panel`) and mirrored once when the sums are read (:func:`mirror_upper`). The
numerics are :mod:`lawwatch.stats.residual`'s (module docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lawwatch.stats import Statistics
    from lawwatch.stats.residual import ResidualStats

__all__ = ["BatchUpdate", "Cells", "add_whole", "gram_panel", "mirror_upper", "product_panel"]


def add_whole(
    stats: Statistics, features: torch.Tensor, targets: torch.Tensor, sequences: torch.Tensor | None
) -> Statistics:
    """A whole batch, every entry at once: what each statistics' ``update`` does.

    Its :meth:`~lawwatch.stats.Statistics.begin`, one ``add`` of all ``(num_layers, n, d)``
    features, then ``finish``; returns what ``finish`` returns (the statistics).

    Raises:
        ValueError: Features not shaped ``(num_layers, n, dim)``.
    """
    if features.ndim != 3 or features.shape[0] != stats.num_layers:
        raise ValueError(
            f"features must have shape (num_layers={stats.num_layers}, n, dim={stats.dim}), "
            f"got {tuple(features.shape)}."
        )
    batch = stats.begin(targets, sequences)
    batch.add(slice(0, stats.num_layers), features)
    return batch.finish()


# the float64 Gram is formed in row panels of this many rows at least (see `gram_panel`)
_MIN_PANEL = 192


def gram_panel(dim: int) -> int:
    """Rows per panel of the upper-triangular Gram: ``d / 8``, at least 192.

    Eight panels compute ``9/16`` of the full product's flops; narrower panels would save
    little more and run the matrix product on thinner, slower shapes (BENCHMARKS.md).
    """
    return max(_MIN_PANEL, -(-dim // 8))


def product_panel(dim: int) -> int:
    """Rows per panel of an upper-triangular Gram formed apart and then added (to two sums).

    ``d / 16``, at least 96: where each panel's product is written out and read back, the
    thinner panel's product stays in cache and the triangle wastes fewer flops (at d = 768,
    255 rows: ~17% faster than ``gram_panel``'s 192 rows, BENCHMARKS.md).
    """
    return max(96, -(-dim // 16))


def mirror_upper(sums: torch.Tensor, step: int) -> None:
    """Copy the strict upper triangle of each ``(d, d)`` in ``sums`` onto the lower one.

    Block row by block row of ``step`` rows, so no ``(d, d)`` temporary is made. The diagonal
    blocks are mirrored too: a BLAS product ``aᵀa`` is not bit-symmetric on every CPU, so
    symmetry is made here, not left to the kernel.
    """
    d = sums.shape[-1]
    for lo in range(0, d, step):
        hi = min(lo + step, d)
        sums[:, lo:hi, :lo] = sums[:, :lo, lo:hi].transpose(1, 2)
        rows, cols = torch.tril_indices(hi - lo, hi - lo, -1, device=sums.device)
        block = sums[:, lo:hi, lo:hi]  # (l, t, t) view
        block[:, rows, cols] = block[:, cols, rows]


@dataclass
class Cells:
    """Cells of one batch's rows (the jackknife's groups) fed beside a :class:`ResidualStats`.

    Made by :class:`~lawwatch.stats.partition.PartitionedStats` for the statistics of all its
    groups (the totals); each cell's statistics take their sums about the totals' shifts (a
    cell's first examples fix its shifts to the totals'; a cell re-based since, e.g. by a
    reduction, is re-based back first), so a cell's sums add to the totals' and one group
    is removed from the totals by a subtraction. The Gram of the rows is formed either

    * **per sequence** (``runs``): one product per run of a sequence's rows, added to the
      totals and to that sequence's cell: the rows' product is formed once, not once for the
      totals and again for the cells. The totals are then the sum of the sequences' products,
      in row order: the same, to the bit, whatever the number of groups; or
    * **per cell** (``runs`` None, where sequences are short: a product of a few rows is
      slow and each adds a pass over ``d²`` sums): the totals' own product of all rows, and
      each cell's product of a copy of its rows.

    Attributes:
        stats: The statistics of each cell present in the batch.
        rows: ``(m_i,)`` each cell's rows (indices into the batch's ``n`` examples).
        runs: ``(start, stop, i)``: consecutive rows of one sequence and the index of its cell
            in ``stats``, covering the batch's rows in order; or None.
        new: Per cell, whether it held no example before this batch (set by the update).
    """

    stats: list[ResidualStats]
    rows: list[torch.Tensor]
    runs: list[tuple[int, int, int]] | None = None
    new: list[bool] | None = None

    def targets(
        self, rows: torch.Tensor | slice, w: torch.Tensor | None, y: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The shifted targets ``w`` and the targets or class index ``y`` of ``rows``."""
        if isinstance(rows, torch.Tensor):
            rows = rows.to(y.device)
        return (None if w is None else w[rows]), y[rows]


class BatchUpdate:
    """One batch being added to a :class:`ResidualStats`, its entries in any number of calls.

    Made by :meth:`ResidualStats.begin`. :meth:`add` takes consecutive groups of entries in
    order (e.g. one entry per call, from a forward hook, as each block's output arrives);
    :meth:`finish` checks that every entry came and counts the batch's examples. The target
    sums are added with the first group. Until ``finish`` the statistics hold part of a batch:
    a batch that fails midway leaves them inconsistent (discard them).
    """

    def __init__(
        self,
        stats: ResidualStats,
        targets: torch.Tensor,
        *,
        deferred_check: bool = False,
        cells: Cells | None = None,
    ) -> None:
        if targets.ndim != 1:
            raise ValueError(f"targets must have shape (n,), got {tuple(targets.shape)}.")
        if targets.is_floating_point() or targets.is_complex():
            raise TypeError(f"targets must be integer token ids, got {targets.dtype}.")
        stats._check_usable()
        self.stats, self.targets, self.n = stats, targets, targets.shape[0]
        self.done = 0  # entries added so far
        self.first = stats.count.item() == 0  # host sync; the first batch fixes the shifts
        self.deferred = deferred_check
        self.finite: torch.Tensor | None = None  # deferred: all column sums finite so far
        self._w = self._y = self._classes = None
        self.cells = cells
        if cells is not None:
            cells.new = []
            for cell in cells.stats:
                cell._check_usable()
                new = cell.count.item() == 0  # host sync, once per cell and batch
                cells.new.append(new)
                if not new and not (
                    torch.equal(cell.shift_x, stats.shift_x)
                    and torch.equal(cell.shift_y, stats.shift_y)
                ):  # re-based since (a reduction): back onto the shifts the batch uses
                    cell._rebase(stats.shift_x, stats.shift_y)

    def add(self, part: slice, features: torch.Tensor, *, owned: bool = False) -> None:
        """Add the entries ``part`` from ``features`` ``(part.stop - part.start, n, dim)``.

        Args:
            part: The next entries: starts where the previous group stopped.
            features: Any float dtype, any device (see ``compute_on``).
            owned: The tensor is the caller's temporary: when it is float64 on the device the
                products are computed on, it is shifted in place instead of copied (the
                caller must not use it afterwards).

        Raises:
            ValueError: Wrong shape or order; NaN or Inf (unless the check is deferred).
        """
        stats, n = self.stats, self.n
        lo, hi = part.start or 0, part.stop
        if (
            lo != self.done
            or hi is None
            or not lo < hi <= stats.num_layers
            or part.step not in (None, 1)
            or features.ndim != 3
            or features.shape[0] != hi - lo
            or features.shape[2] != stats.dim
        ):
            raise ValueError(
                f"features of entries {part} must have shape ({hi} - {lo}, n, "
                f"dim={stats.dim}) and follow entry {self.done}, got {tuple(features.shape)}."
            )
        if not features.is_floating_point():
            raise TypeError(f"features must be a float tensor, got {features.dtype}.")
        if features.shape[1] != n:
            raise ValueError(
                f"targets must have shape (n={features.shape[1]},), "
                f"got {tuple(self.targets.shape)}."
            )
        self.done = hi
        if n == 0:
            return
        # unless deferred: one pass, before any sum changes (a NaN or Inf makes its column's sum
        # non-finite: cheaper than isfinite; sums of features under ~1e300 cannot overflow)
        if not self.deferred and not bool(
            torch.isfinite(features.sum(dim=1, dtype=torch.float64)).all()  # host sync
        ):
            raise ValueError("features contain NaN or Inf; PR is undefined for them.")
        work = features.device if stats.compute_on == "features" else stats.device
        if self._y is None:  # the target sums, once per batch
            self._w, self._y, self._classes = stats._add_targets(self.targets, work, self.first)
            if self.cells is not None:
                for cell, index, new in zip(
                    self.cells.stats, self.cells.rows, self.cells.new, strict=True
                ):
                    if new:
                        cell.shift_y = stats.shift_y.clone()
                    cell._add_cell_targets(*self.cells.targets(index, self._w, self._y))
        sums = stats._add_features(
            part, features, self._w, self._y, self._classes, work, self.first, owned, self.cells
        )
        if self.deferred:  # Σu of every entry, finite or not: no extra pass, no host sync
            finite = torch.isfinite(sums).all()
            self.finite = finite if self.finite is None else self.finite & finite

    def finish(self) -> ResidualStats:
        """Check that every entry came (and, if deferred, that all were finite); count ``n``.

        Raises:
            ValueError: Entries missing, or (deferred) NaN or Inf in the batch.
        """
        stats = self.stats
        if self.done != stats.num_layers:
            raise ValueError(
                f"the feature groups covered entries 0 … {self.done - 1}, not all "
                f"{stats.num_layers}."
            )
        if self.finite is not None and not bool(self.finite):  # one host sync per batch
            raise ValueError("features contain NaN or Inf; PR is undefined for them.")
        if self.n:
            stats.count += self.n
        if self.cells is not None:
            for cell, index in zip(self.cells.stats, self.cells.rows, strict=True):
                cell.count += index.numel()
        return stats
