"""Where a snapshot runs: the process layout, the module the probe goes through, one vote.

Three facts of multi-process training shape a snapshot (docs/protocol.md §3):

* **Which module runs the probe.** A DDP (or DataParallel) wrapper is stripped: its forward
  would broadcast buffers, and the replicas hold the full weights anyway. Under FSDP (1 and 2)
  and DeepSpeed ZeRO-3 the weights are sharded and every forward is a collective that has to
  enter at the *root* module: its forward hooks gather the parameters no inner unit owns
  (embeddings, final norm), and FSDP2 makes the first module ever to run forward its root. The
  capture runs every Hugging Face model from its root, asking for the logits of one position.
* **The layout.** Rank, world size and the device that collective tensors live on (the CPU for
  gloo, the accelerator for NCCL), from an ``accelerate.Accelerator`` or an initialized
  ``torch.distributed`` process group, decided at call time.
* **One vote.** A rank that failed must not leave the others waiting in a collective:
  :func:`vote` combines every rank's outcome (and checks that all ranks measure the same step
  of the same probe), so all of them skip together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Layout:
    """The processes a snapshot runs on.

    Attributes:
        rank: This process's index.
        world: Number of processes.
        device: Where tensors handed to collectives must live (CPU for gloo).
    """

    rank: int
    world: int
    device: torch.device


def layout(accelerator: Any | None = None) -> Layout:
    """The current process layout: from ``accelerator`` if given, else ``torch.distributed``.

    Without an accelerator and without an initialized process group: one process on the CPU.
    """
    if accelerator is not None:
        return Layout(
            int(accelerator.process_index),
            int(accelerator.num_processes),
            torch.device(accelerator.device),
        )
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return Layout(0, 1, torch.device("cpu"))
    return Layout(dist.get_rank(), dist.get_world_size(), _collective_device())


def _collective_device() -> torch.device:
    """CPU when the default group can reduce CPU tensors (gloo), else the current accelerator."""
    backend = torch.distributed.get_backend()
    if backend == "gloo":
        return torch.device("cpu")
    # "nccl", "xccl", … or a mixed "cpu:gloo,cuda:nccl": the device backend is the fast one
    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        kind = torch.accelerator.current_accelerator()
        return torch.device(kind.type, torch.accelerator.current_device_index())
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def vote(ok: bool, where: Layout, **keys: int) -> str | None:
    """One collective decision: did every process succeed, with the same ``keys``?

    A single all-reduce (MAX) of ``[failed, k, -k, …]`` in float64 (keys must stay below
    2**53); every process gets the same result, so all of them decide alike. Every process
    must call it, whatever its outcome, the same number of times.

    Returns:
        None when every process succeeded and agrees on every key; otherwise the reason.
    """
    values = [0.0 if ok else 1.0]
    for key in keys.values():
        values += [float(key), -float(key)]
    flag = torch.tensor(values, dtype=torch.float64, device=where.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    reduced = flag.tolist()  # a host sync
    differ = [
        name
        for i, (name, key) in enumerate(keys.items())
        if reduced[1 + 2 * i] != key or reduced[2 + 2 * i] != -key  # max(k) == min(k)
    ]
    if differ:
        return f"the ranks disagree on {', '.join(differ)}"
    return "another rank failed" if reduced[0] > 0 else None


# -- the module a probe forward runs through --------------------------------------------------


def _fsdp_classes() -> tuple[type, ...]:
    """FSDP1's wrapper class and FSDP2's ``FSDPModule`` mixin (what this torch has of them)."""
    classes: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        classes.append(FullyShardedDataParallel)
    except ImportError:  # torch built without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:  # torch < 2.6
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            FSDPModule = None
    if FSDPModule is not None:
        classes.append(FSDPModule)
    return tuple(classes)


def _strip_replication(model: nn.Module) -> nn.Module:
    """Remove DDP / DataParallel / DeepSpeedEngine / ``torch.compile`` wrappers."""
    while True:
        replicated = isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel)
        if replicated or type(model).__name__ == "DeepSpeedEngine":  # DeepSpeed is optional
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s weights are sharded across processes (FSDP 1/2, DeepSpeed ZeRO-3).

    Raises:
        ValueError: Inner modules are FSDP-sharded but ``model`` itself is not the FSDP root,
            so no forward through it can gather every parameter.
    """
    fsdp = _fsdp_classes()
    if fsdp and isinstance(model, fsdp):
        return True
    if fsdp and any(isinstance(m, fsdp) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} holds FSDP-sharded modules but is not itself the FSDP root; "
            "pass LawWatch the model as the framework returned it (after accelerator.prepare, "
            "or after fully_shard on the whole model)."
        )
    first = next(model.parameters(), None)
    return first is not None and hasattr(first, "ds_id")  # a ZeRO-3 partitioned parameter


def measured_module(
    model: nn.Module, unwrap: Callable[[nn.Module], nn.Module] | None = None
) -> nn.Module:
    """The module a probe forward runs through, for ``model`` as training wraps it.

    Replication wrappers are stripped (DDP, DataParallel, DeepSpeedEngine, ``torch.compile``);
    anything else — a sharded FSDP or ZeRO-3 root included, whose forward the capture runs from
    the root with ``logits_to_keep=1`` — is returned as is.

    Raises:
        ValueError: Inner modules are FSDP-sharded but the model is not the FSDP root.

    Args:
        model: The model as the training framework holds it.
        unwrap: Applied first, for wrappers not recognized here.
    """
    if unwrap is not None:
        model = unwrap(model)
    model = _strip_replication(model)
    is_sharded(model)  # refuses a model whose shards no forward through it can gather
    return model
