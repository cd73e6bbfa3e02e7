"""What the Trainer callback promises under abuse, in a real ``transformers.Trainer``.

Training is unchanged by the monitor (dropout, gradient accumulation, gradient checkpointing);
two callbacks never share one history; a resume with other options starts a new series.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from transformers import Trainer, TrainingArguments

from lawwatch import measure
from lawwatch.integrations.hf import LawWatchCallback
from lawwatch.output.store import read_history
from tests.helpers.models import ragged_probe, tiny_gpt2
from tests.helpers.trainer import Tokens, make_trainer

pytestmark = pytest.mark.slow


def losses(trainer: Trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def train(out, callbacks, **options) -> Trainer:
    """A Trainer of the tiny GPT-2 (dropout 0.1 everywhere, as GPT-2's config has it)."""
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **options,
    )
    model = tiny_gpt2(0)
    assert model.config.resid_pdrop > 0 and model.config.attn_pdrop > 0  # dropout is on
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "options",
    [{}, {"gradient_accumulation_steps": 2, "gradient_checkpointing": True}],
    ids=["dropout", "accumulation_and_checkpointing"],
)
def test_training_is_unchanged_by_the_monitor(tmp_path, options):
    """Bit-identical losses with and without snapshots at every step (dropout draws from the
    RNG the snapshot leaves untouched); snapshots at optimizer steps; each a measurement of the
    weights of that step."""
    probe = ragged_probe()
    without = train(tmp_path / "without", [], **options)
    callback = LawWatchCallback(probe, max_overhead=None, every=1)
    watched = train(tmp_path / "with", [callback], **options)
    assert losses(watched) == losses(without) and len(losses(watched)) == 3
    records = read_history(tmp_path / "with" / "lawwatch").records
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # optimizer steps, not micro-batches
    assert records[0]["pr"] == pytest.approx(measure(tiny_gpt2(0), probe).pr.tolist(), abs=1e-12)
    final = measure(watched.model, probe).pr.tolist()
    assert records[-1]["pr"] == pytest.approx(final, abs=1e-12)
    assert records[-1]["pr"] != records[0]["pr"]


def test_two_callbacks_never_share_one_history(tmp_path, caplog):
    """Two probes, one output directory: the second local history is refused with the fix; the
    first keeps its own steps, whole (neither interleaved nor rewritten by the other)."""
    first = LawWatchCallback(ragged_probe(seed=0), max_overhead=None, every=2)
    second = LawWatchCallback(ragged_probe(seed=1), max_overhead=None, every=2)
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        make_trainer(tmp_path / "out", [first, second], max_steps=4).train()
    records = read_history(tmp_path / "out" / "lawwatch").records
    assert [r["step"] for r in records] == [0, 1, 2, 4]
    assert {r["probe"] for r in records} == {ragged_probe(seed=0).content_hash()}
    assert "already written by another lawwatch monitor" in caplog.text
    assert "its own directory=" in caplog.text
    assert [h["step"] for h in second.monitor.history] == [0, 1, 2, 4]  # it still measured
    # with a directory each, both histories are kept
    third = LawWatchCallback(
        ragged_probe(seed=1), max_overhead=None, every=2, directory=tmp_path / "second"
    )
    # max_overhead=None: the budget would leave step 1 to time training steps
    own = LawWatchCallback(ragged_probe(), max_overhead=None)
    make_trainer(tmp_path / "two", [own, third], max_steps=2).train()
    assert read_history(tmp_path / "two" / "lawwatch").steps == [0, 1, 2]
    assert read_history(tmp_path / "second").steps == [0, 1, 2]


