"""Honest defaults: the overhead budget, the uncertainty of r, the console line, refusals.

The budget is on by default and says so once; the jackknife's standard error is measured by
default where it is cheap, and emergence needs r past the threshold by more than it; each
snapshot prints one line; settings known wrong when the monitor is built are refused then.
"""

import io
import logging

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from lawwatch import LawWatch, MeasureConfig, ProbeSet, WatchConfig, measure
from lawwatch.alerts import law_alerts
from lawwatch.history import History, Snapshot
from lawwatch.law import EMERGENCE_SE_MULTIPLE, LawFit, emergence_step, passes
from lawwatch.output.console import ConsoleSink
from lawwatch.output.sinks import scalars
from lawwatch.stats.build import AUTO_JACKKNIFE_GROUPS, jackknife_groups
from lawwatch.watch.config import DEFAULT_MAX_OVERHEAD
from tests.helpers.models import ragged_probe, tiny_gpt2


def record(step, r, se=None):
    rec = {"step": step, "pearson_r": r, "pr": [1.0, 0.5, 0.25, 0.125], "rho": 0.5}
    return rec if se is None else {**rec, "pearson_r_se": se}


# -- emergence needs r past the threshold by more than its uncertainty -----------------------


def test_one_snapshot_at_the_threshold_within_its_error_is_not_emergence():
    assert EMERGENCE_SE_MULTIPLE == 1.0
    assert not passes(-0.9503, 0.05, -0.95)  # -0.9503 + 0.05 > -0.95
    assert passes(-0.9503, None, -0.95)  # no standard error: r alone, as before
    assert passes(-0.99, 0.01, -0.95) and not passes(-0.99, float("nan"), -0.95)
    assert emergence_step([10], [-0.9503], threshold=-0.95, se=[0.05]) is None
    history = History([record(0, 0.3, 0.2), record(10, -0.9503, 0.05)])
    assert history.emergence_step(-0.95) is None
    assert [a.kind for a in law_alerts(history.records, threshold=-0.95)] == []
    # past it by more than its standard error: emerged, in the history and the alerts alike
    history.append(record(20, -0.99, 0.01))
    assert history.emergence_step(-0.95) == 20
    (alert,) = law_alerts(history.records, threshold=-0.95)
    assert (alert.kind, alert.step) == ("emerged", 20) and "its standard error" in alert.text
    # a later snapshot at or below the threshold but within its error keeps the emergence; one
    # above the threshold ends the stretch, and only a snapshot beyond its error starts another
    history.append(record(30, -0.955, 0.02))
    assert history.emergence_step(-0.95) == 20
    assert emergence_step([0, 10, 20], [-0.99, -0.94, -0.96], threshold=-0.95, se=[0.01] * 3) == 20
    assert emergence_step([0, 10], [-0.99, -0.96], threshold=-0.95, se=[0.001, 0.02]) == 0
    assert emergence_step([0, 10], [-0.96, -0.97], threshold=-0.95, se=[0.02, 0.03]) is None


# -- the jackknife by default, where it is cheap ----------------------------------------------


def test_the_jackknife_is_on_by_default_where_cheap():
    model = tiny_gpt2(seed=3)
    assert MeasureConfig().jackknife == "auto"
    snap = measure(model, ragged_probe(seed=4, rows=40, max_len=24))
    assert snap.extra["jackknife_groups"] == AUTO_JACKKNIFE_GROUPS
    assert snap.extra["pearson_r_se"] > 0
    # its se reaches every tracker's scalars
    assert scalars(snap)["lawwatch/pearson_r_se"] == snap.extra["pearson_r_se"]
    few = measure(model, ragged_probe(seed=4, rows=12, max_len=24))  # < 16 sequences: off
    assert "pearson_r_se" not in few.extra and "lawwatch/pearson_r_se" not in scalars(few)
    config = MeasureConfig()
    assert jackknife_groups(config, 128, 13, 768) == AUTO_JACKKNIFE_GROUPS  # GPT-2 small
    assert jackknife_groups(config, 128, 23, 2048) is None  # a 1B model: 6 GB more, off
    assert jackknife_groups(MeasureConfig(jackknife=None), 128, 13, 768) is None
    assert jackknife_groups(MeasureConfig(jackknife=3), 4, 99, 99999) == 3


