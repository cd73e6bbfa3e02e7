"""Pictures of the law over training, from the records of ``history.jsonl``.

:func:`plot_law` draws one PNG for a live run (``lawwatch.output.finish.finish_run`` writes it
as ``law.png`` at the end of training, for the Trainer callback and :class:`~lawwatch.LawWatch`
alike): left,
log10 PR against layer, one line per snapshot, coloured by training step (on a log scale: the
schedule is log-spaced early, when the law forms); right, Pearson r and the decay ratio rho
against step, with the emergence threshold and step.

:func:`write_report` writes the report of one or more histories (live or swept, compared on
each figure): figures in PNG, SVG and PDF (:data:`FIGURES`) and ``report.html``, a page that
needs no network (figures inlined, no script). Publication defaults: readable font sizes, text
kept as text in the PDF, the colour-blind-safe Okabe-Ito palette for runs and viridis for steps.

matplotlib is imported only here, through its object-oriented API (no pyplot), so the caller's
backend is left alone.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lawwatch.history import History, entries, law_points, series, series_change
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD, emergence_step
from lawwatch.output.store import HISTORY_FILE

log = logging.getLogger("lawwatch")

FIGURE_FILE = "law.png"
"""The PNG of the law a run's directory holds after training (``output.finish.finish_run``)."""


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
        [last["intercept"] + last["slope"] * (layer - 1) for layer in layers],
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"fit at step {last['step']}: ρ = {last['rho']:.3f}, r = {last['pearson_r']:+.3f}",
    )
    law.set(xlabel="layer", ylabel="log10 PR", title="log10 PR vs layer, one line per snapshot")
    law.legend(loc="best", fontsize="small")
    top = max(steps)
    ticks = sorted({0, top, *(10**k for k in range(len(str(top))) if 10**k < top)})
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
    emerged = emergence_step(
        steps,
        [r["pearson_r"] for r in records],
        threshold=emergence_threshold,
        se=[r.get("pearson_r_se") for r in records],
    )
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


# -- the report: figures in PNG, SVG and PDF, and one self-contained HTML page ------------------

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
REPORT_FILE = "report.html"

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


@dataclass
class Run:
    """The history of one run or model, as the report shows it.

    Attributes:
        label: Its name in legends and tables.
        records: Its snapshot records with PRs, steps increasing.
        source: Where it was read from.
        set_aside: The ``series-<n>/`` directories beside its history (earlier series the
            store set aside when the probe, options or precision changed); not drawn.
    """

    label: str
    records: list[dict[str, Any]]
    source: str = ""
    set_aside: list[Path] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | Path, label: str | None = None) -> Run:
        """Read a history directory; the label defaults to the directory's name.

        ``path`` is a directory holding ``history.jsonl``, that file, or a Trainer
        ``output_dir`` whose ``lawwatch/`` holds it.

        Raises:
            FileNotFoundError: No ``history.jsonl`` there.
            ValueError: A history without one snapshot holding PRs.
        """
        path = Path(path)
        if path.is_file():
            path = path.parent
        if not (path / HISTORY_FILE).is_file() and (path / "lawwatch" / HISTORY_FILE).is_file():
            path = path / "lawwatch"
        if not (path / HISTORY_FILE).is_file():
            raise FileNotFoundError(
                f"No {HISTORY_FILE} in {path}: name a directory written by a live run "
                "(<output_dir>/lawwatch) or by lawwatch analyze --out."
            )
        records = [r for r in History.read(path) if r.get("step") is not None and r.get("pr")]
        if not records:
            raise ValueError(f"{path / HISTORY_FILE} holds no snapshot with PRs to report.")
        name = path.parent.name if path.name == "lawwatch" else path.name
        if path.name.startswith("series-"):  # an earlier series: named with its directory's run
            parent = path.parent
            owner = parent.parent.name if parent.name == "lawwatch" else parent.name
            name = f"{owner}/{path.name}"
        set_aside = sorted(
            (d for d in path.glob("series-*") if (d / HISTORY_FILE).is_file()),
            key=lambda d: (len(d.name), d.name),
        )
        return cls(label or name, records, str(path), set_aside)

    @property
    def identity(self) -> dict[str, Any]:
        """What its latest snapshot was measured with (:func:`lawwatch.history.series`)."""
        return series(self.records[-1])

    @property
    def steps(self) -> list[int]:
        """The steps of its snapshots."""
        return [r["step"] for r in self.records]

    def emergence_step(self, threshold: float) -> int | None:
        """The first step from which r stays at or below ``threshold``."""
        return emergence_step(
            self.steps,
            [r["pearson_r"] for r in self.records],
            threshold=threshold,
            se=[r.get("pearson_r_se") for r in self.records],
        )


