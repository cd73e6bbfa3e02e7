"""The report's figures of the breakdowns: the law per group, the logit lens per position.

Drawn by :func:`lawwatch.report.figures.render` where a run's records hold them
(``docs/breakdowns.md``): :data:`BREAKDOWN_FIGURES`. Each run gets a row; the groups of one
run are overlaid on its panels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lawwatch.history import entries
from lawwatch.report.runs import Run
from lawwatch.stats.lens import LensKeys

__all__ = ["BREAKDOWN_FIGURES", "groups_figure", "positions_figure"]

BREAKDOWN_FIGURES = {
    "groups": "Per group of the probe: log10 PR per layer (latest snapshot, fitted lines) and "
    "Pearson r over training, the groups of a run overlaid",
    "positions": "Logit lens per position bucket (latest snapshot): top-1 per layer, and the "
    "mean first-correct and final layers and their gap per bucket",
}
"""Drawn when a run's records hold ``groups`` (``by_group``) or ``positions``."""


def _color(index: int) -> str:
    from lawwatch.report.figures import OKABE_ITO

    return OKABE_ITO[index % len(OKABE_ITO)]


def groups_figure(runs: list[Run]) -> Any:
    """Per run with group records: each group's PR curve (latest) and r over training.

    A third panel, where the groups carry the lens: the mean first-correct / final gap of each
    group over training. None when no run's records hold groups.
    """
    from lawwatch.report.figures import _new_figure, _step_axis

    grouped = [(run, [r for r in run.records if r.get("groups")]) for run in runs]
    grouped = [(run, records) for run, records in grouped if records]
    if not grouped:
        return None
    lens = any(
        g.get("lens") for _, records in grouped for r in records for g in r["groups"].values()
    )
    panels = 3 if lens else 2
    fig = _new_figure(4.6 * panels, 3.8 * len(grouped))
    axes = fig.subplots(len(grouped), panels, squeeze=False)
    for (run, records), row in zip(grouped, axes, strict=True):
        names = list(dict.fromkeys(n for r in records for n in r["groups"]))
        latest = records[-1]
        layers = entries(latest)
        for i, name in enumerate(names):
            color = _color(i)
            group = latest["groups"].get(name) or {}
            if group.get("pr") is not None:
                points = [(e, p) for e, p in zip(layers, group["pr"], strict=True) if e and p > 0]
                xs = [e for e, _ in points]
                row[0].plot(xs, [math.log10(p) for _, p in points], "o", color=color, ms=4)
                if group.get("slope") is not None:
                    line = [group["intercept"] + group["slope"] * e for e in xs]
                    label = f"{name} (r={group['pearson_r']:.3f}, n={group['n_tokens']:,})"
                    row[0].plot(xs, line, "-", color=color, label=label)
            steps = [r["step"] for r in records if _finite(r["groups"].get(name), "pearson_r")]
            values = [r["groups"][name]["pearson_r"] for r in records if r["step"] in steps]
            row[1].plot(steps, values, "o-", color=color, ms=3, label=name)
            if lens:
                pairs = [
                    (r["step"], (r["groups"].get(name) or {}).get("lens") or {}) for r in records
                ]
                pairs = [
                    (s, g[LensKeys.GAP_MEAN])
                    for s, g in pairs
                    if g.get(LensKeys.GAP_MEAN) is not None
                ]
                if pairs:
                    xs, ys = zip(*pairs, strict=True)
                    row[2].plot(xs, ys, "o-", color=color, ms=3, label=name)
        row[0].set(
            title=f"{run.label}: per group, step {latest['step']:,}",
            xlabel="layer",
            ylabel="log10 PR",
        )
        row[0].xaxis.get_major_locator().set_params(integer=True)
        row[0].legend(frameon=False, fontsize=8)
        row[1].set(title="Pearson r per group", xlabel="training step", ylabel="r")
        _step_axis(row[1], max(max(r["step"] for r in records), 1))
        row[1].legend(frameon=False, fontsize=8)
        if lens:
            row[2].set(
                title="lens: final − first-correct layer",
                xlabel="training step",
                ylabel="mean gap (layers)",
            )
            _step_axis(row[2], max(max(r["step"] for r in records), 1))
            row[2].legend(frameon=False, fontsize=8)
    return fig


def positions_figure(runs: list[Run]) -> Any:
    """Per run with position buckets: the latest snapshot's lens per bucket.

    None when no run's records hold ``positions``.
    """
    from matplotlib import colormaps

    from lawwatch.report.figures import _new_figure

    found = [(run, [r for r in run.records if r.get("positions")]) for run in runs]
    found = [(run, records[-1]) for run, records in found if records]
    if not found:
        return None
    fig = _new_figure(10.0, 3.8 * len(found))
    axes = fig.subplots(len(found), 2, squeeze=False)
    for (run, record), (top1_ax, depth_ax) in zip(found, axes, strict=True):
        layers = entries(record)
        buckets = list(record["positions"])
        colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(buckets)))
        for bucket, color in zip(buckets, colors, strict=True):
            lens = record["positions"][bucket]
            if lens[LensKeys.EXAMPLES]:
                top1_ax.plot(layers, lens[LensKeys.TOP1], "o-", color=color, ms=3, label=bucket)
        top1_ax.set(
            title=f"{run.label}: lens top-1 by position, step {record['step']:,}",
            xlabel="layer",
            ylabel="top-1 accuracy",
        )
        top1_ax.legend(title="position (% of sequence)", frameon=False, fontsize=8, ncols=2)
        x = np.arange(len(buckets))
        for key, style, label in (
            (LensKeys.FIRST_CORRECT_MEAN, "o-", "first correct"),
            (LensKeys.FINAL_MEAN, "s--", "final"),
            (LensKeys.GAP_MEAN, "^:", "gap (final − first)"),
        ):
            ys = [record["positions"][b].get(key) for b in buckets]
            depth_ax.plot(x, [np.nan if y is None else y for y in ys], style, label=label)
        depth_ax.set_xticks(x, buckets, rotation=45 if len(buckets) > 5 else 0)
        depth_ax.set(title="prediction depth by position", xlabel="position (% of sequence)")
        depth_ax.set(ylabel="mean layer")
        depth_ax.legend(frameon=False, fontsize=8)
    return fig


def _finite(group: dict[str, Any] | None, key: str) -> bool:
    value = (group or {}).get(key)
    return isinstance(value, int | float) and math.isfinite(value)
