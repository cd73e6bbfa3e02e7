"""Per-layer features from any model: the residual stream, captured with forward hooks.

The residual stream of a model with ``L`` blocks has ``L + 1`` *entries*: entry 0 is the input
of the first block (the embeddings), entry ``l`` the output of block ``l``, and entry ``L`` the
model's final norm applied to its input. That is He & Su's sequence of hidden states: in
Hugging Face models the last hidden state already has the final norm applied (see
``docs/protocol.md``). Hooks on the blocks and the final norm (located by
:mod:`lawwatch.structure`) capture them during one forward pass, so any ``torch.nn.Module``
works and no ``output_hidden_states`` is needed; only the example positions of the entries
being measured are used, and (streaming, below) one entry at a time. Hooks rather than
``output_hidden_states`` also because the latter is not the same sequence for every family:
Mamba's and RWKV's hold the block outputs and the final norm's output, without the embeddings.

Features are float64: a norm's output computed in float32 (or bf16) has a direction that holds
only rounding noise, which least squares would fit. So entries ``0 … L-1`` go through
``normalize`` in float64 (the paper's fresh final norm by default, see :mod:`lawwatch.norms`),
and entry ``L`` is the final norm re-applied in float64 to its captured input, with its weight
and bias captured during the same forward (under FSDP and ZeRO-3 the parameters are only whole
inside it). How each model family is run (from its root with ``logits_to_keep=1``, or as its
base model) is :mod:`lawwatch.models`' knowledge; the forward runs with autocast off, in the
weights' dtype (:mod:`lawwatch.precision`).

**Streaming** (:meth:`Capture.stream`, what :func:`lawwatch.measurement.accumulate` runs): each
entry is turned into float64 features inside its hook, as its block's output arrives, handed
to a callback (which adds it to the statistics) and dropped, so a batch never holds more than
one entry's features: ``n × d`` float64 (``n`` example positions), made a row chunk of
``_CHUNK_BYTES`` at a time from the model's own tensor (the norm's float64 temporaries are
those of one chunk). The final norm's input is kept in the model's dtype from its pre-hook to
its post-hook (``n × d``). Entries ``0 … L-1`` need the final norm's reading (kind, epsilon)
before it runs, so it is read once per :class:`Capture` off a short forward
(:meth:`Capture.calibrate`: the longest sequence of the first batch, at most
``CALIBRATION_TOKENS`` tokens) and still checked on every batch against the norm's output at
all example positions. Every measure takes this one path (the partitioned statistics split
each entry's rows among their cells as it arrives: :mod:`lawwatch.stats.partition`); calling a
:class:`Capture` collects the entries of one batch, for tests and small models.

**Tensor-parallel models** (DTensor parameters, :mod:`lawwatch.watch.mesh`): every hook first
takes its tensor whole (:func:`~lawwatch.watch.mesh.whole`: a DTensor's ``full_tensor()``, a
local sequence shard gathered over the tensor-parallel mesh), decided from shapes that every
rank of the group sees alike, so all of them enter the same gathers; the final norm's DTensor
weight is read whole; batches are right-padded (masked) to a multiple of the mesh's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lawwatch.models import (
    accepts,
    base_model,
    hidden_states_skip_embeddings,
    is_hf,
    is_sharded,
    undo_inference_rescaling,
)
from lawwatch.norms import (
    NORMALIZE,
    Normalize,
    NormSpec,
    deviation,
    normalizer,
    resolve_norm,
)
from lawwatch.norms import tolerance as norm_tolerance
from lawwatch.precision import plain_forward
from lawwatch.stats.lens import Kept
from lawwatch.structure import BlockSpec, FinalNormSpec, LayerSpec, locate, select_layers
from lawwatch.watch.mesh import sequence_mesh, whole, whole_param

__all__ = ["Capture", "Hidden", "NonFiniteError", "evaluating"]


class NonFiniteError(ValueError):
    """The hidden states at the probe's examples hold NaN or Inf (PR is undefined there)."""


