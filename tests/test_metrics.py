"""The paper's remaining measures and the uncertainty of the law, against numpy references.

Out-of-sample PR (``split``), separation fuzziness (``metric``) and the grouped jackknife
(``jackknife``), each computed from streaming statistics and compared with a float64 numpy
computation on the raw examples (lstsq, pinv), on random and adversarial inputs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lawwatch import MeasureConfig, measure
from lawwatch.measurement import uncertainty
from lawwatch.stats.fuzziness import separation_fuzziness
from lawwatch.stats.outofsample import out_of_sample_pr
from lawwatch.stats.partition import PartitionedStats, jackknife_se, sequence_cells
from lawwatch.stats.residual import ResidualStats
from tests.helpers.models import ragged_probe, tiny_gpt2
from tests.helpers.reference import layer_norm, line_fit, ols_pr, onehot

L, D = 3, 6


def features(kind: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(L, n, D) features and (n,) ids with some signal; ``kind`` makes them adversarial."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(L, n, D))
    if kind == "layernorm":  # rank D-1 in every part: a shared exact null direction
        x = layer_norm(x)
    elif kind == "massive":  # a dimension whose mean dwarfs its spread
        x[..., 0] = 1e4 + x[..., 0] * 1e-2
    elif kind == "dead_duplicated":
        x[..., 1] = x[..., 0]
        x[..., 2] = 3.0
    ids = rng.integers(0, 40, n) + np.floor(4 * (x[:, :, 3].sum(0) - x[:, :, 3].min())).astype(int)
    return x, ids


def out_of_sample_reference(xa, ya, xb, yb) -> float:
    """numpy: lstsq with intercept on part A, residual sum of squares on part B / B's TSS."""
    design_a = np.hstack([xa, np.ones((xa.shape[0], 1))])
    design_b = np.hstack([xb, np.ones((xb.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(design_a, ya, rcond=None)
    resid = yb - design_b @ coef
    return float((resid**2).sum() / ((yb - yb.mean(axis=0)) ** 2).sum())


def fuzziness_reference(x: np.ndarray, y: np.ndarray, rtol: float = 1e-11) -> float:
    """numpy: Tr(SS_w pinv(SS_b)), scatters divided by n, from the raw examples."""
    n, mean = x.shape[0], x.mean(axis=0)
    within = np.zeros((x.shape[1], x.shape[1]))
    between = np.zeros_like(within)
    for c in np.unique(y):
        xc = x[y == c]
        mc = xc.mean(axis=0)
        within += (xc - mc).T @ (xc - mc)
        between += xc.shape[0] * np.outer(mc - mean, mc - mean)
    return float(np.trace(within / n @ np.linalg.pinv(between / n, rcond=rtol, hermitian=True)))


KINDS = ["random", "layernorm", "massive", "dead_duplicated"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["token_id", "onehot"])
def test_out_of_sample_pr_matches_lstsq_on_the_other_part(kind, target):
    x, ids = features(kind, 300, seed=KINDS.index(kind))
    a, b = slice(0, 190), slice(190, 300)
    classes = torch.tensor(np.unique(ids)) if target == "onehot" else None
    fit = ResidualStats(L, D, target=target, classes=classes)
    evaluate = ResidualStats(L, D, target=target, classes=classes)
    xt, it = torch.tensor(x), torch.tensor(ids)
    fit.update(xt[:, :100], it[:100]).update(xt[:, 100:190], it[100:190])  # two shifts
    evaluate.update(xt[:, b], it[b])
    got = out_of_sample_pr(fit, evaluate).numpy()
    y = onehot(ids) if target == "onehot" else ids.astype(np.float64)
    want = [out_of_sample_reference(x[e, a], y[a], x[e, b], y[b]) for e in range(L)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)


def test_out_of_sample_pr_removes_the_in_sample_bias_on_noise():
    # pure noise: in-sample R² is about d/n (PR ≈ 1 - d/n); held out, PR is about 1 + d/n
    rng = np.random.default_rng(5)
    n, d = 600, 40
    x = torch.tensor(rng.normal(size=(1, n, d)))
    ids = torch.tensor(rng.integers(0, 1000, n))
    stats = PartitionedStats(lambda: ResidualStats(1, d), split=0.5)
    stats.update(x, ids, torch.arange(n))
    in_sample = stats.merged().compute().item()
    held_out = stats.compute().item()
    assert abs(in_sample - (1 - d / (n - 1))) < 0.05
    assert held_out > 1.0 > in_sample


def test_partitioned_split_matches_the_cells_reference():
    x, ids = features("layernorm", 400, seed=9)
    sequences = np.repeat(np.arange(40), 10)  # 40 sequences of 10 examples
    stats = PartitionedStats(lambda: ResidualStats(L, D), split=0.3)
    for lo in range(0, 400, 70):  # batches that cut across sequences
        hi = min(lo + 70, 400)
        stats.update(
            torch.tensor(x[:, lo:hi]), torch.tensor(ids[lo:hi]), torch.tensor(sequences[lo:hi])
        )
    held = sequence_cells(torch.tensor(sequences), 0.3, None).numpy() == 1
    assert 0.2 < held.mean() < 0.4
    y = ids.astype(np.float64)
    want = [out_of_sample_reference(x[e, ~held], y[~held], x[e, held], y[held]) for e in range(L)]
    np.testing.assert_allclose(stats.compute().numpy(), want, rtol=0, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("classes", [2, 5, 60])  # rank 1, rank < d, rank d
def test_separation_fuzziness_matches_pinv(kind, classes):
    x, _ = features(kind, 500, seed=classes)
    rng = np.random.default_rng(classes)
    y = rng.integers(0, classes, 500)
    x = x + 0.5 * (y % 3)[None, :, None] * (np.arange(D) == 3)  # some separation
    stats = ResidualStats(L, D, target="onehot", classes=torch.tensor(np.unique(y)))
    xt, yt = torch.tensor(x), torch.tensor(y)
    stats.update(xt[:, :200], yt[:200]).update(xt[:, 200:], yt[200:])
    got = separation_fuzziness(stats).numpy()
    want = np.array([fuzziness_reference(x[e], y) for e in range(L)])
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_separation_fuzziness_refuses_a_single_class():
    stats = ResidualStats(1, 3, target="onehot", classes=torch.tensor([1, 2]))
    stats.update(torch.randn(1, 10, 3, dtype=torch.float64), torch.ones(10, dtype=torch.long))
    with pytest.raises(ValueError, match="at least two target classes"):
        separation_fuzziness(stats)


@pytest.mark.parametrize("per", [12, 120], ids=["per_cell", "per_sequence"])
@pytest.mark.parametrize("split", [None, 0.4])
def test_jackknife_matches_leave_one_group_out_in_numpy(split, per):
    """Short sequences: each cell's own product; long ones: one product per sequence, shared
    by its cell and the totals (lawwatch.stats.partition.SEQUENCE_ROWS)."""
    groups = 5
    rng = np.random.default_rng(11)
    n_seq = 60 if per == 12 else 10
    sequences = np.repeat(np.arange(n_seq), per)
    ids = rng.integers(0, 50, n_seq * per)
    depth = 5  # entries 0..4, PR falling with depth: the law's fit needs >= 3 after entry 0
    noise = rng.normal(size=(depth, n_seq * per, D))
    x = noise / (1 + np.arange(depth))[:, None, None] + ids[None, :, None] * 0.02
    stats = PartitionedStats(lambda: ResidualStats(depth, D), split=split, groups=groups)
    stats.update(torch.tensor(x), torch.tensor(ids), torch.tensor(sequences))
    found = uncertainty(stats)

    group = sequences % groups
    held = sequence_cells(torch.tensor(sequences), split, None).numpy() == 1
    y = ids.astype(np.float64)
    rs, rhos = [], []
    for g in range(groups):
        keep = group != g
        if split is None:
            pr = [ols_pr(x[e, keep], y[keep]) for e in range(depth)]
        else:
            a, b = keep & ~held, keep & held
            pr = [out_of_sample_reference(x[e, a], y[a], x[e, b], y[b]) for e in range(depth)]
        slope, _, r = line_fit(np.array(pr[1:]))
        rs.append(r)
        rhos.append(10.0**slope)

    def se(v):
        v = np.asarray(v)
        return np.sqrt((groups - 1) / groups * ((v - v.mean()) ** 2).sum())

    assert found["jackknife_groups"] == groups
    np.testing.assert_allclose(found["pearson_r_se"], se(rs), rtol=1e-9, atol=0)
    np.testing.assert_allclose(found["rho_se"], se(rhos), rtol=1e-9, atol=0)
    assert jackknife_se([1.0, 1.0, 1.0]) == 0.0


@pytest.mark.parametrize("per", [12, 120], ids=["per_cell", "per_sequence"])
def test_the_headline_is_the_same_for_any_number_of_groups(per):
    """The totals do not depend on the groups, to the bit, and equal numpy's in-sample PR."""
    rng = np.random.default_rng(12)
    n_seq = 24 if per == 12 else 6
    sequences = torch.from_numpy(np.repeat(np.arange(n_seq), per))
    ids = torch.from_numpy(rng.integers(0, 50, n_seq * per))
    x = torch.from_numpy(rng.normal(size=(L, n_seq * per, D)) + 3.0 * rng.normal(size=D))
    found = []
    for groups in (2, 3, 5):
        stats = PartitionedStats(lambda: ResidualStats(L, D), groups=groups)
        for lo in range(0, n_seq * per, 2 * per):  # batches of two sequences
            rows = slice(lo, lo + 2 * per)
            stats.update(x[:, rows], ids[rows], sequences[rows])
        found.append(stats.compute())
    assert all(torch.equal(found[0], other) for other in found[1:])
    want = [ols_pr(x[e].numpy(), ids.numpy().astype(np.float64)) for e in range(L)]
    np.testing.assert_allclose(found[0].numpy(), want, rtol=1e-10, atol=0)


def test_jackknife_refuses_an_empty_group():
    stats = PartitionedStats(lambda: ResidualStats(4, 2), groups=3)
    stats.update(torch.randn(4, 20, 2), torch.arange(20), torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match=r"group\(s\) \[1, 2\] hold no example"):
        uncertainty(stats)


def test_measure_records_the_options_on_a_tiny_model():
    model, probe = tiny_gpt2(seed=3), ragged_probe(seed=4, rows=40, max_len=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few examples per dimension: deliberate
        plain = measure(model, probe)
        split = measure(model, probe, split=0.3)
        jack = measure(model, probe, jackknife=4)
        fuzzy = measure(model, probe, metric="separation_fuzziness")
    assert (split.pr > plain.pr).all()  # held-out residuals exceed in-sample ones
    torch.testing.assert_close(jack.pr, plain.pr, rtol=0, atol=0)  # the headline is unchanged
    assert jack.extra["pearson_r_se"] > 0 and jack.extra["rho_se"] > 0
    record = jack.to_record()
    assert {"pearson_r_se", "rho_se", "jackknife_groups"} <= set(record)
    assert fuzzy.pr.shape == plain.pr.shape and (fuzzy.pr > 0).all()


def test_analyze_reports_the_jackknife_by_default(tmp_path):
    from lawwatch.analyze import analyze
    from lawwatch.checkpoints import Checkpoint

    model, probe = tiny_gpt2(seed=3), ragged_probe(seed=4, rows=40, max_len=24)
    model.save_pretrained(tmp_path / "checkpoint-5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = analyze([Checkpoint(str(tmp_path / "checkpoint-5"), 5)], probe, tmp_path / "o")
        live = measure(model, probe, jackknife=8)
    (record,) = result.history.records
    # the series of a live run with the defaults
    assert record["config"]["jackknife"] == MeasureConfig().jackknife
    assert record["pearson_r_se"] == pytest.approx(live.extra["pearson_r_se"], abs=1e-12)
    assert record["rho_se"] == pytest.approx(live.extra["rho_se"], abs=1e-12)
    assert record["jackknife_groups"] == 8


def test_the_report_shows_the_standard_errors(tmp_path):
    from lawwatch.history import History
    from lawwatch.output.store import write_history
    from lawwatch.report import write_report

    model, probe = tiny_gpt2(seed=3), ragged_probe(seed=4, rows=40, max_len=24)
    history = History()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in (0, 10):
            snapshot = measure(model, probe, jackknife=4)
            snapshot.step = step
            history.append(snapshot)
    write_history(history, tmp_path / "run")
    write_report([tmp_path / "run"], tmp_path / "report", formats=("svg",))
    page = (tmp_path / "report" / "report.html").read_text()
    se = history.records[-1]["pearson_r_se"]
    assert f'data-field="pearson_r_se" data-value="{se!r}"' in page
    assert 'data-field="rho_se"' in page


def test_the_onehot_budget_counts_every_set_of_statistics():
    model, probe = tiny_gpt2(seed=3), ragged_probe(seed=4, rows=40, max_len=24)
    classes = probe.target_ids().numel()
    one_set = 5 * 16 * classes * 8  # 5 entries x d 16 x classes, float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure(model, probe, metric="separation_fuzziness", max_onehot_bytes=one_set)
        with pytest.raises(ValueError, match=r"in 8 sets \(split / jackknife\)") as error:
            measure(model, probe, target="onehot", split=0.5, jackknife=3, max_onehot_bytes=one_set)
    fits = int(str(error.value).split("onehot_top_k=")[1].split(" ")[0])
    assert fits == one_set // 8 // (5 * 16 * 8) - 1  # the budget of one set, less OTHER


@pytest.mark.parametrize(
    "options",
    [{}, {"split": 0.3}, {"jackknife": 4}, {"metric": "separation_fuzziness"}, {"lens": 1.0}],
    ids=["plain", "split", "jackknife", "fuzziness", "lens"],
)
def test_one_process_solves_its_share_alone(options):
    """Without a process group one process owns every entry: solve_owned then gather_owned (the
    background worker's calls) give compute()'s values on every kind of statistics."""
    from lawwatch.measurement import accumulate

    stats = accumulate(tiny_gpt2(), ragged_probe(), **options)
    owned = stats.solve_owned()
    assert owned.error is None and owned.buffer[0].item() == 0.0
    assert torch.equal(stats.gather_owned(owned), stats.compute())


def test_a_failed_solve_alone_is_raised_by_gather_owned():
    x, _ = features("random", 50)
    stats = ResidualStats(L, D).update(torch.from_numpy(x), torch.full((50,), 7))
    owned = stats.solve_owned()  # never raises: the failure is kept
    assert owned.buffer[0].item() == 1.0 and isinstance(owned.error, ValueError)
    with pytest.raises(ValueError, match="single distinct value"):
        stats.gather_owned(owned)
