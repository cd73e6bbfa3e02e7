import itertools
import json
import logging
import random

import numpy as np
import pytest
import torch

from lawwatch import ProbeSet
from lawwatch.history import History
from lawwatch.output.sinks import Sinks
from lawwatch.output.store import LocalHistory, read_history
from lawwatch.watch.monitor import LawWatch
from lawwatch.watch.schedule import Schedule
from tests.helpers.models import RECORD_KEYS, ragged_probe


def test_default_schedule():
    assert Schedule(every=50).steps(210) == [0, 1, 2, 4, 8, 16, 32, 50, 100, 150, 200]
    assert Schedule(every=50, last=123).steps(130) == [0, 1, 2, 4, 8, 16, 32, 50, 100, 123]
    assert Schedule(every=1).steps(3) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="positive"):
        Schedule(every=0)


def test_custom_schedules(gpt2, probe):
    assert LawWatch(gpt2, probe, max_overhead=None, schedule=[3, 7]).should_snapshot(7)
    assert not LawWatch(gpt2, probe, max_overhead=None, schedule=[3, 7]).should_snapshot(4)
    assert LawWatch(gpt2, probe, max_overhead=None, schedule=lambda s: s % 5 == 0).should_snapshot(
        10
    )


def test_snapshot_is_invisible_to_training(gpt2, probe):
    gpt2.train()
    watch = LawWatch(gpt2, probe, max_overhead=None, every=2)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    snap = watch.maybe_snapshot(0)
    assert snap is not None and snap.step == 0
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert gpt2.training and all(m.training for m in gpt2.modules())
    assert all(p.grad is None for p in gpt2.parameters())
    assert watch.maybe_snapshot(0) is None  # already measured
    assert watch.maybe_snapshot(3) is None  # off schedule
    assert watch.maybe_snapshot(4).step == 4


def test_history_sink_and_resume(tmp_path, gpt2, probe):
    history = LocalHistory(tmp_path / "lw")
    watch = LawWatch(gpt2, probe, max_overhead=None, every=4, sinks=[history])
    for step in range(9):
        watch.maybe_snapshot(step)
    records = read_history(tmp_path / "lw").records
    assert [r["step"] for r in records] == [0, 1, 2, 4, 8]
    assert set(records[0]) >= RECORD_KEYS
    assert len(records[0]["pr"]) == 5 and records[0]["n_tokens"] == probe.num_examples()
    from safetensors.torch import load_file

    matrix = load_file(tmp_path / "lw" / "pr.safetensors")
    assert matrix["pr"].shape == (5, 5) and matrix["steps"].tolist() == [0, 1, 2, 4, 8]
    # resume from a checkpoint at step 4: later records are dropped, then redone in order
    state = watch.state_dict()
    watch.close()  # the first run ends; the resumed one opens the directory again
    again = LocalHistory(tmp_path / "lw")
    again.drop_after(4)
    resumed = LawWatch(gpt2, probe, max_overhead=None, every=4, sinks=[again])
    resumed.load_state_dict(state, resume_step=4)
    assert not resumed.should_snapshot(4) and resumed.should_snapshot(8)
    resumed.maybe_snapshot(8)
    steps = [json.loads(line)["step"] for line in (tmp_path / "lw" / "history.jsonl").open()]
    assert steps == [0, 1, 2, 4, 8]
    with pytest.raises(ValueError, match="not after"):
        again.write(resumed.snapshot(8))


def test_failure_is_reported_and_training_goes_on(gpt2, caplog):
    tiny = ProbeSet.from_tokens([[1, 2, 3, 4]])  # far fewer examples than the hidden size
    # refused when built (test_watch_config); a probe that shrinks afterwards fails at its
    # snapshot instead
    watch = LawWatch(gpt2, ragged_probe(), max_overhead=None, every=1)
    watch.probe = tiny
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        assert watch.snapshot(0) is None
    assert "Too few probe examples" in caplog.text


def test_nonfinite_model_is_skipped(gpt2, probe, caplog):
    with torch.no_grad():
        gpt2.transformer.h[1].mlp.c_fc.weight.fill_(float("nan"))
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        assert LawWatch(gpt2, probe).snapshot(0) is None
    assert "NaN or Inf" in caplog.text


def test_failing_sink_does_not_stop_others(tmp_path, gpt2, probe, caplog):
    class Broken:
        def write(self, snapshot):
            raise RuntimeError("disk full")

        def close(self):
            raise RuntimeError("still full")

    history = LocalHistory(tmp_path)
    watch = LawWatch(gpt2, probe, sinks=Sinks([Broken(), history]))
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        assert watch.snapshot(0) is not None
        watch.close()
    assert "disk full" in caplog.text and "still full" in caplog.text
    assert history.last_step == 0


def test_emergence_from_history(gpt2, probe):
    watch = LawWatch(gpt2, probe)
    watch.history = History(
        {"step": s, "rho": 0.9, "pearson_r": r} for s, r in [(0, 0.5), (10, -0.97), (20, -0.99)]
    )
    assert watch.emergence_step == 10


