"""The installed `lawwatch` console script, and config dataclasses as its options."""

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from lawwatch.cli.options import DataclassOptions


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


@dataclass(frozen=True)
class Knobs:
    """A config as any later one (a monitor's settings) will be: frozen, each field documented."""

    every: int = 100
    """Steps between two snapshots."""
    budget: float | None = None
    """Overhead budget, a fraction of training time."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    background: bool = False
    """Measure on a side thread."""
    names: tuple[str, ...] = ()
    """Names, one or more."""


def test_any_documented_dataclass_becomes_options_and_back():
    parser = argparse.ArgumentParser()
    options = DataclassOptions(Knobs, "knobs")
    options.add(parser, flags={"every": "snapshot_every"})
    assert options.build(parser.parse_args([])) == Knobs()
    argv = ["--snapshot-every", "5", "--budget", "0.1", "--mode", "b", "--background"]
    args = parser.parse_args([*argv, "--names", "x", "y"])
    assert options.build(args) == Knobs(5, 0.1, "b", True, ("x", "y"))
    help_text = parser.format_help()
    assert "Steps between two snapshots. (default: 100)" in help_text
    assert "--snapshot-every SNAPSHOT_EVERY" in help_text and "--mode {a,b}" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])


def test_a_field_without_a_command_line_spelling_is_named():
    @dataclass(frozen=True)
    class Composite:
        layers: int | tuple[int, ...] | None = None
        """Entries."""

    with pytest.raises(TypeError, match=r"Composite.layers .* give its parser"):
        DataclassOptions(Composite).add(argparse.ArgumentParser())
    options = DataclassOptions(Composite, overrides={"layers": {"type": int}})
    parser = argparse.ArgumentParser()
    options.add(parser)
    assert options.build(parser.parse_args(["--layers", "3"])) == Composite(3)
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        DataclassOptions(Composite, overrides={"nope": {}})
