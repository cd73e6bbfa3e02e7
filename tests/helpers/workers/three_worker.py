"""Three processes, plain DDP on gloo: the sharded solve equals one process; failures agree.

Run by tests/test_distributed.py as
``torchrun --nproc_per_node 3 -m tests.helpers.workers.three_worker OUT``.
Five entries over three processes is an uneven split (1, 2, 2 under
``ResidualStats.owned_entries``); layer subsets of four entries split 1, 1, 2. Rank 0
adds single-process references (``lawwatch.measure`` on the full probe, same weights, float64).
Then the solve fails on rank 2 alone (its share raises): every rank must skip that snapshot,
with a log line, and go on. Last, an overhead budget with different times on each rank.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lawwatch
from lawwatch.stats.residual import ResidualStats
from tests.helpers.models import tiny_gpt2
from tests.helpers.workers.common import TIMEOUT_S, pr_list, setup, uneven_probe, write


def main() -> None:
    out = setup()
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    rank = dist.get_rank()
    plain = tiny_gpt2(seed=0).double()  # 4 blocks: 5 entries
    model = DistributedDataParallel(plain)
    probe = uneven_probe()
    results: dict = {"world": dist.get_world_size()}
    cases = {
        "token_id": {},
        "onehot_subset": {"target": "onehot", "layers": (0, 1, 3, 4)},
        "shuffled_subset": {"target": "token_id_shuffled", "layers": (1, 2, 3, 4)},
    }
    for name, options in cases.items():
        watch = lawwatch.LawWatch(model, probe, batch_size=2, **options)
        snapshot = watch.snapshot(1)
        results[name] = pr_list(snapshot)
        results[f"{name}_layers"] = None if snapshot is None else list(snapshot.layers)
        results[f"ref_{name}"] = (
            lawwatch.measure(plain, probe, **options).pr.tolist() if rank == 0 else None
        )

    # the solve of rank 2's share fails; every rank skips, then the next snapshot succeeds
    watch = lawwatch.LawWatch(model, probe, batch_size=2)
    original = ResidualStats._solve
    if rank == 2:

        def failing(self, entries, method):
            raise RuntimeError("injected solve failure on rank 2")

        ResidualStats._solve = failing
    results["failed_solve"] = pr_list(watch.snapshot(2))
    ResidualStats._solve = original
    results["after_failure"] = pr_list(watch.snapshot(3))
    results["history_steps"] = [h["step"] for h in watch.history]

    # the overhead budget: rank 2's snapshots are slowest, rank 0's steps; the largest of each
    # decide, so every rank skips the same steps (3 s / (0.5 x 0.2 s) = 30 steps per snapshot)
    budget = lawwatch.LawWatch(model, probe, batch_size=2, every=1, max_overhead=0.5)
    clock = {"now": 0.0}
    budget._clock = lambda: clock["now"]
    inner = budget._snapshot

    def slow(step, where):
        clock["now"] += 1.0 + rank
        return inner(step, where)

    budget._snapshot = slow
    for step in range(40):
        budget.maybe_snapshot(step)
        clock["now"] += 0.2 if rank == 0 else 0.1
    results["budget_steps"] = budget.history.steps
    write(out, rank, results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
