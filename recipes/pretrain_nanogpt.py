"""Pretrain a nanoGPT-style model in a plain torch loop and watch the law emerge.

No ``transformers`` model and no Trainer: a small GPT defined below in nanoGPT's layout
(``transformer.wte``/``wpe``/``h``/``ln_f`` and ``lm_head``), trained on text that ships with
CPython (``lawwatch.demo.corpus``, the other recipes' source) with a byte-level BPE trained
here. lawwatch comes in with one line, and its state rides in the checkpoint::

    watch = lawwatch.LawWatch(model, probe, every=..., last_step=steps, directory=out / "lawwatch")
    ckpt["lawwatch"] = watch.state_dict()                             # saving
    watch.load_state_dict(ckpt["lawwatch"], resume_step=ckpt["step"])  # resuming

Launch::

    python recipes/pretrain_nanogpt.py --out runs/nanogpt
    python recipes/pretrain_nanogpt.py --out runs/nanogpt --steps 400 --resume  # continue
    torchrun --nproc_per_node 2 recipes/pretrain_nanogpt.py --out runs/nanogpt  # DDP

With ``WORLD_SIZE`` > 1 (torchrun) the processes form a DDP group: gloo on the CPU, NCCL on
GPUs. Writes to ``--out`` (main process): ``ckpt.pt`` (model, optimizer, step and the monitor's
state, loadable with ``torch.load(weights_only=True)``) and ``lawwatch/`` (``history.jsonl``,
``pr.safetensors`` and, at the end, ``law.png``).

lawwatch finds the blocks (the ``nn.ModuleList`` of ``config.n_layer`` modules,
``transformer.h``) and the final norm (``transformer.ln_f``) by itself. A model without a
``config.n_layer`` names them: ``LawWatch(..., blocks="transformer.h",
final_norm="transformer.ln_f")``.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import lawwatch
from lawwatch.demo import corpus

# -- the model: nanoGPT's layout, written here -----------------------------------------------


@dataclass
class GPTConfig:
    """The model's shape (nanoGPT's field names: lawwatch reads ``n_layer``)."""

    vocab_size: int
    block_size: int = 64  # the longest sequence (rows of the position table)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (b, t, 3d) -> three (b, heads, t, d/heads)
        q, k, v = (
            z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
            for z in self.c_attn(x).split(d, dim=2)
        )
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer: token + position embeddings, blocks, final norm, LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                "ln_f": nn.LayerNorm(config.n_embd),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input and output embeddings
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(b, t, vocab)`` of ``idx`` ``(b, t)``, and the loss when ``targets`` given."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# -- the run ---------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", type=Path, default=Path("runs/nanogpt"), help="checkpoint and lawwatch/ here")
    add("--resume", action="store_true", help="continue from <out>/ckpt.pt if it exists")
    add("--steps", type=int, default=200, help="optimizer steps in all")
    add("--batch-size", type=int, default=8, help="sequences per process per step")
    add("--seq-len", type=int, default=64)
    add("--n-layer", type=int, default=4)
    add("--n-head", type=int, default=4)
    add("--n-embd", type=int, default=64)
    add("--vocab-size", type=int, default=512, help="of the BPE trained here")
    add("--lr", type=float, default=3e-3)
    add("--warmup", type=int, default=10, help="steps of linear warm-up, then cosine decay")
    add("--source", default="topics", help="CPython text: topics | docstrings | all")
    add("--probe-texts", type=int, default=None, help="held-out documents in the probe")
    add("--every", type=int, default=50, help="lawwatch: measure every N steps (and early)")
    add(
        "--max-overhead",
        type=lambda v: None if v == "none" else float(v),
        default=lawwatch.WatchConfig().max_overhead,
        help="lawwatch: the share of training time snapshots may take (none: every scheduled one)",
    )
    add("--ckpt-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    add("--log-every", type=int, default=10)
    add("--seed", type=int, default=0)
    return parser.parse_args(argv)


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device): a DDP group when launched by torchrun, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank()
    if not cuda:
        return rank, world, torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return rank, world, torch.device("cuda", local)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """The rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    done = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * done))


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    rank, world, device = setup_distributed()
    main_process = rank == 0

    # data: CPython's text, a BPE trained on the train split (deterministic: every process
    # trains the same one), packed blocks; the probe from the held-out documents
    train_texts, heldout = corpus.split_texts(corpus.python_texts(args.source), 0.1, args.seed)
    tokenizer = corpus.train_tokenizer(train_texts, args.vocab_size)
    blocks = corpus.pack_texts(train_texts, tokenizer, args.seq_len + 1)  # inputs + next token
    probe = lawwatch.ProbeSet.from_texts(
        heldout, tokenizer, max_length=args.seq_len, num_texts=args.probe_texts, seed=args.seed
    )

    torch.manual_seed(args.seed)  # the same initial weights on every process
    config = GPTConfig(
        vocab_size=len(tokenizer),
        block_size=args.seq_len,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    ckpt_path = args.out / "ckpt.pt"
    ckpt = None
    if args.resume and ckpt_path.exists():
        # plain tensors and Python values only: the monitor's state included
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    # the one line (every process builds it; the main process writes lawwatch/)
    watch = lawwatch.LawWatch(
        trained,
        probe,
        every=args.every,
        last_step=args.steps,
        max_overhead=args.max_overhead,
        directory=args.out / "lawwatch",
    )
    start = 0
    if ckpt is not None:
        start = ckpt["step"]
        watch.load_state_dict(ckpt["lawwatch"], resume_step=start)  # continues the history
    if main_process:
        print(
            f"{world} process(es) on {device}, {sum(p.numel() for p in model.parameters())} "
            f"parameters, from step {start} to {args.steps}",
            flush=True,
        )

    step = start
    while True:
        # as nanoGPT evaluates: at the top of the loop, `step` updates done (step 0: the
        # initial weights), on every process
        watch.maybe_snapshot(step)
        if step > start and (step % args.ckpt_every == 0 or step == args.steps):
            state = watch.state_dict()  # on every process (it records pending results)
            if main_process:
                args.out.mkdir(parents=True, exist_ok=True)
                saved = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "lawwatch": state,
                }
                torch.save(saved, ckpt_path)
        if step == args.steps:
            break
        # each process draws its own batch, from (seed, step, rank): resumable without RNG state
        draw = torch.Generator().manual_seed(args.seed * 1_000_003 + step * world + rank)
        batch = blocks[torch.randint(len(blocks), (args.batch_size,), generator=draw)].to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        _, loss = trained(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if main_process and step % args.log_every == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)

    watch.close()  # law.png in lawwatch/ (main process)
    if main_process:
        for record in watch.history.records[-1:]:
            print(f"step {record['step']}: r {record['pearson_r']:+.3f}, rho {record['rho']:.3f}")
        print(f"wrote {args.out / 'lawwatch'}", flush=True)
    if world > 1:
        torch.distributed.barrier()  # drain gloo's work before the group goes (exit deadlock)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