@dataclass
class Report:
    """The files :func:`write_report` wrote.

    Attributes:
        html: The self-contained page.
        figures: Figure stem -> format -> path.
        warnings: What :func:`check_runs` found (each also issued as a :class:`ReportWarning`).
    """

    html: Path
    figures: dict[str, dict[str, Path]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class ReportWarning(UserWarning):
    """Runs that are not comparable, or a history not drawn whole (see :func:`check_runs`)."""


def check_runs(runs: Sequence[Run]) -> list[str]:
    """What makes the runs of one report not comparable, or not whole, in words.

    Runs measured with another probe, other measurement options or at another precision than
    the first run (:func:`lawwatch.history.series_change`, the rule that splits a series), and
    histories with earlier series set aside in ``series-<n>/`` directories, which are not drawn.
    """
    if not runs:
        return []
    found, first = [], runs[0]
    for run in runs[1:]:
        changes = series_change(first.identity, run.identity)
        if changes:
            found.append(
                f"{run.label!r} ({run.source}) was measured differently from {first.label!r} "
                f"({first.source}): {'; '.join(changes)}. Their numbers are not comparable: "
                "compare runs measured with one probe, one set of options and one precision."
            )
    for run in runs:
        if run.set_aside:
            names = ", ".join(d.name for d in run.set_aside)
            found.append(
                f"{run.source} also holds earlier series ({names}), set aside when the probe, "
                "options or precision changed; they are not drawn. To include them, name them "
                f"as histories too: lawwatch report {run.source} "
                + " ".join(str(d) for d in run.set_aside)
                + " --out …"
            )
    return found


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
    line = [record["intercept"] + record["slope"] * (layer - 1) for layer in layers]
    return layers, [100.0 * (10.0 ** (y - fit) - 1.0) for y, fit in zip(log_pr, line, strict=True)]


def write_report(
    histories: Sequence[str | Path | Run],
    out: str | Path,
    *,
    labels: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
    formats: Sequence[str] = FORMATS,
    title: str = "The law of equi-learning",
) -> Report:
    """Figures (:data:`FIGURES`) in each of ``formats``, and ``report.html`` showing them.

    The HTML page needs nothing but itself: figures are inlined as SVG data, there is no
    script, stylesheet or font from elsewhere. It holds every run's snapshots (step, ρ, r,
    slope, …) and the latest snapshot's PR per layer with its deviation from the line; each
    number cell carries its exact value in ``data-value``.

    Args:
        histories: History directories (live ``<output_dir>/lawwatch`` or a sweep's ``--out``),
            or :class:`Run` objects; several are compared on each figure.
        out: Where the files go (created if missing).
        labels: One label per history (default: the directory names).
        steps: The steps drawn in the layer figure (default: six spread over each run; the
            nearest recorded step to each is drawn).
        emergence_threshold: r at or below which the law counts as emerged.
        formats: Figure formats, among ``png``, ``svg`` and ``pdf``.
        title: Page title.

    Raises:
        ValueError: Labels that do not match the histories, or an unknown format.
        ImportError: matplotlib is not installed (``pip install matplotlib``).

    Warns:
        ReportWarning: Runs measured with different probes, options or precisions, or a history
            directory holding earlier series it does not draw (:func:`check_runs`).
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"Unknown figure formats {unknown}; choose among {FORMATS}.")
    if labels is not None and len(labels) != len(histories):
        raise ValueError(
            f"{len(labels)} labels for {len(histories)} histories: give one --label per history."
        )
    runs = [
        h if isinstance(h, Run) else Run.read(h, None if labels is None else labels[i])
        for i, h in enumerate(histories)
    ]
    if labels is not None:
        for run, label in zip(runs, labels, strict=True):
            run.label = label
    if not runs:
        raise ValueError("No history to report.")
    found = check_runs(runs)
    for message in found:
        warnings.warn(message, ReportWarning, stacklevel=2)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    drawn = {stem: None for stem in FIGURES}
    report = Report(out / REPORT_FILE, warnings=found)
    svgs: dict[str, str] = {}
    with matplotlib.rc_context(_STYLE):
        drawn["law_layers"] = _layers_figure(runs, steps)
        drawn["law_training"] = _training_figure(runs, emergence_threshold)
        drawn["law_deviation"] = _deviation_figure(runs)
        drawn["law_compare"] = _compare_figure(runs)
        lens = _lens_figure(runs, steps)  # only where a run measured the logit lens
        if lens is not None:
            drawn["lens"] = lens
        for stem, fig in drawn.items():
            report.figures[stem] = {}
            for fmt in formats:
                path = out / f"{stem}.{fmt}"
                fig.savefig(path, bbox_inches="tight", metadata=_METADATA[fmt])
                report.figures[stem][fmt] = path
            buffer = io.StringIO()
            fig.savefig(buffer, format="svg", bbox_inches="tight", metadata=_METADATA["svg"])
            svgs[stem] = buffer.getvalue()
    report.html.write_text(_html(runs, svgs, report, emergence_threshold, title), encoding="utf-8")
    return report


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


def _step_ticks(top: int) -> list[int]:
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
            [last["intercept"] + last["slope"] * (x - 1) for x in layers],
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
        ticks=_step_ticks(top),
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
        emerged = run.emergence_step(threshold)
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
            [last["intercept"] + last["slope"] * (x - 1) for x in layers],
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


# -- the page ---------------------------------------------------------------------------------

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1b1b;
  margin: 0; background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.25em; margin: 32px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 20px 0 6px; }
.meta, figcaption, .note { color: #555; font-size: 0.9em; }
figure { margin: 8px 0 16px; } figure img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 0.9em; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e5e5e5; text-align: right; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; }
td.text { max-width: 420px; overflow-wrap: anywhere; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px;
  margin-right: 6px; vertical-align: -1px; }
details > summary { cursor: pointer; margin: 6px 0; }
"""


def _num(value: Any, field: str, fmt: str) -> str:
    """A number cell: shown formatted, its exact value in ``data-value``."""
    if value is None:
        return f'<td data-field="{field}">–</td>'
    shown = format(value, fmt) if isinstance(value, float) else str(value)
    return f'<td data-field="{field}" data-value="{value!r}">{html.escape(shown)}</td>'


def _html(
    runs: list[Run], svgs: dict[str, str], report: Report, threshold: float, title: str
) -> str:
    from lawwatch import __version__

    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">lawwatch {__version__} · {len(runs)} run{"s" * (len(runs) > 1)} · '
        f"the law is emerged from the first step where Pearson r stays at or below "
        f"{threshold}</p>",
        "<h2>Runs</h2>",
        '<table class="runs"><tr><th class="text">run</th><th class="text">history</th>'
        "<th>snapshots</th><th>first step</th><th>latest step</th><th>ρ</th><th>r</th>"
        "<th>emergence step</th></tr>",
    ]
    for i, run in enumerate(runs):
        last = run.records[-1]
        color = OKABE_ITO[i % len(OKABE_ITO)]
        parts.append(
            f'<tr data-run="{i}"><td class="text"><span class="swatch" '
            f'style="background:{color}"></span>{html.escape(run.label)}</td>'
            f'<td class="text">{html.escape(run.source)}</td>'
            + _num(len(run.records), "snapshots", "d")
            + _num(run.steps[0], "first_step", "d")
            + _num(last["step"], "step", "d")
            + _num(last["rho"], "rho", ".4f")
            + _num(last["pearson_r"], "pearson_r", "+.4f")
            + _num(run.emergence_step(threshold), "emergence_step", "d")
            + "</tr>"
        )
    parts.append("</table>")
    for stem, caption in {**FIGURES, **LENS_FIGURES}.items():
        if stem not in svgs:  # the lens figure, without lens records
            continue
        data = base64.b64encode(svgs[stem].encode()).decode()
        links = " · ".join(
            f'<a href="{path.name}">{fmt.upper()}</a>'
            for fmt, path in report.figures.get(stem, {}).items()
        )
        parts += [
            f"<h2>{html.escape(caption)}</h2>",
            f'<figure id="{stem}"><img alt="{html.escape(caption)}" '
            f'src="data:image/svg+xml;base64,{data}">',
            f"<figcaption>{_CAPTIONS[stem]}{' Files: ' + links if links else ''}"
            "</figcaption></figure>",
        ]
    parts.append("<h2>Numbers</h2>")
    for i, run in enumerate(runs):
        parts += _run_tables(i, run)
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


