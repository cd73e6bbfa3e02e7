"""LawWatch(background=True) on one process: the solve, the fit and the thread-safe sinks on a
worker thread; the same records as the foreground path, in step order, none lost at the end."""

import logging
import threading

import pytest
import torch

from lawwatch.output.sinks import threadsafe
from lawwatch.output.store import LocalHistory, read_history
from lawwatch.watch.monitor import LawWatch
from tests.helpers.models import UNSOLVABLE_SPLIT, VOCAB, tiny_gpt2, unsolvable_probe


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lawwatch-worker")]


class Seen:
    """A tracker-like sink (written on the training thread): which step, and when."""

    def __init__(self, clock: list[int]) -> None:
        self.clock, self.seen, self.threads = clock, [], set()

    def write(self, snapshot):
        self.seen.append((snapshot.step, self.clock[0]))
        self.threads.add(threading.current_thread().name)

    def close(self):
        pass


def train(probe, *, background, steps=13, sinks=(), **options):
    """A real (tiny) training loop: SGD on random tokens, the monitor after each step."""
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    data = torch.randint(1, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))
    clock = [0]
    seen = Seen(clock)
    watch = LawWatch(
        model,
        probe,
        max_overhead=None,
        every=4,
        background=background,
        sinks=[seen, *sinks],
        **options,
    )
    for step in range(steps):
        clock[0] = step
        watch.maybe_snapshot(step)
        model(data, labels=data).loss.backward()
        opt.step()
        opt.zero_grad()
    clock[0] = steps
    watch.close()
    return watch, seen


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_background_equals_foreground(probe, tmp_path):
    fore, fore_seen = train(probe, background=False)
    back, back_seen = train(probe, background=True, sinks=[LocalHistory(tmp_path)])
    assert fore.history.steps == [0, 1, 2, 4, 8, 12]
    assert back.history.steps == fore.history.steps
    # the same records (PRs, fit, identity) bit for bit; only the time differs
    assert without_seconds(back.history.records) == without_seconds(fore.history.records)
    # the local history (written by the worker) holds the same records
    assert without_seconds(read_history(tmp_path).records) == without_seconds(fore.history.records)
    # each record reaches the sinks once, labelled with its own step, steps increasing,
    # never before its step; the foreground writes at the step itself
    assert [s for s, _ in back_seen.seen] == fore.history.steps
    assert all(at >= step for step, at in back_seen.seen)
    assert fore_seen.seen == [(s, s) for s in fore.history.steps]
    assert back_seen.threads == {"MainThread"}  # trackers: on the training thread
    assert not workers()  # joined at close


def test_flushed_by_close_and_state_dict(probe, gpt2):
    watch = LawWatch(gpt2, probe, max_overhead=None, every=1, background=True)
    assert watch.snapshot(0) is None  # the record comes later
    assert watch.last_step == 0
    state = watch.state_dict()  # flushes: the state holds every snapshot attempted
    assert [r["step"] for r in state["history"]] == [0] and state["last_step"] == 0
    assert watch.snapshot(1) is None
    watch.close()
    assert watch.history.steps == [0, 1] and not workers()


def test_resume_after_a_background_run(probe, tmp_path):
    first, _ = train(probe, background=True, steps=9, sinks=[LocalHistory(tmp_path / "a")])
    state = first.state_dict()
    resumed = LawWatch(tiny_gpt2(), probe, max_overhead=None, every=4, background=True)
    resumed.load_state_dict(state, resume_step=4)
    assert resumed.history.steps == [0, 1, 2, 4]
    assert not resumed.should_snapshot(4) and resumed.should_snapshot(8)
    resumed.maybe_snapshot(8)
    resumed.close()
    assert resumed.history.steps == [0, 1, 2, 4, 8] and not workers()


def test_failing_solve_in_the_worker_is_reported(gpt2, caplog):
    # a probe every check accepts when built (its targets vary), and whose held-out part's
    # targets take one value, so every solve fails in the worker
    watch = LawWatch(
        gpt2,
        unsolvable_probe(),
        max_overhead=None,
        every=1,
        background=True,
        split=UNSOLVABLE_SPLIT,
    )
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        for step in range(3):
            assert watch.maybe_snapshot(step) is None
        watch.close()
    assert caplog.text.count("The evaluation part's targets take a single value") == 3
    assert watch.history.steps == [] and watch.last_step == 2 and not workers()


def test_failing_sink_in_the_worker_is_reported(probe, gpt2, tmp_path, caplog):
    class Broken:
        threadsafe = True  # written by the worker

        def write(self, snapshot):
            raise RuntimeError(f"disk full at {snapshot.step}")

        def close(self):
            pass

    local = LocalHistory(tmp_path)
    assert threadsafe(Broken()) and threadsafe(local)
    watch = LawWatch(
        gpt2, probe, max_overhead=None, every=1, background=True, sinks=[Broken(), local]
    )
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        for step in range(3):
            watch.maybe_snapshot(step)
        watch.close()
    assert all(f"disk full at {s}" in caplog.text for s in range(3))
    assert local.history.steps == [0, 1, 2] and watch.history.steps == [0, 1, 2]
    assert not workers()


def test_background_options_are_checked(gpt2, probe):
    with pytest.raises(TypeError, match="background is True or False"):
        LawWatch(gpt2, probe, background="yes")
    with pytest.raises(ValueError, match="background_lag must be at least 1"):
        LawWatch(gpt2, probe, background=True, background_lag=0)


EXIT_WITHOUT_CLOSE = """
import sys
import torch
from lawwatch import ProbeSet
from lawwatch.output.store import LocalHistory
from lawwatch.watch.monitor import LawWatch
from tests.helpers.models import VOCAB, tiny_gpt2

torch.manual_seed(0)
probe = ProbeSet.from_tokens(torch.randint(1, VOCAB, (16, 24)).tolist())
watch = LawWatch(
    tiny_gpt2(), probe, max_overhead=None, every=2, background=True,
    sinks=[LocalHistory(sys.argv[1])],
)
for step in range(5):
    watch.maybe_snapshot(step)
# no close(): the final snapshot's solve is still pending on the worker
"""


@pytest.mark.slow
def test_a_loop_that_forgets_close_keeps_its_final_snapshot(tmp_path):
    """At interpreter exit the pending results are recorded, with a warning naming close()."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", EXIT_WITHOUT_CLOSE, str(tmp_path / "lawwatch")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert read_history(tmp_path / "lawwatch").steps == [0, 1, 2, 4]
    assert "close()" in done.stderr and "not closed" in done.stderr
