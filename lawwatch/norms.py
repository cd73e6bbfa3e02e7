"""Norms in float64: the fresh norm of He & Su's protocol and the model's own final norm.

A norm computed in float32 or bf16 leaves a mean direction that holds only rounding noise,
which least squares then fits (see docs/protocol.md), so every norm lawwatch applies runs in
float64 on the residual stream. The model's final norm is *re-applied*: its kind, epsilon and weight
convention are read off the module, and every batch checks the float64 re-application against
the module's own output, so a norm that lawwatch misreads is an error, never a silent change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Normalize = Literal["auto", "layernorm", "rmsnorm", "standardize", "none"]
NORMALIZE: tuple[str, ...] = ("auto", "layernorm", "rmsnorm", "standardize", "none")
NormKind = Literal["layernorm", "rmsnorm"]

# where a norm module keeps its epsilon, most common first
EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")
# default epsilon of normalize='layernorm' / 'rmsnorm' when the model has no final norm to copy
_DEFAULT_EPS = 1e-5


@dataclass(frozen=True)
class NormSpec:
    """A norm type and its parameters.

    Attributes:
        kind: ``"layernorm"`` (subtract the mean, divide by the root mean square of the rest) or
            ``"rmsnorm"`` (divide by the root mean square).
        eps: Added to the variance (or mean square) before the square root.
        weight_offset: The scale a module applies is ``weight_offset + weight``: 0 for the usual
            convention, 1 for Gemma-style norms that store ``scale - 1``.
    """

    kind: NormKind
    eps: float
    weight_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"NormSpec kind must be 'layernorm' or 'rmsnorm', got {self.kind!r}.")
        if not self.eps >= 0:
            raise ValueError(f"NormSpec eps must be non-negative, got {self.eps}.")

    def fresh(self, x: torch.Tensor) -> torch.Tensor:
        """A freshly initialized norm of this kind (scale 1, bias 0) over the last dim."""
        if self.kind == "layernorm":
            x = x - x.mean(dim=-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)

    def apply(
        self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """This norm with trained ``weight`` and ``bias`` (either may be None), in ``x``'s dtype."""
        y = self.fresh(x)
        if weight is not None:
            y = y * (weight.to(x.dtype) + self.weight_offset)
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y


def _eps_of(module: nn.Module) -> float | None:
    for name in EPS_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def norm_candidates(
    module: nn.Module,
    input_dtype: torch.dtype,
    dim: int | None = None,
    device: torch.device | None = None,
    name: str = "",
) -> list[NormSpec]:
    """The readings of a norm module worth trying, most likely first.

    The kind comes from the type (``nn.LayerNorm``, ``nn.RMSNorm``) or the class name
    (``…RMSNorm``, ``…LayerNorm``); the other kind and the Gemma-style ``1 + weight`` scale are
    tried after it, because names mislead (T5's ``T5LayerNorm`` is an RMSNorm). The epsilon is
    read off the module (``eps``, ``variance_epsilon`` or ``epsilon``); ``nn.RMSNorm`` without
    one uses the input dtype's machine epsilon, as PyTorch does. A module that keeps its epsilon
    in its code (nanoGPT's ``LayerNorm``) is identified by running it on chosen inputs
    (:func:`lawwatch.identify_norm.identify`), given its width ``dim`` and ``device``.

    Raises:
        TypeError: The module has no readable epsilon and could not be identified.
    """
    eps = _eps_of(module)
    if isinstance(module, nn.RMSNorm) and eps is None:
        eps = torch.finfo(input_dtype).eps
    if eps is None and dim is not None:
        # imported here: identify_norm builds on this module
        from lawwatch.identify_norm import identify

        found = identify(module, name, dim, input_dtype, device or torch.device("cpu"))
        other: NormKind = "layernorm" if found.kind == "rmsnorm" else "rmsnorm"
        rest = [
            NormSpec(kind, found.eps, offset)
            for kind in (found.kind, other)
            for offset in (0.0, 1.0)
            if (kind, offset) != (found.kind, found.weight_offset)
        ]
        return [found, *rest]
    if eps is None:
        raise TypeError(
            f"Cannot read the epsilon of the final norm {type(module).__name__} (no attribute "
            f"{' / '.join(EPS_ATTRS)}) nor its width, so it cannot be re-applied in float64. "
            "Give the module the epsilon its forward uses as an attribute (module.eps = 1e-5), "
            "or pass final_norm=NormSpec(kind, eps) (from lawwatch import NormSpec) to treat "
            "the model as having no final norm module (the last block's output then goes "
            "through that fresh norm)."
        )
    called = type(module).__name__.lower()
    first: NormKind = (
        "rmsnorm" if isinstance(module, nn.RMSNorm) or "rms" in called else "layernorm"
    )
    second: NormKind = "layernorm" if first == "rmsnorm" else "rmsnorm"
    offsets = (1.0, 0.0) if called.startswith("gemma") else (0.0, 1.0)
    return [NormSpec(kind, eps, offset) for kind in (first, second) for offset in offsets]


