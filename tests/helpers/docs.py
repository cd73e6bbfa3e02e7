"""The documentation's code blocks: found in Markdown, and run as a reader would run them.

A fenced ``python`` or ``bash`` block is preceded (on the line before its fence) by a marker:
``<!-- run -->`` (the test suite executes it) or ``<!-- not run: REASON -->`` (it needs what a
test cannot have: a hub model, a GPU, your data). The run blocks of one page are executed in
order, Python in one shared namespace and bash with the checkout's ``lawwatch`` command on the
PATH, in a fresh working directory per page: a page reads like one session.

``python -m tests.helpers.docs RESULT.json PAGE...`` runs the pages in one process (one import of
torch and transformers for all of them) and writes, per page, the first failure or None.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE = ("python", "bash")
MARKER = re.compile(r"<!--\s*(run|not run:(.*?))\s*-->")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str  # relative to the repository root
    line: int  # 1-based line of its opening fence
    lang: str
    code: str
    marker: str | None  # "run", "not run: REASON", or None when unmarked

    @property
    def runs(self) -> bool:
        return self.marker == "run"

    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of a Markdown page, with the marker on the line before its fence."""
    lines = page.read_text(encoding="utf-8").split("\n")
    resolved = page.resolve()
    name = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(page)
    found, i = [], 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        fence, start = opened.group(1), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence))
        before = lines[start - 1].strip() if start else ""
        marked = MARKER.fullmatch(before)
        marker = None
        if marked:
            marker = "run" if marked.group(1) == "run" else f"not run: {marked.group(2).strip()}"
        code = "\n".join(lines[start + 1 : end]) + "\n"
        found.append(Block(name, start + 1, opened.group(2).lower(), code, marker))
        i = end + 1
    return found


def environment(bin_dir: Path) -> dict[str, str]:
    """A reader's CPU environment with no network: the checkout's lawwatch, offline hubs."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "lawwatch"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lawwatch.cli "$@"\n')
    shim.chmod(0o755)
    launcher = bin_dir / "torchrun"  # this interpreter's, as a reader's environment has it
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
    launcher.chmod(0o755)
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_page(page: Path, workdir: Path) -> str | None:
    """Run a page's ``run`` blocks in order in ``workdir``; the first failure, or None."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    previous = Path.cwd()
    os.chdir(workdir)
    try:
        for block in (b for b in blocks(page) if b.runs):
            try:
                if block.lang == "python":
                    exec(compile(block.code, block.where(), "exec"), namespace)
                else:
                    done = subprocess.run(
                        ["bash", "-e", "-o", "pipefail", "-c", block.code],
                        capture_output=True,
                        text=True,
                    )
                    if done.returncode:
                        return (
                            f"{block.where()}: exit {done.returncode}\n{done.stdout}{done.stderr}"
                        )
            except Exception:
                return f"{block.where()}:\n{traceback.format_exc()}"
    finally:
        os.chdir(previous)
    return None


def main(result: str, *pages: str) -> None:
    outcome = {}
    with tempfile.TemporaryDirectory(prefix="lawwatch-docs-") as scratch:
        for k, page in enumerate(pages):
            workdir = Path(scratch) / f"page-{k}"
            workdir.mkdir()
            outcome[page] = run_page(ROOT / page, workdir)
    Path(result).write_text(json.dumps(outcome))


if __name__ == "__main__":
    main(*sys.argv[1:])
