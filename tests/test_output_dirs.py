"""Trainer output folders as a user has them: checkpoints, the final model, the run's own probe.

One real Trainer run (tiny GPT-2, 4 steps, a checkpoint every 2, the callback measuring every 2
steps, then ``trainer.save_model()`` and ``trainer.save_state()`` as ``run_clm.py`` does) is
swept with ``lawwatch analyze``, and its histories drawn with ``lawwatch report``.
"""

import logging
import shutil

import numpy as np
import pytest

from lawwatch import cli, measure
from lawwatch.integrations.hf import LawWatchCallback
from lawwatch.output.layout import PROBE_FILE
from lawwatch.output.store import LocalHistory, read_history
from lawwatch.probe import ProbeSet
from tests.helpers.models import ragged_probe
from tests.helpers.trainer import make_trainer

SWEEP = ["--no-report", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A Trainer output_dir: checkpoint-2, checkpoint-4, the final model, lawwatch/."""
    out = tmp_path_factory.mktemp("run") / "out"
    trainer = make_trainer(
        out, [LawWatchCallback(ragged_probe(), every=2)], max_steps=4, save_steps=2
    )
    trainer.train()
    trainer.save_model()  # config.json and model.safetensors in out itself
    trainer.save_state()  # out/trainer_state.json: global_step 4
    return out


def close_to(record, live):
    return np.abs(np.subtract(record["pr"], live["pr"])).max() <= 1e-9 and record[
        "pearson_r"
    ] == pytest.approx(live["pearson_r"], abs=1e-9)


def test_output_dir_is_a_sweep_of_its_checkpoints_and_final_model(run, tmp_path, capsys):
    assert (run / "config.json").is_file() and (run / "checkpoint-2").is_dir()
    live = {r["step"]: r for r in read_history(run / "lawwatch")}
    # the probe the callback measured with is kept beside its history
    saved = ProbeSet.load(run / "lawwatch" / PROBE_FILE)
    assert saved.content_hash() == ragged_probe().content_hash() == live[4]["probe"]

    # no --probe: the run's own probe; the final model is at checkpoint-4's step: measured once
    assert cli.main(["analyze", str(run), "--out", str(tmp_path / "a"), *SWEEP]) == 0
    out = capsys.readouterr().out
    assert "found 2 checkpoints + the final model (step 4, measured as checkpoint-4)" in out
    assert "the run's own probe" in out and "2 measured" in out
    records = read_history(tmp_path / "a").records
    assert [r["step"] for r in records] == [2, 4]
    assert all(close_to(r, live[r["step"]]) for r in records)

    # a final model at a step no checkpoint holds (save_total_limit removed it): measured too
    alone = tmp_path / "alone"
    shutil.copytree(run, alone, ignore=shutil.ignore_patterns("checkpoint-4"))
    assert cli.main(["analyze", str(alone), "--out", str(tmp_path / "b"), *SWEEP]) == 0
    out = capsys.readouterr().out
    assert "found 1 checkpoint + the final model (step 4)" in out and "2 measured" in out
    records = read_history(tmp_path / "b").records
    assert [r["step"] for r in records] == [2, 4]
    assert records[1]["checkpoint"] == str(alone.resolve())
    assert all(close_to(r, live[r["step"]]) for r in records)

    # without trainer_state.json the final model's step is unknown: said, with the fix
    (alone / "trainer_state.json").unlink()
    assert cli.main(["analyze", str(alone), "--out", str(tmp_path / "c"), *SWEEP]) == 2
    assert "final model" in capsys.readouterr().err
    assert (
        cli.main(["analyze", str(alone), "--step", "4", "--out", str(tmp_path / "c"), *SWEEP]) == 0
    )


def test_another_probe_is_said_not_comparable_and_report_warns(run, tmp_path, capsys):
    ids, mask = ragged_probe().input_ids.clone(), ragged_probe().attention_mask
    ids[0, 0] += 1  # one token changed: another probe
    other = ProbeSet(ids, mask).save(tmp_path / "other.safetensors")
    argv = ["analyze", str(run / "checkpoint-4"), "--probe", str(other), "--out"]
    assert cli.main([*argv, str(tmp_path / "other"), *SWEEP]) == 0
    err = capsys.readouterr().err
    assert "not the probe the run was measured with" in err
    assert str((run / "lawwatch" / PROBE_FILE).resolve()) in err

    # the report of the live history and the other probe's sweep says they are not comparable
    shutil.copytree(run / "lawwatch", tmp_path / "live")
    set_aside = tmp_path / "live" / "series-1"
    shutil.copytree(run / "lawwatch", set_aside, ignore=shutil.ignore_patterns("series-*"))
    histories = [str(tmp_path / "live"), str(tmp_path / "other")]
    report = ["report", *histories, "--out", str(tmp_path / "r"), "--formats", "png"]
    assert cli.main(report) == 0
    err = capsys.readouterr().err
    probes = [read_history(h)[-1]["probe"] for h in histories]
    assert "measured differently" in err and "probe" in err
    assert all(p[:12] in err for p in probes)  # both named
    # the earlier series beside the history: named, with how to draw it
    assert "series-1" in err and f"lawwatch report {tmp_path / 'live'} {set_aside}" in err


def test_probe_is_kept_with_its_series(tmp_path, gpt2, caplog):
    first, second = ragged_probe(), ragged_probe(seed=1)
    snap = measure(gpt2, first)
    snap.step = 1
    local = LocalHistory(tmp_path, probe=first)
    local.write(snap)
    local.close()
    path = tmp_path / PROBE_FILE
    assert ProbeSet.load(path).content_hash() == first.content_hash()
    written = path.stat().st_mtime_ns
    LocalHistory(tmp_path, probe=first).close()
    assert path.stat().st_mtime_ns == written  # the same probe: not written again

    # another probe, its series not yet known: the old probe stays with the old records ...
    local = LocalHistory(tmp_path, probe=second)
    assert ProbeSet.load(path).content_hash() == first.content_hash()
    other = measure(gpt2, second)
    other.step = 2
    local.write(other)  # ... which move to series-1 with it; the new probe is kept here
    local.close()
    assert ProbeSet.load(tmp_path / "series-1" / PROBE_FILE).content_hash() == first.content_hash()
    assert ProbeSet.load(path).content_hash() == second.content_hash()
    assert read_history(tmp_path).steps == [2]

    # a probe that cannot be saved is logged; the history is written all the same
    broken = ragged_probe(seed=2)
    broken.meta["built_by"] = object()  # not JSON
    caplog.set_level(logging.WARNING, logger="lawwatch")
    local = LocalHistory(tmp_path / "broken", probe=broken)
    snap = measure(gpt2, broken)
    snap.step = 0
    local.write(snap)
    local.close()
    assert "probe was not saved" in caplog.text
    assert read_history(tmp_path / "broken").steps == [0]
    assert not (tmp_path / "broken" / PROBE_FILE).exists()
