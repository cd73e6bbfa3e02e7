"""The logit lens: every metric against a float64 reference that holds full logits."""

from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
from torch.nn import functional as F

from lawwatch import MeasureConfig, ProbeSet, measure
from lawwatch.history import History, Snapshot
from lawwatch.output.sinks import scalars
from lawwatch.output.store import read_history
from lawwatch.stats.lens import DEFAULT_LENS_FRACTION, LensKeys, lens_rows
from tests.helpers.lens_reference import chosen, lens_reference
from tests.helpers.models import VOCAB, ragged_probe, tiny_gpt2, tiny_llama

TOL = 1e-6
PER_ENTRY = ("top1", "ce", "kl", "entropy")


def mixed_probe(seed: int = 0) -> ProbeSet:
    """Ragged random rows plus rows repeating one token, which the embeddings alone predict
    through a tied head (so the first-correct histogram has entries other than "never")."""
    gen = torch.Generator().manual_seed(seed)
    rows = ragged_probe(seed).input_ids.tolist()
    lengths = ragged_probe(seed).attention_mask.sum(dim=1).tolist()
    seqs = [r[:n] for r, n in zip(rows, lengths, strict=True)]
    seqs += [[int(t)] * 12 for t in torch.randint(1, VOCAB, (4,), generator=gen)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ProbeSet.from_tokens(seqs)


def _check(lens: dict, ref: dict) -> None:
    assert lens["examples"] == ref["examples"] > 0
    for name in PER_ENTRY:
        assert lens[name] == pytest.approx(ref[name], abs=TOL), name
    assert lens["first_correct"] == ref["first_correct"]
    assert lens["final"] == ref["final"]
    for name in ("first_correct_mean", "final_mean", "gap_mean"):
        if ref[name] is None:
            assert lens[name] is None
        else:
            assert lens[name] == pytest.approx(ref[name], abs=TOL), name


@pytest.mark.parametrize(
    "build",
    [
        lambda: tiny_gpt2(),  # LayerNorm final, tied head
        lambda: tiny_gpt2(seed=1, tie_word_embeddings=False),  # untied
        lambda: tiny_llama(),  # RMSNorm final, untied head
        lambda: tiny_llama(seed=2, tie_word_embeddings=True),  # tied
    ],
    ids=["gpt2-tied", "gpt2-untied", "llama-untied", "llama-tied"],
)
def test_every_metric_matches_the_full_logits_reference(build):
    model = build().eval()
    probe = mixed_probe()
    snapshot = measure(model, probe, lens=1.0, batch_size=5)
    lens = snapshot.extra["lens"]
    ref = lens_reference(model, probe)
    _check(lens, ref)
    # padding is never counted: the examples are the real (position, next token) pairs
    mask = probe.attention_mask
    assert lens["examples"] == int((mask[:, :-1] & mask[:, 1:]).sum()) == snapshot.n_tokens


def test_a_subset_and_chosen_layers_match_the_reference(gpt2):
    probe = mixed_probe(1)
    snapshot = measure(gpt2, probe, lens=0.3, layers=(0, 1, 3, 4), batch_size=3)
    _check(snapshot.extra["lens"], lens_reference(gpt2, probe, 0.3, layers=(0, 1, 3, 4)))


def test_tied_embeddings_predict_repeated_tokens_early(gpt2):
    """The adversarial rows make the depth histograms and their means non-trivial."""
    lens = measure(gpt2, mixed_probe(), lens=1.0).extra["lens"]
    assert lens["first_correct"][0] > 0 and lens["first_correct_mean"] is not None
    assert lens["gap_mean"] is not None and lens["gap_mean"] >= 0


def test_the_last_entry_is_the_models_own_accuracy_and_loss(llama):
    probe = ragged_probe(3)
    lens = measure(llama, probe, lens=1.0).extra["lens"]
    with torch.no_grad():
        logits = llama(probe.input_ids, attention_mask=probe.attention_mask.long()).logits
    mask = probe.attention_mask
    real = mask[:, :-1] & mask[:, 1:]
    z, t = logits[:, :-1][real].double(), probe.input_ids[:, 1:][real]
    assert lens["ce"][-1] == pytest.approx(F.cross_entropy(z, t).item(), abs=1e-5)
    assert lens["top1"][-1] == pytest.approx((z.argmax(1) == t).double().mean().item(), abs=TOL)
    assert lens["kl"][-1] == pytest.approx(0.0, abs=1e-12)
    assert lens["final"][-1] == 0  # the last entry always agrees with itself


def test_the_subset_is_deterministic_exact_when_all_and_the_same_in_any_batching():
    probe = ragged_probe(4, rows=16)
    mask = probe.attention_mask
    positions = mask.clone()
    positions[:, :-1] = mask[:, :-1] & mask[:, 1:]
    positions[:, -1] = False
    sequences = positions.nonzero()[:, 0]
    n = int(positions.sum())
    assert lens_rows(positions, sequences, 1.0).tolist() == list(range(n))
    rows = lens_rows(positions, sequences, 0.25)
    where = positions.nonzero()[rows].tolist()
    assert [tuple(w) for w in where] == chosen(mask.numpy().astype(bool), 0.25)
    assert 0.15 * n < len(rows) < 0.35 * n
    # a batch of rows 5…9 picks the same examples as the whole probe does there
    part = positions[5:10]
    mine = part.nonzero()[lens_rows(part, part.nonzero()[:, 0] + 5, 0.25)]
    mine[:, 0] += 5
    assert [tuple(w) for w in mine.tolist()] == [tuple(w) for w in where if 5 <= w[0] < 10]


def test_config_lens_is_validated_and_part_of_the_series():
    assert MeasureConfig(lens=True).lens == DEFAULT_LENS_FRACTION
    config = MeasureConfig(lens=0.5, lens_head="lm_head")
    assert MeasureConfig.from_dict(config.to_dict()) == config
    for bad, error in ((0.0, ValueError), (1.5, ValueError), ("all", TypeError)):
        with pytest.raises(error, match="lens"):
            MeasureConfig(lens=bad)
    with pytest.raises(ValueError, match="offset=1"):
        MeasureConfig(lens=0.5, offset=0)
    with pytest.raises(ValueError, match="lens is None"):
        MeasureConfig(lens_head="lm_head")
    from lawwatch.history import series_diff

    off, on = MeasureConfig().to_dict(), config.to_dict()
    changes = series_diff({"config": off}, {"config": on})
    assert ("config", "lens") in [(change.field, change.option) for change in changes]


def test_a_model_without_a_head_is_refused_with_what_to_pass(gpt2):
    with pytest.raises(ValueError, match="lens_head="):
        measure(gpt2.transformer, ragged_probe(), lens=1.0)
    with pytest.raises(ValueError, match="lens_head='nope' is not a module"):
        measure(gpt2, ragged_probe(), lens=1.0, lens_head="nope")
    # named explicitly, the same head gives the same numbers
    a = measure(gpt2, ragged_probe(), lens=1.0).extra["lens"]
    b = measure(gpt2, ragged_probe(), lens=1.0, lens_head="lm_head").extra["lens"]
    assert a == b


def test_records_history_and_scalars_carry_the_lens(gpt2):
    snapshot = measure(gpt2, ragged_probe(), lens=1.0)
    snapshot.step = 3
    record = snapshot.to_record()
    assert Snapshot.from_record(record).to_record() == record
    history = History([record])
    steps, entries, top1 = history.lens_matrix("top1")
    assert steps.tolist() == [3] and entries.tolist() == [0, 1, 2, 3, 4]
    assert top1[0].tolist() == pytest.approx(record["lens"]["top1"])
    keys = scalars(snapshot)
    assert keys["lawwatch/lens/top1/layer_04"] == record["lens"]["top1"][4]
    assert keys["lawwatch/lens/ce/layer_00"] == record["lens"]["ce"][0]
    assert keys["lawwatch/lens/examples"] == record["lens"]["examples"]
    assert "lawwatch/lens/first_correct/never" in keys
    assert not any(k.startswith("lawwatch/lens") for k in scalars(measure(gpt2, ragged_probe())))


def head_copies(shape: torch.Size) -> list[torch.Tensor]:
    """Every live float64 tensor of ``shape`` (the lens's copy of a head) in this process."""
    gc.collect()
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, torch.Tensor) and o.dtype == torch.float64 and o.shape == shape
    ]


