"""Pretrain a causal LM from scratch with the 🤗 Trainer and watch the law emerge.

The same YAML configs, data, probe and initial weights as ``recipes/pretrain_accelerate.py``
(``recipes/common.py``); the Hugging Face ``Trainer`` trains, and
``lawwatch.LawWatchCallback`` measures on its schedule. Launch commands (each config's first
lines give its own)::

    python recipes/pretrain_trainer.py --config configs/smoke_cpu.yaml
    torchrun --nproc_per_node 2 recipes/pretrain_trainer.py --config configs/smoke_cpu.yaml
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        recipes/pretrain_trainer.py --config configs/smoke_cpu.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml \\
        recipes/pretrain_trainer.py --config configs/gpt2_small.yaml

``--set key.sub=value`` overrides one entry (the value is read as YAML). ``train.cpu: true``
trains on CPU (``use_cpu``: gloo between the processes any launcher starts);
``train.mixed_precision`` ``bf16`` / ``fp16`` turns on the Trainer's autocast, and null leaves
precision to ``accelerate launch`` (float32 otherwise).
FSDP and DeepSpeed come from the ``accelerate launch`` config, as the Trainer reads them.

Writes to ``output.dir``: ``tokenizer/``, ``probe.safetensors`` and ``lawwatch/``
(``history.jsonl``, ``pr.safetensors``, ``law.png``; main process), no checkpoints. With
``output.log_with: wandb`` the Trainer's W&B run also gets the loss and the law.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from common import (
    build_model,
    check_launch,
    check_probe,
    config_from_cli,
    end_distributed,
    parameter_count,
    prepare_data,
    watch_settings,
)
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from lawwatch.demo.corpus import Blocks
from lawwatch.integrations.hf import LawWatchCallback


class Console(TrainerCallback):
    """One line per logged loss and per snapshot, on the main process.

    A Trainer callback (the loss) and a lawwatch sink (the snapshots) at once; the lines match
    the accelerate recipe's.
    """

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if state.is_world_process_zero and logs and "loss" in logs:
            # learning_rate: the rate this step trained with
            lr = logs["learning_rate"]
            print(f"step {state.global_step}: loss {logs['loss']:.3f} lr {lr:.8e}", flush=True)

    def write(self, snapshot) -> None:
        print(
            f"step {snapshot.step}: law r={snapshot.fit.pearson_r:+.3f} "
            f"rho={snapshot.fit.rho:.4f} ({snapshot.seconds:.2f}s)",
            flush=True,
        )

    def close(self) -> None:
        pass


class Packed(Blocks):
    """Training blocks with an all-ones attention mask: packed text has no padding (the
    end-of-text separators merely share the pad token's id)."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "attention_mask": torch.ones_like(self.ids[i])}


def training_arguments(cfg: dict[str, Any], out: Path) -> TrainingArguments:
    """The config's ``train`` and ``output`` sections as ``TrainingArguments``.

    The same optimizer and schedule as the accelerate recipe: AdamW (0.9, 0.95), linear
    warm-up then cosine decay, gradient clipping. (The Trainer exempts biases and norm weights
    from weight decay; the custom loop decays every parameter.)
    """
    train, output = cfg["train"], cfg["output"]
    precision = train.get("mixed_precision")
    return TrainingArguments(
        output_dir=str(out),
        max_steps=train["steps"],
        per_device_train_batch_size=train["batch_size"],
        gradient_accumulation_steps=train.get("grad_accum", 1),
        learning_rate=train["lr"],
        adam_beta2=0.95,
        weight_decay=train.get("weight_decay", 0.0),
        max_grad_norm=train.get("grad_clip") or 0.0,  # 0: no clipping
        lr_scheduler_type="cosine",
        warmup_steps=train.get("warmup_steps", 0),
        logging_steps=train.get("log_every", 10),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=train.get("cpu", False),  # several CPU processes talk over gloo, GPUs over NCCL
        ddp_find_unused_parameters=False,  # a causal LM uses every parameter in each forward
        dataloader_drop_last=True,
        save_strategy="no",
        report_to=[output["log_with"]] if output.get("log_with") else [],
        disable_tqdm=True,  # the Console lines instead of a bar
        seed=train["seed"],
    )


def main() -> None:
    cfg = config_from_cli(__doc__.splitlines()[0])
    train, watch_cfg, output = cfg["train"], cfg["lawwatch"], cfg["output"]
    out = Path(output["dir"])

    # before the model: under `accelerate launch` with DeepSpeed ZeRO-3 they set up the
    # partitioning that build_model's weights are created into
    args = training_arguments(cfg, out)
    check_launch(args.world_size)
    tokenizer, blocks, probe = prepare_data(
        cfg, out, args.main_process_first(local=True), args.local_process_index == 0
    )
    model = build_model(cfg["model"], tokenizer, train["seed"])
    params = parameter_count(model)
    check_probe(probe, model)

    run = None
    if args.process_index == 0 and "wandb" in args.report_to:
        import wandb

        # the Trainer's WandbCallback logs into this run instead of starting its own
        run = wandb.init(project=output.get("project", "lawwatch"), config=cfg)
    console = Console()
    settings, measure = watch_settings(watch_cfg)
    watch = LawWatchCallback(probe, measure, settings, sinks=[console])
    trainer = Trainer(
        model=model, args=args, train_dataset=Packed(blocks), callbacks=[console, watch]
    )
    trainer.remove_callback(PrinterCallback)  # the Console prints the loss
    if args.process_index == 0:
        probe.save(out / "probe.safetensors")
        print(
            f"{cfg['model']['type']}: {params / 1e6:.1f}M parameters, "
            f"{blocks.numel()} train tokens, {probe!r}, "
            f"{args.world_size} process(es), {trainer.accelerator.distributed_type}",
            flush=True,
        )
    trainer.train()

    if args.process_index == 0 and watch.monitor is not None and watch.monitor.history:
        emerged = watch.emergence_step
        print(
            f"final r={watch.monitor.history[-1]['pearson_r']:+.3f}; law emerged at step "
            f"{emerged if emerged is not None else '(not yet)'}; loss ln(vocab)="
            f"{math.log(len(tokenizer)):.2f} at init; history in {watch.directory}",
            flush=True,
        )
    if run is not None:
        run.finish()
    end_distributed(trainer.accelerator)


if __name__ == "__main__":
    main()
