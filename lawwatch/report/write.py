"""The report of one or more histories: its figures in files, and the page that shows them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
from lawwatch.report.figures import FORMATS, render
from lawwatch.report.page import page
from lawwatch.report.runs import ReportWarning, Run, check_runs

__all__ = ["REPORT_FILE", "Report", "write_report"]

REPORT_FILE = "report.html"


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

    figures, svgs = render(runs, out, formats=formats, steps=steps, threshold=emergence_threshold)
    report = Report(out / REPORT_FILE, figures, found)
    report.html.write_text(page(runs, svgs, figures, emergence_threshold, title), encoding="utf-8")
    return report
