"""Offline sweeps: the law measured on saved checkpoints, with the numbers and files of live runs.

:func:`analyze` loads each checkpoint in increasing step order, measures it with
:func:`lawwatch.measurement.measure` (the computation the live monitor runs) and writes
``history.jsonl`` and ``pr.safetensors`` in the output directory through
:class:`~lawwatch.output.store.LocalHistory`, as during training. Each record also holds:

- ``checkpoint``: the checkpoint's name (path, hub id and revision, GGUF file);
- ``probe``: the probe's content hash (:meth:`~lawwatch.probe.ProbeSet.content_hash`);
- ``config``: the measurement options (:meth:`~lawwatch.config.MeasureConfig.to_dict`);
- ``weights``: the content hash of the weight files (:func:`~lawwatch.checkpoints.weights_hash`);
- ``load_seconds``: the time loading the checkpoint took (``seconds`` is the measurement's);
- ``duplicate_of``: for weights identical to an already measured checkpoint, its name (the
  numbers are copied, not measured again).

A sweep run again over the same directory measures only what is new: a step already recorded
from the same weights is skipped, and weights already measured at another step are copied. A
checkpoint that fails to load or measure is reported and the sweep goes on. The directory holds
one series (:func:`lawwatch.history.series_diff`, the rule a live run follows): a sweep with
another probe or options that change what is measured is refused (use another directory).

Launched as several processes (torchrun, ``accelerate launch``), ``lawwatch analyze`` deals the
checkpoints over them with the same rules and numbers: see :mod:`lawwatch.sweep`.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lawwatch.checkpoints import (
    Checkpoint,
    HashCache,
    LoadOptions,
    fingerprint,
    hub_snapshot,
    load_model,
    unfinished,
    weights_hash,
)
from lawwatch.config import MeasureConfig
from lawwatch.history import History, Snapshot, identity, series, series_diff
from lawwatch.measurement import measure
from lawwatch.output.layout import HISTORY_FILE, PROBE_FILE
from lawwatch.output.store import LocalHistory, keep_probe
from lawwatch.probe import ProbeSet

__all__ = [
    "SweepResult",
    "analyze",
    "check_compatible",
    "log_to_wandb",
]

log = logging.getLogger("lawwatch")

HASH_FILE = "weights-sha256.json"
"""The weight files' digests, so a sweep run again hashes no unchanged file twice."""


@dataclass
class SweepResult:
    """What a sweep did, step by step.

    Attributes:
        measured: Steps measured now.
        copied: Steps whose weights equal an already measured checkpoint's (numbers copied).
        skipped: Steps already in the history from the same weights.
        failed: ``(checkpoint, reason)`` of each checkpoint that could not be measured.
        unfinished: ``(checkpoint, reason)`` of each checkpoint still being written (see
            :func:`lawwatch.checkpoints.unfinished`): neither measured nor recorded; a sweep run
            once it is complete measures it.
        recovered: Steps a sweep across processes measured before it was stopped (killed),
            recorded now (see :mod:`lawwatch.sweep`).
        history: The directory's whole history after the sweep.
    """

    measured: list[int] = field(default_factory=list)
    copied: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: list[tuple[Checkpoint, str]] = field(default_factory=list)
    unfinished: list[tuple[Checkpoint, str]] = field(default_factory=list)
    recovered: list[int] = field(default_factory=list)
    history: History = field(default_factory=History)


def check_compatible(history: History, probe_hash: str, config: MeasureConfig) -> None:
    """Refuse a history of another series (:func:`~lawwatch.history.series_diff`).

    Raises:
        ValueError: A record with another probe or options, naming the difference.
    """
    wanted = identity(probe_hash, config.to_dict())
    for record in history:
        diff = series_diff(series(record), wanted)
        if any(change.field == "probe" for change in diff):
            raise ValueError(
                f"The history holds step {record['step']} measured with another probe "
                f"({record.get('probe')!r}, not {probe_hash!r}); one history holds one probe: "
                "write this sweep to another --out directory, or use the probe it was "
                f"measured with (its {PROBE_FILE})."
            )
        changed = sorted(change.option for change in diff if change.field == "config")
        if changed:
            raise ValueError(
                f"The history holds step {record['step']} measured with other options "
                f"(they differ in {changed}); one history holds one set of options: write "
                "this sweep to another --out directory."
            )


