"""Pretrain a nanoGPT-style model in a Lightning Fabric loop and watch the law emerge.

The model, data and options are ``recipes/pretrain_nanogpt.py``'s (imported, not copied: a
small GPT in nanoGPT's layout on CPython's own text); the loop is Fabric's. litgpt's
pretraining script is a Fabric loop too, but litgpt is not installed here (it pins another
``huggingface_hub`` than the rest of lawwatch's tests), so its ``GPT`` is not this recipe's
model and lawwatch is not tested on it. lawwatch comes in with one line, and its state rides in
Fabric's checkpoint::

    watch = FabricWatch(fabric, model, probe, every=..., last_step=steps, directory=...)
    state = {"model": model, "optimizer": optimizer, "step": step, "lawwatch": watch}
    fabric.save(path, state)   # the watch's history goes in
    fabric.load(path, state)   # and comes back, on every process

Launch::

    python recipes/pretrain_fabric.py --out runs/fabric
    python recipes/pretrain_fabric.py --out runs/fabric --steps 400 --resume   # continue
    torchrun --nproc_per_node 2 recipes/pretrain_fabric.py --out runs/fabric --devices 2

Writes to ``--out`` (main process): ``ckpt.pt`` (Fabric's checkpoint: model, optimizer, step,
the watch), ``lawwatch/`` (``history.jsonl``, ``pr.safetensors``, ``law.png`` at the end) and
``csv/`` (the Fabric's ``CSVLogger``: the loss and the law's scalars).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the nanoGPT recipe beside this one
import pretrain_nanogpt as nanogpt

import lawwatch
from lawwatch.demo import corpus
from lawwatch.integrations.fabric import FabricWatch


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The nanoGPT recipe's options, and ``--devices`` (processes; Fabric's DDP above one)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--devices", type=int, default=1, help="processes (DDP when above 1)")
    ours, rest = parser.parse_known_args(argv)
    args = nanogpt.parse(rest)
    args.devices = ours.devices
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    fabric = L.Fabric(
        accelerator="cpu" if not torch.cuda.is_available() else "auto",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        loggers=CSVLogger(args.out, name="csv", version=0),
    )
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size

    # the nanoGPT recipe's data and probe
    train_texts, heldout = corpus.split_texts(corpus.python_texts(args.source), 0.1, args.seed)
    tokenizer = corpus.train_tokenizer(train_texts, args.vocab_size)
    blocks = corpus.pack_texts(train_texts, tokenizer, args.seq_len + 1)
    probe = lawwatch.ProbeSet.from_texts(
        heldout, tokenizer, max_length=args.seq_len, num_texts=args.probe_texts, seed=args.seed
    )

    torch.manual_seed(args.seed)  # the same initial weights on every process
    config = nanogpt.GPTConfig(
        vocab_size=len(tokenizer),
        block_size=args.seq_len,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    model = nanogpt.GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    model, optimizer = fabric.setup(model, optimizer)

    # the one line (every process builds it; the main process writes lawwatch/ and the loggers)
    watch = FabricWatch(
        fabric,
        model,
        probe,
        every=args.every,
        last_step=args.steps,
        max_overhead=args.max_overhead,
        directory=args.out / "lawwatch",
    )
    state = {"model": model, "optimizer": optimizer, "step": 0, "lawwatch": watch}
    ckpt_path = args.out / "ckpt.pt"
    if args.resume and ckpt_path.exists():
        fabric.load(ckpt_path, state)  # the watch's history too: it continues
    start = step = state["step"]
    fabric.print(f"{world} process(es), from step {start} to {args.steps}")

    while True:
        watch.maybe_snapshot(step)  # `step` updates done (step 0: the initial weights)
        if step > start and (step % args.ckpt_every == 0 or step == args.steps):
            state["step"] = step
            fabric.save(ckpt_path, state)  # on every process: the watch records what is pending
        if step == args.steps:
            break
        draw = torch.Generator().manual_seed(args.seed * 1_000_003 + step * world + rank)
        batch = blocks[torch.randint(len(blocks), (args.batch_size,), generator=draw)]
        batch = batch.to(fabric.device)
        for group in optimizer.param_groups:
            group["lr"] = nanogpt.learning_rate(step, args)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        fabric.log("loss", loss.item(), step=step)
        if step % args.log_every == 0:
            fabric.print(f"step {step}: loss {loss.item():.4f}")

    watch.close()  # law.png in lawwatch/ (main process)
    for logger in fabric.loggers:
        logger.finalize("success")
    if fabric.is_global_zero and watch.history.records:
        record = watch.history.records[-1]
        print(f"step {record['step']}: r {record['pearson_r']:+.3f}, rho {record['rho']:.3f}")
        print(f"wrote {args.out / 'lawwatch'}", flush=True)
    fabric.barrier()  # drain gloo's work before the processes exit


if __name__ == "__main__":
    main()
