"""Peak host memory of a snapshot at the shapes people pretrain (numbers in BENCHMARKS.md).

    PYTHONPATH=. .venv/bin/python bench/bench_memory.py [--shapes gpt2-small,llama-1.1b,7b]
        [--rows 9] [--length 512] [--batch-size 8] [--precision float64] [--dtype float32] [--tiny]

What lawwatch allocates depends only on the number of entries, the width d and the tokens per
batch, not on what the blocks compute. So each shape is a stand-in model with the right number
of blocks and width whose blocks are cheap (an elementwise residual update, no matmul) and
whose embeddings mix token and position multiplicatively (``E[token] ⊙ (1 + P[position])``:
the features have full rank, as a real model's do; a sum ``E[token] + P[position]`` would
span at most ``vocabulary + length - 1`` = 1535 dimensions, less than d at the larger shapes,
and send every entry to the solve's eigendecomposition fallback):
GPT-2 small (12 blocks, d 768), TinyLlama 1.1B (22, 2048), a 7B (32, 4096). Weights float32
or bfloat16 (``--dtype``: the captured hidden states are kept in the weights' dtype).

Method: the Linux peak resident set size. Before each phase the high-water mark is reset
(``echo 5 > /proc/self/clear_refs``) and the resident size noted; the phase's peak is
``VmHWM - VmRSS`` at its start (torch returns freed large blocks to the system, so the resident
size follows the live tensors; every byte we allocate is written, so it is resident). Each shape
runs in a fresh process. Phases: the bare forward over the probe (no hooks: the model's own
activations), then ``lawwatch.measurement`` in its two phases: ``accumulate`` (the forward passes
with hooks that turn each entry into float64 features and statistics as its block runs) and
``solve`` (the statistics exist when it starts). Reported:

* ``stats``: the statistics' own size, ``entries·(d² + 2d + d·K)·8`` bytes (K = 1 for the
  token-id target; the tensors ``ResidualStats`` allocates);
* ``snapshot peak``: the whole measurement, statistics included (the larger of the phases);
* ``beyond stats``: snapshot peak - stats (what a snapshot costs on top of the statistics);
* ``accumulate beyond stats``: the accumulation's peak - stats (one entry's float64 features,
  the final norm's kept input, the forward's activations with the hooks on);
* ``solve``: the solve's peak above the statistics (its workspace), and how many entries
  the fast path sent to the eigendecomposition;
* ``one entry by the eigen path``: the peak of the eigendecomposition's solve of one entry
  (statistics of the first entry alone, ``method="eigh"``): the fallback's workspace;
* ``forward peak``: the bare forward alone, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

SHAPES = {  # name -> (blocks, width)
    "gpt2-small": (12, 768),
    "llama-1.1b": (22, 2048),
    "7b": (32, 4096),
    "tiny": (4, 32),
}
VOCAB = 1024


class Block(nn.Module):
    """``x + a·tanh(w·x + b)`` per channel: the residual stream's shape at no matmul's cost."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim) * 0.5 + 1.0)
        self.b = nn.Parameter(torch.randn(dim) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * torch.tanh(self.w * x + self.b)


class StandIn(nn.Module):
    """Embeddings of token and position, ``blocks``, ``final_norm``: lawwatch's view of an LM."""

    def __init__(self, blocks: int, dim: int, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) * (1 + self.position(positions))  # (batch, length, d)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)


def _status(field: str) -> int:
    """A /proc/self/status field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_of(fn):
    """(result, peak bytes above the resident size at the start, seconds) of ``fn()``."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    start = _status("VmRSS")
    began = time.perf_counter()
    result = fn()
    return result, _status("VmHWM") - start, time.perf_counter() - began


def child(args: argparse.Namespace) -> dict:
    """Measure one shape in this (fresh) process."""
    import warnings

    from lawwatch import ProbeSet, measure
    from lawwatch.config import MeasureConfig
    from lawwatch.measurement import accumulate, prepare, solve
    from lawwatch.stats import wrapped
    from lawwatch.stats.residual import ResidualStats

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    blocks, dim = SHAPES[args.shape]
    model = StandIn(blocks, dim, args.length).to(getattr(torch, args.dtype)).eval()
    probe = ProbeSet.from_tokens(torch.randint(1, VOCAB, (args.rows, args.length)))

    def forward():
        with torch.no_grad():
            for ids, mask in probe.batches(args.batch_size):
                model(ids, mask)

    forward()  # warm-up: one-time allocations are not the snapshot's
    with warnings.catch_warnings():  # nor lawwatch's imports, BLAS/LAPACK buffers, pools
        warnings.simplefilter("ignore")
        small = StandIn(3, 8, 16).eval()
        warm = ProbeSet.from_tokens(torch.randint(1, VOCAB, (8, 16)))
        measure(small, warm, blocks="blocks", final_norm="final_norm", precision=args.precision)
    _, forward_peak, forward_s = peak_of(forward)
    config = MeasureConfig.build(
        batch_size=args.batch_size,
        blocks="blocks",
        final_norm="final_norm",
        precision=args.precision,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short probe: few examples per dimension
        # measure() in its phases: prepare + accumulate (the forward passes, statistics made
        # inside the hooks), then the solve; each phase's peak above the resident size at its
        # start (the statistics exist when the solve starts)
        began = time.perf_counter()
        targets = prepare(model, probe, config)
        stats, accumulate_peak, accumulate_s = peak_of(
            lambda: accumulate(model, probe, config, targets)
        )
        stats = wrapped(stats, ResidualStats)  # the PR statistics (the vital signs beside them)
        solved, solve_peak, solve_s = peak_of(stats.solve)
        seconds = time.perf_counter() - began
        # the eigen path's workspace (the fallback for entries the fast path cannot prove
        # safe), measured on the first entry alone: statistics of one entry, then its solve
        one = ResidualStats(1, stats.dim, layers=stats.layers[:1])
        for name in ("count", "sum_y", "sum_yy", "shift_y"):
            getattr(one, name).copy_(getattr(stats, name))
        for name in ("shift_x", "sum_x", "sum_xx", "sum_xy"):
            getattr(one, name).copy_(getattr(stats, name)[:1])
        _, eigh_peak, eigh_s = peak_of(partial(one.solve, method="eigh"))
    snapshot = solve(stats, seconds=seconds, pr=solved.pr)
    entries = blocks + 1
    # count, shift_x, sum_x, sum_xx, sum_xy (K = 1), shift_y, sum_y, sum_yy: float64
    stats_bytes = (1 + entries * (dim + dim + dim * dim + dim) + 3) * 8
    return {
        "shape": args.shape,
        "entries": entries,
        "d": dim,
        "tokens_per_batch": args.batch_size * (args.length - 1),
        "examples": snapshot.n_tokens,
        "precision": snapshot.extra["stats_precision"],
        "dtype": args.dtype,
        "stats_bytes": stats_bytes,
        # the snapshot's peak: the larger of the two phases' (the solve's on top of the stats)
        "snapshot_peak": max(accumulate_peak, stats_bytes + solve_peak),
        "beyond_stats": max(accumulate_peak - stats_bytes, solve_peak),
        "accumulate_beyond_stats": accumulate_peak - stats_bytes,
        "solve_peak": solve_peak,
        "accumulate_s": accumulate_s,
        "solve_s": solve_s,
        "eigh_fallbacks": int(solved.eigh.sum()),
        "eigh_entry_peak": eigh_peak,
        "eigh_entry_s": eigh_s,
        "forward_peak": forward_peak,
        "snapshot_s": seconds,
        "forward_s": forward_s,
        "rho": snapshot.fit.rho,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="gpt2-small,llama-1.1b,7b")
    parser.add_argument("--shape", help=argparse.SUPPRESS)  # one shape, in a child process
    parser.add_argument("--rows", type=int, default=9)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="float64", choices=("float64", "mixed"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--tiny", action="store_true", help="a 4 x 32 stand-in (tests)")
    args = parser.parse_args()
    if args.shape:
        print(json.dumps(child(args)))
        return
    if args.tiny:
        args.shapes, args.rows, args.length, args.batch_size = "tiny", 8, 16, 4
    gb = 1e9
    print(
        "| shape | entries × d | tokens/batch | precision | stats GB | snapshot peak GB "
        "| beyond stats GB | accumulate beyond stats GB | solve GB (eigen fallbacks) "
        "| one entry by the eigen path GB | bare forward peak GB "
        "| snapshot s (accumulate + solve) | weights |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        command = [
            sys.executable,
            __file__,
            "--shape",
            shape,
            *("--rows", str(args.rows), "--length", str(args.length)),
            *("--batch-size", str(args.batch_size), "--precision", args.precision),
            *("--threads", str(args.threads), "--dtype", args.dtype),
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            sys.exit(f"{shape} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {shape} | {r['entries']} × {r['d']} | {r['tokens_per_batch']} | {r['precision']} "
            f"| {r['stats_bytes'] / gb:.3f} | {r['snapshot_peak'] / gb:.3f} "
            f"| {r['beyond_stats'] / gb:.3f} | {r['accumulate_beyond_stats'] / gb:.3f} "
            f"| {r['solve_peak'] / gb:.3f} ({r['eigh_fallbacks']}) "
            f"| {r['eigh_entry_peak'] / gb:.3f} | {r['forward_peak'] / gb:.3f} "
            f"| {r['snapshot_s']:.1f} ({r['accumulate_s']:.1f} + {r['solve_s']:.1f}) "
            f"| {r['dtype']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
