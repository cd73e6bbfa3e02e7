"""What each example is regressed on: the target option resolved once against the probe.

The paper's target is the next token's id as a number; its control permutes the distinct ids
at random first; the one-hot target regresses the indicator of the id (multi-output PR:
``‖Y − XW‖²_F / ‖Y − Ȳ‖²_F`` over the classes, see ``docs/protocol.md``). The permutation
and the one-hot classes are built from the *whole* probe, never a shard of it, so every
process of a distributed run regresses the same targets and its statistics can be summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lawwatch.probe import ProbeSet, example_targets

MeasureTarget = Literal["token_id", "token_id_shuffled", "onehot"]
MEASURE_TARGETS: tuple[str, ...] = ("token_id", "token_id_shuffled", "onehot")

OTHER = -1
"""The one-hot class of every id outside the ``onehot_top_k`` most frequent."""

DEFAULT_MAX_ONEHOT_BYTES = 2**30
"""1 GiB of one-hot statistics: fits next to training on any current accelerator."""


def shuffled_ids(ids: torch.Tensor, seed: int = 0) -> dict[int, int]:
    """A seeded permutation of the distinct ``ids`` (the paper's shuffled-vocabulary control)."""
    distinct = torch.unique(ids)
    gen = torch.Generator().manual_seed(seed)
    perm = distinct[torch.randperm(distinct.numel(), generator=gen)]
    return dict(zip(distinct.tolist(), perm.tolist(), strict=True))


def target_counts(probe: ProbeSet, offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct target ids of ``probe``'s examples (sorted) and how often each occurs."""
    targets = example_targets(probe.input_ids, offset)[probe.example_positions(offset)]
    return torch.unique(targets, return_counts=True)


def top_ids(ids: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most frequent ids, sorted; ties go to the smaller id (deterministic)."""
    order = sorted(range(ids.numel()), key=lambda i: (-int(counts[i]), int(ids[i])))
    return torch.sort(ids[order[:k]]).values


def onehot_bytes(num_layers: int, dim: int, num_classes: int) -> int:
    """Bytes of the one-hot cross statistics ``Σx·yᵀ``: ``layers × d × classes`` float64."""
    return num_layers * dim * num_classes * 8


def human_bytes(n: int) -> str:
    """``n`` bytes in the largest unit of B, KiB, MiB, GiB, TiB that keeps it at least 1."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    if unit == "B":
        return f"{n} B"
    return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"


@dataclass(frozen=True)
class Targets:
    """A target option resolved against a probe.

    Attributes:
        target: The option: ``"token_id"``, ``"token_id_shuffled"`` or ``"onehot"``.
        offset: Target position relative to the feature (1 = next token).
        table: ``(max id + 1,)`` lookup applied to the ids (the permutation, or the top-k
            classes with :data:`OTHER` for the rest), or None for the ids as they are.
        classes: For ``"onehot"``: the sorted classes the statistics hold.
    """

    target: str
    offset: int
    table: torch.Tensor | None = None
    classes: torch.Tensor | None = None

    @property
    def kind(self) -> Literal["token_id", "onehot"]:
        """The :class:`~lawwatch.stats.residual.ResidualStats` target."""
        return "onehot" if self.target == "onehot" else "token_id"

    @classmethod
    def build(
        cls,
        target: str,
        probe: ProbeSet,
        *,
        offset: int = 1,
        seed: int = 0,
        onehot_top_k: int | None = None,
    ) -> Targets:
        """Resolve ``target`` against ``probe``: the whole probe, never a process's shard.

        Args:
            target: ``"token_id"``, ``"token_id_shuffled"`` or ``"onehot"``.
            probe: The probe set.
            offset: 1 = next token (the paper's), 0 = current, 2 = next-next, -1 = previous.
            seed: Seed of the shuffled-vocabulary permutation.
            onehot_top_k: For ``"onehot"``: keep a class for the k most frequent target ids
                and one class, :data:`OTHER`, for the rest (every example stays). Default: a
                class for every id present.
        """
        if target not in MEASURE_TARGETS:
            raise ValueError(f"Unknown target {target!r}; choose one of {MEASURE_TARGETS}.")
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"offset must be an int (1 = next token), got {offset!r}.")
        if onehot_top_k is not None and (target != "onehot" or onehot_top_k < 1):
            raise ValueError(
                f"onehot_top_k={onehot_top_k} needs target='onehot' and a positive count."
            )
        ids, counts = target_counts(probe, offset)
        if ids.numel() == 0:
            raise ValueError(
                f"The probe has no example at offset={offset}: no sequence has two real tokens "
                f"{abs(offset)} apart."
            )
        if ids.numel() < 2:  # every target alike: variance 0, PR = RSS / TSS undefined
            raise ValueError(
                f"The probe's targets take a single distinct value (token id {int(ids[0])} at "
                f"offset={offset}), so their variance is 0 and PR is undefined; the probe needs "
                "at least two different target tokens: use varied held-out text."
            )
        if target == "token_id":
            return cls(target, offset)
        table = torch.full((int(ids.max()) + 1,), OTHER, dtype=torch.long)
        if target == "token_id_shuffled":
            mapping = shuffled_ids(ids, seed)
            table[list(mapping)] = torch.tensor(list(mapping.values()), dtype=torch.long)
            return cls(target, offset, table)
        kept = ids if onehot_top_k is None else top_ids(ids, counts, onehot_top_k)
        table[kept] = kept
        classes = kept if kept.numel() == ids.numel() else torch.cat([torch.tensor([OTHER]), kept])
        return cls(target, offset, table if onehot_top_k is not None else None, classes)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Map ``(n,)`` target ids to what is regressed (ids, permuted ids or classes)."""
        if self.table is None:
            return ids
        return self.table.to(ids.device)[ids]

    def check_memory(self, num_layers: int, dim: int, max_bytes: int, copies: int = 1) -> None:
        """Refuse one-hot statistics larger than ``max_bytes``, naming the knobs that fit.

        Args:
            num_layers: Entries measured.
            dim: Feature dimension.
            max_bytes: The budget.
            copies: Sets of statistics kept (parts and jackknife groups; 1 normally).

        Raises:
            ValueError: ``copies × layers × d × classes × 8`` bytes exceed ``max_bytes``.
        """
        if self.classes is None:
            return
        k = self.classes.numel()
        need = copies * onehot_bytes(num_layers, dim, k)
        if need <= max_bytes:
            return
        sets = f" in {copies} sets (split / jackknife)" if copies > 1 else ""
        over = (
            f"target='onehot' over {k} classes at {num_layers} entries x {dim} dims needs "
            f"{human_bytes(need)} of float64 statistics (Σx·yᵀ){sets}, over "
            f"max_onehot_bytes={max_bytes} ({human_bytes(max_bytes)})."
        )
        max_bytes //= copies  # the budget of one set
        fits = max_bytes // onehot_bytes(num_layers, dim, 1) - 1  # kept ids, plus OTHER
        if fits >= 1:
            raise ValueError(
                f"{over} Pass onehot_top_k={fits} (the most frequent ids, the rest pooled in one "
                "class), measure fewer entries (layers=…), or raise max_onehot_bytes."
            )
        # not even one id and OTHER fit: onehot_top_k cannot help, only fewer entries or a budget
        entries = max_bytes // onehot_bytes(1, dim, 2)
        fewer = (
            f"measure at most {entries} entries (layers=…) with onehot_top_k=1"
            if entries >= 1
            else f"no single entry fits even with onehot_top_k=1 ({human_bytes(dim * 2 * 8)})"
        )
        raise ValueError(
            f"{over} Even onehot_top_k=1 (2 classes: the most frequent id and the rest pooled) "
            f"needs {human_bytes(copies * onehot_bytes(num_layers, dim, 2))}: {fewer}, or "
            f"raise max_onehot_bytes (at least {copies * onehot_bytes(num_layers, dim, 2)} for "
            "every entry with onehot_top_k=1)."
        )
