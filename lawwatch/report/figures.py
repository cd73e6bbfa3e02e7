"""The report's figures of the law over training, in PNG, SVG and PDF.

:func:`render` draws the report's figures (:data:`FIGURES`, :data:`LENS_FIGURES` where a run
measured the logit lens, :data:`HEALTH_FIGURES` where its records hold the vital signs) and
saves each in PNG, SVG and PDF. Publication defaults: readable font sizes, text kept as text
in the PDF, the colour-blind-safe Okabe-Ito palette for runs and viridis for steps.

matplotlib is imported only inside the functions that draw, through its object-oriented
API (no pyplot), so the caller's backend is left alone.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lawwatch.history import entries, law_points
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD, LawFit
from lawwatch.report.runs import Run
from lawwatch.stats.health import HealthKeys
from lawwatch.stats.lens import LensKeys

OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
"""Okabe & Ito's colour-blind-safe palette: one colour per run."""
FORMATS = ("png", "svg", "pdf")
FIGURES = {
    "law_layers": "log10 PR against layer at selected steps",
    "law_training": "Pearson r and ρ against training step, with the emergence step",
    "law_deviation": "Each layer's deviation from the fitted line, latest snapshot",
    "law_compare": "The latest snapshot of every run, with its fitted line",
}
"""The report's figures: file stem -> what it shows."""
LENS_FIGURES = {
    "lens": "Logit lens: top-1 accuracy and PR per layer over training, prediction depth",
}
"""Drawn when a run's records hold the logit lens (``MeasureConfig.lens``)."""
HEALTH_FIGURES = {
    "health": "Vital signs of the residual stream: RMS, largest |x| and kurtosis per layer",
}
"""Drawn when a run's records hold the vital signs (``MeasureConfig.health``, on by default)."""

_STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.4,
    "pdf.fonttype": 42,  # TrueType: text stays text (editable, searchable) in the PDF
    "svg.fonttype": "path",  # glyphs as paths: the SVG renders alike without the font
    "svg.hashsalt": "lawwatch",  # the same history gives the same SVG
    "savefig.dpi": 200,
}


def select_steps(steps: Sequence[int], count: int = 6) -> list[int]:
    """At most ``count`` of ``steps``, spread evenly in log(1 + step): first and last kept."""
    steps = sorted(set(steps))
    if len(steps) <= count:
        return steps
    position = np.log1p(np.asarray(steps, dtype=np.float64))
    targets = np.linspace(position[0], position[-1], count)
    chosen = {steps[int(np.abs(position - t).argmin())] for t in targets}
    return sorted(chosen | {steps[0], steps[-1]})


def deviation(record: dict[str, Any]) -> tuple[list[int], list[float]]:
    """Each fitted layer's PR relative to the law's line, in percent: ``100 (PR / line - 1)``.

    Above 0 the layer keeps more residual than the law predicts (it lags); below 0 it leads.
    """
    layers, log_pr = law_points(record)
    line = LawFit.from_record(record).line(layers)
    return layers, [100.0 * (10.0 ** (y - fit) - 1.0) for y, fit in zip(log_pr, line, strict=True)]


def render(
    runs: list[Run],
    out: Path,
    *,
    formats: Sequence[str] = FORMATS,
    steps: Sequence[int] | None = None,
    threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
) -> tuple[dict[str, dict[str, Path]], dict[str, str]]:
    """Draw the report's figures of ``runs`` and save each in ``formats`` into ``out``.

    Args:
        runs: The runs, compared on each figure.
        out: An existing directory: ``<stem>.<format>`` go there.
        formats: Among :data:`FORMATS`.
        steps: The steps drawn in the layer figures (default: spread over each run).
        threshold: r at or below which the law counts as emerged.

    Returns:
        ``(figure stem -> format -> path, figure stem -> SVG text)``: the files, and every
        figure as SVG for the page. The lens figure is among them only where a run's records
        hold the logit lens; the ``groups`` and ``positions`` figures
        (:data:`~lawwatch.report.breakdowns.BREAKDOWN_FIGURES`) only where they hold those.
    """
    import matplotlib

    files: dict[str, dict[str, Path]] = {}
    svgs: dict[str, str] = {}
    with matplotlib.rc_context(_STYLE):
        drawn = {
            "law_layers": _layers_figure(runs, steps),
            "law_training": _training_figure(runs, threshold),
            "law_deviation": _deviation_figure(runs),
            "law_compare": _compare_figure(runs),
        }
        lens = _lens_figure(runs, steps)  # only where a run measured the logit lens
        if lens is not None:
            drawn["lens"] = lens
        from lawwatch.report.breakdowns import groups_figure, positions_figure

        # only where a run's records hold the breakdowns (docs/breakdowns.md)
        for stem, figure in (
            ("groups", groups_figure(runs)),
            ("positions", positions_figure(runs)),
        ):
            if figure is not None:
                drawn[stem] = figure
        health = _health_figure(runs, steps)  # only where a run's records hold them
        if health is not None:
            drawn["health"] = health
        for stem, fig in drawn.items():
            files[stem] = {}
            for fmt in formats:
                path = out / f"{stem}.{fmt}"
                fig.savefig(path, bbox_inches="tight", metadata=_METADATA[fmt])
                files[stem][fmt] = path
            buffer = io.StringIO()
            fig.savefig(buffer, format="svg", bbox_inches="tight", metadata=_METADATA["svg"])
            svgs[stem] = buffer.getvalue()
    return files, svgs


