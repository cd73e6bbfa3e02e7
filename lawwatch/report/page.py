"""The report's page: one self-contained HTML file of the runs, their figures and numbers.

The page needs nothing but itself: figures are inlined as SVG data, there is no script,
stylesheet or font from elsewhere. It holds every run's snapshots (step, ρ, r, slope, …) and the
latest snapshot's PR per layer with its deviation from the line; each number cell carries its
exact value in ``data-value``.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from lawwatch._version import __version__
from lawwatch.history import entries
from lawwatch.law import LawFit
from lawwatch.report.breakdowns import BREAKDOWN_FIGURES
from lawwatch.report.figures import FIGURES, HEALTH_FIGURES, LENS_FIGURES, OKABE_ITO, deviation
from lawwatch.report.runs import Run

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


def page(
    runs: list[Run],
    svgs: dict[str, str],
    figures: dict[str, dict[str, Path]],
    threshold: float,
    title: str,
) -> str:
    """The HTML of the report.

    Args:
        runs: The runs, in the order of the figures' colours.
        svgs: Figure stem -> the figure as SVG (inlined).
        figures: Figure stem -> format -> the file written (linked, by name, from the page).
        threshold: The emergence threshold the figures and the table used.
        title: Page title.
    """
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
            + _num(run.history.emergence_step(threshold), "emergence_step", "d")
            + "</tr>"
        )
    parts.append("</table>")
    for stem, caption in {**FIGURES, **LENS_FIGURES, **BREAKDOWN_FIGURES, **HEALTH_FIGURES}.items():
        if stem not in svgs:  # the lens, breakdown and health figures, without their records
            continue
        data = base64.b64encode(svgs[stem].encode()).decode()
        links = " · ".join(
            f'<a href="{path.name}">{fmt.upper()}</a>'
            for fmt, path in figures.get(stem, {}).items()
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
    "groups": (
        "Per group of the probe (MeasureConfig.by_group): left, log10 PR of each layer of the "
        "latest snapshot measured on that group's examples alone, with its fitted line; "
        "middle, each group's Pearson r against training step; right (with the logit lens), "
        "the mean gap between the layer from which the top-1 is final and the first correct "
        "layer. A group without enough examples for the hidden size has no line."
    ),
    "positions": (
        "The logit lens per position bucket (MeasureConfig.position_buckets), latest "
        "snapshot: left, top-1 accuracy of each layer over the examples whose position falls "
        "in the bucket (percent of the sequence); right, the mean first-correct and final "
        "layers and their gap per bucket."
    ),
    "health": (
        "The residual stream's vital signs at the probe's examples, one line per selected "
        "snapshot, coloured by training step: the root mean square of each layer's values, "
        "the largest |x|, and the mean over features of each feature's excess kurtosis (0 "
        "for Gaussian features; large when a few tokens carry a feature). A layer whose "
        "largest |x| or kurtosis jumps between snapshots often precedes a loss spike."
    ),
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
    fit = LawFit.from_record(last)
    for entry, pr in zip(entries(last), last["pr"], strict=True):
        fitted = fit.line([entry])[0] if entry in dev else None
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
