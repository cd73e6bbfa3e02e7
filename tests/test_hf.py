"""LawWatchCallback in a real Trainer: local history, W&B offline runs read back, resume."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import lawwatch
from lawwatch import ProbeSet, measure
from lawwatch.integrations.hf import LawWatchCallback
from lawwatch.law import emergence_step
from lawwatch.output.store import read_history
from tests.helpers.models import ragged_probe, tiny_gpt2
from tests.helpers.trainer import PNG_MAGIC, make_trainer
from tests.helpers.wandb_offline import (
    final_summary,
    finish_run,
    history_rows,
    inspect_run,
    lawwatch_steps,
    table_rows,
)
from tests.helpers.workers.launch import run, torchrun

pytestmark = pytest.mark.slow


# -- local history ------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Stop training early, as early stopping would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_local_history_schedule_and_final_step(tmp_path):
    probe = ragged_probe()
    callback = LawWatchCallback(probe, max_overhead=None, every=4)
    trainer = make_trainer(tmp_path / "out", [callback], max_steps=10)
    initial = measure(tiny_gpt2(0), probe)  # the same weights the Trainer starts from
    trainer.train()

    directory = tmp_path / "out" / "lawwatch"
    records = read_history(directory).records
    # step 0 before any update, powers of two below `every`, multiples of it, the last step
    assert [r["step"] for r in records] == [0, 1, 2, 4, 8, 10]
    assert torch.allclose(torch.tensor(records[0]["pr"], dtype=torch.float64), initial.pr)
    final = measure(trainer.model, probe)
    assert torch.allclose(torch.tensor(records[-1]["pr"], dtype=torch.float64), final.pr)
    assert records[-1]["pr"] != records[0]["pr"]  # training changed the model
    for r in records:
        assert len(r["pr"]) == 5 and r["n_tokens"] == probe.num_examples()
        assert {"rho", "pearson_r", "slope", "intercept", "r2", "seconds"} <= set(r)
    matrix = load_file(directory / "pr.safetensors")
    assert matrix["steps"].tolist() == [0, 1, 2, 4, 8, 10]
    assert torch.equal(matrix["pr"], torch.tensor([r["pr"] for r in records], dtype=torch.float64))
    png = directory / "law.png"
    assert callback.report_path == png and png.read_bytes()[:8] == PNG_MAGIC
    assert [h["step"] for h in callback.monitor.history] == [0, 1, 2, 4, 8, 10]


def test_custom_schedule_and_early_stop(tmp_path):
    callback = LawWatchCallback(ragged_probe(), max_overhead=None, schedule=[3, 9])
    make_trainer(tmp_path / "out", [callback, StopAt(6)], max_steps=12).train()
    records = read_history(tmp_path / "out" / "lawwatch").records
    assert [r["step"] for r in records] == [0, 3, 6]  # 6: where training stopped


def test_rerun_from_step_0_replaces_old_history(tmp_path, caplog):
    make_trainer(
        tmp_path / "out",
        [LawWatchCallback(ragged_probe(), max_overhead=None, every=2)],
        max_steps=4,
    ).train()
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        callback = LawWatchCallback(ragged_probe(), max_overhead=None, every=2)
        make_trainer(tmp_path / "out", [callback], max_steps=2).train()
    assert "replacing the 4 records" in caplog.text
    records = read_history(tmp_path / "out" / "lawwatch").records
    assert [r["step"] for r in records] == [0, 1, 2]


def test_monitor_failures_never_stop_training(tmp_path, caplog):
    class Broken:
        def write(self, snapshot):
            raise RuntimeError("display gone")

        def close(self):
            raise RuntimeError("still gone")

    class Collect:
        def __init__(self):
            self.steps = []

        def write(self, snapshot):
            self.steps.append(snapshot.step)

        def close(self):
            pass

    tiny = ProbeSet.from_tokens([[1, 2, 3, 4, 5]])  # 4 examples for 16 features: refused
    failing = LawWatchCallback(tiny, max_overhead=None, every=2)
    working = LawWatchCallback(
        ragged_probe(), max_overhead=None, every=2, sinks=[Broken()], directory=tmp_path / "w"
    )
    (tmp_path / "a-file").write_text("not a directory")
    collect = Collect()
    homeless = LawWatchCallback(
        ragged_probe(), max_overhead=None, every=2, sinks=[collect], directory=tmp_path / "a-file"
    )
    trainer = make_trainer(tmp_path / "out", [failing, working, homeless], max_steps=4)
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        result = trainer.train()
    assert result.global_step == 4
    assert "Too few probe examples" in caplog.text
    assert "display gone" in caplog.text and "still gone" in caplog.text
    assert read_history(tmp_path / "out" / "lawwatch").records == []
    assert [r["step"] for r in read_history(tmp_path / "w").records] == [0, 1, 2, 4]
    # no local history (its directory is a file), yet every snapshot is taken and delivered
    assert "no local history" in caplog.text
    assert collect.steps == [0, 1, 2, 4] and homeless.report_path is None


def test_bad_settings_fail_when_the_callback_is_built():
    with pytest.raises(TypeError, match="ProbeSet"):
        LawWatchCallback([[1, 2, 3]])
    with pytest.raises(ValueError, match="target"):
        LawWatchCallback(ragged_probe(), target="logits")
    with pytest.raises(ValueError, match="normalize"):
        LawWatchCallback(ragged_probe(), normalize="batchnorm")
    with pytest.raises(ValueError, match="every"):
        LawWatchCallback(ragged_probe(), max_overhead=None, every=0)
    with pytest.raises(TypeError, match=r"Unknown measurement options \['layer'\]"):
        LawWatchCallback(ragged_probe(), layer=2)
    assert lawwatch.LawWatchCallback is LawWatchCallback


def test_measurement_options_reach_every_snapshot(tmp_path):
    probe = ragged_probe()
    callback = LawWatchCallback(probe, max_overhead=None, every=4, layers=[0, 2, 3, 4], offset=2)
    trainer = make_trainer(tmp_path / "out", [callback], max_steps=2)
    initial = measure(tiny_gpt2(0), probe, layers=[0, 2, 3, 4], offset=2)
    trainer.train()
    first = read_history(tmp_path / "out" / "lawwatch").records[0]
    assert first["layers"] == [0, 2, 3, 4] and first["n_tokens"] == probe.num_examples(offset=2)
    assert first["pr"] == pytest.approx(initial.pr.tolist(), abs=1e-12)


# -- W&B ----------------------------------------------------------------------------------------


def test_wandb_run_holds_the_law(tmp_path, offline_wandb):
    probe = ragged_probe()
    callback = LawWatchCallback(probe, max_overhead=None, every=4)
    trainer = make_trainer(tmp_path / "out", [callback], max_steps=10, report_to=["wandb"])
    trainer.train()
    run_dir = finish_run()
    assert run_dir.parent == offline_wandb / "wandb"
    local = read_history(tmp_path / "out" / "lawwatch").records
    records = inspect_run(run_dir)
    rows = history_rows(records)

    # one row per snapshot, in step order, in the Trainer's own run next to its loss rows
    assert lawwatch_steps(rows) == [r["step"] for r in local] == [0, 1, 2, 4, 8, 10]
    assert sorted(row["train/global_step"] for row in rows if "train/loss" in row) == list(
        range(1, 11)
    )
    law_rows = [row for row in rows if "lawwatch/rho" in row]
    for row, record in zip(law_rows, local, strict=True):
        for key in ("rho", "pearson_r", "r2", "slope"):
            assert row[f"lawwatch/{key}"] == pytest.approx(record[key], rel=1e-12)
        assert [row[f"lawwatch/pr/layer_{i:02d}"] for i in range(5)] == pytest.approx(
            record["pr"], rel=1e-12
        )
        assert "lawwatch/pr/layer_05" not in row

    # the summary: latest values and the emergence step, derived from the local history
    summary = final_summary(records)
    assert summary["lawwatch/step"] == 10
    assert summary["lawwatch/pearson_r"] == pytest.approx(local[-1]["pearson_r"], rel=1e-12)
    assert summary["lawwatch/rho"] == pytest.approx(local[-1]["rho"], rel=1e-12)
    expected = emergence_step([r["step"] for r in local], [r["pearson_r"] for r in local])
    assert "lawwatch/emergence_step" in summary
    assert summary["lawwatch/emergence_step"] == expected

    # the table grows by one block of (step, layer, pr, log10_pr) rows per snapshot
    table = table_rows(run_dir, "lawwatch/pr_table")
    assert len(table) == 6 * 5
    assert [tuple(row[:2]) for row in table] == [
        (r["step"], i) for r in local for i in range(len(r["pr"]))
    ]
    assert [row[2] for row in table] == pytest.approx(
        [p for r in local for p in r["pr"]], rel=1e-12
    )
    assert all(row[3] == pytest.approx(math.log10(row[2]), rel=1e-12) for row in table)

    # the chart of log10 PR against layer, and the PNG at the end
    assert any(
        "_wandb.visualize.lawwatch/law" in r.get("config", {}).get("update", {}) for r in records
    )
    images = [row for row in rows if row.get("lawwatch/report._type") == "image-file"]
    assert len(images) == 1 and images[0]["train/global_step"] == 10
    assert (run_dir / "files" / images[0]["lawwatch/report.path"]).read_bytes()[:8] == PNG_MAGIC


def test_resume_keeps_one_history(tmp_path, offline_wandb):
    out = tmp_path / "out"
    first = LawWatchCallback(ragged_probe(), max_overhead=None, every=2)
    make_trainer(out, [first], max_steps=8, save_steps=3, report_to=["wandb"]).train()
    first_run = finish_run()
    before = read_history(out / "lawwatch").records
    assert [r["step"] for r in before] == [0, 1, 2, 4, 6, 8]
    assert (out / "checkpoint-3").is_dir()

    # resume from step 3 (off the schedule): 4, 6 and 8 are measured again, nothing twice
    second = LawWatchCallback(ragged_probe(), max_overhead=None, every=2)
    trainer = make_trainer(out, [second], max_steps=8, save_steps=3, report_to=["wandb"])
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    second_run = finish_run()
    after = read_history(out / "lawwatch").records
    assert [r["step"] for r in after] == [0, 1, 2, 4, 6, 8]
    assert after[:3] == before[:3]  # kept, not redone
    # the resumed training is the same training: the redone snapshots agree
    for old, new in zip(before[3:], after[3:], strict=True):
        assert new["pr"] == pytest.approx(old["pr"], rel=1e-5)
    matrix = load_file(out / "lawwatch" / "pr.safetensors")
    assert matrix["steps"].tolist() == [0, 1, 2, 4, 6, 8]
    assert [h["step"] for h in second.monitor.history] == [0, 1, 2, 4, 6, 8]

    # each W&B run holds every step once, in order; the new run got the history before step 3
    assert first_run != second_run
    assert lawwatch_steps(history_rows(inspect_run(first_run))) == [0, 1, 2, 4, 6, 8]
    resumed = inspect_run(second_run)
    assert lawwatch_steps(history_rows(resumed)) == [0, 1, 2, 4, 6, 8]
    assert len(table_rows(second_run, "lawwatch/pr_table")) == 6 * 5
    assert final_summary(resumed)["lawwatch/step"] == 8


# -- several processes --------------------------------------------------------------------------


def test_every_process_measures_only_the_main_one_writes(tmp_path):
    script = Path(__file__).parent / "helpers" / "ddp_trainer.py"
    run([*torchrun(2), str(script), str(tmp_path / "out")], timeout=300)
    results = sorted((tmp_path / "out").glob("result_*.json"))
    by_rank = {line["rank"]: line for line in (json.loads(p.read_text()) for p in results)}
    assert sorted(by_rank) == [0, 1]
    assert by_rank[0]["done"] == by_rank[1]["done"] == 5  # both took part in every snapshot
    # every process solves the same reduced statistics; only the main one writes files
    assert by_rank[0]["history"] == by_rank[1]["history"] and len(by_rank[1]["history"]) == 5
    assert by_rank[0]["steps"] == [0, 1, 2, 4, 5]
    # the two shards' statistics, summed, are the whole probe's
    assert by_rank[0]["n_tokens"] == by_rank[0]["probe_examples"]
    assert by_rank[0]["final_pr"] == pytest.approx(by_rank[0]["single_process_pr"], rel=1e-9)
