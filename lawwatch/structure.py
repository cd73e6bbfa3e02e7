"""Where the residual stream lives in a model: its blocks, its final norm, its entries.

Hugging Face models are read automatically: the blocks are the ``nn.ModuleList`` of
``config.num_hidden_layers`` modules (``config.n_layer`` for nanoGPT's ``GPT``), the final
norm the module named ``ln_f``, ``norm``, ``final_layer_norm``, ``norm_f``, ``ln_out`` or
``final_layernorm`` outside them (:data:`lawwatch.models.FINAL_NORM_NAMES`). Any other
module names its blocks (a name, a glob, a regex or a list) and, unless it has one of those
names, its final norm. Names are those of ``model.named_modules()``, without the components
that wrappers insert (FSDP, activation checkpointing, ``torch.compile``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from lawwatch.models import FINAL_NORM_NAMES, base_model, clean_name
from lawwatch.norms import NormSpec

BlockSpec = str | re.Pattern[str] | Iterable[str | nn.Module]
FinalNormSpec = str | nn.Module | NormSpec
LayerSpec = int | Sequence[int]


def module_names(root: nn.Module) -> dict[str, nn.Module]:
    """Name -> module in registration order, names cleaned of wrapper components (outer kept)."""
    names: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        names.setdefault(clean_name(name), module)
    return names


def _glob(pattern: str) -> re.Pattern[str]:
    """A glob whose ``*`` matches one name component: ``h.*`` matches ``h.0``, not ``h.0.attn``."""
    parts = (re.escape(c) if c not in "*?" else ("[^.]*" if c == "*" else "[^.]") for c in pattern)
    return re.compile("".join(parts))


def _within(name: str, parent: str) -> bool:
    return parent == "" or name == parent or name.startswith(parent + ".")


def _module_lists(names: dict[str, nn.Module]) -> list[tuple[str, int]]:
    return [(n, len(m)) for n, m in names.items() if isinstance(m, nn.ModuleList) and len(m) > 0]


def resolve_blocks(
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
    # Hugging Face's config.num_hidden_layers, else nanoGPT's GPTConfig.n_layer
    depth = getattr(config, "num_hidden_layers", getattr(config, "n_layer", None))
    lists = _module_lists(names)
    hits = [n for n, k in lists if k == depth]
    hits = [n for n in hits if not any(o != n and _within(n, o) for o in hits)]
    if len(hits) != 1:
        found = ", ".join(f"{n} ({k})" for n, k in lists) or "none"
        outer = [n for n, _ in lists if not any(o != n and _within(n, o) for o, _ in lists)]
        fix = f"blocks={outer[0]!r}" if len(outer) == 1 else "blocks='<name>'"
        raise ValueError(
            f"Cannot tell the blocks of {type(model).__name__}: "
            + (
                f"{len(hits)} ModuleLists hold config.num_hidden_layers={depth} modules"
                if depth is not None
                else "it has no config.num_hidden_layers (Hugging Face) or config.n_layer"
            )
            + f". Pass {fix}, the ModuleList of its blocks (its ModuleLists, with lengths: "
            f"{found}), and final_norm='<name>' unless the norm after the last block is named "
            f"{'/'.join(FINAL_NORM_NAMES)}."
        )
    return [n for n in names if n.startswith(hits[0] + ".") and "." not in n[len(hits[0]) + 1 :]]


def resolve_final_norm(
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
        hits = [n for n in outside if n.rsplit(".", 1)[-1] in FINAL_NORM_NAMES]
        if len(hits) != 1:
            norms = [n for n in outside if "norm" in type(names[n]).__name__.lower()]
            raise ValueError(
                f"Cannot tell the final norm of {type(model).__name__}: "
                + (
                    f"several candidates {hits}"
                    if hits
                    else f"none named {'/'.join(FINAL_NORM_NAMES)}"
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


@dataclass(frozen=True)
class Structure:
    """A model's residual stream, located.

    Attributes:
        blocks: Block names, in the order they run.
        final_norm: The final norm's module name, or the NormSpec of a model without one.
        modules: Name -> module (wrapper components removed).
    """

    blocks: list[str]
    final_norm: str | NormSpec
    modules: dict[str, nn.Module]

    @property
    def num_entries(self) -> int:
        """``L + 1``: the input of the first block, then each block's output."""
        return len(self.blocks) + 1

    @property
    def norm_module(self) -> nn.Module | None:
        """The final norm module, or None for a model without one."""
        return None if isinstance(self.final_norm, NormSpec) else self.modules[self.final_norm]


def locate(
    model: nn.Module, blocks: BlockSpec | None = None, final_norm: FinalNormSpec | None = None
) -> Structure:
    """Find the blocks and the final norm of ``model`` (see the module docstring).

    Raises:
        ValueError: They cannot be found or do not fit together; the message says what to pass.
    """
    names = module_names(model)
    found = resolve_blocks(model, names, blocks)
    return Structure(found, resolve_final_norm(model, names, final_norm, found), names)
