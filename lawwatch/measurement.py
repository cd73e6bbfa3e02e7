"""One measurement of the law on a model: probe → features → statistics → PR → fit.

Owns the measurement loop (:func:`accumulate`: every batch's entries streamed from the capture
hooks into the statistics, whichever kind they are), the solve and the law's fit on top of it
(:func:`solve`, :func:`uncertainty`: the jackknife's refits) and :func:`measure`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lawwatch.capture import Capture, NonFiniteError, evaluating
from lawwatch.config import MeasureConfig
from lawwatch.history import Snapshot, identity
from lawwatch.identify_norm import identify, needs_identifying
from lawwatch.law import MIN_LAW_POINTS, fit_law
from lawwatch.models import Unembedding, check_head, check_probe, unembedding
from lawwatch.precision import forward_precision
from lawwatch.probe import ProbeSet, example_targets
from lawwatch.stats import Statistics, Update, wrapped
from lawwatch.stats.build import (
    Recipe,
    check_group_memory,
    checked_groups,
    position_buckets,
    statistics_device,
)
from lawwatch.stats.grouped import Grouped
from lawwatch.stats.health import HealthKeys, health_of
from lawwatch.stats.lens import Kept, Lensed, lens_rows
from lawwatch.stats.partition import jackknife_se
from lawwatch.targets import Targets

__all__ = [
    "accumulate",
    "check_options",
    "check_settings",
    "measure",
    "measure_lens",
    "model_device",
    "prepare",
    "solve",
    "uncertainty",
]

log = logging.getLogger("lawwatch")

# below this many examples per feature dimension PR is noisy (OLS with d + 1 parameters)
_EXAMPLES_PER_DIM = 10


def _capture(model: nn.Module, config: MeasureConfig) -> Capture:
    """The hooks ``config`` asks for on ``model``'s blocks (not yet attached)."""
    return Capture(
        model,
        config.normalize,
        blocks=config.blocks,
        final_norm=config.final_norm,
        layers=config.layers,
        entries=config.entries,
    )


