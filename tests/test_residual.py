import numpy as np
import pytest
import torch

from lawwatch.stats import residual
from lawwatch.stats.residual import ResidualStats, prediction_residuals
from tests.helpers.reference import layer_norm, ols_pr, onehot

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-8


def _check(features: np.ndarray, ids: np.ndarray, target: str = "token_id") -> torch.Tensor:
    """PR from lawwatch equals the lstsq reference, layer by layer, to TOL, by either solve
    method (the default Cholesky fast path and the eigendecomposition)."""
    y = ids.astype(np.float64) if target == "token_id" else onehot(ids)
    want = np.array([ols_pr(f, y) for f in features])
    for method in ("eigh", "auto"):
        got = prediction_residuals(
            torch.from_numpy(features), torch.from_numpy(ids), target=target, method=method
        )
        assert got.dtype == torch.float64 and got.shape == (features.shape[0],)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=TOL)
    return got


def _data(rng, layers=3, n=400, d=16, vocab=1000, signal=0.5):
    """Features partly predictive of the ids (so PR is neither 0 nor 1)."""
    ids = rng.integers(0, vocab, size=n)
    z = (ids - ids.mean()) / ids.std()
    x = rng.standard_normal((layers, n, d))
    x[:, :, 0] += signal * np.arange(1, layers + 1)[:, None] * z
    return x, ids


