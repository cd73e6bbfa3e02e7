"""The accelerate recipe end to end on the CPU smoke config: one process, then two (torchrun).

The one-process run logs through a real W&B tracker (offline) attached to the Accelerator, and
what W&B recorded is read back with ``wandb leet inspect --json``.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lawwatch import ProbeSet, Schedule
from lawwatch.sinks import read_history
from tests.dist.launch import ROOT, run, torchrun

RECIPE = ["recipes/pretrain_accelerate.py", "--config", "configs/smoke_cpu.yaml"]
SMOKE = yaml.safe_load((ROOT / "configs" / "smoke_cpu.yaml").read_text())


def check_run(out: Path, log: str) -> list[dict]:
    """What every smoke run must leave: the scheduled snapshots over the whole probe."""
    steps = SMOKE["train"]["steps"]
    records = read_history(out / "lawwatch" / "history.jsonl")
    expected = Schedule(SMOKE["lawwatch"]["every"], last=steps).steps(steps)
    assert [r["step"] for r in records] == expected
    probe = ProbeSet.load(out / "probe.safetensors")
    for record in records:
        assert record["n_tokens"] == probe.num_examples()  # every shard counted once
        assert len(record["pr"]) == SMOKE["model"]["config"]["n_layer"] + 1
        assert all(math.isfinite(p) and 0 < p <= 1 for p in record["pr"])
    final_loss = float(re.findall(rf"step {steps}: loss ([0-9.]+)", log)[-1])
    assert final_loss < math.log(SMOKE["data"]["vocab_size"]) - 0.5  # it trained
    return records


@pytest.mark.slow
def test_recipe_one_process_with_wandb(tmp_path):
    out = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    sets = ["--set", f"output.dir={out}", "--set", "output.log_with=wandb"]
    log = run([sys.executable, *RECIPE, *sets], env)
    records = check_run(out, log)
    assert "DistributedType.NO" in log
    # the same snapshots reached W&B through accelerator.log, at their training steps
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    inspect = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [json.loads(line) for line in inspect.stdout.splitlines() if line.strip()]
    logged = {
        row["history"]["step"]["num"]: row["history"]["item"]
        for row in rows
        if row["type"] == "history" and "lawwatch/pearson_r" in row["history"]["item"]
    }
    assert sorted(logged) == [r["step"] for r in records]
    for record in records:
        item = logged[record["step"]]
        assert item["lawwatch/pearson_r"] == record["pearson_r"]
        assert item["lawwatch/rho"] == record["rho"]
        assert [item[f"lawwatch/pr/{i:02d}"] for i in range(len(record["pr"]))] == record["pr"]


@pytest.mark.slow
def test_recipe_two_processes(tmp_path):
    out = tmp_path / "out"
    log = run([*torchrun(2), *RECIPE, "--set", f"output.dir={out}"])
    check_run(out, log)
    assert "2 process(es), DistributedType.MULTI_CPU" in log
    assert "ERROR" not in log and "skipped" not in log
