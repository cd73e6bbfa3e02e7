"""Alerts: detection on constructed histories, once-only firing, W&B and trackio alerts."""

import logging
import math
import uuid

import numpy as np
import pytest

from lawwatch.alerts import (
    Alerts,
    AlertSink,
    detect,
    law_alerts,
    layer_excess,
    stall_alerts,
)
from lawwatch.history import History
from tests.helpers.snapshots import line, snap
from tests.helpers.wandb_offline import inspect_run


def rs(*pairs):
    """Records holding only what law_alerts reads: step and r."""
    return [{"step": s, "pearson_r": r} for s, r in pairs]


# -- emerged / broke ----------------------------------------------------------------------------


def test_emergence_break_and_reemergence():
    history = rs(
        (0, 0.7),
        (10, 0.1),
        (20, -0.951),  # emerged
        (30, -0.97),
        (40, -0.94),  # above the threshold, within the margin: no break
        (50, -0.96),  # passes again: the emergence step is now 50, and the alert says so
        (60, -0.90),  # above the margin once: not yet a break
        (70, -0.96),  # back: the stretch is reset; emerged anew at 70
        (80, -0.92),
        (90, float("nan")),  # non-finite counts as above: the law broke (from step 80)
        (100, -0.99),  # re-emerged
    )
    alerts = law_alerts(history, threshold=-0.95, break_margin=0.02, persistence=2)
    assert [(a.kind, a.step, a.at) for a in alerts] == [
        ("emerged", 20, 20),
        ("emerged", 50, 50),
        ("emerged", 70, 70),
        ("broke", 80, 90),
        ("emerged", 100, 100),
    ]
    assert alerts[0].level == "INFO" and alerts[3].level == "WARN"
    assert "emerged" in alerts[0].title and "re-emerged" in alerts[4].title
    assert "r had risen to -0.9400 at step 40" in alerts[1].text
    assert "-0.9200 (step 80)" in alerts[3].text and "nan (step 90)" in alerts[3].text


@pytest.mark.parametrize("with_se", [False, True])
def test_the_latest_emerged_alert_names_the_emergence_step(with_se):
    """At every point of a history, the latest "emerged" alert's step is the step
    History.emergence_step reports (an alert once said "emerged at 0" where it was 2)."""
    rng = np.random.default_rng(3)
    r = np.clip(-0.95 + rng.normal(0.0, 0.02, 60), -1.0, 1.0)
    records = [
        {"step": i, "pearson_r": float(v), **({"pearson_r_se": 0.004} if with_se else {})}
        for i, v in enumerate(r)
    ]
    records[:3] = [  # the start of the run: passes at 0, rises at 1, passes at 2
        {**records[0], "pearson_r": -0.99},
        {**records[1], "pearson_r": -0.945},
        {**records[2], "pearson_r": -0.99},
    ]
    checked = 0
    for n in range(1, len(records) + 1):
        prefix = records[:n]
        step = History(prefix).emergence_step(-0.95)
        emerged = [a for a in law_alerts(prefix, threshold=-0.95) if a.kind == "emerged"]
        latest = [a for a in law_alerts(prefix, threshold=-0.95) if a.kind in ("emerged", "broke")]
        if step is not None:
            assert latest[-1].kind == "emerged" and emerged[-1].step == step, (n, step)
            checked += 1
    assert checked > 10
    assert law_alerts(records[:3], threshold=-0.95)[-1].step == 2


def test_each_alert_is_judged_on_the_past_only():
    history = rs((0, 0.5), (5, -0.96), (6, -0.80), (7, -0.81), (8, -0.97), (9, -0.5))
    full = law_alerts(history)
    for n in range(len(history) + 1):
        prefix = law_alerts(history[:n])
        assert prefix == [a for a in full if a.at <= history[n - 1]["step"]] if n else not prefix


def test_break_needs_persistence_and_margin():
    # threshold -0.95, margin 0.02: r above -0.93 counts towards a break
    history = rs((0, -0.96), (1, -0.929), (2, -0.931), (3, -0.929), (4, -0.929), (5, -0.5))
    found = [(a.kind, a.step, a.at) for a in law_alerts(history, persistence=2)]
    assert found == [("emerged", 0, 0), ("broke", 3, 4)]
    found = [(a.kind, a.step, a.at) for a in law_alerts(history, persistence=3)]
    assert found == [("emerged", 0, 0), ("broke", 3, 5)]
    found = [(a.kind, a.step, a.at) for a in law_alerts(history, persistence=1)]
    assert found == [("emerged", 0, 0), ("broke", 1, 1)]
    found = [(a.kind, a.step, a.at) for a in law_alerts(history, break_margin=0.0)]
    assert found == [("emerged", 0, 0), ("broke", 1, 2)]
    assert law_alerts(history, persistence=6) == law_alerts(history)[:1]
    assert law_alerts([]) == [] and law_alerts(rs((0, 0.2), (1, -0.9))) == []


