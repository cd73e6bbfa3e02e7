"""Collective misuse on a plain gloo group: every rank must be told what went wrong and the fix.

Run by tests/test_distributed.py as
``torchrun --nproc_per_node 2 -m tests.helpers.workers.misuse_worker OUT``. In order:

1. Before any group forms, an ``accelerate.Accelerator`` built without the launcher's variables
   reports one process while ``WORLD_SIZE=2``: ``layout`` warns, once per process.
2. Step 0 on both ranks: a normal snapshot.
3. Rank 1 runs its own 7-element all-reduce (the vote's size) while rank 0 votes on step 1.
4. Rank 1 skips step 2: rank 0's vote on step 2 meets rank 1's on step 3 (both skip), then
   rank 0's vote on step 3 meets no one and times out after ``TIMEOUT_S`` seconds.

With ``detail`` after OUT (run with ``TORCH_DISTRIBUTED_DEBUG=DETAIL``), instead: rank 1 runs
an all-reduce of another size and dtype while rank 0 votes on step 1; torch names both
collectives, the vote among them by its fixed shape.

Each rank writes ``OUT/rank{r}.json``; the log (stderr) carries lawwatch's messages.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import lawwatch
from lawwatch.watch.distributed import layout
from tests.helpers.models import tiny_gpt2
from tests.helpers.workers.common import pr_list, setup, uneven_probe, write

TIMEOUT_S = 3  # the vote that meets no one fails after this long


def unformed_accelerator_warns() -> list[int]:
    """An Accelerator made without the launcher's variables: one process, as a launch that
    formed no group reports it. ``layout`` must warn once however often it is called."""
    from accelerate import Accelerator

    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.pop(k) for k in launcher if k in os.environ}
    single = Accelerator(cpu=True)
    os.environ.update(saved)
    return [layout(single).world, layout(single).world, layout().world]


def detail(out, rank: int, watch) -> None:
    """Rank 1 in a collective of another size while rank 0 votes; torch checks each pair."""
    results = {"step0": pr_list(watch.maybe_snapshot(0))}
    if rank == 0:
        results["step1"] = pr_list(watch.maybe_snapshot(1))
    else:
        try:
            dist.all_reduce(torch.zeros(100))  # e.g. a gradient bucket
        except RuntimeError as error:
            results["error"] = str(error)
    write(out, rank, results)
    dist.destroy_process_group()


def main() -> None:
    out = setup()
    if sys.argv[2:] == ["detail"]:
        dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
        model, probe = tiny_gpt2(seed=0), uneven_probe()
        return detail(out, dist.get_rank(), lawwatch.LawWatch(model, probe, batch_size=4))
    results: dict = {"unformed_worlds": unformed_accelerator_warns()}
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    rank = dist.get_rank()
    watch = lawwatch.LawWatch(
        tiny_gpt2(seed=0), uneven_probe(), max_overhead=None, every=1, batch_size=4
    )
    results["step0"] = pr_list(watch.maybe_snapshot(0))

    # 3: rank 1 is in a collective of its own (a metric vector, say) while rank 0 votes
    if rank == 0:
        results["step1"] = pr_list(watch.maybe_snapshot(1))
    else:
        metrics = torch.full((7,), 5.0e6, dtype=torch.float64)
        dist.all_reduce(metrics, op=dist.ReduceOp.MAX)

    # 4: rank 1 skips step 2; rank 0 then waits in its vote on step 3 until the timeout
    steps = (2, 3) if rank == 0 else (3,)
    start = time.perf_counter()
    for step in steps:
        results[f"step{step}"] = pr_list(watch.maybe_snapshot(step))
    results["seconds"] = time.perf_counter() - start
    write(out, rank, results)
    if rank == 1:  # stay out of every collective until rank 0's vote has timed out
        deadline = time.monotonic() + 60
        while not (out / "rank0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
