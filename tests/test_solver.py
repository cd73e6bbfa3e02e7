"""The Cholesky fast path against the eigendecomposition and numpy lstsq, and when it falls back.

Every check compares with independent float64 references (``tests/reference.py``): PR from the
fast path (``method="auto"``) must equal the eigen path's (``method="eigh"``, the reference of
the rank rule) and ``numpy.linalg.lstsq``'s; the tests also check *which* path solved each
entry, so a fast path that silently fell back everywhere would fail them.
"""

import numpy as np
import pytest
import torch

from lawwatch.stats.residual import ResidualStats
from lawwatch.stats.solver import DEFAULT_RTOL, explained_sum_of_squares
from tests.helpers.reference import layer_norm, ols_pr, onehot, rms_norm, standardize

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-8


def _stats(x: np.ndarray, ids: np.ndarray, target: str = "token_id") -> ResidualStats:
    classes = torch.unique(torch.from_numpy(ids)) if target == "onehot" else None
    stats = ResidualStats(x.shape[0], x.shape[2], target=target, classes=classes)
    return stats.update(torch.from_numpy(x), torch.from_numpy(ids))


def _lstsq(x: np.ndarray, ids: np.ndarray, target: str = "token_id") -> np.ndarray:
    y = ids.astype(np.float64) if target == "token_id" else onehot(ids)
    return np.array([ols_pr(f, y) for f in x])


