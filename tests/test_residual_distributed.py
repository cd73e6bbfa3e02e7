"""``ResidualStats`` across real ``torchrun`` gloo groups of 2 and 3 processes (CPU).

The worker (``tests/helpers/workers/residual_worker.py``) gives each process an uneven shard of the
same data; ``reduce_scatter_compute`` (sums reduced to the process that solves each entry, PRs
gathered) and ``all_reduce`` + ``compute`` must both equal the one-process computation on all
the data, for the scalar id and the one-hot target, with a process holding no example and with
fewer entries than processes. Collectives go in slices of at most 512 bytes there, and the
test checks that none was larger: no process ever sends or receives a copy of the statistics.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.workers.launch import run, torchrun

TOL = 1e-9
CASES = ("token_id", "onehot", "empty_rank", "fewer_entries_than_ranks")


@pytest.fixture(scope="module", params=[2, 3], ids=["2-processes", "3-processes"])
def job(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"residual{world}")
    run([*torchrun(world), "-m", "tests.helpers.workers.residual_worker", str(out)])
    return world, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_every_process_gets_the_one_process_prs(job, case):
    world, ranks = job
    reference = ranks[0][case]["reference"]
    assert all(0 < p < 1 for p in reference)
    for r in ranks:
        assert r["world"] == world
        assert _max_diff(r[case]["scatter"], reference) <= TOL
        assert _max_diff(r[case]["all_reduce"], reference) <= TOL
        assert r[case]["consumed_refused"]  # the partial sums left behind are not usable


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_entries_are_split_unevenly_and_completely(job, case):
    _, ranks = job
    owned = [r[case]["owned"] for r in ranks]
    layers = len(ranks[0][case]["reference"])
    assert sorted(e for share in owned for e in share) == list(range(layers))
    assert max(map(len, owned)) - min(map(len, owned)) <= 1
    if case == "fewer_entries_than_ranks":
        assert [] in owned
    if case == "empty_rank":
        assert ranks[-1][case]["local_examples"] == 0


@pytest.mark.slow
def test_no_collective_carries_a_copy_of_the_statistics(job):
    _, ranks = job
    for r in ranks:
        for case in CASES:
            scatter, reduced = r[case]["scatter_payloads"], r[case]["all_reduce_payloads"]
            assert r[case]["statistics_bytes"] > 4 * 512  # so the bound below means something
            # reduce_scatter_compute: the small head and the target sums, then bounded slices
            assert scatter["reduce"] and max(scatter["reduce"]) <= 512
            assert len(scatter["all_reduce"]) == 2
            # all_reduce: the head, then bounded slices
            assert max(reduced["all_reduce"][1:]) <= 512


@pytest.mark.slow
def test_too_few_examples_raise_on_every_process(job):
    _, ranks = job
    for r in ranks:
        assert r["too_few"] is not None and "at least 10 are needed" in r["too_few"]
