"""Real faults on the history store: kill -9 at random instants, full and read-only disks.

Nothing is patched: a crash is a SIGKILL of a process running a real monitor, a full disk is a
real short write (a 64 kB tmpfs, RLIMIT_FSIZE), a read-only disk a tmpfs remounted read-only,
a removed directory an ``rmtree``. The kills and the file size limit run in one worker process
(tests/helpers/workers/fault_worker.py), seeded and bounded: the imports are paid once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lawwatch import LawWatch, ProbeSet
from lawwatch.output.layout import HISTORY_FILE, MATRIX_FILE, PROBE_FILE
from lawwatch.output.store import HistoryBusy, LocalHistory, read_history
from tests.helpers.faults import (
    assert_matrix_describes,
    fill,
    raw_steps,
    remount,
    temporary_files,
    tmpfs,
)

ROOT = Path(__file__).resolve().parents[1]
SEED, KILLS = 18, 6  # per mode; each a forked child killed mid-run within about a second
HELD = "is not being written"


def lawwatch_records(caplog, level: int = logging.WARNING) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lawwatch" and r.levelno >= level]


# -- kill -9 at random instants ---------------------------------------------------------------


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults")
    command = [sys.executable, "-m", "tests.helpers.workers.fault_worker", str(out), str(SEED)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*command, str(KILLS)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["foreground", "background"])
def test_kill_9_at_random_instants_leaves_one_repairable_history(faults, mode, caplog):
    """Each kill's directory, reopened: readable, each step once, the matrix its history's."""
    done = json.loads((faults / "done.json").read_text())[mode]
    log = (faults / f"{mode}.log").read_text()
    assert all(t["killed"] for t in done["trials"]), (done["trials"], log[-2000:])
    assert done["last_exit"] == 0
    for n in range(KILLS):
        left = faults / "kills" / f"{mode}-{n}"
        lw = left / "lw"
        if not (lw / HISTORY_FILE).exists():
            continue  # killed before its first record
        # as the kill left it: whole lines (a write is one call) and no step twice
        steps = raw_steps(lw)
        assert steps == sorted(set(steps)), (n, steps)
        with caplog.at_level(logging.WARNING, logger="lawwatch"):
            LocalHistory(lw).close()  # what the next run opens: repaired here
        assert raw_steps(lw) == steps and read_history(lw).steps == steps
        assert_matrix_describes(lw)
        assert temporary_files(lw) == [], n
        checkpoint = left / "checkpoint.json"
        if checkpoint.exists():  # no step the checkpoint claims is missing
            claimed = [r["step"] for r in json.loads(checkpoint.read_text())["history"]]
            assert set(claimed) <= set(steps), (n, claimed, steps)
    # the run that went on after every kill: one history, each step once, from 0 on
    lw = faults / mode / "lw"
    steps = raw_steps(lw)
    assert steps == list(range(len(steps))) and len(steps) >= 4
    assert_matrix_describes(lw)
    assert temporary_files(faults / mode) == []
    assert "ERROR" not in log and "Traceback" not in log


def dead_pid() -> int:
    """The id of a process that has ended."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def test_a_stale_matrix_and_killed_writers_files_are_repaired_on_open(
    tmp_path, gpt2, probe, caplog
):
    """What a kill between the history's append and the matrix's rename leaves, and a rewrite's."""
    local = LocalHistory(tmp_path)
    watch = LawWatch(gpt2, probe, max_overhead=None, every=1, sinks=[local])
    for step in range(3):
        watch.maybe_snapshot(step)
    matrix = (tmp_path / MATRIX_FILE).read_bytes()  # of steps 0 to 2
    watch.maybe_snapshot(3)
    watch.close()
    (tmp_path / MATRIX_FILE).write_bytes(matrix)  # the append landed, the rename did not
    pid = dead_pid()
    leftovers = [f".{MATRIX_FILE}.{pid}.tmp", f".{HISTORY_FILE}.{pid}.tmp"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"killed during a replace")
    alive = tmp_path / f".{MATRIX_FILE}.1.tmp"  # pid 1 lives: its writer may still rename it
    alive.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        local = LocalHistory(tmp_path)
    assert "did not describe" in caplog.text and read_history(tmp_path).steps == [0, 1, 2, 3]
    assert_matrix_describes(tmp_path)
    assert temporary_files(tmp_path) == [alive.name]
    # a resume's rewrite killed between the two files: the history rewritten, the matrix old
    matrix = (tmp_path / MATRIX_FILE).read_bytes()
    local.drop_after(1)
    local.close()
    (tmp_path / MATRIX_FILE).write_bytes(matrix)
    LocalHistory(tmp_path).close()
    assert read_history(tmp_path).steps == [0, 1]
    assert_matrix_describes(tmp_path)
    # a matrix without records, and an unreadable one
    (tmp_path / MATRIX_FILE).write_bytes(b"garbage")
    LocalHistory(tmp_path).close()
    assert_matrix_describes(tmp_path)
    save_file({"steps": torch.tensor([0])}, tmp_path / "other.safetensors")
    local = LocalHistory(tmp_path)
    local.drop_after(-1)
    local.close()
    shutil.copy(tmp_path / "other.safetensors", tmp_path / MATRIX_FILE)
    LocalHistory(tmp_path).close()
    assert not (tmp_path / MATRIX_FILE).exists()


