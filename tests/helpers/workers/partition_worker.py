"""The options kept per part of the probe (split, metric, jackknife) on a gloo group.

Run by tests/test_metrics_distributed.py as
``torchrun --nproc_per_node 2 -m tests.helpers.workers.partition_worker OUT``. Each rank measures
through ``LawWatch`` on its shard (the cells of each sequence decided by its index in the whole
probe); rank 0 adds ``lawwatch.measure`` on the whole probe as the one-process reference.
``phases``: the same shard statistics driven by hand through the three distributed phases
(``reduce_scatter``, ``solve_owned``, ``gather_owned``), the same calls on every kind of
statistics (the plain measurement included), then ``lawwatch.measurement.solve``.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

import lawwatch
from lawwatch.config import MeasureConfig
from lawwatch.measurement import accumulate, prepare, solve
from tests.helpers.models import ragged_probe, tiny_gpt2
from tests.helpers.workers.common import TIMEOUT_S, setup, write

OPTIONS = {
    "split": {"split": 0.4},
    "jackknife": {"jackknife": 3},
    "split_jackknife_onehot": {"split": 0.5, "jackknife": 3, "target": "onehot"},
    "fuzziness": {"metric": "separation_fuzziness", "jackknife": 2},
}


def numbers(snapshot) -> dict | None:
    if snapshot is None:
        return None
    keys = ("pearson_r_se", "rho_se")
    return {"pr": snapshot.pr.tolist(), **{k: snapshot.extra.get(k) for k in keys}}


def phases(model, probe, options: dict) -> dict | None:
    """The shard's statistics through the three phases, as a monitor drives them."""
    rank, world = dist.get_rank(), dist.get_world_size()
    config = MeasureConfig.build(None, batch_size=3, **options)
    targets = prepare(model, probe, config)  # on the whole probe: every shard alike
    stats = accumulate(model, probe.shard(rank, world), config, targets)
    stats.reduce_scatter()
    owned = stats.solve_owned()
    pr = stats.gather_owned(owned)
    return numbers(solve(stats, seconds=0.0, pr=pr))


def main() -> None:
    out = setup()
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    rank = dist.get_rank()
    model = tiny_gpt2(seed=0).double()  # float64: the comparison sees the reduction only
    probe = ragged_probe(seed=3, rows=31, max_len=24)  # 16 + 15 (+1 masked) rows
    results: dict = {"world": dist.get_world_size()}
    for name, options in {**OPTIONS, "plain": {}}.items():
        watch = lawwatch.LawWatch(model, probe, max_overhead=None, every=1, batch_size=3, **options)
        results[name] = {
            "watch": numbers(watch.snapshot(0)),
            "phases": phases(model, probe, options),
        }
        if rank == 0:
            results[name]["reference"] = numbers(lawwatch.measure(model, probe, **options))
    write(out, rank, results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
