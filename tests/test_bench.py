"""Every script under bench/ runs: each in its tiny mode (seconds), as a subprocess.

The numbers of a tiny run mean nothing; BENCHMARKS.md's come from the full runs. What is
checked is that the script still runs against the library as it is, end to end, and prints
its result.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

# script -> (arguments of its tiny mode, a line its output must contain)
TINY = {
    "bench_capture.py": (["--tiny", "--threads", "1"], "measure, layers=4"),
    "bench_e2e.py": (["--tiny", "--threads", "1"], "| 4 x 32 | 16 x 64 (1008) | 8 |"),
    "bench_floor.py": (["--tiny", "--threads", "1"], "| phase: solve |"),
    "bench_health.py": (["--tiny", "--threads", "1"], "| health (own): `HealthStats.add`"),
    "bench_overhead.py": (
        ["--tiny"],
        "training losses identical with and without the callback: True",
    ),
    "bench_lightning.py": (
        ["--tiny"],
        "training losses identical with and without the callback: True",
    ),
    "bench_memory.py": (["--tiny"], "| tiny | 5 × 32 |"),
    "bench_lens.py": (["--tiny"], "measure without lens"),
    "bench_residual.py": (["--tiny"], "| layers | n | d |"),
    "bench_solve.py": (["--tiny", "--threads", "1"], "| family | d | n | max abs PR diff"),
    "bench_sweep.py": (["--tiny", "--repeat", "1"], "1 vs 2 processes: max |dPR|"),
    # make gpu-check's script on CPU at tiny shapes: every part runs (the exit status says so)
    "gpu_check.py": (["--device", "cpu", "--tiny", "--threads", "1"], "gpu_check: every part ran."),
    "mixed_precision.py": (["--tiny"], "bf16 weights:"),
}
# bench_overhead: three processes, two of them training runs; bench_e2e: four processes;
# gpu_check: a Trainer run among its parts; bench_lightning: two Lightning fits; bench_sweep: a
# sweep by one process and one by torchrun's two
SLOW = {"bench_e2e.py", "bench_lightning.py", "bench_overhead.py", "bench_sweep.py", "gpu_check.py"}


def test_every_bench_script_has_a_tiny_run():
    assert sorted(p.name for p in BENCH.glob("*.py")) == sorted(TINY)


@pytest.mark.parametrize(
    "script",
    [pytest.param(s, marks=[pytest.mark.slow] if s in SLOW else []) for s in sorted(TINY)],
)
def test_bench_script_runs(script, tmp_path):
    args, expected = TINY[script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # whatever a script writes stays out of the checkout
        timeout=300,
    )
    assert done.returncode == 0, f"{script}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert expected in done.stdout, done.stdout[-2000:]
