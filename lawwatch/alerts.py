"""Alerts: the law emerged, the law broke, a layer stopped pulling its weight.

Detection is a set of pure functions over a :class:`~lawwatch.history.History`; each looks only
at the snapshots up to the one it judges, so the alerts of a history never change when later
snapshots arrive, and replaying a history gives the same alerts again. :class:`AlertSink` turns
them into notifications, each alert once: a line on the ``"lawwatch"`` logger, and every sink
that can raise an alert of its own (W&B ``run.alert``, trackio).

Four kinds, all opt-in (``LawWatchCallback(probe, alerts=True)``):

- **emerged**: r passed the emergence threshold by more than its uncertainty (with the
  jackknife's standard error: :func:`lawwatch.law.passes`) and has stayed there (the step is
  the first snapshot of that stretch, as :meth:`History.emergence_step` reports it while it
  lasts). r rising above the threshold ends the stretch, though only ``break_margin`` makes a
  break: when r passes again, the alert is raised again at the new emergence step, so the
  latest "emerged" alert always names the step :meth:`History.emergence_step` reports.
- **broke**: after the law had emerged, r rose above ``threshold + break_margin`` at
  ``persistence`` consecutive snapshots: an unstable run (a loss spike, a learning rate too
  high, a bad batch). The law may emerge again later, and is reported again if it does.
- **stalled**: while the law holds, a layer's log10 PR sits above the line fitted to the other
  layers by more than ``stall_tolerance`` of one layer's decay, at ``persistence`` consecutive
  snapshots. The unit is the line's own step per layer, ``|slope|``: a layer whose PR did not
  fall at all below the layer before it (on the line) sits one whole layer's decay above it.
  Judged against the line through the *other* layers (leave one out), so one stalled layer does
  not drag the line towards itself and hide.
- **vitals**: a layer's residual stream jumped between two consecutive snapshots: its largest
  ``|x|`` or its kurtosis grew by ``vitals_factor`` (10×) or more (the vital signs,
  :mod:`lawwatch.stats.health`; records without them raise none). The kurtosis compared is
  the plain one, the record's mean excess kurtosis + 3 (at least 1, 3 for a Gaussian), so a
  feature set near Gaussian does not alert on noise around 0. Outlier features and blow-ups
  precede loss spikes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from lawwatch.history import History, Snapshot, entries, law_points
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD, passes
from lawwatch.stats.health import HealthKeys

__all__ = [
    "Alert",
    "AlertSink",
    "Alerting",
    "Alerts",
    "detect",
    "law_alerts",
    "layer_excess",
    "stall_alerts",
    "vitals_alerts",
]

log = logging.getLogger("lawwatch")

AlertKind = Literal["emerged", "broke", "stalled", "vitals"]
Level = Literal["INFO", "WARN"]


@dataclass(frozen=True)
class Alerts:
    """Which alerts fire, and when. ``Alerts()`` is what ``alerts=True`` means."""

    emerged: bool = True
    """Alert when the law emerges (r at or below the threshold, and staying there)."""
    broke: bool = True
    """Alert when r rises clearly above the threshold after the law had emerged."""
    stalled: bool = True
    """Alert when a layer's PR stops falling while the law holds."""
    threshold: float | None = None
    """r at or below which the law counts as emerged; None takes the monitor's
    ``emergence_threshold`` (default -0.95)."""
    break_margin: float = 0.02
    """How far above the threshold r must rise to count as broken (-0.93 for -0.95): a margin,
    so that r hovering at the threshold does not alert at every snapshot."""
    persistence: int = 2
    """Consecutive snapshots a break or a stall must last before it alerts."""
    stall_tolerance: float = 0.5
    """A layer stalls when its log10 PR sits above the line through the other layers by more
    than this many layers' worth of decay (|slope|): 0.5 = it removed at most half the PR a
    layer removes on the line; 1 = none at all."""

    vitals: bool = True
    """Alert when a layer's largest |x| or kurtosis jumps between two snapshots (the vital
    signs; ``MeasureConfig.health``)."""
    vitals_factor: float = 10.0
    """The jump that alerts: the new value at least this many times the previous snapshot's
    (the kurtosis: excess + 3)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.vitals_factor) and self.vitals_factor > 1):
            raise ValueError(f"vitals_factor must be > 1, got {self.vitals_factor}.")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a Pearson r, in [-1, 1]; got {self.threshold}.")
        if not (math.isfinite(self.break_margin) and self.break_margin >= 0):
            raise ValueError(f"break_margin must be >= 0, got {self.break_margin}.")
        if isinstance(self.persistence, bool) or not isinstance(self.persistence, int):
            raise TypeError(f"persistence must be an int, got {self.persistence!r}.")
        if self.persistence < 1:
            raise ValueError(f"persistence must be at least 1 snapshot, got {self.persistence}.")
        if not (math.isfinite(self.stall_tolerance) and self.stall_tolerance > 0):
            raise ValueError(f"stall_tolerance must be > 0, got {self.stall_tolerance}.")

    @classmethod
    def of(cls, alerts: bool | Alerts | None) -> Alerts | None:
        """``True`` -> ``Alerts()``, ``False``/None -> None, an :class:`Alerts` as it is."""
        if alerts is None or alerts is False:
            return None
        if alerts is True:
            return cls()
        if isinstance(alerts, Alerts):
            return alerts
        raise TypeError(f"alerts must be a bool or a lawwatch.alerts.Alerts, got {alerts!r}.")


@dataclass(frozen=True)
class Alert:
    """One alert.

    Attributes:
        kind: "emerged", "broke", "stalled" or "vitals".
        step: The training step the alert is about (see each kind).
        title: A short title (what W&B shows in the notification's subject).
        text: One sentence with the numbers.
        level: "INFO" (good news) or "WARN".
        layer: The hidden-state entry, for "stalled" and "vitals".
        at: The step of the snapshot that raised it (the latest of a persistent stretch).
    """

    kind: AlertKind
    step: int
    title: str
    text: str
    level: Level
    layer: int | None = None
    at: int | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        """What makes two alerts the same one (each fires once)."""
        return (self.kind, self.step, self.layer)


# -- detection: pure functions over the records ------------------------------------------------


def _threshold(alerts: Alerts, threshold: float | None) -> float:
    if alerts.threshold is not None:
        return alerts.threshold
    return DEFAULT_EMERGENCE_THRESHOLD if threshold is None else threshold


def law_alerts(
    history: History | Sequence[dict[str, Any]],
    *,
    threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
    break_margin: float = 0.02,
    persistence: int = 2,
) -> list[Alert]:
    """The "emerged" and "broke" alerts, in step order, from r along the history.

    The law emerges at the first snapshot whose r passes ``threshold`` (at or below it, and
    with the record's ``pearson_r_se``, by more than its standard error:
    :func:`~lawwatch.law.passes`; the stretch it starts is what
    :meth:`History.emergence_step` reports while it lasts). Once emerged, it
    breaks at the ``persistence``-th consecutive snapshot with r above ``threshold +
    break_margin``; r between the two lines neither breaks it nor, after a break, restores it.
    After a break the law may emerge again.

    Args:
        history: Records (``step``, ``pearson_r``), steps increasing.
        threshold: r at or below which the law counts as emerged.
        break_margin: How far above ``threshold`` r must rise to count towards a break.
        persistence: Consecutive snapshots above the margin that make a break.

    Returns:
        The alerts; "emerged" carries the emergence step, "broke" the first step of the
        stretch above the margin (``at``: the step that completed it).
    """
    alerts: list[Alert] = []
    emerged = False
    # the stretch at or below the threshold that the emergence step starts; r above the
    # threshold ends it (the emergence step moves), though only the margin makes a break
    rose: tuple[int, float] | None = None
    above: list[tuple[int, float]] = []  # the current stretch of snapshots above the margin

    def emerge(step: int, r: float, se: float | None) -> Alert:
        again = any(a.kind == "broke" for a in alerts)
        margin = "" if se is None else f" by more than its standard error ({se:.4f})"
        since = (
            ""
            if rose is None
            else f" (r had risen to {rose[1]:+.4f} at step {rose[0]}, above the threshold: the "
            "law emerges anew from here)"
        )
        return Alert(
            kind="emerged",
            step=step,
            title=f"lawwatch: the law {'re-emerged' if again else 'emerged'}",
            text=(
                f"Pearson r = {r:+.4f} at step {step}, at or below the threshold "
                f"{threshold:+.3f}{margin}: log10 PR falls linearly with depth{since}."
            ),
            level="INFO",
            at=step,
        )

    for record in history:
        step, r = int(record["step"]), float(record["pearson_r"])
        se = record.get("pearson_r_se")
        finite = math.isfinite(r)
        if not emerged:
            if passes(r, se, threshold):
                emerged, above = True, []
                alerts.append(emerge(step, r, se))
                rose = None
            continue
        if not passes(r, None, threshold):  # the stretch ends: the emergence step will move
            rose = rose or (step, r)
        elif rose is not None and passes(r, se, threshold):  # emerged again, at this step
            alerts.append(emerge(step, r, se))
            rose = None
        if not finite or r > threshold + break_margin:
            above.append((step, r))
        else:
            above = []
        if len(above) >= persistence:
            first = above[0][0]
            rs = ", ".join(f"{v:+.4f} (step {s})" for s, v in above)
            alerts.append(
                Alert(
                    kind="broke",
                    step=first,
                    title="lawwatch: the law broke",
                    text=(
                        f"After the law had emerged, Pearson r rose above "
                        f"{threshold + break_margin:+.3f} at {len(above)} snapshots in a row: "
                        f"{rs}. The run may be unstable (loss spike, learning rate, bad data)."
                    ),
                    level="WARN",
                    at=step,
                )
            )
            emerged, above, rose = False, [], None
    return alerts


def layer_excess(record: dict[str, Any]) -> dict[int, float]:
    """How far each layer's log10 PR sits above the line through the other layers.

    For each entry ``l`` of the law (the embeddings excluded), a least-squares line is fitted
    to ``(x, log10 PR)`` of the other entries (``x = l - 1``, as the law's fit), and the excess
    is ``(log10 PR_l - line(x_l)) / |slope|``: in layers' worth of the line's decay. Positive:
    PR higher than the line expects (the layer lags); 1: as high as the line puts the layer
    before it. Entries are left out when fewer than 3 would remain, or the line through the
    others is flat (no decay to measure in).

    Args:
        record: A snapshot record (``pr``, optional ``layers``).

    Returns:
        ``{entry: excess}``.
    """
    layers, log_pr = law_points(record)
    if len(layers) < 4:
        return {}
    xs = [float(e - 1) for e in layers]
    excess: dict[int, float] = {}
    for i, entry in enumerate(layers):
        ox = xs[:i] + xs[i + 1 :]
        oy = log_pr[:i] + log_pr[i + 1 :]
        mx, my = math.fsum(ox) / len(ox), math.fsum(oy) / len(oy)
        sxx = math.fsum((x - mx) ** 2 for x in ox)
        slope = math.fsum((x - mx) * (y - my) for x, y in zip(ox, oy, strict=True)) / sxx
        if not math.isfinite(slope) or slope == 0:
            continue
        predicted = my + slope * (xs[i] - mx)
        excess[entry] = (log_pr[i] - predicted) / abs(slope)
    return excess


def stall_alerts(
    history: History | Sequence[dict[str, Any]],
    *,
    threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
    tolerance: float = 0.5,
    persistence: int = 2,
) -> list[Alert]:
    """The "stalled" alerts, in step order: a layer lagging the line while the law holds.

    A snapshot counts for a layer when the law holds there (r at or below ``threshold``, and the
    line falls: slope < 0) and :func:`layer_excess` of that layer is above ``tolerance``. A
    stall alerts at the ``persistence``-th consecutive such snapshot; the layer alerts again
    only after a snapshot where it no longer counted.

    Args:
        history: Records, steps increasing.
        threshold: r at or below which the law holds.
        tolerance: Excess, in layers' worth of decay, beyond which a layer lags.
        persistence: Consecutive snapshots a stall must last.

    Returns:
        The alerts; ``step`` is the first snapshot of the stall, ``at`` the one that completed
        it, ``layer`` the hidden-state entry.
    """
    alerts: list[Alert] = []
    runs: dict[int, list[tuple[int, float]]] = {}  # entry -> its current stretch of lagging
    fired: set[int] = set()  # entries whose current stretch has alerted
    for record in history:
        step, r = int(record["step"]), float(record["pearson_r"])
        holds = math.isfinite(r) and r <= threshold and record.get("slope", -1.0) < 0
        lagging = {e: x for e, x in layer_excess(record).items() if x > tolerance} if holds else {}
        for entry in list(runs):
            if entry not in lagging:
                del runs[entry]
                fired.discard(entry)
        for entry, excess in sorted(lagging.items()):
            runs.setdefault(entry, []).append((step, excess))
            stretch = runs[entry]
            if len(stretch) >= persistence and entry not in fired:
                fired.add(entry)
                worst = max(x for _, x in stretch)
                alerts.append(
                    Alert(
                        kind="stalled",
                        step=stretch[0][0],
                        title=f"lawwatch: layer {entry} stopped falling",
                        text=(
                            f"Layer {entry}'s PR sits above the law's line by up to "
                            f"{worst:.2f} layers' worth of decay (tolerance {tolerance}) at "
                            f"{len(stretch)} snapshots from step {stretch[0][0]} to {step}: it "
                            "removes less of the next-token residual than its neighbours."
                        ),
                        level="WARN",
                        layer=entry,
                        at=step,
                    )
                )
    return alerts


def vitals_alerts(
    history: History | Sequence[dict[str, Any]], *, factor: float = 10.0
) -> list[Alert]:
    """The "vitals" alerts, in step order: a layer's largest |x| or kurtosis jumped.

    Between each two consecutive records that hold the vital signs over the same entries, an
    entry alerts when its ``max_abs`` or its plain kurtosis (``kurtosis + 3``) at the later one
    is at least ``factor`` times the earlier one's (both finite, the earlier positive): one
    alert per entry and snapshot, naming both numbers of what jumped.

    Args:
        history: Records, steps increasing.
        factor: The jump that alerts (> 1).

    Returns:
        The alerts; ``step`` and ``at`` the later snapshot, ``layer`` the hidden-state entry.
    """
    alerts: list[Alert] = []
    before: tuple[int, list[int], dict[str, Any]] | None = None
    for record in history:
        health = HealthKeys.of(record)
        if health is None:
            before = None
            continue
        step, layers = int(record["step"]), entries(record)
        if before is not None and before[1] == layers:
            old = before[2]
            for i, entry in enumerate(layers):
                jumps = []
                for name, key, shift in (
                    ("largest |x|", HealthKeys.MAX_ABS, 0.0),
                    ("kurtosis (excess + 3)", HealthKeys.KURTOSIS, 3.0),
                ):
                    a, b = old[key][i] + shift, health[key][i] + shift
                    if math.isfinite(a) and math.isfinite(b) and a > 0 and b >= factor * a:
                        jumps.append(f"{name} {a:.4g} -> {b:.4g} ({b / a:.1f}x)")
                if jumps:
                    alerts.append(
                        Alert(
                            kind="vitals",
                            step=step,
                            title=f"lawwatch: layer {entry}'s activations jumped",
                            text=(
                                f"Entry {entry} of the residual stream, step {before[0]} to "
                                f"{step}: {'; '.join(jumps)} (alerting at {factor:g}x). "
                                "Outlier features or a blow-up: loss spikes often follow."
                            ),
                            level="WARN",
                            layer=entry,
                            at=step,
                        )
                    )
        before = (step, layers, health)
    return alerts


def detect(
    history: History | Sequence[dict[str, Any]],
    alerts: Alerts | None = None,
    *,
    threshold: float | None = None,
) -> list[Alert]:
    """Every alert ``alerts`` asks for, ordered by the snapshot that raised it.

    Args:
        history: Records, steps increasing.
        alerts: Which alerts and their tolerances (default :class:`Alerts`()).
        threshold: The emergence threshold when ``alerts.threshold`` is None.
    """
    alerts = alerts or Alerts()
    limit = _threshold(alerts, threshold)
    found: list[Alert] = []
    if alerts.emerged or alerts.broke:
        kinds = {k for k, on in (("emerged", alerts.emerged), ("broke", alerts.broke)) if on}
        found += [
            a
            for a in law_alerts(
                history,
                threshold=limit,
                break_margin=alerts.break_margin,
                persistence=alerts.persistence,
            )
            if a.kind in kinds
        ]
    if alerts.stalled:
        found += stall_alerts(
            history,
            threshold=limit,
            tolerance=alerts.stall_tolerance,
            persistence=alerts.persistence,
        )
    if alerts.vitals:
        found += vitals_alerts(history, factor=alerts.vitals_factor)
    return sorted(found, key=lambda a: a.at if a.at is not None else a.step)


# -- notification -------------------------------------------------------------------------------


@runtime_checkable
class Alerting(Protocol):
    """A sink that can raise an alert in its own tracker (W&B ``run.alert``, trackio)."""

    def alert(self, alert: Alert) -> None:
        """Raise ``alert`` in the tracker."""


class AlertSink:
    """A sink that raises each alert of the growing history once.

    Every alert is logged as a WARNING on the ``"lawwatch"`` logger, then passed to each of
    ``targets`` (sinks with an ``alert(alert)`` method; one that fails is reported, the others
    still get it).

    Args:
        alerts: Which alerts and their tolerances.
        threshold: The emergence threshold when ``alerts.threshold`` is None.
        targets: Where alerts go besides the log (e.g. the W&B sink).
        history: Records measured before this sink existed (a resumed run): their alerts were
            raised by the run that measured them and are not raised again.
    """

    def __init__(
        self,
        alerts: Alerts | None = None,
        *,
        threshold: float | None = None,
        targets: Iterable[Alerting] = (),
        history: History | Sequence[dict[str, Any]] | None = None,
    ) -> None:
        self.alerts = alerts or Alerts()
        self.threshold = threshold
        self.targets = list(targets)
        self.history = History(history or [])
        self.fired: list[Alert] = []
        self._seen = {a.key for a in detect(self.history, self.alerts, threshold=threshold)}

    def write(self, snapshot: Snapshot) -> None:
        """Add the snapshot; raise the alerts it completes."""
        self.history.append(snapshot)
        for alert in detect(self.history, self.alerts, threshold=self.threshold):
            if alert.key in self._seen:
                continue
            self._seen.add(alert.key)
            self.fired.append(alert)
            log.warning("%s (step %d): %s", alert.title, alert.step, alert.text)
            for target in self.targets:
                try:
                    target.alert(alert)
                except Exception:
                    log.exception("lawwatch: %s could not raise an alert", type(target).__name__)

    def close(self) -> None:
        """Nothing to release."""
