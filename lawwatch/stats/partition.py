"""Statistics kept per part of the probe: out-of-sample PR, separation fuzziness, jackknife.

The plain measurement keeps one :class:`~lawwatch.stats.residual.ResidualStats`. The options that
need more (``split``, ``metric="separation_fuzziness"``, ``jackknife``) keep a
:class:`PartitionedStats` instead: one ``ResidualStats`` per *cell*, a cell being a (jackknife
group, split part) pair, each example going to the cell of the probe sequence it comes from.
Cells are assigned by the sequence's index ``i`` in the whole probe (a process's shard knows
its first row), so a distributed run and a single process put every sequence in the same cell:

* **split part**: sequence ``i`` is in the evaluation part when ``frac(i · φ) < split``
  (``φ = (√5 − 1) / 2``, a low-discrepancy sequence: of any ``N`` consecutive sequences the
  evaluation part holds ``split · N`` up to ``O(log N)``), else in the fit part.
* **jackknife group**: ``i mod groups`` (round robin).

Memory: one ``ResidualStats`` per cell, plus, with ``jackknife``, one per split part holding
all groups (the headline values then come from statistics accumulated exactly as the plain
measurement's, bit for bit): ``(groups + 1) × (2 with split, else 1)`` times the plain
measurement's. And per batch more than the plain measurement's transient: a cell needs every
entry of an example together, so these options do not stream entries through the hooks
(:meth:`lawwatch.capture.Capture.stream`); they keep the measured entries' hidden states of a
batch in the model's dtype and make that batch's float64 features for all entries at once
(``entries × n × d × (8 + bytes of the dtype)``, ``n`` the batch's examples).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lawwatch.stats.residual import ResidualStats

__all__ = ["GOLDEN", "PartitionedStats", "jackknife_se", "sequence_cells"]

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
"""φ: sequence ``i`` is evaluated when ``frac(i · φ) < split``."""


def sequence_cells(rows: torch.Tensor, split: float | None, groups: int | None) -> torch.Tensor:
    """The cell of each probe sequence index in ``rows``: ``group * parts + part``.

    Args:
        rows: Integer indices of sequences in the whole probe.
        split: Evaluation fraction, or None (one part).
        groups: Jackknife groups, or None (one group).

    Returns:
        Integer cells, shaped like ``rows``; part 1 is the evaluation part.
    """
    rows = rows.to(torch.int64)
    cells = torch.zeros_like(rows)
    if split is not None:
        # float64 is exact enough: i·φ for i < 2**40 keeps ~12 fractional digits
        frac = torch.remainder(rows.to(torch.float64) * GOLDEN, 1.0)
        cells = (frac < split).to(torch.int64)
    if groups is not None:
        cells = cells + (2 if split is not None else 1) * torch.remainder(rows, groups)
    return cells


def jackknife_se(values: torch.Tensor | list[float]) -> float:
    """The delete-a-group jackknife standard error from the ``G`` leave-one-group-out values.

    ``sqrt((G − 1) / G · Σ_g (θ_g − θ̄)²)``.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    g = v.numel()
    return float(((g - 1) / g * (v - v.mean()).square().sum()).sqrt())


