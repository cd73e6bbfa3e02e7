"""Where a snapshot runs: the process layout, and the one vote that keeps ranks together.

Two facts of multi-process training shape a snapshot (which module a probe forward runs
through is :func:`lawwatch.models.measured_module`'s business):

* **The layout.** Rank, world size and the device that collective tensors live on (the CPU for
  gloo, the accelerator for NCCL), from an ``accelerate.Accelerator`` or an initialized
  ``torch.distributed`` process group, decided at call time. A process started as one of
  several (``WORLD_SIZE`` > 1, as torchrun and ``accelerate launch`` set it) that finds no
  multi-process group is warned once: it would measure and write as if alone.
* **One vote.** Under FSDP and ZeRO-3 every probe forward is a collective, and the statistics
  are summed with one all-reduce, so a rank that failed must not leave the others waiting:
  :func:`vote` combines every rank's outcome, and checks that all ranks measure the same step
  of the same probe, so all of them skip together. Every rank must therefore call
  ``LawWatch.maybe_snapshot`` at the same steps: ranks out of step, or a vote that fails or
  times out, are reported on the ``"lawwatch"`` logger with the step and probe each rank
  expected and that rule (see ``docs/protocol.md``). The vote is always a float64 all-reduce
  of shape ``[7]``, so torch's own mismatch reports (``TORCH_DISTRIBUTED_DEBUG=DETAIL``, or
  gloo's "Received data size doesn't match expected size") that name it mean a rank skipped
  a snapshot the others took. :func:`together` is that vote followed, when every rank agrees,
  by the snapshot's collective.
* **Agreed times.** The overhead budget decides from the largest times over the processes
  (:func:`largest`), so every rank skips the same steps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("lawwatch")


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
    When the launcher started several processes (``WORLD_SIZE`` > 1 in the environment) but
    the layout holds one, a warning says so, once per process (see :func:`warn_unformed`).
    """
    if accelerator is not None:
        found = Layout(
            int(accelerator.process_index),
            int(accelerator.num_processes),
            torch.device(accelerator.device),
        )
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        dist = torch.distributed
        found = Layout(dist.get_rank(), dist.get_world_size(), _collective_device())
    else:
        found = Layout(0, 1, torch.device("cpu"))
    if found.world == 1:
        warn_unformed(accelerator)
    return found


_warned_unformed = False  # one warning per process, however many snapshots


def warn_unformed(accelerator: Any | None = None) -> bool:
    """Warn (once per process) when the launcher started several processes that hold no group.

    torchrun and ``accelerate launch`` set ``WORLD_SIZE`` in every process they start. If the
    layout still says one process, no process group was formed (``init_process_group`` not
    called, or an Accelerator created with a single-process configuration): every process
    would measure the whole probe and write its results as if alone.

    Returns:
        Whether the mismatch was found (warned now or before).
    """
    global _warned_unformed
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return False
    if world <= 1:
        return False
    if not _warned_unformed:
        _warned_unformed = True
        source = (
            f"the Accelerator passed to lawwatch ({type(accelerator).__name__}) reports "
            if accelerator is not None
            else "no torch.distributed process group is initialized, so lawwatch sees "
        )
        if accelerator is not None:
            fix = (
                "An Accelerator forms the group when it is created inside the launched "
                "processes (accelerate launch, torchrun) and, on a machine without GPUs, only "
                "when asked for the CPU: launch with ACCELERATE_USE_CPU=1 (`ACCELERATE_USE_CPU=1 "
                "accelerate launch --config_file configs/accelerate/cpu_2proc.yaml train.py`, "
                "the 2-process CPU launch lawwatch ships, see docs/scale.md) or create it as "
                "Accelerator(cpu=True)."
            )
        else:
            fix = (
                "Form the process group before the first snapshot: call "
                "torch.distributed.init_process_group() in every process, or pass the "
                "accelerate.Accelerator of a multi-process launch as LawWatch(accelerator=...)."
            )
        log.warning(
            "lawwatch: this process was started as one of WORLD_SIZE=%d, but %sa single "
            "process: each process trains alone and measures the whole probe. %s",
            world,
            source,
            fix,
        )
    return True


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


# A vote is a fixed-size float64 vector, all-reduced with MAX. Each key k goes in as (k, -k),
# so the result holds max(k) and -min(k): equal on every rank iff max == min. The marker pair
# tells a vote from another collective of the same size that a misaligned rank may be in.
_MARKER = 1_048_573.0  # a prime below 2**20: no plausible statistic or step lands on it
VOTE_SIZE = 7
"""Elements of every vote: marker, -marker, failed, step, -step, probe, -probe (float64)."""

