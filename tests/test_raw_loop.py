"""A raw torch loop's one-liner: ``LawWatch(directory=..., trackers=...)``, its state in a
``torch.save`` checkpoint, the first call measured, and docs/raw-loop.md's code run as is."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from lawwatch import measure
from lawwatch.output.store import LocalHistory, read_history
from lawwatch.watch.monitor import LawWatch
from tests.helpers.models import NanoGPT, ragged_probe
from tests.helpers.recipes import ROOT
from tests.helpers.trackers import expected_scalars, read_events


def loop(watch: LawWatch, steps: range) -> None:
    """The documented loop's monitor calls (the tiny model is not trained: the records are)."""
    for step in steps:
        watch.maybe_snapshot(step)


def test_directory_writes_history_and_figure(tmp_path, gpt2, probe):
    watch = LawWatch(
        gpt2, probe, every=2, last_step=5, max_overhead=None, directory=tmp_path / "lw"
    )
    loop(watch, range(1, 6))
    watch.close()
    records = read_history(tmp_path / "lw").records
    assert [r["step"] for r in records] == [1, 2, 4, 5]
    assert (tmp_path / "lw" / "pr.safetensors").exists()
    assert watch.report_path == tmp_path / "lw" / "law.png"
    assert watch.report_path.read_bytes()[:4] == b"\x89PNG"
    # the directory is free again: a new monitor may open it
    LawWatch(gpt2, probe, directory=tmp_path / "lw").close()


def test_tensorboard_tracker_by_name(tmp_path, gpt2, probe):
    watch = LawWatch(gpt2, probe, every=2, directory=tmp_path / "lw", trackers=["tensorboard"])
    loop(watch, range(1, 5))
    watch.close()
    records = read_history(tmp_path / "lw").records
    events = read_events(tmp_path / "lw" / "tensorboard")
    expected = expected_scalars(records)
    steps = [r["step"] for r in records]
    for key in expected[steps[0]]:
        points = events.Scalars(key)
        assert [p.step for p in points] == steps, key
        assert [p.value for p in points] == pytest.approx(  # TensorBoard keeps float32
            [expected[s][key] for s in steps], rel=1e-6, abs=1e-6
        )


def test_trackers_are_checked_when_built(tmp_path, gpt2, probe):
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbored'.*'tensorboard'"):
        LawWatch(gpt2, probe, directory=tmp_path / "lw", trackers=["tensorbored"])
    with pytest.raises(TypeError, match="neither a tracker name"):
        LawWatch(gpt2, probe, trackers=[object()])
    assert not (tmp_path / "lw").exists()  # refused before anything opened
    wandb = pytest.importorskip("wandb")
    assert wandb.run is None
    with pytest.raises(LookupError, match=r"'wandb'.*no W&B run is active.*wandb\.init"):
        LawWatch(gpt2, probe, directory=tmp_path / "lw", trackers=["wandb"])
    LocalHistory(tmp_path / "lw").close()  # the refused monitor left the directory free


def test_state_through_torch_save_and_resume(tmp_path, gpt2, probe, caplog):
    lw, ckpt_path = tmp_path / "lw", tmp_path / "ckpt.pt"
    first = LawWatch(gpt2, probe, every=2, max_overhead=None, directory=lw)
    loop(first, range(1, 5))
    torch.save({"step": 4, "lawwatch": first.state_dict()}, ckpt_path)
    loop(first, range(5, 7))  # went on past the checkpoint, then died
    first.close()
    before = read_history(lw).records
    assert [r["step"] for r in before] == [1, 2, 4, 6]

    ckpt = torch.load(ckpt_path, weights_only=True)  # plain values only
    resumed = LawWatch(gpt2, probe, every=2, max_overhead=None, directory=lw)
    resumed.load_state_dict(ckpt["lawwatch"], resume_step=ckpt["step"])
    assert [r["step"] for r in read_history(lw).records] == [1, 2, 4]  # rewound at once
    loop(resumed, range(5, 9))
    resumed.close()
    after = read_history(lw).records
    assert [r["step"] for r in after] == [1, 2, 4, 6, 8]  # one sequence, step 6 redone
    assert after[:3] == before[:3]

    # a fresh monitor in the same directory starts a new history, with the warning
    caplog.set_level(logging.WARNING, logger="lawwatch")
    fresh = LawWatch(gpt2, probe, every=2, max_overhead=None, directory=lw)
    loop(fresh, range(3, 5))
    fresh.close()
    assert [r["step"] for r in read_history(lw).records] == [3, 4]
    assert "loaded no state, so it starts a new history" in caplog.text


def test_first_call_is_measured(gpt2, probe):
    watch = LawWatch(gpt2, probe, schedule=[4, 8], max_overhead=None)
    loop(watch, range(1, 9))
    assert watch.history.steps == [1, 4, 8]  # the history starts where the loop first called
    resumed = LawWatch(gpt2, probe, schedule=[4, 8], max_overhead=None)
    resumed.load_state_dict(watch.state_dict(), resume_step=5)
    loop(resumed, range(6, 9))  # a resumed monitor keeps to its schedule
    assert resumed.history.steps == [1, 4, 8]
    assert resumed.history.records[-1] is not watch.history.records[-1]


def test_nanogpt_blocks_are_found_or_named():
    probe = ragged_probe()
    model = NanoGPT()  # nanoGPT's layout without a config: the error says what to pass
    with pytest.raises(ValueError, match=r"Pass blocks='transformer\.h'.*final_norm="):
        measure(model, probe)
    model.config = type("GPTConfig", (), {"n_layer": len(model.transformer.h)})()
    found = measure(model, probe)  # nanoGPT's GPTConfig.n_layer: the blocks, and ln_f by name
    named = measure(model, probe, blocks="transformer.h", final_norm="transformer.ln_f")
    assert found.pr.tolist() == pytest.approx(named.pr.tolist(), rel=1e-12)


def test_docs_quickstart_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "raw-loop.md").read_text()
    first, resume, *_ = re.findall(r"```python\n(.*?)```", text, re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(first, "docs/raw-loop.md", "exec"), namespace)
    directory = tmp_path / "run" / "lawwatch"
    before = read_history(directory).records
    steps = [r["step"] for r in before]
    # the schedule's steps (1, 2, 4, 8, 12) less what the default overhead budget skipped; the
    # first call and the last step always
    assert steps == sorted(set(steps)) and set(steps) <= {1, 2, 4, 8, 12}
    assert steps[0] == 1 and steps[-1] == 12
    assert 8 in steps  # checkpointed (checkpoint=True): measured whatever the budget decided
    assert (directory / "law.png").read_bytes()[:4] == b"\x89PNG"
    exec(compile(resume, "docs/raw-loop.md", "exec"), namespace)  # the state idiom, as shown
    after = read_history(directory).records
    kept = [r for r in before if r["step"] <= 8]  # the checkpoint's records, unchanged
    assert after[: len(kept)] == kept and after[-1]["step"] == 12
    assert [r["step"] for r in after] == sorted({r["step"] for r in after})
    # the budget's decision rode in the checkpoint: the resumed run measured the same steps
    assert [r["step"] for r in after] == steps