# a report of the same history is the same file: no creation dates in the metadata
_METADATA: dict[str, dict[str, Any]] = {
    "png": {"Software": None},
    "svg": {"Date": None},
    "pdf": {"CreationDate": None, "ModDate": None},
}


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def step_ticks(top: int) -> list[int]:
    """Colour-bar ticks of training steps up to ``top``: 0, the decades below it, and ``top``."""
    return sorted({0, top, *(10**k for k in range(len(str(top))) if 10**k < top)})


def _layers_figure(runs: list[Run], steps: Sequence[int] | None) -> Any:
    """One panel per run: log10 PR against layer at selected steps, coloured by step."""
    from matplotlib import colormaps, colors
    from matplotlib.cm import ScalarMappable

    top = max(max(run.steps) for run in runs)
    # log1p keeps step 0 on the colour scale and spreads the log-spaced early snapshots
    norm = colors.FuncNorm((np.log1p, np.expm1), vmin=0, vmax=max(top, 1))
    # viridis without its palest yellows, which vanish on white paper
    cmap = colors.ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.9, 256)))
    columns = min(len(runs), 3)
    rows = -(-len(runs) // columns)
    fig = _new_figure(4.4 * columns + 1.0, 3.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, run in zip(axes, runs, strict=False):
        wanted = select_steps(run.steps) if steps is None else steps
        chosen = sorted({min(run.steps, key=lambda s, w=w: (abs(s - w), s)) for w in wanted})
        by_step = {r["step"]: r for r in run.records}
        for step in chosen:
            layers, log_pr = law_points(by_step[step])
            ax.plot(
                layers,
                log_pr,
                color=cmap(norm(step)),
                marker="o",
                markersize=3.5,
                label=f"step {step:,}",
            )
        last = by_step[chosen[-1]]
        layers = law_points(last)[0]
        ax.plot(
            layers,
            LawFit.from_record(last).line(layers),
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"fit at step {last['step']:,}: ρ = {last['rho']:.3f}, "
            f"r = {last['pearson_r']:+.3f}",
        )
        ax.set(title=run.label, xlabel="layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        # below the axes: inside, the legend would hide the lines it names
        ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False, fontsize=8.5
        )
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    for ax in axes[::columns]:
        ax.set_ylabel("log10 PR")
    fig.colorbar(
        ScalarMappable(norm=norm, cmap=cmap),
        ax=list(axes[: len(runs)]),
        label="training step",
        ticks=step_ticks(top),
    )
    return fig


def _training_figure(runs: list[Run], threshold: float) -> Any:
    """Pearson r (top) and ρ (bottom) against step, one colour per run, emergence marked."""
    from matplotlib.ticker import FuncFormatter

    fig = _new_figure(7.5, 5.6)
    r_ax, rho_ax = fig.subplots(2, 1, sharex=True)
    for i, run in enumerate(runs):
        color = OKABE_ITO[i % len(OKABE_ITO)]
        r_ax.plot(
            run.steps, [r["pearson_r"] for r in run.records], color=color, marker="o",
            markersize=3.5, label=run.label,
        )  # fmt: skip
        rho_ax.plot(
            run.steps, [r["rho"] for r in run.records], color=color, marker="s", markersize=3,
            label=run.label,
        )  # fmt: skip
        if any("pearson_r_se" in r for r in run.records):  # jackknife: ±1 standard error
            for ax, key in ((r_ax, "pearson_r"), (rho_ax, "rho")):
                ax.errorbar(
                    run.steps, [r[key] for r in run.records],
                    yerr=[r.get(f"{key}_se", 0.0) for r in run.records],
                    fmt="none", ecolor=color, capsize=2, linewidth=0.8,
                )  # fmt: skip
        emerged = run.history.emergence_step(threshold)
        if emerged is not None:
            for ax in (r_ax, rho_ax):
                ax.axvline(emerged, color=color, linestyle="--", linewidth=1)
            r_ax.annotate(
                f"emerged at {emerged}",
                (emerged, threshold),
                xytext=(4, 6 + 12 * i),
                textcoords="offset points",
                color=color,
                fontsize=9,
            )
    r_ax.axhline(threshold, color="0.4", linestyle=":", linewidth=1, label=f"threshold {threshold}")
    r_ax.set(ylabel="Pearson r", ylim=(-1.05, 1.05), title="The law over training")
    rho_ax.set(xlabel="training step", ylabel="decay ratio ρ")
    rho_ax.ticklabel_format(axis="y", useOffset=False)  # ρ itself, not "+1" and tiny deltas
    rho_ax.set_xscale("symlog", linthresh=1)  # step 0 visible, early snapshots spread out
    top = max(max(run.steps) for run in runs)
    rho_ax.set_xlim(-0.3, max(top * 1.2, 1.5))  # no negative decades left of step 0
    rho_ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))  # 100, not 10²
    r_ax.legend(loc="best")
    return fig


