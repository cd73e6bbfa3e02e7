"""How much does a bf16 forward move PR and the law? (CPU; a small GPT-2 trained here.)

lawwatch runs the probe forward with autocast off, in the weights' dtype: float32 weights
trained under bf16 autocast are measured in float32. Under FSDP2 with a bf16
``MixedPrecisionPolicy`` or DeepSpeed bf16 the weights only exist in bf16 during a forward, so
that is what is measured. Features are upcast to float64 in every case, but rounding already in
the residual stream stays. This script trains the smoke config's model shape for a few hundred
steps, then measures the same probe four ways: float32 (what lawwatch measures), float64, bf16
autocast (what a forward inside training's autocast would give: the forward is wrapped in
autocast as a training wrapper does it) and bf16 weights. A fifth row measures the float32
forward with the statistics in ``precision="mixed"`` (float32 Gram per batch, float64 sums)
against the float64 statistics: at ``--width 256`` it shows why float64 is the default.

    python bench/mixed_precision.py [--steps 300] [--width 64] [--extra-docs 0] [--tiny]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import lawwatch
from lawwatch.demo import corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=64, help="hidden size (4 heads, 4 blocks)")
    parser.add_argument(
        "--extra-docs",
        type=int,
        default=0,
        help="add this many training documents to the probe (more examples; a precision "
        "comparison, not a held-out measurement)",
    )
    parser.add_argument("--tiny", action="store_true", help="3 steps: a smoke run (seconds)")
    args = parser.parse_args()
    if args.tiny:
        args.steps = 3
    torch.manual_seed(0)
    train, heldout = corpus.split_texts(corpus.python_texts("topics"), 0.1)
    tok = corpus.train_tokenizer(train, 512)
    blocks = corpus.pack_texts(train, tok, 128)  # (blocks, 128): documents joined by EOS
    config = GPT2Config(
        vocab_size=len(tok), n_embd=args.width, n_layer=4, n_head=4, n_positions=128
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = blocks[torch.randint(0, blocks.shape[0], (8,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f}s")
    probe = lawwatch.ProbeSet.from_texts(heldout + train[: args.extra_docs], tok, max_length=128)
    print(probe)

    def under_autocast(m: torch.nn.Module) -> torch.Tensor:
        m = copy.deepcopy(m)  # its forward wrapped in bf16 autocast, inside lawwatch's context
        m.forward = torch.autocast("cpu", dtype=torch.bfloat16)(m.forward)
        return lawwatch.measure(m, probe).pr

    reference = lawwatch.measure(model, probe)  # what lawwatch measures: the float32 forward
    autocast_pr = under_autocast(model)
    bf16_pr = lawwatch.measure(copy.deepcopy(model).to(torch.bfloat16), probe).pr  # ZeRO-3 bf16
    f64_pr = lawwatch.measure(copy.deepcopy(model).double(), probe).pr
    mixed_pr = lawwatch.measure(model, probe, precision="mixed").pr  # float32 Gram per batch
    print(f"float32 forward: r={reference.fit.pearson_r:+.4f} rho={reference.fit.rho:.5f}")
    variants = {"float64": f64_pr, "bf16 autocast": autocast_pr, "bf16 weights": bf16_pr}
    variants["mixed stats"] = mixed_pr
    for name, pr in variants.items():
        fit = lawwatch.fit_law(pr)
        rel = ((pr - reference.pr).abs() / reference.pr).max().item()
        print(
            f"{name:>14}: max |dPR|/PR={rel:.1e}  r={fit.pearson_r:+.4f} "
            f"(d={fit.pearson_r - reference.fit.pearson_r:+.1e})  rho={fit.rho:.5f} "
            f"(d={fit.rho - reference.fit.rho:+.1e})"
        )
    gap = (reference.pr - lstsq_pr(model.eval(), probe)).abs().max().item()
    print(f"float64 statistics vs numpy lstsq: max |dPR| = {gap:.1e}")
    if gap > 1e-8:
        raise SystemExit(f"float64 statistics disagree with numpy lstsq by {gap:.1e} (> 1e-8)")


def lstsq_pr(model: torch.nn.Module, probe: lawwatch.ProbeSet) -> torch.Tensor:
    """PR by materialized features and numpy's float64 lstsq: an independent reference.

    Entries 0 … L-1 from ``output_hidden_states`` through a fresh LayerNorm, the last as the
    final norm ``ln_f`` of its input (grabbed by a pre-hook), all in float64: a float32 norm
    output holds a direction of pure rounding noise, which lstsq would fit.
    """
    norm = model.transformer.ln_f
    weight, bias = norm.weight.detach().double(), norm.bias.detach().double()
    grabbed: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda _m, args: grabbed.append(args[0]))
    features, targets = [], []
    try:
        with torch.no_grad():
            for ids, mask in probe.batches(8):
                keep = mask[:, 1:].bool() & mask[:, :-1].bool()  # t predicts token t + 1
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                states = [h[:, :-1][keep].double() for h in out.hidden_states[:-1]]
                eps = norm.eps
                entries = [F.layer_norm(h, h.shape[-1:], eps=eps) for h in states]
                last = grabbed.pop()[:, :-1][keep].double()
                entries.append(F.layer_norm(last, last.shape[-1:], weight, bias, eps=eps))
                features.append(entries)
                targets.append(ids[:, 1:][keep].double())
    finally:
        handle.remove()
    y = torch.cat(targets).numpy()
    tss = ((y - y.mean()) ** 2).sum()
    prs = []
    for entry in range(len(features[0])):
        x = torch.cat([f[entry] for f in features]).numpy()
        design = np.hstack([x, np.ones((len(x), 1))])
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        prs.append(((y - design @ coef) ** 2).sum() / tss)
    return torch.tensor(prs, dtype=torch.float64)


if __name__ == "__main__":
    main()
