"""A snapshot against its floor, the probe's forward pass (numbers in BENCHMARKS.md).

    PYTHONPATH=. .venv/bin/python bench/bench_floor.py [--shape gpt2-small|1b|1.1b|7b]
        [--blocks N] [--rows 32] [--length 256] [--batch-size 8] [--repeat 3] [--threads 2]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--no-lens] [--tiny]

Random weights (the costs do not depend on them). Shapes: ``gpt2-small`` (GPT-2, 12 × 768,
vocabulary 50257), ``1b`` (a Llama of 16 × 2048, MLP 8192, 8 key-value heads, vocabulary
128256: Llama 3.2 1B's shape), ``1.1b`` (TinyLlama: 22 × 2048, MLP 5632, 4 key-value heads,
vocabulary 32000), ``7b`` (Llama 2 7B: 32 × 4096, MLP 11008, vocabulary 32000). ``--blocks``
keeps only the first N blocks (a CPU cannot run the 1B forward often enough for a best of N:
the ratio is per token, and both the forward's and the statistics' work per token grow with
the blocks, so it moves little; the output says the shape measured).

Timed in one process, interleaved (each repeat runs every variant once, in turn), best of
``--repeat`` in wall time and in process CPU time (with two threads the CPU time counts both
threads' work):

* **forward**: the floor, the base model's forward over the probe with every layer's hidden
  states (``output_hidden_states=True``), no gradients, at the snapshot's batch size;
* **measure**: ``lawwatch.measure`` with the defaults; with ``jackknife=None``; with the logit
  lens at its default share (``lens=DEFAULT_LENS_FRACTION``);
* **phases** of the default measure: *capture* (the forward with lawwatch's hooks and every
  measured entry's float64 features, dropped as they come), *statistics* (``accumulate``:
  capture plus the statistics' update, minus capture), *solve* (the PRs and the jackknife's
  leave-one-group-out solves), *fit* (the law's fit of the PRs and of each replicate), and
  *lens* (``accumulate`` with the lens at its default share minus without).

Each row gives its time and its ratio to the forward's. ``--device cuda`` synchronizes before
each clock reading and adds the peak of allocated GPU memory per variant.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

SHAPES = ("gpt2-small", "1b", "1.1b", "7b", "tiny")


def build(
    shape: str,
    *,
    blocks: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A model of ``shape`` with random weights, in eval mode, built on ``device`` in ``dtype``.

    Args:
        shape: One of :data:`SHAPES` (``tiny``: a GPT-2 of 4 × 16, vocabulary 500, for tests).
        blocks: Keep only this many blocks (default: the shape's own).
        device: Where the weights are made (a 7B in bf16 is made on the GPU directly).
        dtype: The weights' dtype.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if shape in ("gpt2-small", "tiny"):
        kwargs = {"n_layer": 12} if shape == "gpt2-small" else {}
        if shape == "tiny":
            kwargs = {"vocab_size": 500, "n_embd": 16, "n_layer": 4, "n_head": 2}
        if blocks is not None:
            kwargs["n_layer"] = blocks
        config = GPT2Config(bos_token_id=0, eos_token_id=0, **kwargs)
        make = GPT2LMHeadModel
    else:
        llama = {  # (blocks, width, MLP, heads, key-value heads, vocabulary)
            "1b": (16, 2048, 8192, 32, 8, 128256),
            "1.1b": (22, 2048, 5632, 32, 4, 32000),
            "7b": (32, 4096, 11008, 32, 32, 32000),
        }[shape]
        config = LlamaConfig(
            num_hidden_layers=blocks if blocks is not None else llama[0],
            hidden_size=llama[1],
            intermediate_size=llama[2],
            num_attention_heads=llama[3],
            num_key_value_heads=llama[4],
            vocab_size=llama[5],
            max_position_embeddings=4096,
        )
        make = LlamaForCausalLM
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = make(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


@dataclass
class Timing:
    """The best wall and CPU seconds of one variant, and its peak GPU memory (bytes)."""

    wall: float = float("inf")
    cpu: float = float("inf")
    peak: int = 0


def clocked(fn: Callable[[], object], device: torch.device, timing: Timing) -> object:
    """Run ``fn`` once, keeping the best wall and CPU time (and the GPU peak) in ``timing``."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)  # host sync: the clock stops when the GPU is done
        timing.peak = max(timing.peak, torch.cuda.max_memory_allocated(device))
    timing.wall = min(timing.wall, time.perf_counter() - wall)
    timing.cpu = min(timing.cpu, time.process_time() - cpu)
    return result