def _deviation_figure(runs: list[Run]) -> Any:
    """Latest snapshot: each layer's PR relative to the fitted line, in percent."""
    fig = _new_figure(7.5, 3.8)
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        last = run.records[-1]
        layers, dev = deviation(last)
        x = np.asarray(layers, dtype=np.float64) + (i - (len(runs) - 1) / 2) * width
        ax.bar(
            x,
            dev,
            width=width * 0.9,
            color=OKABE_ITO[i % len(OKABE_ITO)],
            label=f"{run.label} (step {last['step']})",
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(
        xlabel="layer",
        ylabel="PR vs the fitted line (%)",
        title="Which layers lag (above 0) or lead (below 0) the law",
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(loc="outside lower center", ncols=min(len(runs), 3), frameon=False)
    return fig


def _compare_figure(runs: list[Run]) -> Any:
    """Every run's latest log10 PR against layer, with its fitted line."""
    fig = _new_figure(7.5, 4.4)
    ax = fig.subplots()
    for i, run in enumerate(runs):
        color = OKABE_ITO[i % len(OKABE_ITO)]
        last = run.records[-1]
        layers, log_pr = law_points(last)
        ax.plot(layers, log_pr, color=color, marker="o", markersize=4, linestyle="none")
        ax.plot(
            layers,
            LawFit.from_record(last).line(layers),
            color=color,
            linestyle="--",
            label=(
                f"{run.label}, step {last['step']}: ρ = {last['rho']:.3f}, "
                f"r = {last['pearson_r']:+.3f}"
            ),
        )
    ax.set(xlabel="layer", ylabel="log10 PR", title="Latest snapshot: points and fitted lines")
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(loc="outside lower center", ncols=1, frameon=False)
    return fig


def _lens_figure(runs: list[Run], steps: Sequence[int] | None) -> Any:
    """Per run with lens records: lens top-1 and PR per layer over training, prediction depth.

    None when no run's records hold the lens.
    """
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    lensed = [(run, [r for r in run.records if LensKeys.of(r) is not None]) for run in runs]
    lensed = [(run, records) for run, records in lensed if records]
    if not lensed:
        return None
    fig = _new_figure(14.0, 3.8 * len(lensed))
    axes = fig.subplots(len(lensed), 3, squeeze=False)
    for (run, records), (top1_ax, pr_ax, depth_ax) in zip(lensed, axes, strict=True):
        layers = entries(records[-1])
        same = [r for r in records if entries(r) == layers]
        record_steps = [r["step"] for r in same]
        # viridis without its palest yellows, which vanish on white paper
        colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(layers)))
        for i, (layer, color) in enumerate(zip(layers, colors, strict=True)):
            line = {"color": color, "marker": "o", "markersize": 2.5, "label": f"{layer}"}
            top1 = [LensKeys.of(r)[LensKeys.TOP1][i] for r in same]
            top1_ax.plot(record_steps, top1, **line)
            pr_ax.plot(record_steps, [r["pr"][i] for r in same], **line)
        top1_ax.set(title=f"{run.label}: lens top-1 accuracy", xlabel="training step")
        top1_ax.set(ylabel="accuracy (top-1 = next token)", ylim=(0.0, None))
        pr_ax.set(title="PR (same layers)", xlabel="training step", ylabel="PR", yscale="log")
        _plain_log_ticks(pr_ax)
        for ax in (top1_ax, pr_ax):
            _step_axis(ax, max(record_steps))
        top1_ax.legend(title="layer", ncols=2 if len(layers) > 6 else 1, frameon=False)
        wanted = select_steps(record_steps, 3) if steps is None else steps
        chosen = sorted({min(record_steps, key=lambda s, w=w: (abs(s - w), s)) for w in wanted})
        by_step = {r["step"]: r for r in same}
        bins = [*map(str, layers), "never"]
        palette = colormaps["plasma"](np.linspace(0.0, 0.8, len(chosen)))
        for step, color in zip(chosen, palette, strict=True):
            lens = LensKeys.of(by_step[step])
            for key, style in ((LensKeys.FIRST_CORRECT, "-"), (LensKeys.FINAL, "--")):
                counts = np.asarray(lens[key], dtype=float)
                share = counts / max(counts.sum(), 1.0)
                depth_ax.plot(bins, share, linestyle=style, marker="o", markersize=3, color=color)
        # one legend entry per step (colour) and per histogram (line style), not per pair
        handles = [
            Line2D([], [], color=c, label=f"step {s:,}")
            for s, c in zip(chosen, palette, strict=True)
        ]
        handles += [
            Line2D([], [], color="0.3", linestyle="-", label="first correct"),
            Line2D([], [], color="0.3", linestyle="--", label="final (top-1 settled)"),
        ]
        depth_ax.set(title="prediction depth", xlabel="layer", ylabel="share of examples")
        depth_ax.set_ylim(0.0, 1.0)
        depth_ax.legend(handles=handles, frameon=False, loc="upper center")
    return fig


