import math

import numpy as np
import pytest
import torch

from lawwatch import LawFit, fit_law
from lawwatch.law import emergence_step
from tests.helpers.reference import line_fit


def test_exact_geometric_decay():
    pr = [0.9] + [0.5 * 0.8**k for k in range(10)]  # entry 0 is ignored
    fit = fit_law(torch.tensor(pr, dtype=torch.float64))
    assert fit.rho == pytest.approx(0.8, abs=1e-12)
    assert fit.pearson_r == pytest.approx(-1.0, abs=1e-12)
    assert fit.intercept == pytest.approx(math.log10(0.5), abs=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    pr = rng.uniform(0.05, 1.0, size=9)
    fit = fit_law(pr)
    slope, intercept, r = line_fit(pr[1:])
    assert fit.slope == pytest.approx(slope, abs=1e-12)
    assert fit.intercept == pytest.approx(intercept, abs=1e-12)
    assert fit.pearson_r == pytest.approx(r, abs=1e-12)
    assert fit.rho == pytest.approx(10**slope, rel=1e-12)


def test_keep_first_and_layer_subset():
    pr = np.array([0.7 * 0.9**k for k in range(13)])
    assert fit_law(pr, skip_first=False).rho == pytest.approx(0.9, abs=1e-12)
    layers = [0, 3, 6, 9, 12]
    fit = fit_law(pr[layers], layers=layers)  # true indices: rho stays per layer
    assert fit.rho == pytest.approx(0.9, abs=1e-12)
    assert fit.intercept == pytest.approx(math.log10(0.7 * 0.9), abs=1e-12)


def test_the_fitted_line_at_true_entries_matches_numpy():
    """LawFit.line: the line the fit found, at true entry indices (x = entry - 1), in float64."""
    rng = np.random.default_rng(7)
    layers = [0, 2, 3, 5, 8, 9]  # a subset of entries, the embeddings among them
    pr = rng.uniform(0.05, 1.0, size=len(layers))
    fit = fit_law(pr, layers=layers)
    x = np.asarray(layers[1:], dtype=np.float64) - 1.0
    slope, intercept = np.polyfit(x, np.log10(pr[1:]), 1)
    assert fit.line(layers[1:]) == pytest.approx(np.polyval([slope, intercept], x), abs=1e-12)
    assert fit.line([1]) == [fit.intercept]  # entry 1 is x = 0
    # a record holds the fit in its fields: the same fit read back
    record = {"step": 3, "pr": pr.tolist(), **fit.as_dict(), "n_tokens": 10}
    assert LawFit.from_record(record) == fit
    with pytest.raises(KeyError):
        LawFit.from_record({"slope": -0.1, "intercept": 0.0})


def test_flat_pr_has_zero_r():
    fit = fit_law([0.5] * 6)
    assert fit.rho == 1.0 and fit.pearson_r == 0.0


@pytest.mark.parametrize(
    ("pr", "message"),
    [
        ([0.5, 0.4, 0.3], "at least 3 layers"),
        ([0.5, 0.4, 0.0, 0.2], "finite and positive"),
        ([0.5, 0.4, float("nan"), 0.2], "finite and positive"),
    ],
)
def test_bad_pr_refused(pr, message):
    with pytest.raises(ValueError, match=message):
        fit_law(pr)


def test_layers_must_match():
    with pytest.raises(ValueError, match="entries"):
        fit_law([0.5, 0.4, 0.3, 0.2], layers=[0, 1, 2])
    with pytest.raises(ValueError, match="increasing"):
        fit_law([0.5, 0.4, 0.3, 0.2], layers=[0, 2, 1, 3])


def test_emergence_step():
    steps = [0, 1, 2, 4, 8, 16, 32]
    assert emergence_step(steps, [0.7, -0.2, -0.96, -0.9, -0.97, -0.99, -0.98]) == 8
    assert emergence_step(steps, [0.7, -0.2, -0.96, -0.9, -0.97, -0.99, -0.5]) is None
    assert emergence_step(steps, [-0.99] * 7) == 0
    assert emergence_step(steps, [-0.9] * 7, threshold=-0.8) == 0
    assert emergence_step([], []) is None
    assert emergence_step([0, 1], [-0.99, float("nan")]) is None
    with pytest.raises(ValueError, match="steps"):
        emergence_step([0, 1], [0.1])
