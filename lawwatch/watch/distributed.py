"""Where a snapshot runs: the process layout, and the one vote that keeps ranks together.

Two facts of multi-process training shape a snapshot (which module a probe forward runs
through is :func:`lawwatch.models.measured_module`'s business):

* **The layout.** Rank, world size and the device that collective tensors live on (the CPU for
  gloo, the accelerator for NCCL), from an ``accelerate.Accelerator`` or an initialized
  ``torch.distributed`` process group, decided at call time. A process started as one of
  several (``WORLD_SIZE`` > 1, as torchrun and ``accelerate launch`` set it) that finds no
  multi-process group is warned once: it would measure and write as if alone.
* **Arrival, before any collective.** A rank that skips a snapshot the others take (a call
  under ``if master_process:``) is in another collective meanwhile, a gradient all-reduce say;
  had the others entered lawwatch's first collective, gloo would abort the run ("Received data
  size doesn't match expected size") and NCCL hang until its timeout. So every rank first checks
  in at the process group's key-value store (:class:`Arrivals`: no collective, so it cannot
  mismatch one): when every rank has arrived at the same step the snapshot goes on, else after
  a wait every rank that comes skips it, the missing ranks are named, and the ranks that did
  arrive return to training, where they meet the missing ones in the training's own
  collectives.
* **One vote.** Under FSDP and ZeRO-3 every probe forward is a collective, and the statistics
  are summed with one all-reduce, so a rank that failed must not leave the others waiting:
  :func:`vote` combines every rank's outcome, and checks that all ranks measure the same step
  of the same probe, so all of them skip together. Every rank must therefore call
  ``LawWatch.maybe_snapshot`` at the same steps: ranks out of step, or a vote that fails or
  times out, are reported on the ``"lawwatch"`` logger with the step and probe each rank
  expected and that rule (see ``docs/protocol.md``). The vote is always a float64 all-reduce
  of shape ``[7]``. :func:`together` is that vote followed, when every rank agrees, by the
  snapshot's collective.
* **Agreed times.** The overhead budget decides from the largest times over the processes
  (:func:`largest`), so every rank skips the same steps.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
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
        shard: This process's shard of the probe and the number of shards, when they are not
            ``(rank, world)``: on a tensor-parallel mesh the probe is dealt over the
            data-parallel dimension only (:mod:`lawwatch.watch.mesh`).
        group: The process group the statistics are reduced over (None: the default group,
            every process).
    """

    rank: int
    world: int
    device: torch.device
    shard: tuple[int, int] | None = None
    group: Any = None

    @property
    def shards(self) -> tuple[int, int]:
        """This process's shard of the probe, and how many shards there are."""
        return self.shard if self.shard is not None else (self.rank, self.world)


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

_CALL_ALIKE = (
    "Every rank must call LawWatch.maybe_snapshot (or snapshot) at the same steps with the same "
    "probe"
)
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


ARRIVAL_WAIT_S = 300.0
"""The longest a rank waits for the others at a snapshot (and at most half the process group's
timeout, so that a rank waiting in another collective is joined before torch gives up on it)."""

_MONITORS = itertools.count()  # monitors of this process, numbered alike on every rank