# -- full, read-only and removed directories --------------------------------------------------


def test_a_file_size_limit_cuts_writes_short_and_no_line_is_glued(faults):
    """RLIMIT_FSIZE: each append writes what fits, then fails (EFBIG); nothing of it stays."""
    assert json.loads((faults / "done.json").read_text())["fsize_exit"] == 0
    result = json.loads((faults / "fsize.json").read_text())
    # while refused, the file never grew: the part of a record that fit was cut away
    assert result["sizes"] == [result["size"]] * 4 and result["held"] == [4, 5, 6, 7]
    # the limit raised again: the held records were written in order, then the next ones
    assert raw_steps(faults / "fsize") == list(range(10))
    assert_matrix_describes(faults / "fsize")
    log = (faults / "fsize.log").read_text()
    assert log.count(HELD) == 1 and "File too large" in log and "written again" in log
    assert "ERROR" not in log and "Traceback" not in log


def test_a_full_disk_holds_the_records_and_writes_them_in_order(tmp_path, gpt2, probe, caplog):
    """A 64 kB tmpfs filled up: one warning, no part of a record, the records written later."""
    with tmpfs(tmp_path / "disk") as disk:
        local = LocalHistory(disk / "lw")
        watch = LawWatch(gpt2, probe, max_overhead=None, every=1, sinks=[local])
        with caplog.at_level(logging.WARNING, logger="lawwatch"):
            for step in range(3):
                watch.maybe_snapshot(step)
            # each append fills the file's last page (a record may still fit whole), then fails;
            # what the store frees meanwhile (the PR matrix it cannot rewrite) is taken again
            for step in range(3, 7):
                filler = fill(disk)
                watch.maybe_snapshot(step)
                on_disk = raw_steps(disk / "lw")  # whole lines only, each with its newline
                assert on_disk + local.unwritten == list(range(step + 1))
                assert_matrix_describes(disk / "lw", or_absent=True)
            assert on_disk[:3] == [0, 1, 2] and 6 in local.unwritten
            assert local.history.steps == list(range(7))
            held = lawwatch_records(caplog)
            # one warning (a disk on the edge of full may take a record between refusals)
            assert sum(HELD in r.getMessage() for r in held) == 1
            assert all(HELD in r.getMessage() or "written again" in r.getMessage() for r in held)
            assert "No space left" in held[0].getMessage()
            filler.unlink()  # space returns
            watch.maybe_snapshot(7)
            watch.close()
        assert raw_steps(disk / "lw") == list(range(8)) and local.unwritten == []
        assert_matrix_describes(disk / "lw")
        assert not any(r.levelno >= logging.ERROR for r in lawwatch_records(caplog))
        assert "written again" in caplog.text and temporary_files(disk) == []


def test_a_disk_full_when_the_monitor_opens_keeps_the_probe_once_space_returns(
    tmp_path, gpt2, probe, caplog
):
    """The probe refused at open is held like the records: written with them, never lost."""
    with tmpfs(tmp_path / "disk", "256k") as disk:
        (disk / "lw").mkdir()
        filler = fill(disk)
        with caplog.at_level(logging.INFO, logger="lawwatch"):
            watch = LawWatch(
                gpt2, probe, every=1, max_overhead=None, directory=disk / "lw", console=False
            )
            local = watch.outputs.local
            for step in range(3):
                watch.maybe_snapshot(step)
            assert not (disk / "lw" / PROBE_FILE).exists() and local.unwritten == [0, 1, 2]
            filler.unlink()  # space returns
            watch.maybe_snapshot(3)
            assert raw_steps(disk / "lw") == [0, 1, 2, 3] and local.unwritten == []
            assert ProbeSet.load(disk / "lw" / PROBE_FILE).content_hash() == probe.content_hash()
            watch.close()
        assert_matrix_describes(disk / "lw")
        assert "the probe was not saved" in caplog.text and "is written, with the" in caplog.text
        assert not any(r.levelno >= logging.ERROR for r in lawwatch_records(caplog))
        assert temporary_files(disk) == []


