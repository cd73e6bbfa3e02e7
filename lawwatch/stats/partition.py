"""The partitioned statistics: out-of-sample PR, separation fuzziness and the jackknife's groups.

Owns :class:`PartitionedStats` (the member of :class:`~lawwatch.stats.Statistics` for the
options ``split``, ``metric="separation_fuzziness"`` and ``jackknife``), the assignment of
examples to cells (:func:`sequence_cells`) and the jackknife's standard error. The refit of the
law on each leave-one-group-out measure is not here: :func:`lawwatch.measurement.uncertainty`
does it from :meth:`PartitionedStats.replicates`.

A :class:`PartitionedStats` keeps one :class:`~lawwatch.stats.residual.ResidualStats` per
*cell*, a cell being a (jackknife group, split part) pair, each example going to the cell of
the probe sequence it comes from. Cells are assigned by the sequence's index ``i`` in the whole
probe (a process's shard knows its first row), so a distributed run and a single process put
every sequence in the same cell:

* **split part**: sequence ``i`` is in the evaluation part when ``frac(i · φ) < split``
  (``φ = (√5 − 1) / 2``, a low-discrepancy sequence: of any ``N`` consecutive sequences the
  evaluation part holds ``split · N`` up to ``O(log N)``), else in the fit part.
* **jackknife group**: ``i mod groups`` (round robin).

Memory: one ``ResidualStats`` per cell, plus, with ``jackknife``, one per split part holding all
groups (the *totals*, from which the headline values are solved: the same, to the bit, whatever
the number of groups): ``(groups + 1) × (2 with split, else 1)`` times the plain measurement's.
A batch streams one entry at a time like the plain measurement's
(:meth:`PartitionedStats.begin`). With the jackknife the totals' update feeds the cells
(:class:`~lawwatch.stats.update.Cells`): the cells take their sums about the totals' shifts, the
Gram of each sequence's rows is formed once and added to the totals and to its cell (sequences
of fewer than ``SEQUENCE_ROWS`` examples: the cells form their own products, of a copy of their
rows), and a leave-one-group-out measure is solved from the totals minus that group's cells (for
PR without ``split``, every group's in one scratch the size of the totals, the solve's matrices
built over its Gram: no further ``L·d²`` allocation). Without it, each cell takes a copy of its
own rows. The transient is about two entries' ``n × d`` float64 features (``n`` the batch's
examples).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lawwatch.stats.owned import Owned, place
from lawwatch.stats.residual import ResidualStats
from lawwatch.stats.solver import Method
from lawwatch.stats.update import BatchUpdate, Cells, add_whole

__all__ = ["GOLDEN", "PartitionedStats", "PartitionedUpdate", "jackknife_se", "sequence_cells"]

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

    A :class:`~lawwatch.stats.Statistics`: fed by :meth:`update` or, an entry at a time, by
    :meth:`begin` (both with each example's sequence index), reduced across processes by
    :meth:`reduce_scatter` (an all-reduce here: see there) and solved by :meth:`compute` or
    :meth:`solve_owned` / :meth:`gather_owned`; :meth:`replicates` gives the jackknife's
    leave-one-group-out measures.

    Args:
        make: Builds one empty ``ResidualStats`` (the same shape, target and classes for all).
        split: Evaluation fraction (out-of-sample PR), or None.
        metric: ``"pr"`` or ``"separation_fuzziness"``.
        groups: Jackknife groups, or None.
        optional: A group left without examples gives no replicates (no standard error)
            instead of an error: the groups ``jackknife="auto"`` chose.
    """

    def __init__(
        self,
        make: Callable[[], ResidualStats],
        *,
        split: float | None = None,
        metric: str = "pr",
        groups: int | None = None,
        optional: bool = False,
    ) -> None:
        self.split, self.metric, self.groups = split, metric, groups
        # groups chosen by jackknife="auto": a group without examples means no standard error,
        # not an error (decided after the reduction, so alike on every process)
        self.optional = optional
        self.parts = 2 if split is not None else 1
        self.cells = [make() for _ in range(self.parts * (groups or 1))]
        # every group together, per part: what the headline values are solved from
        self.totals = [make() for _ in range(self.parts)] if groups is not None else None
        first = self.cells[0]
        self.dim, self.layers, self.num_layers = first.dim, first.layers, first.num_layers
        self.precision = first.precision
        # (values, replicates) of the last solve_owned: the worker's solve, read back by
        # `replicates` on the training thread; forgotten when the statistics change
        self._solved: tuple[torch.Tensor, torch.Tensor | None] | None = None

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

    # -- accumulation ---------------------------------------------------------------------------

    def begin(
        self,
        targets: torch.Tensor,
        sequences: torch.Tensor | None = None,
        *,
        deferred_check: bool = False,
    ) -> PartitionedUpdate:
        """Start adding a batch whose entries arrive one call at a time.

        Args:
            targets: ``(n,)`` integer target token ids.
            sequences: ``(n,)`` the index in the whole probe of each example's sequence.
            deferred_check: See :meth:`ResidualStats.begin`.

        Raises:
            ValueError: ``sequences`` missing or not shaped like ``targets``.
        """
        if sequences is None or sequences.shape != targets.shape:
            raise ValueError(
                "Partitioned statistics (split, jackknife, separation fuzziness) need the "
                "sequence index of each example, shaped like the targets "
                f"{tuple(targets.shape)}; got "
                f"{None if sequences is None else tuple(sequences.shape)}."
            )
        self._solved = None
        return PartitionedUpdate(self, targets, sequences, deferred_check)

    def update(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        sequences: torch.Tensor | None = None,
    ) -> PartitionedStats:
        """Add a batch of examples.

        Args:
            features: ``(L, n, d)`` features.
            targets: ``(n,)`` integer target ids.
            sequences: ``(n,)`` the index in the whole probe of each example's sequence.
        """
        return add_whole(self, features, targets, sequences)

    def to(self, device: torch.device | str) -> PartitionedStats:
        """Move every cell's statistics to ``device`` in place."""
        self._solved = None
        for cell in self._all():
            cell.to(device)
        return self

    # -- across processes -----------------------------------------------------------------------

    def all_reduce(self, group: object | None = None) -> PartitionedStats:
        """Sum every cell across the processes of ``group`` (cell by cell)."""
        self._solved = None
        for cell in self._all():
            cell.all_reduce(group)
        return self

    def reduce_scatter(self, group: object | None = None) -> None:
        """The collectives before the solve: here an **all-reduce** of every cell.

        Not a reduce-scatter: the measure of an entry needs several cells (and the jackknife
        every group's), so every process keeps every cell's sums and solves every entry
        (:meth:`solve_owned`); the statistics stay usable afterwards.
        """
        self.all_reduce(group)

    def solve_owned(self, group: object | None = None, *, method: Method = "auto") -> Owned:
        """Solve every entry (and the jackknife's replicates) on this process; no collective.

        Every process holds every cell after :meth:`reduce_scatter`, so each solves all
        entries (the same numbers everywhere). Never raises: a failure is kept in the result
        (and raised on every process by :meth:`gather_owned`). Safe to run on another thread
        than the collectives'.

        Args:
            group: Unused (the signature of every :class:`~lawwatch.stats.Statistics`).
            method: The solve of in-sample PR (:mod:`lawwatch.stats.solver`); out-of-sample PR
                and separation fuzziness always use the eigendecomposition.
        """

        def values() -> torch.Tensor:
            values = self.values(method=method)
            self._solved = (values, self._replicates(method))
            return values

        return Owned.solve(self.num_layers, self.device, values)

    def gather_owned(self, owned: Owned, group: object | None = None) -> torch.Tensor:
        """The values :meth:`solve_owned` found, once every process's status is known.

        Only the one-number status is all-reduced (every process solved everything).

        Raises:
            Exception: The solve failed on some process: its own error there, a
                ``RuntimeError`` naming the failure on the others.
        """
        import torch.distributed as dist

        status = owned.buffer[:1].clone()
        if place(group)[1] > 1:
            dist.all_reduce(status, op=dist.ReduceOp.MAX, group=group)
        owned.raise_failure("another process" if status.item() != 0.0 else None)  # host sync
        return owned.buffer[1:].clone()

    def reduce_scatter_compute(
        self, group: object | None = None, *, method: Method = "auto"
    ) -> torch.Tensor:
        """:meth:`reduce_scatter` (an all-reduce), :meth:`solve_owned`, :meth:`gather_owned`."""
        self.reduce_scatter(group)
        return self.gather_owned(self.solve_owned(group, method=method), group)

    # -- the measure ----------------------------------------------------------------------------

    def merged(self, *, part: int | None = None, without: int | None = None) -> ResidualStats:
        """The statistics of split ``part`` (None: both) outside jackknife group ``without``.

        Where the totals are kept (the jackknife), ``without=None`` gives them (for one part:
        that part's own statistics, not a copy: read them, do not modify them), and
        ``without=g`` the totals minus group ``g``'s cells (one subtraction, not a merge of
        every other group).
        """
        if self.totals is not None:
            chosen = self.totals if part is None else [self.totals[part]]
            if without is None and len(chosen) == 1:
                return chosen[0]
            parts = [] if without is None else range(self.parts) if part is None else [part]
            left_out = [self.cells[without * self.parts + p] for p in parts]
            if len(chosen) == 1:  # one subtraction into new sums: no copy of the totals
                total = chosen[0].difference(left_out.pop(0))
            else:
                total = chosen[0].clone()
                for other in chosen[1:]:
                    total.merge(other)
            for cell in left_out:
                total.subtract(cell)
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

    def values(self, without: int | None = None, *, method: Method = "auto") -> torch.Tensor:
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
        return merged.compute(method=method)

    def compute(self, *, method: Method = "auto") -> torch.Tensor:
        """``(entries,)`` float64: PR (out of sample with ``split``) or separation fuzziness."""
        return self.values(method=method)

    def replicates(self) -> torch.Tensor | None:
        """``(groups, entries)``: the measure with each jackknife group left out; None without.

        Those :meth:`solve_owned` found, if the statistics did not change since.

        Raises:
            ValueError: A group without examples (fewer probe sequences than groups), unless
                the groups are ``optional``: then None.
        """
        if self._solved is not None:
            return self._solved[1]
        return self._replicates("auto")

    def _replicates(self, method: Method) -> torch.Tensor | None:
        if self.groups is None:
            return None
        per_group = [
            sum(int(self.cells[g * self.parts + p].count.item()) for p in range(self.parts))
            for g in range(self.groups)
        ]  # host sync
        if min(per_group) == 0:
            if self.optional:
                return None
            raise ValueError(
                f"jackknife={self.groups}: group(s) {[g for g, n in enumerate(per_group) if not n]}"
                " hold no example (sequence i is in group i mod groups); use fewer groups than "
                "the probe has sequences with examples."
            )
        if self.totals is None or self.parts != 1 or self.metric != "pr":
            return torch.stack([self.values(g, method=method) for g in range(self.groups)])
        # each replicate's sums and solve in one scratch: no (L, d, d) allocation per group
        scratch, rows = None, []
        for g in range(self.groups):
            scratch = self.totals[0].difference(self.cells[g], out=scratch)
            rows.append(scratch._compute_scratch(method=method))
        return torch.stack(rows)


