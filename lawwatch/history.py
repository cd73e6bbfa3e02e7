"""A snapshot, its record, a history of them, and what makes one series.

A :class:`Snapshot` is one measurement; its *record* is the JSON object of one ``history.jsonl``
line (:meth:`Snapshot.to_record`, :meth:`Snapshot.from_record`: lossless both ways). A
:class:`History` is the records of one series in increasing step order. :func:`series_diff` is
the one rule of what makes another series (the monitor, the history store, ``analyze`` and the
report all ask it; :func:`identity` is what a new record carries). The files a history is kept
in are :mod:`lawwatch.output.store`'s (:func:`~lawwatch.output.store.read_history`); this module
reads and writes none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD, LawFit, emergence_step
from lawwatch.stats.health import HealthKeys
from lawwatch.stats.lens import LensKeys

__all__ = [
    "COST_OPTIONS",
    "SERIES_FIELDS",
    "Change",
    "History",
    "Snapshot",
    "entries",
    "identity",
    "law_points",
    "series",
    "series_diff",
]

_FIT_FIELDS = tuple(LawFit.__dataclass_fields__)  # rho, pearson_r, slope, intercept, r2
_CORE_FIELDS = ("step", "pr", "layers", *_FIT_FIELDS, "n_tokens", "seconds")


@dataclass
class Snapshot:
    """The law measured once.

    Attributes:
        pr: ``(entries,)`` float64 prediction residual of every measured hidden-state entry,
            on CPU.
        fit: The law fitted to ``pr`` at the true entry indices (entry 0 dropped).
        n_tokens: Examples (position, target) the statistics hold.
        seconds: Wall time of the measurement.
        step: Training step, when taken during training.
        extra: More fields of the record (JSON-ready values); ``extra["lens"]``
            (:class:`~lawwatch.stats.lens.LensKeys`) holds the logit lens's metrics when it was
            on (:meth:`lawwatch.stats.lens.LensStats.record`); ``extra["health"]`` the vital
            signs of the residual stream (:meth:`lawwatch.stats.health.HealthStats.record`).
        layers: The true hidden-state entry index of each value of ``pr`` (entry 0 = the
            embeddings); default ``0 … len(pr)-1``.
    """

    pr: torch.Tensor
    fit: LawFit
    n_tokens: int
    seconds: float
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self.layers = tuple(range(len(self.pr))) if self.layers is None else tuple(self.layers)
        if len(self.layers) != len(self.pr):
            raise ValueError(f"{len(self.layers)} layers for {len(self.pr)} PR values.")

    def to_record(self) -> dict[str, Any]:
        """The ``history.jsonl`` record.

        Holds step, pr (a list), layers, the fit's fields, n_tokens, seconds, then ``extra``.
        """
        return {
            "step": self.step,
            "pr": self.pr.tolist(),
            "layers": list(self.layers),
            **self.fit.as_dict(),
            "n_tokens": self.n_tokens,
            "seconds": self.seconds,
            **self.extra,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Snapshot:
        """The snapshot a record was written from (``from_record(s.to_record()) == s``).

        Raises:
            ValueError: The record lacks a field every record has.
        """
        missing = [name for name in _CORE_FIELDS if name not in record and name != "layers"]
        if missing:
            raise ValueError(f"Not a snapshot record: it lacks {missing}.")
        return cls(
            pr=torch.tensor(record["pr"], dtype=torch.float64),
            fit=LawFit.from_record(record),
            n_tokens=record["n_tokens"],
            seconds=record["seconds"],
            step=record["step"],
            extra={k: v for k, v in record.items() if k not in _CORE_FIELDS},
            layers=record.get("layers") or None,
        )


def entries(record: dict[str, Any]) -> list[int]:
    """The true hidden-state entry index of each PR in a record (entry 0 = the embeddings)."""
    layers = record.get("layers")
    return list(layers) if layers else list(range(len(record["pr"])))


def law_points(record: dict[str, Any]) -> tuple[list[int], list[float]]:
    """``(layers, log10 PR)`` of the entries the law is fitted on (the embeddings left out)."""
    pairs = [(e, v) for e, v in zip(entries(record), record["pr"], strict=True) if e != 0]
    bad = [(e, v) for e, v in pairs if v <= 0]
    if bad:
        raise ValueError(
            f"The record of step {record.get('step')} has PR {bad[0][1]!r} at entry {bad[0][0]}: "
            "log10 PR needs PR > 0. PR 0 means OLS interpolated the probe (more feature "
            "dimensions than examples): measure with a larger probe."
        )
    return [e for e, _ in pairs], [math.log10(v) for _, v in pairs]


# -- series -----------------------------------------------------------------------------------

# what every record says it was measured with: the probe's content hash, the measurement options
# (MeasureConfig.to_dict()) and the precision of the forward (lawwatch.precision)
SERIES_FIELDS = ("probe", "config", "precision")
# options that change what a snapshot costs, or what it adds beside the headline numbers (the
# breakdowns, docs/breakdowns.md; the vital signs), not what it measures: a change keeps the
# series, and a record without the additions (older, or turned off) continues it
COST_OPTIONS = frozenset(
    {
        "batch_size",
        "max_onehot_bytes",
        "stats_device",
        "by_group",
        "max_group_bytes",
        "position_buckets",
        "health",
    }
)


def identity(probe: str, config: Mapping[str, Any], precision: str | None = None) -> dict[str, Any]:
    """The series identity a new record carries (the fields of :data:`SERIES_FIELDS`).

    Args:
        probe: The probe's content hash (:meth:`~lawwatch.probe.ProbeSet.content_hash`).
        config: The measurement options, :meth:`~lawwatch.config.MeasureConfig.to_dict`.
        precision: The forward's (:func:`lawwatch.precision.forward_precision`); None where it
            is not known (the identity then lacks it, and :func:`series_diff` compares the rest).
    """
    found = {"probe": probe, "config": dict(config), "precision": precision}
    return {k: v for k, v in found.items() if v is not None}


def series(record: Mapping[str, Any]) -> dict[str, Any]:
    """The series identity a record carries: those of :data:`SERIES_FIELDS` it holds."""
    return {k: record[k] for k in SERIES_FIELDS if record.get(k) is not None}


@dataclass(frozen=True)
class Change:
    """One difference between two series identities (see :func:`series_diff`).

    ``str()`` gives it in words: ``probe (content hash 1a2b… → 3c4d…)``, ``precision float32 →
    bfloat16``, ``layers=None → 4``.

    Attributes:
        field: The field of :data:`SERIES_FIELDS` that differs: ``"probe"`` (the probe's
            content hash), ``"config"`` (a measurement option) or ``"precision"`` (the
            forward's).
        option: For ``"config"``, the name of the option that differs; else None.
        before: The value in the first identity.
        after: The value in the second.
    """

    field: str
    option: str | None
    before: Any
    after: Any

    def __str__(self) -> str:
        if self.field == "probe":
            return f"probe (content hash {str(self.before)[:12]}… → {str(self.after)[:12]}…)"
        if self.field == "precision":
            return f"precision {self.before} → {self.after}"
        return f"{self.option}={self.before!r} → {self.after!r}"


def series_diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Change]:
    """What makes two series identities two series: one :class:`Change` each, empty for one.

    The probe and every option are compared (an option only one side carries is a
    difference); :data:`COST_OPTIONS` change only what a snapshot costs, not what it measures.
    The forward's precision is compared where both say it (an identity made before the model
    can say it carries none). The probe comes first, then the options (those of ``before``
    first), then the precision.
    """
    diff: list[Change] = []
    if before.get("probe") != after.get("probe"):
        diff.append(Change("probe", None, before.get("probe"), after.get("probe")))
    old, new = before.get("config") or {}, after.get("config") or {}
    for name in [*old, *(name for name in new if name not in old)]:
        if name not in COST_OPTIONS and old.get(name) != new.get(name):
            diff.append(Change("config", name, old.get(name), new.get(name)))
    old, new = before.get("precision"), after.get("precision")
    if old and new and old != new:
        diff.append(Change("precision", None, old, new))
    return diff


class History:
    """The records of one series of snapshots, steps strictly increasing.

    A record is a dict with at least ``step``; a full one is :meth:`Snapshot.to_record`'s.
    Iterating yields the records, indexing gives one, ``len`` counts them.

    Args:
        records: Records to start from, steps increasing.
    """

    def __init__(self, records: Iterable[dict[str, Any]] = ()) -> None:
        self.records: list[dict[str, Any]] = []
        for record in records:
            self.append(record)

    # -- the sequence -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, History):
            return self.records == other.records
        return NotImplemented

    def __repr__(self) -> str:
        return f"History({len(self)} snapshots, steps {self.steps})"

    @property
    def steps(self) -> list[int]:
        """The step of every record, in order."""
        return [r["step"] for r in self.records]

    @property
    def last_step(self) -> int | None:
        """The latest step, or None when empty."""
        return self.records[-1]["step"] if self.records else None

    def append(self, item: Snapshot | dict[str, Any]) -> dict[str, Any]:
        """Add a snapshot (or its record) after the last one.

        Returns:
            The record added.

        Raises:
            ValueError: Its step is missing, or not after the last step held.
        """
        record = item.to_record() if isinstance(item, Snapshot) else dict(item)
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"A history record needs a training step (an int), got {step!r}.")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"Step {step} is not after the last recorded step {self.last_step}; a resumed "
                "run first drops what follows its checkpoint (drop_after)."
            )
        self.records.append(record)
        return record

    def drop_after(self, step: int) -> bool:
        """Forget every record with a step above ``step``; whether any was dropped."""
        kept = [r for r in self.records if r["step"] <= step]
        dropped = len(kept) != len(self.records)
        self.records = kept
        return dropped

    # -- what the records say -----------------------------------------------------------------

    def emergence_step(self, threshold: float = DEFAULT_EMERGENCE_THRESHOLD) -> int | None:
        """First step from which r stays below ``threshold`` (see :func:`emergence_step`).

        With the jackknife's ``pearson_r_se`` in the records, r must pass the threshold by more
        than its uncertainty.
        """
        return emergence_step(
            self.steps,
            [r["pearson_r"] for r in self.records],
            threshold=threshold,
            se=[r.get("pearson_r_se") for r in self.records],
        )

    def snapshots(self) -> list[Snapshot]:
        """Every record as a :class:`Snapshot`."""
        return [Snapshot.from_record(r) for r in self.records]

    def pr_matrix(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(steps (S,), entries (E,), pr (S, E) float64)`` of the records holding PRs.

        None when there are none, or when the measured entries changed along the series (then
        only the records hold the PRs).
        """
        rows = [r for r in self.records if r.get("pr")]
        if not rows or len({tuple(entries(r)) for r in rows}) != 1:
            return None
        return (
            torch.tensor([r["step"] for r in rows]),
            torch.tensor(entries(rows[0])),
            torch.tensor([r["pr"] for r in rows], dtype=torch.float64),
        )

    def lens_matrix(self, metric: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(steps (S,), entries (E,), values (S, E) float64)`` of a logit-lens metric.

        ``metric``: one of :attr:`LensKeys.PER_ENTRY <lawwatch.stats.lens.LensKeys.PER_ENTRY>`,
        ``"top1"``, ``"ce"``, ``"kl"`` or ``"entropy"`` (see ``docs/lens.md``). None when no
        record holds the lens, or the measured entries changed along the series.
        """
        rows = [r for r in self.records if LensKeys.of(r) is not None and r.get("pr")]
        if not rows or len({tuple(entries(r)) for r in rows}) != 1:
            return None
        return (
            torch.tensor([r["step"] for r in rows]),
            torch.tensor(entries(rows[0])),
            torch.tensor([LensKeys.of(r)[metric] for r in rows], dtype=torch.float64),
        )

    # -- the breakdowns (docs/breakdowns.md) ---------------------------------------------------

    def group_names(self) -> list[str]:
        """The probe groups the records hold (``by_group``), in order of first appearance."""
        return list(dict.fromkeys(n for r in self.records for n in (r.get("groups") or {})))

    def group_series(self, name: str, field: str = "pearson_r") -> tuple[list[int], list[Any]]:
        """``(steps, values)`` of one group's ``field`` over the records where it has one.

        ``field``: ``pearson_r``, ``rho``, ``n_tokens``, … (a group without a PR has no fit).
        """
        pairs = [
            (r["step"], r["groups"][name][field])
            for r in self.records
            if (r.get("groups") or {}).get(name, {}).get(field) is not None
        ]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def health_matrix(self, metric: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(steps (S,), entries (E,), values (S, E) float64)`` of a vital sign.

        ``metric``: one of :attr:`~lawwatch.stats.health.HealthKeys.PER_ENTRY`, ``"rms"``,
        ``"max_abs"``, ``"kurtosis"`` or ``"nonfinite"`` (see ``docs/dashboard.md``).
        None when no record holds the vital signs (records older than them, or measured with
        ``health=False``), or the measured entries changed along the series.
        """
        rows = [r for r in self.records if HealthKeys.of(r) is not None and r.get("pr")]
        if not rows or len({tuple(entries(r)) for r in rows}) != 1:
            return None
        return (
            torch.tensor([r["step"] for r in rows]),
            torch.tensor(entries(rows[0])),
            torch.tensor([HealthKeys.of(r)[metric] for r in rows], dtype=torch.float64),
        )
