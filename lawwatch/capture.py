"""Per-layer features from a model: the residual stream, normalized in float64.

He & Su's protocol (DESIGN.md §1): hidden-state entries ``0 … L-1`` go through a *freshly
initialized* instance of the model's final-norm type (weight 1, bias 0, the model's epsilon);
the last entry is the model's own final-norm output. Both are computed here in float64 from
the residual stream — the final norm's input is captured with a forward pre-hook and the norm
re-applied in float64 — because a norm computed in float32 leaves a mean direction holding
only rounding noise, which least squares then fits (DESIGN.md §2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Normalize = Literal["auto", "layernorm", "rmsnorm", "standardize", "none"]
NORMALIZE: tuple[str, ...] = ("auto", "layernorm", "rmsnorm", "standardize", "none")

# attribute names of the final norm on a Hugging Face base model, most common first
_FINAL_NORM_NAMES = ("ln_f", "norm", "final_layer_norm", "norm_f", "ln_out", "final_layernorm")


@dataclass(frozen=True)
class Hidden:
    """One forward pass: each hidden-state entry ``(batch, length, d)``, the final norm's input."""

    states: tuple[torch.Tensor, ...]
    final_norm_input: torch.Tensor | None


@dataclass(frozen=True)
class NormSpec:
    """A final-norm type and its parameters.

    Attributes:
        kind: ``"layernorm"`` (subtract the mean, divide by the RMS of the rest) or
            ``"rmsnorm"`` (divide by the RMS).
        eps: Added to the variance (or mean square) before the square root.
    """

    kind: Literal["layernorm", "rmsnorm"]
    eps: float

    def fresh(self, x: torch.Tensor) -> torch.Tensor:
        """A freshly initialized norm of this kind (weight 1, bias 0) over the last dim."""
        if self.kind == "layernorm":
            x = x - x.mean(dim=-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


def norm_spec(module: nn.Module) -> NormSpec:
    """Read the norm type and epsilon off a norm module.

    Raises:
        TypeError: The module is neither a LayerNorm nor an RMSNorm-like module with an epsilon.
    """
    if isinstance(module, nn.LayerNorm):
        return NormSpec("layernorm", float(module.eps))
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    name = type(module).__name__.lower()
    if isinstance(module, nn.RMSNorm):
        return NormSpec(
            "rmsnorm", float(eps if eps is not None else torch.finfo(torch.float32).eps)
        )
    if eps is not None and "rmsnorm" in name:
        return NormSpec("rmsnorm", float(eps))
    if eps is not None and "layernorm" in name:
        return NormSpec("layernorm", float(eps))
    raise TypeError(
        f"Cannot tell whether {type(module).__name__} is a LayerNorm or an RMSNorm; pass "
        "normalize='layernorm' or normalize='rmsnorm' explicitly."
    )


def _reapply(module: nn.Module, spec: NormSpec, x: torch.Tensor) -> torch.Tensor | None:
    """The model's own final norm (its trained weight and bias) applied to ``x`` in float64.

    Returns None for a norm whose weight convention is unknown (then the model's own output is
    used as it is).
    """
    if type(module).__name__.startswith("Gemma"):  # weight is stored as (scale - 1)
        return None
    y = spec.fresh(x)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(weight, torch.Tensor):
        y = y * weight.to(torch.float64)
    if isinstance(bias, torch.Tensor):
        y = y + bias.to(torch.float64)
    return y


def find_final_norm(base: nn.Module) -> nn.Module | None:
    """The final norm of a Hugging Face base model, by its conventional attribute name."""
    for name in _FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def base_model(model: nn.Module) -> nn.Module:
    """The body of a Hugging Face model without its LM head (so no vocabulary logits)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _normalizer(normalize: str, spec: NormSpec | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if normalize == "auto":
        if spec is None:
            raise ValueError(
                "normalize='auto' needs the model's final-norm type, which was not found; pass "
                "normalize='layernorm' or 'rmsnorm' (or 'standardize' / 'none')."
            )
        return spec.fresh
    eps = spec.eps if spec is not None else 1e-5
    if normalize == "layernorm":
        return NormSpec("layernorm", eps).fresh
    if normalize == "rmsnorm":
        return NormSpec("rmsnorm", eps).fresh
    if normalize == "standardize":
        return lambda x: (
            (x - x.mean(dim=-1, keepdim=True)) / x.std(dim=-1, keepdim=True, correction=0)
        )
    if normalize == "none":
        return lambda x: x
    raise ValueError(f"Unknown normalize={normalize!r}; choose one of {NORMALIZE}.")


class HiddenStateCapture:
    """Features of every hidden-state entry of a Hugging Face model, one batch at a time.

    Runs the base model (no LM head) with ``output_hidden_states=True`` and a pre-hook on the
    final norm. Entries ``0 … L-1`` are normalized with ``normalize``; entry ``L`` is the
    model's final norm re-applied in float64 to its captured input (the model's own output when
    the norm cannot be re-applied).

    Args:
        model: A Hugging Face causal LM or base model.
        normalize: ``"auto"`` (the paper's fresh final-norm), ``"layernorm"``, ``"rmsnorm"``,
            ``"standardize"`` (per-token z-score) or ``"none"``.
    """

    def __init__(self, model: nn.Module, normalize: Normalize = "auto") -> None:
        self.base = base_model(model)
        self.final_norm = find_final_norm(self.base)
        spec = None
        if self.final_norm is not None:
            try:
                spec = norm_spec(self.final_norm)
            except TypeError:
                if normalize == "auto":
                    raise
        self.spec = spec
        self.normalize = _normalizer(normalize, spec)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Hidden:
        """Run the base model once; return its hidden states and the final norm's input.

        Args:
            input_ids: ``(batch, length)`` token ids on the model's device.
            attention_mask: ``(batch, length)``.
        """
        captured: list[torch.Tensor] = []
        handle = None
        if self.final_norm is not None:
            handle = self.final_norm.register_forward_pre_hook(
                lambda _module, args: captured.append(args[0])
            )
        try:
            out = self.base(
                input_ids=input_ids,
                attention_mask=attention_mask.long(),
                output_hidden_states=True,
                use_cache=False,
            )
        finally:
            if handle is not None:
                handle.remove()
        if out.hidden_states is None:
            raise TypeError(
                f"{type(self.base).__name__} returned no hidden_states; it is not a Hugging Face "
                "model that supports output_hidden_states."
            )
        return Hidden(tuple(out.hidden_states), captured[0] if len(captured) == 1 else None)

    def features(self, hidden: Hidden, positions: torch.Tensor) -> torch.Tensor:
        """Float64 features ``(L + 1, n, d)`` at the ``n`` True entries of ``positions``.

        Args:
            hidden: What :meth:`forward` returned.
            positions: ``(batch, length)`` bool: which positions are examples.
        """
        # (n, d) float64 per entry: select examples first, so normalization costs O(n d)
        entries = [self.normalize(h[positions].to(torch.float64)) for h in hidden.states[:-1]]
        last = None
        if hidden.final_norm_input is not None and self.spec is not None:
            x = hidden.final_norm_input[positions].to(torch.float64)
            last = _reapply(self.final_norm, self.spec, x)
        if last is None:
            last = hidden.states[-1][positions].to(torch.float64)
        entries.append(last)
        return torch.stack(entries)  # (L + 1, n, d)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward` then :meth:`features`."""
        return self.features(self.forward(input_ids, attention_mask), positions)
