"""Logit-lens statistics: what each hidden-state entry already predicts through the model's head.

The *logit lens* applies the model's own final norm and unembedding (its LM head, found by
:func:`lawwatch.models.unembedding`) to each entry's hidden state and reads the result as a
next-token distribution. Per measured entry, over a deterministic subset of the probe's examples
(:func:`lens_rows`), :class:`LensStats` keeps additive sums: top-1 hits against the true next
token, cross-entropy (nats), KL divergence from the final distribution (the model's own, entry
``L``) and entropy; per example the first entry whose top-1 is the true next token and the entry
from which the top-1 equals the model's final top-1 at every later measured entry, reduced to
histograms over the entries. Every number is a sum or a count, so statistics of several
processes add up with one all-reduce, exactly like the PR statistics; :class:`Lensed` carries
them beside those (the same forward, the same collectives).

**Memory bound.** Logits are never held beyond a chunk of ``(entries + 1) · rows × V`` values
(``V`` the head's vocabulary; every measured entry and the final one, computed in one product
so the head is read once per chunk) with ``rows = max(1, LENS_CHUNK_BYTES // (8 · V ·
(entries + 1)))``: the chunk's log-probabilities, ``logsumexp``'s temporaries of the same size,
and two ``rows × V`` buffers (the final probabilities, one entry's), so the lens's transient is
about ``2 · LENS_CHUNK_BYTES`` (at least ``2 · (entries + 1) · V · 8`` bytes) whatever the
probe. The head's weight is held in the lens
precision while the snapshot's forward passes run: ``V × d`` values (8 bytes each in float64),
converted once rather than once per chunk and entry, and released (:meth:`LensStats.release`)
when they are done, before the solve. The hidden states it reads are the kept rows of each
entry, in the model's dtype (:meth:`lawwatch.capture.Capture.stream` with ``keep``):
``entries × m × d``.

**Breakdowns.** With ``breakdowns`` (axis name → labels: the probe's groups, position
buckets), each example's contributions to every sum also go, by ``index_add``, to the row of
its label on each axis (:meth:`LensStats.parts_record`): the same metrics per group and per
position bucket, for a few more sums (``labels × (6 · entries + 7)`` values), not another
pass through the head.

**Precision.** Logits, log-softmax and every reduction run in float64 with the statistics'
``precision="float64"`` (the default: within 1e-12 of a float64 reference); with ``"mixed"``
in IEEE float32 (no TF32), summed in float64. KL is taken between log-probabilities.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lawwatch.precision import exact_float32_matmul
from lawwatch.stats.beside import Beside

if TYPE_CHECKING:
    from lawwatch.models import Unembedding
    from lawwatch.stats import Statistics

__all__ = [
    "DEFAULT_LENS_FRACTION",
    "LENS_CHUNK_BYTES",
    "Kept",
    "LensKeys",
    "LensStats",
    "Lensed",
    "lens_rows",
]

# bytes of one chunk's logits, every entry's rows together (the bound: module docstring)
LENS_CHUNK_BYTES = 64 * 2**20
# the share of the probe's examples the lens reads by default: sized so that it adds at most
# about a quarter to a snapshot of the GPT-2-small shape (BENCHMARKS.md, "Logit lens")
DEFAULT_LENS_FRACTION = 1 / 64
# the golden ratio's fraction: each sequence starts its selection at its own phase
_PHASE = (math.sqrt(5) - 1) / 2


class LensKeys:
    """The keys of the logit lens's part of a record, spelled once (``docs/lens.md``).

    A record measured with the lens holds ``record[LensKeys.FIELD]`` (a dict, written by
    :meth:`LensStats.record`); the trackers' keys (:func:`lawwatch.output.sinks.lens_scalars`),
    the report's figure and the demo read these names from here.
    """

    FIELD = "lens"
    """The record's field (``Snapshot.extra[FIELD]``) holding the lens's metrics."""
    TOP1, CE, KL, ENTROPY = "top1", "ce", "kl", "entropy"
    PER_ENTRY = (TOP1, CE, KL, ENTROPY)
    """Means over the examples read, one value per measured entry: top-1 accuracy against the
    true next token, cross-entropy (nats), KL divergence from the final distribution,
    entropy."""
    FIRST_CORRECT, FINAL = "first_correct", "final"
    DEPTHS = (FIRST_CORRECT, FINAL)
    """Prediction-depth histograms: example counts per measured entry plus a last bin for
    "never": the first entry whose top-1 is correct, the entry from which the top-1 is the
    model's final one."""
    FIRST_CORRECT_MEAN, FINAL_MEAN, GAP_MEAN = "first_correct_mean", "final_mean", "gap_mean"
    MEANS = (FIRST_CORRECT_MEAN, FINAL_MEAN, GAP_MEAN)
    """Mean entry index over the examples that have one (None without); the gap over those
    that have both."""
    EXAMPLES, FRACTION = "examples", "fraction"
    """How many examples the lens read, and the share of the probe's examples that is."""

    @staticmethod
    def of(record: Mapping[str, Any]) -> dict[str, Any] | None:
        """The lens's part of a record, or None for a record measured without the lens."""
        lens = record.get(LensKeys.FIELD)
        return lens if isinstance(lens, dict) else None


