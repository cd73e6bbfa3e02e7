"""Prediction residuals from additive sufficient statistics.

The prediction residual of layer ``l`` is ``PR_l = 1 - R^2`` of an ordinary least-squares fit,
*with intercept*, of a target on that layer's features (He & Su, arXiv 2408.13442). Everything
OLS needs is a handful of sums over examples, so a probe set of any size streams through in
batches with memory independent of its length, statistics from several processes merge with
one all-reduce, and one batched eigendecomposition solves every layer at once.

Numerics (see docs/protocol.md §2):

* **Shifted accumulation.** Sums are taken about a per-layer shift (the mean of the first batch),
  not about zero, so a feature whose mean dwarfs its spread (a massive-activation dimension)
  does not lose its variance to cancellation in ``Σxxᵀ - ΣxΣxᵀ/n``. Statistics with different
  shifts are re-based exactly before they are added.
* **Scale-free solve.** The centered Gram is scaled to unit diagonal (a correlation matrix)
  before the eigendecomposition; the OLS projection does not depend on column scale, and
  scaling makes the rank decision independent of it.
* **Rank tolerance.** Eigenvalues of the scaled Gram below ``rtol * λ_max`` (default
  ``rtol = 1e-11``: singular values of the standardized design under ~3e-6 of the largest) are
  treated as zero, giving the least-squares projection on rank-deficient inputs: LayerNorm
  outputs (always rank ≤ d-1), dead and duplicated columns. Why this value: the float64 Gram's
  noise floor is about ``d * eps`` relative (under 2e-12 even at d = 8192), so exact null
  directions are cut; genuine directions of real features (tested down to ~6e-11 after a
  massive-activation LayerNorm) are kept; directions holding only float32 rounding noise
  (singular value ~1e-7 of the largest, eigenvalue ~1e-14) are dropped, where
  ``numpy.linalg.lstsq`` keeps them and fits noise (an error ~1/n in PR). bf16 rounding noise
  (~1e-3) cannot be told from signal by any tolerance: compute normalized features in
  float64, as :mod:`lawwatch.capture` does.
* A feature column whose centered sum of squares is under ``64 * eps`` of its uncentered one
  (about the shift) is constant up to rounding and is dropped as dead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Target = Literal["token_id", "onehot"]
TARGETS: tuple[str, ...] = ("token_id", "onehot")

_EPS = torch.finfo(torch.float64).eps
DEFAULT_RTOL = 1e-11


class ResidualStats:
    """Additive sufficient statistics for per-layer OLS prediction residuals.

    Holds, per layer, the example count and the sums ``Σu``, ``Σuuᵀ``, ``Σu wᵀ`` of the shifted
    features ``u = x - shift_x`` and targets ``w = y - shift_y`` (plus ``Σw``, ``Σw²``, which
    every layer shares), all in float64. Like a torchmetrics ``Metric``: ``update`` with batches,
    ``merge`` or ``all_reduce`` across workers, ``compute`` once.

    Args:
        num_layers: Number of layers (hidden-state entries) measured together.
        dim: Feature dimension ``d``.
        target: ``"token_id"`` regresses the scalar token id (the paper's target);
            ``"onehot"`` regresses the one-hot indicator of the target over ``classes``
            (multi-output PR, ``‖Y - XW‖²_F / ‖Y - Ȳ‖²_F``).
        classes: For ``"onehot"``: the distinct target ids (1-D integer tensor) the probe can
            produce. Memory grows as ``num_layers * dim * len(classes)``.
        device: Where the statistics live (default CPU). Features on another device are moved.
        rtol: Relative eigenvalue tolerance of the solve (see the module docstring).
        layers: The hidden-state entry index of each layer, when a subset of entries is
            measured (default ``0 … num_layers-1``). Carried along (statistics of different
            entries refuse to merge) so the law is fitted on the true indices.
    """

    def __init__(
        self,
        num_layers: int,
        dim: int,
        *,
        target: Target = "token_id",
        classes: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        rtol: float = DEFAULT_RTOL,
        layers: Sequence[int] | None = None,
    ) -> None:
        if num_layers < 1 or dim < 1:
            raise ValueError(f"num_layers and dim must be positive, got {num_layers} and {dim}.")
        if target not in TARGETS:
            raise ValueError(f"Unknown target {target!r}; choose one of {TARGETS}.")
        if not 0.0 < rtol < 1.0:
            raise ValueError(f"rtol must lie in (0, 1), got {rtol}.")
        self.num_layers, self.dim, self.target, self.rtol = num_layers, dim, target, rtol
        self.layers = tuple(range(num_layers)) if layers is None else tuple(map(int, layers))
        if (
            len(self.layers) != num_layers
            or any(b <= a for a, b in zip(self.layers[:-1], self.layers[1:], strict=True))
            or min(self.layers) < 0
        ):
            raise ValueError(
                f"layers must be {num_layers} increasing entry indices >= 0, got {layers}."
            )
        self.device = torch.device(device if device is not None else "cpu")
        if target == "onehot":
            if classes is None or classes.ndim != 1 or classes.numel() < 2:
                raise ValueError(
                    "target='onehot' needs `classes`: a 1-D tensor of at least two distinct "
                    "target ids (e.g. probe.target_ids())."
                )
            self.classes = torch.unique(classes.to(self.device, torch.long))
            k = self.classes.numel()
        else:
            if classes is not None:
                raise ValueError("`classes` is only used with target='onehot'.")
            self.classes = None
            k = 1
        self.num_outputs = k
        f64 = {"dtype": torch.float64, "device": self.device}
        self.count = torch.zeros((), **f64)
        self.shift_x = torch.zeros(num_layers, dim, **f64)  # (L, d)
        self.shift_y = torch.zeros(k, **f64)  # (K,) stays 0 for one-hot: counts are exact
        self.sum_x = torch.zeros(num_layers, dim, **f64)  # (L, d)
        self.sum_xx = torch.zeros(num_layers, dim, dim, **f64)  # (L, d, d)
        self.sum_xy = torch.zeros(num_layers, dim, k, **f64)  # (L, d, K)
        self.sum_y = torch.zeros(k, **f64)  # (K,)
        self.sum_yy = torch.zeros(k, **f64)  # (K,)

    # -- accumulation -------------------------------------------------------------------------

    def _targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Integer ids (n,) -> float64 target matrix (n, K), or class indices for one-hot."""
        if self.classes is None:
            return targets.to(torch.float64).unsqueeze(1)  # (n, 1)
        index = torch.searchsorted(self.classes, targets)
        index_ok = index.clamp(max=self.classes.numel() - 1)
        if not bool((self.classes[index_ok] == targets).all()):  # host sync
            missing = targets[self.classes[index_ok] != targets].unique()[:10].tolist()
            raise ValueError(
                f"Target ids {missing} are not among the `classes` given for target='onehot'; "
                "build the statistics with every id the probe can produce."
            )
        return index

    def update(self, features: torch.Tensor, targets: torch.Tensor) -> ResidualStats:
        """Add a batch of examples.

        Args:
            features: ``(num_layers, n, dim)`` features of any float dtype (upcast to float64).
            targets: ``(n,)`` integer target token ids.

        Returns:
            ``self``, so calls chain.
        """
        if (
            features.ndim != 3
            or features.shape[0] != self.num_layers
            or features.shape[2] != self.dim
        ):
            raise ValueError(
                f"features must have shape (num_layers={self.num_layers}, n, dim={self.dim}), "
                f"got {tuple(features.shape)}."
            )
        if not features.is_floating_point():
            raise TypeError(f"features must be a float tensor, got {features.dtype}.")
        if targets.ndim != 1 or targets.shape[0] != features.shape[1]:
            raise ValueError(
                f"targets must have shape (n={features.shape[1]},), got {tuple(targets.shape)}."
            )
        if targets.is_floating_point() or targets.is_complex():
            raise TypeError(f"targets must be integer token ids, got {targets.dtype}.")
        n = features.shape[1]
        if n == 0:
            return self
        x = features.to(self.device, torch.float64)  # (L, n, d)
        targets = targets.to(self.device)
        if not bool(torch.isfinite(x).all()):  # host sync
            raise ValueError("features contain NaN or Inf; PR is undefined for them.")
        y = self._targets(targets)
        if self.count.item() == 0:  # host sync; first batch fixes the shift
            self.shift_x = x.mean(dim=1)
            if self.classes is None:
                self.shift_y = y.mean(dim=0)
        u = x - self.shift_x.unsqueeze(1)  # (L, n, d)
        self.count += n
        self.sum_x += u.sum(dim=1)
        self.sum_xx += u.transpose(1, 2) @ u  # (L, d, d)
        if self.classes is None:
            w = y - self.shift_y  # (n, 1)
            self.sum_y += w.sum(dim=0)
            self.sum_yy += (w * w).sum(dim=0)
            self.sum_xy += u.transpose(1, 2) @ w  # (L, d, 1)
        else:
            # one-hot without materializing (n, K): per-class feature sums and counts
            ones = torch.ones(n, dtype=torch.float64, device=self.device)
            self.sum_y.index_add_(0, y, ones)
            self.sum_yy.index_add_(0, y, ones)
            self.sum_xy.index_add_(2, y, u.transpose(1, 2))  # (L, d, K) += (L, d, n) by class
        return self

    def _rebase(self, shift_x: torch.Tensor, shift_y: torch.Tensor) -> None:
        """Re-base the sums on new shifts, exactly: Σ(u-δ)(u-δ)ᵀ = Σuuᵀ - Σuδᵀ - δΣuᵀ + nδδᵀ."""
        dx = shift_x - self.shift_x  # (L, d)
        dy = shift_y - self.shift_y  # (K,)
        n, sx, sy = self.count, self.sum_x, self.sum_y
        self.sum_xx += (
            n * dx.unsqueeze(2) * dx.unsqueeze(1)
            - sx.unsqueeze(2) * dx.unsqueeze(1)
            - dx.unsqueeze(2) * sx.unsqueeze(1)
        )
        self.sum_xy += (
            n * dx.unsqueeze(2) * dy.view(1, 1, -1)
            - sx.unsqueeze(2) * dy.view(1, 1, -1)
            - dx.unsqueeze(2) * sy.view(1, 1, -1)
        )
        self.sum_yy += n * dy * dy - 2 * sy * dy
        self.sum_x -= n * dx
        self.sum_y -= n * dy
        self.shift_x, self.shift_y = shift_x.clone(), shift_y.clone()

    def _check_compatible(self, other: ResidualStats) -> None:
        same = (other.num_layers, other.dim, other.target, other.layers) == (
            self.num_layers,
            self.dim,
            self.target,
            self.layers,
        )
        if not same or (
            self.classes is not None
            and not torch.equal(self.classes, other.classes.to(self.device))
        ):
            raise ValueError(
                "Cannot merge statistics of different shape, target or entries: "
                f"({self.num_layers}, {self.dim}, {self.target}, layers {self.layers}) vs "
                f"({other.num_layers}, {other.dim}, {other.target}, layers {other.layers})."
            )

    def merge(self, other: ResidualStats) -> ResidualStats:
        """Add another worker's statistics, as if its examples had been passed to ``update``.

        Returns:
            ``self``, so calls chain.
        """
        self._check_compatible(other)
        if other.count.item() == 0:
            return self
        other = other.clone().to(self.device)
        if self.count.item() == 0:
            self.shift_x, self.shift_y = other.shift_x.clone(), other.shift_y.clone()
        other._rebase(self.shift_x, self.shift_y)
        for name in _SUMS:
            getattr(self, name).add_(getattr(other, name))
        return self

    def all_reduce(self, group: object | None = None) -> ResidualStats:
        """Sum the statistics of every process in ``group`` in place (``torch.distributed``).

        Two collectives: a small one, ``(L, d + K + 1)`` floats, finds the global means; each
        process re-bases its sums about them; one sum all-reduce of the rest follows. Every
        process then holds the statistics of all examples.

        Returns:
            ``self``, so calls chain.
        """
        import torch.distributed as dist

        # totals about zero: Σx = Σu + n·shift (cheap, only to choose a common shift)
        k = self.num_outputs
        head = torch.cat(
            [
                self.count.reshape(1, 1).expand(self.num_layers, 1),
                self.sum_x + self.count * self.shift_x,
                (self.sum_y + self.count * self.shift_y).expand(self.num_layers, k),
            ],
            dim=1,
        )  # (L, 1 + d + K)
        dist.all_reduce(head, group=group)
        total = head[0, 0]
        if total.item() == 0:  # host sync
            return self
        mean_x = head[:, 1 : 1 + self.dim] / total
        mean_y = head[0, 1 + self.dim :] / total if self.classes is None else self.shift_y
        self._rebase(mean_x, mean_y)
        flat = torch.cat([getattr(self, name).reshape(-1) for name in _SUMS])
        dist.all_reduce(flat, group=group)  # the one large reduction
        offset = 0
        for name in _SUMS:
            t = getattr(self, name)
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return self

    # -- bookkeeping --------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every example (keeps shape, target, classes and device)."""
        for name in (*_SUMS, "shift_x", "shift_y"):
            getattr(self, name).zero_()

    def clone(self) -> ResidualStats:
        """A deep copy."""
        new = object.__new__(ResidualStats)
        new.__dict__.update(self.__dict__)
        for name in (*_SUMS, "shift_x", "shift_y"):
            setattr(new, name, getattr(self, name).clone())
        return new

    def to(self, device: torch.device | str) -> ResidualStats:
        """Move the statistics to ``device`` in place."""
        self.device = torch.device(device)
        for name in (*_SUMS, "shift_x", "shift_y", "classes"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(self.device))
        return self

    # -- the solve ----------------------------------------------------------------------------

    def compute(self) -> torch.Tensor:
        """Solve all layers together.

        Returns:
            ``(num_layers,)`` float64 prediction residuals ``RSS / TSS`` on the statistics'
            device.

        Raises:
            ValueError: Too few examples (``n <= d + 1`` interpolates and every PR would be 0),
                or a target with a single distinct value (TSS = 0).
        """
        n = self.count.item()  # host sync
        if n <= self.dim + 1:
            raise ValueError(
                f"Too few probe examples: {int(n)} (position, next-token) pairs for hidden size "
                f"{self.dim}. OLS with intercept interpolates unless n > d + 1, so at least "
                f"{self.dim + 2} are needed (and ~{10 * self.dim} for a low-noise PR); use more "
                "or longer probe sequences."
            )
        # centered second moments (about the mean) from the shifted sums
        sx, sy = self.sum_x, self.sum_y
        gram = self.sum_xx - sx.unsqueeze(2) * sx.unsqueeze(1) / n  # (L, d, d)
        tss = (self.sum_yy - sy * sy / n).sum()
        if tss.item() <= _EPS * self.sum_yy.sum().item():  # host sync
            raise ValueError(
                "The targets take a single distinct value, so their variance is 0 and PR is "
                "undefined; the probe needs at least two different next tokens."
            )
        # drop dead columns; scale the rest to unit diagonal
        var = gram.diagonal(dim1=1, dim2=2)  # (L, d)
        raw = self.sum_xx.diagonal(dim1=1, dim2=2)
        alive = var > 64 * _EPS * raw
        scale = torch.where(alive, var.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
        corr = gram * scale.unsqueeze(2) * scale.unsqueeze(1)
        evals, evecs = torch.linalg.eigh(corr)  # batched over layers: (L, d), (L, d, d)
        keep = evals > self.rtol * evals[:, -1:].clamp_min(0.0)  # eigh sorts ascending
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)  # (L, d)
        # outputs in 8 chunks: the one-hot solve's workspace is ~3/8 of Σx·yᵀ, not 3 copies
        k = self.num_outputs
        chunk = max(1, -(-k // 8)) if k > 1 else 1
        explained = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        for start in range(0, k, chunk):
            part = slice(start, start + chunk)
            cross = self.sum_xy[:, :, part] - sx.unsqueeze(2) * sy[part].view(1, 1, -1) / n
            proj = evecs.transpose(1, 2) @ (cross * scale.unsqueeze(2))  # (L, d, chunk)
            explained += (inv.unsqueeze(2) * proj * proj).sum(dim=(1, 2))
        return (tss - explained) / tss


_SUMS = ("count", "sum_x", "sum_xx", "sum_xy", "sum_y", "sum_yy")


def prediction_residuals(
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    target: Target = "token_id",
    rtol: float = DEFAULT_RTOL,
) -> torch.Tensor:
    """Prediction residual of every layer, in one batched computation.

    Args:
        features: ``(layers, n, d)`` features of any float dtype.
        targets: ``(n,)`` integer next-token ids.
        target: ``"token_id"`` (the paper's scalar id) or ``"onehot"`` (over the ids present).
        rtol: Relative eigenvalue tolerance (see :mod:`lawwatch.residual`).

    Returns:
        ``(layers,)`` float64 ``PR = RSS / TSS = 1 - R²``, on ``features``' device.
    """
    if features.ndim != 3:
        raise ValueError(f"features must have shape (layers, n, d), got {tuple(features.shape)}.")
    classes = torch.unique(targets) if target == "onehot" else None
    stats = ResidualStats(
        features.shape[0],
        features.shape[2],
        target=target,
        classes=classes,
        device=features.device,
        rtol=rtol,
    )
    return stats.update(features, targets).compute()
