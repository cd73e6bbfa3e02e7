"""Pretrain a causal LM from scratch in an 🤗 Accelerate custom loop and watch the law emerge.

The model comes from a config (random weights), the text from ``lawwatch.demo.corpus`` (documents
that ship with CPython: a train split, and a held-out split for the probe), the tokenizer is a
byte-level BPE trained here on the train split (``recipes/common.py``, shared with the
``Trainer`` recipe). Everything is set in one YAML file under ``configs/``; its first lines give
the launch command, e.g.::

    python recipes/pretrain_accelerate.py --config configs/smoke_cpu.yaml
    torchrun --nproc_per_node 2 recipes/pretrain_accelerate.py --config configs/smoke_cpu.yaml
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        recipes/pretrain_accelerate.py --config configs/smoke_cpu.yaml
    accelerate launch --config_file configs/accelerate/fsdp.yaml \\
        recipes/pretrain_accelerate.py --config configs/llama_1b.yaml
    torchrun --nproc_per_node 2 recipes/pretrain_accelerate.py --config configs/smoke_cpu.yaml \\
        --tp 2 --set model.type=llama --set "model.config={hidden_size: 64, …}"

``--tp N`` splits the model over all N processes with the column- and row-wise styles of its
transformers tensor-parallel plan (attention and MLP; Llama has one, GPT-2 none), every process
training on the same batches (no data parallelism, no DDP: the model, loader and scheduler
are not prepared); lawwatch reads the mesh off the DTensor weights (``docs/scale.md``).

``--set key.sub=value`` overrides one entry (the value is read as YAML), e.g.
``--set train.steps=10 --set output.log_with=wandb``. ``train.cpu: true`` builds
``Accelerator(cpu=True)``: the processes a launcher starts form a gloo group on the CPU (the
only way to one without GPUs, whichever launcher: ``accelerate launch``'s own ``--cpu`` starts
a single process).

Writes to ``output.dir``: ``tokenizer/``, ``probe.safetensors``, ``lawwatch/history.jsonl`` and
``lawwatch/pr.safetensors`` (main process), plus the trackers' own files.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator
from common import (
    build_model,
    check_launch,
    check_probe,
    config_from_cli,
    end_distributed,
    parameter_count,
    prepare_data,
    tensor_parallel,
    watch_settings,
)
from torch.utils.data import DataLoader, TensorDataset
from transformers import get_cosine_schedule_with_warmup

from lawwatch.integrations.accelerate import AcceleratorWatch


def main() -> None:
    cfg = config_from_cli(__doc__.splitlines()[0])
    train, watch_cfg, output = cfg["train"], cfg["lawwatch"], cfg["output"]
    out = Path(output["dir"])

    accelerator = Accelerator(
        cpu=train.get("cpu", False),
        mixed_precision=train.get("mixed_precision"),  # None: from `accelerate launch`
        gradient_accumulation_steps=train.get("grad_accum", 1),
        log_with=output.get("log_with"),
        project_dir=out,
    )
    check_launch(accelerator.num_processes)
    tokenizer, blocks, probe = prepare_data(
        cfg, out, accelerator.local_main_process_first(), accelerator.is_local_main_process
    )
    model = build_model(cfg["model"], tokenizer, train["seed"])
    params = parameter_count(model)
    tp = train.get("tp") or 1
    if tp > 1:  # every process runs one split model on the same batches (no data parallelism)
        tensor_parallel(model, tp, accelerator.device.type)
    check_probe(probe, model)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=train["lr"],
        betas=(0.9, 0.95),
        weight_decay=train.get("weight_decay", 0.0),
    )
    steps = train["steps"]
    # prepared, the scheduler steps once per process at each optimizer step (accelerate assumes
    # a schedule counted in single-process batches): count it that way, or N processes would
    # run it N times too fast (and a cosine past its end climbs back up)
    n = accelerator.num_processes if tp == 1 else 1  # not prepared under tensor parallelism
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, train.get("warmup_steps", 0) * n, steps * n
    )
    loader = DataLoader(
        TensorDataset(blocks),
        batch_size=train["batch_size"],
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(train["seed"]),
    )
    if tp == 1:  # DDP, FSDP, …: each process its own batches
        model, optimizer, loader, scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler
        )

    if accelerator.is_main_process:
        probe.save(out / "probe.safetensors")
        print(
            f"{cfg['model']['type']}: {params / 1e6:.1f}M parameters, "
            f"{blocks.numel()} train tokens, {probe!r}, "
            f"{accelerator.num_processes} process(es), {accelerator.distributed_type}",
            flush=True,
        )
    accelerator.init_trackers(output.get("project", "lawwatch"), config=cfg)
    settings, measure = watch_settings(watch_cfg)
    # snapshots go to the trackers and, on the main process, to out/lawwatch/history.jsonl
    watch = AcceleratorWatch(
        accelerator,
        model,
        probe,
        measure,
        settings.replace(last_step=steps),
        directory=out / "lawwatch",
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
                lr = scheduler.get_last_lr()[0]  # the rate this step trains with
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % log_every == 0 or step == steps:
                loss = accelerator.reduce(loss.detach(), reduction="mean").item()
                accelerator.log({"loss": loss, "lr": lr}, step=step)
                accelerator.print(f"step {step}: loss {loss:.3f} lr {lr:.8e}")
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
    end_distributed(accelerator)


if __name__ == "__main__":
    main()