def lens_rows(positions: torch.Tensor, sequences: torch.Tensor, fraction: float) -> torch.Tensor:
    """The examples of a batch the lens reads: indices into its ``n`` examples (row-major).

    Example ``p`` of sequence ``s`` (its ``p``-th example position) is read when
    ``⌊(p + 1)·f + φ_s⌋ > ⌊p·f + φ_s⌋`` with ``φ_s = frac(s · 0.618…)``: evenly spaced
    within each sequence, about a fraction ``f`` of all examples, decided by ``(s, p)`` alone
    (so every shard of the probe picks the same examples, and a batch size changes nothing).
    ``f = 1`` reads every example.

    Args:
        positions: ``(batch, length)`` bool example mask.
        sequences: ``(n,)`` each example's sequence index in the whole probe.
        fraction: ``f`` in ``(0, 1]``.
    """
    index = (positions.long().cumsum(dim=1) - 1)[positions]  # (n,) p of each example
    if fraction >= 1:
        return torch.arange(index.numel(), device=positions.device)
    phase = torch.frac(sequences.to(torch.float64) * _PHASE)
    p = index.to(torch.float64)
    chosen = torch.floor((p + 1) * fraction + phase) > torch.floor(p * fraction + phase)
    return chosen.nonzero().squeeze(1)


@dataclass
class Kept:
    """What one batch's forward left for the lens, at the kept example rows.

    Attributes:
        entries: Per measured entry, ``(m, d)`` its hidden state before the final norm, in the
            model's dtype (for entry ``L``: the final norm's input).
        final: ``(m, d)`` the final norm's input (the model's own last hidden state).
        norm: The model's final norm in float64 (its parameters as captured in the forward).
    """

    entries: list[torch.Tensor]
    final: torch.Tensor
    norm: Callable[[torch.Tensor], torch.Tensor]


