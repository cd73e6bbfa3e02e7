"""A 6-checkpoint ``lawwatch analyze`` sweep on 1 process and on 2 (torchrun), wall time each.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_sweep.py [--repeat 2] [--tiny]

(``--tiny``: a 3-block, 16-wide model and a small probe, seconds; it checks that the script
runs.) Six GPT-2 checkpoints (6 blocks × 256 dims, vocabulary 2048, each its own random
initialization, saved with a ``trainer_state.json`` giving steps 1…6) are swept with a probe of
128 sequences × 128 tokens (16,256 examples), ``--no-report --no-progress``, into a fresh
directory per run: ``python -m lawwatch analyze`` (1 process) and ``torchrun --nproc_per_node 2
-m lawwatch analyze`` (2 processes, the checkpoints dealt 3 and 3). Each sweep is a fresh
command, start-up included (what a user waits for); runs alternate 1, 2, 2, 1, … The two
histories are compared (max |ΔPR|, max |Δr|): they must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| processes | wall s | measured | sum of load + measure s (all processes) |"


def checkpoints(folder: Path, tiny: bool) -> tuple[list[str], Path]:
    """Six checkpoint folders (steps 1…6) and a probe file."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lawwatch import ProbeSet

    size = (
        {"n_layer": 3, "n_embd": 16, "n_head": 2, "vocab_size": 97}
        if tiny
        else {"n_layer": 6, "n_embd": 256, "n_head": 4, "vocab_size": 2048}
    )
    config = GPT2Config(n_positions=128, **size)
    specs = []
    for step in range(1, 7):
        torch.manual_seed(step)
        path = folder / f"checkpoint-{step}"
        GPT2LMHeadModel(config).save_pretrained(path)
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        specs.append(str(path))
    rows, length = (8, 16) if tiny else (128, 128)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, size["vocab_size"], (rows, length), generator=gen)
    probe = ProbeSet.from_tokens(ids.tolist()).save(folder / "probe.safetensors")
    return specs, probe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep(processes: int, specs: list[str], probe: Path, out: Path) -> float:
    """One sweep as a fresh command; its wall time."""
    if processes == 1:
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node"]
        launcher += [str(processes), "--master_addr", "127.0.0.1"]
        launcher += ["--master_port", str(free_port())]
    cmd = [*launcher, "-m", "lawwatch", "analyze", *specs, "--probe", str(probe)]
    cmd += ["--out", str(out), "--no-report", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="pairs of sweeps (1 and 2)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    import numpy as np

    from lawwatch.output.store import read_history

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        specs, probe = checkpoints(folder, args.tiny)
        print(HEADER)
        print("|---|---|---|---|")
        order = [1, 2, 2, 1] * args.repeat
        histories: dict[int, list] = {}
        for i, processes in enumerate(order[: 2 * args.repeat]):
            out = folder / f"sweep-{i}"
            wall = sweep(processes, specs, probe, out)
            records = read_history(out).records
            spent = sum(r["seconds"] + r["load_seconds"] for r in records)
            histories[processes] = records
            print(f"| {processes} | {wall:.1f} | {len(records)} | {spent:.1f} |")
        one, two = histories[1], histories[2]
        pr = max(np.abs(np.subtract(a["pr"], b["pr"])).max() for a, b in zip(one, two, strict=True))
        r = max(abs(a["pearson_r"] - b["pearson_r"]) for a, b in zip(one, two, strict=True))
        print(f"1 vs 2 processes: max |dPR| {pr:.1e}, max |dr| {r:.1e}")


if __name__ == "__main__":
    main()
