"""LawWatch(background=True) on 2 processes (torchrun, DDP on gloo): the collectives stay on
the training thread in program order, the owned solve runs on the worker, the PRs are gathered
``background_lag`` steps later on every rank; the records equal the foreground path's."""

from __future__ import annotations

import json

import pytest

from tests.helpers.workers.launch import run, torchrun

STEPS = [0, 1, 2, 3, 6, 9]  # every=3, last 9: 0, powers of two below 3, multiples of 3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("background")
    log = run([*torchrun(2), "-m", "tests.helpers.workers.background_worker", str(out)])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], log


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def max_pr_diff(a, b):
    pairs = [zip(ra["pr"], rb["pr"], strict=True) for ra, rb in zip(a, b, strict=True)]
    return max(abs(x - y) for pair in pairs for x, y in pair)


@pytest.mark.slow
def test_two_processes_background_equals_foreground(ranks):
    results, _ = ranks
    fore = results[0]["foreground"]
    assert [r["step"] for r in fore] == STEPS
    for r in results:  # every rank, same records; PRs equal to the foreground's
        assert [x["step"] for x in r["background"]] == STEPS
        assert max_pr_diff(r["background"], fore) <= 1e-12
        assert without_seconds(r["background"]) == without_seconds(r["foreground"])
        assert without_seconds(r["foreground"]) == without_seconds(fore)


@pytest.mark.slow
def test_two_processes_partitioned_background(ranks):
    results, _ = ranks
    for r in results:
        assert [x["step"] for x in r["jackknife_background"]] == [0, 1, 2, 3, 4]
        assert without_seconds(r["jackknife_background"]) == without_seconds(
            results[0]["jackknife_foreground"]
        )
        assert "pearson_r_se" in r["jackknife_background"][0]


@pytest.mark.slow
def test_two_processes_failing_background_solve_skips_on_every_rank(ranks):
    results, log = ranks
    for r in results:  # the snapshot of step 1 failed on rank 1: skipped everywhere, then on
        assert [x["step"] for x in r["failing"]] == [0, 2, 3, 4]
    assert "solve broke on rank 1" in log
    assert "the solve failed on process(es) [1]" in log
    assert all(r["threads"] == [] for r in results)  # no worker outlives close()
