"""FSDP2 ``fully_shard`` on a plain gloo process group, no accelerator.

Run by tests/test_distributed.py as
``torchrun --nproc_per_node 2 -m tests.helpers.workers.fsdp_worker OUT``.
Two layouts: (a) a Llama (RMSNorm) with every decoder layer and the root sharded; (b) a GPT-2
(LayerNorm, tied embeddings) laid out as accelerate's FSDP2 plugin does it: blocks, a
``[final norm, embeddings, LM head]`` group kept unsharded after forward, then the root. The
first snapshot runs before any training forward (the probe's forward is then the first the
root ever sees). References: ``lawwatch.measure`` on rank 0 with an unsharded copy holding
the same weights (the full state dict gathered after training). Models are float64 so that the
comparison sees the reduction, not float32 differences between batch shapes.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

import lawwatch
from lawwatch.capture import Capture
from lawwatch.models import is_sharded, measured_module
from lawwatch.probe import example_mask
from tests.helpers.models import VOCAB, tiny_gpt2, tiny_llama
from tests.helpers.workers.common import TIMEOUT_S, poison, pr_list, setup, uneven_probe, write


def train_step(model, optimizer, rank: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed + rank)
    batch = torch.randint(1, VOCAB, (4, 16), generator=gen)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def full_copy(model, template, rank: int):
    """On rank 0, an unsharded module with ``model``'s current weights (every rank calls)."""
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )  # only rank 0 receives the full state
    if rank != 0:
        return None
    plain = copy.deepcopy(template)
    plain.load_state_dict(state)
    return plain


def run(name, model, shard, rank, probe, results, poison_at: str) -> None:
    template = copy.deepcopy(model)
    reference = lawwatch.measure(model, probe).pr.tolist() if rank == 0 else None
    results[f"{name}_half_sharded"] = shard(model)
    results[f"{name}_root_is_fsdp"] = isinstance(model, FSDPModule)
    results[f"{name}_measured_as_is"] = measured_module(model) is model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    watch = lawwatch.LawWatch(model, probe, max_overhead=None, every=1, batch_size=2)
    results[f"{name}_step0"] = pr_list(watch.maybe_snapshot(0))
    # the final norm's pre-hook fires inside the sharded forward: the last entry's features are
    # made from its input only (a capture whose pre-hook missed raises), so their shape is that
    # of the input it took there
    capture = Capture(measured_module(model))
    ids, mask = next(probe.batches(2))
    positions = example_mask(mask)
    with torch.no_grad():
        features = capture(ids, mask, positions)  # (entries, n, d)
    shape = list(features[-1].shape)
    results[f"{name}_hooked"] = shape == [int(positions.sum()), model.config.hidden_size]
    results[f"{name}_ref0"] = reference
    results[f"{name}_loss1"] = train_step(model, optimizer, rank, seed=1)
    # rank 1's features turn non-finite; its forwards must still run (each is a collective)
    block = model.get_submodule(poison_at)
    handle = block.register_forward_hook(poison) if rank == 1 else None
    results[f"{name}_failed1"] = pr_list(watch.maybe_snapshot(1))
    if handle is not None:
        handle.remove()
    results[f"{name}_loss2"] = train_step(model, optimizer, rank, seed=2)
    results[f"{name}_step2"] = pr_list(watch.maybe_snapshot(2))
    plain = full_copy(model, template, rank)
    results[f"{name}_ref2"] = lawwatch.measure(plain, probe).pr.tolist() if rank == 0 else None
    results[f"{name}_loss3"] = train_step(model, optimizer, rank, seed=3)  # training goes on


def shard_llama(model) -> str:
    """Layers, then the root; returns what lawwatch said in between (a half-sharded model)."""
    for layer in model.model.layers:
        fully_shard(layer)
    try:
        is_sharded(model)
        half = "accepted"
    except ValueError as error:
        half = str(error)
    fully_shard(model)
    return half


def shard_gpt2_like_accelerate(model) -> str:
    for block in model.transformer.h:
        fully_shard(block)
    tail = [model.transformer.ln_f, model.transformer.wte, model.lm_head]  # tied embeddings
    fully_shard(tail, reshard_after_forward=False)
    fully_shard(model)
    return ""


def precision(rank: int, probe, results: dict) -> None:
    """Float32 GPT-2s, every block and the root sharded: one without a mixed-precision policy,
    one whose policy gathers the weights in bf16. A snapshot taken inside a bf16 autocast
    region (the user's own) equals one taken outside: autocast is off for the probe forward;
    the policy's bf16 is the sharding's, measured and recorded as such."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for name, mp in (("float32", None), ("policy", policy)):
        model = tiny_gpt2(seed=2)
        options = {} if mp is None else {"mp_policy": mp}
        for block in model.transformer.h:
            fully_shard(block, **options)
        fully_shard(model, **options)
        watch = lawwatch.LawWatch(model, probe, max_overhead=None, every=1, batch_size=2)
        outside = watch.snapshot(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = watch.snapshot(1)
        results[f"{name}_outside"], results[f"{name}_inside"] = pr_list(outside), pr_list(inside)
        results[f"{name}_precision"] = outside.extra.get("precision")


def main() -> None:
    out = setup()
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    rank = dist.get_rank()
    probe = uneven_probe()
    results: dict = {"world": dist.get_world_size()}
    llama = tiny_llama(seed=0).double()
    run("llama", llama, shard_llama, rank, probe, results, "model.layers.1")
    gpt2 = tiny_gpt2(seed=1).double()
    run("gpt2", gpt2, shard_gpt2_like_accelerate, rank, probe, results, "transformer.h.2")
    precision(rank, probe, results)
    write(out, rank, results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