class PartitionedStats:
    """One :class:`~lawwatch.stats.residual.ResidualStats` per cell, and the measure they give.

    Offers what the measurement loop uses of ``ResidualStats``: ``update`` (with each example's
    sequence index), ``count``, ``dim``, ``layers``, ``to``, ``all_reduce``,
    ``reduce_scatter_compute`` (here: all-reduce, then every process solves every entry) and
    ``compute`` (the headline values); plus :meth:`uncertainty` for the jackknife.

    Args:
        make: Builds one empty ``ResidualStats`` (the same shape, target and classes for all).
        split: Evaluation fraction (out-of-sample PR), or None.
        metric: ``"pr"`` or ``"separation_fuzziness"``.
        groups: Jackknife groups, or None.
    """

    def __init__(
        self,
        make: Callable[[], ResidualStats],
        *,
        split: float | None = None,
        metric: str = "pr",
        groups: int | None = None,
    ) -> None:
        self.split, self.metric, self.groups = split, metric, groups
        self.parts = 2 if split is not None else 1
        self.cells = [make() for _ in range(self.parts * (groups or 1))]
        # every group together, per part: what the headline values are solved from
        self.totals = [make() for _ in range(self.parts)] if groups is not None else None
        first = self.cells[0]
        self.dim, self.layers, self.num_layers = first.dim, first.layers, first.num_layers
        self.precision = first.precision

    @staticmethod
    def copies(split: float | None, groups: int | None) -> int:
        """Sets of statistics kept for these options: ``(groups + 1) × parts``, or ``parts``."""
        parts = 2 if split is not None else 1
        return parts * (groups + 1) if groups is not None else parts

    @property
    def device(self) -> torch.device:
        """Where the statistics live."""
        return self.cells[0].device

    def _all(self) -> list[ResidualStats]:
        return self.cells + (self.totals or [])

    @property
    def count(self) -> torch.Tensor:
        """Examples in every cell together (a 0-d float64 tensor)."""
        return sum((c.count for c in self.cells[1:]), self.cells[0].count.clone())

    def update(
        self, features: torch.Tensor, targets: torch.Tensor, sequences: torch.Tensor
    ) -> PartitionedStats:
        """Add a batch of examples.

        Args:
            features: ``(L, n, d)`` features.
            targets: ``(n,)`` integer target ids.
            sequences: ``(n,)`` the index in the whole probe of each example's sequence.
        """
        cells = sequence_cells(sequences, self.split, self.groups).to(features.device)
        for cell in torch.unique(cells).tolist():  # host sync: a few cells
            chosen = cells == cell
            self.cells[cell].update(features[:, chosen], targets[chosen.to(targets.device)])
        if self.totals is not None:
            if self.parts == 1:
                self.totals[0].update(features, targets)
            else:
                for part, total in enumerate(self.totals):
                    chosen = cells % self.parts == part
                    total.update(features[:, chosen], targets[chosen.to(targets.device)])
        return self

    def to(self, device: torch.device | str) -> PartitionedStats:
        """Move every cell's statistics to ``device`` in place."""
        for cell in self._all():
            cell.to(device)
        return self

    def all_reduce(self, group: object | None = None) -> PartitionedStats:
        """Sum every cell across the processes of ``group`` (cell by cell)."""
        for cell in self._all():
            cell.all_reduce(group)
        return self

    def reduce_scatter_compute(self, group: object | None = None, **_: Any) -> torch.Tensor:
        """All-reduce, then :meth:`compute` on every process (no sharded solve for cells)."""
        return self.all_reduce(group).compute()

    # -- the measure ----------------------------------------------------------------------------

    def merged(self, *, part: int | None = None, without: int | None = None) -> ResidualStats:
        """The statistics of split ``part`` (None: both) outside jackknife group ``without``.

        ``without=None`` (every group) gives the totals where they are kept.
        """
        if without is None and self.totals is not None:
            chosen = self.totals if part is None else [self.totals[part]]
            total = chosen[0].clone()
            for other in chosen[1:]:
                total.merge(other)
            return total
        chosen = [
            cell
            for index, cell in enumerate(self.cells)
            if (part is None or index % self.parts == part)
            and (without is None or index // self.parts != without)
        ]
        total = chosen[0].clone()
        for cell in chosen[1:]:
            total.merge(cell)
        return total

    def values(self, without: int | None = None) -> torch.Tensor:
        """The per-entry measure, leaving out jackknife group ``without`` if given."""
        if self.split is not None:
            from lawwatch.stats.outofsample import out_of_sample_pr

            return out_of_sample_pr(
                self.merged(part=0, without=without), self.merged(part=1, without=without)
            )
        merged = self.merged(without=without)
        if self.metric == "separation_fuzziness":
            from lawwatch.stats.fuzziness import separation_fuzziness

            return separation_fuzziness(merged)
        return merged.compute()

    def compute(self) -> torch.Tensor:
        """``(entries,)`` float64: PR (out of sample with ``split``) or separation fuzziness."""
        return self.values()

    def uncertainty(self) -> dict[str, Any]:
        """Jackknife standard errors of the law's ``r`` and ``rho`` (empty without groups).

        Each group is left out in turn, the measure recomputed from the other groups'
        statistics and the law refitted; the standard errors are those of
        :func:`jackknife_se` over the ``groups`` refits.

        Raises:
            ValueError: A group without examples (fewer probe sequences than groups).
        """
        if self.groups is None:
            return {}
        from lawwatch.law import fit_law

        per_group = [
            sum(int(self.cells[g * self.parts + p].count.item()) for p in range(self.parts))
            for g in range(self.groups)
        ]  # host sync
        if min(per_group) == 0:
            raise ValueError(
                f"jackknife={self.groups}: group(s) {[g for g, n in enumerate(per_group) if not n]}"
                " hold no example (sequence i is in group i mod groups); use fewer groups than "
                "the probe has sequences with examples."
            )
        fits = [fit_law(self.values(g).cpu(), layers=self.layers) for g in range(self.groups)]
        return {
            "pearson_r_se": jackknife_se([f.pearson_r for f in fits]),
            "rho_se": jackknife_se([f.rho for f in fits]),
            "jackknife_groups": self.groups,
        }
