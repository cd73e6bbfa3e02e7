"""The statistics family: sufficient statistics of the probe's examples, reduced and solved.

Modules:

* :mod:`~lawwatch.stats.residual`: :class:`~lawwatch.stats.residual.ResidualStats`, the plain
  measurement's statistics (in-sample PR), and :func:`prediction_residuals`.
* :mod:`~lawwatch.stats.partition`: :class:`~lawwatch.stats.partition.PartitionedStats`, one
  ``ResidualStats`` per cell of the probe (``split``, ``jackknife``, separation fuzziness).
* :mod:`~lawwatch.stats.solver`: the least-squares solve and its rank rule.
* :mod:`~lawwatch.stats.outofsample`, :mod:`~lawwatch.stats.fuzziness`: the measures solved
  from cells.
* :mod:`~lawwatch.stats.lens`: the logit lens's sums, carried beside either kind
  (:class:`~lawwatch.stats.lens.Lensed`).
* :mod:`~lawwatch.stats.health`: the residual stream's vital signs, carried beside either kind
  (:class:`~lawwatch.stats.health.Vitals`).
* :mod:`~lawwatch.stats.build`: :class:`~lawwatch.stats.build.Recipe`, which statistics a
  :class:`~lawwatch.config.MeasureConfig` keeps (the one place that builds them).
* :mod:`~lawwatch.stats.owned`: :class:`~lawwatch.stats.owned.Owned`, one process's share of a
  solve (its status and values), the same for every kind.

Both kinds of statistics are a :class:`Statistics`, so the measurement and the monitor drive
them without knowing which they hold. Everything above the statistics (the law's fit, the
jackknife's refit of it on each replicate) lives in :mod:`lawwatch.measurement` and
:mod:`lawwatch.law`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from lawwatch.stats.owned import Owned

__all__ = ["Statistics", "Update", "wrapped"]

T = TypeVar("T")


class Update(Protocol):
    """A batch being added to a :class:`Statistics`, a consecutive group of entries per call."""

    def add(self, part: slice, features: torch.Tensor, *, owned: bool = False) -> None:
        """Add the entries ``part`` of the batch from ``features`` ``(entries, n, d)``."""

    def finish(self) -> Statistics:
        """Check that every entry came and count the batch's examples."""


class Statistics(Protocol):
    """What the measurement and the monitor use of any statistics.

    **Update.** :meth:`update` adds a whole batch; :meth:`begin` starts one whose entries arrive
    one call at a time (from the capture hooks), with each example's sequence index in the
    whole probe (the partitioned statistics assign cells by it; the plain ones ignore it).

    **Across processes**, the same three phases on every kind, each a collective on every
    process of ``group`` except :meth:`solve_owned` (which may run on a worker thread):
    :meth:`reduce_scatter` (the sums), :meth:`solve_owned` (this process's share of the solve,
    never raising), :meth:`gather_owned` (every process gets every value, or every process
    raises); :meth:`reduce_scatter_compute` runs the three in a row. The plain statistics
    really reduce-scatter (each process solves its own entries); the partitioned ones
    all-reduce (each process solves every entry). Without a process group, :meth:`solve_owned`
    and :meth:`gather_owned` run alone (the one process owns every entry): the background
    worker solves through the same calls on one process as on many.

    **Solve.** :meth:`compute` (one process, or after :meth:`all_reduce`) gives the
    ``(entries,)`` float64 values (PR, out-of-sample PR or separation fuzziness);
    :meth:`replicates` the jackknife's leave-one-group-out values, from which the law is
    refitted above the statistics (:func:`lawwatch.measurement.uncertainty`).

    Attributes:
        layers: The measured entries' true indices.
        num_layers: How many entries (``len(layers)``).
        dim: The feature dimension ``d``.
        precision: The statistics' precision (``"float64"`` or ``"mixed"``).
    """

    layers: tuple[int, ...]
    num_layers: int
    dim: int
    precision: str

    @property
    def count(self) -> torch.Tensor:
        """The examples added (a 0-d float64 tensor; after a reduction, of every process)."""

    @property
    def device(self) -> torch.device:
        """Where the statistics live."""

    def begin(
        self,
        targets: torch.Tensor,
        sequences: torch.Tensor | None = None,
        *,
        deferred_check: bool = False,
    ) -> Update:
        """Start a batch of ``(n,)`` targets (and ``(n,)`` sequence indices)."""

    def update(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        sequences: torch.Tensor | None = None,
    ) -> Statistics:
        """Add a batch: ``(entries, n, d)`` features, ``(n,)`` targets and sequence indices."""

    def to(self, device: torch.device | str) -> Statistics:
        """Move the statistics to ``device`` in place."""

    def all_reduce(self, group: object | None = None) -> Statistics:
        """Sum the statistics of every process of ``group`` in place, on every process."""

    def reduce_scatter(self, group: object | None = None) -> None:
        """The collectives before the solve (see the class docstring)."""

    def solve_owned(self, group: object | None = None) -> Owned:
        """This process's share of the solve; no collective, never raises."""

    def gather_owned(self, owned: Owned, group: object | None = None) -> torch.Tensor:
        """Every process's share: the ``(entries,)`` values, the same on every process."""

    def reduce_scatter_compute(self, group: object | None = None) -> torch.Tensor:
        """:meth:`reduce_scatter`, :meth:`solve_owned`, :meth:`gather_owned` in a row."""

    def compute(self) -> torch.Tensor:
        """The ``(entries,)`` float64 values."""

    def replicates(self) -> torch.Tensor | None:
        """``(groups, entries)`` leave-one-group-out values (jackknife), or None."""


def wrapped(stats: object, kind: type[T]) -> T | None:
    """The statistics of type ``kind`` in ``stats`` or the statistics it wraps (``.inner``).

    The wrappers (the lens, the vital signs, the per-group statistics) each carry their inner
    statistics; a measurement's result is found whatever the order they were built in.
    """
    while stats is not None:
        if isinstance(stats, kind):
            return stats
        stats = getattr(stats, "inner", None)
    return None
