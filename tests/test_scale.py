"""What keeps a snapshot's memory bounded and its precision chosen: one entry at a time for
every measure, where the statistics live, the statistics precision policy.

Every comparison is against the plain path (the statistics on the model's device, float64),
itself checked against numpy in test_measure.py and test_residual.py.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lawwatch import measure
from lawwatch.config import MeasureConfig
from lawwatch.precision import FAST_FP64_CAPABILITIES, slow_fp64
from lawwatch.stats.partition import PartitionedUpdate
from lawwatch.stats.residual import ResidualStats
from tests.helpers.models import ragged_probe, tiny_gpt2
from tests.helpers.reference import ols_pr

pytestmark = pytest.mark.usefixtures("one_thread")

precision_mod = __import__("lawwatch.precision", fromlist=["slow_fp64"])


@pytest.fixture(scope="module")
def model_probe():
    model = tiny_gpt2(seed=5).double()  # float64: group sizes cannot change a rounding
    probe = ragged_probe(seed=6, rows=20, max_len=24)
    assert probe.num_examples() > 10 * 16
    return model, probe


class EntryShapes:
    """Records the shape of every float64 feature block handed to partitioned statistics."""

    def __init__(self, monkeypatch):
        self.shapes: list[tuple[int, ...]] = []
        original = PartitionedUpdate.add

        def recording(update, part, features, *, owned=False):
            self.shapes.append(tuple(features.shape))
            return original(update, part, features, owned=owned)

        monkeypatch.setattr(PartitionedUpdate, "add", recording)


@pytest.mark.parametrize("target", ["token_id", "onehot"])
def test_partitioned_statistics_stream_one_entry_at_a_time(model_probe, monkeypatch, target):
    model, probe = model_probe
    whole = measure(model, probe, target=target, batch_size=4)  # the plain streamed path
    sizes = EntryShapes(monkeypatch)
    # the jackknife's cells take the same streamed path (its headline PRs are accumulated as
    # the plain ones): each entry's rows go to their cells as the entry arrives
    grouped = measure(model, probe, target=target, batch_size=4, jackknife=4)
    assert sizes.shapes, "no entry was recorded"
    assert all(g == 1 for g, _, _ in sizes.shapes)  # a single entry, the least there can be
    assert any(n > 60 for _, n, _ in sizes.shapes)  # large batches too: one entry at a time
    assert max(g for g, n, _ in sizes.shapes if n > 60) < 5
    np.testing.assert_allclose(grouped.pr.numpy(), whole.pr.numpy(), rtol=0, atol=1e-12)


def test_never_all_entries_at_once(model_probe, monkeypatch):
    model, probe = model_probe
    whole = measure(model, probe, batch_size=4)
    sizes = EntryShapes(monkeypatch)
    grouped = measure(model, probe, batch_size=4, jackknife=4)  # the partitioned path (above)
    assert {s[0] for s in sizes.shapes} == {1}  # never all 5 entries at once
    np.testing.assert_allclose(grouped.pr.numpy(), whole.pr.numpy(), rtol=0, atol=1e-12)


def test_entries_in_calls_equal_update_and_numpy():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, 12, generator=gen, dtype=torch.float64) * 3 + 7  # (L, n, d)
    y = torch.randint(0, 50, (300,), generator=gen)
    one = ResidualStats(5, 12).update(x[:, :150], y[:150]).update(x[:, 150:], y[150:])
    groups = ResidualStats(5, 12)
    for half in (slice(0, 150), slice(150, 300)):
        parts = [
            (slice(0, 2), x[0:2, half]),
            (slice(2, 3), x[2:3, half]),
            (slice(3, 5), x[3:5, half]),
        ]
        batch = groups.begin(y[half])
        for p, g in parts:
            batch.add(p, g.clone(), owned=True)
        batch.finish()
    want = [ols_pr(x[i].numpy(), y.numpy().astype(np.float64)) for i in range(5)]
    np.testing.assert_allclose(groups.compute().numpy(), one.compute().numpy(), atol=1e-13, rtol=0)
    np.testing.assert_allclose(groups.compute().numpy(), want, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ([slice(0, 2), slice(3, 5)], "follow entry 2"),  # a gap
        ([slice(0, 3), slice(0, 5)], "follow entry 3"),  # a repeat
        ([slice(0, 2)], r"covered entries 0 … 1, not all 5"),  # incomplete
    ],
)
def test_entries_in_calls_refuse_parts_out_of_order(parts, match):
    x = torch.randn(5, 40, 3, dtype=torch.float64)
    y = torch.randint(0, 9, (40,))
    with pytest.raises(ValueError, match=match):
        batch = ResidualStats(5, 3).begin(y)
        for p in parts:
            batch.add(p, x[p])
        batch.finish()


def test_statistics_on_the_host_give_the_same_prs(model_probe):
    """stats_device='cpu' takes the path a GPU model takes (products where the features are,
    (d, d) sums added on the statistics' device); on a CPU model both devices are the host."""
    model, probe = model_probe
    for target in ("token_id", "onehot"):
        here = measure(model, probe, target=target, batch_size=4)
        host = measure(model, probe, target=target, batch_size=4, stats_device="cpu")
        np.testing.assert_allclose(host.pr.numpy(), here.pr.numpy(), rtol=0, atol=1e-12)


def test_a_device_this_process_lacks_is_refused_with_the_fix(model_probe):
    model, probe = model_probe
    with pytest.raises(ValueError, match=r"stats_device='cuda:99'.*use 'cpu' or None"):
        measure(model, probe, stats_device="cuda:99")


def test_statistics_precision_is_recorded_and_logged_once(model_probe, caplog):
    model, probe = model_probe
    precision_mod._logged.clear()
    with caplog.at_level(logging.DEBUG, logger="lawwatch"):  # DEBUG: not in progress bars
        exact = measure(model, probe, batch_size=4)
        measure(model, probe, batch_size=4)
    lines = [r.message for r in caplog.records if "statistics" in r.message]
    assert lines == ["lawwatch: statistics precision float64 on cpu"]
    mixed = measure(model, probe, batch_size=4, precision="mixed")
    assert exact.extra["stats_precision"] == "float64" and mixed.extra["stats_precision"] == "mixed"
    assert exact.to_record()["stats_precision"] == "float64"
    assert exact.extra["config"]["precision"] == "float64"
    diff = (mixed.pr - exact.pr).abs().max().item()
    assert 0 < diff < 1e-6  # a float32 Gram: not bitwise float64 (random weights: well-posed)


def test_float64_is_the_default_everywhere_and_slow_fp64_is_named():
    with pytest.raises(ValueError, match=r"Unknown precision='auto'.*'float64'"):
        MeasureConfig(precision="auto")
    assert MeasureConfig().precision == "float64"
    assert not slow_fp64(torch.device("cpu"))
    assert slow_fp64(torch.device("mps"))  # no FP64 units at all
    assert {(8, 0), (9, 0)} <= FAST_FP64_CAPABILITIES
    assert not {(8, 6), (8, 9), (12, 0)} & FAST_FP64_CAPABILITIES  # consumer / L40S class
