"""The one door of a run's outputs (``lawwatch.output.run``): a tracker class registered by name
opens itself, one sink per class, a resume restores every output once, the replacing warning is
said once, and outputs are described once (``outputs=`` or the shorthands, not both)."""

from __future__ import annotations

import logging
from typing import ClassVar

import pytest

from lawwatch.alerts import Alerts
from lawwatch.output.run import Outputs
from lawwatch.output.trackers import TRACKERS, Tracker, accelerate_tracker
from lawwatch.watch.monitor import LawWatch
from tests.helpers.models import ragged_probe
from tests.helpers.trainer import make_trainer


@pytest.fixture
def held():
    """A tracker class of the test's own, registered under two names while the test runs."""

    class Held(Tracker):
        names = ("door-test", "door-alias")
        runs: ClassVar[list] = []

        def __init__(self, target=None):
            super().__init__()
            self.target, self.logged = target, []
            self.replay(None)

        @classmethod
        def current(cls, run):
            cls.runs.append(run)
            return cls()

        def _log(self, snapshot, record):
            self.logged.append(record["step"])

    try:
        yield Held
    finally:
        for name in Held.names:
            TRACKERS.pop(name)


class Collect:
    """A sink that takes alerts."""

    def __init__(self):
        self.alerts = []

    def write(self, snapshot):
        pass

    def alert(self, alert):
        self.alerts.append(alert.kind)

    def close(self):
        pass


def test_a_tracker_registered_by_name_opens_itself(tmp_path, gpt2, probe, held):
    assert TRACKERS["door-test"] is held and TRACKERS["door-alias"] is held
    watch = LawWatch(
        gpt2,
        probe,
        every=2,
        max_overhead=None,
        directory=tmp_path,
        trackers=["door-test", "door-alias"],  # one class: one sink
        emergence_threshold=-0.5,
    )
    (sink,) = watch.trackers.values()
    assert list(watch.trackers) == ["door-test"] and isinstance(sink, held)
    (run,) = held.runs
    assert run.logging_dir == tmp_path / "tensorboard" and run.emergence_threshold == -0.5
    for step in range(1, 5):
        watch.maybe_snapshot(step)
    watch.close()
    assert sink.logged == [1, 2, 4]
    # a resumed run's fresh tracker gets the history up to the resume step, each step once
    resumed = LawWatch(gpt2, probe, every=2, max_overhead=None, trackers=["door-alias"])
    resumed.load_state_dict(watch.state_dict(), resume_step=2)
    (fresh,) = resumed.trackers.values()
    assert fresh is not sink and fresh.logged == [1, 2]
    resumed.maybe_snapshot(4)
    assert fresh.logged == [1, 2, 4]
    resumed.close()
    # an accelerate tracker's object: the same class, registered once
    assert accelerate_tracker("door-test", "the object").target == "the object"
    assert accelerate_tracker("no-such-tracker", "the object") is None


def test_the_records_to_resume_from_are_the_directory_s(tmp_path, gpt2, probe):
    watch = LawWatch(gpt2, probe, every=2, max_overhead=None, directory=tmp_path)
    for step in range(1, 5):
        watch.maybe_snapshot(step)
    watch.close()
    resumed = LawWatch(gpt2, probe, every=2, outputs=Outputs(tmp_path, resume_step=2))
    assert resumed.history.steps == [1, 2] and resumed.last_step == 2
    assert resumed.local.history.steps == [1, 2]  # what followed is redone
    resumed.maybe_snapshot(3)  # off the schedule: not measured
    resumed.maybe_snapshot(4)
    resumed.close()
    assert resumed.local.history.steps == [1, 2, 4]


def test_a_resumed_monitor_does_not_raise_old_alerts(gpt2, probe):
    def run(state=None):
        collect = Collect()
        alerts = Alerts(threshold=1.0, stalled=False)  # every r counts: emerged at once
        watch = LawWatch(gpt2, probe, every=1, max_overhead=None, sinks=[collect], alerts=alerts)
        if state is not None:
            watch.load_state_dict(state, resume_step=2)
        for step in range(3 if state else 0, 5 if state else 3):
            watch.maybe_snapshot(step)
        watch.close()
        return watch, collect.alerts

    first, raised = run()
    assert raised == ["emerged"]
    assert run()[1] == ["emerged"]  # a fresh monitor raises it again
    assert run(first.state_dict())[1] == []  # a resumed one does not


def test_outputs_are_described_once(gpt2, probe, tmp_path):
    with pytest.raises(TypeError, match="not both"):
        LawWatch(gpt2, probe, directory=tmp_path, outputs=Outputs(tmp_path))
    with pytest.raises(TypeError, match="not a sink"):
        Outputs(sinks=[object()])


def test_the_replacing_warning_is_said_once_from_step_0(tmp_path, caplog):
    from lawwatch.integrations.hf import LawWatchCallback

    def train():
        callback = LawWatchCallback(ragged_probe(), max_overhead=None, every=2, console=False)
        make_trainer(tmp_path / "out", [callback], max_steps=2).train()

    train()
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        train()
    said = [r for r in caplog.records if "replacing the" in r.getMessage()]
    assert len(said) == 1 and "replacing the 3 records" in said[0].getMessage()
