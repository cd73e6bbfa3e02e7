"""Per-layer features from any model: the residual stream, captured with forward hooks.

The residual stream of a model with ``L`` blocks has ``L + 1`` *entries*: entry 0 is the input
of the first block (the embeddings), entry ``l`` the output of block ``l``, and entry ``L`` the
model's final norm applied to its input (He & Su's last hidden state, DESIGN.md §1). Hooks on
the blocks and the final norm capture them during one forward pass, so any ``torch.nn.Module``
works and no ``output_hidden_states`` is needed; only the example positions of the entries
being measured are kept, for one batch.

Hugging Face models are found automatically: the blocks are the ``nn.ModuleList`` of
``config.num_hidden_layers`` modules, the final norm the module named ``ln_f``, ``norm``,
``final_layer_norm``, ``norm_f``, ``ln_out`` or ``final_layernorm`` outside them. Hooks rather
than ``output_hidden_states`` because the latter is not the same sequence for every family:
Mamba and RWKV return the block outputs and the final norm's output, without the embeddings.

Features are float64 (DESIGN.md §2): entries ``0 … L-1`` go through ``normalize`` (the paper's
fresh final norm by default, see :mod:`lawwatch.norms`), entry ``L`` is the final norm
re-applied in float64 to its captured input, with its weight and bias captured during the same
forward (under FSDP and ZeRO-3 the parameters are only whole inside it).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lawwatch.norms import NORMALIZE, Normalize, NormSpec, mismatch, normalizer, resolve_norm

__all__ = [
    "NORMALIZE",
    "BlockSpec",
    "Capture",
    "Hidden",
    "LayerSpec",
    "NormSpec",
    "Normalize",
    "base_model",
    "evaluating",
    "select_layers",
]

BlockSpec = str | re.Pattern[str] | Iterable[str | nn.Module]
FinalNormSpec = str | nn.Module | NormSpec
LayerSpec = int | Sequence[int]

# attribute names of the final norm of a Hugging Face base model, most common first
_FINAL_NORM_NAMES = ("ln_f", "norm", "final_layer_norm", "norm_f", "ln_out", "final_layernorm")
# wrapper modules that insert a name component without changing the computation
_WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def base_model(model: nn.Module) -> nn.Module:
    """The body of a Hugging Face model without its LM head (so no vocabulary logits)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _is_hf(module: nn.Module) -> bool:
    # a model can only be a transformers model if transformers was imported: no import here
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def _module_names(root: nn.Module) -> dict[str, nn.Module]:
    """Name -> module in registration order, names cleaned of wrapper components (outer kept)."""
    names: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        clean = ".".join(p for p in name.split(".") if p not in _WRAPPER_NAMES)
        names.setdefault(clean, module)
    return names


def _glob(pattern: str) -> re.Pattern[str]:
    """A glob whose ``*`` matches one name component: ``h.*`` matches ``h.0``, not ``h.0.attn``."""
    parts = (re.escape(c) if c not in "*?" else ("[^.]*" if c == "*" else "[^.]") for c in pattern)
    return re.compile("".join(parts))


def _within(name: str, parent: str) -> bool:
    return parent == "" or name == parent or name.startswith(parent + ".")


def _module_lists(names: dict[str, nn.Module]) -> list[tuple[str, int]]:
    return [(n, len(m)) for n, m in names.items() if isinstance(m, nn.ModuleList) and len(m) > 0]


def _resolve_blocks(
    model: nn.Module, names: dict[str, nn.Module], blocks: BlockSpec | None
) -> list[str]:
    """Names of the blocks, in the order they run."""
    if blocks is None:
        return _auto_blocks(model, names)
    if isinstance(blocks, re.Pattern):
        found = [n for n in names if n and blocks.fullmatch(n)]
    elif isinstance(blocks, str):
        if any(c in blocks for c in "*?"):
            found = [n for n in names if n and _glob(blocks).fullmatch(n)]
        elif blocks in names and isinstance(names[blocks], (nn.ModuleList, nn.Sequential)):
            found = [
                n for n in names if n.startswith(blocks + ".") and "." not in n[len(blocks) + 1 :]
            ]
        else:
            found = [blocks] if blocks in names else []
    else:
        ids = {id(m): n for n, m in reversed(names.items())}  # first name of each module
        found = []
        for item in blocks:
            if isinstance(item, nn.Module):
                if id(item) not in ids:
                    raise ValueError(
                        f"A module in `blocks` ({type(item).__name__}) is not in the model."
                    )
                found.append(ids[id(item)])
            elif item in names:
                found.append(item)
            else:
                raise ValueError(f"blocks names {item!r}, which is not a module of the model.")
    if not found:
        lists = ", ".join(f"{n} ({k})" for n, k in _module_lists(names)) or "none"
        raise ValueError(
            f"blocks={blocks!r} matches no module of {type(model).__name__}. Name the blocks by "
            "module name, a glob such as 'transformer.h.*' (* matches one name component) or a "
            f"compiled regex; the model's ModuleLists (with lengths) are: {lists}."
        )
    for a in found:
        for b in found:
            if a != b and _within(b, a):
                raise ValueError(
                    f"blocks matches both {a!r} and {b!r}, which lies inside it; name only the "
                    "blocks whose outputs form the residual stream (e.g. 'transformer.h.*')."
                )
    return found