_CAPTIONS = {
    "lens": (
        "Left: the logit lens's top-1 accuracy of each layer (the model's final norm and head "
        "applied to that layer) against training step. Middle: PR of the same layers. Right: "
        "prediction depth at selected steps: the share of examples whose first correct "
        "top-1 is at each layer (solid) and from which layer the top-1 stays the model's "
        "final one (dashed); the last bin is 'never'."
    ),
    "law_layers": (
        "log10 of the prediction residual (PR) of each layer's features for the next token, "
        "one line per selected snapshot, coloured by training step; the dashed line is the "
        "law fitted to the latest one drawn. The law holds when the points fall on a line."
    ),
    "law_training": (
        "Top: Pearson r of log10 PR and layer (near −1: the law holds). Bottom: the decay "
        "ratio ρ = 10^slope, by which each layer multiplies PR. Dashed: the emergence step."
    ),
    "law_deviation": (
        "100 × (PR / fitted line − 1) for each layer of the latest snapshot: above 0 a layer "
        "keeps more residual than the law predicts (it lags), below 0 it leads."
    ),
    "law_compare": (
        "Each run's latest snapshot (points) and its fitted line (dashed), on one axis."
    ),
}


def _run_tables(index: int, run: Run) -> list[str]:
    last = run.records[-1]
    columns = ("step", "rho", "pearson_r", "slope", "intercept", "r2", "n_tokens")
    if any("pearson_r_se" in r for r in run.records):  # jackknife standard errors
        columns = (*columns[:3], "rho_se", "pearson_r_se", *columns[3:])
    has_checkpoint = any("checkpoint" in r for r in run.records)
    parts = [
        f"<h3>{html.escape(run.label)}</h3>",
        f'<p class="note">Latest snapshot (step {last["step"]}): PR of each hidden-state '
        "entry (0 = embeddings, left out of the fit).</p>",
        f'<table class="latest" data-run="{index}" data-step="{last["step"]}"><tr><th>entry</th>'
        "<th>PR</th><th>log10 PR</th><th>fitted log10 PR</th><th>vs the line (%)</th></tr>",
    ]
    dev = dict(zip(*deviation(last), strict=True))
    for entry, pr in zip(entries(last), last["pr"], strict=True):
        fitted = last["intercept"] + last["slope"] * (entry - 1) if entry in dev else None
        parts.append(
            f'<tr data-entry="{entry}">'
            + _num(entry, "entry", "d")
            + _num(pr, "pr", ".6g")
            + _num(math.log10(pr) if pr > 0 else None, "log10_pr", ".4f")
            + _num(fitted, "fitted_log10_pr", ".4f")
            + _num(dev.get(entry), "deviation_percent", "+.2f")
            + "</tr>"
        )
    parts.append("</table>")
    header = "".join(f"<th>{c}</th>" for c in columns)
    parts += [
        f"<details><summary>All {len(run.records)} snapshots</summary>",
        f'<table class="snapshots" data-run="{index}"><tr>{header}'
        + ('<th class="text">checkpoint</th>' if has_checkpoint else "")
        + "</tr>",
    ]
    formats = {"rho": ".4f", "pearson_r": "+.4f", "slope": ".5f", "intercept": ".4f", "r2": ".4f"}
    formats.update(rho_se=".2g", pearson_r_se=".2g")
    for record in run.records:
        cells = "".join(_num(record.get(c), c, formats.get(c, "d")) for c in columns)
        if has_checkpoint:
            cells += f'<td class="text">{html.escape(str(record.get("checkpoint", "")))}</td>'
        parts.append(f'<tr data-step="{record["step"]}">{cells}</tr>')
    parts.append("</table></details>")
    return parts


def _lens_figure(runs: list[Run], steps: Sequence[int] | None) -> Any:
    """Per run with lens records: lens top-1 and PR per layer over training, prediction depth.

    None when no run's records hold the lens.
    """
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    lensed = [(run, [r for r in run.records if isinstance(r.get("lens"), dict)]) for run in runs]
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
            top1_ax.plot(record_steps, [r["lens"]["top1"][i] for r in same], **line)
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
            lens = by_step[step]["lens"]
            for key, style in (("first_correct", "-"), ("final", "--")):
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