def test_resume_with_other_options_starts_a_new_series(tmp_path, caplog):
    out = tmp_path / "out"
    first = LawWatchCallback(ragged_probe(), max_overhead=None, every=2)
    make_trainer(out, [first], max_steps=6, save_steps=3).train()
    before = read_history(out / "lawwatch")
    assert before.steps == [0, 1, 2, 4, 6]
    callback = LawWatchCallback(
        ragged_probe(), max_overhead=None, every=2, offset=2
    )  # another target position
    trainer = make_trainer(out, [callback], max_steps=6, save_steps=3)
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert "offset=1 → 2" in caplog.text and "series-1" in caplog.text
    assert read_history(out / "lawwatch" / "series-1") == before  # set aside whole
    after = read_history(out / "lawwatch").records
    assert [r["step"] for r in after] == [4, 6]  # the new series: nothing of the old one
    assert {r["config"]["offset"] for r in after} == {2}
    assert [h["step"] for h in callback.monitor.history] == [4, 6]


def test_a_kill_right_after_a_checkpoint_loses_no_background_snapshot(tmp_path):
    """background=True: the records a checkpoint claims are on disk before it is written."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]

    def run(mode):
        return subprocess.run(
            [sys.executable, "-m", "tests.helpers.checkpoint_kill", str(tmp_path), mode],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
        )

    killed = run("kill")
    assert killed.returncode == -9, killed.stderr  # a real SIGKILL, in the Trainer's on_save
    assert (tmp_path / "checkpoint-8").is_dir()
    assert 8 in read_history(tmp_path / "lawwatch").steps  # durable before the checkpoint
    resumed = run("resume")
    assert resumed.returncode == 0, resumed.stderr
    assert read_history(tmp_path / "lawwatch").steps == [0, 1, 2, 4, 8, 12]


def test_the_budget_is_decided_once_and_kept_in_the_checkpoints(tmp_path):
    """README's first quickstart pairs every=20 with save_steps=20: step 20 is checkpointed, so
    it is measured whatever the budget decides (analyze's checkpoint-20 has its live record);
    the decision is kept in each checkpoint's Trainer state, so a run resumed from
    checkpoint-20 measures the steps the first pass measured, whatever its own timings."""
    import json

    from lawwatch.watch.schedule import Schedule

    first = LawWatchCallback(ragged_probe(), every=4)  # the default budget, max_overhead=0.1
    make_trainer(tmp_path / "out", [first], max_steps=40, save_steps=20).train()
    steps = read_history(tmp_path / "out" / "lawwatch").steps
    assert {0, 20, 40} <= set(steps)  # the start, a checkpoint, the final step
    decided = first.monitor.schedule_state()
    assert decided["origin"] == 0 and decided["decided_at"] == 3 and decided["gap"] >= 1
    kept = json.loads((tmp_path / "out" / "checkpoint-20" / "trainer_state.json").read_text())
    assert kept["stateful_callbacks"]["lawwatch"]["schedule"] == decided
    # scheduled steps between the checkpoints: exactly the decided chain's (no clock race)
    expected, last = [], 0
    for s in Schedule(4).steps(39)[1:]:  # the greedy chain from step 0, measured from step 3
        if s >= last + decided["gap"]:
            last = s
            expected += [s] if s >= 3 else []
    assert steps == sorted({0, *expected, 20, 40})

    resumed = LawWatchCallback(ragged_probe(), every=4)
    trainer = make_trainer(tmp_path / "out", [resumed], max_steps=40, save_steps=20)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-20"))
    assert resumed.monitor.schedule_state() == decided
    assert read_history(tmp_path / "out" / "lawwatch").steps == steps


def test_an_epoch_checkpoint_on_the_schedule_is_measured_whatever_the_budget(tmp_path):
    """save_strategy="epoch": the Trainer decides to save at the epoch's end, after the step's
    own callbacks; that step is measured there if scheduled (max_overhead=1e-3 would skip it)."""
    from transformers import Trainer, TrainingArguments

    from tests.helpers.trainer import Tokens

    callback = LawWatchCallback(ragged_probe(), every=8, max_overhead=1e-3)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=8,
        save_strategy="epoch",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=tiny_gpt2(0), args=args, train_dataset=Tokens(), callbacks=[callback]).train()
    assert (tmp_path / "checkpoint-8").is_dir()
    assert callback.monitor.schedule_state()["gap"] > 16  # the budget alone: 0 and 16
    assert read_history(tmp_path / "lawwatch").steps == [0, 8, 16]
