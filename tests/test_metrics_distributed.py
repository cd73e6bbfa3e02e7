"""Out-of-sample PR, separation fuzziness and the jackknife on a real 2-process gloo group.

Every sequence goes to the same cell on a shard as in the whole probe, so the reduced
statistics, hence every number, equal the one-process measurement.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.workers.launch import run, torchrun
from tests.helpers.workers.partition_worker import OPTIONS


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("partition")
    run([*torchrun(2), "-m", "tests.helpers.workers.partition_worker", str(out)])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _same(got, reference):
    assert max(abs(a - b) for a, b in zip(got["pr"], reference["pr"], strict=True)) < 1e-9
    for key in ("pearson_r_se", "rho_se"):
        if reference[key] is None:
            assert got[key] is None
        else:
            assert got[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIONS))
def test_two_processes_give_the_one_process_numbers(ranks, name):
    reference = ranks[0][name]["reference"]
    for r in ranks:
        got = r[name]["watch"]
        assert got is not None, f"rank {r} skipped the snapshot"
        _same(got, reference)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*OPTIONS, "plain"])
def test_the_three_phases_are_the_same_calls_on_every_statistics(ranks, name):
    """reduce_scatter, solve_owned, gather_owned: no type switch, the one-process numbers."""
    reference = ranks[0][name]["reference"]
    for r in ranks:
        _same(r[name]["phases"], reference)
