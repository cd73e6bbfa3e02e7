"""Real faults on a real monitor: SIGKILL at random instants, and a file size limit.

Run by tests/test_faults.py as ``python -m tests.helpers.workers.fault_worker OUT SEED KILLS``.
The imports and the tiny model are paid once; each trial is a forked child that runs
:class:`~lawwatch.LawWatch` with a :class:`~lawwatch.output.store.LocalHistory`, resuming from
the checkpoint the previous child left (a rewrite of the history), snapshotting every step and
checkpointing every third. For ``foreground`` and then ``background``, KILLS children are
killed with SIGKILL after a seeded random delay (half of them early, during the open and the
resume's rewrite); each time the directory is copied to ``OUT/kills/<mode>-<n>`` as the kill
left it, for the test to reopen. A last child runs to its end. Then ``fsize``: a child lowers
RLIMIT_FSIZE (SIGXFSZ ignored) below the next record's end, so appends are real short writes
refused with EFBIG, and raises it again. ``OUT/done.json`` lists what happened.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lawwatch import LawWatch, ProbeSet
from lawwatch.output.layout import HISTORY_FILE
from lawwatch.output.store import LocalHistory
from tests.helpers.models import ragged_probe, tiny_gpt2
from tests.helpers.workers.common import setup

CHECKPOINT = "checkpoint.json"
FOREVER = 10**9  # a killed child's steps: it is always killed mid-run, never after its end


def monitor(model: torch.nn.Module, probe: ProbeSet, local: LocalHistory, mode: str) -> LawWatch:
    return LawWatch(
        model, probe, max_overhead=None, every=1, background=mode == "background", sinks=[local]
    )


def run(model: torch.nn.Module, probe: ProbeSet, run_dir: Path, mode: str, steps: int) -> None:
    """One training run: resume from the checkpoint if any, snapshot every step, checkpoint."""
    local = LocalHistory(run_dir / "lw")
    watch = monitor(model, probe, local, mode)
    start = 0
    checkpoint = run_dir / CHECKPOINT
    if checkpoint.exists():
        state = json.loads(checkpoint.read_text())
        watch.load_state_dict(state, resume_step=state["last_step"])  # rewrites the history
        start = state["last_step"] + 1
    for step in range(start, start + steps):
        watch.maybe_snapshot(step)
        if step % 3 == 2:  # a checkpoint claims every record up to here
            data = json.dumps(watch.state_dict()).encode()
            tmp = checkpoint.with_suffix(".part")
            tmp.write_bytes(data)
            os.replace(tmp, checkpoint)
    watch.close()


def child(log_file: Path, job: Any, *args: Any) -> int:
    """Fork a child that logs lawwatch's messages to ``log_file`` and runs ``job``."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            handler = logging.FileHandler(log_file)
            handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            logging.getLogger("lawwatch").addHandler(handler)
            job(*args)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)
    return pid


def kills(model: torch.nn.Module, probe: ProbeSet, out: Path, rng: random.Random, count: int):
    done: dict[str, Any] = {}
    for mode in ("foreground", "background"):
        run_dir = out / mode
        run_dir.mkdir()
        trials = []
        for n in range(count):
            pid = child(out / f"{mode}.log", run, model, probe, run_dir, mode, FOREVER)
            # half early (the open, the resume's rewrite), half during snapshots and appends
            delay = rng.uniform(0.0, 0.08) if n % 2 else rng.uniform(0.05, 1.2)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            shutil.copytree(run_dir, out / "kills" / f"{mode}-{n}")
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            trials.append({"delay": delay, "killed": killed, "status": status})
        pid = child(out / f"{mode}.log", run, model, probe, run_dir, mode, 4)
        _, status = os.waitpid(pid, 0)
        done[mode] = {"trials": trials, "last_exit": os.waitstatus_to_exitcode(status)}
    return done


def full(model: torch.nn.Module, probe: ProbeSet, out: Path) -> None:
    """Appends cut short by RLIMIT_FSIZE, then the limit raised again (in a forked child)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    directory = out / "fsize"
    local = LocalHistory(directory)
    watch = monitor(model, probe, local, "foreground")
    for step in range(4):
        watch.maybe_snapshot(step)
    size = (directory / HISTORY_FILE).stat().st_size
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # room for 100 bytes more: the next record is written in part, then refused
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
    sizes = []
    for step in range(4, 8):
        watch.maybe_snapshot(step)
        sizes.append((directory / HISTORY_FILE).stat().st_size)
    held = local.unwritten
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    for step in range(8, 10):
        watch.maybe_snapshot(step)
    watch.close()
    result = {"size": size, "sizes": sizes, "held": held}
    (out / "fsize.json").write_text(json.dumps(result))


def main() -> None:
    out = setup()
    seed, count = int(sys.argv[2]), int(sys.argv[3])
    logging.getLogger("lawwatch").setLevel(logging.INFO)
    model, probe = tiny_gpt2(), ragged_probe()
    import warnings

    warnings.simplefilter("ignore")  # the tiny probe's "PR is noisy" warning
    done = kills(model, probe, out, random.Random(seed), count)
    pid = child(out / "fsize.log", full, model, probe, out)
    _, status = os.waitpid(pid, 0)
    done["fsize_exit"] = os.waitstatus_to_exitcode(status)
    (out / "done.json").write_text(json.dumps(done))


if __name__ == "__main__":
    main()