def test_a_background_snapshot_holds_no_copy_of_the_head_while_training_goes_on(gpt2):
    """The lens converts the head to float64 (V × d) for its forward passes; once they are
    done, nothing keeps it, while the solve is pending in the worker or after."""
    from lawwatch.watch.monitor import LawWatch

    shape = gpt2.lm_head.weight.shape
    assert head_copies(shape) == []  # the model's own head is float32
    watch = LawWatch(gpt2, ragged_probe(), every=1, max_overhead=None, background=True, lens=1.0)
    try:
        watch.maybe_snapshot(0)
        pending = watch._worker.pending  # the statistics, held until the next call collects
        assert len(pending) == 1 and pending[0].stats.lens.count > 0
        assert head_copies(shape) == []
        pending[0].future.result(timeout=120)  # solved: still none
        assert head_copies(shape) == []
        watch.maybe_snapshot(1)
        assert head_copies(shape) == []
    finally:
        watch.close()
    assert LensKeys.of(watch.history[-1])[LensKeys.EXAMPLES] > 0  # the lens did read


def test_a_lens_that_read_no_example_reports_nan_not_zeros(gpt2, tmp_path):
    """A share of a small probe that chooses no example: NaN metrics (never a CE of 0, which
    reads as perfect), one warning for the run, nothing but the count in the trackers' keys;
    the history, its lens matrix and the report take it."""
    from lawwatch.report import write_report
    from lawwatch.watch.monitor import LawWatch

    probe = ragged_probe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        watch = LawWatch(
            gpt2, probe, every=1, max_overhead=None, directory=tmp_path / "lw", lens=0.001
        )
        for step in range(3):
            watch.maybe_snapshot(step)
        watch.close()
    said = [w for w in caught if "lens read no example" in str(w.message)]
    assert len(said) == 1 and "lens=0.001" in str(said[0].message)
    records = read_history(tmp_path / "lw").records
    assert [r["step"] for r in records] == [0, 1, 2]
    for record in records:
        lens = LensKeys.of(record)
        assert lens[LensKeys.EXAMPLES] == 0
        for name in PER_ENTRY:
            assert len(lens[name]) == len(record["layers"])
            assert all(math.isnan(v) for v in lens[name]), name
        assert lens["first_correct"] == lens["final"] == [0] * (len(record["layers"]) + 1)
        assert lens["first_correct_mean"] is None and lens["gap_mean"] is None
    keys = scalars(Snapshot.from_record(records[-1]))
    assert [k for k in keys if k.startswith("lawwatch/lens/")] == ["lawwatch/lens/examples"]
    assert all(math.isfinite(v) for v in keys.values())
    assert torch.isnan(History(records).lens_matrix("ce")[2]).all()
    write_report([tmp_path / "lw"], tmp_path / "report")  # draws without the lens's numbers
    assert (tmp_path / "report" / "report.html").exists()


