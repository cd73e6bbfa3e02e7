"""Where snapshots go: a small protocol, a fan-out, and the always-on local history.

A sink receives every snapshot on the logging process (rank 0) and never decides anything about
training. ``LocalHistory`` keeps ``history.jsonl`` (one JSON object per snapshot) and the PR
matrix (steps × entries) as safetensors; it is the record a resumed run continues.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

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
        widths = {len(r["pr"]) for r in rows}
        if not rows or len(widths) != 1:  # the layer count changed: only the JSONL is valid
            return
        tensors = {
            "steps": torch.tensor([-1 if r["step"] is None else r["step"] for r in rows]),
            "pr": torch.tensor([r["pr"] for r in rows], dtype=torch.float64),
        }
        save_file(tensors, str(self.matrix_path), metadata={"format": "lawwatch.history/1"})

    def close(self) -> None:
        """Nothing to flush: every write is complete on disk."""
