"""Tensor-parallel meshes: a float64 Llama split by ``parallelize_module`` equals one process.

Run by tests/test_mesh.py as ``torchrun --nproc_per_node N -m tests.helpers.workers.mesh_worker
OUT`` with N = 2 (a 1-D tensor-parallel mesh) and N = 4 (a 2 × 2 data × tensor mesh). Every
scenario runs in this one launch; each rank writes ``OUT/rank{r}.json`` with, per scenario, the
PRs, r, rho and the logit lens of ``LawWatch.snapshot`` and (rank 0) of ``lawwatch.measure`` on
an unsplit copy with the same weights. The scenarios: column/row-wise attention and MLP
(``tp``), the same with sequence parallelism on the norms (``sp``: local sequence shards between
blocks, DTensor norm outputs), a mesh whose data-parallel dimension is known only because the
parameters are replicated along it (``replica``, N = 4), background solves (``tp_background``),
transformers' ``tp_plan="auto"`` on a saved model (``auto``, N = 2), and the monitors refused
when built (``refused``: their messages).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from transformers import LlamaConfig, LlamaForCausalLM

import lawwatch
from lawwatch import ProbeSet
from tests.helpers.workers.common import TIMEOUT_S, setup, uneven_probe, write

OPTIONS = {"batch_size": 4, "lens": 1.0, "max_overhead": None}


def llama(seed: int = 0) -> LlamaForCausalLM:
    """A float64 Llama whose 4 query and 2 key/value heads split over 2 processes."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).double().eval()


def plan(model: LlamaForCausalLM, sequence: bool) -> dict:
    """Column/row-wise attention and MLP, a vocabulary-parallel head; with ``sequence``, the
    norms sequence parallel (the residual stream travels as local sequence shards)."""
    out = Shard(1) if sequence else Replicate()
    styles: dict = {}
    for i in range(len(model.model.layers)):
        at = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            styles[at + name] = ColwiseParallel()
        styles[at + "mlp.gate_proj"] = ColwiseParallel()
        styles[at + "mlp.up_proj"] = ColwiseParallel()
        styles[at + "self_attn.o_proj"] = RowwiseParallel(output_layouts=out)
        styles[at + "mlp.down_proj"] = RowwiseParallel(output_layouts=out)
        if sequence:
            styles[at + "input_layernorm"] = SequenceParallel()
            styles[at + "post_attention_layernorm"] = SequenceParallel()
            styles[at + "self_attn"] = PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
                use_local_output=True,
            )
            styles[at + "mlp"] = PrepareModuleInput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                use_local_output=True,
            )
    if sequence:
        styles["model.layers.0"] = PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
        )
        styles["model.norm"] = SequenceParallel()
        styles["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    else:  # logits sharded over the vocabulary
        styles["lm_head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    return styles


def summary(snapshot) -> dict | None:
    """PRs, r, rho, the lens and the examples of a snapshot (or a history record)."""
    if snapshot is None:
        return None
    record = snapshot if isinstance(snapshot, dict) else snapshot.to_record()
    keys = {"pr": "pr", "r": "pearson_r", "rho": "rho", "lens": "lens", "n": "n_tokens"}
    return {short: record.get(key) for short, key in keys.items()}


def even_probe() -> ProbeSet:
    """8 rows of 24 tokens: every process's shard has the same shape (the issue's case, where
    feeding the ranks of a tensor-parallel group different rows ran, but measured wrong)."""
    gen = torch.Generator().manual_seed(11)
    return ProbeSet.from_tokens(torch.randint(1, 97, (8, 24), generator=gen).tolist())


def measured(model, tp_mesh, sequence: bool, probe=None, **options) -> dict | None:
    parallelize_module(model, tp_mesh, plan(model, sequence))
    watch = lawwatch.LawWatch(model, probe or uneven_probe(), **OPTIONS, **options)
    snapshot = watch.snapshot(0)
    watch.close()
    if options.get("background"):
        snapshot = watch.history[-1] if watch.history.records else None
    result = summary(snapshot)
    if result is not None:  # this process's shard of the probe, and how many there are
        result["shards"] = list(watch._where().shards)
    return result


def refusal(build) -> str | None:
    try:
        build()
    except ValueError as error:
        return str(error)
    return None


def main() -> None:
    out = setup()
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict = {"world": world}
    if rank == 0:
        plain = lawwatch.measure(llama(), uneven_probe(), batch_size=4, lens=1.0)
        results["reference"] = summary(plain)
        even = lawwatch.measure(llama(), even_probe(), batch_size=4, lens=1.0)
        results["reference_even"] = summary(even)
    if world == 2:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        tp = mesh
    else:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        tp = mesh["tp"]
    results["tp"] = measured(llama(), tp, sequence=False)
    results["even"] = measured(llama(), tp, sequence=False, probe=even_probe())
    results["sp"] = measured(llama(), tp, sequence=True)
    results["tp_background"] = measured(llama(), tp, sequence=True, background=True)
    if world == 4:  # no dimension named data parallel: the replicated one is
        other = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replica", "tp"))
        results["replica"] = measured(llama(), other["tp"], sequence=True)
    if world == 2:
        results["auto"] = auto(out)
    results["refused"] = refused(world)
    results["stages"] = stages(rank)
    write(out, rank, results)
    dist.destroy_process_group()


def auto(out: Path) -> dict | None:
    """transformers' ``tp_plan="auto"`` on a saved float64 Llama."""
    saved = out / "saved"
    if dist.get_rank() == 0:
        llama().save_pretrained(saved)
    dist.barrier()
    model = LlamaForCausalLM.from_pretrained(saved, tp_plan="auto", dtype=torch.float64).eval()
    watch = lawwatch.LawWatch(model, uneven_probe(), **OPTIONS)
    snapshot = watch.snapshot(0)
    watch.close()
    result = summary(snapshot)
    if result is not None:
        result["dtensor"] = type(model.model.layers[0].self_attn.q_proj.weight).__name__
    return result


def refused(world: int) -> dict:
    """The monitors a mesh lawwatch cannot measure exactly refuses when built (messages)."""
    probe = uneven_probe()
    said: dict = {}
    split = llama()
    parallelize_module(
        split, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), plan(split, False)
    )
    context = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    said["cp"] = refusal(lambda: lawwatch.LawWatch(split, probe, mesh=context))
    said["data_parallel"] = refusal(lambda: lawwatch.LawWatch(split, probe, data_parallel="dp"))
    stage = llama()
    stage.model.norm = None  # a first pipeline stage: no final norm here
    said["pipeline"] = refusal(lambda: lawwatch.LawWatch(stage, probe))
    gap = llama()
    del gap.model.layers[3]
    gap.model.layers[2] = torch.nn.Identity()
    said["identity"] = refusal(lambda: lawwatch.LawWatch(gap, probe))
    return said


def stages(rank: int) -> dict:
    """Processes holding different numbers of blocks (a stage that looks whole alone): the
    first snapshot's collective finds it, every process skips, and later ones skip at once."""
    said: list[str] = []

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    model = llama()
    if rank == 1:
        del model.model.layers[3]
    handler = Said()
    logging.getLogger("lawwatch").addHandler(handler)
    try:
        watch = lawwatch.LawWatch(
            model, uneven_probe(), batch_size=4, max_overhead=None, blocks="model.layers"
        )
        first, second = watch.snapshot(0), watch.snapshot(1)
        watch.close()
    finally:
        logging.getLogger("lawwatch").removeHandler(handler)
    return {"skipped": [first is None, second is None], "said": said}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