class LensStats:
    """Additive logit-lens sums of the measured entries (see the module docstring).

    Args:
        layers: The measured entries' true indices (the histograms' bins, plus "never").
        device: Where the sums live.
        precision: ``"float64"`` (logits and log-softmax in float64) or ``"mixed"`` (float32).
        fraction: The share of examples read (recorded).

    Attributes:
        sums: One float64 vector holding every sum (one collective reduces them all).
    """

    # per-entry sums, in this order, then the two histograms (entries + 1 bins), then scalars
    _PER_ENTRY = LensKeys.PER_ENTRY
    _SCALARS = ("count", "first_sum", "final_sum", "gap_sum", "gap_count")

    def __init__(
        self,
        layers: Sequence[int],
        *,
        device: torch.device | str = "cpu",
        precision: str = "float64",
        fraction: float = 1.0,
        breakdowns: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.layers = tuple(layers)
        self.precision = precision
        self.fraction = fraction
        self.dtype = torch.float64 if precision == "float64" else torch.float32
        e = len(self.layers)
        size = len(self._PER_ENTRY) * e + 2 * (e + 1) + len(self._SCALARS)
        self.sums = torch.zeros(size, dtype=torch.float64, device=device)
        # per axis of the breakdowns: its labels, and (labels, size) sums laid out like `sums`
        self.labels = {axis: tuple(labels) for axis, labels in (breakdowns or {}).items()}
        self.parts = {
            axis: torch.zeros(len(labels), size, dtype=torch.float64, device=device)
            for axis, labels in self.labels.items()
        }
        self._head: tuple[tuple, torch.Tensor] | None = None  # see _weight

    # -- the layout of `sums` -----------------------------------------------------------------

    def _part(self, name: str, sums: torch.Tensor | None = None) -> torch.Tensor:
        sums = self.sums if sums is None else sums
        e = len(self.layers)
        if name in self._PER_ENTRY:
            i = self._PER_ENTRY.index(name)
            return sums[i * e : (i + 1) * e]
        base = len(self._PER_ENTRY) * e
        if name == "first_hist":
            return sums[base : base + e + 1]
        if name == "final_hist":
            return sums[base + e + 1 : base + 2 * (e + 1)]
        i = base + 2 * (e + 1) + self._SCALARS.index(name)
        return sums[i : i + 1]

    @property
    def count(self) -> int:
        """Examples read."""
        return int(self._part("count").item())

    # -- updates and reductions ---------------------------------------------------------------

    def add(
        self,
        kept: Kept,
        targets: torch.Tensor,
        head: Unembedding,
        labels: Mapping[str, torch.Tensor] | None = None,
    ) -> LensStats:
        """Add a batch's kept rows: ``targets`` ``(m,)`` the true next token of each.

        Args:
            kept: The rows' hidden states (see :class:`Kept`).
            targets: ``(m,)`` their true next tokens.
            head: The unembedding read through.
            labels: Per axis of the breakdowns, ``(m,)`` each row's label index on it.

        Raises:
            ValueError: The head's width is not the hidden states', an entry is missing, or
                the labels do not match the breakdowns.
        """
        m = targets.numel()
        if len(kept.entries) != len(self.layers):
            raise ValueError(f"{len(kept.entries)} kept entries for {len(self.layers)} measured.")
        labels = dict(labels or {})
        if set(labels) != set(self.parts):
            raise ValueError(
                f"Lens labels for axes {sorted(labels)}, but the breakdowns are "
                f"{sorted(self.parts)}."
            )
        if m == 0:
            return self
        weight = head.weight
        if weight.shape[1] != kept.final.shape[1]:
            raise ValueError(
                f"The head {head.name!r} maps width {weight.shape[1]}, but the hidden states "
                f"have width {kept.final.shape[1]}: lens_head must name the unembedding."
            )
        vocab = weight.shape[0]
        # every entry's rows of a chunk in one product: the head is read once per chunk
        rows = max(1, LENS_CHUNK_BYTES // (8 * vocab * (e_all := len(self.layers) + 1)))
        device = self.sums.device
        e = len(self.layers)
        entry_index = torch.tensor(self.layers, dtype=torch.float64, device=device)
        labels = {axis: index.to(device) for axis, index in labels.items()}
        context = exact_float32_matmul() if self.dtype == torch.float32 else nullcontext()
        with context:
            for lo in range(0, m, rows):
                part = slice(lo, lo + rows)
                target = targets[part].to(device)
                raw = torch.cat([kept.final[part], *(r[part] for r in kept.entries)])
                every, top_all = self._log_probs(raw, kept.norm, head)  # (e_all · rows, V)
                every = every.view(e_all, -1, every.shape[1])
                top_all = top_all.view(e_all, -1)
                final_logp, final_top = every[0], top_all[0]
                final_p = final_logp.exp()
                neg_entropy = _rowdot(final_p, final_logp)  # Σ p_f log p_f
                # each row's contribution to every sum, laid out like `sums`: (rows, size)
                per_entry = torch.zeros(
                    len(self._PER_ENTRY), e, target.numel(), dtype=torch.float64, device=device
                )
                tops = []
                for i in range(len(kept.entries)):
                    logp, top = every[i + 1], top_all[i + 1]
                    tops.append(top)
                    per_entry[0, i] = (top == target).to(torch.float64)
                    per_entry[1, i] = -logp.gather(1, target[:, None]).squeeze(1)
                    per_entry[2, i] = neg_entropy - _rowdot(final_p, logp)
                    per_entry[3, i] = -_rowdot(logp.exp(), logp)
                del final_p, every
                tops = torch.stack(tops)  # (entries, rows)
                depth = self._depth(tops, final_top, target, entry_index)
                rows_sums = torch.cat([per_entry.reshape(-1, target.numel()).T, depth], dim=1)
                self.sums += rows_sums.sum(dim=0)
                for axis, index in labels.items():
                    self.parts[axis].index_add_(0, index[part], rows_sums)
        return self

    def _log_probs(
        self, raw: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor], head: Unembedding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, V)`` log-probabilities of the lens on ``raw`` rows, and their top-1 ids."""
        device = self.sums.device
        g = norm(raw.to(device=device, dtype=torch.float64)).to(self.dtype)  # (rows, d)
        bias = head.bias
        z = g @ self._weight(head).T  # (rows, V)
        if bias is not None:
            z += bias.to(device=device, dtype=self.dtype)
        if head.scale != 1.0:
            z *= head.scale
        if head.softcap is not None:
            z.div_(head.softcap).tanh_().mul_(head.softcap)
        top = z.argmax(dim=1)
        z -= torch.logsumexp(z, dim=1, keepdim=True)
        return z.to(torch.float64) if self.dtype != torch.float64 else z, top

    def _weight(self, head: Unembedding) -> torch.Tensor:
        """``(V, d)`` the head's weight in the lens precision, converted once per snapshot.

        Kept while the weight is unchanged (same tensor, same version): one ``V × d`` copy
        (8 bytes a value in float64) for the whole probe instead of one per chunk and entry.
        """
        weight = head.weight
        key = (weight.data_ptr(), weight._version, self.dtype, self.sums.device)
        if self._head is None or self._head[0] != key:
            self._head = (key, weight.to(device=self.sums.device, dtype=self.dtype))
        return self._head[1]

    def release(self) -> None:
        """Drop the head's weight converted by :meth:`add` (``V × d`` values): adding is done.

        The sums stay; a later :meth:`add` converts the weight again. Called when a snapshot's
        forward passes are done, so a solve in the background holds no copy of the head while
        training goes on.
        """
        self._head = None

    def _depth(
        self,
        tops: torch.Tensor,
        final_top: torch.Tensor,
        target: torch.Tensor,
        entry_index: torch.Tensor,
    ) -> torch.Tensor:
        """Prediction depth of a chunk, ``tops`` ``(entries, rows)`` top-1 ids.

        Returns:
            ``(rows, 2 · (entries + 1) + 5)`` each row's part of the two histograms (one-hot)
            and of the scalars (count, first, final, gap, gap count), laid out like ``sums``.
        """
        e = tops.shape[0]
        correct = tops == target  # (entries, rows)
        # first correct: the first True; `e` (the "never" bin) where none is
        first = torch.where(correct.any(dim=0), correct.int().argmax(dim=0), e)
        # final: the start of the trailing run agreeing with the model's final top-1
        agree = tops == final_top
        trailing = agree.flip(0).int().cumprod(dim=0).sum(dim=0)
        final = e - trailing  # `e` when the last measured entry disagrees: "never"
        hot = torch.eye(e + 1, dtype=torch.float64, device=entry_index.device)
        padded = torch.cat([entry_index, entry_index.new_zeros(1)])  # bin e -> 0 (masked)
        has_first, has_final = first < e, final < e
        both = (has_first & has_final).to(torch.float64)
        scalars = torch.stack(
            [
                torch.ones_like(both),
                padded[first] * has_first,
                padded[final] * has_final,
                (padded[final] - padded[first]) * both,
                both,
            ],
            dim=1,
        )
        return torch.cat([hot[first], hot[final], scalars], dim=1)

    def all_reduce(self, group: object | None = None) -> LensStats:
        """Sum the statistics of every process of ``group`` in place (one collective)."""
        import torch.distributed as dist

        if not self.parts:
            dist.all_reduce(self.sums, group=group)
            return self
        flat = torch.cat([self.sums, *(p.reshape(-1) for p in self.parts.values())])
        dist.all_reduce(flat, group=group)
        self.sums = flat[: self.sums.numel()].clone()
        at = self.sums.numel()
        for axis, part in self.parts.items():
            self.parts[axis] = flat[at : at + part.numel()].view_as(part).clone()
            at += part.numel()
        return self

    def merge(self, other: LensStats) -> LensStats:
        """Add ``other``'s sums (the same entries and breakdowns) into these."""
        if other.layers != self.layers or other.labels != self.labels:
            raise ValueError(
                f"Lens statistics of entries {other.layers} and {self.layers} (breakdowns "
                f"{other.labels} and {self.labels})."
            )
        self.sums += other.sums.to(self.sums.device)
        for axis, part in other.parts.items():
            self.parts[axis] += part.to(self.sums.device)
        return self

    def to(self, device: torch.device | str) -> LensStats:
        """Move the sums to ``device`` in place."""
        self.sums = self.sums.to(device)
        self.parts = {axis: part.to(device) for axis, part in self.parts.items()}
        return self

    # -- results ------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The lens fields of a snapshot's record (JSON-ready; see ``docs/lens.md``).

        ``top1``, ``ce``, ``kl``, ``entropy``: per measured entry, means over the examples
        read (NaN, with a warning, when the lens read none). ``first_correct``, ``final``:
        histograms over the measured entries plus a last bin for "never"; ``*_mean``: mean
        entry index over the examples that have one (None without), ``gap_mean`` over those
        that have both.
        """
        n = self.count
        if n == 0:  # means over no example are unknown, not 0 (a CE of 0 reads as perfect)
            warnings.warn(
                f"The logit lens read no example of the probe (lens={self.fraction:g} of its "
                "examples chose none): its top-1, cross-entropy, KL and entropy are NaN. Raise "
                "lens= (1.0 reads every example) or use a larger probe.",
                stacklevel=2,
            )
        return self._record_of(self.sums)

    def parts_record(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The lens fields per label of each breakdown axis: ``{axis: {label: fields}}``.

        Each label's fields are :meth:`record`'s over its examples alone (``examples`` 0 and
        NaN means, without a warning, for a label that read none).
        """
        return {
            axis: {
                label: self._record_of(self.parts[axis][i])
                for i, label in enumerate(self.labels[axis])
            }
            for axis in self.parts
        }

    def _record_of(self, sums: torch.Tensor) -> dict[str, Any]:
        """:meth:`record`'s fields from a sums vector laid out like :attr:`sums`."""
        n = int(self._part("count", sums).item())
        out: dict[str, Any] = {LensKeys.EXAMPLES: n, LensKeys.FRACTION: self.fraction}
        for name in self._PER_ENTRY:
            values = self._part(name, sums)
            out[name] = (values / n).tolist() if n else [math.nan] * len(self.layers)
        first, final = self._part("first_hist", sums), self._part("final_hist", sums)
        out[LensKeys.FIRST_CORRECT] = [int(v) for v in first.tolist()]
        out[LensKeys.FINAL] = [int(v) for v in final.tolist()]
        for total, hist, name in (
            ("first_sum", first, LensKeys.FIRST_CORRECT_MEAN),
            ("final_sum", final, LensKeys.FINAL_MEAN),
            ("gap_sum", self._part("gap_count", sums), LensKeys.GAP_MEAN),
        ):
            # the examples that have one: every bin but "never" (the gap: those with both)
            have = float(hist[:-1].sum()) if name != LensKeys.GAP_MEAN else float(hist.sum())
            out[name] = float(self._part(total, sums)) / have if have else None
        return out


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(rows,)`` row-wise dot products of two ``(rows, V)`` tensors, no such temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class Lensed(Beside):
    """PR statistics with the logit lens's beside them: one :class:`~lawwatch.stats.Statistics`.

    Everything of the protocol is the inner statistics'; the lens's sums travel with them:
    :meth:`all_reduce` and :meth:`reduce_scatter` (a collective on every process) also
    all-reduce :attr:`lens`, so after either every process holds the whole probe's lens sums,
    and :func:`lawwatch.measurement.solve` puts them into the record.

    Args:
        inner: The PR statistics (plain or partitioned).
        lens: The lens's sums, over the same entries.
    """

    def __init__(self, inner: Statistics, lens: LensStats) -> None:
        super().__init__(inner, lens)

    @property
    def lens(self) -> LensStats:
        """The logit lens's sums (the carried ones)."""
        return self.carried
