"""The demo's knobs: one flat dataclass, validated when built; ``lawwatch demo --help`` lists it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lawwatch.demo.corpus import Source
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
from lawwatch.watch.config import DEFAULT_MAX_OVERHEAD

WandbMode = Literal["auto", "online", "offline", "disabled"]


@dataclass(frozen=True)
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
    max_overhead: float = DEFAULT_MAX_OVERHEAD
    """The monitor's budget, a share of training time (WatchConfig.max_overhead): scheduled
    snapshots are skipped while measuring would exceed it; 0 measures every scheduled step."""
    lens: float = 0.125
    """The share of the probe's examples the logit lens reads at each snapshot (docs/lens.md):
    what each layer already predicts through the model's own head; 0 turns it off."""
    probe_groups: bool = False
    """Measure the law per group too (docs/breakdowns.md): the probe becomes two groups of
    probe_texts/2 sequences each, 'topics' (held-out pydoc topics: reference text full of
    code) and 'license' (the license text CPython ships: legal prose, never trained on),
    measured with by_group."""
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
        if not 0.0 <= self.max_overhead < 1.0:
            raise ValueError(
                f"max_overhead must lie in [0, 1) (0: no budget), got {self.max_overhead}."
            )
        if not 0.0 <= self.lens <= 1.0:
            raise ValueError(f"lens must lie in [0, 1] (0: off, 1: all examples), got {self.lens}.")
        if not 0.0 < self.adam_beta2 < 1.0:
            raise ValueError(f"adam_beta2 must lie in (0, 1), got {self.adam_beta2}.")
        if self.wandb not in ("auto", "online", "offline", "disabled"):
            raise ValueError(
                f"wandb={self.wandb!r}; choose 'auto', 'online', 'offline' or 'disabled'."
            )
