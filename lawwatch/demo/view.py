"""What the demo shows: a live table of the law while training, then where everything is.

With the logit lens on, the table also shows each snapshot's mean first-correct layer, and the
summary says when each layer started to predict the next token (:func:`lens_summary`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from lawwatch.history import entries
from lawwatch.stats.lens import LensKeys

if TYPE_CHECKING:
    from lawwatch.demo.app import DemoResult
    from lawwatch.demo.config import DemoConfig


class LiveView(TrainerCallback):
    """Progress bar and a table of step / loss / ρ / r while the Trainer trains.

    A Trainer callback (progress, loss) and a lawwatch sink (one row per snapshot) at once.
    """

    def __init__(self, console: Any, total: int, threshold: float) -> None:
        from rich.live import Live
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.threshold, self.max_rows = threshold, 20
        self.progress = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("train", total=total)
        self.rows: list[tuple[int, float, float, float | None]] = []  # (step, ρ, r, depth)
        self.losses: dict[int, float] = {}  # step -> training loss logged there
        self.live = Live(self, console=console, refresh_per_second=4)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table(title="The law of equi-learning, measured while training")
        lens = any(row[3] is not None for row in self.rows)
        columns = ("step", "loss", "ρ", "r", f"r ≤ {self.threshold}")
        for column in (*columns, "first-correct layer") if lens else columns:
            table.add_column(column, justify="right")
        for step, rho, r, depth in self.rows[-self.max_rows :]:  # the latest that fit a screen
            logged = [s for s in self.losses if s <= step]
            loss = f"{self.losses[max(logged)]:.3f}" if logged else "—"
            holds = "[green]yes[/]" if r <= self.threshold else "no"
            cells = [str(step), loss, f"{rho:.4f}", f"{r:+.4f}", holds]
            if lens:  # the mean layer whose lens top-1 is first the true next token
                cells.append("—" if depth is None else f"{depth:.2f}")
            table.add_row(*cells)
        return Group(table, self.progress)

    def write(self, snapshot: Any) -> None:
        """Add a snapshot's row (the lawwatch callback calls this on the main process)."""
        lens = LensKeys.of(snapshot.extra)
        depth = None if lens is None else lens.get(LensKeys.FIRST_CORRECT_MEAN)
        self.rows.append((snapshot.step, snapshot.fit.rho, snapshot.fit.pearson_r, depth))

    def close(self) -> None:
        """Nothing to release."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Advance the bar."""
        self.progress.update(self.task, completed=state.global_step)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        """Keep the training loss for the table."""
        if logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])


LENS_BAR = 0.5
"""A layer predicts from the first snapshot from which its lens top-1 stays above this share of
the last entry's top-1 at the last snapshot: one bar for every step, set by what the trained
model reaches; "stays", so the current token an untrained model copies to every layer (its
top-1 is often right on repetitive text) does not count."""


@dataclass(frozen=True)
class LensSummary:
    """When the layers started to predict the next token through the model's own head.

    Attributes:
        bar: The share of the last entry's top-1 at the last snapshot that sets ``level``.
        level: The lens top-1 accuracy a layer must stay above (``bar`` times the last entry's at
            the last snapshot).
        last_step: The last snapshot's step.
        examples: Examples the lens read at the last snapshot.
        first_steps: ``(entry, the step from which its top-1 stayed above level, or None)``
            per entry.
        depth: ``(step, mean first-correct entry, or None)`` per snapshot with the lens.
    """

    bar: float
    level: float
    last_step: int
    examples: int
    first_steps: list[tuple[int, int | None]]
    depth: list[tuple[int, float | None]]

    def lines(self) -> list[str]:
        """The summary as the demo prints it."""
        layers = ", ".join(
            f"layer {entry} {'never' if step is None else f'step {step}'}"
            for entry, step in self.first_steps
        )
        (first, start), (last, end) = self.depth[0], self.depth[-1]

        def mean(value: float | None) -> str:
            return "—" if value is None else f"{value:.2f}"

        return [
            f"The logit lens ({self.examples:,} examples a snapshot): the step from which each "
            f"layer's top-1 stayed above {self.level:.3f} ({self.bar:g} × the last layer's at "
            f"step {self.last_step}):",
            f"  {layers}",
            f"  mean first-correct layer: {mean(start)} at step {first} → {mean(end)} at step "
            f"{last}",
        ]


