"""The names of a run's files, in one place: where a history is, and what a directory holds.

A *history directory* holds one series of records (see :mod:`lawwatch.output.store`):

```
<output_dir>/lawwatch/          RUN_SUBDIR: a Trainer run's (or the demo's) history directory
    history.jsonl               HISTORY_FILE: one record a line
    pr.safetensors              MATRIX_FILE: the PR matrix, steps × entries
    probe.safetensors           PROBE_FILE: the probe the records were measured with
    law.png                     FIGURE_FILE: the law over training, drawn at the end of a run
    series-1/, series-2/, …     earlier series set aside, each holding the files above
```

A sweep's ``--out`` directory (``lawwatch analyze``) is a history directory itself.
:func:`find_history` turns what a user names (the directory, its ``history.jsonl``, or the run's
``output_dir``) into the history directory.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "FIGURE_FILE",
    "HISTORY_FILE",
    "MATRIX_FILE",
    "PROBE_FILE",
    "RUN_SUBDIR",
    "SERIES_FILES",
    "SERIES_PREFIX",
    "find_history",
    "run_directory",
    "run_name",
    "series_directories",
    "series_directory",
]

RUN_SUBDIR = "lawwatch"
"""The history directory inside a training run's output directory (``<output_dir>/lawwatch``)."""
HISTORY_FILE = "history.jsonl"
"""The records, one JSON object a line."""
MATRIX_FILE = "pr.safetensors"
"""The PR matrix of the records (``steps``, ``layers``, ``pr``), replaced whole."""
PROBE_FILE = "probe.safetensors"
"""The probe a directory's records were measured with (:meth:`~lawwatch.probe.ProbeSet.save`'s
format), kept beside them so the run's checkpoints can be measured again with it."""
FIGURE_FILE = "law.png"
"""The PNG of the law a run's directory holds after training."""
SERIES_PREFIX = "series-"
"""``series-<n>/``: an earlier series, set aside when the probe, options or precision changed."""
SERIES_FILES = (HISTORY_FILE, MATRIX_FILE, PROBE_FILE, FIGURE_FILE)
"""The files of one series: they move together into a ``series-<n>/`` directory."""


def run_directory(output_dir: str | Path) -> Path:
    """The history directory of a training run whose outputs go to ``output_dir``."""
    return Path(output_dir) / RUN_SUBDIR


def series_directory(directory: str | Path, n: int) -> Path:
    """``directory/series-<n>``: where the ``n``-th earlier series of ``directory`` goes."""
    return Path(directory) / f"{SERIES_PREFIX}{n}"


def series_directories(directory: str | Path) -> list[Path]:
    """The earlier series set aside in ``directory`` (those holding records), in order."""
    found = (d for d in Path(directory).glob(f"{SERIES_PREFIX}*") if (d / HISTORY_FILE).is_file())
    return sorted(found, key=lambda d: (len(d.name), d.name))  # series-2 before series-10


def find_history(path: str | Path) -> Path:
    """The history directory ``path`` names.

    ``path`` is a history directory (holding ``history.jsonl``), that file, or a run's output
    directory whose ``lawwatch/`` holds it.

    Raises:
        FileNotFoundError: No ``history.jsonl`` there.
    """
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not (path / HISTORY_FILE).is_file() and (run_directory(path) / HISTORY_FILE).is_file():
        path = run_directory(path)
    if not (path / HISTORY_FILE).is_file():
        raise FileNotFoundError(
            f"No {HISTORY_FILE} in {path}: name a directory written by a live run "
            f"(<output_dir>/{RUN_SUBDIR}) or by lawwatch analyze --out."
        )
    return path


def run_name(directory: Path) -> str:
    """The name of the run a history directory belongs to, for legends and tables.

    ``<run>/lawwatch`` is ``<run>``; a sweep's directory is its own name; an earlier series is
    ``<run>/series-<n>``.
    """

    def own(path: Path) -> str:
        return path.parent.name if path.name == RUN_SUBDIR else path.name

    if directory.name.startswith(SERIES_PREFIX):
        return f"{own(directory.parent)}/{directory.name}"
    return own(directory)
