"""Vital signs of the residual stream, per measured entry, from the capture that measures PR.

Pretraining frameworks log per-layer activation statistics because outlier features and
blow-ups precede loss spikes. The capture already holds every measured entry at the probe's
example positions (the rows PR regresses), so :class:`HealthStats` adds them up there, in the
same forward: per entry, over the ``n`` example positions and the ``d`` features of the entry
*as the model computes it* (the block's output upcast to float64, before any ``normalize``;
entry ``L`` the final norm's output), it keeps

* the count of examples and of non-finite values,
* per feature ``j``, the power sums ``S_k = Σ_i (x_ij - s_j)^k``, ``k = 1 … 4``, about a shift
  ``s_j`` (the mean of the entry's first rows: a massive-activation dimension, whose mean dwarfs
  its spread, does not lose its variance or fourth moment to cancellation), and ``Σ_i |x_ij|``,
* the largest ``|x|``.

Every sum is float64 and additive, so statistics of several processes add up: their sums are
re-based exactly on the common mean (one ``(entries, 1 + d)`` all-reduce), then summed (one
all-reduce) and the largest ``|x|`` max-reduced (one more), beside the PR statistics' own
collectives (:class:`Vitals`). From them, per entry (:meth:`HealthStats.record`):

* ``rms``: ``sqrt(Σ_ij x_ij² / (n d))``, the root mean square of the entry's values;
* ``max_abs``: ``max_ij |x_ij|``;
* ``kurtosis``: the mean over features of the population excess kurtosis of each feature over
  the examples, ``m4_j / m2_j² - 3`` (central moments with divisor ``n``: SciPy's
  ``kurtosis(x, axis=0, fisher=True, bias=True)``); 0 for a Gaussian feature, large when a few
  tokens carry a feature's mass. A feature whose standard deviation is at most
  ``CONSTANT_RTOL`` (2⁻⁴⁰) of its root mean square holds no spread float64 can resolve: its
  kurtosis is undefined, it is left out of the mean and counted in ``constant``; ``kurtosis``
  is NaN when every feature is constant (one example, say). An entry without examples has
  every sign NaN;
* ``nonfinite``: the share of the entry's ``n d`` values that are NaN or ±Inf. An entry that
  holds one has ``rms``, ``max_abs`` and ``kurtosis`` NaN and ``massive`` empty (undefined
  there; ``constant`` 0); a snapshot with one is refused anyway (PR is undefined), and its
  error names the entries and their counts (:meth:`HealthStats.nonfinite_summary`);
* ``massive``: the ``MASSIVE_K`` features with the largest mean ``|x|`` over the examples,
  ``[[feature, mean |x|], …]``, largest first: the "massive activation" dimensions.

Cost: a few passes over each entry's ``n × d`` rows (against the Gram's ``n × d²``), measured
in ``BENCHMARKS.md``; ``MeasureConfig(health=False)`` turns it off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lawwatch.stats import wrapped
from lawwatch.stats.beside import Beside

if TYPE_CHECKING:
    from lawwatch.stats import Statistics

__all__ = [
    "CONSTANT_RTOL",
    "MASSIVE_K",
    "WORK_BYTES",
    "HealthKeys",
    "HealthStats",
    "Vitals",
    "health_of",
]

MASSIVE_K = 4
"""How many "massive activation" features a record names per entry."""
WORK_BYTES = 16 * 2**20
"""The workspace of :meth:`HealthStats.add`: about 6 × the rows it takes at once (a capture
chunk of 2 MiB at once)."""
CONSTANT_RTOL = 2.0**-40
"""A feature whose standard deviation is at most this share of its root mean square is constant
(its kurtosis undefined): float64 sums resolve no spread below about 1e-12 of the values."""


class HealthKeys:
    """The keys of the vital signs' part of a record, spelled once (``docs/dashboard.md``).

    A record measured with ``health`` on holds ``record[HealthKeys.FIELD]``, a dict written by
    :meth:`HealthStats.record`; the trackers' keys (:func:`lawwatch.output.sinks.health_scalars`),
    the report's figure and the alert read these names from here.
    """

    FIELD = "health"
    """The record's field (``Snapshot.extra[FIELD]``)."""
    RMS, MAX_ABS, KURTOSIS, NONFINITE = "rms", "max_abs", "kurtosis", "nonfinite"
    PER_ENTRY = (RMS, MAX_ABS, KURTOSIS, NONFINITE)
    """One value per measured entry (see the module docstring)."""
    MASSIVE = "massive"
    """Per entry, ``[[feature, mean |x|], …]``: the largest mean magnitudes, largest first."""
    CONSTANT = "constant"
    """Per entry, how many features have no spread (left out of ``kurtosis``)."""
    EXAMPLES = "examples"
    """The example positions the vital signs are taken over (those of PR)."""

    @staticmethod
    def of(record: Mapping[str, Any]) -> dict[str, Any] | None:
        """The vital signs of a record, or None for a record measured without them."""
        health = record.get(HealthKeys.FIELD)
        return health if isinstance(health, dict) else None


