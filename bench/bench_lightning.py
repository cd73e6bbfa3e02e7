"""What a Lightning fit pays for LightningWatch: the same fit without and with it, side by side.

    .venv/bin/python bench/bench_lightning.py [--steps 300] [--repeat 2] [--threads 1] [--tiny]

(``--tiny``: a 3-block, 16-wide model for 6 steps, seconds; it checks that the script runs.)
The model of ``recipes/pretrain_nanogpt.py`` (4 blocks x 64 dims, dropout 0.1, a byte-level
BPE of 512 tokens on CPython's text, sequences of 64, batch 8, AdamW) in a ``LightningModule``,
fitted by a Lightning ``Trainer`` on the CPU for ``--steps`` steps; the monitored fit adds
``LightningWatch(probe)`` with its defaults (``every=100``, the overhead budget). Each fit is a
fresh child process; fits alternate plain, lawwatch, lawwatch, plain, …, and each ratio
compares the two fits of one adjacent pair. The losses of every step are compared too: the
callback must not change training (dropout on).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve()
HEADER = "| pair | plain s (CPU s) | lawwatch s (CPU s) | ratio wall (CPU) | snapshots | snap s |"


def child(args: argparse.Namespace) -> None:
    """One fit; writes its times, losses and snapshot steps to ``args.out``."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "recipes"))
    import lightning.pytorch as pl
    import pretrain_nanogpt as nanogpt

    import lawwatch
    from lawwatch.demo import corpus
    from lawwatch.integrations.lightning import LightningWatch

    size = {"n_layer": 3, "n_embd": 16, "n_head": 2} if args.tiny else {}
    seq_len, vocab = (32, 300) if args.tiny else (64, 512)
    train, heldout = corpus.split_texts(corpus.python_texts("topics"), 0.1, 0)
    tokenizer = corpus.train_tokenizer(train, vocab)
    blocks = corpus.pack_texts(train, tokenizer, seq_len + 1)
    probe = lawwatch.ProbeSet.from_texts(heldout, tokenizer, max_length=seq_len, seed=0)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            config = nanogpt.GPTConfig(
                vocab_size=len(tokenizer), block_size=seq_len, dropout=0.1, **size
            )
            self.model = nanogpt.GPT(config)
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            _, loss = self.model(batch[:, :-1], batch[:, 1:])
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    pl.seed_everything(0, verbose=False)
    module = Module()
    loader = torch.utils.data.DataLoader(blocks, batch_size=8, shuffle=True)
    watch = LightningWatch(probe) if args.child == "watched" else None
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            default_root_dir=root,
            accelerator="cpu",
            max_steps=args.steps,
            callbacks=[watch] if watch else [],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.fit(module, loader)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps = watch.monitor.history.steps if watch else []
    seconds = sum(r["seconds"] for r in watch.monitor.history.records) if watch else 0.0
    Path(args.out).write_text(
        json.dumps(
            {"wall": wall, "cpu": cpu, "losses": module.losses, "snapshots": steps, "s": seconds}
        )
    )


def fit(variant: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, str(BENCH), "--child", variant, "--out", out.name]
        command += ["--steps", str(args.steps), "--threads", str(args.threads)]
        command += ["--tiny"] if args.tiny else []
        subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2, help="pairs of fits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--child", choices=["plain", "watched"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.repeat = 6, 1
    if args.child:
        child(args)
        return
    print(f"{args.steps} steps, {args.threads} thread(s), {args.repeat} pair(s)")
    print("| pair | plain s (CPU s) | lawwatch s (CPU s) | ratio wall (CPU) | snapshots | snap s |")
    print("|---|---|---|---|---|---|")
    same = True
    for pair in range(args.repeat):
        order = ["plain", "watched"] if pair % 2 == 0 else ["watched", "plain"]
        runs = {variant: fit(variant, args) for variant in order}
        plain, watched = runs["plain"], runs["watched"]
        same = same and plain["losses"] == watched["losses"]
        print(
            f"| {pair} | {plain['wall']:.1f} ({plain['cpu']:.1f}) | {watched['wall']:.1f} "
            f"({watched['cpu']:.1f}) | {watched['wall'] / plain['wall']:.3f} "
            f"({watched['cpu'] / plain['cpu']:.3f}) | {len(watched['snapshots'])} "
            f"({', '.join(map(str, watched['snapshots']))}) | {watched['s']:.2f} |"
        )
    print(f"training losses identical with and without the callback: {same}")


if __name__ == "__main__":
    main()
