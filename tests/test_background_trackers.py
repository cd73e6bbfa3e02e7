"""Background snapshots through the integrations: a real Trainer and a real accelerate loop,
read back from the local history, TensorBoard and an offline W&B run (``wandb leet inspect``).

A background record of step ``s`` reaches the trackers at a later training step: each must
still show it at ``s``."""

import logging
import threading

import pytest
import torch
from transformers import Trainer, TrainingArguments

from lawwatch.integrations.hf import LawWatchCallback
from lawwatch.output.store import read_history
from tests.helpers.models import UNSOLVABLE_SPLIT, ragged_probe, tiny_gpt2, unsolvable_probe
from tests.helpers.trackers import STEPS, accelerate_loop, expected_scalars, read_events
from tests.helpers.trainer import Tokens
from tests.helpers.wandb_offline import finish_run, history_rows, inspect_run


def workers():
    return [t for t in threading.enumerate() if t.name.startswith("lawwatch-worker")]


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def trainer_run(out, callback, report_to=(), max_steps=4):
    arguments = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=list(report_to),
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(
        model=tiny_gpt2(0), args=arguments, train_dataset=Tokens(), callbacks=[callback]
    ).train()
    return read_history(out / "lawwatch").records


def test_trainer_background_equals_foreground_in_every_tracker(tmp_path, offline_wandb):
    fore = trainer_run(
        tmp_path / "fore", LawWatchCallback(ragged_probe(), max_overhead=None, every=2)
    )
    callback = LawWatchCallback(ragged_probe(), max_overhead=None, every=2, background=True)
    back = trainer_run(tmp_path / "back", callback, report_to=["wandb", "tensorboard"])
    assert callback.monitor.watch.background and not workers()  # joined at train end
    # flushed at train end: the history is complete, the records those of the foreground
    assert [r["step"] for r in back] == STEPS
    assert without_seconds(back) == without_seconds(fore)
    assert callback.monitor.history.steps == STEPS
    expected = expected_scalars(back)
    # W&B: each lawwatch row at its own train/global_step (logged one step late or more)
    rows = [r for r in history_rows(inspect_run(finish_run())) if "lawwatch/rho" in r]
    assert [r["train/global_step"] for r in rows] == STEPS
    for row in rows:
        for key, value in expected[row["train/global_step"]].items():
            assert row[key] == pytest.approx(value, rel=1e-12)
    # TensorBoard: explicit steps
    (events_dir,) = {p.parent for p in (tmp_path / "back").rglob("events.out.tfevents.*")}
    events = read_events(events_dir)
    assert [p.step for p in events.Scalars("lawwatch/rho")] == STEPS


def test_trainer_failing_solve_in_the_worker_training_completes(tmp_path, caplog):
    # a probe every check accepts (its targets vary), and whose held-out part's targets take
    # one value, so every solve fails in the worker
    callback = LawWatchCallback(
        unsolvable_probe(),
        max_overhead=None,
        every=2,
        background=True,
        split=UNSOLVABLE_SPLIT,
    )
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        arguments = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=4,
            per_device_train_batch_size=8,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=tiny_gpt2(0), args=arguments, train_dataset=Tokens(), callbacks=[callback]
        )
        trainer.train()
    assert trainer.state.global_step == 4
    assert caplog.text.count("The evaluation part's targets take a single value") == len(STEPS)
    assert callback.monitor.history.steps == [] and not workers()


def test_trainer_max_overhead_stretches_the_schedule(tmp_path, capsys):
    plain = LawWatchCallback(ragged_probe(), max_overhead=None, every=1)
    trainer_run(tmp_path / "plain", plain, max_steps=8)
    assert plain.monitor.history.steps == list(range(9))
    # a budget of 0.1% of training time: steps 1-3 are timed, then the gap is decided (a
    # snapshot costs far more than 0.1% of 8 steps); the final step is measured
    budget = LawWatchCallback(ragged_probe(), every=1, max_overhead=1e-3)
    trainer_run(tmp_path / "budget", budget, max_steps=8)
    assert budget.monitor.watch.max_overhead == 1e-3
    assert budget.monitor.history.steps == [0, 8]
    decided = budget.monitor.schedule_state()
    assert decided["origin"] == 0 and decided["decided_at"] == 3 and decided["gap"] > 8
    said = [line for line in capsys.readouterr().out.splitlines() if "max_overhead=0.001" in line]
    assert len(said) == 1 and f"at least {decided['gap']} steps apart" in said[0]
    with pytest.raises(ValueError, match="max_overhead is a fraction"):
        LawWatchCallback(ragged_probe(), max_overhead=1.5)


def test_accelerate_background_lands_at_its_step_in_wandb(tmp_path, offline_wandb):
    from accelerate import Accelerator

    from lawwatch.integrations.accelerate import AcceleratorWatch

    accelerator = Accelerator(
        cpu=True, log_with=["tensorboard", "wandb"], project_dir=str(tmp_path / "acc")
    )
    accelerator.init_trackers("lawwatch-accelerate")
    model = tiny_gpt2(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    watch = AcceleratorWatch(
        accelerator,
        model,
        ragged_probe(),
        max_overhead=None,
        every=2,
        last_step=4,
        directory=tmp_path / "lawwatch",
        background=True,
    )
    assert watch.watch.background
    # the loop logs first: every background record reaches W&B after its step
    accelerate_loop(accelerator, model, optimizer, watch)
    watch.close()  # before end_training: the last records reach the open trackers
    assert not workers()
    run_dir = accelerator.get_tracker("wandb", unwrap=True).settings.sync_dir
    accelerator.end_training()
    records = read_history(tmp_path / "lawwatch").records
    assert [r["step"] for r in records] == STEPS
    expected = expected_scalars(records)
    rows = history_rows(inspect_run(run_dir))
    ours = [r for r in rows if "lawwatch/rho" in r]
    assert [r["lawwatch/step"] for r in ours] == STEPS  # the x-axis of the lawwatch charts
    for row in ours:
        for key, value in expected[row["lawwatch/step"]].items():
            assert row[key] == pytest.approx(value, rel=1e-12)
    # the loop's own rows are all there, at their steps
    assert [r["_step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    events = read_events(tmp_path / "acc" / "lawwatch-accelerate")
    assert [p.step for p in events.Scalars("lawwatch/rho")] == STEPS
