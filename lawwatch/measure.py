"""One measurement of the law on a model: probe → features → statistics → PR → fit."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lawwatch.capture import BlockSpec, Capture, FinalNormSpec, LayerSpec, evaluating
from lawwatch.law import LawFit, fit_law
from lawwatch.models import check_probe
from lawwatch.norms import Normalize
from lawwatch.probe import ProbeSet, example_mask, example_targets
from lawwatch.residual import DEFAULT_RTOL, ResidualStats
from lawwatch.targets import (
    DEFAULT_MAX_ONEHOT_BYTES,
    MEASURE_TARGETS,
    MeasureTarget,
    Targets,
)

__all__ = [
    "MEASURE_TARGETS",
    "MeasureTarget",
    "Snapshot",
    "accumulate",
    "measure",
    "model_device",
]

# below this many examples per feature dimension PR is noisy (OLS with d + 1 parameters)
_EXAMPLES_PER_DIM = 10


@dataclass
class Snapshot:
    """The law measured once.

    Attributes:
        pr: ``(entries,)`` float64 prediction residual of every measured hidden-state entry,
            on CPU.
        fit: The law fitted to ``pr`` at the true entry indices (entry 0 dropped).
        n_tokens: Examples (position, target) the statistics hold.
        seconds: Wall time of the measurement.
        step: Training step, when taken during training.
        extra: More fields for :meth:`as_dict`.
        layers: The true hidden-state entry index of each value of ``pr`` (entry 0 = the
            embeddings); default ``0 … len(pr)-1``.
    """

    pr: torch.Tensor
    fit: LawFit
    n_tokens: int
    seconds: float
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self.layers = tuple(range(len(self.pr))) if self.layers is None else tuple(self.layers)
        if len(self.layers) != len(self.pr):
            raise ValueError(f"{len(self.layers)} layers for {len(self.pr)} PR values.")

    @classmethod
    def from_stats(
        cls, stats: ResidualStats, *, seconds: float, step: int | None = None
    ) -> Snapshot:
        """Solve ``stats`` (all processes' examples, after any all-reduce) and fit the law.

        Warns when the examples are fewer than 10 per feature dimension (PR is noisy there).
        """
        n = int(stats.count.item())
        if stats.dim + 1 < n < _EXAMPLES_PER_DIM * stats.dim:
            warnings.warn(
                f"The probe gives {n} examples for hidden size {stats.dim}, fewer than "
                f"{_EXAMPLES_PER_DIM}x; PR is noisy there. Use more or longer probe sequences.",
                stacklevel=2,
            )
        pr = stats.compute().cpu()
        return cls(
            pr=pr,
            fit=fit_law(pr, layers=stats.layers),
            n_tokens=n,
            seconds=seconds,
            step=step,
            layers=stats.layers,
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record: step, pr (list), layers, the fit's fields, n_tokens, seconds."""
        return {
            "step": self.step,
            "pr": self.pr.tolist(),
            "layers": list(self.layers),
            **self.fit.as_dict(),
            "n_tokens": self.n_tokens,
            "seconds": self.seconds,
            **self.extra,
        }


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
    layers: LayerSpec | None = None,
    blocks: BlockSpec | None = None,
    final_norm: FinalNormSpec | None = None,
    onehot_top_k: int | None = None,
    max_onehot_bytes: int = DEFAULT_MAX_ONEHOT_BYTES,
) -> ResidualStats | None:
    """Run ``probe`` through ``model`` and return its sufficient statistics (not yet solved).

    The model is run in eval mode under ``torch.no_grad()`` and each module's train/eval flag is
    restored afterwards. Returns None when the probe has no batch at all. Everything decided
    before the first forward depends only on the model and the *whole* probe (a shard resolves
    against the set it was cut from), so every process raises, or not, alike.

    Args:
        errors: If given, an exception while turning a batch's hidden states into statistics
            is appended here and the remaining forward passes still run (their statistics are
            discarded): under FSDP and ZeRO-3 every forward is a collective, so a rank that
            stopped early would hang the others. The caller decides, collectively, what to do.
        model, probe, normalize, target, offset, batch_size, seed, rtol, layers, blocks,
            final_norm, onehot_top_k, max_onehot_bytes: As in :func:`measure`.
    """
    device = model_device(model)
    targets = Targets.build(target, probe, offset=offset, seed=seed, onehot_top_k=onehot_top_k)
    capture = Capture(model, normalize, blocks=blocks, final_norm=final_norm, layers=layers)
    check_probe(model, probe)  # the whole probe: every rank decides alike
    stats: ResidualStats | None = None
    with evaluating(model):
        for input_ids, attention_mask in probe.batches(batch_size):
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            positions = example_mask(attention_mask, offset)  # (batch, length)
            hidden = capture.forward(input_ids, attention_mask, positions)
            if errors:
                continue  # keep the forward passes in step with the other ranks
            try:
                features = capture.features(hidden)  # (len(layers), n, d)
                ids = targets(example_targets(input_ids, offset)[positions])  # (n,)
                if stats is None:
                    targets.check_memory(len(capture.layers), features.shape[2], max_onehot_bytes)
                    stats = ResidualStats(
                        features.shape[0],
                        features.shape[2],
                        target=targets.kind,
                        classes=targets.classes,
                        device=device,
                        rtol=rtol,
                        layers=capture.layers,
                    )
                stats.update(features, ids)
            except Exception as error:
                if errors is None:
                    raise
                errors.append(error)
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
    layers: LayerSpec | None = None,
    blocks: BlockSpec | None = None,
    final_norm: FinalNormSpec | None = None,
    onehot_top_k: int | None = None,
    max_onehot_bytes: int = DEFAULT_MAX_ONEHOT_BYTES,
) -> Snapshot:
    """Measure the law of equi-learning on ``model`` with ``probe`` (He & Su's protocol).

    The residual stream is captured with hooks (see :mod:`lawwatch.capture`); a Hugging Face
    model runs with ``logits_to_keep=1``, so no ``(batch, length, vocab)`` logits exist. Hidden
    states are reduced to sufficient statistics batch by batch and solved once for all layers.

    Args:
        model: A Hugging Face model (GPT-2, Llama, Mamba, RWKV, …: blocks and final norm are
            found automatically), or any ``torch.nn.Module`` called as ``model(input_ids)``
            whose ``blocks`` and ``final_norm`` are named.
        probe: The probe sequences.
        normalize: Map applied to entries ``0 … L-1``: ``"auto"`` (the paper's fresh
            final-norm of the model's own type and epsilon), ``"layernorm"``, ``"rmsnorm"``,
            ``"standardize"`` (per-token z-score) or ``"none"``. The last entry is the model's
            final norm.
        target: ``"token_id"`` (the paper's scalar id), ``"token_id_shuffled"`` (ids permuted
            by a seeded random permutation of the distinct ids: the paper's control) or
            ``"onehot"`` (multi-output PR over the ids present).
        offset: Target position relative to the feature (1 = next token, the paper's; 0 =
            current, 2 = next-next, -1 = previous).
        batch_size: Probe sequences per forward pass.
        seed: Seed of the shuffled-vocabulary permutation.
        rtol: Rank tolerance of the solve (see :mod:`lawwatch.residual`).
        layers: Entries to measure: an int ``k`` (every k-th entry plus the last) or a list of
            entry indices; only those are normalized and accumulated. Default all.
        blocks: The residual-stream blocks: a module name, glob (``"transformer.h.*"``), regex
            or list; default found on Hugging Face models.
        final_norm: The final norm: a module name or module, or a :class:`NormSpec` for a
            model without one; default found by name.
        onehot_top_k: For ``"onehot"``: a class for the k most frequent ids plus one for the
            rest, to bound memory.
        max_onehot_bytes: Refuse one-hot statistics (``entries × d × classes × 8`` bytes)
            larger than this; the error names the ``onehot_top_k`` that fits.

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
        layers=layers,
        blocks=blocks,
        final_norm=final_norm,
        onehot_top_k=onehot_top_k,
        max_onehot_bytes=max_onehot_bytes,
    )
    if stats is None or stats.count.item() == 0:
        raise ValueError(
            f"The probe gives no example at offset={offset}; build it with sequences of at "
            "least two tokens."
        )
    return Snapshot.from_stats(stats, seconds=time.perf_counter() - start)