class _CountedProbe(ProbeSet):
    """The probe, ticking a progress bar at each batch."""

    def __init__(self, probe: ProbeSet, bar: Any) -> None:
        super().__init__(
            probe.input_ids,
            probe.attention_mask,
            probe.meta,
            groups=probe.groups,
            group_names=probe.group_names or None,
            target_mask=probe.target_mask,
        )
        self._bar = bar

    def batches(self, batch_size: int) -> Iterator[Any]:
        """The probe's batches (see :meth:`ProbeSet.batches`), counted on the bar."""
        self._bar.reset(total=-(-len(self) // batch_size))
        for batch in super().batches(batch_size):
            yield batch
            self._bar.update(1)


def analyze(
    checkpoints: Sequence[Checkpoint],
    probe: ProbeSet,
    out: str | Path,
    config: MeasureConfig | None = None,
    *,
    load: LoadOptions | None = None,
    progress: bool | None = None,
    **options: Any,
) -> SweepResult:
    """Measure the law on each checkpoint; write the history into ``out``.

    Args:
        checkpoints: From :func:`lawwatch.checkpoints.find_checkpoints` (any order: they are
            measured in increasing step order; two at one step are refused).
        probe: The probe every checkpoint is measured with (saved as ``out/probe.safetensors``).
        out: The output directory (created if missing): ``history.jsonl``,
            ``pr.safetensors``, the probe and the weight digests.
        config: The measurement options (default: the paper's protocol), applied as given,
            ``jackknife`` included (a record carries the standard errors of ``r`` and ``rho``
            exactly when its config asks for them, as a live run's does).
        load: How checkpoints are loaded (dtype, device, device_map, hub cache).
        progress: Show progress bars (checkpoints and probe batches, and transformers' own
            while a checkpoint loads); None: on a terminal.
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` overriding ``config``'s.

    Returns:
        What was measured, copied, skipped and failed, and the resulting history.

    Raises:
        ValueError: Two checkpoints at one step, or a history in ``out`` measured with another
            probe or other options. A checkpoint that fails to load or measure does not raise:
            it is listed in :attr:`SweepResult.failed`.
    """
    from tqdm.auto import tqdm

    config = MeasureConfig.build(config, **options)
    load = load or LoadOptions()
    ordered = in_order(checkpoints)
    out = Path(out)
    local = LocalHistory(out)
    probe_hash = probe.content_hash()
    check_compatible(History(local.records), probe_hash, config)
    keep_probe(probe, out, local.history)  # the probe a sweep measured with, beside its history
    cache = HashCache(out / HASH_FILE)
    # the records keep the config as given (see _measure_job); the precision is measure()'s
    given = identity(probe_hash, config.to_dict())
    result = SweepResult()

    disable = None if progress is None else not progress
    shown = _on_terminal() if progress is None else progress
    with (
        _transformers_bars(shown),
        tqdm(ordered, desc="checkpoints", unit="ckpt", disable=disable, position=0) as outer,
        tqdm(desc="probe batches", unit="batch", disable=disable, position=1, leave=False) as bar,
    ):
        counted = _CountedProbe(probe, bar)
        for ckpt in outer:
            outer.set_postfix_str(f"step {ckpt.step}")
            try:
                _sweep_one(ckpt, counted, config, load, cache, local, given, result)
            except Exception as error:  # reported; the sweep goes on
                _fail(ckpt, f"{type(error).__name__}: {error}", result)
            finally:
                gc.collect()
                _empty_cuda_cache()
    result.history = History(local.records)
    return result


def in_order(checkpoints: Sequence[Checkpoint]) -> list[Checkpoint]:
    """``checkpoints`` in increasing step order.

    Raises:
        ValueError: Two checkpoints at one step.
    """
    ordered = sorted(checkpoints, key=lambda c: c.step)
    for before, after in itertools.pairwise(ordered):
        if before.step == after.step:
            raise ValueError(
                f"Two checkpoints at step {after.step}: {before.name} and {after.name}."
            )
    return ordered


def _sweep_one(
    ckpt: Checkpoint,
    probe: ProbeSet,
    config: MeasureConfig,
    load: LoadOptions,
    cache: HashCache,
    local: LocalHistory,
    given: dict[str, Any],
    result: SweepResult,
) -> None:
    """Skip, copy or measure one checkpoint, and record it."""
    weights, before = None, None
    if ckpt.local:
        found = _local_weights(ckpt, cache)
        if isinstance(found, str):
            _leave_unfinished(ckpt, found, result)
            return
        weights, before = found
    if _already(ckpt, weights, local, result):
        return
    if weights is not None and _copy(ckpt, weights, local, result):
        return
    job = Job(ckpt, weights, before)
    known = {r["weights"] for r in local.records if r.get("weights")}
    _settle(ckpt, _measure_job(job, probe, config, load, cache, given, known), local, result)


@dataclass(frozen=True)
class Job:
    """A checkpoint to load and measure.

    Attributes:
        ckpt: The checkpoint.
        weights: Its weights' content hash (None for a hub checkpoint: known once loaded).
        before: Its weight files' :func:`~lawwatch.checkpoints.fingerprint` when hashed (None
            for a hub checkpoint): files that change before the load ends are not recorded.
    """

    ckpt: Checkpoint
    weights: str | None
    before: list[tuple[Any, ...]] | None


@dataclass
class Outcome:
    """What loading and measuring one checkpoint gave.

    Attributes:
        kind: 'measured' (``snapshot``), 'same' (the weights ``weights`` are already measured:
            copy their numbers), 'unfinished' or 'failed' (``reason``).
    """

    kind: str
    snapshot: Snapshot | None = None
    weights: str | None = None
    reason: str | None = None


def _local_weights(ckpt: Checkpoint, cache: HashCache) -> tuple[str, list[Any]] | str:
    """A local checkpoint's weights hash and fingerprint, or why it looks still being written.

    A checkpoint being written is left for a later sweep: its digest is recorded only for the
    very files measured (unchanged from before the hash to after the load).
    """
    problem = unfinished(ckpt.source, ckpt.gguf_file)
    if problem is not None:
        return problem
    before = fingerprint(ckpt.source, ckpt.gguf_file)
    weights = weights_hash(ckpt.source, ckpt.gguf_file, cache)
    if fingerprint(ckpt.source, ckpt.gguf_file) != before:
        return "its weight files changed while they were hashed"
    return weights, before


def _already(
    ckpt: Checkpoint, weights: str | None, local: LocalHistory, result: SweepResult
) -> bool:
    """Whether the history holds ``ckpt``'s step from the same weights (skipped).

    Raises:
        ValueError: The history holds the step from other weights.
    """
    at_step = next((r for r in local.records if r["step"] == ckpt.step), None)
    if at_step is None:
        return False
    if ckpt.local and at_step.get("weights") == weights:
        result.skipped.append(ckpt.step)
        return True
    if not ckpt.local and at_step.get("checkpoint") == ckpt.name:
        result.skipped.append(ckpt.step)  # the same hub revision (its weights not re-read)
        return True
    raise ValueError(
        f"step {ckpt.step} is already in {local.directory / HISTORY_FILE} from other "
        f"weights ({at_step.get('checkpoint', 'a live run')}); write this sweep to another "
        "--out directory."
    )


def _measure_job(
    job: Job,
    probe: ProbeSet,
    config: MeasureConfig,
    load: LoadOptions,
    cache: HashCache,
    given: dict[str, Any],
    known: set[str],
) -> Outcome:
    """Load and measure one checkpoint (``known``: weights already measured, not measured again).

    Raises:
        Exception: The checkpoint failed to load or measure.
    """
    ckpt, weights = job.ckpt, job.weights
    start = time.perf_counter()
    model = load_model(ckpt, load)
    if job.before is not None and fingerprint(ckpt.source, ckpt.gguf_file) != job.before:
        del model
        return Outcome("unfinished", reason="its weight files changed while they were loaded")
    if weights is None:  # a hub checkpoint: its files are in the local cache now
        weights = weights_hash(hub_snapshot(ckpt, load), ckpt.gguf_file, cache)
        if weights in known:
            del model
            return Outcome("same", weights=weights)
    loaded = time.perf_counter()
    # measured exactly as the config says (its jackknife too): the records carry what their
    # config gives, as a live run's do, so both find the same emergence step
    snapshot = measure(model, probe, config)
    del model
    snapshot.step = ckpt.step
    snapshot.extra.update(
        checkpoint=ckpt.name, **given, weights=weights, load_seconds=loaded - start
    )
    return Outcome("measured", snapshot=snapshot)


def _settle(ckpt: Checkpoint, outcome: Outcome, local: LocalHistory, result: SweepResult) -> None:
    """Record ``outcome`` of ``ckpt`` in the history and ``result``."""
    if outcome.kind == "unfinished":
        _leave_unfinished(ckpt, outcome.reason or "", result)
    elif outcome.kind == "failed":
        _fail(ckpt, outcome.reason or "", result)
    elif outcome.kind == "same" and outcome.weights is not None:
        if not _copy(ckpt, outcome.weights, local, result):
            _fail(ckpt, "the checkpoint it has the weights of is no longer recorded", result)
    elif outcome.snapshot is not None:
        _record(local, outcome.snapshot)
        result.measured.append(ckpt.step)


def _fail(ckpt: Checkpoint, reason: str, result: SweepResult) -> None:
    """Report a checkpoint that could not be measured; the sweep goes on."""
    log.error("lawwatch analyze: %s (step %d) failed: %s", ckpt.name, ckpt.step, reason)
    result.failed.append((ckpt, reason))


def _leave_unfinished(ckpt: Checkpoint, problem: str, result: SweepResult) -> None:
    """Report a checkpoint still being written; nothing of it is recorded."""
    result.unfinished.append((ckpt, problem))
    log.warning(
        "lawwatch analyze: %s (step %d) skipped: it looks still being written (%s); run the "
        "sweep again once it is saved.",
        ckpt.name,
        ckpt.step,
        problem,
    )


def _copy(ckpt: Checkpoint, weights: str, local: LocalHistory, result: SweepResult) -> bool:
    """Record the numbers of an already measured checkpoint with the same weights, if any."""
    same = next((r for r in local.records if r.get("weights") == weights), None)
    if same is None:
        return False
    snapshot = Snapshot.from_record(same)
    snapshot.step, snapshot.seconds = ckpt.step, 0.0
    original = same.get("duplicate_of") or same.get("checkpoint")
    snapshot.extra.update(checkpoint=ckpt.name, duplicate_of=original, load_seconds=0.0)
    _record(local, snapshot)
    result.copied.append(ckpt.step)
    log.info("lawwatch analyze: %s has the weights of %s", ckpt.name, original)
    return True


def _record(local: LocalHistory, snapshot: Snapshot) -> None:
    """Add ``snapshot`` to the history files, keeping the steps increasing."""
    last = local.last_step
    if last is None or snapshot.step > last:
        local.write(snapshot)  # the usual case: appended
        return
    # a checkpoint earlier than what a previous sweep recorded: rewrite the files in order
    local.replace(sorted([*local.records, snapshot.to_record()], key=lambda r: r["step"]))


def _on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


@contextlib.contextmanager
def _transformers_bars(shown: bool) -> Iterator[None]:
    """The progress bars of transformers (its "Loading weights", once per checkpoint), on or off.

    Off, they are turned off for the sweep and restored after it, with the hub's own.
    """
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hub_off = hub.are_progress_bars_disabled()
    if shown or not was:
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        if hub_off:
            hub.disable_progress_bars()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log_to_wandb(
    history: History,
    *,
    project: str,
    name: str | None = None,
    mode: str | None = None,
    directory: str | Path | None = None,
    config: dict[str, Any] | None = None,
    emergence_threshold: float | None = None,
    image: str | Path | None = None,
) -> Path:
    """Log a sweep's whole history as one W&B run, the checkpoint step on the x-axis.

    The run holds what :class:`~lawwatch.output.trackers.WandbSink` logs during training (the
    scalars under ``lawwatch/``, the PR table, the chart of the law, the summary), one row per
    step.

    Args:
        history: The sweep's history (steps increasing).
        project: The W&B project.
        name: The run's name.
        mode: 'online' or 'offline' (default: W&B's own choice).
        directory: Where W&B writes its files (its ``wandb/`` folder goes there).
        config: The run's config.
        emergence_threshold: r at or below which the law counts as emerged.
        image: A PNG logged at the last step (the report's figure).

    Returns:
        The run's local directory.
    """
    import wandb

    from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
    from lawwatch.output.trackers import WandbSink

    run = wandb.init(
        project=project,
        name=name,
        mode=mode,
        dir=None if directory is None else str(directory),
        config=config,
        job_type="lawwatch-analyze",
    )
    try:
        threshold = (
            DEFAULT_EMERGENCE_THRESHOLD if emergence_threshold is None else emergence_threshold
        )
        sink = WandbSink(run, history=history.records, emergence_threshold=threshold)
        if image is not None:
            sink.log_report(Path(image))
        return Path(run.settings.sync_dir)
    finally:
        run.finish()
