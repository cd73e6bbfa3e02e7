"""The demo run: train with the callback attached, watch the law emerge, say where it all is."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lawwatch.demo.config import DemoConfig
from lawwatch.demo.credentials import wandb_mode
from lawwatch.demo.training import build_model, prepare, training_arguments
from lawwatch.demo.view import LiveView, print_summary
from lawwatch.output.layout import run_directory
from lawwatch.output.store import read_history

log = logging.getLogger("lawwatch")


@dataclass
class DemoResult:
    """What a demo run leaves behind.

    Attributes:
        records: The snapshot records (``history.jsonl``), steps increasing.
        directory: The lawwatch directory (history, PR matrix, plot, probe).
        report: The PNG of the law over training, if written.
        report_html: The report of the run (``report/report.html`` under the output, its
            figures beside it in PNG: the lens figure ``lens.png`` when the lens was on), if
            written.
        emergence_step: First step from which r stayed at or below the threshold, or None.
        wandb_dir: The W&B run's local directory, if W&B was on.
        wandb_mode: ``"online"``, ``"offline"`` or ``"disabled"``.
        wandb_url: The run's page, when online.
        seconds: Wall time of the whole demo.
    """

    records: list[dict[str, Any]]
    directory: Path
    report: Path | None
    report_html: Path | None
    emergence_step: int | None
    wandb_dir: Path | None
    wandb_mode: str
    wandb_url: str | None
    seconds: float


def run_demo(config: DemoConfig, console: Any | None = None) -> DemoResult:
    """Train the demo model with the callback, showing the law emerge; print where it all is.

    Args:
        config: The knobs.
        console: A ``rich.console.Console`` to draw on (default: a new one on stdout).
    """
    from rich.console import Console
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from lawwatch.integrations.hf import LawWatchCallback

    start = time.perf_counter()
    console = console or Console()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    hf_logging.set_verbosity_error()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    with console.status("Reading CPython's own text, training a tokenizer, drawing the probe…"):
        tokenizer, blocks, probe = prepare(config)
    model = build_model(config, len(tokenizer), tokenizer.eos_token_id)
    params = sum(p.numel() for p in model.parameters())
    console.print(
        f"GPT-2: {config.n_layer} layers × {config.n_embd} wide, {params / 1e6:.2f} M parameters; "
        f"{blocks.ids.numel() / 1e3:.0f} k training tokens in {len(blocks)} blocks; "
        f"probe: {len(probe)} held-out documents, {probe.num_examples()} examples."
    )

    mode = wandb_mode(config.wandb)
    run = None
    if mode != "disabled":
        import wandb

        # the Trainer's WandbCallback logs into this run instead of starting its own
        run = wandb.init(
            project=config.wandb_project,
            dir=str(out),
            mode=mode,
            config={"lawwatch_demo": asdict(config)},
            settings=wandb.Settings(console="off", silent=True),
        )

    view = LiveView(console, total=config.steps, threshold=config.emergence_threshold)
    callback = LawWatchCallback(
        probe,
        every=config.every,
        sinks=[view],
        batch_size=config.probe_batch_size,
        emergence_threshold=config.emergence_threshold,
        max_overhead=config.max_overhead or None,
        lens=config.lens or None,
        by_group=config.probe_groups,
        console=False,  # the live view shows each snapshot
    )
    args = training_arguments(config, out, report_to=["wandb"] if run is not None else [])
    trainer = Trainer(model=model, args=args, train_dataset=blocks, callbacks=[view, callback])
    trainer.remove_callback(PrinterCallback)  # the live view replaces its printed dicts
    try:
        with view.live:
            trainer.train()
        console.print()
    finally:
        wandb_dir = Path(run.settings.sync_dir) if run is not None else None
        wandb_url = run.url if run is not None and mode == "online" else None
        if run is not None:
            run.finish()

    directory = callback.directory or run_directory(out)
    history = read_history(directory)
    result = DemoResult(
        records=history.records,
        directory=directory,
        report=callback.report_path,
        report_html=_write_report(directory, out / "report", config) if history.records else None,
        emergence_step=history.emergence_step(config.emergence_threshold),
        wandb_dir=wandb_dir,
        wandb_mode=mode,
        wandb_url=wandb_url,
        seconds=time.perf_counter() - start,
    )
    print_summary(result, config, console)
    return result


def _write_report(directory: Path, out: Path, config: DemoConfig) -> Path | None:
    """The run's report (every figure in PNG, and ``report.html``); None without matplotlib."""
    try:
        from lawwatch.report import write_report

        report = write_report(
            [directory],
            out,
            labels=["demo"],
            emergence_threshold=config.emergence_threshold,
            formats=("png",),
            title="The law of equi-learning in the lawwatch demo",
        )
    except ImportError as error:  # matplotlib is optional: the summary still says the rest
        log.warning("lawwatch demo: no report (%s; pip install matplotlib)", error)
        return None
    return report.html
