"""Where snapshots go: the sink protocols, a fan-out, the local history, W&B, and the key scheme.

A sink receives every snapshot on the logging process (rank 0) and never decides anything about
training. :func:`scalars` is the one key scheme every tracker receives (W&B, accelerate's
trackers, …). :class:`LocalHistory` keeps ``history.jsonl`` and ``pr.safetensors`` in a
directory: the record a resumed run continues. :class:`WandbSink` logs into a live W&B run
(``wandb`` is imported only when one is made).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lawwatch.history import History, Snapshot, entries, law_points
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD

if TYPE_CHECKING:
    from lawwatch.alerts import Alert

log = logging.getLogger("lawwatch")

PREFIX = "lawwatch/"
STEP_KEY = "train/global_step"


# -- the key scheme ---------------------------------------------------------------------------


def layer_key(entry: int, entries: int) -> str:
    """``lawwatch/pr/layer_XX``: zero-padded so the keys sort by depth (entry 0 = embeddings).

    Args:
        entry: The hidden-state entry index.
        entries: One more than the deepest entry index of the model (sets the padding).
    """
    width = max(2, len(str(entries - 1)))
    return f"{PREFIX}pr/layer_{entry:0{width}d}"


def scalars(snapshot: Snapshot) -> dict[str, float]:
    """A snapshot as the flat scalars every tracker receives, under one key scheme.

    Keys: ``lawwatch/rho``, ``lawwatch/pearson_r``, ``lawwatch/slope``, ``lawwatch/intercept``,
    ``lawwatch/r2``, ``lawwatch/n_tokens``, ``lawwatch/seconds``, each numeric ``extra`` field
    as ``lawwatch/<name>``, and ``lawwatch/pr/layer_XX`` for hidden-state entry ``XX`` (``00``
    = embeddings; zero-padded so dashboards sort them by depth). Non-finite fit values are left
    out (several trackers refuse NaN); the step is not a key (each tracker takes it its way).
    """
    values: dict[str, float] = {}
    fields = {**snapshot.fit.as_dict(), "n_tokens": snapshot.n_tokens, "seconds": snapshot.seconds}
    fields.update({k: v for k, v in snapshot.extra.items() if isinstance(v, int | float)})
    for name, value in fields.items():
        if isinstance(value, bool) or not math.isfinite(value):
            continue
        values[PREFIX + name] = value
    for entry, pr in zip(snapshot.layers, snapshot.pr.tolist(), strict=True):
        values[layer_key(entry, snapshot.layers[-1] + 1)] = pr
    return values


# -- protocols and the fan-out ----------------------------------------------------------------


@runtime_checkable
class Sink(Protocol):
    """Receives snapshots. ``write`` must not raise for a well-formed snapshot."""

    def write(self, snapshot: Snapshot) -> None:
        """Record one snapshot."""

    def close(self) -> None:
        """Flush and release resources (end of training)."""


@runtime_checkable
class Rewindable(Protocol):
    """A sink that keeps a record a resumed run continues: it can forget what followed a step.

    The monitor calls :meth:`drop_after` with the resume step on the logging process, so the
    resumed run writes one increasing sequence of steps.
    """

    def drop_after(self, step: int) -> None:
        """Forget every snapshot after ``step``."""


class Sinks:
    """Fan-out to several sinks; a failing sink is reported and the others still run.

    This is also the null sink: ``Sinks([])`` accepts everything and does nothing.
    """

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks: list[Sink] = list(sinks or [])

    def write(self, snapshot: Snapshot) -> None:
        """Pass the snapshot to every sink."""
        for sink in self.sinks:
            try:
                sink.write(snapshot)
            except Exception:
                log.exception(
                    "lawwatch: sink %s failed at step %s", type(sink).__name__, snapshot.step
                )

    def drop_after(self, step: int) -> None:
        """Rewind every :class:`Rewindable` sink to ``step``."""
        for sink in self.sinks:
            if isinstance(sink, Rewindable):
                try:
                    sink.drop_after(step)
                except Exception:
                    log.exception("lawwatch: rewinding sink %s failed", type(sink).__name__)

    def close(self) -> None:
        """Close every sink."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("lawwatch: closing sink %s failed", type(sink).__name__)


# -- local files ------------------------------------------------------------------------------


class LocalHistory:
    """A :class:`~lawwatch.history.History` kept in files in a directory.

    ``<directory>/history.jsonl`` holds the records, ``<directory>/pr.safetensors`` the PR
    matrix (steps × entries). On creation it reads what a previous run left; :meth:`drop_after`
    forgets records past a resume point, so a resumed run writes one increasing sequence of
    steps with no duplicates.

    Args:
        directory: Where the files live (created if missing).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.history = History.read(self.directory)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records, steps increasing."""
        return self.history.records

    @property
    def last_step(self) -> int | None:
        """The latest step recorded, or None."""
        return self.history.last_step

    def drop_after(self, step: int) -> None:
        """Forget (and rewrite the files without) every record with a step above ``step``."""
        if self.history.drop_after(step):
            self.history.write(self.directory)

    def write(self, snapshot: Snapshot) -> None:
        """Append the snapshot; a step at or before the last recorded one is refused."""
        self.history.append_to(self.directory, self.history.append(snapshot))

    def close(self) -> None:
        """Nothing to flush: every write is complete on disk."""