def _auto_blocks(model: nn.Module, names: dict[str, nn.Module]) -> list[str]:
    config = getattr(base_model(model), "config", None)
    depth = getattr(config, "num_hidden_layers", None) if config is not None else None
    lists = _module_lists(names)
    hits = [n for n, k in lists if k == depth]
    hits = [n for n in hits if not any(o != n and _within(n, o) for o in hits)]
    if len(hits) != 1:
        found = ", ".join(f"{n} ({k})" for n, k in lists) or "none"
        raise ValueError(
            f"Cannot tell the blocks of {type(model).__name__}: "
            + (
                f"{len(hits)} ModuleLists hold config.num_hidden_layers={depth} modules"
                if depth is not None
                else "it is not a Hugging Face model with config.num_hidden_layers"
            )
            + f". Pass blocks='<name>.*' (its ModuleLists, with lengths: {found})."
        )
    return [n for n in names if n.startswith(hits[0] + ".") and "." not in n[len(hits[0]) + 1 :]]


def _resolve_final_norm(
    model: nn.Module,
    names: dict[str, nn.Module],
    final_norm: FinalNormSpec | None,
    blocks: list[str],
) -> str | NormSpec:
    """The final norm's module name, or the NormSpec of a model without a final norm module."""
    if isinstance(final_norm, NormSpec):
        return final_norm
    if isinstance(final_norm, nn.Module):
        hits = [n for n, m in names.items() if m is final_norm]
        if not hits:
            raise ValueError(
                f"final_norm ({type(final_norm).__name__}) is not a module of the model."
            )
        name = hits[0]
    elif isinstance(final_norm, str):
        if final_norm not in names:
            raise ValueError(
                f"final_norm={final_norm!r} is not a module of {type(model).__name__}."
            )
        name = final_norm
    elif final_norm is None:
        outside = [n for n in names if not any(_within(n, b) for b in blocks)]
        hits = [n for n in outside if n.rsplit(".", 1)[-1] in _FINAL_NORM_NAMES]
        if len(hits) != 1:
            norms = [n for n in outside if "norm" in type(names[n]).__name__.lower()]
            raise ValueError(
                f"Cannot tell the final norm of {type(model).__name__}: "
                + (
                    f"several candidates {hits}"
                    if hits
                    else f"none named {'/'.join(_FINAL_NORM_NAMES)}"
                )
                + f" (norm modules outside the blocks: {norms or 'none'}). Pass "
                "final_norm='<module name>' (the norm applied to the last block's output), or "
                "final_norm=NormSpec(kind, eps) if the model has none."
            )
        name = hits[0]
    else:
        raise TypeError(
            f"final_norm must be a module name, a module or a NormSpec, got {type(final_norm)}."
        )
    if any(_within(name, b) or _within(b, name) for b in blocks):
        raise ValueError(f"final_norm={name!r} overlaps the blocks; name the norm after them.")
    return name


def select_layers(layers: LayerSpec | None, num_entries: int) -> tuple[int, ...]:
    """The true entry indices to measure.

    Args:
        layers: None (all entries ``0 … L``), an int ``k`` (every k-th entry ``0, k, 2k, …``
            plus the last, the final norm's output), or entry indices (negative ones count from
            the end: -1 is the last).
        num_entries: ``L + 1``.

    Returns:
        Sorted, distinct indices in ``[0, L]``.
    """
    if layers is None:
        return tuple(range(num_entries))
    if isinstance(layers, bool) or not isinstance(layers, (int, Sequence, range)):
        raise TypeError(f"layers must be an int (every k-th) or a list of entries, got {layers!r}.")
    if isinstance(layers, int):
        if layers < 1:
            raise ValueError(f"layers={layers}: every k-th entry needs k >= 1.")
        return tuple(sorted({*range(0, num_entries, layers), num_entries - 1}))
    chosen = []
    for e in layers:
        if isinstance(e, bool) or not isinstance(e, int) or not -num_entries <= e < num_entries:
            raise ValueError(
                f"layers holds {e!r}; entries are integers in [0, {num_entries - 1}] (or "
                f"[-{num_entries}, -1] from the end) for this model's {num_entries} entries."
            )
        chosen.append(e % num_entries)
    if len(set(chosen)) != len(chosen) or not chosen:
        raise ValueError(f"layers must name distinct entries, at least one, got {list(layers)}.")
    return tuple(sorted(chosen))


