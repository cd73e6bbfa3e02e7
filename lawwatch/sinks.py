"""Where snapshots go: a small protocol, a fan-out, the always-on local history, and W&B.

A sink receives every snapshot on the logging process (rank 0) and never decides anything about
training. ``LocalHistory`` keeps ``history.jsonl`` (one JSON object per snapshot) and the PR
matrix (steps × entries) as safetensors; it is the record a resumed run continues.
``WandbSink`` logs into a live W&B run (``wandb`` is imported only when one is made).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD, emergence_step
from lawwatch.measure import Snapshot

log = logging.getLogger("lawwatch")


@runtime_checkable
class Sink(Protocol):
    """Receives snapshots. ``write`` must not raise for a well-formed snapshot."""

    def write(self, snapshot: Snapshot) -> None:
        """Record one snapshot."""

    def close(self) -> None:
        """Flush and release resources (end of training)."""


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

    def close(self) -> None:
        """Close every sink."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("lawwatch: closing sink %s failed", type(sink).__name__)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``history.jsonl`` file, in file order ([] if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def entries(record: dict[str, Any]) -> list[int]:
    """The true hidden-state entry index of each PR in a record (entry 0 = the embeddings).

    All entries unless the snapshot measured a subset (``layers=``), whose indices it records.
    """
    layers = record.get("layers")
    return list(layers) if layers else list(range(len(record["pr"])))


def law_points(record: dict[str, Any]) -> tuple[list[int], list[float]]:
    """``(layers, log10 PR)`` of the entries the law is fitted on (the embeddings left out)."""
    pairs = [(e, v) for e, v in zip(entries(record), record["pr"], strict=True) if e != 0]
    return [e for e, _ in pairs], [math.log10(v) for _, v in pairs]


