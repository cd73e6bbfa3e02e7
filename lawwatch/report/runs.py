"""The runs a report shows: their histories read from run folders, and whether they compare.

A :class:`Run` is one history directory (a live run's ``<output_dir>/lawwatch``, a sweep's
``--out``, or an earlier series set aside in ``series-<n>/``) as the report shows it.
:func:`check_runs` says in words what makes the runs of one report not comparable, or not
whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lawwatch.history import History, series, series_diff
from lawwatch.output.layout import HISTORY_FILE, find_history, run_name, series_directories
from lawwatch.output.store import read_history

__all__ = ["ReportWarning", "Run", "check_runs"]


@dataclass
class Run:
    """The history of one run or model, as the report shows it.

    Attributes:
        label: Its name in legends and tables.
        history: Its snapshot records with PRs, steps increasing.
        source: Where it was read from.
        set_aside: The ``series-<n>/`` directories beside its history (earlier series the
            store set aside when the probe, options or precision changed); not drawn.
    """

    label: str
    history: History
    source: str = ""
    set_aside: list[Path] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | Path, label: str | None = None) -> Run:
        """Read a history directory; the label defaults to the run's name.

        ``path`` is a directory holding ``history.jsonl``, that file, or a Trainer
        ``output_dir`` whose ``lawwatch/`` holds it (:func:`~lawwatch.output.layout.find_history`).

        Raises:
            FileNotFoundError: No ``history.jsonl`` there.
            ValueError: A history without one snapshot holding PRs.
        """
        path = find_history(path)
        history = History(r for r in read_history(path) if r.get("pr"))
        if not history:
            raise ValueError(f"{path / HISTORY_FILE} holds no snapshot with PRs to report.")
        return cls(label or run_name(path), history, str(path), series_directories(path))

    @property
    def records(self) -> list[dict[str, Any]]:
        """Its records, steps increasing."""
        return self.history.records

    @property
    def identity(self) -> dict[str, Any]:
        """What its latest snapshot was measured with (:func:`lawwatch.history.series`)."""
        return series(self.records[-1])

    @property
    def steps(self) -> list[int]:
        """The steps of its snapshots."""
        return self.history.steps


class ReportWarning(UserWarning):
    """Runs that are not comparable, or a history not drawn whole (see :func:`check_runs`)."""


def check_runs(runs: Sequence[Run]) -> list[str]:
    """What makes the runs of one report not comparable, or not whole, in words.

    Runs measured with another probe, other measurement options or at another precision than
    the first run (:func:`lawwatch.history.series_diff`, the rule that splits a series), and
    histories with earlier series set aside in ``series-<n>/`` directories, which are not drawn.
    """
    if not runs:
        return []
    found, first = [], runs[0]
    for run in runs[1:]:
        changes = series_diff(first.identity, run.identity)
        if changes:
            found.append(
                f"{run.label!r} ({run.source}) was measured differently from {first.label!r} "
                f"({first.source}): {'; '.join(map(str, changes))}. Their numbers are not "
                "comparable: compare runs measured with one probe, one set of options and one "
                "precision."
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