def test_held_records_are_written_as_far_as_they_fit(tmp_path, gpt2, probe, caplog):
    """31 records held, then about 8 kB free: the whole records that fit are written, in order
    (never a part of the next one); the rest stay held and follow when space returns."""
    with tmpfs(tmp_path / "disk", "256k") as disk:
        local = LocalHistory(disk / "lw", probe=probe)
        watch = LawWatch(gpt2, probe, max_overhead=None, every=1, sinks=[local])
        with caplog.at_level(logging.WARNING, logger="lawwatch"):
            watch.maybe_snapshot(0)
            for step in range(1, 32):
                filler = fill(disk)  # what the store freed meanwhile is taken again
                watch.maybe_snapshot(step)
            before = raw_steps(disk / "lw")
            assert before + local.unwritten == list(range(32)) and len(local.unwritten) >= 25
            os.truncate(filler, filler.stat().st_size - 8192)  # about 8 kB (two pages) free
            watch.maybe_snapshot(32)
            on_disk = raw_steps(disk / "lw")  # whole lines only, each with its newline
            assert on_disk[: len(before)] == before and on_disk + local.unwritten == list(range(33))
            record = len((disk / "lw" / HISTORY_FILE).read_bytes()) // len(on_disk)
            assert len(on_disk) - len(before) >= 8192 // record - 2  # what fit, not nothing
            assert local.unwritten  # and not all: the rest is held
            assert_matrix_describes(disk / "lw", or_absent=True)
            filler.unlink()
            watch.maybe_snapshot(33)
            watch.close()
        assert raw_steps(disk / "lw") == list(range(34)) and local.unwritten == []
        assert_matrix_describes(disk / "lw")
        assert sum(HELD in r.getMessage() for r in lawwatch_records(caplog)) == 1
        assert not any(r.levelno >= logging.ERROR for r in lawwatch_records(caplog))
        assert temporary_files(disk) == []


def test_a_read_only_directory_that_becomes_writable(tmp_path, gpt2, probe, caplog):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        local = LocalHistory(disk / "lw")
        watch = LawWatch(gpt2, probe, max_overhead=None, every=1, sinks=[local])
        with caplog.at_level(logging.WARNING, logger="lawwatch"):
            watch.maybe_snapshot(0)
            remount(disk, "ro")
            try:
                for step in range(1, 4):
                    watch.maybe_snapshot(step)
                assert raw_steps(disk / "lw") == [0] and local.unwritten == [1, 2, 3]
            finally:
                remount(disk, "rw")
            watch.maybe_snapshot(4)
            watch.close()
        assert raw_steps(disk / "lw") == [0, 1, 2, 3, 4]
        assert_matrix_describes(disk / "lw")
        messages = [r.getMessage() for r in lawwatch_records(caplog)]
        assert sum(HELD in m for m in messages) == 1 and "Read-only" in caplog.text
        assert not any(r.levelno >= logging.ERROR for r in lawwatch_records(caplog))


def test_a_directory_removed_mid_run_is_written_again_whole(tmp_path, gpt2, probe, caplog):
    local = LocalHistory(tmp_path / "lw")
    watch = LawWatch(gpt2, probe, max_overhead=None, every=1, sinks=[local])
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        for step in range(3):
            watch.maybe_snapshot(step)
        shutil.rmtree(tmp_path / "lw")
        for step in range(3, 5):
            watch.maybe_snapshot(step)
        watch.close()
    assert raw_steps(tmp_path / "lw") == list(range(5))
    assert_matrix_describes(tmp_path / "lw")
    assert caplog.text.count("was removed or cut") == 1
    assert not any(r.levelno >= logging.ERROR for r in lawwatch_records(caplog))


# -- a fresh run into a directory holding an earlier run --------------------------------------


def earlier_run(directory: Path, gpt2, probe) -> None:
    watch = LawWatch(gpt2, probe, max_overhead=None, every=4, sinks=[LocalHistory(directory)])
    for step in range(13):
        watch.maybe_snapshot(step)
    watch.close()
    assert raw_steps(directory) == [0, 1, 2, 4, 8, 12]


