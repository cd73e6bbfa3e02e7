"""The installed `lawwatch` console script."""

import subprocess
import sys
from pathlib import Path


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "lawwatch"
    assert script.exists(), "the lawwatch console script is missing: run `make install`"
    done = subprocess.run([str(script), "demo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--steps" in done.stdout and "--wandb {auto,online,offline,disabled}" in done.stdout
    done = subprocess.run([str(script)], capture_output=True, text=True)
    assert done.returncode == 2 and "demo" in done.stderr
