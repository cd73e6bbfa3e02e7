"""`lawwatch analyze` across processes: real torchrun, 2 CPU processes, a real Trainer output_dir.

One Trainer run (tiny GPT-2, 6 steps, a checkpoint at each) is swept by one process in this one
(the reference) and by ``torchrun --nproc_per_node 2 -m lawwatch analyze`` (3 launches in all).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lawwatch import cli
from lawwatch.analyze import Outcome
from lawwatch.checkpoints import LoadOptions, find_checkpoints
from lawwatch.history import Snapshot
from lawwatch.output.store import read_history
from lawwatch.probe import ProbeSet
from lawwatch.sweep import PARTS_DIR, Team, _Parts, join, lead
from tests.helpers.models import ragged_probe
from tests.helpers.trainer import make_trainer
from tests.helpers.workers.launch import run, torchrun

STEPS = [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Trainer output_dir with checkpoint-1 … checkpoint-6, a probe file, and the one-process
    sweep of it (no report)."""
    root = tmp_path_factory.mktemp("sweep")
    out = root / "run"
    make_trainer(out, [], max_steps=6, save_steps=1).train()
    probe = ragged_probe().save(root / "probe.safetensors")
    reference = root / "one"
    argv = ["analyze", str(out), "--probe", str(probe), "--out", str(reference)]
    assert cli.main([*argv, "--no-progress", "--no-report"]) == 0
    return out, probe, read_history(reference).records


def same_numbers(records, reference):
    """Records equal to the reference's: steps in order, the numbers to 1e-9, the identity."""
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for a, b in zip(records, reference, strict=True):
        assert set(a) == set(b)
        assert np.abs(np.subtract(a["pr"], b["pr"])).max() <= 1e-9
        for key in ("rho", "pearson_r", "slope", "intercept", "r2"):
            assert a[key] == pytest.approx(b[key], abs=1e-9)
        for key in ("step", "n_tokens", "checkpoint", "probe", "config", "weights", "layers"):
            assert a[key] == b[key]


def rank_logs(logs: Path, rank: int) -> str:
    """What torchrun's ``--redirects 3 --log-dir`` kept of one rank's stdout and stderr."""
    (folder,) = logs.glob(f"*/attempt_0/{rank}")
    return (folder / "stdout.log").read_text() + (folder / "stderr.log").read_text()


def test_without_torchrun_there_is_no_team(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert join() is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: the one-process sweep
    assert join() is None


def test_the_main_process_records_what_a_stopped_sweep_left_and_copies_equal_weights(
    trained, tmp_path
):
    """The main process's sweep, in this process (one process: no group, all dealt to it)."""
    out, probe, reference = trained
    sweep = tmp_path / "sweep"
    parts = _Parts(sweep)
    parts.start()
    left = Snapshot.from_record(reference[2])  # step 3, as a killed sweep's process left it
    left.seconds = 123.0
    parts.write(3, Outcome("measured", snapshot=left))
    parts.write(5, Outcome("failed", reason="RuntimeError: out of memory"))  # tried again
    parts.done(1, None)  # a marker of the stopped sweep: not this one's
    (sweep / PARTS_DIR / ".step-4.json.999.tmp").write_text("{")  # a killed writer's
    again = tmp_path / "again"  # checkpoint-1's weights at step 7: copied, not measured
    shutil.copytree(out / "checkpoint-1", again)
    (again / "trainer_state.json").write_text(json.dumps({"global_step": 7}))

    checkpoints = find_checkpoints([str(out), str(again)])
    result = lead(Team(0, 1, 0), checkpoints, ProbeSet.load(probe), sweep, progress=False)
    assert result.recovered == [3] and result.measured == [1, 2, 4, 5, 6]
    assert result.copied == [7] and not result.failed
    records = read_history(sweep).records
    same_numbers(records[:-1], reference)
    assert records[2]["seconds"] == 123.0  # recorded as left, not measured again
    assert records[-1]["step"] == 7 and records[-1]["duplicate_of"] == str(out / "checkpoint-1")
    assert records[-1]["pr"] == records[0]["pr"]
    assert not (sweep / PARTS_DIR).exists()

    # run again: everything is in the history
    result = lead(Team(0, 1, 0), checkpoints, ProbeSet.load(probe), sweep, progress=False)
    assert result.skipped == [*STEPS, 7] and not result.measured and not result.recovered

    # device_map spreads one model over every GPU: not what a process of a sweep does
    with pytest.raises(ValueError, match="--device-map auto spreads one model"):
        lead(
            Team(0, 1, 0),
            checkpoints,
            ProbeSet.load(probe),
            sweep,
            load=LoadOptions(device_map="auto"),
        )


@pytest.mark.slow
def test_two_processes_give_the_one_process_sweep(trained, tmp_path):
    out, probe, reference = trained
    # checkpoint-2 replaced by a copy that cannot load: dealt to rank 1, reported by rank 0
    broken = tmp_path / "broken"
    shutil.copytree(out / "checkpoint-2", broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    specs = [str(out / f"checkpoint-{step}") for step in STEPS]
    specs[1] = str(broken)
    sweep, logs = tmp_path / "two", tmp_path / "logs"
    cmd = [*torchrun(2), "--redirects", "3", "--log-dir", str(logs), "-m", "lawwatch"]
    run(
        [*cmd, "analyze", *specs, "--probe", str(probe), "--out", str(sweep), "--progress"],
        fails=True,
    )

    main, other = rank_logs(logs, 0), rank_logs(logs, 1)
    assert main.count("lawwatch analyze: found 5 checkpoints + 1 model") == 1
    assert main.count("lawwatch analyze: dealt over 2 processes") == 1
    assert main.count("lawwatch analyze: 5 measured;") == 1
    assert main.count(f"FAILED {broken} (step 2)") == 1 and "no-such-model" in main
    assert "checkpoints:" in main and "probe batches:" in main  # the progress bars
    assert main.count("report in") == 1 and (sweep / "report.html").is_file()
    assert "lawwatch analyze" not in other and "checkpoints:" not in other
    assert "probe batches" not in other
    same_numbers(read_history(sweep).records, [r for r in reference if r["step"] != 2])
    assert not (sweep / PARTS_DIR).exists()  # handed over, then removed


@pytest.mark.slow
def test_a_killed_sweep_runs_again_without_measuring_twice(trained, tmp_path):
    out, probe, reference = trained
    sweep = tmp_path / "two"
    args = [str(out), "--probe", str(probe), "--out", str(sweep), "--no-progress", "--no-report"]
    # rank 1 (steps 2, 4, 6) is SIGKILLed loading step 4: step 2 is measured, 4 and 6 are not
    run([*torchrun(2), "-m", "tests.helpers.workers.sweep_kill", *args], fails=True)
    parts = [json.loads(p.read_text()) for p in (sweep / PARTS_DIR).glob("step-*.json")]
    left = {p["step"]: p["record"]["seconds"] for p in parts if p["kind"] == "measured"}
    recorded = {r["step"]: r["seconds"] for r in read_history(sweep).records}
    measured = {**recorded, **left}
    assert 2 in measured and 4 not in measured and 6 not in measured

    output = run([*torchrun(2), "-m", "lawwatch", "analyze", *args])
    assert output.count(f"{6 - len(measured)} measured") == 1
    assert (f"{len(left)} recorded from the stopped sweep" in output) == bool(left)
    final = read_history(sweep).records
    same_numbers(final, reference)
    # what the killed sweep measured is its record, not measured again
    assert all(r["seconds"] == measured[r["step"]] for r in final if r["step"] in measured)
    assert not (sweep / PARTS_DIR).exists()
