"""Pretrain a causal LM from scratch in an 🤗 Accelerate custom loop and watch the law emerge.

The model comes from a config (random weights), the text from ``lawwatch.corpus`` (documents
that ship with CPython: a train split, and a held-out split for the probe), the tokenizer is a
byte-level BPE trained here on the train split. Everything is set in one YAML file under
``configs/``; its first lines give the launch command, e.g.::

    python recipes/pretrain_accelerate.py --config configs/smoke_cpu.yaml
    torchrun --nproc_per_node 2 recipes/pretrain_accelerate.py --config configs/smoke_cpu.yaml
    accelerate launch --config_file configs/accelerate/fsdp.yaml \\
        recipes/pretrain_accelerate.py --config configs/llama_1b.yaml

``--set key.sub=value`` overrides one entry (the value is read as YAML), e.g.
``--set train.steps=10 --set output.log_with=wandb``.

Writes to ``output.dir``: ``tokenizer/``, ``probe.safetensors``, ``lawwatch/history.jsonl`` and
``lawwatch/pr.safetensors`` (main process), plus the trackers' own files.
"""

from __future__ import annotations

import argparse
import glob
import math
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

import lawwatch
from lawwatch import corpus
from lawwatch.sinks import LocalHistory


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    """The YAML file, with ``key.sub=value`` overrides applied (values parsed as YAML)."""
    config = yaml.safe_load(Path(path).read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key.sub=value, got {item!r}")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    return config


def load_texts(source: str) -> list[str]:
    """``topics`` / ``docstrings`` / ``all`` (text shipped with CPython), or a glob of your own
    UTF-8 text files, one document per file."""
    if source in ("topics", "docstrings", "all"):
        return corpus.python_texts(source)
    paths = sorted(glob.glob(source, recursive=True))
    if not paths:
        raise SystemExit(f"data.source {source!r} is neither a CPython corpus nor a glob of files.")
    return [Path(p).read_text(encoding="utf-8") for p in paths]


def tokenizer_for(texts: list[str], vocab_size: int, where: Path, accelerator: Accelerator):
    """Train the BPE once per machine (its main process), save it; the others load that copy.

    (Training is deterministic, and LawWatch's vote would catch machines whose probes differ.)
    """
    with accelerator.local_main_process_first():
        if accelerator.is_local_main_process:
            corpus.train_tokenizer(texts, vocab_size).save_pretrained(where)
        return PreTrainedTokenizerFast.from_pretrained(where)


def token_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Documents joined by end-of-text, cut into ``(blocks, seq_len)`` training rows."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend([*row, eos])
    blocks = len(ids) // seq_len
    if blocks == 0:
        raise SystemExit(f"The train split has {len(ids)} tokens, fewer than seq_len={seq_len}.")
    return torch.tensor(ids[: blocks * seq_len]).view(blocks, seq_len)


def build_model(spec: dict[str, Any], tokenizer) -> torch.nn.Module:
    """Random weights from ``model.type`` and ``model.config`` (after the Accelerator exists,
    so that DeepSpeed ZeRO-3 can partition the weights as they are created)."""
    ids = tokenizer.eos_token_id
    config = AutoConfig.for_model(
        spec["type"],
        vocab_size=len(tokenizer),
        bos_token_id=ids,
        eos_token_id=ids,
        pad_token_id=ids,
        **spec.get("config", {}),
    )
    return AutoModelForCausalLM.from_config(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    data, train, watch_cfg, output = cfg["data"], cfg["train"], cfg["lawwatch"], cfg["output"]
    out = Path(output["dir"])

    accelerator = Accelerator(
        cpu=train.get("cpu", False),
        mixed_precision=train.get("mixed_precision"),  # None: from `accelerate launch`
        gradient_accumulation_steps=train.get("grad_accum", 1),
        log_with=output.get("log_with"),
        project_dir=out,
    )
    set_seed(train["seed"])
    texts = load_texts(data["source"])
    train_texts, heldout = corpus.split_texts(texts, data["heldout"], seed=train["seed"])
    tokenizer = tokenizer_for(train_texts, data["vocab_size"], out / "tokenizer", accelerator)
    blocks = token_blocks(train_texts, tokenizer, data["seq_len"])
    probe_cfg = cfg["probe"]
    probe = lawwatch.ProbeSet.from_texts(
        heldout,
        tokenizer,
        max_length=probe_cfg["max_length"],
        num_texts=probe_cfg.get("num_texts"),
        seed=train["seed"],
    )

    model = build_model(cfg["model"], tokenizer)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 too
    hidden = model.config.hidden_size
    if probe.num_examples() <= hidden + 1:
        raise SystemExit(
            f"The probe has {probe.num_examples()} examples; hidden size {hidden} needs more "
            f"than {hidden + 1} (~{10 * hidden} for a low-noise PR): raise probe.num_texts, "
            "probe.max_length or data.heldout."
        )
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=train["lr"],
        betas=(0.9, 0.95),
        weight_decay=train.get("weight_decay", 0.0),
    )
    steps = train["steps"]
    scheduler = get_cosine_schedule_with_warmup(optimizer, train.get("warmup_steps", 0), steps)
    loader = DataLoader(
        TensorDataset(blocks),
        batch_size=train["batch_size"],
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(train["seed"]),
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    if accelerator.is_main_process:
        probe.save(out / "probe.safetensors")
        print(
            f"{cfg['model']['type']}: {params / 1e6:.1f}M parameters, "
            f"{blocks.numel()} train tokens, {probe!r}, "
            f"{accelerator.num_processes} process(es), {accelerator.distributed_type}",
            flush=True,
        )
    accelerator.init_trackers(output.get("project", "lawwatch"), config=cfg)
    watch = lawwatch.LawWatch(
        model,
        probe,
        every=watch_cfg["every"],
        last_step=steps,
        sinks=[LocalHistory(out / "lawwatch")] if accelerator.is_main_process else [],
        accelerator=accelerator,
        batch_size=watch_cfg.get("batch_size", 8),
        normalize=watch_cfg.get("normalize", "auto"),
        target=watch_cfg.get("target", "token_id"),
    )
    accelerator.register_for_checkpointing(watch)  # its history goes with save_state

    def report(step: int) -> None:
        snapshot = watch.maybe_snapshot(step)  # on every process; collectives when due
        if snapshot is not None:
            accelerator.print(
                f"step {step}: law r={snapshot.fit.pearson_r:+.3f} rho={snapshot.fit.rho:.4f} "
                f"({snapshot.seconds:.2f}s)"
            )

    step, log_every = 0, train.get("log_every", 10)
    report(step)  # at initialization, where the law is absent
    model.train()
    while step < steps:
        for (batch,) in loader:
            with accelerator.accumulate(model):
                mask = torch.ones_like(batch)  # packed blocks: no padding
                loss = model(input_ids=batch, attention_mask=mask, labels=batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and train.get("grad_clip"):
                    accelerator.clip_grad_norm_(model.parameters(), train["grad_clip"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % log_every == 0 or step == steps:
                loss = accelerator.reduce(loss.detach(), reduction="mean").item()
                accelerator.log({"loss": loss, "lr": scheduler.get_last_lr()[0]}, step=step)
                accelerator.print(f"step {step}: loss {loss:.3f}")
            report(step)
            if step >= steps:
                break

    if watch.history:
        emerged = watch.emergence_step
        accelerator.print(
            f"final r={watch.history[-1]['pearson_r']:+.3f}; law emerged at step "
            f"{emerged if emerged is not None else '(not yet)'}; loss ln(vocab)="
            f"{math.log(len(tokenizer)):.2f} at init"
        )
    watch.close()
    accelerator.end_training()


if __name__ == "__main__":
    main()
