"""Collective misuse on a plain gloo group: every rank must be told what went wrong and the fix,
and training must go on.

Run by tests/test_distributed.py as
``torchrun --nproc_per_node 2 -m tests.helpers.workers.misuse_worker OUT``. In order:

1. Before any group forms, an ``accelerate.Accelerator`` built without the launcher's variables
   reports one process while ``WORLD_SIZE=2``: ``layout`` warns, once per process.
2. Step 0 on both ranks: a normal snapshot.
3. Rank 1 runs its own 7-element all-reduce (a metric vector, the vote's size) before its call
   at step 1; rank 0 calls at step 1 first and then runs the same all-reduce, as one script
   run by both would. Rank 0 waits for rank 1 at the snapshot's check-in, gives up, and meets
   rank 1 in the all-reduce; rank 1 comes to step 1 late, and skips it too.
4. Rank 1 skips step 2: rank 0 sees it already at step 3 and skips step 2 at once; both then
   measure step 3.
5. A DDP model trained on both ranks, the monitor called on rank 0 alone at step 5 (a call under
   ``if master_process:``): rank 0 waits at the check-in while rank 1 is in the gradient
   all-reduce, gives up and joins it. Training goes on; gloo aborts nothing.
6. The vote itself, met by a foreign 7-element all-reduce (rank 0 calls ``together`` at step 7):
   its marker tells it apart.
7. The vote with no one to meet (rank 0 alone at step 9): the process group's timeout, then the
   hint.

Each rank writes ``OUT/rank{r}.json``; the log (stderr) carries lawwatch's messages.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lawwatch
from lawwatch.watch.distributed import layout, together
from tests.helpers.models import tiny_gpt2
from tests.helpers.workers.common import pr_list, setup, uneven_probe, write

TIMEOUT_S = 4  # the process group's: lawwatch's check-in waits half of it, the vote all of it


def unformed_accelerator_warns() -> list[int]:
    """An Accelerator made without the launcher's variables: one process, as a launch that
    formed no group reports it. ``layout`` must warn once however often it is called."""
    from accelerate import Accelerator

    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.pop(k) for k in launcher if k in os.environ}
    single = Accelerator(cpu=True)
    os.environ.update(saved)
    return [layout(single).world, layout(single).world, layout().world]


def ddp_master_only(rank: int, results: dict) -> None:
    """Step 5 of a DDP loop measured on rank 0 alone; steps 4 and 6 on both."""
    model = tiny_gpt2(seed=1)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    watch = lawwatch.LawWatch(ddp, uneven_probe(), max_overhead=None, every=1, batch_size=4)
    gen = torch.Generator().manual_seed(rank)
    for step in (4, 5, 6):
        batch = torch.randint(1, 97, (2, 12), generator=gen)
        ddp(input_ids=batch, labels=batch).loss.backward()  # the gradient all-reduce
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 or step != 5:
            results[f"ddp_step{step}"] = pr_list(watch.maybe_snapshot(step))
    watch.close()
    results["ddp_weights"] = sum(p.double().sum().item() for p in model.parameters())


def main() -> None:
    out = setup()
    results: dict = {"unformed_worlds": unformed_accelerator_warns()}
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    rank = dist.get_rank()
    probe = uneven_probe()
    watch = lawwatch.LawWatch(tiny_gpt2(seed=0), probe, max_overhead=None, every=1, batch_size=4)
    results["step0"] = pr_list(watch.maybe_snapshot(0))

    # 3: rank 1 is in a collective of its own (a metric vector) when rank 0 reaches step 1
    metrics = torch.full((7,), 5.0e6 + rank, dtype=torch.float64)
    if rank == 1:
        dist.all_reduce(metrics, op=dist.ReduceOp.MAX)
    results["step1"] = pr_list(watch.maybe_snapshot(1))
    if rank == 0:
        dist.all_reduce(metrics, op=dist.ReduceOp.MAX)
    results["metrics"] = metrics.tolist()

    # 4: rank 1 skips step 2
    start = time.perf_counter()
    for step in (2, 3) if rank == 0 else (3,):
        results[f"step{step}"] = pr_list(watch.maybe_snapshot(step))
    results["seconds_2_3"] = time.perf_counter() - start

    # 5: DDP, the monitor called under `if master_process:` at step 5
    ddp_master_only(rank, results)

    # 6: the vote met by another collective of its size
    key = int(probe.content_hash()[:12], 16)
    if rank == 0:
        results["vote7"] = together(True, layout(), 7, key, lambda: "ran")
    else:
        dist.all_reduce(torch.full((7,), 5.0e6, dtype=torch.float64), op=dist.ReduceOp.MAX)

    # 7: the vote with no one to meet: rank 0 waits for the timeout
    start = time.perf_counter()
    if rank == 0:
        results["vote9"] = together(True, layout(), 9, key, lambda: "ran")
    results["seconds_9"] = time.perf_counter() - start
    write(out, rank, results)
    if rank == 1:  # stay out of every collective until rank 0's vote has timed out
        deadline = time.monotonic() + 60
        while not (out / "rank0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
