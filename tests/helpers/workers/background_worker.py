"""Two processes, DDP on gloo: LawWatch(background=True) equals the foreground path.

Run by tests/test_background_distributed.py as ``torchrun --nproc_per_node 2 -m
tests.helpers.workers.background_worker OUT``. The same (float64, tiny) model is trained with SGD
twice,
watched in the foreground and in the background; both histories go to ``rank{r}.json``. Then a
background solve that fails on rank 1 alone: every rank must skip that snapshot (logged) and
go on; then partitioned statistics (jackknife) in the background. Last, whether a lawwatch
worker thread is still alive.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lawwatch
from lawwatch.stats.residual import ResidualStats
from tests.helpers.models import VOCAB, tiny_gpt2
from tests.helpers.workers.common import TIMEOUT_S, setup, uneven_probe, write


def train(background: bool, steps: int = 10, **options) -> list[dict]:
    model = DistributedDataParallel(tiny_gpt2(seed=0).double())
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    data = torch.randint(
        1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(dist.get_rank())
    )
    watch = lawwatch.LawWatch(
        model,
        uneven_probe(),
        batch_size=2,
        max_overhead=None,
        every=3,
        last_step=steps - 1,
        background=background,
        background_lag=2,
        **options,
    )
    for step in range(steps):
        assert (watch.maybe_snapshot(step) is None) or not background
        model(data, labels=data).loss.backward()
        opt.step()
        opt.zero_grad()
    watch.close()
    return watch.history.records


def main() -> None:
    out = setup()
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    rank = dist.get_rank()
    results: dict = {
        "foreground": train(False),
        "background": train(True),
        "jackknife_foreground": train(False, steps=5, jackknife=2),
        "jackknife_background": train(True, steps=5, jackknife=2),
    }
    original = ResidualStats._solve
    calls = {"n": 0}

    def failing(self, entries, method):
        calls["n"] += 1
        if calls["n"] == 2:  # the second snapshot's share on rank 1
            raise RuntimeError("solve broke on rank 1")
        return original(self, entries, method)

    if rank == 1:
        ResidualStats._solve = failing
    results["failing"] = train(True, steps=5)
    ResidualStats._solve = original
    results["threads"] = [t.name for t in threading.enumerate() if "lawwatch" in t.name]
    write(out, rank, results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