@dataclass
class Hidden:
    """What one forward pass left behind, at the example positions only.

    Attributes:
        entries: True entry index -> ``(n, d)`` tensor in the model's dtype, for the measured
            entries that come from blocks.
        norm_input: ``(n, d)`` the final norm's input (when its entry is measured).
        norm_output: ``(n, d)`` the final norm's output, to check its float64 re-application.
        norm_params: The final norm's weight and bias, float64, captured inside the forward.
        problems: What went wrong inside hooks (raised by :meth:`Capture.features`, after the
            forward completed: a hook that raises would break a collective forward).
    """

    entries: dict[int, torch.Tensor] = field(default_factory=dict)
    norm_input: torch.Tensor | None = None
    norm_output: torch.Tensor | None = None
    norm_params: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    fired: list[int] = field(default_factory=list)
    norm_calls: int = 0
    problems: list[str] = field(default_factory=list)


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
        model: A Hugging Face model (blocks and final norm are found automatically; only its base
            model runs, so no vocabulary logits) or any ``torch.nn.Module`` (called as
            ``model(input_ids)``; name its blocks).
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
    ) -> None:
        if normalize not in NORMALIZE:
            raise ValueError(f"Unknown normalize={normalize!r}; choose one of {NORMALIZE}.")
        self.model = model
        self.base = base_model(model)
        self._hf = _is_hf(self.base)
        names = _module_names(model)
        self.blocks = _resolve_blocks(model, names, blocks)
        self.final_norm = _resolve_final_norm(model, names, final_norm, self.blocks)
        self.num_entries = len(self.blocks) + 1
        self.layers = select_layers(layers, self.num_entries)
        self._names = names
        self._normalize_name = normalize
        self.spec: NormSpec | None = (
            self.final_norm if isinstance(self.final_norm, NormSpec) else None
        )
        # built once the final norm's reading is known (its epsilon serves every normalize)
        self._normalize: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def _norm_module(self) -> nn.Module | None:
        return None if isinstance(self.final_norm, NormSpec) else self._names[self.final_norm]

    # -- the forward pass ---------------------------------------------------------------------

    def _hooks(self, hidden: Hidden, positions: torch.Tensor) -> Iterator[Any]:
        """Register the hooks that fill ``hidden``; yields their handles."""
        wanted = set(self.layers)
        last = self.num_entries - 1
        norm = self._norm_module

        def keep(entry: int, value: torch.Tensor | None, what: str) -> None:
            if value is None or value.ndim != 3 or value.shape[:2] != positions.shape:
                shape = None if value is None else tuple(value.shape)
                hidden.problems.append(
                    f"{what} is not a (batch, length, d) tensor of batch and length "
                    f"{tuple(positions.shape)} (got {shape})."
                )
            elif entry in hidden.entries:
                hidden.problems.append(f"{what} ran more than once in one forward.")
            else:
                hidden.entries[entry] = value.detach()[positions]  # (n, d)

        if 0 in wanted:
            first = self._names[self.blocks[0]]

            def first_input(_m, args, kwargs):
                keep(0, _first_arg(args, kwargs), f"the input of {self.blocks[0]!r}")

            yield first.register_forward_pre_hook(first_input, with_kwargs=True)
        for i, name in enumerate(self.blocks):
            entry = i + 1
            store = entry in wanted and (entry < last or norm is None)

            def block_output(_m, _args, output, i=i, entry=entry, store=store, name=name):
                hidden.fired.append(i)
                if store:
                    keep(entry, _tensor(output), f"the output of block {name!r}")

            yield self._names[name].register_forward_hook(block_output)
        if norm is not None:  # always: its input and output also tell its kind and epsilon

            def norm_input(module, args, kwargs):
                hidden.norm_calls += 1
                x = _first_arg(args, kwargs)
                if hidden.norm_calls == 1 and x is not None and x.shape[:2] == positions.shape:
                    hidden.norm_input = x.detach()[positions]  # (n, d)
                    hidden.norm_params = tuple(
                        p.detach().to(torch.float64).clone()
                        if isinstance(p, torch.Tensor)
                        else None
                        for p in (getattr(module, "weight", None), getattr(module, "bias", None))
                    )

            def norm_output(_m, _args, output):
                y = _tensor(output)
                if hidden.norm_calls == 1 and y is not None and y.shape[:2] == positions.shape:
                    hidden.norm_output = y.detach()[positions]  # (n, d)

            yield norm.register_forward_pre_hook(norm_input, with_kwargs=True)
            yield norm.register_forward_hook(norm_output)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> Hidden:
        """Run the model once, keeping the measured entries at ``positions``.

        Never raises for a hook's finding (they are raised by :meth:`features`), so every
        process of a sharded model completes the same forward passes.

        Args:
            input_ids: ``(batch, length)`` token ids on the model's device.
            attention_mask: ``(batch, length)``, right-padded.
            positions: ``(batch, length)`` bool: the example positions to keep.
        """
        hidden = Hidden()
        handles = []
        try:
            for handle in self._hooks(hidden, positions):
                handles.append(handle)
            if self._hf:
                self.base(
                    input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False
                )
            else:
                self.model(input_ids)
        finally:
            for handle in handles:
                handle.remove()
        return hidden

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
            elif hidden.norm_input is None or hidden.norm_output is None:
                problems.append(
                    f"the final norm {self.final_norm!r} did not take and return a "
                    "(batch, length, d) tensor."
                )
        if problems:
            raise RuntimeError(
                f"Capturing the residual stream of {type(self.model).__name__} failed: "
                + " ".join(problems)
            )

    def features(self, hidden: Hidden) -> torch.Tensor:
        """Float64 features ``(len(layers), n, d)`` of the measured entries.

        Raises:
            RuntimeError: A hook found the blocks or final norm not as named.
            TypeError: The final norm cannot be re-applied (see :mod:`lawwatch.norms`).
        """
        self._check(hidden)
        norm = self._norm_module
        first = hidden.norm_input if norm is not None else next(iter(hidden.entries.values()))
        n, d = first.shape
        if n == 0:  # a batch without examples (e.g. a shard's padding rows)
            return torch.zeros(len(self.layers), 0, d, dtype=torch.float64, device=first.device)
        captured = [*hidden.entries.values(), *([hidden.norm_input] if norm is not None else [])]
        if not all(bool(torch.isfinite(t).all()) for t in captured):  # host sync
            raise ValueError(
                f"The hidden states of {type(self.model).__name__} contain NaN or Inf; PR is "
                "undefined for them."
            )
        if norm is not None:
            x = hidden.norm_input.to(torch.float64)  # (n, d)
            weight, bias = hidden.norm_params
            if self.spec is None:
                self.spec = resolve_norm(norm, x, hidden.norm_output, weight, bias, self.final_norm)
            elif mismatch(self.spec, x, hidden.norm_output, weight, bias) > 1:
                raise TypeError(
                    f"The final norm {self.final_norm!r} no longer matches {self.spec} re-applied "
                    "in float64: its behaviour changed between batches."
                )
        if self._normalize is None:
            self._normalize = normalizer(self._normalize_name, self.spec)
        last = self.num_entries - 1
        out = []
        for entry in self.layers:
            if entry == last and norm is not None:
                out.append(self.spec.apply(x, weight, bias))  # the model's own final norm
            else:
                out.append(self._normalize(hidden.entries[entry].to(torch.float64)))
        return torch.stack(out)  # (len(layers), n, d)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward` then :meth:`features`."""
        return self.features(self.forward(input_ids, attention_mask, positions))


HiddenStateCapture = Capture  # the name this class had before hooks replaced output_hidden_states


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; every module's train/eval flag restored after.

    Also undoes RWKV's inference-time rescaling: Hugging Face's RWKV divides some weights by
    powers of two on its first forward in eval mode and multiplies them back only on the next
    forward in train mode, so a checkpoint saved between a snapshot and that forward would hold
    the divided weights. Powers of two make the round trip exact.
    """
    modes = {module: module.training for module in model.modules()}
    rescaled = {m: m.layers_are_rescaled for m in modes if hasattr(m, "layers_are_rescaled")}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        for module, before in rescaled.items():
            if module.layers_are_rescaled != before and callable(
                getattr(module, "_rescale_layers", None)
            ):
                module._rescale_layers()