def floor_table(
    model: torch.nn.Module,
    probe: object,
    *,
    batch_size: int = 8,
    repeat: int = 3,
    lens: bool = True,
) -> dict[str, Timing]:
    """Time the forward, ``measure`` and its phases on ``model`` and ``probe``, interleaved.

    Returns:
        Variant name -> its best :class:`Timing`, in the order of the table (the phases
        ``statistics`` and ``lens`` are differences of two timed runs, their ``peak`` 0).
    """
    from lawwatch import measure
    from lawwatch.capture import Capture, evaluating
    from lawwatch.config import MeasureConfig
    from lawwatch.law import fit_law
    from lawwatch.measurement import accumulate, prepare
    from lawwatch.probe import example_mask
    from lawwatch.stats.lens import DEFAULT_LENS_FRACTION

    device = next(model.parameters()).device
    config = MeasureConfig.build(batch_size=batch_size)
    lensed = MeasureConfig.build(batch_size=batch_size, lens=DEFAULT_LENS_FRACTION)
    targets = prepare(model, probe, config)
    capture = Capture(model)
    base = capture.base

    def forward() -> None:
        with evaluating(model):
            for ids, mask in probe.batches(batch_size):
                base(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device).long(),
                    output_hidden_states=True,
                    use_cache=False,
                )

    def captured() -> None:  # the forward with hooks and float64 features, nothing kept
        with evaluating(model):
            for ids, mask in probe.batches(batch_size):
                ids, mask = ids.to(device), mask.to(device)
                positions = example_mask(mask)
                capture.calibrate(ids, mask, positions)
                capture.stream(ids, mask, positions, lambda index, features: None)

    timings: dict[str, Timing] = {}
    for name in ("forward", "measure", "measure, jackknife=None", "measure, lens"):
        timings[name] = Timing()
    for name in ("capture", "accumulate", "solve", "fit", "accumulate, lens"):
        timings[name] = Timing()
    runs: list[tuple[str, Callable[[], object]]] = [
        ("forward", forward),
        ("measure", lambda: measure(model, probe, config)),
        ("measure, jackknife=None", lambda: measure(model, probe, config, jackknife=None)),
        ("capture", captured),
    ]
    if lens:
        runs.append(("measure, lens", lambda: measure(model, probe, lensed)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few examples per dimension at short probes
        for _name, fn in runs:  # warm-up: one-time set-up is not a snapshot's
            fn()
        for done in range(repeat):
            if done:  # progress: a full-size run takes minutes per repeat
                best = {k: round(t.wall, 2) for k, t in timings.items() if t.wall < float("inf")}
                print(f"after {done} of {repeat} repeats, best wall s: {best}", file=sys.stderr)
            for name, fn in runs:
                clocked(fn, device, timings[name])
            stats = clocked(
                lambda: accumulate(model, probe, config, targets), device, timings["accumulate"]
            )
            pr, replicates = clocked(
                lambda stats=stats: (stats.compute(), stats.replicates()), device, timings["solve"]
            )

            def fits(
                pr: torch.Tensor = pr,
                replicates: torch.Tensor | None = replicates,
                layers: tuple[int, ...] = stats.layers,
            ) -> None:
                fit_law(pr.cpu(), layers=layers)
                for values in [] if replicates is None else replicates:
                    fit_law(values.cpu(), layers=layers)

            clocked(fits, device, timings["fit"])
            del stats, pr, replicates  # the statistics' memory is not the next run's
            if lens:
                clocked(
                    lambda: accumulate(model, probe, lensed, targets),
                    device,
                    timings["accumulate, lens"],
                )
    derived = {
        "statistics": _minus(timings["accumulate"], timings["capture"]),
        "lens": _minus(timings["accumulate, lens"], timings["accumulate"]),
    }
    order = ["forward", "measure", "measure, jackknife=None"]
    order += ["measure, lens"] if lens else []
    order += ["capture", "statistics", "solve", "fit"] + (["lens"] if lens else [])
    return {name: timings.get(name) or derived[name] for name in order}


def _minus(a: Timing, b: Timing) -> Timing:
    return Timing(a.wall - b.wall, a.cpu - b.cpu, 0)


def print_table(timings: dict[str, Timing], *, label: str) -> None:
    """A BENCHMARKS.md table: each variant's seconds and its ratio to the forward's."""
    floor = timings["forward"]
    cuda = any(t.peak for t in timings.values())
    print(f"\n{label}\n")
    head = "| what | wall s | × forward (wall) | CPU s | × forward (CPU) |"
    print(head + (" peak GPU GiB |" if cuda else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if cuda else ""))
    for name, t in timings.items():
        phase = name in ("capture", "statistics", "solve", "fit", "lens")
        what = f"phase: {name}" if phase else name
        row = (
            f"| {what} | {t.wall:.2f} | {t.wall / floor.wall:.3f} | {t.cpu:.2f} | "
            f"{t.cpu / floor.cpu:.3f} |"
        )
        print(row + (f" {t.peak / 2**30:.2f} |" if cuda else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="gpt2-small", choices=SHAPES)
    parser.add_argument("--blocks", type=int, default=None, help="keep the first N blocks")
    parser.add_argument("--rows", type=int, default=32, help="probe sequences")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="the snapshot's batch size")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-lens", action="store_true", help="skip the lens's rows")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, once (tests)")
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.rows, args.length, args.repeat = "tiny", 16, 32, 1
    torch.set_num_threads(args.threads)
    from lawwatch import ProbeSet

    model = build(
        args.shape, blocks=args.blocks, device=args.device, dtype=getattr(torch, args.dtype)
    )
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.rows, args.length), generator=generator)
    probe = ProbeSet.from_tokens(ids)
    from lawwatch.capture import Capture

    blocks = len(Capture(model).blocks)
    label = (
        f"{args.shape} ({blocks} blocks, {args.dtype}, {args.device}), probe {args.rows} × "
        f"{args.length} tokens ({probe.num_examples()} examples), batch {args.batch_size}, "
        f"{args.threads} threads, best of {args.repeat}, torch {torch.__version__}"
    )
    timings = floor_table(
        model, probe, batch_size=args.batch_size, repeat=args.repeat, lens=not args.no_lens
    )
    print_table(timings, label=label)


if __name__ == "__main__":
    main()