# -- stalled layers -----------------------------------------------------------------------------


def reference_excess(log_pr, layers):
    """Per entry: (log10 PR - line through the others) / |slope|, with numpy in float64."""
    out = {}
    points = [(e, v) for e, v in zip(layers, log_pr, strict=True) if e != 0]
    for i, (entry, value) in enumerate(points):
        others = points[:i] + points[i + 1 :]
        slope, intercept = np.polyfit([e - 1.0 for e, _ in others], [v for _, v in others], 1)
        out[entry] = (value - (intercept + slope * (entry - 1))) / abs(slope)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_layer_excess_matches_a_numpy_reference(seed):
    gen = np.random.default_rng(seed)
    entries = int(gen.integers(5, 30))
    log_pr = list(gen.normal(-0.3, 0.2, entries))
    record = snap(0, log_pr).to_record()
    got = layer_excess(record)
    want = reference_excess(log_pr, range(entries))
    assert sorted(got) == list(range(1, entries))
    assert [got[e] for e in sorted(got)] == pytest.approx([want[e] for e in sorted(want)], rel=1e-9)


def test_layer_excess_of_a_stalled_layer_is_one_layer():
    # on an exact line, a layer whose PR equals the line's previous layer lags by exactly 1
    for stall in (1, 4, 8):
        excess = layer_excess(snap(0, line(stall=stall)).to_record())
        assert excess[stall] == pytest.approx(1.0, abs=1e-9)
        # the others are judged against a line the stalled layer tilts: none lags by half
        assert all(v < 0.5 for e, v in excess.items() if e != stall)
    # a layer subset keeps its true indices (layers=3: entries 0, 3, 6, 9, 12)
    layers = (0, 3, 6, 9, 12)
    full = line(entries=13, stall=6, lag=3.0)  # 3 layers' worth: one step of the subset
    excess = layer_excess(snap(0, [full[e] for e in layers], layers=layers).to_record())
    assert sorted(excess) == [3, 6, 9, 12] and excess[6] == pytest.approx(3.0, abs=1e-9)
    # too few points, or a flat line: nothing to judge
    assert layer_excess(snap(0, line(entries=4)).to_record()) == {}
    assert layer_excess(snap(0, [0.0] * 6).to_record()) == {}


def test_stalled_alerts():
    history = History()
    plan = [  # (step, stalled entry, lag)
        (0, None, 0.0),
        (10, 5, 0.8),  # lags once: not yet (persistence 2)
        (20, 5, 0.9),  # twice: alert, from step 10
        (30, 5, 1.2),  # still lagging: already alerted
        (40, None, 0.0),  # recovered
        (50, 5, 0.7),
        (60, 5, 0.7),  # a new stall: alerts again
        (70, 2, 0.3),  # within tolerance
        (80, 2, 0.3),
    ]
    for step, stall, lag in plan:
        history.append(snap(step, line(stall=stall, lag=lag, noise=0.002, seed=step)))
    assert all(r["pearson_r"] < -0.98 for r in history)  # the law holds throughout
    alerts = stall_alerts(history, tolerance=0.5, persistence=2)
    assert [(a.kind, a.layer, a.step, a.at) for a in alerts] == [
        ("stalled", 5, 10, 20),
        ("stalled", 5, 50, 60),
    ]
    assert "layer 5" in alerts[0].title and "0.87 layers' worth" in alerts[0].text
    assert stall_alerts(history, tolerance=0.25)[-1].layer == 2
    # a noisy but straight law: nothing lags by half a layer
    noisy = History(snap(s, line(noise=0.004, seed=s)) for s in range(0, 100, 10))
    assert stall_alerts(noisy) == []


def test_no_stall_while_the_law_does_not_hold():
    # layer 5 lags at every snapshot, but PR does not fall linearly (r > -0.95) at the first two
    history = History()
    shapes = [line(stall=5, lag=2.0, noise=0.05, seed=1), line(stall=5, lag=2.0, noise=0.05)]
    shapes += [line(stall=5, lag=2.0)] * 2
    for step, shape in enumerate(shapes):
        history.append(snap(step, shape))
    assert [r["pearson_r"] > -0.95 for r in history] == [True, True, False, False]
    assert [(a.step, a.at) for a in stall_alerts(history)] == [(2, 3)]


def test_detect_orders_and_filters():
    history = History()
    for step, stall in [(0, None), (1, 5), (2, 5)]:
        history.append(snap(step, line(stall=stall, noise=0.01, seed=step)))
    assert all(-0.999 < r["pearson_r"] < -0.95 for r in history)
    kinds = [(a.kind, a.at) for a in detect(history)]
    assert kinds == [("emerged", 0), ("stalled", 2)]
    assert [a.kind for a in detect(history, Alerts(stalled=False))] == ["emerged"]
    assert [a.kind for a in detect(history, Alerts(emerged=False))] == ["stalled"]
    # the threshold: the config's, else the caller's
    assert detect(history, Alerts(stalled=False), threshold=-0.9999) == []
    assert detect(history, Alerts(stalled=False, threshold=-0.5), threshold=-0.9999)