def test_auto_groups_left_without_examples_give_no_error_only_no_standard_error():
    """16 sequences, those in group 1 (i mod 8 = 1) single tokens: no example there."""
    model = tiny_gpt2(seed=3)
    rows = ragged_probe(seed=4, rows=16, max_len=24).input_ids.tolist()
    rows = [[row[0]] if i % AUTO_JACKKNIFE_GROUPS == 1 else row for i, row in enumerate(rows)]
    probe = ProbeSet.from_tokens(rows)
    snap = measure(model, probe)
    assert "pearson_r_se" not in snap.extra and "jackknife_groups" not in snap.extra
    plain = measure(model, probe, jackknife=None)
    torch.testing.assert_close(snap.pr, plain.pr, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"group\(s\) \[1\] hold no example"):
        measure(model, probe, jackknife=AUTO_JACKKNIFE_GROUPS)  # asked for: refused


# -- the overhead budget, on by default, said once --------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Slow:
    """A sink that makes each snapshot take ``seconds`` of the clock."""

    def __init__(self, clock, seconds):
        self.clock, self.seconds = clock, seconds

    def write(self, snapshot):
        self.clock.now += self.seconds

    def close(self):
        pass


def test_the_budget_is_on_by_default_and_warns_once(gpt2, probe, caplog):
    assert WatchConfig().max_overhead == DEFAULT_MAX_OVERHEAD == 0.1
    clock = Clock()
    watch = LawWatch(gpt2, probe, every=1, last_step=300, console=False)
    watch._clock = clock
    watch.sinks.sinks.append(Slow(clock, 1.0))  # 1 s a snapshot, 0.1 s a step: 100 steps
    with caplog.at_level(logging.DEBUG, logger="lawwatch"):
        for step in range(301):
            watch.maybe_snapshot(step)
            clock.now += 0.1
    assert watch.history.steps == [0, 100, 200, 300]  # decided at step 3; the last always
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    text = warned[0].getMessage()
    assert "max_overhead=0.1" in text and "max_overhead=None" in text and "1.00 s" in text
    assert "10.0 training steps" in text and "at least 100 steps apart" in text


def test_the_budget_is_announced_once_by_the_console_not_through_logging(
    gpt2, probe, caplog, capsys
):
    """Printed once, cleanly, on the main process: not a logging record a progress bar
    (or every process's logging) would print."""
    clock = Clock()
    watch = LawWatch(gpt2, probe, every=1, last_step=300)
    watch._clock = clock
    watch.sinks.sinks.append(Slow(clock, 1.0))
    with caplog.at_level(logging.DEBUG, logger="lawwatch"):
        for step in range(301):
            watch.maybe_snapshot(step)
            clock.now += 0.1
    printed = [line for line in capsys.readouterr().out.splitlines() if "max_overhead" in line]
    assert len(printed) == 1 and "at least 100 steps apart" in printed[0]
    assert not [r for r in caplog.records if "max_overhead" in r.getMessage()]


# -- the console line --------------------------------------------------------------------------


def snapshot(se=None, rho=0.7123, **extra):
    fit = LawFit(rho=rho, pearson_r=-0.98212, slope=-0.1, intercept=0.0, r2=0.96)
    extra = extra if se is None else {"pearson_r_se": se, **extra}
    return Snapshot(torch.ones(4), fit, n_tokens=100, seconds=1.43, step=200, extra=extra)


def test_console_line_per_snapshot():
    out = io.StringIO()
    sink = ConsoleSink(out)
    sink.write(snapshot(0.0061))
    sink.write(snapshot())
    sink.write(snapshot())
    auto = (
        " (no ± standard error: jackknife='auto' needs at least 16 probe sequences (and its "
        "statistics within 1 GiB); pass jackknife=<groups> for one)"
    )
    assert out.getvalue().splitlines() == [
        "lawwatch step 200: r = -0.982 ± 0.006, rho = 0.712, 1.4 s",
        "lawwatch step 200: r = -0.982, rho = 0.712, 1.4 s" + auto,  # why, said once
        "lawwatch step 200: r = -0.982, rho = 0.712, 1.4 s",
    ]
    off = ConsoleSink(io.StringIO())
    off.write(snapshot(config={"jackknife": None}))
    assert off.stream.getvalue().endswith("(no ± standard error: measured with jackknife=None)\n")


def test_a_measured_run_of_few_sequences_says_why_its_line_has_no_error(gpt2, capsys):
    """ragged_probe's 12 sequences are under jackknife='auto''s 16: no standard error."""
    LawWatch(gpt2, ragged_probe(rows=12)).snapshot(0)
    assert "(no ± standard error: jackknife='auto' needs at least 16" in capsys.readouterr().out
    LawWatch(gpt2, ragged_probe(rows=16)).snapshot(0)
    line = capsys.readouterr().out
    assert " ± " in line and "no ± standard error" not in line


