"""Where snapshots go: the sink protocols, a fan-out, the local history, W&B, and the key scheme.

A sink receives every snapshot on the logging process (rank 0) and never decides anything about
training. :func:`scalars` is the one key scheme every tracker receives (W&B, accelerate's
trackers, …). :class:`LocalHistory` keeps ``history.jsonl`` and ``pr.safetensors`` in a
directory: the record a resumed run continues. :class:`WandbSink` logs into a live W&B run
(``wandb`` is imported only when one is made).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lawwatch.history import (
    HISTORY_FILE,
    MATRIX_FILE,
    History,
    Snapshot,
    entries,
    law_points,
    parse,
    series_change,
)
from lawwatch.history import series as series_of
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


def threadsafe(sink: Sink) -> bool:
    """Whether ``sink`` may be written from the monitor's background worker thread.

    A sink says so with a true ``threadsafe`` attribute: it must share no state with the
    training thread (:class:`LocalHistory`, which writes lawwatch's own files, does). The
    others (trackers, whose run or writer the training loop logs into too) are written on the
    training thread when the monitor collects a background result.
    """
    return bool(getattr(sink, "threadsafe", False))


class Sinks:
    """Fan-out to several sinks; a failing sink is reported and the others still run.

    This is also the null sink: ``Sinks([])`` accepts everything and does nothing.
    """

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks: list[Sink] = list(sinks or [])

    def write(self, snapshot: Snapshot, *, threads: bool | None = None) -> None:
        """Pass the snapshot to every sink.

        Args:
            snapshot: The snapshot.
            threads: If given, only the sinks whose :func:`threadsafe` is this value.
        """
        for sink in self.sinks:
            if threads is not None and threadsafe(sink) != threads:
                continue
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
    """A :class:`~lawwatch.history.History` kept in files in a directory: one series, whole.

    ``<directory>/history.jsonl`` holds the records, ``<directory>/pr.safetensors`` the PR
    matrix (steps × entries). On creation it reads what a previous run left; :meth:`drop_after`
    forgets records past a resume point, so a resumed run writes one increasing sequence of
    steps with no duplicates.

    - **Crash-safe.** Each record is one line written, flushed and synced; rewrites replace
      whole files. Lines a crash cut short (or any line that holds no record) are moved to
      ``history.jsonl.torn-<n>`` with a warning when the directory is opened, and a last record
      that lacks its newline gets it: recording goes on.
    - **One series.** A snapshot measured with another probe, other options or at another
      precision than the records held (see :func:`~lawwatch.history.series_change`) starts a
      new series: the files held so far move to ``<directory>/series-<n>/`` and a warning says
      what changed. ``series=`` checks the records already there when the directory opens.
    - **One writer.** Two open ``LocalHistory`` of one process never share a directory: the
      second is refused until the first is closed.

    Args:
        directory: Where the files live (created if missing).
        series: The identity (``probe``, ``config``, ``precision``) of what will be written, to
            check the records already there against at once (a resumed run); default: checked
            at the first write.

    Raises:
        ValueError: Another open LocalHistory of this process writes to ``directory``.
    """

    threadsafe = True  # lawwatch's own files: the background worker may write them

    def __init__(self, directory: str | Path, *, series: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.closed = False
        _claim(self)
        try:
            self.history = self._open()
            if series is not None and self.history.records:
                self._check_series(series, "this run")
        except BaseException:
            _release(self)
            raise

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
        """Append the snapshot; a step at or before the last recorded one is refused.

        A snapshot of another series (probe, options, precision) first sets the records held
        so far aside (see the class documentation).
        """
        record = snapshot.to_record()
        if self.history.records:
            self._check_series(series_of(record), f"step {snapshot.step}")
        self.history.append_to(self.directory, self.history.append(record))

    def close(self) -> None:
        """Release the directory (every write is already complete on disk)."""
        self.closed = True
        _release(self)

    # -- what a previous run left -------------------------------------------------------------

    def _open(self) -> History:
        """The records in the directory; a torn or unterminated file is repaired first."""
        path = self.directory / HISTORY_FILE
        parsed = parse(path)
        if parsed.clean:
            return parsed.history
        if parsed.rejected:
            torn = _free_name(self.directory, f"{HISTORY_FILE}.torn-")
            torn.write_bytes(b"".join(raw + b"\n" for _, raw in parsed.rejected))
            log.warning(
                "lawwatch: %s held %s (%s); moved to %s, the %s kept",
                path,
                _plural(len(parsed.rejected), "unreadable line"),
                parsed.describe(),
                torn,
                _plural(len(parsed.history), "whole record"),
            )
        parsed.history.write(self.directory)  # whole lines only, each with its newline
        return parsed.history

    def _check_series(self, identity: dict[str, Any], what: str) -> None:
        """Start a new series if ``identity`` is not the series of the records held."""
        changes = series_change(series_of(self.history[-1]), identity)
        if not changes:
            return
        moved = _free_name(self.directory, "series-")
        moved.mkdir()
        held = self.history
        for name in (HISTORY_FILE, MATRIX_FILE, "law.png"):
            if (self.directory / name).exists():
                os.replace(self.directory / name, moved / name)
        self.history = History()
        log.warning(
            "lawwatch: %s differs from the %s in %s (steps %s to %s): %s. Those moved to %s "
            "and a new series starts here. One directory holds one series: to continue the "
            "old one, measure with the probe, options and precision it was measured with; to "
            "keep series apart from the start, give each its own directory.",
            what,
            _plural(len(held), "record"),
            self.directory,
            held.steps[0],
            held.last_step,
            "; ".join(changes),
            moved,
        )


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _free_name(directory: Path, prefix: str) -> Path:
    """``directory / f"{prefix}{n}"`` for the first n >= 1 not taken."""
    n = 1
    while (directory / f"{prefix}{n}").exists():
        n += 1
    return directory / f"{prefix}{n}"


# the directories open LocalHistory objects of this process write to (weakly: a history nobody
# holds any more frees its directory)
_OPEN: dict[Path, weakref.ref[LocalHistory]] = {}


def _holder(key: Path) -> LocalHistory | None:
    ref = _OPEN.get(key)
    holder = ref() if ref is not None else None
    return None if holder is None or holder.closed else holder


def _claim(local: LocalHistory) -> None:
    """Register ``local``'s directory, refusing one another open LocalHistory writes to."""
    key = local.directory.resolve()
    if _holder(key) is not None:
        gc.collect()  # a holder only a reference cycle keeps alive is no holder
    holder = _holder(key)
    if holder is not None:
        raise ValueError(
            f"{local.directory} is already written by another lawwatch monitor of this process "
            f"(its LocalHistory holds {_plural(len(holder.records), 'record')}); two monitors "
            "in one directory would interleave one history.jsonl. Give each LawWatchCallback "
            "or AcceleratorWatch its own directory=, or close() the other monitor first."
        )
    _OPEN[key] = weakref.ref(local)


def _release(local: LocalHistory) -> None:
    key = local.directory.resolve()
    ref = _OPEN.get(key)
    if ref is not None and ref() is local:
        del _OPEN[key]


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