def _features(rng, family: str, layers: int, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((layers, n, d))
    x *= 10.0 ** rng.uniform(-2, 2, size=d)  # column scales over four decades
    x += 10.0 ** rng.uniform(0, 3, size=d)  # offsets up to 1000x the smallest spread
    if family == "layernorm":
        return layer_norm(x)
    if family == "weighted layernorm":  # null direction 1/γ, not the all-ones vector
        gamma = rng.uniform(0.2, 3.0, size=d)
        return layer_norm(x) * gamma + rng.standard_normal(d)
    if family == "rmsnorm":
        return rms_norm(x)
    if family == "standardize":
        return standardize(x)
    return x


FAMILIES = ["raw", "layernorm", "weighted layernorm", "rmsnorm", "standardize"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", range(6))
def test_fast_path_agrees_with_eigh_and_lstsq(family, seed):
    rng = np.random.default_rng(100 + seed)
    d = int(rng.integers(2, 48))
    n = int(rng.integers(d + 2, 6 * d + 20))
    ids = rng.integers(0, 5000, size=n)
    x = _features(rng, family, 3, n, d)
    x[:, :, 0] += 0.3 * (ids - ids.mean()) / ids.std() * np.arange(1, 4)[:, None]
    stats = _stats(x, ids)
    fast, reference = stats.solve(method="auto"), stats.solve(method="eigh")
    assert not fast.eigh.any(), f"the fast path fell back on {family} (d={d}, n={n})"
    assert reference.eigh.all()
    np.testing.assert_allclose(fast.pr.numpy(), reference.pr.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(fast.pr.numpy(), _lstsq(x, ids), rtol=0, atol=TOL)


@pytest.mark.parametrize("seed", range(3))
def test_fast_path_onehot(seed):
    rng = np.random.default_rng(200 + seed)
    n, d = 500, 20
    ids = rng.integers(0, 15, size=n)
    x = layer_norm(rng.standard_normal((2, n, d)) + 0.5 * onehot(ids)[:, :1])
    stats = _stats(x, ids, "onehot")
    fast = stats.solve()
    assert not fast.eigh.any()
    np.testing.assert_allclose(fast.pr.numpy(), stats.compute(method="eigh").numpy(), atol=1e-10)
    np.testing.assert_allclose(fast.pr.numpy(), _lstsq(x, ids, "onehot"), rtol=0, atol=TOL)


def _dependent(rng, kind: str, n: int = 400, d: int = 16) -> np.ndarray:
    x = rng.standard_normal((2, n, d))
    if kind == "duplicate":
        x[:, :, 2] *= 0.5  # not the largest variance
        x[:, :, 5] = x[:, :, 2]
    elif kind == "small combination":
        x[:, :, 7] = 0.2 * x[:, :, 1] - 0.1 * x[:, :, 3]
    elif kind == "large combination":  # the largest variance: the column the fast path removes
        x[:, :, 7] = 2.0 * x[:, :, 1] - 0.5 * x[:, :, 3]
    elif kind == "layernorm and duplicate":  # two null directions
        x = layer_norm(x)
        x = np.concatenate([x, x[:, :, :1]], axis=2)
    elif kind == "layernorm with a zero weight":  # a dead column and the null direction
        x = layer_norm(x)
        x[:, :, 4] = 0.0
    return x


@pytest.mark.parametrize(
    ("kind", "falls_back"),
    [
        ("duplicate", True),
        ("small combination", True),
        ("large combination", False),  # one null direction, through the removed column
        ("layernorm and duplicate", True),
        ("layernorm with a zero weight", False),  # dead columns are dropped before the solve
    ],
)
def test_dependent_columns(kind, falls_back):
    rng = np.random.default_rng(7)
    x = _dependent(rng, kind)
    ids = rng.integers(0, 3000, size=x.shape[1])
    solved = _stats(x, ids).solve()
    assert bool(solved.eigh.all()) is falls_back and bool(solved.eigh.any()) is falls_back
    np.testing.assert_allclose(solved.pr.numpy(), _lstsq(x, ids), rtol=0, atol=TOL)


def _near_dependent(lam: float, rng) -> tuple[np.ndarray, np.ndarray, float]:
    """Features whose correlation matrix has smallest eigenvalue ≈ ``lam`` relative to the
    largest: a column that is a combination of the others plus a little noise that carries
    target signal (so keeping or dropping that direction shows in PR). Returns the features,
    the target ids and that eigenvalue ratio."""
    n, d = 600, 40
    ids = rng.integers(0, 3000, size=n)
    z = (ids - ids.mean()) / ids.std()
    base = rng.standard_normal((n, d))
    base[:, 0] += 0.5 * z
    noise = 0.7 * z + 0.7 * rng.standard_normal(n)
    mix = rng.standard_normal(d - 1) / np.sqrt(d)

    def build(eps: float) -> np.ndarray:
        x = base.copy()
        x[:, -1] = 3.0 * (base[:, :-1] @ mix + eps * noise)  # the largest variance: removed
        return x

    def smallest(x: np.ndarray) -> float:
        evals = np.linalg.eigvalsh(np.corrcoef(x, rowvar=False))
        return float(evals[0] / evals[-1])

    eps = 1e-3
    for _ in range(3):  # λ_min ∝ eps² for small eps
        eps *= np.sqrt(lam / smallest(build(eps)))
    x = build(eps)
    return x[None], ids, smallest(x)


@pytest.mark.parametrize(
    ("lam", "kept", "falls_back"),
    [(1e-15, False, False), (1e-6, True, False), (2.5e-11, True, True)],
    ids=["far-below-the-cut", "far-above-the-cut", "inside-the-undecided-band"],
)
def test_rank_decision_is_the_eigen_rule(lam, kept, falls_back):
    """Below the cut both paths drop the direction, above it both keep it; in the band where
    the fast path's bounds on λ_max cannot tell, the entry goes to the eigendecomposition."""
    x, ids, smallest = _near_dependent(lam, np.random.default_rng(11))
    assert smallest == pytest.approx(lam, rel=0.2)
    stats = _stats(x, ids)
    fast, reference = stats.solve(), stats.solve(method="eigh")
    assert bool(fast.eigh[0]) is falls_back
    # a drop removes column j's residual, the eigen path the exact eigenvector: ~1e-9 apart
    np.testing.assert_allclose(fast.pr.numpy(), reference.pr.numpy(), rtol=0, atol=TOL)
    # the direction is worth > 1e-3 of PR: with all columns (kept) or without the last (dropped)
    with_all, without = _lstsq(x, ids), _lstsq(x[:, :, :-1], ids)
    assert without - with_all > 1e-3
    # a kept direction at 2.5e-11 of λ_max that carries a third of the variance is resolved to
    # ~eps / 2.5e-11 relative by any solve of the Gram (the normal equations): 3e-6 here
    atol = 1e-5 if lam < 1e-10 and kept else 1e-7
    np.testing.assert_allclose(fast.pr.numpy(), with_all if kept else without, atol=atol)


def test_float32_noise_direction_dropped_by_the_fast_path():
    """A float32 LayerNorm output: its mean direction holds rounding noise only; the fast path
    drops it (no fallback) and stays on the float64 truth, where lstsq fits the noise."""
    rng = np.random.default_rng(9)
    n, d = 400, 64
    raw = rng.standard_normal((2, n, d))
    ids = rng.integers(0, 3000, size=n)
    raw[:, :, 0] += (ids - ids.mean()) / ids.std()
    truth = _lstsq(layer_norm(raw), ids)
    x32 = torch.nn.functional.layer_norm(torch.from_numpy(raw).float(), (d,))
    noisy = _lstsq(x32.double().numpy(), ids)
    assert np.abs(noisy - truth).max() > 1e-4  # the trap is real
    solved = ResidualStats(2, d).update(x32, torch.from_numpy(ids)).solve()
    assert not solved.eigh.any()
    np.testing.assert_allclose(solved.pr.numpy(), truth, rtol=0, atol=1e-5)


def test_unknown_method_is_named():
    stats = _stats(np.random.default_rng(0).standard_normal((1, 20, 3)), np.arange(20))
    with pytest.raises(ValueError, match=r"Unknown solve method 'qr'.*'auto', 'eigh'"):
        stats.compute(method="qr")
    with pytest.raises(ValueError, match="Unknown solve method"):
        explained_sum_of_squares(
            stats.sum_xx, stats.sum_x, 20, lambda part: stats.sum_xy, 1, method="lu"
        )
    assert stats.rtol == DEFAULT_RTOL
