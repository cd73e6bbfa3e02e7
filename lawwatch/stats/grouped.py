"""Per-group statistics: the probe's groups each measured beside the whole probe.

:class:`Grouped` is the member of :class:`~lawwatch.stats.Statistics` for ``by_group=True``
(``docs/breakdowns.md``): the measurement's own statistics (``inner``: plain or partitioned,
whatever the options keep) and one plain :class:`~lawwatch.stats.residual.ResidualStats` per
group of the probe. Each example goes to the group of its sequence (a probe's
:attr:`~lawwatch.probe.ProbeSet.group_index`), so a group's statistics are those of its
sequences alone, and its PR is what measuring them alone gives.

**Memory**: ``groups`` more sets of statistics, ``groups × entries × (d + 1)² × 8`` bytes
(with one-hot targets, ``groups ×`` theirs): :func:`group_bytes`, refused above
``max_group_bytes`` before any forward pass. **Time**: a copy of each group's rows of each
entry, and their products (the examples are split, not repeated: about the plain
measurement's products once more). **Across processes**: every group's sums are all-reduced
and every process solves every group (``groups`` in-sample solves, no jackknife).

A group whose PR is undefined (too few examples for the hidden size, no example at all, a
single target value) gets no values and the reason (:meth:`Grouped.breakdown`), never a number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lawwatch.stats.owned import Owned
from lawwatch.stats.residual import ResidualStats
from lawwatch.stats.update import add_whole

__all__ = ["GroupValues", "Grouped", "GroupedUpdate", "group_bytes"]


def group_bytes(groups: int, entries: int, dim: int, outputs: int = 1) -> int:
    """Bytes of the per-group statistics: ``groups × entries × ((d + 1)² + d · outputs) × 8``.

    ``outputs``: the target's columns (1 for a token id, the classes for one-hot).
    """
    return groups * entries * ((dim + 1) ** 2 + dim * outputs) * 8


@dataclass(frozen=True)
class GroupValues:
    """One group's solve.

    Attributes:
        examples: The group's examples (all processes').
        pr: ``(entries,)`` float64 in-sample PR, or None where it is undefined.
        error: Why ``pr`` is None (the solve's message), else None.
    """

    examples: int
    pr: torch.Tensor | None
    error: str | None


class Grouped:
    """The measurement's statistics and one set per group of the probe (module docstring).

    Args:
        inner: The measurement's statistics (the headline numbers come from them alone).
        make: Builds one empty plain ``ResidualStats`` (the inner ones' shape and target).
        names: The groups' names (the whole probe's, so every process keeps every group).
        group_of: ``(sequences,)`` int64 the group index of each sequence of this process's
            probe (its shard).
        first_row: The index, in the whole probe, of that probe's first sequence (the sequence
            indices the statistics are fed are the whole probe's).
    """

    def __init__(
        self,
        inner: object,
        make: Callable[[], ResidualStats],
        names: Sequence[str],
        group_of: torch.Tensor,
        first_row: int = 0,
    ) -> None:
        self.inner = inner
        self.names = tuple(names)
        self.per_group = [make() for _ in self.names]
        self.group_of = group_of.to(torch.int64).cpu()
        self.first_row = first_row
        self.layers: tuple[int, ...] = inner.layers
        self.num_layers: int = inner.num_layers
        self.dim: int = inner.dim
        self.precision: str = inner.precision
        self._solved: list[GroupValues] | None = None

    @property
    def count(self) -> torch.Tensor:
        """The inner statistics' examples (every group's together)."""
        return self.inner.count

    @property
    def device(self) -> torch.device:
        """Where the statistics live."""
        return self.inner.device

    def groups_of(self, sequences: torch.Tensor) -> torch.Tensor:
        """The group index of each example, from its sequence's index in the whole probe."""
        local = sequences.to(torch.int64).cpu() - self.first_row
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= len(self.group_of)):
            raise ValueError(
                f"Sequence indices {int(local.min()) + self.first_row}…"
                f"{int(local.max()) + self.first_row} lie outside this probe's "
                f"{self.first_row}…{self.first_row + len(self.group_of) - 1}."
            )
        return self.group_of[local]

    # -- accumulation -------------------------------------------------------------------------

    def begin(
        self,
        targets: torch.Tensor,
        sequences: torch.Tensor | None = None,
        *,
        deferred_check: bool = False,
    ) -> GroupedUpdate:
        """Start a batch: the inner statistics' and each present group's.

        Raises:
            ValueError: ``sequences`` missing or not shaped like ``targets``.
        """
        if sequences is None or sequences.shape != targets.shape:
            raise ValueError(
                "Per-group statistics need the sequence index of each example, shaped like the "
                f"targets {tuple(targets.shape)}; got "
                f"{None if sequences is None else tuple(sequences.shape)}."
            )
        self._solved = None
        inner = self.inner.begin(targets, sequences, deferred_check=deferred_check)
        groups = self.groups_of(sequences)
        updates = []
        for g in torch.unique(groups).tolist():  # host sync: a few groups
            rows = (groups == g).nonzero().squeeze(1)
            chosen = targets[rows.to(targets.device)]
            updates.append((rows, self.per_group[g].begin(chosen, deferred_check=deferred_check)))
        return GroupedUpdate(self, inner, updates)

    def update(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        sequences: torch.Tensor | None = None,
    ) -> Grouped:
        """Add a batch: ``(entries, n, d)`` features, ``(n,)`` targets and sequence indices."""
        return add_whole(self, features, targets, sequences)

    def to(self, device: torch.device | str) -> Grouped:
        """Move every statistics to ``device`` in place."""
        self._solved = None
        self.inner.to(device)
        for stats in self.per_group:
            stats.to(device)
        return self

    def merge(self, other: Grouped) -> Grouped:
        """Add ``other``'s statistics (the same groups) into these."""
        if other.names != self.names:
            raise ValueError(f"Per-group statistics of groups {other.names} and {self.names}.")
        self._solved = None
        self.inner.merge(other.inner)
        for mine, theirs in zip(self.per_group, other.per_group, strict=True):
            mine.merge(theirs)
        return self

    # -- across processes ---------------------------------------------------------------------

    def all_reduce(self, group: object | None = None) -> Grouped:
        """Sum every statistics over ``group`` in place, on every process."""
        self._solved = None
        self.inner.all_reduce(group)
        for stats in self.per_group:
            stats.all_reduce(group)
        return self

    def reduce_scatter(self, group: object | None = None) -> None:
        """The inner statistics' collectives, and an all-reduce of every group's."""
        self._solved = None
        self.inner.reduce_scatter(group)
        for stats in self.per_group:
            stats.all_reduce(group)

    def solve_owned(self, group: object | None = None) -> Owned:
        """Every group's solve (kept: :meth:`breakdown`), then the inner statistics' share.

        Never raises: a group that cannot be solved keeps its reason.
        """
        self._solved = self._solve_groups()
        return self.inner.solve_owned(group)

    def gather_owned(self, owned: Owned, group: object | None = None) -> torch.Tensor:
        """The inner statistics' values, gathered."""
        return self.inner.gather_owned(owned, group)

    def reduce_scatter_compute(self, group: object | None = None) -> torch.Tensor:
        """:meth:`reduce_scatter`, :meth:`solve_owned`, :meth:`gather_owned` in a row."""
        self.reduce_scatter(group)
        return self.gather_owned(self.solve_owned(group), group)

    # -- the solve ----------------------------------------------------------------------------

    def compute(self) -> torch.Tensor:
        """The inner statistics' ``(entries,)`` values (the whole probe's)."""
        return self.inner.compute()

    def replicates(self) -> torch.Tensor | None:
        """The inner statistics' jackknife replicates (the groups have none)."""
        return self.inner.replicates()

    def breakdown(self) -> dict[str, GroupValues]:
        """Every group's solve, by name: those :meth:`solve_owned` found, else solved now."""
        if self._solved is None:
            self._solved = self._solve_groups()
        return dict(zip(self.names, self._solved, strict=True))

    def _solve_groups(self) -> list[GroupValues]:
        out = []
        for name, stats in zip(self.names, self.per_group, strict=True):
            n = int(stats.count.item())  # host sync
            if n == 0:
                out.append(GroupValues(0, None, f"group {name!r} holds no example"))
                continue
            try:
                out.append(GroupValues(n, stats.compute().cpu(), None))
            except Exception as error:  # a group's own failure: kept, never the whole snapshot
                out.append(GroupValues(n, None, f"group {name!r}: {error}"))
        return out


class GroupedUpdate:
    """One batch being added to a :class:`Grouped`: the inner update and each group's.

    Each group's update gets a copy of its rows of every entry (ours to shift in place).
    """

    def __init__(
        self,
        stats: Grouped,
        inner: object,
        updates: list[tuple[torch.Tensor, object]],
    ) -> None:
        self.stats, self.inner, self.updates = stats, inner, updates

    def add(self, part: slice, features: torch.Tensor, *, owned: bool = False) -> None:
        """Add the entries ``part`` from ``features`` ``(part.stop - part.start, n, d)``."""
        if self.updates and self.updates[0][0].device != features.device:  # moved once
            self.updates = [(rows.to(features.device), update) for rows, update in self.updates]
        for rows, update in self.updates:  # the copies first: the inner may shift in place
            update.add(part, features.index_select(1, rows), owned=True)
        self.inner.add(part, features, owned=owned)

    def finish(self) -> Grouped:
        """Finish every update (see :meth:`~lawwatch.stats.update.BatchUpdate.finish`)."""
        self.inner.finish()
        for _, update in self.updates:
            update.finish()
        return self.stats
