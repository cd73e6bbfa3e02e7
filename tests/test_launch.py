"""An unmodified accelerate script under the shipped 2-process CPU launch configuration.

``configs/accelerate/cpu_2proc.yaml`` with ``ACCELERATE_USE_CPU=1`` (the line its header shows)
forms one gloo group for a stock ``Accelerator()``; without the variable, the two processes each
train alone, and only one of them may write the history directory they share: never two
interleaved histories.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lawwatch.output.layout import HISTORY_FILE
from lawwatch.output.store import read_history
from tests.helpers.faults import raw_steps
from tests.helpers.workers.launch import accelerate_launch, run
from tests.helpers.workers.stock_accelerate import STEPS

CPU_2PROC = "configs/accelerate/cpu_2proc.yaml"
STOCK = ["-m", "tests.helpers.workers.stock_accelerate"]


def one_history(directory: Path, *, alone: bool) -> list[int]:
    """The steps in ``directory``'s history, checked to be one run's: each step once, every line
    a record, in order, from step 0 on (the default overhead budget may skip scheduled ones).

    ``alone``: a process that trains alone ends its history at the last step its loop called
    (``close()`` measures it); in a group only the schedule's steps are measured."""
    steps = raw_steps(directory)
    lines = (directory / HISTORY_FILE).read_text().splitlines()
    assert steps == read_history(directory).steps and len(lines) == len(steps)
    scheduled = {0, 1, 2, 4}
    assert steps == sorted(set(steps)) and steps[0] == 0
    if alone:
        assert steps[-1] == STEPS - 1 and set(steps[:-1]) <= scheduled
    else:
        assert set(steps) <= scheduled
    return steps


def launch(out: Path, env: dict[str, str]) -> tuple[list[dict], str]:
    log = run([*accelerate_launch("--config_file", CPU_2PROC), *STOCK, str(out)], env=env)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    return sorted(ranks, key=lambda r: r["index"]), log


@pytest.mark.slow
def test_an_unmodified_accelerate_script_forms_one_group_with_the_shipped_launch(tmp_path):
    out = tmp_path / "out"
    ranks, log = launch(out, {"ACCELERATE_USE_CPU": "1"})
    assert [(r["index"], r["processes"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank its own batches: one DDP run
    one_history(out / "lawwatch", alone=False)
    assert "WORLD_SIZE" not in log and "ERROR" not in log


@pytest.mark.slow
def test_processes_that_form_no_group_never_interleave_one_history(tmp_path):
    out = tmp_path / "out"
    ranks, log = launch(out, {"ACCELERATE_USE_CPU": "0"})
    # accelerate's launcher started two processes; a stock Accelerator() saw no GPU: alone each
    assert [(r["index"], r["processes"]) for r in ranks] == [(0, 1), (0, 1)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the same batches: two lone runs
    # one writer: each step once in the file, every line a record
    one_history(out / "lawwatch", alone=True)
    # the other process was told why it writes nothing, and each was told the fix
    assert log.count("is already written by another process") == 1
    assert log.count("each process trains alone and measures the whole probe") == 2
    assert log.count("ACCELERATE_USE_CPU=1 accelerate launch") == 2
