"""The PNG of a live run: the law over training, drawn at the end of training.

:func:`plot_law` draws one PNG (:func:`lawwatch.output.finish.finish_run` writes it as
``law.png`` at the end of training, for the Trainer callback and :class:`~lawwatch.LawWatch`
alike, and hands it to the trackers): left, log10 PR against layer, one line per snapshot,
coloured by training step (on a log scale: the schedule is log-spaced early, when the law
forms); right, Pearson r and the decay ratio rho against step, with the emergence threshold and
step. matplotlib is imported only when it draws, through its object-oriented API (no pyplot), so
the caller's backend is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lawwatch.history import History, law_points
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD, LawFit
from lawwatch.report.figures import step_ticks


def plot_law(
    records: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
    title: str = "The law of equi-learning over training",
) -> Path:
    """Write a PNG of the law over training.

    Args:
        records: Snapshot records (``step``, ``pr``, ``pearson_r``, ``rho``, ``slope``,
            ``intercept``), steps increasing, as a :class:`~lawwatch.history.History` holds them.
        path: Where to write the PNG (parent directories are created).
        emergence_threshold: r at or below which the law counts as emerged.
        title: Figure title.

    Returns:
        The path written.

    Raises:
        ValueError: No record with a step.
        ImportError: matplotlib is not installed (``pip install matplotlib``).
    """
    from matplotlib import colormaps, colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    records = [r for r in records if r.get("step") is not None and r.get("pr")]
    if not records:
        raise ValueError("No snapshot with a training step to plot; measure during training first.")
    steps = [r["step"] for r in records]
    # log1p keeps step 0 on the colour scale and spreads the log-spaced early snapshots
    norm = colors.FuncNorm((np.log1p, np.expm1), vmin=0, vmax=max(max(steps), 1))
    cmap = colormaps["viridis"]

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    law, trend = fig.subplots(1, 2)

    for record in records:
        layers, log_pr = law_points(record)  # entry 0 (embeddings) is not part of the law
        law.plot(
            layers,
            log_pr,
            color=cmap(norm(record["step"])),
            marker="o",
            markersize=3,
            linewidth=1.2,
        )
    last = records[-1]
    layers = law_points(last)[0]
    law.plot(
        layers,
        LawFit.from_record(last).line(layers),
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"fit at step {last['step']}: ρ = {last['rho']:.3f}, r = {last['pearson_r']:+.3f}",
    )
    law.set(xlabel="layer", ylabel="log10 PR", title="log10 PR vs layer, one line per snapshot")
    law.legend(loc="best", fontsize="small")
    ticks = step_ticks(max(steps))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=law, label="training step", ticks=ticks)
    law.xaxis.get_major_locator().set_params(integer=True)

    trend.plot(steps, [r["pearson_r"] for r in records], color="C0", marker="o", label="r")
    if any("pearson_r_se" in r for r in records):  # jackknife standard errors: ±1 SE bars
        trend.errorbar(
            steps,
            [r["pearson_r"] for r in records],
            yerr=[r.get("pearson_r_se", 0.0) for r in records],
            fmt="none",
            ecolor="C0",
            capsize=2,
        )
    trend.axhline(
        emergence_threshold, color="C0", linestyle=":", label=f"threshold {emergence_threshold}"
    )
    emerged = History(records).emergence_step(emergence_threshold)
    if emerged is not None:
        trend.axvline(emerged, color="C3", linestyle="--", label=f"emerged at step {emerged}")
    trend.set(xlabel="training step", ylabel="Pearson r", ylim=(-1.05, 1.05), title="r and ρ")
    trend.set_xscale("symlog", linthresh=1)  # step 0 stays visible, early snapshots spread out
    rho = trend.twinx()
    rho.plot(steps, [r["rho"] for r in records], color="C1", marker="s", markersize=3, label="ρ")
    rho.set_ylabel("decay ratio ρ")
    rho.ticklabel_format(axis="y", useOffset=False)  # ρ itself, not "+1" and tiny deltas
    handles = trend.get_legend_handles_labels()[0] + rho.get_legend_handles_labels()[0]
    trend.legend(handles=handles, loc="best", fontsize="small")
    fig.suptitle(title)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
