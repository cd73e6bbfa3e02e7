"""Residual statistics across real gloo process groups: reduce to owners, solve, gather.

Run by tests/test_residual_distributed.py as
``torchrun --nproc_per_node W -m tests.helpers.workers.residual_worker OUT``. Every rank builds the
same data from fixed seeds and keeps an uneven shard of the examples (one case leaves a rank with
none); ``rank{r}.json`` holds, per case, the PRs from ``reduce_scatter_compute`` and from
``all_reduce`` + ``compute`` and, from the same rank, the one-process reference on all the data.
The collectives go in slices of a few hundred bytes (``COLLECTIVE_BYTES`` lowered) so entries
are split across many reductions.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from lawwatch.stats import residual
from lawwatch.stats.residual import ResidualStats, prediction_residuals
from tests.helpers.workers.common import TIMEOUT_S, setup, write


def data(layers: int, n: int, d: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm'd features (rank-deficient) with an offset column, partly predictive of ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    x = torch.randn(layers, n, d, generator=gen, dtype=torch.float64)
    x[:, :, 0] += torch.linspace(0.5, 2.0, layers).view(-1, 1) * (ids.double() / vocab - 0.5)
    x = torch.nn.functional.layer_norm(x, (d,))
    x[:, :, 1] += 300.0  # an offset: the shifts of different ranks differ
    return x, ids


def shard(n: int, rank: int, world: int, empty_rank: int | None) -> slice:
    """Uneven contiguous shards (rank r gets a share growing with r); one may be empty."""
    weights = [0 if r == empty_rank else r + 1 for r in range(world)]
    bounds = [round(n * sum(weights[:r]) / sum(weights)) for r in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


class Payloads:
    """Bytes of every ``dist.reduce`` / ``dist.all_reduce`` while active, by collective."""

    def __init__(self) -> None:
        self.sizes: dict[str, list[int]] = {"reduce": [], "all_reduce": []}
        self.originals = {name: getattr(dist, name) for name in self.sizes}

    def __enter__(self) -> Payloads:
        for name, original in self.originals.items():

            def recording(tensor, *args, _name=name, _original=original, **kwargs):
                self.sizes[_name].append(tensor.numel() * tensor.element_size())
                return _original(tensor, *args, **kwargs)

            setattr(dist, name, recording)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.originals.items():
            setattr(dist, name, original)


def run_case(rank: int, world: int, *, layers, n, d, target, empty_rank=None, seed=0) -> dict:
    x, ids = data(layers, n, d, vocab=12 if target == "onehot" else 5000, seed=seed)
    classes = torch.unique(ids) if target == "onehot" else None
    part = shard(n, rank, world, empty_rank)

    def local() -> ResidualStats:
        stats = ResidualStats(layers, d, target=target, classes=classes)
        return stats.update(x[:, part], ids[part])

    stats = local()
    with Payloads() as scatter_payloads:
        scattered = stats.reduce_scatter_compute()
    try:
        stats.compute()
        consumed_refused = False
    except RuntimeError as error:
        consumed_refused = "reset()" in str(error)
    stats.reset()
    with Payloads() as all_reduce_payloads:
        reduced = local().all_reduce().compute()
    return {
        "scatter": scattered.tolist(),
        "all_reduce": reduced.tolist(),
        "reference": prediction_residuals(x, ids, target=target).tolist(),
        "owned": list(stats.owned_entries(rank, world)),
        "local_examples": part.stop - part.start,
        "consumed_refused": consumed_refused,
        "scatter_payloads": scatter_payloads.sizes,
        "all_reduce_payloads": all_reduce_payloads.sizes,
        "statistics_bytes": stats.sum_xx.numel() * 8,
    }


def main() -> None:
    out = setup()
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    rank, world = dist.get_rank(), dist.get_world_size()
    residual.COLLECTIVE_BYTES = 512  # many slices per entry: exercises the chunking
    results = {
        "world": world,
        "token_id": run_case(rank, world, layers=5, n=300, d=12, target="token_id"),
        "onehot": run_case(rank, world, layers=4, n=260, d=10, target="onehot", seed=1),
        "empty_rank": run_case(
            rank, world, layers=3, n=200, d=12, target="token_id", empty_rank=world - 1, seed=2
        ),
        "fewer_entries_than_ranks": run_case(
            rank, world, layers=world - 1, n=150, d=20, target="token_id", seed=3
        ),
    }
    # too few examples in total: every rank raises the same error (none is left waiting)
    x, ids = data(2, 9, 8, vocab=50, seed=4)
    part = shard(9, rank, world, None)
    try:
        ResidualStats(2, 8).update(x[:, part], ids[part]).reduce_scatter_compute()
        results["too_few"] = None
    except ValueError as error:
        results["too_few"] = str(error)
    write(out, rank, results)
    dist.barrier()  # drain gloo's worker threads before the group goes (exit deadlock)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
