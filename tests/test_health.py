"""The residual stream's vital signs: every number against a float64 numpy reference.

On random and adversarial rows (massive dimensions, constant features, huge outliers, NaN and
Inf, one or two examples), on real tiny transformers through ``measure`` (the reference: the
model's ``output_hidden_states`` in float64), merged as two processes' statistics are; their
keys in the trackers (a real W&B offline run read back), the alert, the report's figure and
the read path of records without them. Two real processes: ``test_distributed.py``
(``test_ddp_vital_signs_equal_one_process``).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings

import numpy as np
import pytest
import torch

from lawwatch import LawWatch, measure
from lawwatch.alerts import Alerts, AlertSink, detect, vitals_alerts
from lawwatch.capture import NonFiniteError
from lawwatch.config import MeasureConfig
from lawwatch.history import History, Snapshot
from lawwatch.output.sinks import scalars
from lawwatch.probe import example_mask
from lawwatch.report import Run, write_report
from lawwatch.stats.health import HealthKeys, HealthStats
from tests.helpers.health_reference import assert_matches, stack
from tests.helpers.models import ragged_probe, tiny_gpt2, tiny_llama
from tests.helpers.wandb_offline import history_rows, inspect_run


def _rows(seed: int, n: int, d: int, means=None, scales=None) -> np.ndarray:
    gen = np.random.default_rng(seed)
    means = gen.normal(0, 3, d) if means is None else np.asarray(means, dtype=float)
    scales = gen.uniform(0.1, 2, d) if scales is None else np.asarray(scales, dtype=float)
    return means + scales * gen.standard_normal((n, d))


def _case(name: str) -> np.ndarray:
    d = 6
    if name == "random":
        return _rows(0, 300, d)
    if name == "heavy_tails":  # Student-t with 3 degrees of freedom: large kurtosis
        return np.random.default_rng(1).standard_t(3, (400, d)) * 5
    if name == "massive":  # a mean 1e7 times the spread: lost to cancellation without shifts
        return _rows(2, 200, d, means=[3e4, -1e3, 0, 1, 2, 5e5], scales=[1e-3, 1, 1, 1, 1, 0.05])
    if name == "outlier":  # one value of 1e6 among unit normals
        x = _rows(3, 250, d, means=np.zeros(d), scales=np.ones(d))
        x[117, 2] = 1e6
        return x
    if name == "outlier_first":  # ... in the first row: the shift sits at the outlier
        x = _rows(4, 250, d, means=np.zeros(d), scales=np.ones(d))
        x[0, 4] = -1e6
        return x
    if name == "constant_features":  # 0.1 is not exact in binary; 1e5 and 0 are
        x = _rows(5, 120, d)
        x[:, 1], x[:, 3], x[:, 5] = 0.1, 1e5, 0.0
        return x
    if name == "all_constant":  # no feature has a spread: kurtosis undefined
        return np.tile(np.array([0.1, -7.0, 3e3, 2.5, 1e-3, 9.0]), (50, 1))
    if name == "one_example":
        return _rows(6, 1, d)
    if name == "two_examples":  # two distinct values per feature: excess kurtosis -2
        return _rows(7, 2, d)
    if name == "nan":
        x = _rows(8, 90, d)
        x[10, 2] = x[50, 2] = x[89, 0] = math.nan
        return x
    if name == "inf":
        x = _rows(9, 90, d)
        x[3, 1], x[4, 4] = math.inf, -math.inf
        return x
    if name == "no_examples":
        return np.zeros((0, d))
    raise KeyError(name)


CASES = (
    "random",
    "heavy_tails",
    "massive",
    "outlier",
    "outlier_first",
    "constant_features",
    "all_constant",
    "one_example",
    "two_examples",
    "nan",
    "inf",
    "no_examples",
)


def _fed(x: np.ndarray, chunk: int, index: int = 0, entries: int = 1) -> HealthStats:
    """A HealthStats of ``entries`` entries, entry ``index`` fed ``x`` ``chunk`` rows at a time."""
    stats = HealthStats(range(entries), x.shape[1])
    rows = torch.from_numpy(x)
    for lo in range(0, len(x), chunk):
        stats.add(index, rows[lo : lo + chunk])
    return stats


def _entry(record: dict, i: int) -> dict:
    """Entry ``i`` of a record's health field, as a one-entry health field."""
    out = {key: [record[key][i]] for key in (*HealthKeys.PER_ENTRY, "constant", "massive")}
    return {**out, "examples": record["examples"]}


