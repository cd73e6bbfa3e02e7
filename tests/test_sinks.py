"""WandbSink against a real offline W&B run, read back with `wandb leet inspect`."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from lawwatch import Snapshot, fit_law
from lawwatch.law import emergence_step
from lawwatch.output.sinks import Sinks, layer_key
from lawwatch.output.trackers import WandbSink
from tests.helpers.wandb_offline import (
    final_summary,
    history_rows,
    inspect_run,
    table_files,
    table_rows,
)


def snapshot(step: int, decay: float, entries: int = 5, seed: int = 0) -> Snapshot:
    """A snapshot whose PR falls by `decay` per layer, with a little noise."""
    gen = torch.Generator().manual_seed(seed + step)
    pr = 0.8 * decay ** torch.arange(entries, dtype=torch.float64)
    pr = pr * (1 + 0.01 * torch.rand(entries, generator=gen, dtype=torch.float64))
    return Snapshot(pr=pr, fit=fit_law(pr), n_tokens=500, seconds=0.1, step=step)


def run(offline_wandb):
    import wandb

    return wandb.init(project="lawwatch-tests", dir=str(offline_wandb))


def finish(live) -> list[dict]:
    run_dir = Path(live.settings.sync_dir)
    live.finish()
    return inspect_run(run_dir), run_dir


def test_layer_keys_sort_by_depth():
    assert layer_key(3, 13) == "lawwatch/pr/layer_03"
    assert layer_key(7, 101) == "lawwatch/pr/layer_007"
    keys = [layer_key(i, 120) for i in range(120)]
    assert keys == sorted(keys)


def test_rows_summary_table_and_chart(offline_wandb):
    live = run(offline_wandb)
    sink = WandbSink(live, max_lines=3)
    # flat PR first (no law), then geometric decay (the law holds)
    snaps = [snapshot(0, 1.0), snapshot(5, 0.999), snapshot(10, 0.9), snapshot(20, 0.8)]
    for snap in snaps:
        sink.write(snap)
    with pytest.raises(ValueError, match="not after"):
        sink.write(snapshot(20, 0.8))
    assert [r["step"] for r in sink.records] == [0, 5, 10, 20]
    records, run_dir = finish(live)

    rows = [row for row in history_rows(records) if "lawwatch/rho" in row]
    assert [row["train/global_step"] for row in rows] == [0, 5, 10, 20]
    for row, snap in zip(rows, snaps, strict=True):
        assert row["lawwatch/pearson_r"] == pytest.approx(snap.fit.pearson_r, rel=1e-12)
        assert row["lawwatch/intercept"] == pytest.approx(snap.fit.intercept, rel=1e-12)
        assert row["lawwatch/n_tokens"] == 500
        for i in range(5):
            assert row[layer_key(i, 5)] == pytest.approx(float(snap.pr[i]), rel=1e-12)
    summary = final_summary(records)
    expected = emergence_step([s.step for s in snaps], [s.fit.pearson_r for s in snaps])
    assert expected is not None and summary["lawwatch/emergence_step"] == expected
    assert summary["lawwatch/pearson_r"] == pytest.approx(snaps[-1].fit.pearson_r, rel=1e-12)
    table = table_rows(run_dir, "lawwatch/pr_table")
    assert [(row[0], row[1]) for row in table] == [(s.step, i) for s in snaps for i in range(5)]
    assert all(row[3] == pytest.approx(math.log10(row[2])) for row in table)
    # the chart's table holds at most max_lines snapshots: the first, the latest, one between
    # the chart (x = layer, line key, log10 PR) redrawn at each snapshot: the latest holds at
    # most max_lines snapshots, evenly spread (indices 0, 1.5 -> 2, 3)
    chart = json.loads(table_files(run_dir, "lawwatch/law_table")[-1].read_text())["data"]
    assert [(x, key) for x, key, _ in chart] == [
        (x, f"step {s}") for s in (0, 10, 20) for x in range(1, 5)
    ]
    by_step = {s.step: s for s in snaps}
    for x, key, y in chart:
        assert y == pytest.approx(math.log10(by_step[int(key[5:])].pr[x]), rel=1e-12)


def test_bad_chart_size(offline_wandb):
    live = run(offline_wandb)
    with pytest.raises(ValueError, match="max_lines must be at least 2"):
        WandbSink(live, max_lines=1)
    live.finish()


def test_a_run_gets_each_step_once(offline_wandb):
    live = run(offline_wandb)
    history = [snapshot(s, 0.9).to_record() for s in (0, 1, 2)]
    # a resumed W&B run restores its summary: it already holds steps up to 1
    live.summary["lawwatch/step"] = 1
    sink = WandbSink(live, history=history)
    sink.write(snapshot(4, 0.9))
    assert [r["step"] for r in sink.records] == [0, 1, 2, 4]
    records, _ = finish(live)
    steps = [row["train/global_step"] for row in history_rows(records) if "lawwatch/rho" in row]
    assert steps == [2, 4]


def test_sink_failure_is_reported(offline_wandb, caplog):
    live = run(offline_wandb)
    sinks = Sinks([WandbSink(live)])
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        sinks.write(
            Snapshot(
                pr=torch.ones(4),
                fit=fit_law([1.0, 0.5, 0.25, 0.1]),
                n_tokens=1,
                seconds=0.0,
                step=None,
            )
        )
    live.finish()
    assert "WandbSink failed" in caplog.text and "needs a training step" in caplog.text


def test_a_layer_subset_keeps_its_true_indices(offline_wandb, tmp_path):
    """Snapshots of entries 0, 3, 6, 9 (``layers=3``): every consumer names the true entries."""
    from safetensors.torch import load_file

    from lawwatch.history import law_points
    from lawwatch.output.sinks import scalars
    from lawwatch.output.store import LocalHistory
    from lawwatch.report import plot_law

    layers = (0, 3, 6, 9)
    snaps = []
    for step, decay in [(0, 0.99), (4, 0.9)]:
        pr = 0.8 * decay ** torch.tensor(layers, dtype=torch.float64)
        fit = fit_law(pr, layers=layers)
        snaps.append(Snapshot(pr=pr, fit=fit, n_tokens=50, seconds=0.1, step=step, layers=layers))
    assert snaps[-1].fit.rho == pytest.approx(0.9, rel=1e-12)

    history = LocalHistory(tmp_path)
    live = run(offline_wandb)
    sink = WandbSink(live)
    for snap in snaps:
        history.write(snap)
        sink.write(snap)
    records, run_dir = finish(live)
    assert load_file(tmp_path / "pr.safetensors")["layers"].tolist() == list(layers)
    row = [r for r in history_rows(records) if "lawwatch/rho" in r][-1]
    for entry, value in zip(layers, snaps[-1].pr.tolist(), strict=True):
        assert row[layer_key(entry, 10)] == pytest.approx(value, rel=1e-12)
    assert [(r[0], r[1]) for r in table_rows(run_dir, "lawwatch/pr_table")] == [
        (s.step, e) for s in snaps for e in layers
    ]
    chart = json.loads(table_files(run_dir, "lawwatch/law_table")[-1].read_text())["data"]
    assert sorted({x for x, _, _ in chart}) == [3, 6, 9]
    xs, ys = law_points(history.records[-1])
    assert xs == [3, 6, 9] and ys == pytest.approx([math.log10(v) for v in snaps[-1].pr[1:]])
    assert plot_law(history.records, tmp_path / "law.png").exists()
    values = scalars(snaps[-1])
    assert {k for k in values if "/pr/" in k} == {f"lawwatch/pr/layer_{e:02d}" for e in layers}