@pytest.mark.parametrize(
    ("rho", "shown"),
    [(0.7123, "0.712"), (0.98, "0.98"), (0.99731, "1 - 0.00269"), (0.99052, "1 - 0.00948"),
     (1.00013, "1 + 0.00013"), (1.0, "1")],
)  # fmt: skip
def test_console_shows_what_distinguishes_rho_near_one(rho, shown):
    """Three significant digits printed every rho of 0.995-1.005 as `rho = 1`."""
    out = io.StringIO()
    ConsoleSink(out).write(snapshot(0.0061, rho=rho))
    assert f", rho = {shown}, 1.4 s" in out.getvalue()


def test_a_closed_stdout_is_said_once_and_training_goes_on(gpt2, probe, caplog, monkeypatch):
    """Not a traceback per snapshot: one warning, then nothing is printed; records still kept."""
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr("sys.stdout", closed)
    watch = LawWatch(gpt2, probe, every=1, max_overhead=None)
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        for step in range(3):
            watch.maybe_snapshot(step)
    assert watch.history.steps == [0, 1, 2]
    said = [r for r in caplog.records if "console line cannot be printed" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is None
    assert "ValueError: I/O operation on closed file" in said[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]


def test_console_line_goes_around_an_open_progress_bar():
    from tqdm import tqdm

    out = io.StringIO()
    with tqdm(total=10, file=out, mininterval=0, ascii=True) as bar:
        bar.update(3)
        ConsoleSink(out).write(snapshot(0.0061))
        bar.update(1)
    lines = out.getvalue().replace("\r", "\n").splitlines()
    # the line stands alone: tqdm.write cleared the bar before it and redrew it after
    assert "lawwatch step 200: r = -0.982 ± 0.006, rho = 0.712, 1.4 s" in lines


def test_every_entry_point_prints_the_line_unless_switched_off(gpt2, probe, capsys):
    LawWatch(gpt2, probe).snapshot(0)
    assert capsys.readouterr().out.startswith("lawwatch step 0: r = ")
    LawWatch(gpt2, probe, console=False).snapshot(0)
    assert "lawwatch step" not in capsys.readouterr().out
    with pytest.raises(TypeError, match="console is True or False"):
        WatchConfig(console="yes")


# -- settings known wrong when built: refused then ---------------------------------------------

BAD = {
    "layers out of range": ({"layers": [0, 1, 99]}, "layers holds 99"),
    "blocks matching nothing": ({"blocks": "nothing.*"}, "matches no module"),
    "too few entries": ({"layers": [0, 1, 2]}, "at least 3 layers"),
    "probe too small": ({"probe": [[1, 2, 3, 4, 5]]}, "Too few probe examples"),
    "one-hot budget": ({"target": "onehot", "max_onehot_bytes": 1000}, "max_onehot_bytes"),
    "jackknife groups": ({"jackknife": 99}, "jackknife=99 groups"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_every_entry_point_refuses_a_wrong_setting_when_built(gpt2, probe, name, tmp_path, caplog):
    from accelerate import Accelerator

    from lawwatch.integrations.accelerate import AcceleratorWatch
    from lawwatch.integrations.hf import LawWatchCallback

    settings, match = BAD[name]
    settings = dict(settings)
    if "probe" in settings:
        probe = ProbeSet.from_tokens(settings.pop("probe"))
    with pytest.raises(ValueError, match=match):
        LawWatch(gpt2, probe, **settings)
    with pytest.raises(ValueError, match=match):
        AcceleratorWatch(Accelerator(cpu=True), gpt2, probe, **settings)
    # the callback meets the model at train begin: refused there, once; nothing is measured
    callback = LawWatchCallback(probe, every=1, **settings)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = TrainerState(max_steps=3, global_step=0, is_world_process_zero=True)
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        callback.on_train_begin(args, state, TrainerControl(), model=gpt2)
        for step in (1, 2, 3):
            state.global_step = step
            callback.on_step_end(args, state, TrainerControl(), model=gpt2)
    assert callback.monitor is None
    # one line, and the reason is in it (not only in a traceback below it)
    (said,) = [r for r in caplog.records if match.split("=")[0] in r.getMessage()]
    assert said.getMessage().startswith("lawwatch: this training is not measured: ")
    assert caplog.text.count("this training is not measured") == 1


def test_few_entries_are_measured_with_a_warning_once(gpt2, probe, caplog):
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        watch = LawWatch(gpt2, probe, layers=[0, 1, 2, 3], console=False)
        for step in range(3):
            watch.snapshot(step)
    warned = [r for r in caplog.records if "fitted to 3 entries" in r.getMessage()]
    assert len(warned) == 1 and len(watch.history) == 3
