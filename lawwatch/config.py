"""MeasureConfig: every option of a measurement, documented and validated in one place.

:func:`lawwatch.measure`, :class:`lawwatch.LawWatch`, :class:`lawwatch.LawWatchCallback`, the
recipes' YAML (``lawwatch.measure:``) and the command line all take a :class:`MeasureConfig`;
their keyword arguments are a convenience that builds one (:meth:`MeasureConfig.build`). Each
field's docstring is its documentation everywhere, ``--help`` included. :class:`Options` is
what it shares with the monitor's settings (:class:`lawwatch.watch.config.WatchConfig`).
"""

from __future__ import annotations

import ast
import inspect
import itertools
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Literal, TypeVar

import torch

from lawwatch.norms import NORMALIZE, Normalize, NormSpec
from lawwatch.precision import STATS_PRECISIONS, StatsPrecision
from lawwatch.stats.lens import DEFAULT_LENS_FRACTION
from lawwatch.structure import BlockSpec, FinalNormSpec
from lawwatch.targets import DEFAULT_MAX_ONEHOT_BYTES, MEASURE_TARGETS, MeasureTarget

__all__ = ["ENTRIES", "METRICS", "MeasureConfig", "Options", "field_docs"]

Metric = Literal["pr", "separation_fuzziness"]
Entries = Literal["hooks", "hidden_states"]
ENTRIES: tuple[str, ...] = ("hooks", "hidden_states")
METRICS: tuple[str, ...] = ("pr", "separation_fuzziness")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_O = TypeVar("_O", bound="Options")


