"""What the demo trains: data from CPython's text, a seeded GPT-2, the Trainer's arguments.

The overhead benchmark (``bench/bench_overhead.py``) builds its runs from these same functions,
so it measures the demo's exact settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lawwatch.demo.config import DemoConfig
from lawwatch.demo.corpus import (
    Blocks,
    pack_texts,
    pydoc_topics,
    python_license,
    python_texts,
    split_texts,
    train_tokenizer,
)
from lawwatch.probe import ProbeSet


def prepare(config: DemoConfig) -> tuple[Any, Blocks, ProbeSet]:
    """Text → (tokenizer, packed training blocks, held-out probe)."""
    train_docs, heldout_docs = split_texts(
        python_texts(config.source), heldout=config.heldout, seed=config.seed
    )
    tokenizer = train_tokenizer(train_docs, vocab_size=config.vocab_size)
    blocks = Blocks(pack_texts(train_docs, tokenizer, config.seq_len))
    if config.probe_groups:
        return tokenizer, blocks, group_probe(config, tokenizer, heldout_docs)
    probe = ProbeSet.from_texts(
        heldout_docs,
        tokenizer,
        max_length=config.probe_length,
        num_texts=config.probe_texts,
        seed=config.seed,
    )
    return tokenizer, blocks, probe


def group_probe(config: DemoConfig, tokenizer: Any, heldout_docs: list[str]) -> ProbeSet:
    """The per-group probe: held-out pydoc topics and CPython's license text, packed apart.

    Each group's documents are packed into ``probe_length`` sequences and its first
    ``probe_texts // 2`` sequences kept (``DemoConfig.probe_groups``).

    Raises:
        ValueError: No pydoc topic among the held-out documents (a ``source`` without them).
    """
    topics = set(pydoc_topics())
    held = [doc for doc in heldout_docs if doc in topics]
    if not held:
        raise ValueError(
            f"probe_groups needs held-out pydoc topics, and source={config.source!r} holds none "
            "out: use source='topics' or 'all'."
        )
    probe = ProbeSet.from_texts(
        {"topics": held, "license": python_license()},
        tokenizer,
        max_length=config.probe_length,
        pack=True,
    )
    per = max(1, config.probe_texts // 2)
    rows = [
        i
        for g in range(len(probe.group_names))
        for i in (probe.group_index == g).nonzero().squeeze(1).tolist()[:per]
    ]
    return probe.select(rows)


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
