"""What the demo shows: a live table of the law while training, then where everything is."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

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
        self.rows: list[tuple[int, float, float]] = []  # (step, rho, r)
        self.losses: dict[int, float] = {}  # step -> training loss logged there
        self.live = Live(self, console=console, refresh_per_second=4)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table(title="The law of equi-learning, measured while training")
        for column in ("step", "loss", "ρ", "r", f"r ≤ {self.threshold}"):
            table.add_column(column, justify="right")
        for step, rho, r in self.rows[-self.max_rows :]:  # the latest that fit a screen
            logged = [s for s in self.losses if s <= step]
            loss = f"{self.losses[max(logged)]:.3f}" if logged else "—"
            holds = "[green]yes[/]" if r <= self.threshold else "no"
            table.add_row(str(step), loss, f"{rho:.4f}", f"{r:+.4f}", holds)
        return Group(table, self.progress)

    def write(self, snapshot: Any) -> None:
        """Add a snapshot's row (the lawwatch callback calls this on the main process)."""
        self.rows.append((snapshot.step, snapshot.fit.rho, snapshot.fit.pearson_r))

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
    lines = [
        ("history", result.directory / "history.jsonl"),
        ("PR matrix", result.directory / "pr.safetensors"),
        ("plot", result.report),
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
