"""LawWatch: measure the law on a schedule during training, on one process or many.

Every rank calls :meth:`LawWatch.maybe_snapshot` at the same steps. Each runs its shard of the
probe (all shards have the same number of batches: under FSDP and ZeRO-3 each forward is a
collective), the per-layer statistics are summed with one all-reduce, and rank 0 solves, fits
and writes to the sinks. A failure on any rank is decided collectively: every rank skips that
snapshot and training goes on. Nothing here touches gradients, the optimizer or the RNG state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lawwatch.capture import Normalize
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD, emergence_step, fit_law
from lawwatch.measure import MeasureTarget, Snapshot, accumulate, model_device
from lawwatch.probe import ProbeSet
from lawwatch.sinks import Sink, Sinks

log = logging.getLogger("lawwatch")


@dataclass(frozen=True)
class Schedule:
    """When to snapshot: step 0, powers of two below ``every``, then every ``every`` steps.

    Plus ``last`` (the final step) when known. The law emerges early in training, so the
    log-spaced early snapshots matter.

    Attributes:
        every: Period once past the log-spaced warm-up.
        last: The final step (always measured), if known.
    """

    every: int
    last: int | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be a positive number of steps, got {self.every}.")

    def __call__(self, step: int) -> bool:
        """Whether ``step`` is on the schedule."""
        if step < 0:
            return False
        if step == 0 or step % self.every == 0 or step == self.last:
            return True
        return step < self.every and step & (step - 1) == 0  # a power of two

    def steps(self, until: int) -> list[int]:
        """The scheduled steps in ``[0, until]``."""
        return [s for s in range(until + 1) if self(s)]


def _as_schedule(
    every: int, schedule: Callable[[int], bool] | Iterable[int] | None, last: int | None
) -> Callable[[int], bool]:
    if schedule is None:
        return Schedule(every, last)
    if callable(schedule):
        return schedule
    chosen = frozenset(int(s) for s in schedule)
    return chosen.__contains__


def _dist_info(accelerator: Any | None) -> tuple[int, int]:
    """(rank, world size), decided at call time: an Accelerator, else torch.distributed."""
    if accelerator is not None:
        return int(accelerator.process_index), int(accelerator.num_processes)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LawWatch:
    """Measure the law of equi-learning on a schedule while a model trains.

    Call :meth:`maybe_snapshot` after each optimizer step on every process, with the step
    count; it measures when the schedule says so.

    Args:
        model: The model being trained, as the training framework wraps it (DDP, FSDP, …).
        probe: The full probe set; each process measures its shard.
        every: Snapshot period after the log-spaced warm-up (see :class:`Schedule`).
        schedule: Instead of the default: a predicate ``step -> bool`` or a collection of steps.
        last_step: The final training step, always measured when reached.
        sinks: Where snapshots go (rank 0 only). Default: none (results are still returned).
        accelerator: An ``accelerate.Accelerator`` for the process layout; without one, an
            initialized ``torch.distributed`` process group is detected.
        normalize: As in :func:`lawwatch.measure`.
        target: As in :func:`lawwatch.measure`.
        batch_size: Probe sequences per forward pass.
        emergence_threshold: r at or below which the law counts as emerged.
        unwrap: Measure through this callable's result instead of ``model`` (e.g.
            ``accelerator.unwrap_model`` under DDP, whose wrapper would sync buffers). Leave
            None for FSDP and ZeRO-3, whose forward must run through the wrapper.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: ProbeSet,
        *,
        every: int = 100,
        schedule: Callable[[int], bool] | Iterable[int] | None = None,
        last_step: int | None = None,
        sinks: list[Sink] | Sinks | None = None,
        accelerator: Any | None = None,
        normalize: Normalize = "auto",
        target: MeasureTarget = "token_id",
        batch_size: int = 8,
        emergence_threshold: float = DEFAULT_EMERGENCE_THRESHOLD,
        unwrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        if len(probe) == 0:
            raise ValueError("The probe set is empty.")
        self.model, self.probe = model, probe
        self.schedule = _as_schedule(every, schedule, last_step)
        self.sinks = sinks if isinstance(sinks, Sinks) else Sinks(sinks)
        self.accelerator = accelerator
        self.options = {"normalize": normalize, "target": target, "batch_size": batch_size}
        self.emergence_threshold = emergence_threshold
        self.unwrap = unwrap
        self.history: list[dict[str, Any]] = []  # (step, rho, pearson_r) of every snapshot, rank 0
        self._shards: dict[tuple[int, int], ProbeSet] = {}

    # -- schedule -----------------------------------------------------------------------------

    def should_snapshot(self, step: int) -> bool:
        """Whether ``step`` is due and not already measured."""
        done = self.history[-1]["step"] if self.history else -1
        return step > done and self.schedule(step)

    def maybe_snapshot(self, step: int) -> Snapshot | None:
        """Snapshot if ``step`` is on the schedule; see :meth:`snapshot` for what is returned."""
        return self.snapshot(step) if self.should_snapshot(step) else None

    # -- measurement --------------------------------------------------------------------------

    def _shard(self, rank: int, world: int) -> ProbeSet:
        key = (rank, world)
        if key not in self._shards:
            self._shards[key] = self.probe if world == 1 else self.probe.shard(rank, world)
        return self._shards[key]

    def snapshot(self, step: int) -> Snapshot | None:
        """Measure now, on every process; collectively skip on any failure.

        Returns:
            On rank 0, the :class:`Snapshot` (also written to the sinks); on other ranks, and on
            every rank when the snapshot was skipped, None. Never raises for a measurement
            failure: it is logged and training goes on.
        """
        rank, world = _dist_info(self.accelerator)
        start = time.perf_counter()
        model = self.unwrap(self.model) if self.unwrap is not None else self.model
        devices = [model_device(model)] if model_device(model).type == "cuda" else []
        errors: list[BaseException] = []
        stats = None
        with torch.random.fork_rng(devices=devices):  # the RNG state is left as found
            try:
                stats = accumulate(model, self._shard(rank, world), errors=errors, **self.options)
            except Exception as error:  # the forward itself failed
                errors.append(error)
        if errors:
            log.error("lawwatch: rank %d could not measure step %d: %r", rank, step, errors[0])
        if world > 1 and not self._all_ok(not errors, model_device(model)):
            if rank == 0:
                log.error("lawwatch: snapshot at step %d skipped (a rank failed)", step)
            return None
        if errors:
            return None
        if world > 1:
            stats.all_reduce()  # the one large reduction of the snapshot
        if rank != 0:
            return None
        try:
            pr = stats.compute().cpu()
            snapshot = Snapshot(
                pr=pr,
                fit=fit_law(pr),
                n_tokens=int(stats.count.item()),
                seconds=time.perf_counter() - start,
                step=step,
            )
        except Exception as error:
            log.error("lawwatch: snapshot at step %d skipped: %s", step, error)
            return None
        self.history.append(
            {"step": step, "rho": snapshot.fit.rho, "pearson_r": snapshot.fit.pearson_r}
        )
        self.sinks.write(snapshot)
        return snapshot

    @staticmethod
    def _all_ok(ok: bool, device: torch.device) -> bool:
        """Collective AND of ``ok`` across ranks (gloo needs CPU tensors, NCCL device ones)."""
        backend = torch.distributed.get_backend()
        flag = torch.tensor([0.0 if ok else 1.0], device=device if backend == "nccl" else "cpu")
        torch.distributed.all_reduce(flag)
        return flag.item() == 0

    # -- summary and state --------------------------------------------------------------------

    @property
    def emergence_step(self) -> int | None:
        """First step from which r stays at or below the threshold (rank 0's history)."""
        return emergence_step(
            [h["step"] for h in self.history],
            [h["pearson_r"] for h in self.history],
            threshold=self.emergence_threshold,
        )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the snapshot history so far."""
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any], *, resume_step: int | None = None) -> None:
        """Restore the history, dropping entries after ``resume_step`` (they will be redone)."""
        history = [dict(h) for h in state.get("history", [])]
        if resume_step is not None:
            history = [h for h in history if h["step"] <= resume_step]
        self.history = history

    def close(self) -> None:
        """Close the sinks (end of training)."""
        self.sinks.close()