@pytest.mark.parametrize("entry", ["LawWatch", "AcceleratorWatch"])
def test_a_fresh_run_replaces_an_earlier_run_with_a_warning(tmp_path, gpt2, probe, entry, caplog):
    """As the Trainer callback does: the new run's history alone, one warning, no error."""
    earlier_run(tmp_path, gpt2, probe)
    if entry == "LawWatch":
        watch = LawWatch(gpt2, probe, max_overhead=None, every=4, sinks=[LocalHistory(tmp_path)])
    else:
        from accelerate import Accelerator

        from lawwatch.integrations.accelerate import AcceleratorWatch

        watch = AcceleratorWatch(
            Accelerator(cpu=True), gpt2, probe, max_overhead=None, every=4, directory=tmp_path
        )
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        for step in range(9):
            watch.maybe_snapshot(step)
        watch.close()
    assert raw_steps(tmp_path) == [0, 1, 2, 4, 8]
    assert_matrix_describes(tmp_path)
    warned = lawwatch_records(caplog)
    assert len(warned) == 1 and "loaded no state" in warned[0].getMessage()
    assert "replacing the 6 records" in warned[0].getMessage()
    # a run that loads the state continues it instead
    state = {"history": read_history(tmp_path).records, "last_step": 8}
    resumed = LawWatch(gpt2, probe, max_overhead=None, every=4, sinks=[LocalHistory(tmp_path)])
    resumed.load_state_dict(state, resume_step=8)
    for step in range(9, 17):
        resumed.maybe_snapshot(step)
    resumed.close()
    assert raw_steps(tmp_path) == [0, 1, 2, 4, 8, 12, 16]


def test_another_process_writing_the_directory_is_refused_until_it_is_killed(tmp_path):
    """Two processes, one directory: the second writer is refused (never two interleaved
    histories); a SIGKILL of the first frees the directory without any cleanup."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from lawwatch.output.store import LocalHistory; "
            f"h = LocalHistory({str(tmp_path)!r}); print('open', flush=True); time.sleep(600)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(HistoryBusy, match="already written by another process") as busy:
            LocalHistory(tmp_path)
        # the holder named: its process id and what it runs
        assert f"held by process {holder.pid} (" in str(busy.value)
        assert f"({sys.executable} -c import sys" in str(busy.value)
    finally:
        holder.kill()  # SIGKILL: the lock goes with the process
        holder.wait(timeout=60)
    LocalHistory(tmp_path).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock leaves no file


def forking_trainer(directory: Path, how: str) -> tuple[subprocess.Popen, int]:
    """A real trainer process with a monitor on ``directory`` and a forked helper (its pid)."""
    trainer = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.workers.forking_trainer", str(directory), how],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    line = trainer.stdout.readline().split()
    if line[:1] != ["ready"]:
        trainer.kill()  # its helper, if any, sleeps out its time alone
        trainer.wait(timeout=60)
        raise AssertionError(f"the trainer did not start its helper: {line}")
    return trainer, int(line[1])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_helper_forked_by_a_killed_trainer_does_not_keep_the_directory(
    tmp_path, gpt2, probe, how, caplog
):
    """kill -9 of a trainer whose forked helper (a data-loader worker, a multiprocessing fork)
    outlives it: the resumed run opens the directory and writes its history."""
    directory = tmp_path / "lw"
    trainer, helper = forking_trainer(directory, how)
    try:
        trainer.kill()  # SIGKILL: no cleanup, the helper goes on
        trainer.wait(timeout=60)
        assert alive(helper)
        with caplog.at_level(logging.WARNING, logger="lawwatch"):
            resumed = LawWatch(gpt2, probe, every=1, max_overhead=None, directory=directory)
            resumed.load_state_dict({"history": read_history(directory).records}, resume_step=0)
            resumed.maybe_snapshot(1)
            resumed.close()
        assert alive(helper)  # it held nothing: the run wrote while it lives
        assert raw_steps(directory) == [0, 1]
        assert not any(r.levelno >= logging.ERROR for r in lawwatch_records(caplog))
    finally:
        trainer.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, signal.SIGKILL)


def test_a_lock_a_child_inherited_names_that_child_and_its_ended_parent(tmp_path):
    """A lock taken by another program and kept by the child it forked after it was killed:
    the refusal names the child (pid, command) and the ended process it inherited it from,
    not two trainers that formed no process group."""
    directory = tmp_path / "lw"
    directory.mkdir()
    trainer, helper = forking_trainer(directory, "raw")
    try:
        trainer.kill()
        trainer.wait(timeout=60)
        with pytest.raises(HistoryBusy) as busy:
            LocalHistory(directory)
        message = str(busy.value)
        assert f"held by process {helper} (" in message and "forking_trainer" in message
        assert f"after process {trainer.pid}, which took it, ended" in message
        assert "process group" not in message
        os.kill(helper, signal.SIGKILL)  # the child ends: the directory is free
        for _ in range(600):
            if not alive(helper):
                break
            time.sleep(0.1)
        LocalHistory(directory).close()
    finally:
        trainer.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, signal.SIGKILL)