def test_mixed_precision_lens_is_close_to_float64(gpt2):
    probe = mixed_probe()
    exact = measure(gpt2, probe, lens=1.0).extra["lens"]
    mixed = measure(gpt2, probe, lens=1.0, precision="mixed").extra["lens"]
    for name in PER_ENTRY:
        assert mixed[name] == pytest.approx(exact[name], abs=1e-5)


def test_a_trainer_run_logs_the_lens_to_wandb_and_tensorboard(tmp_path, offline_wandb):
    from lawwatch import LawWatchCallback
    from tests.helpers.trackers import read_events
    from tests.helpers.trainer import make_trainer
    from tests.helpers.wandb_offline import finish_run, history_rows, inspect_run

    # max_overhead=None: the budget would leave step 1 to time training steps
    callback = LawWatchCallback(ragged_probe(), every=2, lens=1.0, max_overhead=None)
    out = tmp_path / "out"
    make_trainer(out, [callback], max_steps=2, report_to=["wandb", "tensorboard"]).train()
    records = read_history(out / "lawwatch").records
    assert [r["step"] for r in records] == [0, 1, 2] and all("lens" in r for r in records)
    expected = {r["step"]: scalars(Snapshot.from_record(r)) for r in records}
    lens_keys = [k for k in expected[2] if k.startswith("lawwatch/lens/")]
    assert "lawwatch/lens/top1/layer_02" in lens_keys
    # W&B, read back from the offline run
    rows = [row for row in history_rows(inspect_run(finish_run())) if "lawwatch/rho" in row]
    assert len(rows) == 3
    for row, step in zip(rows, (0, 1, 2), strict=True):
        for key in lens_keys:
            assert row[key] == pytest.approx(expected[step][key], rel=1e-12), key
    # TensorBoard (float32), read back from the Trainer's event file
    events = read_events(next((out / "runs").iterdir()))
    for key in lens_keys:
        points = events.Scalars(key)
        assert [p.step for p in points] == [0, 1, 2], key
        want = [expected[s][key] for s in (0, 1, 2)]
        assert [p.value for p in points] == pytest.approx(want, rel=1e-6, abs=1e-6), key


def test_the_report_draws_the_lens_figure_only_for_lens_records(gpt2, tmp_path):
    from lawwatch.report import Run, write_report

    lensed, plain = History(), History()
    for step in (0, 1, 2):
        snapshot = measure(gpt2, ragged_probe(), lens=1.0)
        snapshot.step = step
        lensed.append(snapshot)
        plain.append({k: v for k, v in snapshot.to_record().items() if k != "lens"})
    report = write_report([Run("lensed", lensed)], tmp_path / "a", formats=("svg",))
    assert report.figures["lens"]["svg"].stat().st_size > 0
    assert 'id="lens"' in report.html.read_text()
    report = write_report([Run("plain", plain)], tmp_path / "b", formats=("svg",))
    assert "lens" not in report.figures and 'id="lens"' not in report.html.read_text()