def solve(
    stats: Statistics,
    *,
    seconds: float,
    step: int | None = None,
    pr: torch.Tensor | None = None,
) -> Snapshot:
    """Solve ``stats`` (all processes' examples, after any reduction) and fit the law.

    With the options kept per part of the probe
    (:class:`~lawwatch.stats.partition.PartitionedStats`) ``pr`` holds the measure
    (out-of-sample PR or separation fuzziness) and, with ``jackknife``, the record gets
    :func:`uncertainty`'s ``pearson_r_se``, ``rho_se`` and ``jackknife_groups``.

    Warns when the examples are fewer than 10 per feature dimension (PR is noisy there).

    Args:
        stats: The summed statistics (after ``reduce_scatter`` only their count, entries and
            jackknife replicates are read).
        seconds: Wall time of the measurement so far (recorded in the snapshot).
        step: The training step, if any.
        pr: ``(entries,)`` values already computed from ``stats`` (e.g. by ``gather_owned``,
            after each process solved its share); default: ``stats.compute()``.
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
    snapshot.extra.update(uncertainty(stats))
    if isinstance(stats, Lensed):  # the logit lens, reduced with the PR statistics
        snapshot.extra["lens"] = stats.lens.record()
    snapshot.extra.update(breakdowns(stats))
    health = health_of(stats)
    if health is not None:  # the vital signs, reduced with the PR statistics
        snapshot.extra[HealthKeys.FIELD] = health.record()
    return snapshot


def breakdowns(stats: Statistics) -> dict[str, Any]:
    """The record's breakdowns (``docs/breakdowns.md``): ``groups`` and ``positions``.

    ``groups`` (``by_group``): per group name, ``n_tokens``, ``pr`` and the law's fit (as the
    record's own fields), or ``pr`` None and ``error`` (why: too few examples for the hidden
    size, none at all); with the lens, ``lens`` (its fields over the group's examples).
    ``positions`` (``position_buckets``): per bucket label, the lens's fields over its
    examples. Empty without either.
    """
    out: dict[str, Any] = {}
    lensed = wrapped(stats, Lensed)
    inner = wrapped(stats, Grouped)
    parts = lensed.lens.parts_record() if lensed is not None else {}
    if inner is not None:
        groups: dict[str, Any] = {}
        for name, solved in inner.breakdown().items():
            entry: dict[str, Any] = {"n_tokens": solved.examples, "pr": None}
            if solved.pr is not None:
                try:
                    fit = fit_law(solved.pr, layers=inner.layers)
                    entry = {"n_tokens": solved.examples, "pr": solved.pr.tolist(), **fit.as_dict()}
                except ValueError as error:  # e.g. a PR of 0: no log
                    entry["error"] = f"group {name!r}: {error}"
            else:
                entry["error"] = solved.error
            if "groups" in parts:
                entry["lens"] = parts["groups"][name]
            groups[name] = entry
        out["groups"] = groups
    if "positions" in parts:
        out["positions"] = parts["positions"]
    return out


def uncertainty(stats: Statistics) -> dict[str, Any]:
    """Jackknife standard errors of the law's ``r`` and ``rho`` (empty without groups).

    Each group is left out in turn (the statistics' :meth:`~lawwatch.stats.Statistics.replicates`:
    the measure from the other groups' statistics) and the law refitted; the standard errors
    are those of :func:`~lawwatch.stats.partition.jackknife_se` over the ``groups`` refits.

    Raises:
        ValueError: A group without examples (fewer probe sequences than groups).
    """
    replicates = stats.replicates()
    if replicates is None:
        return {}
    fits = [fit_law(values.cpu(), layers=stats.layers) for values in replicates]
    return {
        "pearson_r_se": jackknife_se([f.pearson_r for f in fits]),
        "rho_se": jackknife_se([f.rho for f in fits]),
        "jackknife_groups": len(fits),
    }


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
    targets = _targets(model, probe, config)
    check_settings(model, probe, config, targets)
    return targets


def _targets(model: nn.Module, probe: ProbeSet, config: MeasureConfig) -> Targets:
    """The probe checked against the model, and the targets resolved on it."""
    check_probe(model, probe)
    return check_options(probe, config)


def check_options(probe: ProbeSet, config: MeasureConfig) -> Targets:
    """The part of :func:`check_settings` that needs no model: what an adapter checks when built.

    A framework's callback is built before it sees the model (the Trainer hands it over at
    train begin), so it refuses these where the user builds it: targets that take a single
    value (PR is undefined), no example at ``offset``, and a ``stats_device`` this process
    does not have.

    Returns:
        The targets, resolved on the whole probe.

    Raises:
        ValueError: The setting, and its fix.
    """
    # separation fuzziness needs the per-class sums of the one-hot statistics
    fuzziness = config.metric == "separation_fuzziness"
    targets = Targets.build(
        "onehot" if fuzziness else config.target,
        probe,
        offset=config.offset,
        seed=config.seed,
        onehot_top_k=config.onehot_top_k,
    )
    statistics_device(config, torch.device("cpu"))  # a CUDA device this process lacks
    if config.by_group and probe.group_index is None:
        raise ValueError(
            "by_group=True, but the probe carries no groups: build it with groups "
            "(ProbeSet.from_texts(..., groups=...) or a dict of texts, --group-column, "
            "--group-by-file), or set by_group=False."
        )
    return targets


def check_settings(
    model: nn.Module, probe: ProbeSet, config: MeasureConfig, targets: Targets
) -> None:
    """Refuse, before any forward pass, the settings that would fail at every measurement.

    The blocks and entries are located as the measurement will locate them; the hidden size is
    read off the model where it says it (its final norm's or input embedding's width). Refused:
    ``blocks`` that match no module and ``layers`` outside the model (as located), fewer than 3
    entries after the embeddings (a line cannot be fitted), a probe with no more examples than
    the unregularized solve has parameters (hidden size + 1: PR is 0, by interpolation), and
    one-hot statistics over ``max_onehot_bytes``; with the logit lens, a head that is not found
    or does not map the hidden size to the probe's token ids; and what :func:`check_options`
    refuses (targets of a single value, a ``stats_device`` this process lacks). Fewer than
    :data:`~lawwatch.law.MIN_LAW_POINTS` entries is allowed, with a warning: r of so few points
    says little.

    Raises:
        ValueError: The setting, and its fix.
    """
    capture = _capture(model, config)
    if config.lens is not None:  # the head the lens reads through, and its shape
        check_head(unembedding(model, config.lens_head), probe, hidden_size(model, capture))
    points = [e for e in capture.layers if e != 0]
    if len(points) < 3:
        raise ValueError(
            f"layers={config.layers!r} measures {len(points)} entries after the embeddings "
            f"(entries {points} of 0 … {capture.num_entries - 1}); fitting the law needs at "
            "least 3 layers after dropping the embeddings: measure more entries (layers=None: "
            "all of them) or a deeper model."
        )
    if len(points) < MIN_LAW_POINTS:
        log.warning(
            "lawwatch: the law is fitted to %d entries (%s); r of so few points is near ±1 for "
            "almost any PRs, so read it with its standard error (pearson_r_se), or measure "
            "more entries (layers=None) or a deeper model.",
            len(points),
            points,
        )
    if isinstance(config.jackknife, int) and config.jackknife > len(probe):
        raise ValueError(
            f"jackknife={config.jackknife} groups for a probe of {len(probe)} sequences leave a "
            f"group empty; use at most {len(probe)} groups, 'auto' or None."
        )
    dim = hidden_size(model, capture)
    check_final_norm(model, capture, dim)
    if dim is None:
        return
    n = probe.num_examples(config.offset)
    if n <= dim + 1:
        raise ValueError(
            f"Too few probe examples: the probe gives {n} (position, target) pairs at offset="
            f"{config.offset} for hidden size {dim}; the least-squares fit has {dim + 1} "
            f"parameters, so it interpolates and PR is 0. Use a probe of more than {dim + 1} "
            f"examples (about {_EXAMPLES_PER_DIM * dim} for a PR that is not noisy): more or "
            "longer sequences."
        )
    checked_groups(config, targets, len(probe), len(capture.layers), dim)
    check_group_memory(config, targets, len(probe.group_names), len(capture.layers), dim)


def check_final_norm(model: nn.Module, capture: Capture, dim: int | None) -> None:
    """Identify now a final norm whose epsilon is not an attribute (nanoGPT's ``LayerNorm``).

    It is run on chosen inputs (:func:`lawwatch.identify_norm.identify`), so a norm that cannot
    be identified is refused before training, not at every snapshot. Without a known width
    it is identified at the first measurement instead.

    Raises:
        TypeError: The norm, and how to give lawwatch its reading.
    """
    norm = getattr(capture, "_norm_module", None)
    if dim is None or not needs_identifying(norm):
        return
    param = next((p for p in norm.parameters() if p.is_floating_point()), None)
    if param is None:
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    identify(norm, str(capture.final_norm), dim, dtype, device)


def hidden_size(model: nn.Module, capture: Capture) -> int | None:
    """The residual stream's width, as the model states it; None when it does not say.

    The final norm's ``normalized_shape`` (or its 1-d weight), else the input embedding's
    ``embedding_dim``.
    """
    norm = getattr(capture, "_norm_module", None)
    shape = getattr(norm, "normalized_shape", None)
    if isinstance(shape, tuple | list) and len(shape) == 1 and isinstance(shape[0], int):
        return shape[0]
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() > 0:
        return int(weight.numel())
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    width = getattr(embedding, "embedding_dim", None)
    return width if isinstance(width, int) and width > 0 else None


def accumulate(
    model: nn.Module,
    probe: ProbeSet,
    config: MeasureConfig | None = None,
    targets: Targets | None = None,
    *,
    errors: list[BaseException] | None = None,
    law: bool = True,
    **options: Any,
) -> Statistics | None:
    """Run ``probe`` through ``model`` and return its sufficient statistics (not yet solved).

    The model is run in eval mode under ``torch.no_grad()`` and each module's train/eval flag is
    restored afterwards. Returns None when the probe has no batch at all.

    Each measured entry is added to the statistics inside its hook, as its block's output
    arrives (:meth:`~lawwatch.capture.Capture.stream`), so a batch holds one entry's float64
    features at a time, whatever the statistics (the partitioned ones copy each cell's rows
    of that entry); the final norm's reading is taken first, from one short forward on the
    probe's sequence with the most examples (:meth:`~lawwatch.capture.Capture.calibrate`).

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
        law: False: the logit lens alone (:func:`measure_lens`): no residual statistics.
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` overriding ``config``'s.
    """
    config = MeasureConfig.build(config, **options)
    if targets is None:  # statistics only: the law's fit is not this function's to check
        targets = _targets(model, probe, config)
    device = model_device(model)
    capture = _capture(model, config)
    offset = config.offset
    # this shard's first row in the whole probe (ProbeSet.shard: contiguous equal blocks)
    rank, world = probe.meta.get("shard", (0, 1))
    # the statistics this config keeps, made when the first batch gives the width
    recipe = Recipe.of(
        config,
        targets,
        layers=capture.layers,
        sequences=len(probe) * world,
        features=device,
        group_names=probe.group_names,
        group_of=probe.group_index if config.by_group else None,
        first_row=rank * len(probe),
        law=law,
    )
    # the examples: real positions whose target is real (and marked, with a target mask)
    examples = probe.example_positions(offset)
    stats: Statistics | None = None
    # the logit lens: the head it reads through, found before any forward
    head = unembedding(model, config.lens_head) if config.lens is not None else None
    with evaluating(model):
        if len(probe) > 0:
            # the final norm's reading, before any entry streams: one short forward on every
            # process (a collective under FSDP), on the sequence with the most examples
            capture.calibrate(probe.input_ids, probe.attention_mask, examples, device)
        for batch, (input_ids, attention_mask) in enumerate(probe.batches(config.batch_size)):
            first_row = rank * len(probe) + batch * config.batch_size
            rows = slice(batch * config.batch_size, batch * config.batch_size + len(input_ids))
            positions = examples[rows, : input_ids.shape[1]].to(device)  # (batch, length)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            if errors:
                capture.run_bare(input_ids, attention_mask)  # in step with the other ranks
                continue
            ids = None
            try:
                # each example's sequence in the whole probe, row-major like `ids`
                sequences = first_row + positions.nonzero()[:, 0]  # (n,)
                next_ids = example_targets(input_ids, offset)[positions]  # (n,)
                ids = targets(next_ids)
                keep = None if head is None else lens_rows(positions, sequences, config.lens)
                stats, kept = _add_streamed(
                    capture,
                    stats,
                    recipe.build,
                    input_ids,
                    attention_mask,
                    positions,
                    ids,
                    sequences,
                    keep,
                )
                if kept is not None:  # the lens's rows of this batch, after its forward
                    labels = _lens_labels(probe, config, positions, attention_mask, sequences)
                    labels = {axis: index[keep.to(index.device)] for axis, index in labels.items()}
                    _add_lens(stats, kept, next_ids[keep], head, labels)
            except Exception as error:
                if errors is None:
                    raise
                errors.append(error)
                if ids is None:  # failed before its forward ran
                    capture.run_bare(input_ids, attention_mask)
    if isinstance(stats, Lensed):  # every batch added: the head's V × d copy is not needed
        stats.lens.release()
    health = health_of(stats)
    if health is not None:  # nor the vital signs' workspace
        health.release()
    return stats


def _add_streamed(
    capture: Capture,
    stats: Statistics | None,
    make: Callable[[int], Statistics],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    ids: torch.Tensor,
    sequences: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> tuple[Statistics, Kept | None]:
    """One batch, its entries added to the statistics inside the hooks as each block runs.

    Each entry's ``(n, d)`` float64 features are added to the statistics (in place: shifted,
    then their products accumulated) and dropped before the next block runs, so the batch's
    transient is one entry's features (and, for partitioned statistics, a copy of each cell's
    rows of it) plus what the forward itself holds. The NaN/Inf check is a device flag judged
    once, after the forward. Returns the statistics (made on the first batch, when the width
    is known), and the logit lens's rows at the examples ``keep`` (None without).
    """
    update: Update | None = None

    def add(index: int, features: torch.Tensor) -> None:
        nonlocal stats, update
        if stats is None:
            stats = make(features.shape[1])
        if update is None:
            update = stats.begin(ids, sequences, deferred_check=True)
        update.add(slice(index, index + 1), features.unsqueeze(0), owned=True)

    def observe(index: int, rows: torch.Tensor) -> None:  # the vital signs, from the raw entry
        nonlocal stats
        if stats is None:
            stats = make(rows.shape[1])
        health = health_of(stats)
        if health is not None:
            health.add(index, rows)

    try:
        kept = capture.stream(input_ids, attention_mask, positions, add, keep=keep, observe=observe)
    except NonFiniteError as error:  # say where: the vital signs counted them
        health = health_of(stats)
        where = "" if health is None else health.nonfinite_summary()
        if not where:
            raise
        raise NonFiniteError(
            f"{error} Non-finite values at the examples so far: {where}."
        ) from None
    if update is None:  # no measured entry handed on: cannot happen after a clean forward
        raise RuntimeError("lawwatch: the forward handed on no measured entry.")
    update.finish()
    return stats, kept


def _lens_labels(
    probe: ProbeSet,
    config: MeasureConfig,
    positions: torch.Tensor,
    attention_mask: torch.Tensor,
    sequences: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Each example's label index on every breakdown axis of the lens (groups, positions)."""
    labels: dict[str, torch.Tensor] = {}
    if config.by_group:
        rank, _ = probe.meta.get("shard", (0, 1))
        local = sequences.cpu() - rank * len(probe)
        labels["groups"] = probe.group_index[local]
    if config.position_buckets is not None:
        labels["positions"] = position_buckets(positions, attention_mask, config.position_buckets)
    return labels


def _add_lens(
    stats: Statistics,
    kept: Kept,
    targets: torch.Tensor,
    head: Unembedding,
    labels: dict[str, torch.Tensor] | None = None,
) -> None:
    """Add a batch's kept rows to the lens statistics carried by ``stats`` (a Lensed)."""
    if not isinstance(stats, Lensed):  # built by the recipe with the lens on: cannot happen
        raise RuntimeError("lawwatch: the logit lens is on but the statistics carry none.")
    stats.lens.add(kept, targets, head, labels)


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
        measured with: see :func:`~lawwatch.history.identity`).

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
    snapshot.extra.update(
        identity(probe.content_hash(), config.to_dict(), forward_precision(model))
    )
    return snapshot


# options of the law that the lens alone has no use for: (name, its default)
_LAW_ONLY = (("split", None), ("metric", "pr"), ("target", "token_id"))


def check_lens_only(model: nn.Module, probe: ProbeSet, config: MeasureConfig) -> Targets:
    """Refuse, before any forward pass, what :func:`measure_lens` cannot measure.

    The lens must be on; options of the law alone (``split``, ``metric``, ``target``, a
    jackknife of a stated size) are refused rather than ignored; the probe must fit the model,
    the blocks and ``layers`` must be found, the head must map the hidden size to the probe's
    ids, and ``by_group`` needs groups. No minimum of examples: the lens fits nothing.

    Returns:
        The targets the lens reads (the true next-token ids).

    Raises:
        ValueError: The setting, and its fix.
    """
    if config.lens is None:
        raise ValueError(
            "measure_lens measures the logit lens alone, but lens is None (off): set lens=1.0 "
            "(every example) or a share in (0, 1]."
        )
    for name, default in _LAW_ONLY:
        if getattr(config, name) != default:
            raise ValueError(
                f"{name}={getattr(config, name)!r} is an option of the law (PR), which "
                f"measure_lens does not measure: leave it at {default!r}, or use "
                "lawwatch.measure (the law and the lens)."
            )
    if isinstance(config.jackknife, int):
        raise ValueError(
            f"jackknife={config.jackknife} gives the law's standard errors; measure_lens "
            "measures the lens alone: leave jackknife at 'auto' (or None)."
        )
    check_probe(model, probe)
    if config.by_group and probe.group_index is None:
        check_options(probe, config)  # its by_group refusal, with the fix
    capture = _capture(model, config)
    check_head(unembedding(model, config.lens_head), probe, hidden_size(model, capture))
    check_final_norm(model, capture, hidden_size(model, capture))
    return Targets("token_id", config.offset)


def measure_lens(
    model: nn.Module, probe: ProbeSet, config: MeasureConfig | None = None, **options: Any
) -> dict[str, Any]:
    """The logit lens alone on ``model`` with ``probe``: no residual statistics, no PR.

    What a probe of few examples can still measure (the answers of a retrieval probe,
    ``docs/retrieval.md``): the lens fits nothing, so no minimum of examples applies (the
    law needs more than hidden size + 1). The same forward and the same lens sums as
    :func:`measure`'s: its ``lens``, ``groups[name]["lens"]`` and ``positions`` are those of
    :func:`measure` with the same options (within 1e-12).

    Args:
        model: As for :func:`measure`.
        probe: The probe sequences.
        config: The measurement options; ``lens`` must be on (refused otherwise, as are the
            law's own options: ``split``, ``metric``, ``target``, a stated ``jackknife``).
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` overriding ``config``'s.

    Returns:
        A record: ``n_tokens`` (the probe's examples), ``seconds``, ``layers`` (the measured
        entries), ``lens`` (the lens's fields, ``docs/lens.md``), with ``by_group`` ``groups``
        (per group ``n_tokens`` and ``lens``), with ``position_buckets`` ``positions``, and
        what it was measured with (:func:`~lawwatch.history.identity`). No ``pr`` or fit: it
        is not a :class:`~lawwatch.history.Snapshot` and is not a monitor's record.

    Raises:
        ValueError: The lens off, an option of the law, a probe that does not fit the model,
            a probe of no example.
    """
    config = MeasureConfig.build(config, **options)
    start = time.perf_counter()
    targets = check_lens_only(model, probe, config)
    stats = accumulate(model, probe, config, targets, law=False)
    if not isinstance(stats, Lensed) or stats.count.item() == 0:
        raise ValueError(
            f"The probe gives no example at offset={config.offset}; build it with sequences of "
            "at least two tokens (and, with a target mask, a marked token after the first)."
        )
    record: dict[str, Any] = {
        "n_tokens": int(stats.count.item()),
        "seconds": time.perf_counter() - start,
        "layers": list(stats.layers),
        "lens": stats.lens.record(),
    }
    parts = stats.lens.parts_record()
    if "groups" in parts:
        examples = probe.group_examples(config.offset)
        record["groups"] = {
            name: {"n_tokens": examples.get(name, 0), "lens": lens}
            for name, lens in parts["groups"].items()
        }
    if "positions" in parts:
        record["positions"] = parts["positions"]
    record.update(identity(probe.content_hash(), config.to_dict(), forward_precision(model)))
    return record