@dataclass
class Hidden:
    """What one forward pass left behind, at the example positions only.

    Attributes:
        norm_input: ``(n, d)`` the final norm's input (always kept when the model has a final
            norm module: with its output it tells the norm's kind and is checked every batch),
            until the norm's output arrives.
        norm_output: Calibration: ``(n, d)`` the final norm's output.
        norm_params: The final norm's weight and bias, float64, captured inside the forward.
        fired: Indices of the blocks in the order they ran.
        norm_calls: How often the final norm ran.
        problems: What went wrong inside hooks (raised after the forward completed: a hook
            that raises would break a collective forward).
        norm_ok: The final norm took and returned a ``(batch, length, d)`` tensor.
        seen: The entries already handed on (each must come once).
        error: The first exception raised while making or adding features inside
            a hook (raised by :meth:`Capture.stream` after the forward).
        finite: The sum of every captured hidden state at the examples, a device
            scalar that is NaN or Inf once one of them was (checked once, after the forward:
            no host synchronization per block).
        norm_mismatch: The largest deviation of the float64 re-application of the
            final norm from its output, in units of the dtype's tolerance (device tensor).
    """

    norm_input: torch.Tensor | None = None
    norm_output: torch.Tensor | None = None
    norm_params: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    fired: list[int] = field(default_factory=list)
    norm_calls: int = 0
    problems: list[str] = field(default_factory=list)
    norm_ok: bool = False
    seen: set[int] = field(default_factory=set)
    error: BaseException | None = None
    finite: torch.Tensor | None = None
    norm_mismatch: torch.Tensor | None = None


# streaming: float64 features are made this many bytes of rows at a time (the temporaries of
# the norm re-applied in float64 are those of one chunk)
_CHUNK_BYTES = 2 * 2**20  # 2 MiB: the chunk and its temporaries stay in cache
# the final norm's reading is taken from at most this many tokens of the first batch
CALIBRATION_TOKENS = 64
AddEntry = Callable[[int, torch.Tensor], None]


@dataclass
class _Stream:
    """What the hooks of a streamed forward need: where the examples are, where they go."""

    add: AddEntry  # (index in `layers`, (n, d) float64 features the callee may modify)
    rows: tuple[torch.Tensor, torch.Tensor]  # (n,) batch and position index of each example
    index: dict[int, int]  # captured entry -> its index in `layers`
    last: int | None  # index in `layers` of entry L when it is the final norm's output
    # the logit lens: (m,) indices into the n examples whose raw hidden states are kept
    keep: torch.Tensor | None = None
    raw: dict[int, torch.Tensor] = field(default_factory=dict)  # captured entry -> (m, d)
    final: torch.Tensor | None = None  # (m, d) the final norm's input at the kept rows
    # the vital signs: (index in `layers`, (rows, d) float64 raw entry rows, not to be modified)
    observe: AddEntry | None = None


def _fsdp(model: nn.Module) -> bool:
    try:
        return is_sharded(model)
    except ValueError:  # an FSDP model not at its root: refused where it is measured
        return True


