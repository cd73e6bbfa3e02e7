"""What the logit lens adds to a snapshot, against the forward (numbers in BENCHMARKS.md).

    .venv/bin/python bench/bench_lens.py [--shape gpt2-small|1b] [--threads 1 2] [--repeat 2]
        [--rows 8] [--length 256] [--fractions DEFAULT 1.0] [--tiny]

Random weights (the cost does not depend on them). ``gpt2-small``: GPT-2 of 12 blocks × 768,
vocabulary 50257; ``1b``: a Llama of 16 blocks × 2048 (MLP 8192), vocabulary 128256 (1.5 B
parameters with its untied head, float32). For each thread count: the model's forward alone
(as the capture runs it), ``measure`` without the lens, and ``measure`` with the lens at each
fraction; best of ``--repeat`` in process CPU time (steadier than wall time on a shared
machine; with two threads it counts both threads' work).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from bench_capture import best  # the same timer: best of `repeat` in process CPU time

from lawwatch import ProbeSet, measure
from lawwatch.capture import Capture, evaluating
from lawwatch.stats.lens import DEFAULT_LENS_FRACTION


def build(shape: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if shape == "tiny":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=500, n_embd=16, n_layer=4, n_head=2, bos_token_id=0, eos_token_id=0
        )
        return GPT2LMHeadModel(config)
    if shape == "gpt2-small":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config())
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="gpt2-small", choices=("gpt2-small", "1b"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=2)
    # a probe must give more examples than the hidden size + 1 (1b: d = 2048)
    parser.add_argument("--rows", type=int, default=None, help="default: 8 (1b: 16)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--fractions", type=float, nargs="+", default=[DEFAULT_LENS_FRACTION])
    parser.add_argument("--tiny", action="store_true", help="a tiny model, once (tests)")
    args = parser.parse_args()
    shape = "tiny" if args.tiny else args.shape
    if args.rows is None:
        args.rows = 16 if shape == "1b" else 8
    if args.tiny:
        args.repeat, args.rows, args.length, args.threads = 1, 4, 32, [1]
    model = build(shape).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    probe = ProbeSet.from_tokens(torch.randint(0, vocab, (args.rows, args.length)))
    examples = args.rows * (args.length - 1)
    print(f"{shape}: {args.rows} x {args.length} tokens ({examples} examples), float32 weights")
    capture = Capture(model)

    def forward() -> None:
        with evaluating(model):
            for ids, mask in probe.batches(8):
                capture.run_bare(ids, mask)

    warnings.simplefilter("ignore")
    for threads in args.threads:
        torch.set_num_threads(threads)
        base = best(forward, args.repeat)
        plain = best(lambda: measure(model, probe), args.repeat)
        print(f"threads={threads}: forward {base:.2f} s, measure without lens {plain:.2f} s")
        for fraction in args.fractions:
            lensed = best(lambda f=fraction: measure(model, probe, lens=f), args.repeat)
            extra = lensed - plain
            print(
                f"  lens={fraction:.4g} (~{round(fraction * examples)} examples): measure "
                f"{lensed:.2f} s, lens +{extra:.2f} s = {100 * extra / plain:.0f}% of the "
                f"snapshot, {100 * extra / base:.0f}% of the forward"
            )


if __name__ == "__main__":
    main()