@pytest.mark.parametrize("name", CASES)
def test_vital_signs_equal_a_float64_reference(name):
    x = _case(name)
    want = stack([x])
    # fed whole, in chunks of 7 rows, and a row at a time (the shift: the first row's values)
    for chunks in ((len(x) or 1,), (7,), (1,)):
        got = _fed(x, chunks[0]).record()
        assert_matches(got, want)
    # the other entries, never fed, are undefined, not zeros
    two = _fed(x, 5, index=1, entries=2).record()
    assert_matches(_entry(two, 1), want)
    assert math.isnan(two["rms"][0]) and math.isnan(two["kurtosis"][0])
    assert two["massive"][0] == [] and math.isnan(two["nonfinite"][0])


def test_the_adversarial_cases_read_as_documented():
    """What the reference gives, said plainly (the reference could be wrong the same way)."""
    constant = _fed(_case("constant_features"), 7).record()
    assert constant["constant"] == [3] and math.isfinite(constant["kurtosis"][0])
    every = _fed(_case("all_constant"), 7).record()
    assert every["constant"] == [6] and math.isnan(every["kurtosis"][0])
    assert every["rms"][0] > 0 and every["max_abs"][0] == 3e3
    one = _fed(_case("one_example"), 1).record()
    assert math.isnan(one["kurtosis"][0]) and one["constant"] == [6]
    two = _fed(_case("two_examples"), 1).record()
    assert two["kurtosis"][0] == pytest.approx(-2.0, abs=1e-12)
    outlier = _fed(_case("outlier"), 32).record()
    assert outlier["max_abs"][0] == 1e6 and outlier["massive"][0][0][0] == 2
    assert outlier["kurtosis"][0] > 30  # (n - 3) / 6 ≈ 41 from the outlier's feature alone
    nan = _fed(_case("nan"), 7).record()
    assert nan["nonfinite"][0] == 3 / (90 * 6)
    assert all(math.isnan(nan[k][0]) for k in ("rms", "max_abs", "kurtosis"))
    assert nan["massive"] == [[]]
    assert _fed(_case("inf"), 7).record()["nonfinite"][0] == 2 / (90 * 6)


@pytest.mark.parametrize("name", ["random", "massive", "outlier", "constant_features", "nan"])
def test_merged_statistics_equal_one_pass(name):
    """Two processes' statistics, about different shifts, merge into the whole probe's."""
    x = _case(name)
    cut = len(x) // 3
    first, second = _fed(x[:cut], 7), _fed(x[cut:][::-1].copy(), 11)
    assert not torch.equal(first.shift, second.shift)
    merged = first.merge(second).record()
    assert_matches(merged, stack([x]))
    # a process without examples adds nothing
    empty = HealthStats(range(1), x.shape[1])
    assert_matches(empty.merge(_fed(x, 13)).record(), stack([x]))


def test_a_non_float64_or_mis_sized_chunk_is_refused():
    stats = HealthStats(range(2), 4)
    with pytest.raises(ValueError, match="width 4"):
        stats.add(0, torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        stats.add(0, torch.zeros(3, 4))


# -- real models through measure ---------------------------------------------------------------


def _hidden_reference(model, probe, layers=None) -> dict:
    """The vital signs of ``output_hidden_states`` at the probe's examples, in numpy.

    Llama's RMSNorm computes in float32 whatever the weights' dtype, so its last hidden
    state is re-made here in float64 from the final norm's input (numpy).
    """
    norm = getattr(getattr(model, "model", None), "norm", None)
    seen = []
    handle = (
        None if norm is None else norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    )
    try:
        with torch.no_grad():
            out = model(
                input_ids=probe.input_ids,
                attention_mask=probe.attention_mask.long(),
                output_hidden_states=True,
                use_cache=False,
            )
    finally:
        if handle is not None:
            handle.remove()
    where = example_mask(probe.attention_mask)
    states = [h[where].numpy() for h in out.hidden_states]
    if seen:
        x = seen[0][where].numpy()
        eps = model.config.rms_norm_eps
        scale = 1.0 / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps)
        states[-1] = x * scale * norm.weight.detach().numpy()
    chosen = range(len(states)) if layers is None else layers
    return stack([states[e] for e in chosen])