@pytest.mark.parametrize("target", ["token_id", "onehot"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_inputs(seed, target):
    rng = np.random.default_rng(seed)
    x, ids = _data(rng, vocab=1000 if target == "token_id" else 12)
    pr = _check(x, ids, target)
    assert (pr > 0.05).all() and (pr < 1).all()  # a non-trivial regime


@pytest.mark.parametrize("target", ["token_id", "onehot"])
def test_layernorm_rank_deficient(target):
    rng = np.random.default_rng(3)
    x, ids = _data(rng, d=24, vocab=5000 if target == "token_id" else 20)
    x = layer_norm(x)  # every row sums to 0: rank <= d - 1
    assert np.linalg.matrix_rank(x[0] - x[0].mean(0)) == 23
    _check(x, ids, target)


def test_massive_outlier_dimensions():
    rng = np.random.default_rng(4)
    x, ids = _data(rng, d=32)
    # raw features: a dimension with a huge mean and unit spread (lost to cancellation without
    # the shifted accumulation) and a column 1e5 times the others
    x[:, :, 5] = 1e6 + rng.standard_normal((3, 400))
    x[:, :, 7] *= 1e5
    _check(x, ids)


@pytest.mark.parametrize(("magnitude", "fraction"), [(1e4, 1.0), (1e5, 0.05)])
def test_massive_activations_after_layernorm(magnitude, fraction):
    """LLM-like massive activations (~1e4 x the median; Sun et al. 2024) then a LayerNorm.

    Beyond ~1e6 on every token the LayerNorm'd features themselves carry ~1e-10 relative
    rounding and the raw lstsq reference drifts from the well-posed answer by ~1e-7.
    """
    rng = np.random.default_rng(5)
    x, ids = _data(rng, d=32)
    rows = rng.random(400) < fraction
    x[:, rows, 5] = magnitude * (1 + 0.01 * rng.standard_normal((3, rows.sum())))
    _check(layer_norm(x), ids)


def test_dead_and_duplicated_columns():
    rng = np.random.default_rng(5)
    x, ids = _data(rng, d=20)
    x[:, :, 3] = 0.0  # dead
    x[:, :, 4] = 0.1  # constant (collinear with the intercept, inexact in binary)
    x[:, :, 6] = x[:, :, 0]  # duplicated
    x[:, :, 8] = 2.5 * x[:, :, 1] - x[:, :, 2]  # linear combination
    _check(x, ids)


def test_skewed_large_ids():
    rng = np.random.default_rng(6)
    n = 500
    ids = np.minimum(rng.zipf(1.3, size=n), 50_000)  # heavy-tailed, up to 50 000
    ids[:3] = [0, 49_999, 50_000]
    x = rng.standard_normal((4, n, 12))
    x[:, :, 0] += np.log1p(ids)[None]
    _check(x, ids)


@pytest.mark.parametrize("d", [8, 64])
def test_n_just_above_d_plus_one(d):
    rng = np.random.default_rng(7)
    x, ids = _data(rng, n=d + 2, d=d)
    pr = _check(x, ids)
    assert (pr > 0).all()
    x, ids = _data(rng, n=d + 3, d=d)
    _check(x, ids)


def test_too_few_examples_refused():
    rng = np.random.default_rng(8)
    x, ids = _data(rng, n=17, d=16)  # n = d + 1
    with pytest.raises(ValueError, match=r"at least 18 are needed"):
        prediction_residuals(torch.from_numpy(x), torch.from_numpy(ids))


def test_single_target_value_refused():
    x = torch.randn(2, 50, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="single distinct value"):
        prediction_residuals(x, torch.full((50,), 7))
    with pytest.raises(ValueError, match="at least two distinct"):
        prediction_residuals(x, torch.full((50,), 7), target="onehot")


def test_bad_inputs_named():
    with pytest.raises(ValueError, match="shape"):
        prediction_residuals(torch.randn(10, 4), torch.zeros(10, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        prediction_residuals(torch.randn(1, 10, 4), torch.zeros(10))
    bad = torch.randn(1, 10, 4)
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        prediction_residuals(bad, torch.arange(10))
    with pytest.raises(ValueError, match="Unknown target"):
        ResidualStats(1, 4, target="logits")
    stats = ResidualStats(2, 4, target="onehot", classes=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[9\] are not among"):
        stats.update(torch.randn(2, 3, 4), torch.tensor([1, 9, 2]))


def test_rounding_noise_directions():
    """float32 LayerNorm output: a mean direction of pure rounding noise (docs/protocol.md §2.2).

    lstsq at machine precision fits that noise (error ~1/n against the float64 truth); the
    solver's rank tolerance drops it and stays on the truth.
    """
    rng = np.random.default_rng(9)
    n, d = 300, 24
    raw, ids = _data(rng, layers=2, n=n, d=d, vocab=3000)
    truth = np.array([ols_pr(f, ids.astype(np.float64)) for f in layer_norm(raw)])
    x32 = torch.nn.functional.layer_norm(torch.from_numpy(raw).float(), (d,))  # float32 norm
    lstsq_on_noise = np.array([ols_pr(f, ids.astype(np.float64)) for f in x32.double().numpy()])
    assert np.abs(lstsq_on_noise - truth).max() > 1e-4  # the trap is real
    got = prediction_residuals(x32, torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, truth, rtol=0, atol=1e-5)
    # and with the tolerance stated as lstsq's rcond (singular values ~ sqrt(rtol)), they agree
    assert np.abs(got - truth).max() < 0.1 * np.abs(lstsq_on_noise - truth).max()


@pytest.mark.parametrize("target", ["token_id", "onehot"])
def test_streaming_equals_one_shot(target):
    rng = np.random.default_rng(10)
    x, ids = _data(rng, n=600, d=20, vocab=30)
    x[:, :, 2] += 500.0  # offset, so the shift matters
    xt, it = torch.from_numpy(x), torch.from_numpy(ids)
    one = prediction_residuals(xt, it, target=target)
    classes = torch.unique(it) if target == "onehot" else None
    for cuts in ([100, 350], [1, 2, 3, 599], list(range(25, 600, 25))):
        stats = ResidualStats(3, 20, target=target, classes=classes)
        for part_x, part_y in zip(
            torch.tensor_split(xt, cuts, dim=1), torch.tensor_split(it, cuts), strict=True
        ):
            stats.update(part_x, part_y)
        torch.testing.assert_close(stats.compute(), one, rtol=0, atol=1e-10)


@pytest.mark.parametrize("target", ["token_id", "onehot"])
def test_merge_equals_concatenation(target):
    rng = np.random.default_rng(11)
    x, ids = _data(rng, n=500, d=16, vocab=25)
    xt, it = torch.from_numpy(x), torch.from_numpy(ids)
    classes = torch.unique(it) if target == "onehot" else None
    parts = [(xt[:, :120], it[:120]), (xt[:, 120:130] + 3.0, it[120:130]), (xt[:, 130:], it[130:])]
    merged = ResidualStats(3, 16, target=target, classes=classes)
    for px, py in parts:
        merged.merge(ResidualStats(3, 16, target=target, classes=classes).update(px, py))
    merged.merge(ResidualStats(3, 16, target=target, classes=classes))  # an empty worker
    whole = torch.cat([p[0] for p in parts], dim=1)
    want = prediction_residuals(whole, it, target=target)
    torch.testing.assert_close(merged.compute(), want, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="Cannot merge"):
        merged.merge(ResidualStats(3, 17))


def test_reset_and_dtype_and_float32_input():
    rng = np.random.default_rng(12)
    x, ids = _data(rng, n=200, d=8)
    stats = ResidualStats(3, 8).update(torch.from_numpy(x), torch.from_numpy(ids))
    stats.reset()
    assert stats.count.item() == 0
    # float32 and bfloat16 features are accepted and upcast; float32 stays close to float64
    pr32 = prediction_residuals(torch.from_numpy(x).float(), torch.from_numpy(ids))
    want = np.array([ols_pr(f, ids) for f in x.astype(np.float32).astype(np.float64)])
    np.testing.assert_allclose(pr32.numpy(), want, rtol=0, atol=TOL)
    prediction_residuals(torch.from_numpy(x).bfloat16(), torch.from_numpy(ids))


# -- precision, where products are computed, bounded workspace --------------------------------


def _hostile(rng, family: str, n: int = 3000, d: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """The adversarial families of the float64 tests, at a size where float32 sums matter."""
    x, ids = _data(rng, n=n, d=d)
    if family == "layernorm":
        x = layer_norm(x)
    elif family == "outliers":  # a huge mean with unit spread, a column 1e5 times the others
        x[:, :, 5] = 1e6 + rng.standard_normal((3, n))
        x[:, :, 7] *= 1e5
    elif family == "massive activations":  # ~1e4 x the median on every token, then LayerNorm
        x[:, :, 5] = 1e4 * (1 + 0.01 * rng.standard_normal((3, n)))
        x = layer_norm(x)
    elif family == "dead and duplicated":
        x[:, :, 3] = 0.0
        x[:, :, 4] = 0.1
        x[:, :, 6] = x[:, :, 0]
    return x, ids


def _streamed(x: np.ndarray, ids: np.ndarray, batch: int = 500, **options) -> ResidualStats:
    stats = ResidualStats(x.shape[0], x.shape[2], **options)
    xt, it = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(ids))
    for lo in range(0, x.shape[1], batch):
        stats.update(xt[:, lo : lo + batch], it[lo : lo + batch])
    return stats


MIXED_TOL = 1e-6  # measured <= 1.2e-7 here; bench/bench_solve.py measures larger d


@pytest.mark.parametrize(
    "family", ["random", "layernorm", "outliers", "massive activations", "dead and duplicated"]
)
def test_mixed_precision_error_is_bounded(family):
    """precision="mixed" (float32 batch Grams, float64 sums) stays within MIXED_TOL of float64
    on the hostile inputs, and within MIXED_TOL + TOL of lstsq."""
    rng = np.random.default_rng(20)
    x, ids = _hostile(rng, family)
    exact = _streamed(x, ids).compute().numpy()
    mixed = _streamed(x, ids, precision="mixed")
    assert mixed.rtol == 1e-7  # the mixed default: above the float32 Gram's noise floor
    got = mixed.compute().numpy()
    assert 0 < np.abs(got - exact).max() <= MIXED_TOL  # > 0: the float32 product really ran
    want = np.array([ols_pr(f, ids.astype(np.float64)) for f in x])
    np.testing.assert_allclose(got, want, rtol=0, atol=MIXED_TOL + TOL)


def test_mixed_precision_ignores_global_tf32_and_bf16_matmul_settings():
    """A user's TF32 / bf16 float32-matmul setting must not reach the Gram; it is restored."""
    rng = np.random.default_rng(21)
    x, ids = _hostile(rng, "layernorm")
    exact = _streamed(x, ids).compute().numpy()
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    before = (cuda.fp32_precision, mkldnn.fp32_precision)
    try:
        cuda.fp32_precision, mkldnn.fp32_precision = "tf32", "bf16"
        a = torch.from_numpy(x[0]).float()
        trap = ((a.T @ a).double() - torch.from_numpy(x[0].T @ x[0])).abs().max().item()
        got = _streamed(x, ids, precision="mixed").compute().numpy()
        assert (cuda.fp32_precision, mkldnn.fp32_precision) == ("tf32", "bf16")
    finally:
        cuda.fp32_precision, mkldnn.fp32_precision = before
    assert np.abs(got - exact).max() <= MIXED_TOL
    # on CPUs with bf16 matmul (AMX) the setting is live: plain float32 products degrade
    if trap > 1.0:
        assert np.abs(got - exact).max() < 1e-3 * trap


@pytest.mark.parametrize("precision", ["float64", "mixed"])
@pytest.mark.parametrize("target", ["token_id", "onehot"])
def test_products_on_the_features_device_match(precision, target):
    """compute_on="features": each product is formed where the features are and added into the
    statistics (here both on CPU: the same code path a GPU takes, minus the copy)."""
    rng = np.random.default_rng(22)
    x, ids = _data(rng, n=700, d=24, vocab=30)
    x[:, :, 2] += 500.0
    classes = torch.unique(torch.from_numpy(ids)) if target == "onehot" else None
    options = {"target": target, "classes": classes, "precision": precision}
    here = _streamed(x, ids, batch=128, **options)
    there = _streamed(x.astype(np.float32), ids, batch=128, compute_on="features", **options)
    want = _streamed(x.astype(np.float32), ids, batch=128, **options)
    assert there.device == torch.device("cpu") and there.sum_xx.dtype == torch.float64
    for name in ("sum_x", "sum_xx", "sum_xy", "sum_y", "sum_yy", "count"):
        torch.testing.assert_close(getattr(there, name), getattr(want, name), rtol=1e-12, atol=0)
    torch.testing.assert_close(there.compute(), here.compute(), rtol=0, atol=1e-6)


def test_update_leaves_float64_features_alone():
    rng = np.random.default_rng(23)
    x, ids = _data(rng, n=100, d=8)
    xt = torch.from_numpy(x)
    before = xt.clone()
    for options in ({}, {"compute_on": "features"}, {"precision": "mixed"}):
        ResidualStats(3, 8, **options).update(xt, torch.from_numpy(ids))
        assert torch.equal(xt, before)


@pytest.mark.parametrize("target", ["token_id", "onehot"])
def test_bounded_workspace_gives_the_same_result(monkeypatch, target):
    """One entry at a time (the smallest workspace) in update, rebase and solve."""
    rng = np.random.default_rng(24)
    x, ids = _data(rng, layers=5, n=400, d=16, vocab=25)
    x[:, :, 1] += 40.0
    classes = torch.unique(torch.from_numpy(ids)) if target == "onehot" else None
    whole = _streamed(x, ids, batch=150, target=target, classes=classes)
    monkeypatch.setattr(residual, "WORKSPACE_BYTES", 1)
    parts = _streamed(x, ids, batch=150, target=target, classes=classes)
    other = _streamed(x[:, ::-1] + 1.0, ids[::-1], batch=150, target=target, classes=classes)
    torch.testing.assert_close(parts.compute(), whole.compute(), rtol=0, atol=1e-12)
    merged = parts.clone().merge(other)  # merge re-bases entry group by entry group
    monkeypatch.setattr(residual, "WORKSPACE_BYTES", 2**28)
    torch.testing.assert_close(
        merged.compute(), whole.clone().merge(other).compute(), atol=1e-12, rtol=0
    )


def test_bad_options_named():
    with pytest.raises(ValueError, match=r"Unknown precision 'bf16'"):
        ResidualStats(1, 4, precision="bf16")
    with pytest.raises(ValueError, match=r"Unknown compute_on 'gpu'"):
        ResidualStats(1, 4, compute_on="gpu")
    assert ResidualStats(1, 4).rtol == 1e-11 and ResidualStats(1, 4, precision="mixed").rtol == 1e-7


@pytest.mark.parametrize(
    "options",
    [{}, {"precision": "mixed"}, {"compute_on": "features"}],
    ids=["float64", "mixed", "staged"],
)
def test_gram_in_several_panels_equals_numpy(options):
    """d = 450: three panels of the upper-triangular Gram (192, 192, 66 rows), mirrored."""
    from lawwatch.stats.update import gram_panel

    d = 450
    assert -(-d // gram_panel(d)) == 3
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 1200, d)) * rng.uniform(0.5, 3.0, d) + 5.0
    y = rng.integers(0, 500, 1200)
    stats = ResidualStats(2, d, **options)
    for lo in range(0, 1200, 500):
        stats.update(torch.from_numpy(x[:, lo : lo + 500]), torch.from_numpy(y[lo : lo + 500]))
    u = x - stats.shift_x.numpy()[:, None, :]
    want = np.einsum("lni,lnj->lij", u, u)
    got = stats.sum_xx.numpy()
    assert np.array_equal(got, got.transpose(0, 2, 1))  # exactly symmetric
    tol = 1e-5 if options.get("precision") == "mixed" else 1e-12
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
    if "precision" not in options:
        pr = [ols_pr(x[i], y.astype(np.float64)) for i in range(2)]
        np.testing.assert_allclose(stats.compute().numpy(), pr, rtol=0, atol=1e-8)
