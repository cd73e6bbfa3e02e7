"""One measurement of the law on a model: probe → features → statistics → PR → fit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lawwatch.capture import HiddenStateCapture, Normalize
from lawwatch.law import LawFit, fit_law
from lawwatch.probe import ProbeSet, example_mask, example_targets
from lawwatch.residual import DEFAULT_RTOL, ResidualStats

MeasureTarget = Literal["token_id", "token_id_shuffled", "onehot"]
MEASURE_TARGETS: tuple[str, ...] = ("token_id", "token_id_shuffled", "onehot")


@dataclass
class Snapshot:
    """The law measured once.

    Attributes:
        pr: ``(entries,)`` float64 prediction residual of every hidden-state entry (entry 0 =
            embeddings), on CPU.
        fit: The law fitted to ``pr`` (embeddings dropped).
        n_tokens: Examples (position, target) the statistics hold.
        seconds: Wall time of the measurement.
        step: Training step, when taken during training.
    """

    pr: torch.Tensor
    fit: LawFit
    n_tokens: int
    seconds: float
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record: step, pr (list), the fit's fields, n_tokens, seconds."""
        return {
            "step": self.step,
            "pr": self.pr.tolist(),
            **self.fit.as_dict(),
            "n_tokens": self.n_tokens,
            "seconds": self.seconds,
            **self.extra,
        }


def shuffled_ids(ids: torch.Tensor, seed: int = 0) -> dict[int, int]:
    """A seeded permutation of the distinct ``ids`` (the paper's shuffled-vocabulary control)."""
    distinct = torch.unique(ids)
    gen = torch.Generator().manual_seed(seed)
    perm = distinct[torch.randperm(distinct.numel(), generator=gen)]
    return dict(zip(distinct.tolist(), perm.tolist(), strict=True))


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def accumulate(
    model: nn.Module,
    probe: ProbeSet,
    *,
    normalize: Normalize = "auto",
    target: MeasureTarget = "token_id",
    offset: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
    errors: list[BaseException] | None = None,
) -> ResidualStats | None:
    """Run ``probe`` through ``model`` and return its sufficient statistics (not yet solved).

    The model is run in eval mode under ``torch.no_grad()`` and each module's train/eval flag is
    restored afterwards. Returns None when the probe has no batch at all.

    Args:
        errors: If given, an exception while turning a batch's hidden states into statistics
            is appended here and the remaining forward passes still run (their statistics are
            discarded): under FSDP and ZeRO-3 every forward is a collective, so a rank that
            stopped early would hang the others. The caller decides, collectively, what to do.
        model, probe, normalize, target, offset, batch_size, seed, rtol: As in :func:`measure`.
    """
    if target not in MEASURE_TARGETS:
        raise ValueError(f"Unknown target {target!r}; choose one of {MEASURE_TARGETS}.")
    device = model_device(model)
    capture = HiddenStateCapture(model, normalize)
    mapping = None
    if target == "token_id_shuffled":
        table = shuffled_ids(probe.target_ids(offset), seed)
        mapping = torch.zeros(max(table) + 1, dtype=torch.long)
        mapping[list(table)] = torch.tensor(list(table.values()))
        mapping = mapping.to(device)
    classes = probe.target_ids(offset) if target == "onehot" else None
    modes = {module: module.training for module in model.modules()}
    stats: ResidualStats | None = None
    model.eval()
    try:
        with torch.no_grad():
            for input_ids, attention_mask in probe.batches(batch_size):
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                positions = example_mask(attention_mask, offset)
                hidden = capture.forward(input_ids, attention_mask)
                if errors:
                    continue  # keep the forward passes in step with the other ranks
                try:
                    features = capture.features(hidden, positions)  # (L + 1, n, d)
                    targets = example_targets(input_ids, offset)[positions]  # (n,)
                    if mapping is not None:
                        targets = mapping[targets]
                    if stats is None:
                        stats = ResidualStats(
                            features.shape[0],
                            features.shape[2],
                            target="onehot" if target == "onehot" else "token_id",
                            classes=classes,
                            device=device,
                            rtol=rtol,
                        )
                    stats.update(features, targets)
                except Exception as error:
                    if errors is None:
                        raise
                    errors.append(error)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return stats


def measure(
    model: nn.Module,
    probe: ProbeSet,
    *,
    normalize: Normalize = "auto",
    target: MeasureTarget = "token_id",
    offset: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
) -> Snapshot:
    """Measure the law of equi-learning on ``model`` with ``probe`` (He & Su's protocol).

    Only the base model runs (no LM head, so no vocabulary logits); hidden states are reduced to
    sufficient statistics batch by batch and solved once for all layers.

    Args:
        model: A Hugging Face causal LM (GPT-2, Llama, ... any model with ``hidden_states``).
        probe: The probe sequences.
        normalize: Norm applied to entries ``0 … L-1``: ``"auto"`` (the paper's fresh
            final-norm of the model's own type), ``"layernorm"``, ``"rmsnorm"``,
            ``"standardize"`` or ``"none"``. The last entry is always the model's final norm.
        target: ``"token_id"`` (the paper's scalar id), ``"token_id_shuffled"`` (ids permuted
            by a seeded random permutation: the paper's control) or ``"onehot"``.
        offset: Target position relative to the feature (1 = next token, the paper's; 0 =
            current, 2 = next-next, -1 = previous).
        batch_size: Probe sequences per forward pass.
        seed: Seed of the shuffled-vocabulary permutation.
        rtol: Rank tolerance of the solve (see :mod:`lawwatch.residual`).

    Returns:
        A :class:`Snapshot` (``step`` unset).
    """
    start = time.perf_counter()
    stats = accumulate(
        model,
        probe,
        normalize=normalize,
        target=target,
        offset=offset,
        batch_size=batch_size,
        seed=seed,
        rtol=rtol,
    )
    if stats is None:
        raise ValueError("The probe holds no sequence; build it with at least one text.")
    pr = stats.compute().cpu()
    return Snapshot(
        pr=pr,
        fit=fit_law(pr),
        n_tokens=int(stats.count.item()),
        seconds=time.perf_counter() - start,
    )