@pytest.mark.parametrize(
    ("build", "options"),
    [
        (tiny_gpt2, {}),
        (tiny_llama, {}),
        (tiny_gpt2, {"layers": (0, 2, 3, 4), "lens": 1.0, "batch_size": 3}),
    ],
    ids=["gpt2", "llama", "gpt2-some-layers-lens"],
)
def test_measure_reports_the_vital_signs_of_the_hidden_states(build, options):
    """Entry l is output_hidden_states[l] (the last: the final norm's output), at the
    examples PR uses; through the jackknife's partitioned statistics (16 sequences)."""
    model = build(seed=1).double().eval()
    probe = ragged_probe(seed=2, rows=16, max_len=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few examples per dimension: deliberate
        snapshot = measure(model, probe, **options)
    assert snapshot.extra.get("jackknife_groups") == 8
    if "lens" in options:
        assert "lens" in snapshot.extra
    got = HealthKeys.of(snapshot.extra)
    assert got["examples"] == snapshot.n_tokens
    assert_matches(got, _hidden_reference(model, probe, options.get("layers")))


def test_health_off_leaves_the_prs_alone(gpt2, probe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on, off = measure(gpt2, probe), measure(gpt2, probe, health=False)
    assert HealthKeys.FIELD in on.extra and HealthKeys.FIELD not in off.extra
    torch.testing.assert_close(on.pr, off.pr, rtol=0, atol=0)
    with pytest.raises(TypeError, match="health must be True or False"):
        MeasureConfig(health="yes")


def _poisoned(model, row: int, position: int, block: int = 1):
    """NaN into block ``block``'s output at one token (its first three features)."""

    def hook(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[0] > row:  # not the final norm's reading (one sequence, the longest)
            hidden[row, position, :3] = math.nan
        return output

    return model.transformer.h[block].register_forward_hook(hook)


def test_non_finite_hidden_states_are_refused_naming_each_entry_and_count(caplog):
    model = tiny_gpt2(seed=1).double().eval()
    probe = ragged_probe(seed=2, rows=6, max_len=24)
    row = 2  # not the longest sequence: the final norm's reading is taken there
    handle = _poisoned(model, row, position=1)
    try:
        ref = _hidden_reference(model, probe)
        where = example_mask(probe.attention_mask)
        with torch.no_grad():
            hidden = model(
                input_ids=probe.input_ids,
                attention_mask=probe.attention_mask.long(),
                output_hidden_states=True,
            ).hidden_states
        counts = [int((~torch.isfinite(h[where])).sum()) for h in hidden]
        assert counts[:2] == [0, 0] and counts[2] == 3 and counts[-1] > 3  # it spreads
        with pytest.raises(NonFiniteError, match="contain NaN or Inf") as error:
            measure(model, probe, batch_size=len(probe))  # one batch: its counts are all
        n, d = int(where.sum()), 16
        said = "; ".join(f"entry {e}: {c} of {n * d} values" for e, c in enumerate(counts) if c)
        assert f"Non-finite values at the examples so far: {said}." in str(error.value)
        assert [round(s * n * d) for s in ref["nonfinite"]] == counts
        # a monitor skips the snapshot and says the same in its log; training goes on
        watch = LawWatch(model, probe, batch_size=len(probe), max_overhead=None)
        with caplog.at_level(logging.ERROR, logger="lawwatch"):
            assert watch.snapshot(0) is None
        assert said in caplog.text
    finally:
        handle.remove()


# -- records, trackers, alerts, report ----------------------------------------------------------


@pytest.fixture(scope="module")
def measured() -> dict:
    """One real record with the vital signs (a tiny GPT-2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = measure(tiny_gpt2(seed=3), ragged_probe(seed=4))
    return snapshot.to_record()


def _series(record: dict, jumps: dict[int, tuple[str, float]] | None = None) -> list[dict]:
    """Five records at steps 0 … 4 from ``record``; ``jumps``: step -> (key, factor) at layer 2."""
    out = []
    for step in range(5):
        r = copy.deepcopy(record)
        r["step"] = step
        health = r[HealthKeys.FIELD]
        for key in (HealthKeys.RMS, HealthKeys.MAX_ABS):  # a steady drift, well under 10x
            health[key] = [v * 1.5**step for v in health[key]]
        for at, (key, factor) in (jumps or {}).items():
            if step >= at:  # the jump stays: only its first snapshot alerts
                value = health[key][2]
                health[key][2] = (value + 3) * factor - 3 if key == "kurtosis" else value * factor
        out.append(r)
    return out


def test_the_alert_fires_on_a_jump_and_not_on_a_steady_run(measured):
    assert vitals_alerts(_series(measured)) == []
    assert [a for a in detect(_series(measured)) if a.kind == "vitals"] == []
    jumped = _series(measured, {2: ("max_abs", 12.0), 3: ("kurtosis", 20.0)})
    alerts = vitals_alerts(jumped)
    assert [(a.kind, a.step, a.layer, a.level) for a in alerts] == [
        ("vitals", 2, 2, "WARN"),
        ("vitals", 3, 2, "WARN"),
    ]
    before, after = jumped[1]["health"]["max_abs"][2], jumped[2]["health"]["max_abs"][2]
    assert f"largest |x| {before:.4g} -> {after:.4g} (18.0x)" in alerts[0].text
    assert "step 1 to 2" in alerts[0].text and "alerting at 10x" in alerts[0].text
    k0, k1 = (jumped[s]["health"]["kurtosis"][2] + 3 for s in (2, 3))
    assert f"kurtosis (excess + 3) {k0:.4g} -> {k1:.4g} (20.0x)" in alerts[1].text
    # the factor is a setting; off, none
    assert vitals_alerts(jumped, factor=25.0) == []
    assert [a for a in detect(jumped, Alerts(vitals=False)) if a.kind == "vitals"] == []
    assert len([a for a in detect(jumped, Alerts(vitals_factor=15.0)) if a.kind == "vitals"]) == 2
    with pytest.raises(ValueError, match="vitals_factor must be > 1"):
        Alerts(vitals_factor=1.0)
    # records without the vital signs (older ones) break the chain: no comparison across them
    gap = [jumped[0], jumped[1], {k: v for k, v in jumped[2].items() if k != "health"}]
    assert vitals_alerts(gap + jumped[3:]) == []


def test_records_without_vital_signs_still_read(measured, tmp_path):
    old = {k: v for k, v in measured.items() if k != HealthKeys.FIELD}
    history = History([{**old, "step": 0}, {**old, "step": 1}])
    assert history.health_matrix("rms") is None
    assert not [k for k in scalars(Snapshot.from_record(old)) if "/health/" in k]
    assert vitals_alerts(history) == []
    report = write_report([Run("old", history)], tmp_path / "old", formats=("svg",))
    assert "health" not in report.figures and 'id="health"' not in report.html.read_text()
    # with them: the matrix and the figure
    new = History(_series(measured))
    steps, layers, rms = new.health_matrix("rms")
    assert steps.tolist() == list(range(5)) and layers.tolist() == measured["layers"]
    assert rms[4].tolist() == new[4]["health"]["rms"]
    report = write_report([Run("new", new)], tmp_path / "new", formats=("svg", "png"))
    assert report.figures["health"]["png"].stat().st_size > 0
    assert 'id="health"' in report.html.read_text()


def test_scalars_hold_three_series_per_layer_and_the_nonfinite_share(measured):
    values = scalars(Snapshot.from_record(measured))
    keys = sorted(k for k in values if k.startswith("lawwatch/health/"))
    layers = measured["layers"]
    assert len(keys) == 3 * len(layers) + 1
    health = measured["health"]
    for i, entry in enumerate(layers):
        for metric in ("rms", "max_abs", "kurtosis"):
            assert values[f"lawwatch/health/{metric}/layer_{entry:02d}"] == health[metric][i]
    assert values["lawwatch/health/nonfinite"] == 0.0
    # an undefined value (NaN) is left out, as the trackers refuse it
    nan = copy.deepcopy(measured)
    nan["health"]["kurtosis"][1] = math.nan
    assert "lawwatch/health/kurtosis/layer_01" not in scalars(Snapshot.from_record(nan))


def test_a_wandb_offline_run_holds_the_health_keys_and_the_alert(measured, offline_wandb):
    import wandb

    from lawwatch.output.trackers import WandbSink

    live = wandb.init(project="lawwatch-tests", dir=str(offline_wandb))
    tracker = WandbSink(live)
    sink = AlertSink(Alerts(emerged=False, broke=False, stalled=False), targets=[tracker])
    series = _series(measured, {3: ("max_abs", 40.0)})
    for record in series:
        snapshot = Snapshot.from_record(record)
        tracker.write(snapshot)
        sink.write(snapshot)
    run_dir = live.settings.sync_dir
    live.finish()
    logged = inspect_run(run_dir)
    rows = [row for row in history_rows(logged) if "lawwatch/rho" in row]
    assert len(rows) == 5
    for row, record in zip(rows, series, strict=True):
        for i, entry in enumerate(record["layers"]):
            for metric in ("rms", "max_abs", "kurtosis"):
                key = f"lawwatch/health/{metric}/layer_{entry:02d}"
                assert row[key] == pytest.approx(record["health"][metric][i], rel=1e-12)
        assert row["lawwatch/health/nonfinite"] == 0.0
    alerts = [r["alert"] for r in logged if r["type"] == "alert"]
    assert [(a["title"], a["level"]) for a in alerts] == [
        ("lawwatch: layer 2's activations jumped", "WARN")
    ]
    assert alerts[0]["text"] == sink.fired[0].text
