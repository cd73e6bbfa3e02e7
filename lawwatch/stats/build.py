"""Which statistics a measurement keeps: one place maps a MeasureConfig to them.

:class:`Recipe` holds every choice a :class:`~lawwatch.config.MeasureConfig` makes about the
statistics (plain or partitioned, the jackknife's groups, the logit lens beside them, where they
live, their precision), resolved before any forward pass; :meth:`Recipe.build` makes them once
the feature width is known (at the first batch). :func:`jackknife_groups` resolves
``jackknife="auto"``; :func:`checked_groups` adds the one-hot memory check for the groups chosen
(what :func:`lawwatch.measurement.check_settings` refuses before training starts);
:func:`check_group_memory` the per-group statistics' budget (``by_group``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lawwatch.precision import log_statistics_precision
from lawwatch.stats.grouped import Grouped, group_bytes
from lawwatch.stats.health import HealthStats, Vitals
from lawwatch.stats.lens import Lensed, LensStats
from lawwatch.stats.partition import PartitionedStats
from lawwatch.stats.residual import ResidualStats

if TYPE_CHECKING:
    from lawwatch.config import MeasureConfig
    from lawwatch.stats import Statistics
    from lawwatch.targets import Targets

__all__ = [
    "AUTO_JACKKNIFE_BYTES",
    "AUTO_JACKKNIFE_GROUPS",
    "AUTO_JACKKNIFE_SEQUENCES",
    "Counted",
    "Recipe",
    "check_group_memory",
    "checked_groups",
    "jackknife_groups",
    "statistics_device",
]

AUTO_JACKKNIFE_GROUPS = 8
"""Groups of ``jackknife='auto'`` where the jackknife is cheap (see :func:`jackknife_groups`)."""
AUTO_JACKKNIFE_SEQUENCES = 16
"""``jackknife='auto'`` needs this many probe sequences: two per group at least."""
AUTO_JACKKNIFE_BYTES = 1 << 30
"""``jackknife='auto'`` keeps the groups' statistics only when they take at most this many
bytes (1 GiB: a GPT-2 small's 13 entries fit, a 1B model's 23 entries × 2048² do not)."""


def jackknife_groups(
    config: MeasureConfig, sequences: int, entries: int, dim: int, targets: Targets | None = None
) -> int | None:
    """The jackknife groups a measurement keeps: ``config.jackknife``, with ``'auto'`` resolved.

    ``'auto'``: :data:`AUTO_JACKKNIFE_GROUPS` when the probe has at least
    :data:`AUTO_JACKKNIFE_SEQUENCES` sequences and the groups' statistics (groups × entries ×
    (d + 1)² × 8 bytes, per part of ``split``) take at most :data:`AUTO_JACKKNIFE_BYTES`, and
    one-hot statistics (``targets``) still fit ``max_onehot_bytes`` with them; else None.
    Decided from the whole probe's sequence count, so every process decides alike.
    """
    if config.jackknife != "auto":
        return config.jackknife
    groups = AUTO_JACKKNIFE_GROUPS
    parts = 2 if config.split is not None else 1
    if sequences < AUTO_JACKKNIFE_SEQUENCES:
        return None
    if groups * parts * entries * (dim + 1) ** 2 * 8 > AUTO_JACKKNIFE_BYTES:
        return None
    if targets is not None:
        try:
            targets.check_memory(
                entries,
                dim,
                config.max_onehot_bytes,
                copies=PartitionedStats.copies(config.split, groups),
            )
        except ValueError:
            return None
    return groups


def checked_groups(
    config: MeasureConfig, targets: Targets, sequences: int, entries: int, dim: int
) -> int | None:
    """:func:`jackknife_groups`, with the one-hot statistics of every set kept checked to fit.

    Raises:
        ValueError: One-hot statistics over ``max_onehot_bytes`` (naming the knobs that fit).
    """
    groups = jackknife_groups(config, sequences, entries, dim, targets)
    targets.check_memory(
        entries,
        dim,
        config.max_onehot_bytes,
        copies=PartitionedStats.copies(config.split, groups),
    )
    return groups


def check_group_memory(
    config: MeasureConfig, targets: Targets, groups: int, entries: int, dim: int
) -> int:
    """The bytes of ``by_group``'s per-group statistics (0 when off), refused over budget.

    ``groups × entries × ((d + 1)² + d · outputs) × 8`` (:func:`~lawwatch.stats.grouped.
    group_bytes`; ``outputs`` the one-hot classes, else 1).

    Raises:
        ValueError: Over ``max_group_bytes``, naming what fits.
    """
    if not config.by_group:
        return 0
    outputs = 1 if targets.classes is None else targets.classes.numel()
    need = group_bytes(groups, entries, dim, outputs)
    if need > config.max_group_bytes:
        one = group_bytes(1, entries, dim, outputs)
        raise ValueError(
            f"by_group keeps statistics per group: {groups} groups x {entries} entries x "
            f"(d+1)^2 at d={dim} take {need / 2**30:.2f} GiB (float64), over max_group_bytes="
            f"{config.max_group_bytes} ({config.max_group_bytes / 2**30:.2f} GiB). At most "
            f"{config.max_group_bytes // one} groups fit: merge groups, measure fewer entries "
            f"(layers=…), or raise max_group_bytes (at least {need})."
        )
    return need


def statistics_device(config: MeasureConfig, device: torch.device) -> torch.device:
    """Where the statistics live: ``config.stats_device``, else ``device`` (the model's).

    Raises:
        ValueError: A CUDA device that this process does not have.
    """
    if config.stats_device is None:
        return device
    chosen = torch.device(config.stats_device)
    if chosen.type == "cuda" and (
        not torch.cuda.is_available()
        or (chosen.index is not None and chosen.index >= torch.cuda.device_count())
    ):
        raise ValueError(
            f"stats_device={config.stats_device!r}, but this process has "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s); "
            "use 'cpu' or None (the model's device)."
        )
    return chosen


@dataclass(frozen=True)
class Recipe:
    """The statistics a measurement keeps, decided before any forward; all but their width.

    Made by :meth:`of` (which refuses a ``stats_device`` this process lacks before any forward
    pass runs); :meth:`build` makes the statistics when the first batch gives the width.

    Attributes:
        config: The measurement options.
        targets: The targets every batch is regressed on (their kind and one-hot classes).
        layers: The measured entries' true indices.
        sequences: The whole probe's sequence count (every process resolves ``'auto'`` alike).
        features: Where the features arrive (the model's device).
        device: Where the statistics live (:func:`statistics_device`).
        group_names: The probe's groups (``by_group``; the whole probe's names).
        group_of: ``(sequences,)`` the group index of each sequence of this process's probe.
        first_row: That probe's first sequence's index in the whole probe.
        law: False for the logit lens alone (:func:`lawwatch.measurement.measure_lens`): no
            residual statistics, only the examples counted beside the lens's sums.
    """

    config: MeasureConfig
    targets: Targets
    layers: tuple[int, ...]
    sequences: int
    features: torch.device
    device: torch.device
    group_names: tuple[str, ...] = ()
    group_of: torch.Tensor | None = None
    first_row: int = 0
    law: bool = True

    @classmethod
    def of(
        cls,
        config: MeasureConfig,
        targets: Targets,
        *,
        layers: tuple[int, ...],
        sequences: int,
        features: torch.device,
        group_names: tuple[str, ...] = (),
        group_of: torch.Tensor | None = None,
        first_row: int = 0,
        law: bool = True,
    ) -> Recipe:
        """The recipe of ``config``, its statistics' device resolved now.

        Raises:
            ValueError: A ``stats_device`` this process does not have; ``by_group`` for a
                probe without groups.
        """
        device = statistics_device(config, features)
        if config.by_group and group_of is None:
            raise ValueError(
                "by_group=True, but the probe carries no groups: build it with groups "
                "(ProbeSet.from_texts(..., groups=...) or a dict of texts, --group-column, "
                "--group-by-file), or set by_group=False."
            )
        return cls(
            config,
            targets,
            tuple(layers),
            sequences,
            features,
            device,
            tuple(group_names),
            group_of,
            first_row,
            law,
        )

    def position_labels(self) -> tuple[str, ...]:
        """The position buckets' labels (``"0-10"`` …), empty without ``position_buckets``."""
        return position_labels(self.config.position_buckets)

    def build(self, dim: int) -> Statistics:
        """Empty statistics for features of width ``dim``.

        One :class:`~lawwatch.stats.residual.ResidualStats` for the paper's measurement, a
        :class:`~lawwatch.stats.partition.PartitionedStats` (one per cell) for ``split``,
        separation fuzziness and the jackknife's groups; with ``health``, a
        :class:`~lawwatch.stats.health.Vitals` carrying the vital signs beside them; with
        ``lens``, a :class:`~lawwatch.stats.lens.Lensed` carrying the logit lens's sums beside
        those.

        Raises:
            ValueError: One-hot statistics over ``max_onehot_bytes``.
        """
        config, targets, entries = self.config, self.targets, len(self.layers)
        if not self.law:  # the lens alone: its sums beside a count of the examples
            if config.lens is None:
                raise ValueError("The logit lens alone (law=False) needs lens on (lens=1.0).")
            return Lensed(Counted(self.layers, dim, self.device), self._lens())
        groups = checked_groups(config, targets, self.sequences, entries, dim)
        log_statistics_precision(config.precision, self.features)

        def make() -> ResidualStats:
            return ResidualStats(
                entries,
                dim,
                target=targets.kind,
                classes=targets.classes,
                device=self.device,
                rtol=config.rtol,
                layers=self.layers,
                precision=config.precision,
                # products where the features are; only (d, d) sums travel
                compute_on="stats" if self.device == self.features else "features",
            )

        plain: Statistics
        if config.split is None and config.metric == "pr" and groups is None:
            plain = make()
        else:
            plain = PartitionedStats(
                make,
                split=config.split,
                metric=config.metric,
                groups=groups,
                # a group left without examples: no standard error, not an error
                optional=config.jackknife == "auto",
            )
        if config.by_group:
            check_group_memory(config, targets, len(self.group_names), entries, dim)
            plain = Grouped(plain, make, self.group_names, self.group_of, self.first_row)
        if config.health:  # the vital signs, added by the capture beside the PR statistics
            plain = Vitals(plain, HealthStats(self.layers, dim, device=self.device))
        if config.lens is None:
            return plain
        return Lensed(plain, self._lens())

    def _lens(self) -> LensStats:
        """The logit lens's empty sums, with the breakdowns the config asks for."""
        config = self.config
        breakdowns = {}
        if config.by_group:
            breakdowns["groups"] = self.group_names
        if config.position_buckets is not None:
            breakdowns["positions"] = self.position_labels()
        return LensStats(
            self.layers,
            device=self.device,
            precision=config.precision,
            fraction=config.lens or 1.0,
            breakdowns=breakdowns,
        )


class Counted:
    """The statistics of the logit lens alone: a count of the examples, no residual sums.

    What :class:`~lawwatch.stats.lens.Lensed` carries beside the lens when the law is not
    measured (:func:`lawwatch.measurement.measure_lens`): each batch's features are dropped
    as they arrive, so nothing of size ``d²`` is kept and no example minimum applies. It has
    no PR: :meth:`compute` refuses.

    Args:
        layers: The measured entries' true indices.
        dim: The feature width.
        device: Where the count lives.
    """

    precision = "float64"

    def __init__(self, layers: tuple[int, ...], dim: int, device: torch.device) -> None:
        self.layers = tuple(layers)
        self.num_layers = len(self.layers)
        self.dim = dim
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        """Where the count lives."""
        return self.count.device

    def begin(
        self,
        targets: torch.Tensor,
        sequences: torch.Tensor | None = None,
        *,
        deferred_check: bool = False,
    ) -> _CountedUpdate:
        """A batch of ``targets.numel()`` examples, its features dropped as they arrive."""
        del sequences, deferred_check
        return _CountedUpdate(self, targets.numel())

    def compute(self) -> torch.Tensor:
        """Refused: the lens alone measures no PR."""
        raise RuntimeError("The logit lens alone (measure_lens) keeps no residual statistics.")

    def replicates(self) -> None:
        """No jackknife: None."""
        return None


class _CountedUpdate:
    """A batch being added to :class:`Counted`: its entries dropped, its examples counted."""

    def __init__(self, stats: Counted, examples: int) -> None:
        self.stats, self.examples = stats, examples

    def add(self, part: slice, features: torch.Tensor, *, owned: bool = False) -> None:
        """Drop an entry's features (the lens keeps its rows apart)."""
        del part, features, owned

    def finish(self) -> Counted:
        """Count the batch's examples."""
        self.stats.count += self.examples
        return self.stats


def position_labels(buckets: int | None) -> tuple[str, ...]:
    """Labels of ``buckets`` position buckets, in percent of the sequence; empty for None.

    ``"0-10"``, ``"10-20"``, … (``"0-33.3"`` for thirds): tracker-safe (no ``%``).
    """
    if buckets is None:
        return ()
    edges = [round(100 * b / buckets, 1) for b in range(buckets + 1)]
    return tuple(f"{edges[b]:g}-{edges[b + 1]:g}" for b in range(buckets))


def position_buckets(
    positions: torch.Tensor, attention_mask: torch.Tensor, buckets: int
) -> torch.Tensor:
    """The bucket of each example of a batch, row-major like ``positions.nonzero()``.

    Example at position ``j`` of a sequence of ``n`` real tokens: ``floor(j · buckets / n)``.

    Args:
        positions: ``(batch, length)`` bool example mask.
        attention_mask: ``(batch, length)`` the real tokens.
        buckets: How many buckets.
    """
    where = positions.nonzero()  # (n, 2)
    lengths = attention_mask.sum(dim=1)[where[:, 0]]
    return torch.div(where[:, 1] * buckets, lengths, rounding_mode="floor")
