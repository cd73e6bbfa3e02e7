"""The default demo (every ``DemoConfig`` default, W&B off) in a process of its own.

``python -m tests.helpers.default_demo OUT`` runs ``run_demo(DemoConfig(out=OUT/demo,
wandb="disabled"))`` at the lowest CPU priority, its console in ``OUT/console.txt``, and writes
``OUT/result.json``: the records, the emergence step and the law plot's path.

Its 1200 training steps are minutes of CPU, the suite's largest single cost. The suite starts
it when collection ends (tests/conftest.py, for the tests that use the ``default_demo``
fixture, which run last), so it trains on the CPU time the other tests leave idle (process
launches, waits, single-threaded work) instead of after them; its test waits for what is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    out = Path(sys.argv[1])
    os.nice(19)  # the other tests first: this one takes only the CPU they leave
    import torch
    from rich.console import Console

    from lawwatch.demo import DemoConfig, run_demo

    # SIGUSR1: the other tests are done; two threads, as the suite's own process has
    signal.signal(signal.SIGUSR1, lambda signum, frame: torch.set_num_threads(2))
    (out / "listening").touch()
    with open(out / "console.txt", "w") as text:
        result = run_demo(
            DemoConfig(out=str(out / "demo"), wandb="disabled"), Console(file=text, width=200)
        )
    summary = {
        "records": result.records,
        "emergence_step": result.emergence_step,
        "report": None if result.report is None else str(result.report),
    }
    (out / "result.tmp").write_text(json.dumps(summary))
    (out / "result.tmp").replace(out / "result.json")


class BackgroundDemo:
    """The process of :func:`main`, started at once; :meth:`result` waits for it.

    It starts with one intra-op thread (``threads=None``, the default, leaves the number to
    torch, which reads ``OMP_NUM_THREADS``): two threads that share one core with the other
    tests would wait for each other at every operation. Once the other tests are done (its
    test, the last, waits for it), it takes two.
    """

    def __init__(self) -> None:
        self.out = Path(tempfile.mkdtemp(prefix="lawwatch-default-demo-"))
        self._log = open(self.out / "log.txt", "w")  # noqa: SIM115 (closed by stop())
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "MPLBACKEND": "Agg"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.default_demo", str(self.out)],
            cwd=self.out,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends it whole
        )

    def result(self, timeout: float = 3600) -> dict[str, Any]:
        """The demo's ``result.json``, once its process ended well (else an assertion error
        with its log); a process still running after ``timeout`` seconds is killed."""
        self._both_cores()
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"the default demo did not end in {timeout} s") from None
        log = (self.out / "log.txt").read_text()
        assert code == 0, f"the default demo failed ({code}):\n{log[-6000:]}"
        return json.loads((self.out / "result.json").read_text())

    def _both_cores(self) -> None:
        """Nothing else runs now: let the run take both cores (once its handler listens)."""
        listening = self.out / "listening"
        deadline = time.monotonic() + 300
        while self.process.poll() is None and not listening.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGUSR1)

    def stop(self) -> None:
        """End the process if it still runs, and remove its files."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()
        shutil.rmtree(self.out, ignore_errors=True)


if __name__ == "__main__":
    main()
