"""A trainer that forks a helper which outlives it: for the directory lock's kill -9 tests.

``python -m tests.helpers.workers.forking_trainer DIRECTORY HOW`` opens a real monitor on
DIRECTORY (tiny GPT-2, one snapshot written), then starts a helper that sleeps: ``os.fork``,
``multiprocessing`` with the fork context (a data-loader worker's way), or ``raw`` (a plain
``flock`` taken on DIRECTORY, not lawwatch's, then ``os.fork``: a lock a child inherits). It
prints ``ready <helper pid>`` and waits to be killed.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import sys
import time

HELPER_SECONDS = 300


def helper() -> None:
    time.sleep(HELPER_SECONDS)


def main() -> None:
    directory, how = sys.argv[1], sys.argv[2]
    if how == "raw":
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        from lawwatch import LawWatch
        from tests.helpers.models import ragged_probe, tiny_gpt2

        watch = LawWatch(
            tiny_gpt2(),
            ragged_probe(),
            every=1,
            max_overhead=None,
            directory=directory,
            console=False,
        )
        watch.maybe_snapshot(0)
    if how == "multiprocessing":
        child = multiprocessing.get_context("fork").Process(target=helper)
        child.start()
        pid = child.pid
    else:
        pid = os.fork()
        if pid == 0:
            helper()
            os._exit(0)
    print("ready", pid, flush=True)
    time.sleep(HELPER_SECONDS)


if __name__ == "__main__":
    main()
