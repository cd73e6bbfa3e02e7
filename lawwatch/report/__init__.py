"""Pictures of the law over training, from the records of ``history.jsonl``.

:func:`plot_law` draws the PNG of a live run (``law.png``, written at the end of training by
:func:`lawwatch.output.finish.finish_run`). :func:`write_report` writes the report of one or more
histories (live or swept, compared on each figure): figures in PNG, SVG and PDF
(:data:`FIGURES`) and ``report.html``, a page that needs no network (figures inlined, no
script).

Modules:

* :mod:`~lawwatch.report.runs`: :class:`Run`, a history directory read for the report, and
  :func:`check_runs`, what makes runs not comparable.
* :mod:`~lawwatch.report.figures`: the report's figures (matplotlib, its object-oriented API
  only: the caller's backend is left alone).
* :mod:`~lawwatch.report.live`: :func:`plot_law`, the PNG of a live run.
* :mod:`~lawwatch.report.page`: the self-contained HTML page.
* :mod:`~lawwatch.report.write`: :func:`write_report`, which puts them together.
"""

from lawwatch.report.figures import (
    FIGURES,
    FORMATS,
    HEALTH_FIGURES,
    LENS_FIGURES,
    OKABE_ITO,
    deviation,
    select_steps,
)
from lawwatch.report.live import plot_law
from lawwatch.report.runs import ReportWarning, Run, check_runs
from lawwatch.report.write import REPORT_FILE, Report, write_report

__all__ = [
    "FIGURES",
    "FORMATS",
    "HEALTH_FIGURES",
    "LENS_FIGURES",
    "OKABE_ITO",
    "REPORT_FILE",
    "Report",
    "ReportWarning",
    "Run",
    "check_runs",
    "deviation",
    "plot_law",
    "select_steps",
    "write_report",
]