def lens_summary(records: Sequence[dict[str, Any]], bar: float = LENS_BAR) -> LensSummary | None:
    """When each entry started to predict (:data:`LENS_BAR`), from the records' ``lens`` fields.

    Reads the records measured with the lens and the same entries as the last of them; None
    when there are none.

    Args:
        records: Snapshot records, steps increasing, as ``history.jsonl`` holds them.
        bar: The share of the last entry's final top-1 a layer's top-1 must stay above.
    """
    lensed = [r for r in records if LensKeys.of(r) is not None and r.get("pr")]
    if not lensed:
        return None
    layers = entries(lensed[-1])
    lensed = [r for r in lensed if entries(r) == layers]
    lens = [LensKeys.of(r) for r in lensed]
    level = bar * lens[-1][LensKeys.TOP1][-1]
    first_steps = []
    for i, entry in enumerate(layers):
        since = None  # the start of the run of snapshots above the bar that reaches the end
        for r, metrics in zip(lensed, lens, strict=True):
            above = metrics[LensKeys.TOP1][i] > level
            since = (r["step"] if since is None else since) if above else None
        first_steps.append((entry, since))
    return LensSummary(
        bar=bar,
        level=level,
        last_step=lensed[-1]["step"],
        examples=lens[-1][LensKeys.EXAMPLES],
        first_steps=first_steps,
        depth=[
            (r["step"], metrics.get(LensKeys.FIRST_CORRECT_MEAN))
            for r, metrics in zip(lensed, lens, strict=True)
        ],
    )


def print_summary(result: DemoResult, config: DemoConfig, console: Any) -> None:
    """Where everything is, and whether (and when) the law emerged."""
    records = result.records
    if not records:
        console.print("[red]No snapshot was recorded; see the log above for the reason.[/]")
        return
    first, last = records[0], records[-1]
    if result.emergence_step is not None:
        console.print(
            f"[bold green]The law emerged at step {result.emergence_step}[/]: r stayed at or "
            f"below {config.emergence_threshold} from then on."
        )
    elif last["pearson_r"] <= config.emergence_threshold:  # never beyond its standard error
        console.print(
            f"[bold yellow]The law did not emerge[/]: the final r {last['pearson_r']:+.4f} "
            f"± {last.get('pearson_r_se', float('nan')):.4f} is below "
            f"{config.emergence_threshold}, but no snapshot since r last rose above it was "
            "below it by more than its standard error."
        )
    else:
        console.print(
            f"[bold yellow]The law did not emerge[/]: the final r {last['pearson_r']:+.4f} is "
            f"above {config.emergence_threshold}."
        )
    console.print(
        f"  step {first['step']}: r = {first['pearson_r']:+.4f}, ρ = {first['rho']:.4f}\n"
        f"  step {last['step']}: r = {last['pearson_r']:+.4f}, ρ = {last['rho']:.4f}\n"
        f"  {len(records)} snapshots took {sum(r['seconds'] for r in records):.0f} s of the "
        f"{result.seconds:.0f} s run"
    )
    lens = lens_summary(records)
    if lens is not None:
        for line in lens.lines():
            console.print(line, soft_wrap=True, highlight=False)
    lines = [
        ("history", result.directory / "history.jsonl"),
        ("PR matrix", result.directory / "pr.safetensors"),
        ("plot", result.report),
        ("report", result.report_html),
        ("probe", result.directory / "probe.safetensors"),
    ]
    for label, path in lines:
        if path is not None:
            console.print(f"{label:>10}  {path}", soft_wrap=True)
    if result.wandb_dir is not None:
        wandb_cli = Path(sys.executable).parent / "wandb"
        cli = str(wandb_cli) if wandb_cli.exists() else "wandb"
        lines = [("W&B run", f"{result.wandb_dir} ({result.wandb_mode})")]
        if result.wandb_url:
            lines.append(("online", result.wandb_url))
        lines.append(("browse", f"{cli} leet {result.wandb_dir}"))
        if result.wandb_mode == "offline":
            lines.append(("upload", f"{cli} sync {result.wandb_dir}"))
        for label, text in lines:
            console.print(f"{label:>10}  {text}", soft_wrap=True, highlight=False)
