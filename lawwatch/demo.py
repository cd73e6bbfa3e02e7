"""The embedded default: watch the law of equi-learning emerge in a GPT-2 trained from scratch.

``lawwatch demo`` (what ``make demo`` runs) needs nothing from the network: the text is what
CPython itself ships (:mod:`lawwatch.corpus`), the tokenizer is trained on it here, the model
starts from random weights, and the Hugging Face ``Trainer`` trains it on CPU with
:class:`~lawwatch.integrations.hf.LawWatchCallback` attached. W&B runs offline unless W&B
credentials are configured on this machine. Every knob is a field of :class:`DemoConfig`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import TrainerCallback

from lawwatch.corpus import Source, python_texts, split_texts, train_tokenizer
from lawwatch.history import History
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD, emergence_step
from lawwatch.probe import ProbeSet

WandbMode = Literal["auto", "online", "offline", "disabled"]


@dataclass
class DemoConfig:
    """Everything the demo does, as one flat config; ``lawwatch demo --help`` lists it."""

    out: str = "lawwatch-demo"
    """Output directory: the Trainer's output, lawwatch/ (history, PR matrix, plot, probe) and
    wandb/ (the W&B run)."""
    source: Source = "all"
    """Text: CPython's documentation topics ('topics'), the standard library's docstrings
    ('docstrings') or both ('all')."""
    heldout: float = 0.1
    """Fraction of the documents held out of training; the probe is drawn from them."""
    vocab_size: int = 1024
    """Byte-level BPE vocabulary size, trained on the training documents."""
    n_layer: int = 6
    """GPT-2 blocks."""
    n_embd: int = 128
    """GPT-2 hidden size."""
    n_head: int = 4
    """Attention heads (must divide n_embd)."""
    n_positions: int = 128
    """Longest sequence the model accepts (at least seq_len and probe_length)."""
    dropout: float = 0.0
    """Residual, embedding and attention dropout."""
    seq_len: int = 128
    """Training sequence length: the training documents are concatenated, separated by the
    end-of-text token, and cut into blocks of this many tokens."""
    batch_size: int = 16
    """Training sequences per optimizer step."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    adam_beta2: float = 0.95
    """AdamW's second-moment decay (0.95, as in most LLM pretraining recipes)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    steps: int = 1200
    """Optimizer steps."""
    every: int = 100
    """Snapshot period after the log-spaced start (0, 1, 2, 4, ... below it; last step always)."""
    probe_texts: int = 128
    """Held-out documents in the probe."""
    probe_length: int = 128
    """Tokens kept per probe document."""
    probe_batch_size: int = 16
    """Probe sequences per forward pass of a snapshot."""
    emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD
    """The law counts as emerged from the first step after which r stays at or below this."""
    logging_steps: int = 1
    """Steps between two training-loss log entries (the table shows the loss at each snapshot)."""
    seed: int = 0
    """Seed of the document split, the probe draw, the initial weights and the data order."""
    threads: int | None = None
    """CPU threads for torch; None leaves the number to torch."""
    wandb: WandbMode = "auto"
    """W&B mode: 'auto' logs online when W&B credentials are configured here (WANDB_API_KEY,
    ~/.netrc from `wandb login`, or W&B settings), offline otherwise."""
    wandb_project: str = "lawwatch-demo"
    """W&B project of the run."""

    def __post_init__(self) -> None:
        positive = (
            "vocab_size n_layer n_embd n_head n_positions seq_len batch_size steps every "
            "probe_texts probe_length probe_batch_size logging_steps"
        )
        for name in positive.split():
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd}.")
        for name in ("seq_len", "probe_length"):
            if getattr(self, name) > self.n_positions:
                raise ValueError(
                    f"{name}={getattr(self, name)} exceeds n_positions={self.n_positions}; "
                    f"raise n_positions or shorten {name}."
                )
        if self.probe_length < 2:
            raise ValueError("probe_length must be at least 2 (a token and its next).")
        if self.warmup_steps < 0 or self.lr <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("warmup_steps must be >= 0, lr > 0 and dropout in [0, 1).")
        if not 0.0 < self.adam_beta2 < 1.0:
            raise ValueError(f"adam_beta2 must lie in (0, 1), got {self.adam_beta2}.")
        if self.wandb not in ("auto", "online", "offline", "disabled"):
            raise ValueError(
                f"wandb={self.wandb!r}; choose 'auto', 'online', 'offline' or 'disabled'."
            )


@dataclass
class DemoResult:
    """What a demo run leaves behind.

    Attributes:
        records: The snapshot records (``history.jsonl``), steps increasing.
        directory: The lawwatch directory (history, PR matrix, plot, probe).
        report: The PNG of the law over training, if written.
        emergence_step: First step from which r stayed at or below the threshold, or None.
        wandb_dir: The W&B run's local directory, if W&B was on.
        wandb_mode: ``"online"``, ``"offline"`` or ``"disabled"``.
        wandb_url: The run's page, when online.
        seconds: Wall time of the whole demo.
    """

    records: list[dict[str, Any]]
    directory: Path
    report: Path | None
    emergence_step: int | None
    wandb_dir: Path | None
    wandb_mode: str
    wandb_url: str | None
    seconds: float


class Blocks(torch.utils.data.Dataset):
    """Causal-LM training examples: ``(blocks, seq_len)`` token ids, labels = inputs."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def pack(docs: list[list[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents, each followed by ``eos_id``, and cut into ``seq_len`` blocks.

    Returns:
        ``(blocks, seq_len)`` int64; the tail shorter than a block is dropped.
    """
    stream = torch.tensor([t for doc in docs for t in [*doc, eos_id]], dtype=torch.long)
    blocks = stream.numel() // seq_len
    if blocks == 0:
        raise ValueError(
            f"The training text gives {stream.numel()} tokens, fewer than one block of "
            f"seq_len={seq_len}; use more text (source='all') or a shorter seq_len."
        )
    return stream[: blocks * seq_len].view(blocks, seq_len)


def prepare(config: DemoConfig) -> tuple[Any, Blocks, ProbeSet]:
    """Text → (tokenizer, packed training blocks, held-out probe)."""
    train_docs, heldout_docs = split_texts(
        python_texts(config.source), heldout=config.heldout, seed=config.seed
    )
    tokenizer = train_tokenizer(train_docs, vocab_size=config.vocab_size)
    ids = tokenizer(train_docs, add_special_tokens=False)["input_ids"]
    blocks = Blocks(pack(ids, tokenizer.eos_token_id, config.seq_len))
    probe = ProbeSet.from_texts(
        heldout_docs,
        tokenizer,
        max_length=config.probe_length,
        num_texts=config.probe_texts,
        seed=config.seed,
    )
    return tokenizer, blocks, probe


def build_model(config: DemoConfig, vocab_size: int, eos_id: int) -> Any:
    """A GPT-2 with random weights, from the config (seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    gpt2 = GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return GPT2LMHeadModel(gpt2)


def wandb_mode(requested: WandbMode) -> str:
    """The W&B mode to run in: ``"auto"`` is online when credentials are configured.

    Looks only at local credentials (``WANDB_API_KEY``, an identity token file, ``~/.netrc``
    written by ``wandb login``, or W&B settings) and never contacts the server, the way
    ``wandb.login(verify=False)`` finds them, without its network call for the user name.
    """
    if requested != "auto":
        return requested
    import wandb
    from wandb.sdk.lib import wbauth

    settings = wandb.setup().settings
    try:
        auth = wbauth.authenticate_session(
            host=wbauth.HostUrl(settings.base_url, app_url=settings.app_url),
            source="lawwatch demo",
            prompt=False,
            update_session=False,
        )
    except Exception as error:  # malformed credentials: say so and stay offline
        logging.getLogger("lawwatch").warning("lawwatch: W&B credentials unusable: %s", error)
        return "offline"
    return "online" if auth is not None else "offline"


def training_arguments(config: DemoConfig, out: str | Path, **overrides: Any) -> Any:
    """The demo's ``TrainingArguments`` (CPU, AdamW, cosine with warm-up, no checkpoints).

    Args:
        config: The knobs.
        out: The Trainer's output directory.
        **overrides: ``TrainingArguments`` fields to change (the overhead benchmark's logging).
    """
    from transformers import TrainingArguments

    settings: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": config.steps,
        "per_device_train_batch_size": config.batch_size,
        "learning_rate": config.lr,
        "adam_beta2": config.adam_beta2,
        "weight_decay": config.weight_decay,
        "lr_scheduler_type": "cosine",
        "warmup_steps": config.warmup_steps,
        "logging_steps": config.logging_steps,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": config.seed,
    }
    return TrainingArguments(**{**settings, **overrides})


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
    )
    args = training_arguments(config, out, report_to=["wandb"] if run is not None else [])
    trainer = Trainer(model=model, args=args, train_dataset=blocks, callbacks=[view, callback])
    trainer.remove_callback(PrinterCallback)  # the live view replaces its printed dicts
    probe.save(out / "lawwatch" / "probe.safetensors")
    try:
        with view.live:
            trainer.train()
        console.print()
    finally:
        wandb_dir = Path(run.settings.sync_dir) if run is not None else None
        wandb_url = run.url if run is not None and mode == "online" else None
        if run is not None:
            run.finish()

    directory = callback.directory or out / "lawwatch"
    records = History.read(directory).records
    result = DemoResult(
        records=records,
        directory=directory,
        report=callback.report_path,
        emergence_step=emergence_step(
            [r["step"] for r in records],
            [r["pearson_r"] for r in records],
            threshold=config.emergence_threshold,
        ),
        wandb_dir=wandb_dir,
        wandb_mode=mode,
        wandb_url=wandb_url,
        seconds=time.perf_counter() - start,
    )
    print_summary(result, config, console)
    return result


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