# -- Weights & Biases -------------------------------------------------------------------------


class WandbSink:
    """Snapshots into a live W&B run: scalars, a growing table, a chart of the law, the summary.

    Each snapshot is one ``run.log`` row holding :func:`scalars` (``lawwatch/rho``,
    ``lawwatch/pearson_r``, …, one ``lawwatch/pr/layer_XX`` per hidden-state entry), the rows of
    the ``lawwatch/pr_table`` table (step, layer, pr, log10_pr; logged incrementally, so it
    grows), the ``lawwatch/law`` line chart (log10 PR against layer, one line per snapshot) and
    ``step_key``, so the law's charts share the loss's x-axis. The run summary keeps the latest
    ``rho``, ``pearson_r`` and ``step`` and the ``lawwatch/emergence_step``.

    A run holds each step at most once, in increasing order: a step at or before the last one
    the run already holds (``lawwatch/step`` in its summary, which W&B restores when a run is
    resumed) is kept for the chart but not logged again.

    Args:
        run: The run to log into (for the HF Trainer: ``wandb.run``, which its callback made).
        history: Records measured before this sink existed (steps increasing): a resumed
            training run replays them, so a fresh W&B run holds the whole history.
        emergence_threshold: r at or below which the law counts as emerged.
        step_key: The x-axis metric every row carries.
        max_lines: Most snapshots drawn in the chart, evenly spread over the history (the first
            and the latest always drawn); every snapshot stays in the table.
    """

    def __init__(
        self,
        run: Any,
        *,
        history: History | list[dict[str, Any]] | None = None,
        emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
        step_key: str = STEP_KEY,
        max_lines: int = 16,
    ) -> None:
        import wandb

        if max_lines < 2:
            raise ValueError(f"max_lines must be at least 2 (first and latest), got {max_lines}.")
        self.run, self.step_key = run, step_key
        self.emergence_threshold, self.max_lines = emergence_threshold, max_lines
        self.history = History()
        self.table = wandb.Table(
            columns=["step", "layer", "pr", "log10_pr"], log_mode="INCREMENTAL"
        )
        run.define_metric(f"{PREFIX}*", step_metric=step_key)
        self.logged_step: int | None = run.summary.get(f"{PREFIX}step")
        for record in history or []:
            self._add(Snapshot.from_record(record))

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records this sink holds (replayed and written), steps increasing."""
        return self.history.records

    def write(self, snapshot: Snapshot) -> None:
        """Log one snapshot (rank 0 calls this through :class:`Sinks`)."""
        self._add(snapshot)

    def _add(self, snapshot: Snapshot) -> None:
        record = self.history.append(snapshot)
        step = record["step"]
        if self.logged_step is not None and step <= self.logged_step:
            return  # the run already holds this step (a resumed run)
        row: dict[str, Any] = dict(scalars(snapshot))
        for entry, value in zip(entries(record), record["pr"], strict=True):
            self.table.add_data(step, entry, value, math.log10(value) if value > 0 else None)
        row[f"{PREFIX}pr_table"] = self.table
        row[f"{PREFIX}law"] = self._chart()
        row[self.step_key] = step
        self.run.log(row)
        self.logged_step = step
        self.run.summary.update(
            {
                f"{PREFIX}step": step,
                f"{PREFIX}rho": record["rho"],
                f"{PREFIX}pearson_r": record["pearson_r"],
                f"{PREFIX}emergence_step": self.history.emergence_step(self.emergence_threshold),
            }
        )

    def _chart(self) -> Any:
        """``wandb.plot.line_series`` of log10 PR against layer (entries 1 … L: the law's fit)."""
        import wandb

        picked = self.history.records
        if len(picked) > self.max_lines:
            last = len(picked) - 1
            picked = [picked[round(i * last / (self.max_lines - 1))] for i in range(self.max_lines)]
        points = [law_points(r) for r in picked]
        return wandb.plot.line_series(
            xs=[xs for xs, _ in points],
            ys=[ys for _, ys in points],
            keys=[f"step {r['step']}" for r in picked],
            title="log10 PR vs layer over training",
            xname="layer",
        )

    def log_image(self, path: str | Path, key: str = f"{PREFIX}report") -> None:
        """Log a PNG (the report of the law over training) at the latest measured step."""
        import wandb

        step = self.history.last_step or 0
        self.run.log({key: wandb.Image(str(path)), self.step_key: step})

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """The end-of-training report: the PNG as ``lawwatch/report`` (the files stay local)."""
        if image is not None:
            self.log_image(image)

    def alert(self, alert: Alert) -> None:
        """A W&B alert (``run.alert``: e-mail or Slack, as the user's W&B settings say)."""
        wandb_alert(self.run, alert)

    def close(self) -> None:
        """Nothing to do: the run belongs to whoever created it (the Trainer's W&B callback)."""


def wandb_alert(run: Any, alert: Alert) -> None:
    """Raise a lawwatch alert in a W&B run (``run.alert``), at once."""
    import wandb

    level = wandb.AlertLevel.INFO if alert.level == "INFO" else wandb.AlertLevel.WARN
    # W&B holds back a second alert of the same title for wait_duration; lawwatch raises each
    # alert once, so none should wait (W&B titles: under 64 characters)
    run.alert(title=alert.title[:63], text=alert.text, level=level, wait_duration=1)
