"""Sweeps across processes: ``torchrun --nproc_per_node N -m lawwatch analyze …``.

Launched by torchrun or ``accelerate launch`` (``WORLD_SIZE`` above 1), ``lawwatch analyze``
deals the checkpoints over the processes; each is measured whole by one process, on its own
device (``cuda:LOCAL_RANK`` with CUDA, else the CPU), with no collective inside a
measurement. The main process (rank 0) alone writes files: it decides what to measure (the
one-process sweep's rules: steps already recorded from the same weights are skipped, weights
already measured are copied, a checkpoint still being written is left), deals the rest
round-robin in step order, measures its own share, and records every result in one
``history.jsonl`` (steps increasing), then the report. Progress and messages come from it only.

How results travel: each other process writes the outcome of each checkpoint (the record, or
why it failed) atomically as ``sweep-parts/step-<N>.json`` in the output directory; the main
process records it in the history and removes the file. A process killed mid-sweep (torchrun
then stops the others) loses only the checkpoint it was measuring: the sweep run again records
the outcomes left in ``sweep-parts/`` first (:attr:`~lawwatch.analyze.SweepResult.recovered`)
and measures only what no process measured. A checkpoint that fails on any process is reported
by the main process and the sweep goes on; a process that stops on an error says so in its
``rank-<r>.done`` marker and its checkpoints are reported failed (nothing waits for it). The
only collective is the plan's broadcast (gloo, before any measurement); the output directory
must be one folder every process sees (one machine, or a shared file system).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from lawwatch.analyze import (
    HASH_FILE,
    Job,
    Outcome,
    SweepResult,
    _already,
    _copy,
    _CountedProbe,
    _empty_cuda_cache,
    _fail,
    _leave_unfinished,
    _local_weights,
    _measure_job,
    _on_terminal,
    _record,
    _settle,
    _sweep_one,
    _transformers_bars,
    check_compatible,
    in_order,
)
from lawwatch.checkpoints import Checkpoint, HashCache, LoadOptions
from lawwatch.config import MeasureConfig
from lawwatch.history import History, Snapshot, identity
from lawwatch.output.files import replace_file
from lawwatch.output.store import LocalHistory, keep_probe
from lawwatch.probe import ProbeSet

__all__ = ["PARTS_DIR", "Team", "join", "lead", "serve"]

log = logging.getLogger("lawwatch")

PARTS_DIR = "sweep-parts"
"""The folder of the output directory the other processes write their outcomes into."""

_ID_FILE = "sweep.id"  # the sweep's id: a process that reads it sees the main one's folder
_POLL_SECONDS = 0.1
_PLAN_TIMEOUT = timedelta(days=7)  # rank 0 hashes every checkpoint before it deals them


@dataclass
class Team:
    """The processes of a sweep launched by torchrun or ``accelerate launch``.

    Attributes:
        rank: This process's rank (0: the main process, which writes the files).
        world: The number of processes.
        local_rank: Its rank on its machine (its GPU, with CUDA).
    """

    rank: int
    world: int
    local_rank: int
    _sent: bool = field(default=False, repr=False)

    @property
    def main(self) -> bool:
        """Whether this is the main process."""
        return self.rank == 0

    def send(self, plan: _Plan | None) -> None:
        """The main process: hand the plan (None: nothing to do) to the others, once."""
        import torch.distributed as dist

        if self._sent:
            return
        self._sent = True
        if self.world > 1:
            dist.broadcast_object_list([plan], src=0)

    def receive(self) -> _Plan | None:
        """Another process: the main process's plan (None: it stopped before dealing)."""
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def cancel(self) -> None:
        """The main process stopped before dealing (bad arguments): the others end too."""
        self.send(None)

    def close(self) -> None:
        """Leave the process group."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def join() -> Team | None:
    """The sweep's processes, when launched as several (``WORLD_SIZE`` > 1), else None.

    Joins (or reuses) the default process group, on gloo: it carries only the plan.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=_PLAN_TIMEOUT)
    return Team(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def own_device(load: LoadOptions, local_rank: int) -> LoadOptions:
    """``load`` on this process's own device: ``cuda:LOCAL_RANK`` for no device or 'cuda'.

    A device named with its index is used as given; without CUDA the CPU (as one process).

    Raises:
        ValueError: More processes on this machine (``LOCAL_WORLD_SIZE``) than GPUs.
    """
    import torch

    if load.device not in (None, "cuda") or not torch.cuda.is_available():
        return load
    count = torch.cuda.device_count()
    here = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    if max(here, local_rank + 1) > count:
        raise ValueError(
            f"{here} processes on this machine and {count} GPU(s): each process of a sweep "
            f"measures on its own GPU (cuda:LOCAL_RANK). Launch at most {count} per machine "
            f"(--nproc_per_node {count}), or give --device cpu (or one GPU, e.g. cuda:0, that "
            "every process shares)."
        )
    return replace(load, device=f"cuda:{local_rank}")


@dataclass
class _Plan:
    """What the main process deals: every process's jobs and what they are measured with."""

    out: str
    token: str
    probe: ProbeSet
    config: MeasureConfig
    load: LoadOptions
    given: dict[str, Any]
    known: set[str]
    work: list[list[Job]]


class _Parts:
    """The outcomes the other processes hand over, as files in ``<out>/sweep-parts/``."""

    def __init__(self, out: Path) -> None:
        self.folder = out / PARTS_DIR

    def write(self, step: int, outcome: Outcome) -> None:
        """Write one checkpoint's outcome, atomically."""
        part = {
            "step": step,
            "kind": outcome.kind,
            "record": None if outcome.snapshot is None else outcome.snapshot.to_record(),
            "weights": outcome.weights,
            "reason": outcome.reason,
        }
        replace_file(self.folder / f"step-{step}.json", json.dumps(part).encode())

    def ready(self) -> list[tuple[int, Outcome]]:
        """The outcomes written so far, steps increasing."""
        found = []
        for path in self.folder.glob("step-*.json"):
            try:
                part = json.loads(path.read_text())
            except (OSError, ValueError):  # written atomically: only a removed file
                continue
            record = part.get("record")
            snapshot = None if record is None else Snapshot.from_record(record)
            found.append(
                (
                    int(part["step"]),
                    Outcome(part["kind"], snapshot, part["weights"], part["reason"]),
                )
            )
        return sorted(found, key=lambda item: item[0])

    def remove(self, step: int) -> None:
        """Forget a recorded outcome."""
        (self.folder / f"step-{step}.json").unlink(missing_ok=True)

    def done(self, rank: int, error: str | None) -> None:
        """Say that process ``rank`` has ended its share (``error``: why it stopped early)."""
        replace_file(self.folder / f"rank-{rank}.done", json.dumps({"error": error}).encode())

    def ended(self) -> dict[int, str | None]:
        """The processes that ended their share, with the error that stopped each, if any."""
        found: dict[int, str | None] = {}
        for path in self.folder.glob("rank-*.done"):
            with contextlib.suppress(OSError, ValueError):
                found[int(path.name[5:-5])] = json.loads(path.read_text()).get("error")
        return found

    def finish(self) -> None:
        """After the sweep: the markers removed, and the folder if nothing else is in it."""
        for path in [*self.folder.glob("rank-*.done"), self.folder / _ID_FILE]:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()

    def start(self) -> str:
        """Before dealing: the folder made, an earlier sweep's leftovers but its outcomes removed.

        Its markers and its killed writers' temporary files go.

        Returns:
            This sweep's id, written in the folder: a process that reads another one does not
            see the main process's folder.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        for pattern in ("rank-*.done", ".*.tmp"):
            for path in self.folder.glob(pattern):
                path.unlink(missing_ok=True)
        token = uuid.uuid4().hex
        replace_file(self.folder / _ID_FILE, token.encode())
        return token

    def seen(self, token: str) -> bool:
        """Whether this process sees the folder the main process wrote ``token`` in."""
        try:
            return (self.folder / _ID_FILE).read_text() == token
        except OSError:
            return False


def _recover(
    parts: _Parts, local: LocalHistory, probe_hash: str, config: MeasureConfig
) -> list[int]:
    """Record what a stopped sweep measured but never recorded; remove its other outcomes.

    Returns:
        The steps recorded.
    """
    recovered = []
    for step, outcome in parts.ready():
        held = {r["step"] for r in local.records}
        if outcome.kind == "measured" and outcome.snapshot is not None and step not in held:
            record = outcome.snapshot.to_record()
            try:
                check_compatible(History([record]), probe_hash, config)
            except ValueError as error:
                log.warning("lawwatch analyze: %s left unrecorded: %s", parts.folder, error)
            else:
                _record(local, outcome.snapshot)
                recovered.append(step)
        parts.remove(step)  # failed and unfinished ones are tried again
    return recovered


def lead(
    team: Team,
    checkpoints: Sequence[Checkpoint],
    probe: ProbeSet,
    out: str | Path,
    config: MeasureConfig | None = None,
    *,
    load: LoadOptions | None = None,
    progress: bool | None = None,
) -> SweepResult:
    """The main process's sweep: :func:`lawwatch.analyze.analyze`, the measuring dealt out.

    The other processes run :func:`serve`. Arguments, result and refusals are
    :func:`~lawwatch.analyze.analyze`'s; the result's ``failed`` also lists the checkpoints of
    a process that stopped on an error.

    Raises:
        ValueError: What :func:`~lawwatch.analyze.analyze` refuses, and ``device_map`` (it
            spreads one model over every GPU; here each process measures on its own).
    """
    try:
        config = MeasureConfig.build(config)
        dealt = load or LoadOptions()  # each process places it on its own device
        load = own_device(dealt, team.local_rank)
        if load.device_map:
            raise ValueError(
                f"--device-map {load.device_map} spreads one model over every GPU, but a sweep "
                f"across {team.world} processes measures each checkpoint on its process's own "
                "device: launch one process for device_map, or leave it out."
            )
        ordered = in_order(checkpoints)
        out = Path(out)
        local = LocalHistory(out)
        probe_hash = probe.content_hash()
        parts = _Parts(out)
        token = parts.start()
        result = SweepResult(recovered=_recover(parts, local, probe_hash, config))
        check_compatible(History(local.records), probe_hash, config)
        keep_probe(probe, out, local.history)
        cache = HashCache(out / HASH_FILE)
        given = identity(probe_hash, config.to_dict())
        with _bars(len(ordered), progress) as (outer, bar):
            counted = _CountedProbe(probe, bar)
            todo, later = _plan(ordered, cache, local, result, outer)
            work = [todo[rank :: team.world] for rank in range(team.world)]
            known = {r["weights"] for r in local.records if r.get("weights")}
            team.send(_Plan(str(out), token, probe, config, dealt, given, known, work))
            pending = {job.ckpt.step: job for jobs in work[1:] for job in jobs}
            owner = {job.ckpt.step: rank for rank, jobs in enumerate(work) for job in jobs}

            def collect() -> None:
                for step, outcome in parts.ready():
                    job = pending.pop(step, None)
                    if job is not None:
                        _settle_counted(job.ckpt, outcome, local, result, outer)
                    parts.remove(step)

            for job in work[0]:
                outer.set_postfix_str(f"step {job.ckpt.step}")
                outcome = _attempt(job, counted, config, load, cache, given, known)
                _settle_counted(job.ckpt, outcome, local, result, outer)
                collect()
            outer.set_postfix_str("waiting for the other processes")
            while pending:
                ended = parts.ended()
                collect()
                stopped = {rank: error for rank, error in ended.items() if rank in owner.values()}
                for step, job in list(pending.items()):
                    if owner[step] in stopped:  # it ended, and nothing of this step came
                        reason = stopped[owner[step]] or "it ended without measuring it"
                        del pending[step]
                        why = f"process {owner[step]} stopped: {reason}"
                        _settle_counted(
                            job.ckpt, Outcome("failed", reason=why), local, result, outer
                        )
                if pending:
                    time.sleep(_POLL_SECONDS)
            for ckpt in later:  # weights another checkpoint of this sweep holds: copied
                try:
                    _sweep_one(ckpt, counted, config, load, cache, local, given, result)
                except Exception as error:
                    _fail(ckpt, f"{type(error).__name__}: {error}", result)
                outer.update(1)
        parts.finish()
    finally:
        team.cancel()  # the plan was sent already, or never will be: the others end
    result.history = History(local.records)
    return result


def _plan(
    ordered: list[Checkpoint],
    cache: HashCache,
    local: LocalHistory,
    result: SweepResult,
    outer: Any,
) -> tuple[list[Job], list[Checkpoint]]:
    """The one-process sweep's decisions, before any loading.

    Returns:
        The jobs to deal, and the checkpoints holding the weights of one of them (copied once
        it is measured).
    """
    todo: list[Job] = []
    later: list[Checkpoint] = []
    planned: set[str] = set()
    for ckpt in ordered:
        try:
            weights, before = None, None
            if ckpt.local:
                found = _local_weights(ckpt, cache)
                if isinstance(found, str):
                    _leave_unfinished(ckpt, found, result)
                    outer.update(1)
                    continue
                weights, before = found
            if _already(ckpt, weights, local, result) or (
                weights is not None and _copy(ckpt, weights, local, result)
            ):
                outer.update(1)
                continue
            if weights is not None and weights in planned:
                later.append(ckpt)
                continue
            if weights is not None:
                planned.add(weights)
            todo.append(Job(ckpt, weights, before))
        except Exception as error:  # reported; the sweep goes on
            _fail(ckpt, f"{type(error).__name__}: {error}", result)
            outer.update(1)
    return todo, later


def _attempt(
    job: Job,
    probe: ProbeSet,
    config: MeasureConfig,
    load: LoadOptions,
    cache: HashCache,
    given: dict[str, Any],
    known: set[str],
) -> Outcome:
    """:func:`~lawwatch.analyze._measure_job`, a failure kept as an outcome."""
    try:
        return _measure_job(job, probe, config, load, cache, given, known)
    except Exception as error:
        return Outcome("failed", reason=f"{type(error).__name__}: {error}")
    finally:
        gc.collect()
        _empty_cuda_cache()


def _settle_counted(
    ckpt: Checkpoint, outcome: Outcome, local: LocalHistory, result: SweepResult, outer: Any
) -> None:
    """Record one outcome (a failure to record reported as the checkpoint's), tick the bar."""
    try:
        _settle(ckpt, outcome, local, result)
    except Exception as error:
        _fail(ckpt, f"{type(error).__name__}: {error}", result)
    outer.update(1)


@contextlib.contextmanager
def _bars(total: int, progress: bool | None) -> Iterator[tuple[Any, Any]]:
    """The progress bars :func:`~lawwatch.analyze.analyze` shows (and transformers' own)."""
    from tqdm.auto import tqdm

    disable = None if progress is None else not progress
    shown = _on_terminal() if progress is None else progress
    with (
        _transformers_bars(shown),
        tqdm(total=total, desc="checkpoints", unit="ckpt", disable=disable, position=0) as outer,
        tqdm(desc="probe batches", unit="batch", disable=disable, position=1, leave=False) as bar,
    ):
        yield outer, bar


def serve(team: Team) -> int:
    """Another process's sweep: measure the share the main process deals, hand each outcome over.

    Writes nothing but its outcomes and its end marker (see the module documentation); shows
    no progress. Returns 0 once its end is said (an error included: the main process reports
    it); raises when even that cannot be written (torchrun then stops every process).
    """
    plan = team.receive()
    if plan is None:
        return 0  # the main process stopped before dealing, and says why
    parts = _Parts(Path(plan.out))
    if not parts.seen(plan.token):
        raise RuntimeError(
            f"{parts.folder} is not the folder the main process made in --out (rank "
            f"{team.rank} does not see it): a sweep across machines needs --out on a file "
            "system every process sees."
        )
    cache = HashCache()  # in memory: the main process alone writes the digests' file
    error = None
    try:
        load = own_device(plan.load, team.local_rank)
        with _transformers_bars(False):
            for job in plan.work[team.rank]:
                outcome = _attempt(
                    job, plan.probe, plan.config, load, cache, plan.given, plan.known
                )
                parts.write(job.ckpt.step, outcome)
    except Exception as stop:  # a process that cannot go on says why; the others go on
        error = f"{type(stop).__name__}: {stop}"
    parts.done(team.rank, error)
    return 0