class LocalHistory:
    """``<directory>/history.jsonl`` plus ``<directory>/pr.safetensors`` (steps × entries).

    On creation it reads what a previous run left. ``truncate_after(step)`` drops records past a
    resume point, so a resumed run writes one increasing sequence of steps with no duplicates.

    Args:
        directory: Where the files live (created if missing).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "history.jsonl"
        self.matrix_path = self.directory / "pr.safetensors"
        self.records = read_history(self.path)

    @property
    def last_step(self) -> int | None:
        """The latest step recorded, or None."""
        return self.records[-1]["step"] if self.records else None

    def truncate_after(self, step: int) -> None:
        """Forget (and rewrite the files without) every record with a step above ``step``."""
        kept = [r for r in self.records if r["step"] is None or r["step"] <= step]
        if len(kept) != len(self.records):
            self.records = kept
            self._rewrite()

    def write(self, snapshot: Snapshot) -> None:
        """Append the snapshot; a step at or before the last recorded one is refused."""
        record = snapshot.as_dict()
        if (
            self.last_step is not None
            and record["step"] is not None
            and record["step"] <= self.last_step
        ):
            raise ValueError(
                f"Step {record['step']} is not after the last recorded step {self.last_step}; "
                "resume with truncate_after(step) first."
            )
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._write_matrix()

    def _rewrite(self) -> None:
        with self.path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        self._write_matrix()

    def _write_matrix(self) -> None:
        from safetensors.torch import save_file

        rows = [r for r in self.records if r.get("pr")]
        layouts = {tuple(entries(r)) for r in rows}
        if not rows or len(layouts) != 1:  # the measured entries changed: only the JSONL holds
            return
        tensors = {
            "steps": torch.tensor([-1 if r["step"] is None else r["step"] for r in rows]),
            "layers": torch.tensor(entries(rows[0])),
            "pr": torch.tensor([r["pr"] for r in rows], dtype=torch.float64),
        }
        save_file(tensors, str(self.matrix_path), metadata={"format": "lawwatch.history/1"})

    def close(self) -> None:
        """Nothing to flush: every write is complete on disk."""


STEP_KEY = "train/global_step"


def layer_key(entry: int, entries: int) -> str:
    """``lawwatch/pr/layer_XX``: zero-padded so the keys sort by depth (entry 0 = embeddings)."""
    width = max(2, len(str(entries - 1)))
    return f"lawwatch/pr/layer_{entry:0{width}d}"


class WandbSink:
    """Snapshots into a live W&B run: scalars, a growing table, a chart of the law, the summary.

    Each snapshot is one ``run.log`` row holding ``lawwatch/rho``, ``lawwatch/pearson_r``,
    ``lawwatch/r2``, ``lawwatch/slope``, ``lawwatch/intercept``, ``lawwatch/n_tokens``,
    ``lawwatch/seconds``, one ``lawwatch/pr/layer_XX`` per hidden-state entry, the rows of the
    ``lawwatch/pr_table`` table (step, layer, pr, log10_pr; logged incrementally, so it grows),
    the ``lawwatch/law`` line chart (log10 PR against layer, one line per snapshot) and
    ``step_key``, so the law's charts share the loss's x-axis. The run summary keeps the latest
    ``rho``, ``pearson_r`` and ``step`` and the ``lawwatch/emergence_step``.

    A run holds each step at most once, in increasing order: a step at or before the last one
    the run already holds (``lawwatch/step`` in its summary, which W&B restores when a run is
    resumed) is kept for the chart but not logged again.

    Args:
        run: The run to log into (for the HF Trainer: ``wandb.run``, which its callback made).
        history: Records measured before this sink existed (``history.jsonl`` rows, steps
            increasing): a resumed training run replays them, so a fresh W&B run holds the
            whole history.
        emergence_threshold: r at or below which the law counts as emerged.
        step_key: The x-axis metric every row carries.
        max_lines: Most snapshots drawn in the chart, evenly spread over the history (the first
            and the latest always drawn); every snapshot stays in the table.
    """

    def __init__(
        self,
        run: Any,
        *,
        history: list[dict[str, Any]] | None = None,
        emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
        step_key: str = STEP_KEY,
        max_lines: int = 16,
    ) -> None:
        import wandb

        if max_lines < 2:
            raise ValueError(f"max_lines must be at least 2 (first and latest), got {max_lines}.")
        self.run, self.step_key = run, step_key
        self.emergence_threshold, self.max_lines = emergence_threshold, max_lines
        self.records: list[dict[str, Any]] = []
        self.table = wandb.Table(
            columns=["step", "layer", "pr", "log10_pr"], log_mode="INCREMENTAL"
        )
        run.define_metric("lawwatch/*", step_metric=step_key)
        self.logged_step: int | None = run.summary.get("lawwatch/step")
        for record in history or []:
            self._add(record)

    def write(self, snapshot: Snapshot) -> None:
        """Log one snapshot (rank 0 calls this through :class:`Sinks`)."""
        self._add(snapshot.as_dict())

    def _add(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step is None:
            raise ValueError("A snapshot logged to W&B needs a training step.")
        if self.records and step <= self.records[-1]["step"]:
            raise ValueError(f"Step {step} is not after the last step {self.records[-1]['step']}.")
        self.records.append(record)
        if self.logged_step is not None and step <= self.logged_step:
            return  # the run already holds this step (a resumed run)
        pr, layers = record["pr"], entries(record)
        row: dict[str, Any] = {
            f"lawwatch/{key}": record[key]
            for key in ("rho", "pearson_r", "r2", "slope", "intercept", "n_tokens", "seconds")
        }
        row.update({layer_key(e, layers[-1] + 1): v for e, v in zip(layers, pr, strict=True)})
        for entry, value in zip(layers, pr, strict=True):
            self.table.add_data(step, entry, value, math.log10(value) if value > 0 else None)
        row["lawwatch/pr_table"] = self.table
        row["lawwatch/law"] = self._chart()
        row[self.step_key] = step
        self.run.log(row)
        self.logged_step = step
        steps = [r["step"] for r in self.records]
        self.run.summary.update(
            {
                "lawwatch/step": step,
                "lawwatch/rho": record["rho"],
                "lawwatch/pearson_r": record["pearson_r"],
                "lawwatch/emergence_step": emergence_step(
                    steps,
                    [r["pearson_r"] for r in self.records],
                    threshold=self.emergence_threshold,
                ),
            }
        )

    def _chart(self) -> Any:
        """``wandb.plot.line_series`` of log10 PR against layer (entries 1 … L: the law's fit)."""
        import wandb

        picked = self.records
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

    def log_image(self, path: str | Path, key: str = "lawwatch/report") -> None:
        """Log a PNG (the report of the law over training) at the latest measured step."""
        import wandb

        step = self.records[-1]["step"] if self.records else 0
        self.run.log({key: wandb.Image(str(path)), self.step_key: step})

    def close(self) -> None:
        """Nothing to do: the run belongs to whoever created it (the Trainer's W&B callback)."""