class HealthStats:
    """Additive sums of the vital signs of the measured entries (see the module docstring).

    Args:
        layers: The measured entries' true indices.
        dim: The feature dimension ``d``.
        device: Where the sums live.

    Attributes:
        sums: ``(entries, 2 + 5 d)`` float64: per entry the example count, the non-finite
            count, then ``S_1 … S_4`` and ``Σ|x|`` per feature (one collective sums them all).
        shift: ``(entries, d)`` the shift of each entry's power sums.
        max_abs: ``(entries,)`` the largest ``|x|`` (max-reduced).
    """

    def __init__(
        self, layers: Sequence[int], dim: int, *, device: torch.device | str = "cpu"
    ) -> None:
        self.layers = tuple(layers)
        self.dim = dim
        e = len(self.layers)
        f64 = {"dtype": torch.float64, "device": device}
        self.sums = torch.zeros(e, 2 + 5 * dim, **f64)
        self.shift = torch.zeros(e, dim, **f64)
        self.max_abs = torch.zeros(e, **f64)
        self._shifted = [False] * e  # host-side: whether the entry's shift is set
        self._work: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # see add

    # -- the layout of `sums` -----------------------------------------------------------------

    def _powers(self, index: int | slice = slice(None)) -> torch.Tensor:
        """``(…, 4, d)`` the power sums ``S_1 … S_4`` (a view)."""
        return self.sums[index, 2 : 2 + 4 * self.dim].unflatten(-1, (4, self.dim))

    def _abs(self, index: int | slice = slice(None)) -> torch.Tensor:
        return self.sums[index, 2 + 4 * self.dim :]

    @property
    def count(self) -> torch.Tensor:
        """``(entries,)`` the examples added per entry."""
        return self.sums[:, 0]

    # -- updates ------------------------------------------------------------------------------

    def add(self, index: int, x: torch.Tensor) -> None:
        """Add rows of entry ``index`` (into ``layers``): ``x`` ``(rows, d)`` float64, unchanged.

        No host synchronization (it runs inside the capture's hooks, on the model's device).
        The rows go through a workspace of at most ``WORK_BYTES`` (kept until
        :meth:`release`): their shifted powers and ``|x|`` side by side, summed over the rows
        by one matrix-vector product.
        """
        rows = x.shape[0]
        if rows == 0:
            return
        if x.ndim != 2 or x.shape[1] != self.dim or x.dtype != torch.float64:
            raise ValueError(
                f"Vital signs of width {self.dim} (float64) got rows {tuple(x.shape)} {x.dtype}."
            )
        device = self.sums.device
        if not self._shifted[index]:
            self.shift[index] = x.mean(dim=0).to(device)
            self._shifted[index] = True
        shift = self.shift[index].to(x.device)
        d = self.dim
        step = max(1, WORK_BYTES // (8 * (6 * d + 1)))
        total = torch.zeros(5 * d + 1, dtype=torch.float64, device=x.device)
        largest = torch.zeros((), dtype=torch.float64, device=x.device)
        for lo in range(0, rows, step):
            chunk = x[lo : lo + step]
            n = chunk.shape[0]
            work, ones, scratch = self._workspace(n, x.device)
            u, u2 = work[:, :d], work[:, d : 2 * d]
            torch.sub(chunk, shift, out=u)
            torch.mul(u, u, out=u2)
            torch.mul(u2, u, out=work[:, 2 * d : 3 * d])
            torch.mul(u2, u2, out=work[:, 3 * d : 4 * d])
            magnitude = torch.abs(chunk, out=work[:, 4 * d :])
            columns = ones @ work  # (5 d,) the column sums
            total[: 5 * d] += columns
            largest = torch.maximum(largest, magnitude.amax())
            # the non-finite values: x - x is 0 where finite, NaN where not. Counted always on
            # an accelerator (a check would synchronize); on the CPU only when the column sums
            # say there are any (a non-finite value makes its column's sums non-finite)
            if x.device.type != "cpu" or not bool(torch.isfinite(columns).all()):
                torch.sub(chunk, chunk, out=scratch).nan_to_num_(1.0, 1.0, 1.0)
                total[5 * d] += scratch.sum()
        part = torch.cat([total.new_full((1,), float(rows)), total[5 * d :], total[: 5 * d]])
        self.sums[index] += part.to(device)
        self.max_abs[index] = torch.maximum(self.max_abs[index], largest.to(device))

    def _workspace(
        self, rows: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, 5 d)`` work, ``(rows,)`` ones and ``(rows, d)`` scratch, kept."""
        have = self._work
        if have is None or have[0].shape[0] < rows or have[0].device != device:
            f64 = {"dtype": torch.float64, "device": device}
            have = (
                torch.empty(rows, 5 * self.dim, **f64),
                torch.ones(rows, **f64),
                torch.empty(rows, self.dim, **f64),
            )
            self._work = have
        work, ones, scratch = have
        return work[:rows], ones[:rows], scratch[:rows]

    def release(self) -> None:
        """Drop the workspace of :meth:`add` (adding is done; a later add makes it again)."""
        self._work = None

    def _rebase(self, mean: torch.Tensor) -> None:
        """Re-base the power sums on ``mean`` ``(entries, d)``, exactly (binomial expansion)."""
        c = self.count.unsqueeze(1)  # (E, 1)
        s1, s2, s3, s4 = self._powers().unbind(1)  # (E, d) each
        delta = self.shift - mean  # x - mean = u + delta
        d2 = delta * delta
        new = torch.stack(
            [
                s1 + c * delta,
                s2 + 2 * delta * s1 + c * d2,
                s3 + 3 * delta * s2 + 3 * d2 * s1 + c * d2 * delta,
                s4 + 4 * delta * s3 + 6 * d2 * s2 + 4 * d2 * delta * s1 + c * d2 * d2,
            ],
            dim=1,
        )
        self._powers().copy_(new)
        self.shift = mean.clone()

    def _head(self) -> torch.Tensor:
        """``(entries, 1 + d)``: the count and ``Σx`` per feature (what the common mean needs)."""
        return torch.cat(
            [self.count.unsqueeze(1), self._powers()[:, 0] + self.count.unsqueeze(1) * self.shift],
            dim=1,
        )

    @staticmethod
    def _mean(head: torch.Tensor) -> torch.Tensor:
        count = head[:, :1]
        return torch.where(count > 0, head[:, 1:] / count.clamp(min=1), 0.0)

    def all_reduce(self, group: object | None = None) -> HealthStats:
        """Sum (the largest ``|x|``: max) every process's vital signs in place: 3 collectives.

        The power sums are first re-based on the common mean (an all-reduce of each entry's
        count and ``Σx``), then summed.
        """
        import torch.distributed as dist

        head = self._head()
        dist.all_reduce(head, group=group)
        self._rebase(self._mean(head))
        dist.all_reduce(self.sums, group=group)
        dist.all_reduce(self.max_abs, op=dist.ReduceOp.MAX, group=group)
        self._shifted = [True] * len(self.layers)
        return self

    def merge(self, other: HealthStats) -> HealthStats:
        """Add ``other``'s vital signs (the same entries and width) into these."""
        if other.layers != self.layers or other.dim != self.dim:
            raise ValueError(
                f"Vital signs of entries {other.layers} (width {other.dim}) and {self.layers} "
                f"(width {self.dim})."
            )
        other = other.copy().to(self.sums.device)
        mean = self._mean(self._head() + other._head())
        self._rebase(mean)
        other._rebase(mean)
        self.sums += other.sums
        self.max_abs = torch.maximum(self.max_abs, other.max_abs)
        self._shifted = [a or b for a, b in zip(self._shifted, other._shifted, strict=True)]
        return self

    def copy(self) -> HealthStats:
        """An independent copy."""
        out = HealthStats(self.layers, self.dim, device=self.sums.device)
        out.sums, out.shift, out.max_abs = (
            self.sums.clone(),
            self.shift.clone(),
            self.max_abs.clone(),
        )
        out._shifted = list(self._shifted)
        return out

    def to(self, device: torch.device | str) -> HealthStats:
        """Move the sums to ``device`` in place (the workspace is dropped)."""
        self._work = None
        self.sums, self.shift = self.sums.to(device), self.shift.to(device)
        self.max_abs = self.max_abs.to(device)
        return self

    # -- results ------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The vital signs of a snapshot's record (JSON-ready; see the module docstring)."""
        sums = self.sums.cpu()
        count, nonfinite = sums[:, 0], sums[:, 1]  # (E,)
        c = count.unsqueeze(1).clamp(min=1)
        s1, s2, s3, s4 = (p / c for p in self._powers().cpu().unbind(1))  # per-example means
        shift = self.shift.cpu()
        m1 = s1  # mean - shift
        m2 = s2 - m1 * m1
        m4 = s4 - 4 * m1 * s3 + 6 * m1 * m1 * s2 - 3 * m1**4
        square = s2 + 2 * shift * s1 + shift * shift  # mean x² per feature
        spread = (m2 > 0) & (m2 > CONSTANT_RTOL**2 * square)
        excess = torch.where(spread, m4 / torch.where(spread, m2 * m2, 1.0) - 3, 0.0)
        features = spread.sum(dim=1).tolist()  # (E,)
        top = (self._abs().cpu() / c).topk(min(MASSIVE_K, self.dim), dim=1)
        # defined: the entry has examples, every value finite
        defined = ((count > 0) & (nonfinite == 0)).tolist()
        rms = (square.sum(dim=1) / self.dim).sqrt().tolist()
        max_abs = self.max_abs.cpu().tolist()
        nan = math.nan
        return {
            HealthKeys.EXAMPLES: int(count.max().item()) if len(count) else 0,
            HealthKeys.RMS: [v if ok else nan for v, ok in zip(rms, defined, strict=True)],
            HealthKeys.MAX_ABS: [v if ok else nan for v, ok in zip(max_abs, defined, strict=True)],
            HealthKeys.KURTOSIS: [
                float(excess[i].sum()) / features[i] if ok and features[i] else nan
                for i, ok in enumerate(defined)
            ],
            HealthKeys.NONFINITE: [
                float(nonfinite[i] / (count[i] * self.dim)) if count[i] > 0 else nan
                for i in range(len(self.layers))
            ],
            HealthKeys.CONSTANT: [
                self.dim - features[i] if ok else 0 for i, ok in enumerate(defined)
            ],
            HealthKeys.MASSIVE: [
                [[int(j), float(v)] for j, v in zip(idx.tolist(), val.tolist(), strict=True)]
                if ok
                else []
                for idx, val, ok in zip(top.indices, top.values, defined, strict=True)
            ],
        }

    def nonfinite_summary(self) -> str:
        """Which entries hold NaN or Inf, and how many of their values ("" when none do)."""
        sums = self.sums.cpu()
        parts = [
            f"entry {entry}: {int(sums[i, 1])} of {int(sums[i, 0]) * self.dim} values"
            for i, entry in enumerate(self.layers)
            if sums[i, 1] > 0
        ]
        return "; ".join(parts)


def health_of(stats: object) -> HealthStats | None:
    """The vital signs carried by ``stats`` (looking through its wrappers), or None."""
    vitals = wrapped(stats, Vitals)
    return None if vitals is None else vitals.health


class Vitals(Beside):
    """PR statistics with the vital signs beside them: one :class:`~lawwatch.stats.Statistics`.

    Everything of the protocol is the inner statistics'; the vital signs travel with them:
    :meth:`all_reduce` and :meth:`reduce_scatter` (a collective on every process) also reduce
    :attr:`health`, so after either every process holds the whole probe's, and
    :func:`lawwatch.measurement.solve` puts them into the record. The vital signs are added
    by the capture (:meth:`lawwatch.capture.Capture.stream`'s ``observe``), from the raw
    entries; :meth:`update` (whole batches of features) adds to the inner statistics only.

    Args:
        inner: The PR statistics (plain or partitioned).
        health: The vital signs, over the same entries.
    """

    def __init__(self, inner: Statistics, health: HealthStats) -> None:
        super().__init__(inner, health)

    @property
    def health(self) -> HealthStats:
        """The vital signs' sums (the carried ones)."""
        return self.carried
