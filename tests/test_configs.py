"""Every YAML under configs/ loads, names its recipe and its exact launch command.

Recipe configs: the sections the recipe reads exist, every model config field is a real field
of that model type (a misspelled field would silently build a default-size model), and the
model built on the meta device has the size its name promises. Launcher configs: accelerate's
own loader accepts them (it rejects unknown keys).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from transformers import AutoConfig, AutoModelForCausalLM

from lawwatch import MeasureConfig, WatchConfig
from tests.helpers.models import ragged_probe, tiny_gpt2
from tests.helpers.recipes import recipe_common

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
RECIPE_CONFIGS = [p for p in CONFIGS if p.parent.name == "configs"]
LAUNCHER_CONFIGS = [p for p in CONFIGS if p.parent.name == "accelerate"]
# parameter counts each name promises (with the 32768-token BPE the configs train)
SIZES = {
    "smoke_cpu.yaml": (1e4, 1e6),
    "gpt2_small.yaml": (100e6, 130e6),  # GPT-2 small: 124M with its own 50257-token vocabulary
    "llama_1b.yaml": (0.9e9, 1.3e9),
}


def header(path: Path) -> tuple[list[str], list[str]]:
    """(recipe paths, launch commands) from the comment block that opens the file."""
    lines = path.read_text().splitlines()
    first = re.match(r"# Recipes?: ", lines[0])
    assert first, f"{path} must open with '# Recipe: <path>' or '# Recipes: <path> <path>'"
    recipes = re.findall(r"recipes/\S+\.py", lines[0])
    assert recipes, f"{path}: no recipe path on its first line"
    launches = [re.sub(r"^# Launch[^:]*: ", "", ln) for ln in lines if ln.startswith("# Launch")]
    assert launches, f"{path} names no '# Launch: <command>' line"
    return recipes, launches


def test_configs_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert names >= {
        "smoke_cpu.yaml",
        "gpt2_small.yaml",
        "llama_1b.yaml",
        "accelerate/ddp.yaml",
        "accelerate/fsdp.yaml",
        "accelerate/deepspeed_zero3.yaml",
        "accelerate/cpu_2proc.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_header_names_recipe_and_launch(path):
    recipes, launches = header(path)
    for recipe in recipes:
        assert (ROOT / recipe).is_file(), f"{path}: recipe {recipe} does not exist"
        assert any(recipe in command for command in launches), f"{path}: no launch of {recipe}"
    this = path.relative_to(ROOT).as_posix()
    for command in launches:
        assert sum(recipe in command for recipe in recipes) == 1, f"{path}: {command}"
        flag = "--config_file" if path in LAUNCHER_CONFIGS else "--config"
        assert f"{flag} {this}" in command, f"{path}: the launch command must use {this}"
        for file in re.findall(r"(?:configs|recipes)/\S+", command):
            assert (ROOT / file).is_file(), f"{path}: {file} in the launch command is missing"


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: p.name)
def test_recipe_config_builds_the_promised_model(path):
    cfg = recipe_common().load_config(str(path), [])
    assert set(cfg) >= {"model", "data", "probe", "train", "lawwatch", "output"}
    spec = cfg["model"]
    defaults = AutoConfig.for_model(spec["type"])
    unknown = [key for key in spec.get("config", {}) if not hasattr(defaults, key)]
    assert not unknown, f"{path}: {unknown} are not fields of {type(defaults).__name__}"
    config = AutoConfig.for_model(
        spec["type"], vocab_size=cfg["data"]["vocab_size"], **spec.get("config", {})
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    low, high = SIZES[path.name]
    assert low <= params <= high, f"{path}: {params / 1e6:.1f}M parameters"
    assert cfg["probe"]["max_length"] <= cfg["data"]["seq_len"]
    # the lawwatch section names every measurement option (the defaults are there to be seen)
    watch, measure = recipe_common().watch_settings(cfg["lawwatch"])
    settings = {key: value for key, value in cfg["lawwatch"].items() if key != "measure"}
    assert watch == WatchConfig.from_dict(settings)
    assert set(cfg["lawwatch"]["measure"]) == set(MeasureConfig.names())
    assert measure.to_dict() == cfg["lawwatch"]["measure"]
    assert set(settings) <= {"every", "emergence_threshold", *recipe_common().MONITOR_SETTINGS}
    # every monitor setting is named (defaults to be seen) and reaches both integrations
    assert set(settings) == set(recipe_common().MONITOR_SETTINGS)
    from accelerate import Accelerator

    from lawwatch.integrations.accelerate import AcceleratorWatch
    from lawwatch.integrations.hf import LawWatchCallback

    probe, model = ragged_probe(), tiny_gpt2()
    integrations = {  # as the recipes pass them, and as keyword arguments
        "LawWatchCallback(watch)": lambda: LawWatchCallback(probe, measure, watch),
        "LawWatchCallback(**settings)": lambda: LawWatchCallback(probe, measure, **settings),
        "AcceleratorWatch(watch)": lambda: AcceleratorWatch(
            Accelerator(cpu=True), model, probe, measure, watch
        ),
        "AcceleratorWatch(**settings)": lambda: AcceleratorWatch(
            Accelerator(cpu=True), model, probe, measure, **settings
        ),
    }
    for label, build in integrations.items():
        assert build().watch == watch, label


def test_overrides_are_parsed_as_yaml():
    cfg = recipe_common().load_config(
        str(ROOT / "configs" / "smoke_cpu.yaml"), ["train.steps=7", "output.log_with=wandb"]
    )
    assert cfg["train"]["steps"] == 7 and cfg["output"]["log_with"] == "wandb"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_is_accepted_by_accelerate(path):
    config = load_config_from_file(str(path))
    kind = {
        "ddp.yaml": "MULTI_GPU",
        "fsdp.yaml": "FSDP",
        "deepspeed_zero3.yaml": "DEEPSPEED",
        "cpu_2proc.yaml": "MULTI_GPU",  # the launcher that forms a gloo group on CPU too
    }[path.name]
    assert config.distributed_type.value == kind
    if path.name == "cpu_2proc.yaml":
        assert config.num_processes == 2 and config.mixed_precision == "no"
        # the launcher does not hand use_cpu to the script: the recipe config must ask for CPU
        for command in header(path)[1]:
            recipe_config = re.search(r"--config (\S+)", command).group(1)
            cfg = recipe_common().load_config(str(ROOT / recipe_config), [])
            assert cfg["train"].get("cpu") is True, f"{command}: {recipe_config} lacks train.cpu"
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 3
        # "auto" lets the recipe's train.grad_accum decide; a fixed value would override it
        assert "gradient_accumulation_steps" not in config.deepspeed_config
