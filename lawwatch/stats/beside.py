"""Sums of another kind carried beside the PR statistics, as one :class:`Statistics`.

The logit lens (:class:`~lawwatch.stats.lens.Lensed`) and the vital signs
(:class:`~lawwatch.stats.health.Vitals`) keep sums over the same entries as the PR statistics
but are not part of the protocol: everything of the protocol is the inner statistics', and the
carried sums travel with them. :meth:`Beside.all_reduce` and :meth:`Beside.reduce_scatter` (a
collective on every process) also all-reduce the carried sums, so after either every process
holds the whole probe's, and :func:`lawwatch.measurement.solve` puts them into the record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lawwatch.stats import Statistics, Update
    from lawwatch.stats.owned import Owned

__all__ = ["Beside"]


class Beside:
    """PR statistics with other sums beside them: one :class:`~lawwatch.stats.Statistics`.

    Args:
        inner: The PR statistics (plain or partitioned).
        carried: The sums carried beside them, over the same entries, with ``to(device)``,
            ``all_reduce(group)`` and ``merge(other)`` of their own; subclasses name them
            (``lens``, ``health``).
    """

    def __init__(self, inner: Statistics, carried: Any) -> None:
        self.inner = inner
        self.carried = carried
        self.layers: tuple[int, ...] = inner.layers
        self.num_layers: int = inner.num_layers
        self.dim: int = inner.dim
        self.precision: str = inner.precision

    @property
    def count(self) -> torch.Tensor:
        """The PR statistics' examples."""
        return self.inner.count

    @property
    def device(self) -> torch.device:
        """Where the PR statistics live."""
        return self.inner.device

    def begin(
        self,
        targets: torch.Tensor,
        sequences: torch.Tensor | None = None,
        *,
        deferred_check: bool = False,
    ) -> Update:
        """The inner statistics' :meth:`~lawwatch.stats.Statistics.begin` (carried: apart)."""
        return self.inner.begin(targets, sequences, deferred_check=deferred_check)

    def update(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        sequences: torch.Tensor | None = None,
    ) -> Beside:
        """The inner statistics' :meth:`~lawwatch.stats.Statistics.update`."""
        self.inner.update(features, targets, sequences)
        return self

    def to(self, device: torch.device | str) -> Beside:
        """Move both to ``device`` in place."""
        self.inner.to(device)
        self.carried.to(device)
        return self

    def all_reduce(self, group: object | None = None) -> Beside:
        """Reduce both over ``group`` in place, on every process."""
        self.inner.all_reduce(group)
        self.carried.all_reduce(group)
        return self

    def reduce_scatter(self, group: object | None = None) -> None:
        """The inner statistics' collectives before the solve, and the carried sums' reduction."""
        self.inner.reduce_scatter(group)
        self.carried.all_reduce(group)

    def solve_owned(self, group: object | None = None) -> Owned:
        """The inner statistics' share of the solve (the carried sums need none)."""
        return self.inner.solve_owned(group)

    def gather_owned(self, owned: Owned, group: object | None = None) -> torch.Tensor:
        """The inner statistics' values, gathered."""
        return self.inner.gather_owned(owned, group)

    def reduce_scatter_compute(self, group: object | None = None) -> torch.Tensor:
        """:meth:`reduce_scatter`, then the inner solve of every share, gathered."""
        self.reduce_scatter(group)
        return self.gather_owned(self.solve_owned(group), group)

    def compute(self) -> torch.Tensor:
        """The inner statistics' ``(entries,)`` values."""
        return self.inner.compute()

    def replicates(self) -> torch.Tensor | None:
        """The inner statistics' jackknife replicates, or None."""
        return self.inner.replicates()

    def merge(self, other: Beside) -> Beside:
        """Add ``other``'s statistics (both kinds) into these."""
        self.inner.merge(other.inner)
        self.carried.merge(other.carried)
        return self