_MUST = (
    "Every rank must call LawWatch.maybe_snapshot (or snapshot) at the same steps with the same "
    "probe: a rank that skips a call, calls it at another step, or runs another collective "
    "meanwhile leaves the others unmatched in this vote"
)


def vote(ok: bool, where: Layout, *, step: int, probe: int) -> str | None:
    """One collective decision: did every process succeed, at the same step, on the same probe?

    A single all-reduce (MAX) of :data:`VOTE_SIZE` float64 values, so every process gets the
    same result and all of them decide alike. Every process must call it, whatever its
    outcome, at the same steps. When the ranks are not aligned — another step or probe, a
    rank in a different collective, or the vote's collective failing or timing out — the
    ``"lawwatch"`` logger says what this rank expected and what every rank must call. A rank
    in a collective of another size cannot be answered here: gloo aborts the process that
    receives more data than it expects, NCCL waits for its timeout.

    Args:
        ok: This rank measured its shard without error.
        where: The process layout.
        step: The training step measured (below 2**53).
        probe: The probe's key (48 bits of its content hash).

    Returns:
        None when every process succeeded and agrees; otherwise the reason to skip.

    Raises:
        Exception: Whatever the collective raised (a timeout, a peer gone), after logging.
    """
    expected = f"step {step} of probe hash {probe:012x}…"  # content_hash()'s first 12 digits
    values = [_MARKER, -_MARKER, 0.0 if ok else 1.0, step, -step, probe, -probe]
    flag = torch.tensor(values, dtype=torch.float64, device=where.device)  # (VOTE_SIZE,)
    try:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        reduced = flag.tolist()  # a host sync
    except Exception as error:
        log.error(
            "lawwatch: rank %d's vote on %s failed (%s: %s); a timeout here means another "
            "rank never entered the vote, a mismatch that another rank was in a different "
            "collective (the vote is a float64 all-reduce of shape [%d]; "
            "TORCH_DISTRIBUTED_DEBUG=DETAIL makes torch name each rank's collective). %s.",
            where.rank,
            expected,
            type(error).__name__,
            error,
            VOTE_SIZE,
            _MUST,
        )
        raise
    if reduced[0] != _MARKER or reduced[1] != -_MARKER:
        log.error(
            "lawwatch: rank %d's vote on %s met a collective that is not lawwatch's vote on "
            "another rank. %s.",
            where.rank,
            expected,
            _MUST,
        )
        return "another rank was in a different collective"
    differ = []
    if reduced[3] != step or reduced[4] != -step:
        differ.append("step")
        log.error(
            "lawwatch: rank %d voted on %s, but the ranks voted on steps %d to %d. %s.",
            where.rank,
            expected,
            int(-reduced[4]),
            int(reduced[3]),
            _MUST,
        )
    if reduced[5] != probe or reduced[6] != -probe:
        differ.append("probe")
        log.error(
            "lawwatch: rank %d voted on %s, but another rank holds a different probe (content "
            "hash): build the probe identically on every rank (same data, seed and tokenizer) "
            "or load one saved file (ProbeSet.load).",
            where.rank,
            expected,
        )
    if differ:
        return f"the ranks disagree on {', '.join(differ)}"
    return "another rank failed" if reduced[2] > 0 else None


def together(
    ok: bool, where: Layout, step: int, probe: int, collective: Callable[[], Any]
) -> Any | None:
    """Vote, then (if every rank agrees) run ``collective`` on every rank.

    Returns its result, or None on every rank alike when the snapshot is skipped: a rank
    failed, or ``collective`` raised (the reductions and the sharded solve raise on every
    rank alike: too few examples, a constant target, a solve that failed on any rank). Never
    raises: the reason is logged.
    """
    try:
        reason = vote(ok, where, step=step, probe=probe)
        if reason is None:
            return collective()
    except Exception as error:  # decided on every rank alike, or a broken process group
        log.error("lawwatch: snapshot at step %d skipped: %r", step, error)
        return None
    if ok:  # a failed rank has said why already
        log.error("lawwatch: snapshot at step %d skipped: %s", step, reason)
    return None


def largest(values: list[float], where: Layout) -> list[float]:
    """The element-wise largest of ``values`` over the processes (as given on one process).

    One float64 all-reduce (MAX) of ``len(values)`` elements: every process must call it.
    """
    reduced = torch.tensor(values, dtype=torch.float64)
    if where.world > 1:
        reduced = reduced.to(where.device)
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
    return reduced.tolist()
