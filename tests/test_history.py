"""One history per directory, never two mixed, never lost: real torn files, series, sharing.

The files here are damaged the way a crash damages them (a write cut mid-line, a record without
its newline) or the way a stray writer does (a garbage line), and the directory is then used as
a resumed or fresh run would use it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lawwatch import Snapshot, fit_law
from lawwatch.history import History, series_change
from lawwatch.output.store import HISTORY_FILE, MATRIX_FILE, LocalHistory, append
from lawwatch.watch.monitor import LawWatch
from tests.helpers.models import ragged_probe

SERIES = {"probe": "a" * 64, "config": {"layers": None, "target": "token_id"}, "precision": "f32"}


def snap(step: int, entries: int = 5, series: dict | None = None) -> Snapshot:
    pr = 0.9 ** torch.arange(1, entries + 1, dtype=torch.float64) * (1 + step / 1000)
    extra = dict(SERIES if series is None else series)
    return Snapshot(pr=pr, fit=fit_law(pr), n_tokens=100, seconds=0.1, step=step, extra=extra)


def written(directory: Path, steps=(0, 1, 2, 4)) -> list[dict]:
    """A history written by a LocalHistory, closed again; returns its records."""
    local = LocalHistory(directory)
    for step in steps:
        local.write(snap(step))
    local.close()
    return History.read(directory).records


def lines(directory: Path) -> list[str]:
    return (directory / HISTORY_FILE).read_text().splitlines()


def steps_on_disk(directory: Path) -> list[int]:
    return [json.loads(line)["step"] for line in lines(directory)]


# -- torn files -------------------------------------------------------------------------------


def tear(path: Path, how: str) -> bytes:
    """Damage ``path`` as a crash (or a stray writer) would; returns the damaged bytes."""
    data = path.read_bytes()
    if how == "cut mid-line":  # killed while writing the last record
        last = data.rstrip(b"\n").rfind(b"\n") + 1
        damaged = data[: last + (len(data) - last) // 2]
    elif how == "no final newline":  # killed before the newline reached the disk
        damaged = data.rstrip(b"\n")
    elif how == "garbage line":  # a stray writer, a disk error
        head, tail = data.split(b"\n", 2)[:2], data.split(b"\n", 2)[2]
        damaged = b"\n".join(head) + b"\n\x00\x00{not json\n" + tail
    else:
        raise ValueError(how)
    path.write_bytes(damaged)
    return damaged


@pytest.mark.parametrize("resume", [True, False])
@pytest.mark.parametrize("how", ["cut mid-line", "no final newline", "garbage line"])
def test_a_torn_history_is_repaired_and_recording_goes_on(tmp_path, caplog, how, resume):
    before = written(tmp_path)
    damaged = tear(tmp_path / HISTORY_FILE, how)
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        local = LocalHistory(tmp_path)  # what the next run (resumed or fresh) opens
    whole = [0, 1, 2] if how == "cut mid-line" else [0, 1, 2, 4]
    assert local.history.steps == whole
    assert steps_on_disk(tmp_path) == whole  # the file itself is whole again
    torn = sorted(tmp_path.glob(f"{HISTORY_FILE}.torn-*"))
    if how == "no final newline":
        assert not torn  # nothing was lost: the record only lacked its newline
    else:
        # the unreadable bytes are set aside, never dropped, and the warning says where
        assert [p.name for p in torn] == [f"{HISTORY_FILE}.torn-1"]
        kept = torn[0].read_bytes()
        assert kept.endswith(b"\n") and kept.strip() and kept.rstrip(b"\n") in damaged
        assert "torn-1" in caplog.text and "unreadable" in caplog.text
    # recording goes on: a run resumed at step 4 appends (no rewrite), a fresh one restarts
    local.drop_after(4 if resume else -1)
    for step in (8, 16) if resume else (0, 1):
        local.write(snap(step))
    expected = [*whole, 8, 16] if resume else [0, 1]
    assert steps_on_disk(tmp_path) == expected and History.read(tmp_path).steps == expected
    assert load_file(tmp_path / MATRIX_FILE)["steps"].tolist() == expected
    if resume:
        assert History.read(tmp_path).records[: len(whole)] == before[: len(whole)]


def test_torn_files_are_numbered_never_overwritten(tmp_path, caplog):
    written(tmp_path)
    for n in (1, 2):
        tear(tmp_path / HISTORY_FILE, "garbage line")
        with caplog.at_level(logging.WARNING, logger="lawwatch"):
            LocalHistory(tmp_path).close()
        assert (tmp_path / f"{HISTORY_FILE}.torn-{n}").exists()


def test_reading_skips_unreadable_lines_with_a_warning(tmp_path, caplog):
    """Readers (reports, analysis) get the whole records; the file is left as it is."""
    written(tmp_path)
    damaged = tear(tmp_path / HISTORY_FILE, "cut mid-line")
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        assert History.read(tmp_path).steps == [0, 1, 2]
    assert "unreadable" in caplog.text
    assert (tmp_path / HISTORY_FILE).read_bytes() == damaged


def test_rewrites_replace_whole_files(tmp_path, monkeypatch):
    """A rewrite goes to a temporary file first: a crash during it leaves the old file whole."""
    written(tmp_path)
    before = (tmp_path / HISTORY_FILE).read_bytes(), (tmp_path / MATRIX_FILE).read_bytes()
    local = LocalHistory(tmp_path)

    def crash(src, dst):
        raise OSError("killed during the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        local.drop_after(1)
    assert (tmp_path / HISTORY_FILE).read_bytes() == before[0]
    assert (tmp_path / MATRIX_FILE).read_bytes() == before[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [HISTORY_FILE, MATRIX_FILE]


def test_a_failed_append_leaves_no_part_of_its_record(tmp_path, monkeypatch):
    """A failing sync while appending: the record is absent, the next one lands on its own line.

    The primitive :func:`~lawwatch.output.store.append` (LocalHistory holds a refused record
    instead: see tests/test_faults.py for real full disks).
    """
    written(tmp_path)
    before = (tmp_path / HISTORY_FILE).read_bytes()
    history = History.read(tmp_path)

    def full(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        with pytest.raises(OSError, match="No space"):
            append(history, tmp_path, history.append(snap(8).to_record()))
    assert (tmp_path / HISTORY_FILE).read_bytes() == before
    assert history.steps == [0, 1, 2, 4]
    append(history, tmp_path, history.append(snap(16).to_record()))
    assert steps_on_disk(tmp_path) == [0, 1, 2, 4, 16]
    assert load_file(tmp_path / MATRIX_FILE)["steps"].tolist() == [0, 1, 2, 4, 16]


def test_no_stale_matrix_is_left(tmp_path):
    written(tmp_path)
    local = LocalHistory(tmp_path)
    local.drop_after(-1)  # a fresh run replaces the history
    assert not (tmp_path / MATRIX_FILE).exists()
    local.write(snap(0))
    assert load_file(tmp_path / MATRIX_FILE)["steps"].tolist() == [0]


# -- one series per directory -----------------------------------------------------------------


def test_what_makes_another_series():
    config = {
        "layers": None,
        "target": "token_id",
        "batch_size": 8,
        "max_onehot_bytes": 9,
        "stats_device": None,
    }
    a = {"probe": "a" * 64, "config": config, "precision": "float32"}
    assert series_change(a, dict(a)) == []
    cheaper = {
        **a,
        "config": {**config, "batch_size": 2, "max_onehot_bytes": 5, "stats_device": "cpu"},
    }
    assert series_change(a, cheaper) == []  # what a snapshot costs, not what it measures
    assert series_change(a, {**a, "probe": "b" * 64}) == [
        "probe (content hash aaaaaaaaaaaa… → bbbbbbbbbbbb…)"
    ]
    assert series_change(a, {**a, "config": {**config, "layers": 4}}) == ["layers=None → 4"]
    assert series_change(a, {**a, "precision": "bfloat16"}) == ["precision float32 → bfloat16"]


def test_every_record_says_what_it_was_measured_with(tmp_path, gpt2, probe):
    watch = LawWatch(
        gpt2, probe, max_overhead=None, every=1, layers=(0, 2, 3, 4), sinks=[LocalHistory(tmp_path)]
    )
    watch.maybe_snapshot(0)
    record = History.read(tmp_path).records[0]
    assert record["probe"] == probe.content_hash()
    assert record["config"] == watch.config.to_dict() and record["config"]["layers"] == [0, 2, 3, 4]
    assert record["precision"] == "float32"
    assert watch.history[0] == record
    watch.close()


@pytest.mark.parametrize(
    "change",
    [
        ({"probe": ragged_probe(seed=9)}, "probe (content hash"),
        ({"layers": (0, 1, 2, 4)}, "layers=None → [0, 1, 2, 4]"),
        ({"target": "token_id_shuffled"}, "target='token_id' → 'token_id_shuffled'"),
        ({"precision": torch.float64}, "precision float32 → float64"),
    ],
    ids=["probe", "layers", "target", "precision"],
)
def test_resuming_with_another_probe_or_options_starts_a_new_series(
    tmp_path, gpt2, probe, caplog, change
):
    options, said = change
    first = LawWatch(gpt2, probe, max_overhead=None, every=1, sinks=[LocalHistory(tmp_path)])
    for step in range(3):
        first.maybe_snapshot(step)
    state = first.state_dict()
    first.close()
    before = (tmp_path / HISTORY_FILE).read_bytes()

    # the resumed run: another probe, other options, or the weights in another dtype
    options = dict(options)
    model = gpt2.to(options.pop("precision")) if "precision" in options else gpt2
    resumed_probe = options.pop("probe", probe)
    local = LocalHistory(tmp_path)
    resumed = LawWatch(model, resumed_probe, max_overhead=None, every=1, sinks=[local], **options)
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        resumed.load_state_dict(state, resume_step=2)
        assert len(resumed.history) == 0  # the restored records are not continued
        resumed.maybe_snapshot(3)
    assert said in caplog.text and "new series" in caplog.text
    # the first series moved, whole, to series-1; the new one starts at step 3
    assert (tmp_path / "series-1" / HISTORY_FILE).read_bytes() == before
    assert load_file(tmp_path / "series-1" / MATRIX_FILE)["steps"].tolist() == [0, 1, 2]
    records = History.read(tmp_path).records
    assert [r["step"] for r in records] == [3]
    assert records[0]["probe"] == resumed_probe.content_hash()
    assert load_file(tmp_path / MATRIX_FILE)["steps"].tolist() == [3]
    assert "series-1" in caplog.text and "directory" in caplog.text
    local.close()


def test_a_sink_given_another_series_sets_the_old_aside(tmp_path, caplog):
    local = LocalHistory(tmp_path)
    local.write(snap(0))
    local.write(snap(1))
    other = {**SERIES, "config": {"layers": 3, "target": "token_id"}}
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        local.write(snap(1, series=other))  # the same step is fine: a new series
        local.write(snap(2, series=other))
        local.write(snap(3, series=SERIES))  # and back: a third series
    assert History.read(tmp_path).steps == [3]
    assert History.read(tmp_path / "series-1").steps == [0, 1]
    assert History.read(tmp_path / "series-2").steps == [1, 2]
    assert caplog.text.count("new series starts here") == 2
    local.close()


def test_a_directory_is_checked_when_opened_with_a_series(tmp_path, caplog):
    written(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        local = LocalHistory(tmp_path, series={**SERIES, "probe": "c" * 64})
    assert local.records == [] and History.read(tmp_path / "series-1").steps == [0, 1, 2, 4]
    assert "this run differs from the 4 records" in caplog.text and "probe (content" in caplog.text
    local.close()
    assert LocalHistory(tmp_path / "series-1", series=SERIES).history.steps == [0, 1, 2, 4]


# -- one writer per directory -----------------------------------------------------------------


def test_two_histories_never_share_a_directory(tmp_path, gpt2, probe):
    from accelerate import Accelerator

    from lawwatch.integrations.accelerate import AcceleratorWatch

    first = LocalHistory(tmp_path / "lw")
    with pytest.raises(ValueError, match="already written by another lawwatch monitor"):
        LocalHistory(tmp_path / "lw" / ".." / "lw")  # the same directory, spelled otherwise
    watch = AcceleratorWatch(Accelerator(cpu=True), gpt2, probe, directory=tmp_path / "aw")
    with pytest.raises(ValueError, match="its own directory="):
        AcceleratorWatch(Accelerator(cpu=True), gpt2, probe, directory=tmp_path / "aw")
    watch.close()
    AcceleratorWatch(Accelerator(cpu=True), gpt2, probe, directory=tmp_path / "aw").close()
    first.close()
    second = LocalHistory(tmp_path / "lw")  # once closed, the directory is free again
    del second  # a history nobody holds frees its directory too
    LocalHistory(tmp_path / "lw").close()