class Arrivals:
    """The check-in every rank passes before a snapshot's first collective.

    Each rank records its step and adds itself to a counter in the default process group's
    key-value store, under the monitor, step and attempt, and raises the monitor's furthest
    step. The rank that completes the count decides "go". A rank still waiting decides "skip"
    when the furthest step is past its own (a rank went on: it skipped this one), or after
    :meth:`wait_seconds`; one atomic compare-and-set makes the first decision every rank's, a
    late rank's too, and the rank that decided names the missing ranks. Going costs a few store
    round trips per rank; waiting polls two keys, less often as the wait goes on. Monitors are
    numbered in the order a process builds them, so every rank must build its monitors in the
    same order (as it does running the same script); a monitor whose steps go back (a state
    loaded again) starts a new generation of keys, on every rank alike.
    """

    def __init__(self) -> None:
        self._monitor = f"lawwatch/{next(_MONITORS)}"
        self._generation = 0
        self._last: int | None = None  # the step of this rank's latest check-in
        self._attempts: Counter[int] = Counter()  # a step snapshotted again is a new round

    @property
    def key(self) -> str:
        """The prefix of this monitor's keys, in its current generation."""
        return f"{self._monitor}/{self._generation}"

    def arrive(self, where: Layout, step: int) -> bool:
        """Whether every rank reached the snapshot at ``step`` (True on one process).

        Without a ``torch.distributed`` process group (an accelerator of another kind) there is
        no store to check in at: True, and the vote alone decides. A skip is logged, by the
        rank that decided it with the ranks that did not arrive and the step each called last.
        """
        store = _store() if where.world > 1 else None
        if store is None:
            return True
        if self._last is not None and step < self._last:  # rewound: keys of its own
            self._generation += 1
            self._attempts.clear()
        self._last = step
        attempt = self._attempts[step]
        self._attempts[step] += 1
        round_ = f"{self.key}/{step}/{attempt}"
        store.set(self._at(where.rank), str(step))
        store.set(f"{round_}/rank{where.rank}", "1")
        _raise_to(store, f"{self.key}/furthest", step)
        decided = f"{round_}/decision"
        if store.add(f"{round_}/arrived", 1) >= where.world:
            decision = store.compare_set(decided, "", "go")
        else:
            why = self._wait(store, where, step, decided)
            decision = store.compare_set(decided, "", f"skip:{where.rank}:{why}")
        text = decision.decode() if isinstance(decision, bytes) else str(decision)
        if text == "go":
            return True
        self._report(store, where, step, round_, text)
        return False

    def _at(self, rank: int) -> str:
        return f"{self.key}/at/{rank}"

    def _wait(self, store: Any, where: Layout, step: int, decided: str) -> str:
        """Wait for the decision; else say why this rank decides: ``ahead`` or the seconds."""
        wait = self.wait_seconds(store)
        deadline = time.monotonic() + wait
        delay = 0.005
        while not store.check([decided]):
            if int(store.get(f"{self.key}/furthest")) > step:
                return "ahead"  # a rank is at a later step: it skipped this one
            if time.monotonic() >= deadline:
                return f"{wait:g}"
            time.sleep(delay)
            delay = min(2 * delay, 0.25)
        return "decided"

    @staticmethod
    def wait_seconds(store: Any) -> float:
        """:data:`ARRIVAL_WAIT_S`, or half the process group's timeout if that is shorter."""
        timeout = getattr(store, "timeout", None)
        group = timeout.total_seconds() if isinstance(timeout, timedelta) else ARRIVAL_WAIT_S
        return max(0.1, min(ARRIVAL_WAIT_S, group / 2))

    def _report(self, store: Any, where: Layout, step: int, round_: str, decision: str) -> None:
        """Log why the snapshot at ``step`` is skipped (the rank that decided: who is missing)."""
        _, decider, why = [*decision.split(":"), "?", "?"][:3]
        gave_up = "another rank was at a later step" if why == "ahead" else f"after {why} s"
        if decider != str(where.rank):
            log.error(
                "lawwatch: snapshot at step %d skipped: rank %s stopped waiting for every rank "
                "to reach it (%s), and says which did not. %s.",
                step,
                decider,
                gave_up,
                _CALL_ALIKE,
            )
            return
        missing = []
        for rank in range(where.world):
            if store.check([f"{round_}/rank{rank}"]):
                continue
            at = self._at(rank)
            last = store.get(at).decode() if store.check([at]) else None
            missing.append(
                f"rank {rank} (no snapshot call yet)"
                if last is None
                else f"rank {rank} (its latest snapshot call: step {last})"
            )
        within = "" if why == "ahead" else f" within {why} s"
        log.error(
            "lawwatch: snapshot at step %d skipped: %s did not reach it%s. %s. A rank that "
            "skips a call (e.g. one made under `if master_process:`) is meanwhile in another "
            "collective, which lawwatch's first collective would have met (gloo aborts the run "
            'with "Received data size doesn\'t match expected size", NCCL waits for its '
            "timeout); so the ranks that came measure nothing this time and go back to training.",
            step,
            ", ".join(missing) or "a rank",
            within,
            _CALL_ALIKE,
        )


def _raise_to(store: Any, key: str, step: int) -> None:
    """Set ``key`` to ``step`` if it is absent or lower (compare-and-set: never lowered)."""
    current = store.compare_set(key, "", str(step))  # sets it when absent; returns the value
    while int(current) < step:
        seen = current.decode() if isinstance(current, bytes) else str(current)
        current = store.compare_set(key, seen, str(step))


def _store() -> Any | None:
    """The default process group's key-value store, or None without one."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # a group without a store (never for gloo or NCCL): the vote decides
        return None


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


def uneven_blocks(count: int, where: Layout) -> str | None:
    """Why the processes cannot be measured together, if they hold different numbers of blocks.

    One float64 all-reduce (MAX) of 2 elements, on every process at once (the first snapshot,
    after every process arrived): a pipeline's stages each hold some of the blocks, which a
    stage that looks whole (its blocks renumbered, its final norm kept) does not show alone.

    Returns:
        The reason (the same on every process), or None when every process holds ``count``.
    """
    most, least = largest([float(count), -float(count)], where)
    if most == -least:
        return None
    return (
        f"the processes hold between {int(-least)} and {int(most)} blocks (this one {count}): "
        "under pipeline parallelism each stage holds some of them, and lawwatch measures "
        "every block on each process; measure a checkpoint of the whole model instead "
        "(lawwatch analyze), see docs/scale.md"
    )
