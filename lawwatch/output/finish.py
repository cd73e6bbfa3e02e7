"""The end of a run: ``law.png`` in its directory, and the report handed to its trackers.

Called once per run, by :class:`~lawwatch.output.run.RunOutputs` when the monitor finishes
(:meth:`lawwatch.LawWatch.finish` or :meth:`~lawwatch.LawWatch.close`), whichever the framework
gets to first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
from lawwatch.output.layout import FIGURE_FILE, HISTORY_FILE, MATRIX_FILE
from lawwatch.output.trackers.base import Reporting
from lawwatch.report import plot_law

log = logging.getLogger("lawwatch")


def finish_run(
    directory: str | Path,
    records: Sequence[dict[str, Any]],
    trackers: Mapping[str, Any] | None = None,
    *,
    emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
) -> Path | None:
    """The end of training: ``law.png`` in ``directory``, and the report to the trackers.

    Writes :data:`FIGURE_FILE` from ``records`` (:func:`plot_law`), then hands the PNG and the
    history files of ``directory`` to every tracker sink that takes a report
    (:class:`~lawwatch.output.trackers.Reporting`). Without matplotlib there is no PNG (a
    warning says so) and the files still go; a tracker that fails is reported, the others still
    get the report.

    Args:
        directory: The run's local history directory.
        records: Its records, steps increasing.
        trackers: Name -> tracker sink.
        emergence_threshold: r at or below which the law counts as emerged.

    Returns:
        The PNG written, or None.
    """
    directory = Path(directory)
    image: Path | None = None
    try:
        image = plot_law(records, directory / FIGURE_FILE, emergence_threshold=emergence_threshold)
    except ImportError as error:  # matplotlib is an optional dependency
        log.warning("lawwatch: no plot of the law (%s; pip install matplotlib)", error)
    files = [directory / name for name in (HISTORY_FILE, MATRIX_FILE)]
    files = [path for path in files if path.exists()]
    for name, sink in (trackers or {}).items():
        if isinstance(sink, Reporting):
            try:
                sink.log_report(image, files)
            except Exception:
                log.exception("lawwatch: the report did not reach %s", name)
    return image