class Options:
    """What the option dataclasses share (:class:`MeasureConfig`, ``WatchConfig``).

    A frozen dataclass whose fields are validated in ``__post_init__`` gets here: its field
    names, building from a config plus keyword overrides (strict on names), a copy with changes,
    and plain-dict conversion for YAML, JSON and the command line.
    """

    _what: ClassVar[str] = "options"  # what an unknown name is called in the error
    _argument: ClassVar[str] = "config"  # the parameter a config is passed as

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names, in declaration order."""
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    @classmethod
    def build(cls: type[_O], config: _O | None = None, **options: Any) -> _O:
        """``config`` (default: every field's default) with ``options`` overriding its fields.

        Raises:
            TypeError: An option that is not a field, naming the valid ones; a ``config`` of
                another type.
            ValueError: An invalid value (see the field's documentation).
        """
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"Unknown {cls._what} {unknown}; the {cls._what} are the fields of "
                f"lawwatch.{cls.__name__}: {list(cls.names())}."
            )
        if config is not None and not isinstance(config, cls):
            raise TypeError(
                f"{cls._argument} must be a lawwatch.{cls.__name__}, got "
                f"{type(config).__name__}; build one with {cls.__name__}(...) or "
                f"{cls.__name__}.from_dict(...)."
            )
        return replace(config, **options) if config is not None else cls(**options)  # type: ignore[type-var]

    @classmethod
    def from_dict(cls: type[_O], values: Mapping[str, Any] | None) -> _O:
        """From a plain mapping (a YAML section, parsed command-line options); strict on names."""
        return cls.build(**dict(values or {}))

    def replace(self: _O, **options: Any) -> _O:
        """A copy with ``options`` changed (validated like the constructor)."""
        return self.build(self, **options)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (an object without a plain form: named by type)."""
        return {name: _plain(getattr(self, name)) for name in self.names()}


@dataclass(frozen=True)
class MeasureConfig(Options):
    """How the law is measured: the paper's protocol by default, every ablation as an option.

    Immutable; derive variants with :meth:`replace`. Invalid values are refused when the config
    is built, with the reason and the valid choices, so a bad setting fails before training
    starts rather than at every snapshot.
    """

    _what: ClassVar[str] = "measurement options"

    normalize: Normalize = "auto"
    """Map applied to hidden-state entries 0 … L-1 before the regression: 'auto' (the paper's:
    a freshly initialized norm of the model's own final-norm kind and epsilon), 'layernorm',
    'rmsnorm', 'standardize' (per-token z-score) or 'none' (the raw residual stream). The last
    entry is always the model's own final norm."""
    target: MeasureTarget = "token_id"
    """What is regressed: 'token_id' (the paper's: the token id as a number),
    'token_id_shuffled' (ids after a seeded permutation of the distinct ids: the paper's control)
    or 'onehot' (multi-output PR over the ids present)."""
    offset: int = 1
    """Target position relative to the feature: 1 = next token (the paper's), 0 = current,
    2 = next-next, -1 = previous."""
    layers: int | tuple[int, ...] | None = None
    """Entries to measure: None (all), an int k (every k-th entry plus the last), or entry
    indices (negative ones count from the end). Statistics cost entries × d² × 8 bytes."""
    blocks: BlockSpec | None = None
    """The residual-stream blocks: a module name (a ModuleList stands for its children), a glob
    ('transformer.h.*'), a compiled regex (full match; written 're:PATTERN' in a dict, YAML or
    on the command line) or a list of names or modules. Default: found automatically on Hugging
    Face models."""
    final_norm: FinalNormSpec | None = None
    """The model's final norm: a module name or module, or a NormSpec for a model without one
    (written {kind, eps, weight_offset} in a dict or YAML). Default: found by name (ln_f, norm,
    final_layer_norm, norm_f, ln_out, final_layernorm)."""
    onehot_top_k: int | None = None
    """For target='onehot' (and metric='separation_fuzziness'): a class for each of the k most
    frequent target ids plus one class for all others (no example is dropped), to bound memory.
    Default: a class per id."""
    max_onehot_bytes: int = DEFAULT_MAX_ONEHOT_BYTES
    """Refuse one-hot statistics (entries × d × classes × 8 bytes) above this many bytes; the
    error names the onehot_top_k that fits."""
    batch_size: int = 8
    """Probe sequences per forward pass: the snapshot's peak activation memory."""
    seed: int = 0
    """Seed of the shuffled-vocabulary permutation (target='token_id_shuffled')."""
    rtol: float | None = None
    """Rank tolerance of the least-squares solve: directions of the correlation-scaled Gram
    with eigenvalue below rtol × the largest are treated as exactly dependent. Default: the
    statistics precision's (1e-11 for 'float64', 1e-7 for 'mixed')."""
    metric: Metric = "pr"
    """What is measured per entry and fitted against depth (log10): 'pr' (the prediction
    residual, the paper's) or 'separation_fuzziness' (He & Su's alternative, Tr(SS_w SS_b⁺) over
    the target-id classes: keeps entries × d × classes one-hot sums, bounded by onehot_top_k and
    max_onehot_bytes; target must be 'token_id' or 'onehot')."""
    entries: Entries = "hooks"
    """How hidden-state entries are numbered: 'hooks' (entry 0 = the embeddings, entry l = block
    l's output, the last = the final norm's output) or 'hidden_states' (as the model's
    output_hidden_states: for Mamba and RWKV, which omit the embeddings, entry k = block k+1's
    output; the same as 'hooks' for other models). 'hidden_states' reproduces the authors'
    numbers for Mamba and RWKV."""
    split: float | None = None
    """Out-of-sample PR: the fraction of probe sequences held out for evaluation (sequence i is
    held out when frac(i·0.618…) < split); OLS is fitted on the rest and PR is the held-out
    part's residual sum of squares over its total sum of squares about its own mean. None:
    in-sample (the paper's; biased low by about d/n). Doubles the statistics' memory."""
    jackknife: int | Literal["auto"] | None = "auto"
    """Jackknife standard errors of r and rho (pearson_r_se, rho_se in the record) over this many
    groups of probe sequences (sequence i in group i mod groups). Keeps statistics per group
    and their total: memory × (groups + 1), and one more solve per group. 'auto' (the default):
    8 groups where that is cheap (the probe has at least 16 sequences and the groups'
    statistics take at most 1 GiB, i.e. small and shallow models, whose r is the noisiest),
    else off; the record's jackknife_groups says which. None: off. Without a standard error the
    emergence rule compares r alone with the threshold."""
    precision: StatsPrecision = "float64"
    """Precision of the statistics: 'float64' (every product in float64: the paper's numbers,
    within 1e-8 of numpy's lstsq) or 'mixed' (each batch's Gram in IEEE float32, never TF32,
    accumulated in float64). 'mixed' is faster on GPUs whose FP64 runs at 1/64 of FP32, but a
    float32 Gram cannot resolve the low-variance directions of a trained model's residual
    stream, which carry part of the fit: on a small trained GPT-2 it moved PR by 3% (8.6k
    examples) to 19% (1k). Use it only to compare runs measured with it."""
    stats_device: str | None = None
    """Where the float64 statistics (entries × d² × 8 bytes) live: None (the model's device)
    or a device such as 'cpu' (accelerator memory for statistics near zero: each batch's
    products are computed on the model's device and added to the statistics on the host)."""
    lens: float | None = None
    """The logit lens (docs/lens.md): the share of the probe's examples on which each entry is
    read through the model's final norm and head (top-1 accuracy, cross-entropy, KL from the
    final layer, entropy, prediction depth), in the same forward as PR. None: off; True: the
    default share (1/64: about a fifth added to a GPT-2-small snapshot on CPU); 1.0: every
    example. Costs about 2 x entries x d x vocabulary flops per example read; needs offset=1."""
    lens_head: str | None = None
    """The module the logit lens reads through (the unembedding applied after the final norm),
    by name. Default: the model's get_output_embeddings(), else a module named lm_head, head,
    output, embed_out or unembed."""
    by_group: bool = False
    """Per group of a probe that carries groups (docs/breakdowns.md): the law (in-sample PR per
    entry, r, rho; no jackknife) and, with the lens, its metrics, in each record's 'groups'.
    Keeps one more set of statistics per group: groups x entries x ((d+1)^2 + d x outputs) x 8
    bytes (outputs: 1, or the one-hot classes), refused above max_group_bytes. Not with split or
    metric='separation_fuzziness'."""
    max_group_bytes: int = 4 << 30
    """Refuse by_group, before any forward pass, when the per-group statistics (groups x
    entries x ((d+1)^2 + d x outputs) x 8 bytes) pass this many bytes (default 4 GiB)."""
    position_buckets: int | None = None
    """The logit lens's metrics per position bucket too (record 'positions'): bucket b holds
    the examples whose position j in a sequence of n real tokens has floor(j*B/n) = b
    (B buckets: 10 = tenths of each sequence). Needs lens."""

    health: bool = True
    """The residual stream's vital signs per entry (docs/dashboard.md): RMS, largest |x|, mean
    excess kurtosis over features, the share of non-finite values and the features of largest
    mean |x|, at the probe's examples, from the same forward as PR (about 2% of a GPT-2-small
    snapshot: BENCHMARKS.md). False: off."""

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE:
            raise ValueError(f"Unknown normalize={self.normalize!r}; choose one of {NORMALIZE}.")
        if self.target not in MEASURE_TARGETS:
            raise ValueError(f"Unknown target={self.target!r}; choose one of {MEASURE_TARGETS}.")
        if not _is_int(self.offset):
            raise TypeError(f"offset must be an int (1 = next token), got {self.offset!r}.")
        if isinstance(self.layers, Sequence) and not isinstance(self.layers, str):
            # a list from YAML or the caller: kept as a tuple, so the config stays hashable
            object.__setattr__(self, "layers", tuple(self.layers))
            if not self.layers or not all(_is_int(e) for e in self.layers):
                raise TypeError(f"layers must list entry indices (ints), got {self.layers!r}.")
        elif self.layers is not None:
            if not _is_int(self.layers):
                raise TypeError(
                    f"layers must be an int (every k-th) or a list of entries, got {self.layers!r}."
                )
            if self.layers < 1:
                raise ValueError(f"layers={self.layers}: every k-th entry needs k >= 1.")
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if isinstance(self.blocks, str) and self.blocks.startswith(REGEX_PREFIX):
            object.__setattr__(self, "blocks", _regex(self.blocks))
        if isinstance(self.final_norm, Mapping):
            object.__setattr__(self, "final_norm", _norm_spec(self.final_norm))
        if self.metric not in METRICS:
            raise ValueError(f"Unknown metric={self.metric!r}; choose one of {METRICS}.")
        fuzziness = self.metric == "separation_fuzziness"
        if self.entries not in ENTRIES:
            raise ValueError(f"Unknown entries={self.entries!r}; choose one of {ENTRIES}.")
        if fuzziness and self.target not in ("token_id", "onehot"):
            raise ValueError(
                f"metric='separation_fuzziness' groups examples by target id; target="
                f"{self.target!r} does not apply: use target='token_id' or 'onehot'."
            )
        if self.onehot_top_k is not None and (
            not _is_int(self.onehot_top_k)
            or self.onehot_top_k < 1
            or (self.target != "onehot" and not fuzziness)
        ):
            raise ValueError(
                f"onehot_top_k={self.onehot_top_k} needs target='onehot' (or metric="
                "'separation_fuzziness') and a positive count."
            )
        for name in ("max_onehot_bytes", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, got {value!r}.")
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}.")
        if not _is_int(self.seed):
            raise TypeError(f"seed must be an int, got {self.seed!r}.")
        if self.rtol is not None:
            if isinstance(self.rtol, bool) or not isinstance(self.rtol, int | float):
                raise TypeError(f"rtol must be a float, got {self.rtol!r}.")
            if not 0.0 < self.rtol < 1.0:
                raise ValueError(f"rtol must lie in (0, 1), got {self.rtol}.")
        if self.split is not None:
            if isinstance(self.split, bool) or not isinstance(self.split, int | float):
                raise TypeError(f"split must be a fraction or None, got {self.split!r}.")
            if not 0.0 < self.split < 1.0:
                raise ValueError(
                    f"split must lie in (0, 1) (the held-out fraction of sequences), got "
                    f"{self.split}."
                )
            if fuzziness:
                raise ValueError(
                    "split applies to metric='pr' only: separation fuzziness fits nothing."
                )
        if self.jackknife is not None and self.jackknife != "auto":
            if not _is_int(self.jackknife):
                raise TypeError(
                    f"jackknife must be an int, 'auto' or None, got {self.jackknife!r}."
                )
            if self.jackknife < 2:
                raise ValueError(f"jackknife needs at least 2 groups, got {self.jackknife}.")
        if self.precision not in STATS_PRECISIONS:
            raise ValueError(
                f"Unknown precision={self.precision!r}; choose one of {STATS_PRECISIONS}."
            )
        if self.stats_device is not None:
            if not isinstance(self.stats_device, str):
                raise TypeError(
                    f"stats_device must be a device name such as 'cpu' or 'cuda:0', got "
                    f"{self.stats_device!r}."
                )
            try:
                torch.device(self.stats_device)
            except RuntimeError:
                raise ValueError(
                    f"stats_device={self.stats_device!r} is not a device name; use e.g. 'cpu' "
                    "or 'cuda:0' (None: the model's device)."
                ) from None
        self._check_lens()
        if not isinstance(self.health, bool):
            raise TypeError(f"health must be True or False, got {self.health!r}.")
        self._check_breakdowns()

    def _check_breakdowns(self) -> None:
        if not isinstance(self.by_group, bool):
            raise TypeError(f"by_group must be True or False, got {self.by_group!r}.")
        if self.by_group and self.split is not None:
            raise ValueError(
                "by_group measures in-sample PR per group; it does not combine with split "
                "(out-of-sample PR): set split=None or by_group=False."
            )
        if self.by_group and self.metric != "pr":
            raise ValueError(
                f"by_group measures PR per group; metric={self.metric!r} does not apply: use "
                "metric='pr' or by_group=False."
            )
        if not _is_int(self.max_group_bytes):
            raise TypeError(f"max_group_bytes must be an int, got {self.max_group_bytes!r}.")
        if self.max_group_bytes < 1:
            raise ValueError(f"max_group_bytes must be positive, got {self.max_group_bytes}.")
        if self.position_buckets is not None:
            if not _is_int(self.position_buckets):
                raise TypeError(
                    f"position_buckets must be an int or None, got {self.position_buckets!r}."
                )
            if self.position_buckets < 1:
                raise ValueError(f"position_buckets must be positive, got {self.position_buckets}.")
            if self.lens is None:
                raise ValueError(
                    "position_buckets splits the logit lens's metrics by position: it needs "
                    "lens (e.g. lens=1.0)."
                )

    def _check_lens(self) -> None:
        if self.lens is True:  # "on": the default share, written as the number it is
            object.__setattr__(self, "lens", DEFAULT_LENS_FRACTION)
        if self.lens is not None:
            if isinstance(self.lens, bool) or not isinstance(self.lens, int | float):
                raise TypeError(
                    f"lens must be a share of the probe's examples in (0, 1] (True: the "
                    f"default {DEFAULT_LENS_FRACTION}) or None, got {self.lens!r}."
                )
            if not 0.0 < self.lens <= 1.0:
                raise ValueError(
                    f"lens must lie in (0, 1] (the share of the probe's examples the logit lens "
                    f"reads; 1.0: all), got {self.lens}."
                )
            object.__setattr__(self, "lens", float(self.lens))
            if self.offset != 1:
                raise ValueError(
                    f"The logit lens predicts the next token: it needs offset=1, got "
                    f"offset={self.offset}; set lens=None or offset=1."
                )
        if self.lens_head is not None:
            if not isinstance(self.lens_head, str):
                raise TypeError(
                    f"lens_head must be a module name, got {type(self.lens_head).__name__}."
                )
            if self.lens is None:
                raise ValueError("lens_head names the logit lens's head, but lens is None (off).")


# a regex option in its plain form (to_dict, YAML, the command line): 're:PATTERN'
REGEX_PREFIX = "re:"


def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text.removeprefix(REGEX_PREFIX))
    except re.error as error:
        raise ValueError(f"blocks={text!r} is not a valid regular expression: {error}.") from error


def _norm_spec(values: Mapping[str, Any]) -> NormSpec:
    try:
        return NormSpec(**values)
    except TypeError as error:
        raise ValueError(
            f"final_norm={dict(values)!r}: a norm is written {{kind: layernorm | rmsnorm, eps: "
            f"float, weight_offset: float (optional)}} ({error})."
        ) from error


def _plain(value: Any) -> Any:
    """A JSON-ready stand-in for an option value (reloadable, except a module: named)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, re.Pattern):
        return f"{REGEX_PREFIX}{value.pattern}"
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, NormSpec):
        return {"kind": value.kind, "eps": value.eps, "weight_offset": value.weight_offset}
    return f"<{type(value).__name__}>"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name, on one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):  # base classes first: a subclass may override
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs
