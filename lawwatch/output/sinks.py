"""Where snapshots go: the sink protocol, the fan-out, and the one key scheme of every tracker.

A sink receives every snapshot on the logging process (rank 0) and never decides anything about
training. :func:`scalars` is the key scheme every tracker receives
(:mod:`lawwatch.output.trackers`); the local files are :mod:`lawwatch.output.store`'s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from lawwatch.history import Snapshot
from lawwatch.stats.health import HealthKeys
from lawwatch.stats.lens import LensKeys

log = logging.getLogger("lawwatch")

PREFIX = "lawwatch/"
STEP_KEY = "train/global_step"


# -- the key scheme ---------------------------------------------------------------------------


def layer_key(entry: int, entries: int) -> str:
    """``lawwatch/pr/layer_XX``: zero-padded so the keys sort by depth (entry 0 = embeddings).

    Args:
        entry: The hidden-state entry index.
        entries: One more than the deepest entry index of the model (sets the padding).
    """
    width = max(2, len(str(entries - 1)))
    return f"{PREFIX}pr/layer_{entry:0{width}d}"


def scalars(snapshot: Snapshot) -> dict[str, float]:
    """A snapshot as the flat scalars every tracker receives, under one key scheme.

    Keys: ``lawwatch/rho``, ``lawwatch/pearson_r``, ``lawwatch/slope``, ``lawwatch/intercept``,
    ``lawwatch/r2``, ``lawwatch/n_tokens``, ``lawwatch/seconds``, each numeric ``extra`` field
    as ``lawwatch/<name>``, and ``lawwatch/pr/layer_XX`` for hidden-state entry ``XX`` (``00``
    = embeddings; zero-padded so dashboards sort them by depth), and with the logit lens on
    the ``lawwatch/lens/...`` keys of :func:`lens_scalars`; with the breakdowns, the
    ``lawwatch/group/<name>/...`` and ``lawwatch/position/<bucket>/...`` keys of
    :func:`breakdown_scalars`; with the vital signs (on by default), the
    ``lawwatch/health/...`` keys of :func:`health_scalars`. Non-finite fit values are left out
    (several trackers refuse NaN); the step is not a key (each tracker takes it its way).
    """
    values: dict[str, float] = {}
    fields = {**snapshot.fit.as_dict(), "n_tokens": snapshot.n_tokens, "seconds": snapshot.seconds}
    fields.update({k: v for k, v in snapshot.extra.items() if isinstance(v, int | float)})
    for name, value in fields.items():
        if isinstance(value, bool) or not math.isfinite(value):
            continue
        values[PREFIX + name] = value
    for entry, pr in zip(snapshot.layers, snapshot.pr.tolist(), strict=True):
        values[layer_key(entry, snapshot.layers[-1] + 1)] = pr
    lens = LensKeys.of(snapshot.extra)
    if lens is not None:
        values.update(lens_scalars(lens, snapshot.layers))
    values.update(breakdown_scalars(snapshot.extra, snapshot.layers))
    health = HealthKeys.of(snapshot.extra)
    if health is not None:
        values.update(health_scalars(health, snapshot.layers))
    return values


def health_scalars(health: dict, layers: tuple[int, ...]) -> dict[str, float]:
    """The vital signs' keys of :func:`scalars` (``health``: a record's ``health`` field).

    ``lawwatch/health/<rms|max_abs|kurtosis>/layer_XX`` per entry (a NaN, undefined, left
    out) and ``lawwatch/health/nonfinite``, the largest share of non-finite values over the
    entries: ``3 × entries + 1`` keys. The massive-activation features stay in the record
    and the report (``docs/dashboard.md``).
    """
    width = max(2, len(str(layers[-1])))
    values: dict[str, float] = {}
    for metric in (HealthKeys.RMS, HealthKeys.MAX_ABS, HealthKeys.KURTOSIS):
        for entry, value in zip(layers, health[metric], strict=True):
            if math.isfinite(value):
                values[f"{PREFIX}health/{metric}/layer_{entry:0{width}d}"] = value
    shares = [v for v in health[HealthKeys.NONFINITE] if math.isfinite(v)]
    if shares:
        values[f"{PREFIX}health/{HealthKeys.NONFINITE}"] = max(shares)
    return values


def breakdown_scalars(record: dict, layers: tuple[int, ...]) -> dict[str, float]:
    """The breakdowns' keys of :func:`scalars` (``record``: a record, or a snapshot's extra).

    Per group (``record["groups"]``): ``lawwatch/group/<name>/<rho|pearson_r|slope|intercept|
    r2|n_tokens>``, ``lawwatch/group/<name>/pr/layer_XX`` and, with the lens, its keys under
    ``lawwatch/group/<name>/lens/...`` (as :func:`lens_scalars`); a group without a PR (its
    ``error`` says why) gives ``n_tokens`` alone. Per position bucket (``record["positions"]``):
    the lens's keys under ``lawwatch/position/<bucket>/lens/...``.
    """
    values: dict[str, float] = {}
    entries = layers[-1] + 1
    for name, group in (record.get("groups") or {}).items():
        base = f"{PREFIX}group/{name}/"
        values[base + "n_tokens"] = group["n_tokens"]
        if group.get("pr") is not None:
            for field in ("rho", "pearson_r", "slope", "intercept", "r2"):
                value = group.get(field)
                if isinstance(value, int | float) and math.isfinite(value):
                    values[base + field] = value
            for entry, pr in zip(layers, group["pr"], strict=True):
                values[base + layer_key(entry, entries).removeprefix(PREFIX)] = pr
        if group.get("lens") is not None:
            values.update(lens_scalars(group["lens"], layers, prefix=base))
    for bucket, lens in (record.get("positions") or {}).items():
        values.update(lens_scalars(lens, layers, prefix=f"{PREFIX}position/{bucket}/"))
    return values


def lens_scalars(lens: dict, layers: tuple[int, ...], prefix: str = PREFIX) -> dict[str, float]:
    """The logit lens's keys of :func:`scalars` (``lens``: a record's ``lens`` field).

    ``lawwatch/lens/<top1|ce|kl|entropy>/layer_XX`` per entry; the prediction depth as the
    share of examples per entry, ``lawwatch/lens/<first_correct|final>/layer_XX`` and
    ``…/never``; ``lawwatch/lens/<first_correct_mean|final_mean|gap_mean>`` (mean entry
    index, left out when no example has one) and ``lawwatch/lens/examples``. A lens that read
    no example gives ``lawwatch/lens/examples`` (0) alone: its metrics are NaN, left out as
    non-finite fit values are. ``prefix``: where the keys go (a group's, a bucket's).
    """
    width = max(2, len(str(layers[-1])))
    values: dict[str, float] = {f"{prefix}lens/{LensKeys.EXAMPLES}": lens[LensKeys.EXAMPLES]}
    for metric in LensKeys.PER_ENTRY:
        for entry, value in zip(layers, lens[metric], strict=True):
            if math.isfinite(value):  # NaN: the lens read no example
                values[f"{prefix}lens/{metric}/layer_{entry:0{width}d}"] = value
    for depth in LensKeys.DEPTHS:
        total = sum(lens[depth])
        if not total:  # no example: no share
            continue
        for entry, count in zip((*layers, "never"), lens[depth], strict=True):
            name = "never" if entry == "never" else f"layer_{entry:0{width}d}"
            values[f"{prefix}lens/{depth}/{name}"] = count / total
    for name in LensKeys.MEANS:
        if lens.get(name) is not None:
            values[f"{prefix}lens/{name}"] = lens[name]
    return values


# -- protocols and the fan-out ----------------------------------------------------------------


@runtime_checkable
class Sink(Protocol):
    """Receives snapshots. ``write`` must not raise for a well-formed snapshot."""

    def write(self, snapshot: Snapshot) -> None:
        """Record one snapshot."""

    def close(self) -> None:
        """Flush and release resources (end of training)."""


@runtime_checkable
class Rewindable(Protocol):
    """A sink that keeps a record a resumed run continues: it can forget what followed a step.

    The monitor calls :meth:`drop_after` with the resume step on the logging process, so the
    resumed run writes one increasing sequence of steps.
    """

    def drop_after(self, step: int) -> None:
        """Forget every snapshot after ``step``."""


def threadsafe(sink: Sink) -> bool:
    """Whether ``sink`` may be written from the monitor's background worker thread.

    A sink says so with a true ``threadsafe`` attribute: it must share no state with the
    training thread (:class:`~lawwatch.output.store.LocalHistory`, which writes lawwatch's own
    files, does). The others (trackers, whose run or writer the training loop logs into too)
    are written on the training thread when the monitor collects a background result.
    """
    return bool(getattr(sink, "threadsafe", False))


class Sinks:
    """Fan-out to several sinks; a failing sink is reported and the others still run.

    This is also the null sink: ``Sinks([])`` accepts everything and does nothing.
    """

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        """Refuse, when built, what is not a sink (so it cannot fail at every snapshot).

        Raises:
            TypeError: ``sinks`` not a list of objects with callable ``write`` and ``close``.
        """
        if isinstance(sinks, str | bytes) or not isinstance(sinks, Iterable | None):
            raise TypeError(f"sinks must be a list of sinks, got {type(sinks).__name__}.")
        self.sinks: list[Sink] = list(sinks or [])
        for sink in self.sinks:
            if not all(callable(getattr(sink, verb, None)) for verb in ("write", "close")):
                raise TypeError(
                    f"{sink!r} is not a sink: a sink has write(snapshot) and close() methods "
                    "(see lawwatch.output.sinks.Sink)."
                )

    def write(self, snapshot: Snapshot, *, threads: bool | None = None) -> None:
        """Pass the snapshot to every sink.

        Args:
            snapshot: The snapshot.
            threads: If given, only the sinks whose :func:`threadsafe` is this value.
        """
        for sink in self.sinks:
            if threads is not None and threadsafe(sink) != threads:
                continue
            try:
                sink.write(snapshot)
            except Exception:
                log.exception(
                    "lawwatch: sink %s failed at step %s", type(sink).__name__, snapshot.step
                )

    def drop_after(self, step: int) -> None:
        """Rewind every :class:`Rewindable` sink to ``step``."""
        for sink in self.sinks:
            if isinstance(sink, Rewindable):
                try:
                    sink.drop_after(step)
                except Exception:
                    log.exception("lawwatch: rewinding sink %s failed", type(sink).__name__)

    def close(self) -> None:
        """Close every sink."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("lawwatch: closing sink %s failed", type(sink).__name__)