def tolerance(dtype: torch.dtype) -> float:
    """Relative agreement expected between a module's output and its float64 re-application.

    Many modules compute in float32 whatever the model's dtype (Llama's RMSNorm upcasts), so
    the tolerance is that of the coarser of float32 and ``dtype``: 8 units of rounding.
    """
    return 8 * max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)


def deviation(ref: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Largest deviation of ``y`` from the float64 ``ref``, relative to each row's largest.

    ``ref`` and ``y`` are ``(n, d)`` with n ≥ 1; the result is a 0-d float64 tensor on
    ``ref``'s device (no host sync).
    """
    scale = ref.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return ((ref - y.to(torch.float64)).abs() / scale).max()


def mismatch(spec: NormSpec, x: torch.Tensor, y: torch.Tensor, weight, bias) -> float:
    """Largest deviation of ``spec`` applied to ``x`` from the module's output ``y``.

    Relative to each row's largest magnitude, in units of the dtype tolerance (≤ 1 agrees).

    Args:
        spec: The reading to check.
        x: ``(n, d)`` the module's input, float64.
        y: ``(n, d)`` the module's output, in the model's dtype.
        weight: ``(d,)`` float64 or None.
        bias: ``(d,)`` float64 or None.
    """
    if x.shape[0] == 0:
        return 0.0
    err = deviation(spec.apply(x, weight, bias), y).item()  # host sync
    return err / tolerance(y.dtype)


def resolve_norm(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, weight, bias, name: str
) -> NormSpec:
    """The reading of ``module`` that reproduces its output ``y`` from its input ``x``.

    Args:
        module: The norm module.
        x: ``(n, d)`` float64 input it was called with (n ≥ 1).
        y: ``(n, d)`` its output, in the model's dtype.
        weight, bias: Its parameters as float64, captured during the forward, or None.
        name: The module's name, for the error message.

    Raises:
        TypeError: No reading reproduces the module (an unknown norm).
    """
    candidates = norm_candidates(module, y.dtype, x.shape[-1], x.device, name)
    errors = [mismatch(spec, x, y, weight, bias) for spec in candidates]
    for spec, err in zip(candidates, errors, strict=True):
        if err <= 1.0:
            return spec
    raise TypeError(
        f"The final norm {name!r} ({type(module).__name__}) behaves like no LayerNorm or RMSNorm "
        f"with eps={candidates[0].eps} and scale weight or 1 + weight (best relative mismatch "
        f"{min(errors) * tolerance(y.dtype):.2g}). Pass final_norm=NormSpec(kind, eps) to treat "
        "the model as having no final norm module (the last block's output then goes through "
        "that fresh norm; from lawwatch import NormSpec), or name the right module with "
        "final_norm='…'."
    )


def normalizer(normalize: str, spec: NormSpec | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The float64 map applied to entries ``0 … L-1`` (every entry, without a final norm module).

    Args:
        normalize: ``"auto"`` (a fresh norm of ``spec``'s kind and epsilon: the paper's),
            ``"layernorm"`` / ``"rmsnorm"`` (fresh, with ``spec``'s epsilon, else 1e-5),
            ``"standardize"`` (per-token z-score: mean 0, population std 1) or ``"none"``.
        spec: The model's final norm, if known.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"Unknown normalize={normalize!r}; choose one of {NORMALIZE}.")
    if normalize == "auto":
        if spec is None:
            raise ValueError(
                "normalize='auto' needs the model's final-norm type, which is unknown; pass "
                "final_norm='<module name>' or final_norm=NormSpec(kind, eps), or choose "
                "normalize='layernorm' / 'rmsnorm' / 'standardize' / 'none'."
            )
        return NormSpec(spec.kind, spec.eps).fresh
    eps = spec.eps if spec is not None else _DEFAULT_EPS
    if normalize in ("layernorm", "rmsnorm"):
        return NormSpec(normalize, eps).fresh
    if normalize == "standardize":
        return _standardize
    return _identity


def _standardize(x: torch.Tensor) -> torch.Tensor:
    centered = x - x.mean(dim=-1, keepdim=True)
    return centered / centered.pow(2).mean(dim=-1, keepdim=True).sqrt()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