# per-sequence products (see `Cells`) where the batch's sequences have at least this many
# examples on average: below, the extra pass over the d² sums per sequence costs more than a
# second product of the rows (BENCHMARKS.md, "A snapshot against its forward")
SEQUENCE_ROWS = 96


def _cells(stats: PartitionedStats, cells: torch.Tensor, sequences: torch.Tensor) -> Cells:
    """The jackknife's cells among some rows of a batch: ``cells`` and ``sequences`` ``(m,)``."""
    present = torch.unique(cells).tolist()  # host sync: a few cells
    rows = [(cells == c).nonzero().squeeze(1) for c in present]
    chosen = [stats.cells[c] for c in present]
    # runs of one sequence's rows: the examples of a sequence are consecutive (row-major)
    _, counts = torch.unique_consecutive(sequences, return_counts=True)
    counts = counts.tolist()  # host sync
    if not counts or sequences.numel() < SEQUENCE_ROWS * len(counts):
        return Cells(chosen, rows)
    where = {c: i for i, c in enumerate(present)}
    starts = [0]
    for count in counts[:-1]:
        starts.append(starts[-1] + count)
    first_cells = cells[torch.tensor(starts, device=cells.device)].tolist()  # host sync
    runs = [
        (lo, lo + count, where[c]) for lo, count, c in zip(starts, counts, first_cells, strict=True)
    ]
    return Cells(chosen, rows, runs)


