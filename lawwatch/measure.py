"""One measurement of the law on a model: probe → features → statistics → PR → fit."""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lawwatch.capture import Capture, evaluating
from lawwatch.config import MeasureConfig
from lawwatch.history import Snapshot
from lawwatch.law import fit_law
from lawwatch.models import check_probe
from lawwatch.partition import PartitionedStats
from lawwatch.precision import forward_precision, log_statistics_precision
from lawwatch.probe import ProbeSet, example_mask, example_targets
from lawwatch.residual import ResidualStats
from lawwatch.targets import Targets

__all__ = [
    "accumulate",
    "identity",
    "measure",
    "model_device",
    "prepare",
    "solve",
    "statistics_device",
]

log = logging.getLogger("lawwatch")

# below this many examples per feature dimension PR is noisy (OLS with d + 1 parameters)
_EXAMPLES_PER_DIM = 10


def solve(
    stats: ResidualStats | PartitionedStats,
    *,
    seconds: float,
    step: int | None = None,
    pr: torch.Tensor | None = None,
) -> Snapshot:
    """Solve ``stats`` (all processes' examples, after any reduction) and fit the law.

    With the options kept per part of the probe (:class:`~lawwatch.partition.PartitionedStats`)
    ``pr`` holds the measure (out-of-sample PR or separation fuzziness) and, with
    ``jackknife``, the record gets ``pearson_r_se``, ``rho_se`` and ``jackknife_groups``.

    Warns when the examples are fewer than 10 per feature dimension (PR is noisy there).

    Args:
        stats: The summed statistics (after :meth:`ResidualStats.reduce_scatter_compute` only
            their count and entries are read).
        seconds: Wall time of the measurement so far (recorded in the snapshot).
        step: The training step, if any.
        pr: ``(entries,)`` prediction residuals already computed from ``stats`` (e.g. by
            ``reduce_scatter_compute``, which solves each entry on one process and gathers
            them); default: ``stats.compute()``.
    """
    n = int(stats.count.item())
    if stats.dim + 1 < n < _EXAMPLES_PER_DIM * stats.dim:
        warnings.warn(
            f"The probe gives {n} examples for hidden size {stats.dim}, fewer than "
            f"{_EXAMPLES_PER_DIM}x; PR is noisy there. Use more or longer probe sequences.",
            stacklevel=2,
        )
    pr = (stats.compute() if pr is None else pr).cpu()
    if pr.shape != (stats.num_layers,):
        raise ValueError(f"pr must have shape ({stats.num_layers},), got {tuple(pr.shape)}.")
    snapshot = Snapshot(
        pr=pr,
        fit=fit_law(pr, layers=stats.layers),
        n_tokens=n,
        seconds=seconds,
        step=step,
        layers=stats.layers,
        extra={"stats_precision": stats.precision},
    )
    if isinstance(stats, PartitionedStats):  # split / fuzziness / jackknife
        snapshot.extra.update(stats.uncertainty())
    return snapshot


def identity(probe_hash: str, config: MeasureConfig, precision: str) -> dict[str, Any]:
    """What a record says it was measured with: ``probe``, ``config`` and ``precision``.

    The probe's content hash (:meth:`ProbeSet.content_hash`), the options
    (:meth:`MeasureConfig.to_dict`) and the precision of the forward
    (:func:`lawwatch.precision.forward_precision`): records that differ in any of them are
    different series (:func:`lawwatch.history.series_change`).
    """
    return {"probe": probe_hash, "config": config.to_dict(), "precision": precision}


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def prepare(model: nn.Module, probe: ProbeSet, config: MeasureConfig) -> Targets:
    """Check ``probe`` against ``model`` and resolve the target option on the whole probe.

    Done once per probe, before any forward pass, on the *whole* probe: every process of a
    distributed run then regresses the same targets and raises, or not, alike.

    Returns:
        The targets every batch (of any shard of ``probe``) is regressed on.
    """
    check_probe(model, probe)
    # separation fuzziness needs the per-class sums of the one-hot statistics
    fuzziness = config.metric == "separation_fuzziness"
    return Targets.build(
        "onehot" if fuzziness else config.target,
        probe,
        offset=config.offset,
        seed=config.seed,
        onehot_top_k=config.onehot_top_k,
    )