def _health_figure(runs: list[Run], steps: Sequence[int] | None) -> Any:
    """Per run with vital signs: RMS, largest |x| and mean excess kurtosis against layer.

    One line per selected snapshot, coloured by training step. None when no run's records
    hold the vital signs.
    """
    from matplotlib import colormaps
    from matplotlib.ticker import FuncFormatter

    healthy = [(run, [r for r in run.records if HealthKeys.of(r) is not None]) for run in runs]
    healthy = [(run, records) for run, records in healthy if records]
    if not healthy:
        return None
    fig = _new_figure(14.0, 3.8 * len(healthy))
    axes = fig.subplots(len(healthy), 3, squeeze=False)
    panels = (
        (HealthKeys.RMS, "RMS of the residual stream", "log"),
        (HealthKeys.MAX_ABS, "largest |x|", "log"),
        (HealthKeys.KURTOSIS, "mean excess kurtosis over features", "symlog"),
    )
    for (run, records), row in zip(healthy, axes, strict=True):
        by_step = {r["step"]: r for r in records}
        wanted = select_steps(list(by_step)) if steps is None else steps
        chosen = sorted({min(by_step, key=lambda s, w=w: (abs(s - w), s)) for w in wanted})
        palette = colormaps["viridis"](np.linspace(0.0, 0.9, len(chosen)))
        for (key, title, scale), ax in zip(panels, row, strict=True):
            for step, color in zip(chosen, palette, strict=True):
                record = by_step[step]
                values = np.asarray(HealthKeys.of(record)[key], dtype=float)
                ax.plot(
                    entries(record),
                    values,
                    marker="o",
                    markersize=3,
                    color=color,
                    label=f"step {step:,}",
                )
            ax.set(title=f"{run.label}: {title}", xlabel="layer")
            ax.xaxis.get_major_locator().set_params(integer=True)
            if scale == "log":
                ax.set_yscale("log")
                _plain_log_ticks(ax)
            else:  # excess kurtosis: from -2 up, Gaussian at 0, outlier features in the 100s
                ax.set_yscale("symlog", linthresh=1.0)
                ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        row[0].legend(frameon=False, ncols=2 if len(chosen) > 4 else 1, loc="best")
    return fig


def _step_axis(ax: Any, top: int) -> None:
    """Training steps on a symlog axis: step 0 visible, the log-spaced early snapshots spread."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(-0.3, max(top * 1.2, 1.5))  # no negative decades left of step 0
    # 0, the decades well below the last step (a label apart from it), and the last step
    ax.set_xticks(sorted({0, top, *(10**k for k in range(len(str(top))) if 2 * 10**k <= top)}))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))  # 100, not 10²


def _plain_log_ticks(ax: Any) -> None:
    """A log y axis labelled with plain numbers (0.7, not 7×10⁻¹).

    Minor ticks are labelled too when the range spans less than a decade (else none would be).
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    low, high = ax.get_ylim()
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_formatter(plain)
    narrow = low > 0 and high / low < 10
    ax.yaxis.set_minor_formatter(plain if narrow else NullFormatter())