class PartitionedUpdate:
    """One batch being added to a :class:`PartitionedStats`, its entries in any number of calls.

    Made by :meth:`PartitionedStats.begin`. With the jackknife, each total (one per split
    part) gets a :class:`~lawwatch.stats.update.BatchUpdate` that also feeds the cells of
    its rows (:class:`~lawwatch.stats.update.Cells`); without, each cell present in the
    batch gets its own. :meth:`add` hands each update a copy of its rows of the entries (the
    totals of a probe without split take the caller's tensor itself). Same contract as
    ``BatchUpdate``.
    """

    def __init__(
        self,
        stats: PartitionedStats,
        targets: torch.Tensor,
        sequences: torch.Tensor,
        deferred_check: bool,
    ) -> None:
        self.stats = stats
        cells = sequence_cells(sequences, stats.split, stats.groups)  # (n,)
        # (rows, update): rows None means every row
        self.updates: list[tuple[torch.Tensor | None, BatchUpdate]] = []

        def begin(stats_: ResidualStats, rows: torch.Tensor | None, with_cells=None) -> None:
            chosen = targets if rows is None else targets[rows.to(targets.device)]
            update = stats_.begin(chosen, deferred_check=deferred_check, cells=with_cells)
            self.updates.append((rows, update))

        if stats.totals is None:  # no jackknife: each cell its own copy of its rows
            for cell in torch.unique(cells).tolist():  # host sync: a few cells
                begin(stats.cells[cell], (cells == cell).nonzero().squeeze(1))
            return
        # the jackknife: the cells are fed by the totals' update (one shift, see `Cells`)
        for part, total in enumerate(stats.totals):
            rows = None if stats.parts == 1 else (cells % stats.parts == part).nonzero().squeeze(1)
            if rows is not None and not rows.numel():
                continue
            mine = cells if rows is None else cells[rows]
            seqs = sequences if rows is None else sequences[rows.to(sequences.device)]
            begin(total, rows, _cells(stats, mine, seqs.to(mine.device)))

    def add(self, part: slice, features: torch.Tensor, *, owned: bool = False) -> None:
        """Add the entries ``part`` from ``features`` ``(part.stop - part.start, n, dim)``.

        Args:
            part: The next entries (see :meth:`BatchUpdate.add`).
            features: Any float dtype, any device.
            owned: See :meth:`BatchUpdate.add`.
        """
        for rows, update in self.updates:
            if rows is None:
                update.add(part, features, owned=owned)
            else:  # a fresh copy of the cell's rows: ours to shift in place
                update.add(part, features.index_select(1, rows.to(features.device)), owned=True)

    def finish(self) -> PartitionedStats:
        """Finish every cell's batch (see :meth:`BatchUpdate.finish`)."""
        for _, update in self.updates:
            update.finish()
        return self.stats