def test_alerts_config():
    assert Alerts.of(True) == Alerts() and Alerts.of(False) is None and Alerts.of(None) is None
    custom = Alerts(persistence=3)
    assert Alerts.of(custom) is custom
    with pytest.raises(TypeError, match="alerts must be a bool"):
        Alerts.of("yes")
    with pytest.raises(ValueError, match="persistence"):
        Alerts(persistence=0)
    with pytest.raises(ValueError, match="threshold"):
        Alerts(threshold=-2.0)
    with pytest.raises(ValueError, match="stall_tolerance"):
        Alerts(stall_tolerance=0.0)
    with pytest.raises(ValueError, match="break_margin"):
        Alerts(break_margin=-0.1)


# -- the sink -----------------------------------------------------------------------------------


class Collect:
    def __init__(self):
        self.alerts = []

    def alert(self, alert):
        self.alerts.append(alert)


class Broken:
    def alert(self, alert):
        raise RuntimeError("pager down")


def unstable_run():
    """Emerges at 2, layer 5 stalls at 3-4, breaks at 5-6."""
    shapes = [line(noise=0.2, seed=0), line(noise=0.1, seed=1), line(), line(stall=5)]
    shapes += [line(stall=5), line(noise=0.2, seed=5), line(noise=0.2, seed=6)]
    return [snap(step, shape) for step, shape in enumerate(shapes)]


def test_the_sink_fires_each_alert_once(caplog):
    snaps = unstable_run()
    assert [s.fit.pearson_r <= -0.95 for s in snaps] == [False, False, True, True, True] + [
        False
    ] * 2
    collect = Collect()
    sink = AlertSink(Alerts(), targets=[Broken(), collect])
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        for s in snaps:
            sink.write(s)
    fired = [(a.kind, a.step, a.layer) for a in collect.alerts]
    assert fired == [("emerged", 2, None), ("stalled", 3, 5), ("broke", 5, None)]
    assert sink.fired == collect.alerts
    lines = [r for r in caplog.records if r.name == "lawwatch" and r.levelno == logging.WARNING]
    assert len(lines) == 3
    assert "lawwatch: the law emerged (step 2)" in caplog.text
    assert "lawwatch: layer 5 stopped falling (step 3)" in caplog.text
    assert caplog.text.count("could not raise an alert") == 3 and "pager down" in caplog.text


def test_a_resumed_run_does_not_raise_old_alerts():
    snaps = unstable_run()
    before = [s.to_record() for s in snaps[:5]]  # emerged and stalled already raised
    collect = Collect()
    sink = AlertSink(history=before, targets=[collect])
    for s in snaps[5:]:
        sink.write(s)
    assert [a.kind for a in collect.alerts] == ["broke"]


# -- real trackers ------------------------------------------------------------------------------


def test_wandb_offline_run_records_alerts(offline_wandb):
    import wandb

    from lawwatch.output.trackers import WandbSink

    live = wandb.init(project="lawwatch-tests", dir=str(offline_wandb))
    tracker = WandbSink(live)
    sink = AlertSink(targets=[tracker])
    for s in unstable_run():
        tracker.write(s)
        sink.write(s)
    run_dir = live.settings.sync_dir
    live.finish()
    records = inspect_run(run_dir)
    alerts = [r["alert"] for r in records if r["type"] == "alert"]
    assert [(a["title"], a["level"]) for a in alerts] == [
        ("lawwatch: the law emerged", "INFO"),
        ("lawwatch: layer 5 stopped falling", "WARN"),
        ("lawwatch: the law broke", "WARN"),
    ]
    assert all(a["text"] == f.text for a, f in zip(alerts, sink.fired, strict=True))


def test_trackio_run_records_alerts():
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    from lawwatch.output.trackers import TrackioSink

    project = f"lawwatch-{uuid.uuid4().hex[:8]}"
    run = trackio.init(project=project, name="alerts")
    tracker = TrackioSink(run)
    sink = AlertSink(targets=[tracker])
    for s in unstable_run():
        tracker.write(s)
        sink.write(s)
    trackio.finish()
    stored = SQLiteStorage.get_alerts(project, run_name="alerts")
    assert sorted((a["step"], a["title"], a["level"]) for a in stored) == [
        (2, "lawwatch: the law emerged", "info"),
        (4, "lawwatch: layer 5 stopped falling", "warn"),
        (6, "lawwatch: the law broke", "warn"),
    ]
    logs = SQLiteStorage.get_logs(project, "alerts")
    assert [row["train/global_step"] for row in logs if "lawwatch/rho" in row] == list(range(7))
    assert all(math.isfinite(row["lawwatch/rho"]) for row in logs if "lawwatch/rho" in row)
