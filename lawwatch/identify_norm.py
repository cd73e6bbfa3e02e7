"""A final norm whose kind and epsilon are not attributes, identified by running it.

nanoGPT's ``LayerNorm`` calls ``F.layer_norm(x, shape, weight, bias, 1e-5)``: its epsilon is in
its code, not on the module, so it cannot be read. Its output on inputs chosen here pins down
both unknowns, whatever its weight, bias and weight convention (the parameters are only read,
never changed):

* **Epsilon.** Rows ``s·v``, ``v`` a balanced ±1 pattern (mean 0, mean square ``m``), are mapped
  by a LayerNorm and by an RMSNorm alike to ``(w + o)·v·ρ(s) + b`` with
  ``ρ(s) = s / sqrt(s²·m + eps)``. The difference of the outputs for ``+s·v`` and ``-s·v`` is
  ``2·(w + o)·v·ρ(s)``: weight, offset and bias cancel in the ratio ``r = ρ(s)/ρ(1)`` of two
  scales, which gives ``eps = a·b·(1 - r²) / (r²·b - a)`` (``a = s²·m``, ``b = m``). Scales
  ``s = 2^-k`` (exact in every dtype) are swept and the one with ``r²`` nearest ½ (where eps
  moves the output most) is used; the estimate is then rounded to the fewest significant
  digits its standard error allows (``1e-5``, not ``1.0000003e-5``).
* **Mean-centering.** Rows ``1 ± v``: a LayerNorm removes the constant (the difference is
  that of ``±v``), an RMSNorm divides by ``sqrt(1 + m + eps)`` instead of ``sqrt(m + eps)``.

The reading found is then checked as every final norm is: re-applied in float64 with the
module's own weight and bias, it must reproduce the module's output on those inputs within
:func:`lawwatch.norms.tolerance`, and later the capture checks it on every batch.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from lawwatch.norms import EPS_ATTRS, NormKind, NormSpec, mismatch, tolerance

__all__ = ["identify", "needs_identifying"]

# rows of each pattern: the ratios are least squares over these many rows × d values
_PATTERNS = 2
# s = 2^-k: from 16 (s² = 256, eps up to ~1e3) to 2^-58 (eps down to ~1e-35), 4× apart
_EXPONENTS = range(-4, 60, 2)
# a kind is accepted when the centering ratio is this close to its prediction (they differ
# by 1 - sqrt(1/2) ≈ 0.29 for an even width)
_KIND_MARGIN = 0.05

# module -> its reading: a norm is run once per process, however many monitors measure it
_KNOWN: weakref.WeakKeyDictionary[nn.Module, NormSpec] = weakref.WeakKeyDictionary()


def needs_identifying(module: nn.Module | None) -> bool:
    """Whether ``module`` is a final norm whose epsilon cannot be read off an attribute."""
    if module is None or isinstance(module, nn.RMSNorm):  # nn.RMSNorm(eps=None): dtype's eps
        return False
    for name in EPS_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return False
    return True


def identify(
    module: nn.Module, name: str, dim: int, dtype: torch.dtype, device: torch.device
) -> NormSpec:
    """The reading (kind, epsilon, weight convention) of a norm, from its outputs.

    Args:
        module: The norm module; it is called (under ``no_grad``) on ``(1, rows, dim)`` inputs
            of ``dtype`` on ``device``. Its parameters are read, never changed.
        name: The module's name, for the error message.
        dim: The width it normalizes.
        dtype: The dtype it is fed (the model's).
        device: Where its parameters are.

    Raises:
        TypeError: It could not be run on such inputs, or behaves like no LayerNorm or RMSNorm
            (the message says how to give lawwatch the reading).
    """
    known = _KNOWN.get(module)
    if known is not None:
        return known
    try:
        spec = _identify(module, dim, dtype, device)
    except _Unidentified as error:
        raise TypeError(
            f"The final norm {name!r} ({type(module).__name__}) keeps its epsilon in its code "
            f"(no attribute {' / '.join(EPS_ATTRS)}), and running it on test inputs did not "
            f"identify it as a LayerNorm or RMSNorm: {error}. Give the module the epsilon its "
            f"forward uses as an attribute (e.g. model.{name}.eps = 1e-5), or pass "
            "final_norm=NormSpec(kind, eps) (from lawwatch import NormSpec) to treat the model "
            "as having no final norm module (the last block's output then goes through that "
            "fresh norm)."
        ) from None
    _KNOWN[module] = spec
    return spec


class _Unidentified(Exception):
    """Why the norm could not be identified (worded for the end of a sentence)."""


def _patterns(dim: int) -> torch.Tensor:
    """``(_PATTERNS, dim)`` float64 rows of ±1, half each (an odd width: the last value 0).

    Seeded by a generator of its own: the global RNG state is left as found.
    """
    if dim < 2:
        raise _Unidentified(f"its width {dim} is too small to normalize")
    half = (dim // 2) * 2
    gen = torch.Generator().manual_seed(0)
    rows = torch.zeros(_PATTERNS, dim, dtype=torch.float64)
    for row in rows:
        signs = torch.ones(half, dtype=torch.float64)
        signs[half // 2 :] = -1.0
        row[:half] = signs[torch.randperm(half, generator=gen)]
    return rows


def _exact(value: float, dtype: torch.dtype) -> bool:
    """Whether ``value`` (a power of two) and its float32 square are nonzero and exact.

    ``value`` must be a number of ``dtype``; its square is taken in float32, where norms
    compute their variance.
    """
    there = float(torch.tensor(value, dtype=torch.float64).to(dtype))
    squared = float(torch.tensor(value * value, dtype=torch.float32))
    return there == value and squared > 0.0 and math.isfinite(squared)


def _run(module: nn.Module, x: torch.Tensor, dtype: torch.dtype, device: torch.device):
    """The module's output on ``(rows, d)`` float64 ``x``, fed as ``(1, rows, d)`` ``dtype``."""
    fed = x.to(device=device, dtype=dtype).unsqueeze(0)
    try:
        with torch.no_grad():
            out = module(fed)
    except Exception as error:
        raise _Unidentified(
            f"calling it on a (1, {x.shape[0]}, d) tensor raised {error!r}"
        ) from None
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(fed.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _Unidentified(f"it returned {got} for an input of shape {tuple(fed.shape)}")
    return out[0]


def _ratio(diff: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Least-squares ``r`` in ``diff ≈ r·ref`` and its standard error."""
    ss = float((ref * ref).sum())
    if not ss > 0.0:
        raise _Unidentified("its output does not depend on its input (a zero weight?)")
    r = float((diff * ref).sum()) / ss
    resid = diff - r * ref
    se = math.sqrt(float((resid * resid).sum()) / max(1, resid.numel() - 1) / ss)
    return r, se


def _eps(r: float, a: float, b: float) -> float:
    """The epsilon of ``r² = a·(b + eps) / (b·(a + eps))`` (see the module documentation)."""
    return a * b * (1.0 - r * r) / (r * r * b - a)


def _rounded(eps: float, err: float) -> float:
    """``eps`` with the fewest significant digits (up to 3) that stay within ``err`` of it."""
    if eps == 0.0:
        return eps
    for digits in range(1, 4):
        short = float(f"{eps:.{digits - 1}e}")
        if abs(short - eps) <= err:
            return short
    return eps


def _identify(module: nn.Module, dim: int, dtype: torch.dtype, device: torch.device) -> NormSpec:
    v = _patterns(dim)
    m = float((v * v).mean(dim=-1)[0])  # the same for every pattern
    scales = [2.0**-k for k in _EXPONENTS if _exact(2.0**-k, dtype)]
    # rows: +s·v and -s·v for each scale, then 1 + v and 1 - v
    x = torch.cat([*(torch.cat([s * v, -s * v]) for s in scales), 1.0 + v, 1.0 - v])
    y_raw = _run(module, x, dtype, device)
    y = y_raw.to(torch.float64).cpu()
    if not bool(torch.isfinite(y).all()):
        raise _Unidentified("its output holds NaN or Inf")
    n = _PATTERNS
    diffs = [
        y[2 * n * i : 2 * n * i + n] - y[2 * n * i + n : 2 * n * (i + 1)]
        for i in range(len(scales))
    ]
    ref = diffs[scales.index(1.0)]
    ratios = [_ratio(d, ref) for d in diffs]
    # the scale where eps moves the output most: r² nearest 1/2
    best = min(range(len(scales)), key=lambda i: abs(ratios[i][0] ** 2 - 0.5))
    r, se = ratios[best]
    if not 0.0 < r <= 1.0 + 1e-3:
        raise _Unidentified(
            f"its output shrank by {r:.3g}, not between 0 and 1, as the input shrank"
        )
    a, b = scales[best] ** 2 * m, m
    if r * r > 0.95:  # even the smallest scale is untouched: eps is below resolution
        eps = 0.0
    elif r * r < 0.05:
        raise _Unidentified("its epsilon is larger than any input variance tried (above ~1e3)")
    else:
        eps = _eps(r, a, b)
        spread = abs(_eps(min(r + se, 1.0), a, b) - _eps(max(r - se, 1e-12), a, b)) / 2
        eps = _rounded(eps, max(3.0 * spread, tolerance(dtype) * eps))
    if not eps >= 0.0:
        raise _Unidentified(f"its output fits a negative epsilon ({eps:.3g})")
    centered = y[-2 * n : -n] - y[-n:]  # (1 + v) - (1 - v)
    rc, _ = _ratio(centered, ref)
    predicted: dict[NormKind, float] = {
        "layernorm": 1.0,
        "rmsnorm": math.sqrt((m + eps) / (1.0 + m + eps)),
    }
    kind = min(predicted, key=lambda k: abs(rc - predicted[k]))
    if abs(rc - predicted[kind]) > _KIND_MARGIN:
        raise _Unidentified(
            f"a constant added to its input scaled its output by {rc:.3g}, which neither a "
            f"LayerNorm (1) nor an RMSNorm ({predicted['rmsnorm']:.3g}) does"
        )
    return _checked(module, NormSpec(kind, eps), x, y_raw, scales, best, dtype)


def _checked(
    module: nn.Module,
    spec: NormSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    scales: list[float],
    best: int,
    dtype: torch.dtype,
) -> NormSpec:
    """``spec`` with the weight convention that reproduces the module's output.

    Re-applied in float64 with the module's own weight and bias, as the capture checks every
    batch.
    """
    n = _PATTERNS
    rows = [scales.index(1.0), best]
    pick = torch.cat(
        [torch.arange(2 * n * i, 2 * n * (i + 1)) for i in rows]
        + [torch.arange(x.shape[0] - 2 * n, x.shape[0])]
    )
    # the module's rows as it was fed them (its input rounded to its dtype), in float64
    x = x[pick].to(dtype).to(torch.float64)
    y = y.cpu()[pick]
    weight, bias = (_param(module, name, x.shape[-1]) for name in ("weight", "bias"))
    errors = []
    for offset in (0.0, 1.0):
        candidate = NormSpec(spec.kind, spec.eps, offset)
        err = mismatch(candidate, x, y, weight, bias)
        if err <= 1.0:
            return candidate
        errors.append(err)
    raise _Unidentified(
        f"as a {spec.kind} with eps={spec.eps:.3g} re-applied in float64 with its weight and "
        f"bias, it is off by {min(errors) * tolerance(y.dtype):.2g} (relative)"
    )


def _param(module: nn.Module, name: str, dim: int) -> torch.Tensor | None:
    value = getattr(module, name, None)
    if isinstance(value, torch.Tensor) and tuple(value.shape) == (dim,):
        return value.detach().to(device="cpu", dtype=torch.float64)
    return None
