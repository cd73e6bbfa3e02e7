"""How much does a bf16 forward move PR and the law? (CPU; a small GPT-2 trained here.)

Under DDP lawwatch runs the probe through the module inside the wrapper, which accelerate's
autocast does not reach: the forward is float32. Under FSDP2 with a bf16 ``MixedPrecisionPolicy``
or DeepSpeed bf16 the forward is the training one, in bf16. Features are upcast to float64 in
either case, but rounding already in the residual stream stays. This script trains the smoke
config's model shape for a few hundred steps, then measures the same probe four ways.

    python bench/mixed_precision.py [--steps 300] [--tiny]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lawwatch
from lawwatch import corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tiny", action="store_true", help="3 steps: a smoke run (seconds)")
    args = parser.parse_args()
    if args.tiny:
        args.steps = 3
    torch.manual_seed(0)
    train, heldout = corpus.split_texts(corpus.python_texts("topics"), 0.1)
    tok = corpus.train_tokenizer(train, 512)
    blocks = corpus.pack_texts(train, tok, 128)  # (blocks, 128): documents joined by EOS
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=4, n_head=4, n_positions=128)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = blocks[torch.randint(0, blocks.shape[0], (8,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f}s")
    probe = lawwatch.ProbeSet.from_texts(heldout, tok, max_length=128)
    print(probe)

    # measure runs a Hugging Face model whole, from its root (as under FSDP2 and ZeRO-3), so an
    # autocast region around it or bf16 weights reach the forward as they do there
    reference = lawwatch.measure(model, probe)  # float32 forward: the DDP path
    with torch.autocast("cpu", dtype=torch.bfloat16):  # accelerate's autocast, FSDP2 path
        autocast_pr = lawwatch.measure(model, probe).pr
    bf16_pr = lawwatch.measure(copy.deepcopy(model).to(torch.bfloat16), probe).pr  # ZeRO-3
    f64_pr = lawwatch.measure(copy.deepcopy(model).double(), probe).pr
    print(f"float32 forward: r={reference.fit.pearson_r:+.4f} rho={reference.fit.rho:.5f}")
    variants = {"float64": f64_pr, "bf16 autocast": autocast_pr, "bf16 weights": bf16_pr}
    for name, pr in variants.items():
        fit = lawwatch.fit_law(pr)
        rel = ((pr - reference.pr).abs() / reference.pr).max().item()
        print(
            f"{name:>14}: max |dPR|/PR={rel:.1e}  r={fit.pearson_r:+.4f} "
            f"(d={fit.pearson_r - reference.fit.pearson_r:+.1e})  rho={fit.rho:.5f} "
            f"(d={fit.rho - reference.fit.rho:+.1e})"
        )


if __name__ == "__main__":
    main()
