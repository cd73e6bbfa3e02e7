"""What both pretraining recipes share: the YAML config, the data, the probe and the model.

``recipes/pretrain_accelerate.py`` (a custom loop) and ``recipes/pretrain_trainer.py`` (the
Hugging Face ``Trainer``) read the same ``configs/*.yaml`` files through these functions, so the
two build the same tokenizer, training blocks, probe and initial weights from one config.
Run as scripts, the recipes import this file as ``common`` (Python puts the script's folder
first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import glob
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, set_seed

import lawwatch
from lawwatch.demo import corpus


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    """The YAML file, with ``key.sub=value`` overrides applied (values parsed as YAML)."""
    config = yaml.safe_load(Path(path).read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key.sub=value, got {item!r}")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    return config


def config_from_cli(description: str) -> dict[str, Any]:
    """``--config FILE [--set key.sub=value ...]`` from the command line, loaded and overridden."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--tp",
        type=int,
        default=None,
        help="tensor-parallel size (train.tp): the model split over that many processes with "
        "its transformers tensor-parallel plan (the custom loop only; all processes)",
    )
    cli = parser.parse_args()
    config = load_config(cli.config, cli.set)
    if cli.tp is not None:
        config.setdefault("train", {})["tp"] = cli.tp
    return config


def check_launch(num_processes: int) -> None:
    """Refuse processes that were launched together but did not form one process group.

    ``accelerate launch --multi_gpu`` (or ``torchrun``) on a machine without GPUs starts every
    process, and each one, unless told to use the CPU, trains alone: N copies of one run
    writing to the same ``output.dir``. The launcher's ``WORLD_SIZE`` says how many were
    started; ``num_processes`` is how many joined the group.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > num_processes:
        raise SystemExit(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but did not form one "
            f"group (this one sees {num_processes}): each would train alone, into the same "
            "output.dir. Without GPUs, set train.cpu: true (--set train.cpu=true) so that they "
            "join over gloo."
        )


# the ``lawwatch:`` keys: the monitor's settings (the recipe sets last_step from train.steps)
MONITOR_SETTINGS = tuple(n for n in lawwatch.WatchConfig.names() if n != "last_step")


def watch_settings(
    section: dict[str, Any],
) -> tuple[lawwatch.WatchConfig, lawwatch.MeasureConfig]:
    """The ``lawwatch:`` section: the monitor's settings and the measurement options.

    Returns:
        The :class:`lawwatch.WatchConfig` built from the :data:`MONITOR_SETTINGS` given, and the
        :class:`lawwatch.MeasureConfig` built from ``measure:``. Names are checked and values
        validated: a misspelled or invalid setting stops the recipe before training.
    """
    settings = dict(section)
    config = lawwatch.MeasureConfig.from_dict(settings.pop("measure", None))
    unknown = set(settings) - set(MONITOR_SETTINGS)
    if unknown:
        raise SystemExit(
            f"lawwatch: {sorted(unknown)} are not monitor settings ({', '.join(MONITOR_SETTINGS)}"
            "); measurement options go under lawwatch.measure, the final step is train.steps."
        )
    try:
        watch = lawwatch.WatchConfig.from_dict(settings)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"lawwatch: {error}") from None
    return watch, config


def load_texts(source: str) -> list[str]:
    """``topics`` / ``docstrings`` / ``all`` (text shipped with CPython), or a glob of your own
    UTF-8 text files, one document per file."""
    if source in ("topics", "docstrings", "all"):
        return corpus.python_texts(source)
    paths = sorted(glob.glob(source, recursive=True))
    if not paths:
        raise SystemExit(f"data.source {source!r} is neither a CPython corpus nor a glob of files.")
    return [Path(p).read_text(encoding="utf-8") for p in paths]


class Data(NamedTuple):
    """What a recipe trains on and measures with."""

    tokenizer: PreTrainedTokenizerFast
    blocks: torch.Tensor  # (blocks, seq_len) token ids: documents joined by end-of-text
    probe: lawwatch.ProbeSet  # the held-out documents, truncated to probe.max_length


def prepare_data(
    cfg: dict[str, Any],
    out: Path,
    local_main_first: AbstractContextManager,
    is_local_main: bool,
) -> Data:
    """Split the documents, train the tokenizer, pack the train split, draw the probe.

    The BPE is trained once per machine, by its main process inside ``local_main_first``
    (``accelerator.local_main_process_first()`` or ``args.main_process_first(local=True)``), and
    saved to ``out/tokenizer``; the other processes load that copy. (Training is deterministic,
    and LawWatch's vote would catch processes whose probes differ.)
    """
    data, seed = cfg["data"], cfg["train"]["seed"]
    train_texts, heldout = corpus.split_texts(load_texts(data["source"]), data["heldout"], seed)
    where = out / "tokenizer"
    with local_main_first:
        if is_local_main:
            corpus.train_tokenizer(train_texts, data["vocab_size"]).save_pretrained(where)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(where)
    try:
        blocks = corpus.pack_texts(train_texts, tokenizer, data["seq_len"])
    except ValueError as error:
        raise SystemExit(str(error)) from None
    probe = lawwatch.ProbeSet.from_texts(
        heldout,
        tokenizer,
        max_length=cfg["probe"]["max_length"],
        num_texts=cfg["probe"].get("num_texts"),
        seed=seed,
    )
    return Data(tokenizer, blocks, probe)


def build_model(spec: dict[str, Any], tokenizer: Any, seed: int) -> torch.nn.Module:
    """Random weights from ``model.type`` and ``model.config``, seeded here: the same initial
    weights in every process and in both recipes.

    Build it after the ``Accelerator`` (or ``TrainingArguments``) exists, so that DeepSpeed
    ZeRO-3 can partition the weights as they are created.
    """
    ids = tokenizer.eos_token_id
    config = AutoConfig.for_model(
        spec["type"],
        vocab_size=len(tokenizer),
        bos_token_id=ids,
        eos_token_id=ids,
        pad_token_id=ids,
        **spec.get("config", {}),
    )
    set_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def tensor_parallel(model: torch.nn.Module, size: int, device: str) -> None:
    """Split ``model`` over ``size`` processes (every process of the job) with the column- and
    row-wise styles of its transformers tensor-parallel plan (``config.base_model_tp_plan``:
    attention and MLP); the embeddings, norms and head stay whole on every process.

    Raises:
        SystemExit: The model type has no such plan (GPT-2), or ``size`` is not the world size.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if size != world:
        raise SystemExit(
            f"--tp {size} needs {size} processes in one group (this job has {world}): the "
            "recipe runs tensor parallelism over every process, without data parallelism."
        )
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    prefix = model.base_model_prefix
    chosen = {f"{prefix}.{k}": styles[v]() for k, v in plan.items() if v in styles}
    if not chosen:
        raise SystemExit(
            f"--tp: {model.config.model_type} has no transformers tensor-parallel plan "
            "(config.base_model_tp_plan); use a model type that has one, e.g. llama."
        )
    mesh = init_device_mesh(device, (size,), mesh_dim_names=("tp",))
    parallelize_module(model, mesh, chosen)


def parameter_count(model: torch.nn.Module) -> int:
    """All parameters, ZeRO-3 partitioned ones at their full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def check_probe(probe: lawwatch.ProbeSet, model: torch.nn.Module) -> None:
    """Refuse a probe too small for the model's hidden size (every PR would be 0)."""
    hidden = model.config.hidden_size
    if probe.num_examples() <= hidden + 1:
        raise SystemExit(
            f"The probe has {probe.num_examples()} examples; hidden size {hidden} needs more "
            f"than {hidden + 1} (~{10 * hidden} for a low-noise PR): raise probe.num_texts, "
            "probe.max_length or data.heldout."
        )


def end_distributed(accelerator: Any) -> None:
    """Tear the process group down without the gloo exit deadlock.

    Left to interpreter exit (or destroyed while work is in flight), gloo's worker thread can
    need the GIL to release a finished collective while the main thread, destroying the process
    group, holds it: the process hangs. A barrier first drains that work; then the group goes.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    accelerator.end_training()
