"""Where a snapshot runs: the process layout, and one vote.

Two facts of multi-process training shape a snapshot (which module a probe forward runs
through is :func:`lawwatch.models.measured_module`'s business):

* **The layout.** Rank, world size and the device that collective tensors live on (the CPU for
  gloo, the accelerator for NCCL), from an ``accelerate.Accelerator`` or an initialized
  ``torch.distributed`` process group, decided at call time.
* **One vote.** A rank that failed must not leave the others waiting in a collective:
  :func:`vote` combines every rank's outcome (and checks that all ranks measure the same step
  of the same probe), so all of them skip together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


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
