"""Cost of hook capture and of layer selection on CPU (numbers in BENCHMARKS.md).

    .venv/bin/python bench/bench_capture.py [--threads 2] [--repeat 5] [--tiny]

A random GPT-2 of 12 blocks x 256 dims; a probe of 32 sequences x 128 tokens (4064 examples).
Reports the best of ``--repeat`` runs in process CPU time (steadier than wall time on a shared
machine; with one thread it is the work done): the base model's forward alone, the forward with
lawwatch's hooks and float64 features, the statistics update, and a whole ``measure``; each
with every entry and with every 4th (``layers=4``).
"""

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lawwatch import ProbeSet, measure
from lawwatch.capture import Capture
from lawwatch.probe import example_mask
from lawwatch.stats.residual import ResidualStats


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="9 blocks x 16 dims, once (tests)")
    args = parser.parse_args()
    # (blocks, width, probe sequences x tokens); --tiny only checks that the script runs (9
    # blocks: layers=4 keeps entries 0, 4, 8, 9, three after the embeddings, as the fit needs)
    n_layer, n_embd, rows, length = (9, 16, 8, 32) if args.tiny else (12, 256, 32, 128)
    if args.tiny:
        args.repeat = 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=1024,
        n_positions=length,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 1024, (rows, length))
    probe = ProbeSet.from_tokens(ids)
    mask = probe.attention_mask
    positions = example_mask(mask)
    capture = Capture(model)

    def forward():
        with torch.no_grad():
            model.transformer(input_ids=ids, attention_mask=mask.long(), use_cache=False)

    def hooked(capture):
        with torch.no_grad():
            return capture(ids, mask, positions)

    def statistics(features):  # the accumulation measure adds per batch: O(entries n d^2)
        targets = ids[:, 1:][positions[:, :-1]]
        return lambda: ResidualStats(features.shape[0], features.shape[2]).update(features, targets)

    every4 = Capture(model, layers=4)
    entries, some = n_layer + 1, ",".join(map(str, every4.layers))
    timed = [
        ("base forward, no hooks", forward),
        (f"forward + hooks + float64 features, {entries} entries", lambda: hooked(capture)),
        ("forward + hooks + float64 features, layers=4", lambda: hooked(every4)),
        (f"statistics update, {entries} entries", statistics(hooked(capture))),
        (f"statistics update, layers=4 ({some})", statistics(hooked(every4))),
        (f"measure, all {entries} entries", lambda: measure(model, probe, batch_size=32)),
        ("measure, layers=4", lambda: measure(model, probe, batch_size=32, layers=4)),
    ]
    print(f"threads={args.threads} examples={probe.num_examples()}")
    for name, fn in timed:
        fn()  # warm-up
        print(f"{name:50s} {best(fn, args.repeat) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