def _tensor(value: Any) -> torch.Tensor | None:
    """A module's output (or first output, for tuples and lists) if it is a tensor."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) else None


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input", "hidden_state"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


class Capture:
    """Float64 features of the residual-stream entries of a model, one batch at a time.

    Args:
        model: A Hugging Face model (blocks and final norm are found automatically; it runs
            from its root with ``logits_to_keep=1``, so no ``(batch, length, vocab)`` logits,
            or as its base model when it has no LM head) or any ``torch.nn.Module`` (called as
            ``model(input_ids)``; name its blocks). Pass a sharded model (FSDP, ZeRO-3) as
            the framework wraps it: its forward must enter at the root.
        normalize: Map applied to entries ``0 … L-1`` (see :func:`lawwatch.norms.normalizer`).
        blocks: The blocks whose outputs form the residual stream, in order: a module name (a
            ``ModuleList`` stands for its children), a glob (``"transformer.h.*"``; ``*`` matches
            one name component), a compiled regex (full match), or a list of names or modules.
            Default: found automatically on Hugging Face models.
        final_norm: The norm applied after the last block: a module name or module (its kind,
            epsilon and weight convention are read off it and checked on every batch), or a
            :class:`NormSpec` for a model without a final norm module (then every entry, the
            last too, goes through ``normalize``). Default: found by name.
        layers: Which entries to measure (see :func:`select_layers`); default all.
        entries: How entries are numbered. ``"hooks"``: entry 0 is the embeddings (the input of
            the first block), entry ``l`` block ``l``'s output, entry ``L`` the final norm's
            output. ``"hidden_states"``: as the model's ``output_hidden_states`` numbers them;
            for Mamba and RWKV, whose hidden states omit the embeddings, entry ``k < L`` is then
            block ``k+1``'s output (so entry ``L-1`` is the last block's output before the final
            norm); for every other model the two are the same.

    Attributes:
        blocks: Block names, in order.
        final_norm: The final norm's module name, or its NormSpec.
        layers: The measured entries' true indices.
        spec: The final norm's reading, once known.
    """

    def __init__(
        self,
        model: nn.Module,
        normalize: Normalize = "auto",
        *,
        blocks: BlockSpec | None = None,
        final_norm: FinalNormSpec | None = None,
        layers: LayerSpec | None = None,
        entries: str = "hooks",
    ) -> None:
        if entries not in ("hooks", "hidden_states"):
            raise ValueError(f"Unknown entries={entries!r}; choose 'hooks' or 'hidden_states'.")
        if normalize not in NORMALIZE:
            raise ValueError(f"Unknown normalize={normalize!r}; choose one of {NORMALIZE}.")
        self.model = model
        self.base = base_model(model)
        self._hf = is_hf(self.base)
        self._logits_to_keep = self._hf and accepts(model, "logits_to_keep")
        structure = locate(model, blocks, final_norm)
        self.blocks, self.final_norm = structure.blocks, structure.final_norm
        self.num_entries = structure.num_entries
        self.layers = select_layers(layers, self.num_entries)
        # measured entry -> the captured one (0: first block's input, l: block l's output)
        skip = entries == "hidden_states" and hidden_states_skip_embeddings(model)
        last = self.num_entries - 1
        self._source = {e: e + 1 if skip and e < last else e for e in self.layers}
        self._structure = structure
        self._normalize_name = normalize
        self.spec: NormSpec | None = (
            self.final_norm if isinstance(self.final_norm, NormSpec) else None
        )
        # built once the final norm's reading is known (its epsilon serves every normalize)
        self._normalize: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._calibrated = False
        self._calibration_error: BaseException | None = None
        # a tensor-parallel model's mesh: its hidden states are gathered whole in the hooks
        self._mesh = sequence_mesh(model, fsdp=_fsdp(model))

    @property
    def _norm_module(self) -> nn.Module | None:
        return self._structure.norm_module

    # -- the forward pass ---------------------------------------------------------------------

    def _hooks(
        self, hidden: Hidden, positions: torch.Tensor, stream: _Stream | None
    ) -> Iterator[Any]:
        """Register the hooks that feed ``stream`` (and fill ``hidden``); yields their handles.

        ``stream=None`` (calibration): only the final norm's input and output are taken.
        """
        last = self.num_entries - 1
        norm = self._norm_module
        batch_shape = tuple(positions.shape)  # every rank of a TP group sees the same
        # the captured entries: the final norm's output (entry L) comes from its own hooks
        wanted = (
            set()
            if stream is None
            else {s for e, s in self._source.items() if e < last or norm is None}
        )
        if stream is not None and stream.keep is not None and norm is None:
            wanted.add(last)  # the lens's final distribution: the last block's output

        def keep(entry: int, value: torch.Tensor | None, what: str) -> None:
            value = whole(value, batch_shape, self._mesh)  # a collective on every TP rank alike
            if value is None or value.ndim != 3 or value.shape[:2] != positions.shape:
                shape = None if value is None else tuple(value.shape)
                hidden.problems.append(
                    f"{what} is not a (batch, length, d) tensor of batch and length "
                    f"{tuple(positions.shape)} (got {shape})."
                )
            elif entry in hidden.seen:
                hidden.problems.append(f"{what} ran more than once in one forward.")
            else:
                hidden.seen.add(entry)
                if stream.keep is not None:  # the lens's rows, in the model's dtype
                    batch, position = stream.rows
                    stream.raw[entry] = value.detach()[batch[stream.keep], position[stream.keep]]
                if entry in stream.index:
                    self._emit(hidden, stream, stream.index[entry], value.detach(), None)

        if 0 in wanted:
            first = self._structure.modules[self.blocks[0]]

            def first_input(_m, args, kwargs):
                keep(0, _first_arg(args, kwargs), f"the input of {self.blocks[0]!r}")

            yield first.register_forward_pre_hook(first_input, with_kwargs=True)
        for i, name in enumerate(self.blocks):
            entry = i + 1
            store = entry in wanted

            def block_output(_m, _args, output, i=i, entry=entry, store=store, name=name):
                hidden.fired.append(i)
                if store:
                    keep(entry, _tensor(output), f"the output of block {name!r}")

            yield self._structure.modules[name].register_forward_hook(block_output)
        if norm is not None:  # always: its input and output also tell its kind and epsilon

            def norm_input(module, args, kwargs):
                hidden.norm_calls += 1
                x = whole(_first_arg(args, kwargs), batch_shape, self._mesh)
                if hidden.norm_calls == 1 and x is not None and x.shape[:2] == positions.shape:
                    hidden.norm_input = x.detach()[positions]  # (n, d)
                    if stream is not None and stream.keep is not None:
                        stream.final = hidden.norm_input[stream.keep]  # (m, d)
                    # the parameters are whole here, inside the forward (FSDP, ZeRO-3)
                    hidden.norm_params = tuple(
                        whole_param(p.detach()).to(torch.float64).clone()
                        if isinstance(p, torch.Tensor)
                        else None
                        for p in (getattr(module, "weight", None), getattr(module, "bias", None))
                    )

            def norm_output(_m, _args, output):
                y = whole(_tensor(output), batch_shape, self._mesh)
                if (
                    hidden.norm_calls == 1
                    and hidden.norm_input is not None
                    and y is not None
                    and y.shape[:2] == positions.shape
                ):
                    hidden.norm_ok = True
                    if stream is None:
                        hidden.norm_output = y.detach()[positions]  # (n, d)
                    else:
                        self._emit(hidden, stream, stream.last, None, y.detach())

            yield norm.register_forward_pre_hook(norm_input, with_kwargs=True)
            yield norm.register_forward_hook(norm_output)

    # -- streaming: features made and handed on inside the hooks ------------------------------

    def _emit(
        self,
        hidden: Hidden,
        stream: _Stream,
        index: int | None,
        value: torch.Tensor | None,
        norm_output: torch.Tensor | None,
    ) -> None:
        """Make one entry's float64 features and hand them on; never raises (see Hidden).

        ``value``: a block's ``(batch, length, d)`` tensor; or ``norm_output``: the final
        norm's output (then the norm is checked, and entry L made if ``index`` is not None).
        """
        if hidden.error is not None or hidden.problems:
            return  # the batch fails anyway: spare the work
        try:
            if norm_output is not None:
                features = self._norm_features(hidden, stream, norm_output, index is not None)
                hidden.norm_input = None  # (n, d): no longer needed
            else:
                features = self._entry_features(hidden, stream, value, index)
            if features is not None:
                stream.add(index, features)
        except Exception as error:  # a raising hook would break a collective forward
            hidden.error = error

    def _finite(self, hidden: Hidden, chunk: torch.Tensor) -> None:
        """Fold ``chunk``'s finiteness into the batch's device flag (no host sync).

        ``chunk`` is float64: a NaN or Inf makes its sum non-finite, and a sum of finite
        hidden states cannot overflow float64 (float32 states are under 3.4e38, so under
        ~1e49 summed), which one pass over the chunk in cache checks more cheaply than
        ``isfinite``.
        """
        total = chunk.sum()
        hidden.finite = total if hidden.finite is None else hidden.finite + total

    def _entry_features(
        self, hidden: Hidden, stream: _Stream, value: torch.Tensor, index: int | None = None
    ) -> torch.Tensor:
        """``(n, d)`` float64 ``normalize`` of ``value`` at the examples, a row chunk at a time.

        Each chunk, as the model computed it (upcast), goes to ``stream.observe`` first.
        """
        batch, position = stream.rows
        n, d = batch.shape[0], value.shape[-1]
        out = torch.empty(n, d, dtype=torch.float64, device=value.device)
        if n == 0:
            return out
        if self._normalize is None:
            if self.spec is None and self._calibration_error is not None:
                raise self._calibration_error  # the final norm could not be read: why
            self._normalize = normalizer(self._normalize_name, self.spec)
        step = max(1, _CHUNK_BYTES // (8 * d))
        for lo in range(0, n, step):
            rows = slice(lo, lo + step)
            chunk = value[batch[rows], position[rows]].to(torch.float64)  # (rows, d)
            self._finite(hidden, chunk)
            if stream.observe is not None and index is not None:
                stream.observe(index, chunk)
            out[rows] = self._normalize(chunk)
        return out

    def _norm_features(
        self, hidden: Hidden, stream: _Stream, y: torch.Tensor, wanted: bool
    ) -> torch.Tensor | None:
        """Check the final norm's reading at every example; entry L's features if ``wanted``.

        The reading's deviation from the module's output (as :func:`lawwatch.norms.mismatch`,
        a row chunk at a time) is kept as a device tensor and judged after the forward.
        """
        x = hidden.norm_input  # (n, d) in the model's dtype
        batch, position = stream.rows
        n, d = x.shape
        out = torch.empty(n, d, dtype=torch.float64, device=x.device) if wanted else None
        if n == 0:
            return out
        if self.spec is None:  # the calibration could not read it: say why
            raise self._calibration_error or RuntimeError(
                f"The final norm {self.final_norm!r} could not be read before the first batch."
            )
        weight, bias = hidden.norm_params
        worst = torch.zeros((), dtype=torch.float64, device=x.device)
        step = max(1, _CHUNK_BYTES // (8 * d))
        for lo in range(0, n, step):
            rows = slice(lo, lo + step)
            chunk = x[rows].to(torch.float64)
            self._finite(hidden, chunk)
            ref = self.spec.apply(chunk, weight, bias)  # (rows, d)
            worst = torch.maximum(worst, deviation(ref, y[batch[rows], position[rows]]))
            if stream.observe is not None and wanted:  # entry L: the final norm's output
                stream.observe(stream.last, ref)
            if out is not None:
                out[rows] = ref
        hidden.norm_mismatch = worst / norm_tolerance(y.dtype)
        return out

    def calibrate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        device: torch.device | None = None,
    ) -> None:
        """Read the final norm's kind and epsilon off a short forward, once per Capture.

        What :meth:`stream` needs before its first batch (entries ``0 … L-1`` are normalized
        before the final norm runs). Runs the model on the sequence of ``input_ids`` (the
        probe, or this process's shard of it) with the most example ``positions``, cut to at
        most ``CALIBRATION_TOKENS`` tokens and moved to ``device``, with hooks on the final
        norm only, and reads the norm at those examples. Does nothing if the reading is known
        (a :class:`NormSpec`, or an earlier call). Never raises: a failure is kept and raised
        by :meth:`stream` when a batch has examples. Every process of a sharded model must
        call it alike (it runs one forward), before its first batch.
        """
        if self.spec is not None or self._norm_module is None or self._calibrated:
            return
        self._calibrated = True
        counts = positions.sum(dim=1)  # (batch,) example positions of each row
        row = int(counts.argmax())
        # cut after the row's CALIBRATION_TOKENS-th example: with a target mask the examples
        # need not be a prefix of the row (a question's answer sits at its end)
        marked = positions[row].nonzero().view(-1)
        count = 1 if marked.numel() == 0 else int(marked[:CALIBRATION_TOKENS][-1]) + 1
        part = (slice(row, row + 1), slice(0, count))
        ids, mask, where = (t[part].to(device) for t in (input_ids, attention_mask, positions))
        hidden = self._run(ids, mask, where, None)
        try:
            self._check(hidden)
            x = hidden.norm_input
            if x.shape[0] == 0:
                return
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError(
                    f"The hidden states of {type(self.model).__name__} contain NaN or Inf; PR "
                    "is undefined for them."
                )
            weight, bias = hidden.norm_params
            self.spec = resolve_norm(
                self._norm_module,
                x.to(torch.float64),
                hidden.norm_output,
                weight,
                bias,
                self.final_norm,
            )
        except Exception as error:  # raised by `stream` when it needs the reading
            self._calibration_error = error

    def stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        add: AddEntry,
        *,
        keep: torch.Tensor | None = None,
        observe: AddEntry | None = None,
    ) -> Kept | None:
        """Run the model once, handing each measured entry's float64 features to ``add``.

        ``add(index, features)`` is called inside the hooks, in the order of ``layers``
        (``index`` into ``layers``), with ``(n, d)`` float64 features at ``positions`` that
        the callee may modify; they are dropped when it returns. Call :meth:`calibrate` on the
        first batch before (for the final norm's reading). Nothing raises inside the forward,
        so every process of a sharded model completes the same forward passes; after it, what
        went wrong is raised (and then whatever ``add`` raised). A batch that raises may have
        been handed on in part: discard what ``add`` built.

        With ``keep`` (``(m,)`` indices into the ``n`` examples, row-major), the measured
        entries' hidden states before the final norm at those examples are kept, in the
        model's dtype, for the logit lens (:mod:`lawwatch.stats.lens`): returned as a
        :class:`~lawwatch.stats.lens.Kept` (``entries × m × d``); None without ``keep``.

        With ``observe`` (the vital signs, :mod:`lawwatch.stats.health`), each measured entry
        as the model computed it (upcast to float64, before ``normalize``; entry ``L``: the
        final norm's output) is handed on too, ``observe(index, rows)`` a row chunk at a time,
        before the NaN/Inf check (so the non-finite values are counted).

        Raises:
            RuntimeError: A hook found the blocks or final norm not as named.
            NonFiniteError: NaN or Inf in the hidden states (a ValueError).
            TypeError: The final norm cannot be re-applied, or no longer matches its reading.
        """
        last = self.num_entries - 1
        norm = self._norm_module
        # captured entry -> index in `layers`, for the entries that come from the blocks
        # (with entries="hidden_states" entry L-1 is captured as L: the last block's output)
        index = {self._source[e]: i for i, e in enumerate(self.layers) if e < last or norm is None}
        take_last = norm is not None and self.layers[-1] == last
        rows = positions.nonzero(as_tuple=True)  # row-major, like `value[positions]`
        plan = _Stream(add, rows, index, len(self.layers) - 1 if take_last else None, keep)
        plan.observe = observe
        hidden = self._run(input_ids, attention_mask, positions, plan)
        self._check(hidden)
        if hidden.finite is not None and not bool(torch.isfinite(hidden.finite)):  # one sync
            raise NonFiniteError(
                f"The hidden states of {type(self.model).__name__} contain NaN or Inf; PR is "
                "undefined for them."
            )
        if hidden.error is not None:
            raise hidden.error
        if hidden.norm_mismatch is not None and float(hidden.norm_mismatch) > 1:
            raise TypeError(
                f"The final norm {self.final_norm!r} no longer matches {self.spec} re-applied "
                "in float64: its behaviour changed between batches."
            )
        return None if keep is None else self._kept(plan, hidden)

    def _kept(self, plan: _Stream, hidden: Hidden) -> Kept:
        """The lens's rows of a clean forward: each measured entry's, and the final norm's input."""
        last = self.num_entries - 1
        norm = self._norm_module
        final = plan.final if norm is not None else plan.raw[last]
        entries = [
            final if e == last and norm is not None else plan.raw[self._source[e]]
            for e in self.layers
        ]
        spec = self.spec
        if spec is None:  # raised by now for a batch with examples; kept rows are none
            raise RuntimeError("lawwatch: the final norm's reading is unknown.")
        weight, bias = hidden.norm_params if norm is not None else (None, None)
        return Kept(entries, final, lambda x: spec.apply(x, weight, bias))

    def run_bare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """The model's forward as :meth:`stream` runs it, without hooks (nothing kept).

        For a process that measures nothing more this round but must keep its forward passes
        in step with the others (each is a collective under FSDP and ZeRO-3).
        """
        input_ids, attention_mask, _ = self._padded(input_ids, attention_mask, None)
        self._call_model(input_ids, attention_mask)

    def _padded(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A tensor-parallel model's batch, right-padded (masked) to a multiple of its mesh.

        Sequence parallelism splits the sequence evenly over the mesh (torch's does not run an
        uneven split), and the probe's batches are trimmed to their longest row: masked
        positions on the right change no earlier position of a causal model.
        """
        parts = 1 if self._mesh is None else self._mesh.size()
        extra = -input_ids.shape[1] % parts
        if not extra:
            return input_ids, attention_mask, positions
        pad = (0, extra)
        return (
            nn.functional.pad(input_ids, pad),
            nn.functional.pad(attention_mask, pad),
            None if positions is None else nn.functional.pad(positions, pad),
        )

    def _run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        stream: _Stream | None,
    ) -> Hidden:
        hidden = Hidden()
        handles = []
        input_ids, attention_mask, positions = self._padded(input_ids, attention_mask, positions)
        try:
            for handle in self._hooks(hidden, positions, stream):
                handles.append(handle)
            self._call_model(input_ids, attention_mask)
        finally:
            for handle in handles:
                handle.remove()
        return hidden

    def _call_model(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        # autocast off, in the weights' dtype, whatever precision training runs at
        with plain_forward(self.model):
            if self._hf:
                inputs = {"input_ids": input_ids, "attention_mask": attention_mask.long()}
                if self._logits_to_keep:
                    # the whole model from its root (under FSDP and ZeRO-3 the forward must
                    # enter there to gather parameters), with the logits of one position
                    self.model(**inputs, use_cache=False, logits_to_keep=1)
                else:
                    self.base(**inputs, use_cache=False)
            else:
                self.model(input_ids)

    # -- features -----------------------------------------------------------------------------

    def _check(self, hidden: Hidden) -> None:
        problems = list(hidden.problems)
        if hidden.fired != list(range(len(self.blocks))):
            problems.append(
                f"the blocks ran in the order {hidden.fired} (block indices), not once each in "
                "the order named; `blocks` must list the residual-stream blocks, each run once "
                "per forward."
            )
        if self._norm_module is not None:
            if hidden.norm_calls != 1:
                problems.append(
                    f"the final norm {self.final_norm!r} ran {hidden.norm_calls} times in one "
                    "forward, not once."
                )
            elif not hidden.norm_ok:
                problems.append(
                    f"the final norm {self.final_norm!r} did not take and return a "
                    "(batch, length, d) tensor."
                )
        if problems:
            raise RuntimeError(
                f"Capturing the residual stream of {type(self.model).__name__} failed: "
                + " ".join(problems)
            )

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Float64 features ``(len(layers), n, d)`` of one batch, every entry kept together.

        :meth:`calibrate` (on this batch, if not done yet) then :meth:`stream`, collecting the
        entries: for tests and small models (the measurement streams them into statistics).

        Raises:
            As :meth:`stream`.
        """
        self.calibrate(input_ids, attention_mask, positions)
        kept: list[torch.Tensor] = []

        def add(index: int, features: torch.Tensor) -> None:
            kept.append(features)

        self.stream(input_ids, attention_mask, positions, add)
        return torch.stack(kept)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; every module's train/eval flag restored after.

    Weights a model rescales for inference (Hugging Face's RWKV) are scaled back after the
    flags are restored (see :func:`lawwatch.models.undo_inference_rescaling`).
    """
    with undo_inference_rescaling(model):  # exits last: it follows the restored flags
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, mode in modes.items():
                module.training = mode
