"""Launch a command from a test: its own process group, killed whole on timeout (never a hang)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    """A TCP port free right now, so back-to-back jobs never share a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """``torchrun --nproc_per_node N`` on a fresh local port, as an argv prefix."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]


def accelerate_launch(*options: str) -> list[str]:
    """``accelerate launch OPTIONS`` (e.g. ``--config_file FILE``) on a fresh local port, as an
    argv prefix: the command users type (this environment's ``accelerate`` script)."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", *options, "--main_process_port", str(free_port())]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): torchrun starts its workers in sessions of
    their own, so killing torchrun's process group does not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 240, fails: bool = False
) -> str:
    """Run ``cmd`` in the repository root; return stdout+stderr; fail on timeout, and on an
    error (or, with ``fails``, on success)."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills the workers too
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=30)
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout}s (a hang?):\n{output[-6000:]}")
    if fails:
        assert proc.returncode != 0, f"{' '.join(cmd)} succeeded:\n{output[-6000:]}"
    else:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-6000:]}"
    return output