def accumulate(
    model: nn.Module,
    probe: ProbeSet,
    config: MeasureConfig | None = None,
    targets: Targets | None = None,
    *,
    errors: list[BaseException] | None = None,
    **options: Any,
) -> ResidualStats | None:
    """Run ``probe`` through ``model`` and return its sufficient statistics (not yet solved).

    The model is run in eval mode under ``torch.no_grad()`` and each module's train/eval flag is
    restored afterwards. Returns None when the probe has no batch at all.

    Args:
        model: The module the probe runs through.
        probe: The probe, or this process's shard of it.
        config: The measurement options (default: the paper's protocol).
        targets: From :func:`prepare` on the *whole* probe; default: prepared on ``probe``
            (pass them when ``probe`` is a shard, so every shard regresses the same targets).
        errors: If given, an exception while turning a batch's hidden states into statistics
            is appended here and the remaining forward passes still run (their statistics are
            discarded): under FSDP and ZeRO-3 every forward is a collective, so a rank that
            stopped early would hang the others. The caller decides, collectively, what to do.
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` overriding ``config``'s.
    """
    config = MeasureConfig.build(config, **options)
    if targets is None:
        targets = prepare(model, probe, config)
    device = model_device(model)
    capture = Capture(
        model,
        config.normalize,
        blocks=config.blocks,
        final_norm=config.final_norm,
        layers=config.layers,
        entries=config.entries,
    )
    offset = config.offset
    stats_device = statistics_device(config, device)
    stats: ResidualStats | PartitionedStats | None = None
    # this shard's first row in the whole probe (ProbeSet.shard: contiguous equal blocks)
    rank, _ = probe.meta.get("shard", (0, 1))
    with evaluating(model):
        for batch, (input_ids, attention_mask) in enumerate(probe.batches(config.batch_size)):
            first_row = rank * len(probe) + batch * config.batch_size
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            positions = example_mask(attention_mask, offset)  # (batch, length)
            hidden = capture.forward(input_ids, attention_mask, positions)
            if errors:
                continue  # keep the forward passes in step with the other ranks
            try:
                # (g, n, d) float64 groups of entries, made one at a time
                groups = capture.feature_groups(hidden, FEATURE_GROUP_BYTES)
                ids = targets(example_targets(input_ids, offset)[positions])  # (n,)
                if stats is None:
                    head = next(groups)
                    groups = itertools.chain([head], groups)
                    dim = head[1].shape[2]
                    targets.check_memory(
                        len(capture.layers),
                        dim,
                        config.max_onehot_bytes,
                        copies=PartitionedStats.copies(config.split, config.jackknife),
                    )
                    precision = config.precision
                    log_statistics_precision(precision, device)
                    stats = _statistics(
                        config,
                        lambda dim=dim, precision=precision: ResidualStats(
                            len(capture.layers),
                            dim,
                            target=targets.kind,
                            classes=targets.classes,
                            device=stats_device,
                            rtol=config.rtol,
                            layers=capture.layers,
                            precision=precision,
                            # products where the features are; only (d, d) sums travel
                            compute_on="stats" if stats_device == device else "features",
                        ),
                    )
                    del head
                if isinstance(stats, PartitionedStats):
                    # the cells need every entry of an example together: this batch's features
                    # for all entries at once (the default measurement never builds this)
                    features = torch.cat([part for _, part in groups])  # (L, n, d)
                    rows = first_row + positions.nonzero()[:, 0]  # (n,) row-major like `ids`
                    stats.update(features, ids, rows)
                    del features
                else:
                    stats.update_groups(groups, ids, owned=True)
                del groups, hidden
            except Exception as error:
                if errors is None:
                    raise
                errors.append(error)
    return stats


def _statistics(
    config: MeasureConfig, make: Callable[[], ResidualStats]
) -> ResidualStats | PartitionedStats:
    """One ``ResidualStats`` for the paper's measurement, one per cell for the rest.

    The options that need parts of the probe: see :mod:`lawwatch.partition`.
    """
    if config.split is None and config.metric == "pr" and config.jackknife is None:
        return make()
    return PartitionedStats(make, split=config.split, metric=config.metric, groups=config.jackknife)


# float64 features of one batch are made this many bytes of entries at a time (at least one
# entry): the transient of the statistics update, whatever the number of entries
FEATURE_GROUP_BYTES = 64 * 2**20


def statistics_device(config: MeasureConfig, device: torch.device) -> torch.device:
    """Where the statistics live: ``config.stats_device``, else ``device`` (the model's).

    Raises:
        ValueError: A CUDA device that this process does not have.
    """
    if config.stats_device is None:
        return device
    chosen = torch.device(config.stats_device)
    if chosen.type == "cuda" and (
        not torch.cuda.is_available()
        or (chosen.index is not None and chosen.index >= torch.cuda.device_count())
    ):
        raise ValueError(
            f"stats_device={config.stats_device!r}, but this process has "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s); "
            "use 'cpu' or None (the model's device)."
        )
    return chosen


def measure(
    model: nn.Module, probe: ProbeSet, config: MeasureConfig | None = None, **options: Any
) -> Snapshot:
    """Measure the law of equi-learning on ``model`` with ``probe`` (He & Su's protocol).

    The residual stream is captured with hooks (see :mod:`lawwatch.capture`); a Hugging Face
    model runs with ``logits_to_keep=1``, so no ``(batch, length, vocab)`` logits exist. Hidden
    states are reduced to sufficient statistics batch by batch and solved once for all entries.

    Args:
        model: A Hugging Face model (GPT-2, Llama, Mamba, RWKV, …: blocks and final norm are
            found automatically), or any ``torch.nn.Module`` called as ``model(input_ids)``
            whose ``blocks`` and ``final_norm`` are named.
        probe: The probe sequences.
        config: The measurement options (default: the paper's protocol); see
            :class:`~lawwatch.config.MeasureConfig`, whose fields document each.
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` overriding ``config``'s
            (``measure(model, probe, target="onehot", layers=4)``).

    Returns:
        A :class:`~lawwatch.history.Snapshot` (``step`` unset; its ``extra`` holds what it was
        measured with: see :func:`identity`).

    Raises:
        TypeError: An option that is not a field of MeasureConfig.
        ValueError: An invalid option value, a probe that does not fit the model, or too few
            examples for the hidden size.
    """
    config = MeasureConfig.build(config, **options)
    start = time.perf_counter()
    targets = prepare(model, probe, config)
    stats = accumulate(model, probe, config, targets)
    if stats is None or stats.count.item() == 0:
        raise ValueError(
            f"The probe gives no example at offset={config.offset}; build it with sequences of "
            "at least two tokens."
        )
    snapshot = solve(stats, seconds=time.perf_counter() - start)
    snapshot.extra.update(identity(probe.content_hash(), config, forward_precision(model)))
    return snapshot
