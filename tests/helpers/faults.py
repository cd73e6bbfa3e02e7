"""Real faults for the history store's tests: a small tmpfs (a disk that fills), read-only.

Mounting needs root (the tests run as root); elsewhere the test that needs a mount is skipped
with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lawwatch.output.layout import HISTORY_FILE, MATRIX_FILE
from lawwatch.output.store import read_history


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (made), unmounted after; skips where impossible."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills) needs root")
    done = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def remount(path: Path, mode: str) -> None:
    """Remount the tmpfs at ``path`` ``ro`` or ``rw``."""
    done = _mount("-o", f"remount,{mode}", str(path))
    assert done.returncode == 0, done.stderr


def fill(directory: Path) -> Path:
    """Grow a file in ``directory`` until its disk is full; returns it (delete it to free).

    Called again, it takes what was freed since (a removed file's pages) too."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            try:
                if os.write(fd, b"\0" * 4096) == 0:
                    break
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


def raw_steps(directory: Path) -> list[int]:
    """The steps of ``history.jsonl``'s lines as they are (every line must be a whole record)."""
    data = (directory / HISTORY_FILE).read_bytes()
    assert not data or data.endswith(b"\n"), f"a line without its newline: {data[-80:]!r}"
    return [json.loads(line)["step"] for line in data.splitlines()]


def assert_matrix_describes(directory: Path, *, or_absent: bool = False) -> None:
    """``pr.safetensors`` is the matrix of ``history.jsonl``'s records (absent without any).

    ``or_absent``: absent is fine too (a full disk refused the matrix, never a stale one).
    """
    expected = read_history(directory).pr_matrix()
    path = directory / MATRIX_FILE
    if expected is None or (or_absent and not path.exists()):
        assert not path.exists()
        return
    found = load_file(path)
    for name, tensor in zip(("steps", "layers", "pr"), expected, strict=True):
        assert torch.equal(found[name], tensor), (name, found[name], tensor)


def temporary_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*.tmp"))