class FakeClock:
    """Training and snapshot time as the test says: deterministic, whatever the machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Slow:
    """A sink that makes each snapshot take ``seconds`` on the fake clock."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def write(self, snapshot) -> None:
        self.clock.now += self.seconds

    def close(self) -> None:
        pass


def test_max_overhead_stretches_the_schedule(gpt2, probe, caplog):
    clock = FakeClock()
    # a snapshot takes 1 s, a step 0.1 s: 2% allows one snapshot per 1 / (0.02 * 0.1) = 500 steps
    watch = LawWatch(
        gpt2,
        probe,
        every=1,
        last_step=1200,
        max_overhead=0.02,
        sinks=[Slow(clock, 1.0)],
        console=False,
    )
    watch._clock = clock
    with caplog.at_level(logging.DEBUG, logger="lawwatch"):
        for step in range(1201):
            watch.maybe_snapshot(step)
            clock.now += 0.1  # one training step
    # step 0, then steps 1-3 timed (not measured), the gap decided at step 3: every 500 steps
    # from step 0, and the final step
    assert watch.history.steps == [0, 500, 1000, 1200]
    told = [r.getMessage() for r in caplog.records if "max_overhead" in r.getMessage()]
    assert len(told) == 1  # decided and said once
    assert "at least 500 steps apart, counted from step 0" in told[0]
    assert "measured from step 3" in told[0]
    assert watch.schedule_state() == {
        "origin": 0,
        "snapshot_seconds": pytest.approx(1.0),
        "decided_at": 3,
        "gap": 500,
        "step_seconds": pytest.approx(0.1),
    }
    # the budget, held: each budgeted snapshot is followed by >= 1 s / 2% of training
    steps = watch.history.steps[:-1]
    assert all((b - a) * 0.1 * 0.02 >= 1.0 - 1e-9 for a, b in itertools.pairwise(steps))


def _run(gpt2, probe, clock, steps, *, snapshot_s, step_s, state=None, resume=None, save=()):
    """A raw loop of ``steps`` on the fake clock; returns the monitor (not closed)."""
    watch = LawWatch(
        gpt2, probe, every=4, max_overhead=0.1, sinks=[Slow(clock, snapshot_s)], console=False
    )
    watch._clock = clock
    if state is not None:
        watch.load_state_dict(state, resume_step=resume)
    for step in steps:
        watch.maybe_snapshot(step, checkpoint=step in save)
        clock.now += step_s
    return watch


def test_the_budget_is_decided_once_and_a_resume_measures_the_same_steps(gpt2, probe):
    """The decision is kept in the state: a resumed run, whatever its own timings, measures
    the steps the first pass measured (a raced budget measured steps the first pass skipped)."""
    clock = FakeClock()
    # 1 s a snapshot, 0.5 s a step: a gap of 20 steps; every=4: 0, then 20, 40, 60 ...
    first = _run(gpt2, probe, clock, range(0, 101), snapshot_s=1.0, step_s=0.5)
    assert first.history.steps == [0, 20, 40, 60, 80, 100]
    kept = _run(gpt2, probe, FakeClock(), range(0, 51), snapshot_s=1.0, step_s=0.5)
    state = kept.state_dict()
    assert state["schedule"]["gap"] == 20
    # resumed from step 50 on a machine 10x faster per step (a raced budget would measure
    # every 200 steps there, and its snapshots would not line up with the first pass's)
    resumed = _run(
        gpt2,
        probe,
        FakeClock(),
        range(51, 101),
        snapshot_s=1.0,
        step_s=0.05,
        state=state,
        resume=50,
    )
    assert resumed.history.steps == first.history.steps
    assert resumed.schedule_state() == state["schedule"]


def test_checkpointed_scheduled_steps_are_measured_whatever_the_budget(gpt2, probe):
    clock = FakeClock()
    # a gap of 20 steps; a checkpoint every 12 steps: 12, 36, 48, 72, 84 are on every=4's
    # schedule but not on the budget's, and are measured; 24 and 60 are measured anyway
    watch = _run(
        gpt2, probe, clock, range(0, 90), snapshot_s=1.0, step_s=0.5, save=set(range(12, 90, 12))
    )
    assert watch.history.steps == [0, 12, 20, 24, 36, 40, 48, 60, 72, 80, 84]
    # the chain is not moved by the checkpoints: 20, 40, 60, 80 from step 0


def test_a_raw_loop_without_last_step_ends_its_history_at_its_last_step(gpt2, probe):
    """Not only the start: close() measures the last step the loop called with."""
    clock = FakeClock()
    # a snapshot costs 6.5 training steps: the budget thins 30 steps to the first one alone
    watch = _run(gpt2, probe, clock, range(1, 31), snapshot_s=0.65, step_s=0.1)
    assert watch.history.steps == [1]
    watch.close()
    assert watch.history.steps == [1, 30]


def test_without_a_budget_the_schedule_is_kept(gpt2, probe):
    watch = LawWatch(gpt2, probe, max_overhead=None, every=1)
    for step in range(4):
        watch.maybe_snapshot(step)
    assert watch.history.steps == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"max_overhead is a fraction of training time"):
        LawWatch(gpt2, probe, max_overhead=2.0)
