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


def test_offline_commands_are_installed():
    script = Path(sys.executable).parent / "lawwatch"
    done = subprocess.run([str(script), "analyze", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for option in ("--probe", "--step", "--gguf-file", "--device-map", "--wandb-project"):
        assert option in done.stdout
    # every measurement option, with its documentation as help
    assert "--target {token_id,token_id_shuffled,onehot}" in done.stdout
    assert "--probe-seed" in done.stdout and "--texts FILE_OR_GLOB" in done.stdout
    for command in (["report", "--help"], ["probe", "build", "--help"], ["probe", "show", "-h"]):
        done = subprocess.run([str(script), *command], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
