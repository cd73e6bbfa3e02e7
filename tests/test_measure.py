"""`measure` against a direct float64 re-implementation of He & Su's protocol."""

import numpy as np
import pytest
import torch

from lawwatch import ProbeSet, Snapshot, fit_law, measure
from lawwatch.measurement import accumulate, solve
from tests.helpers.models import RECORD_KEYS, VOCAB, ragged_probe, tiny_gpt2, tiny_llama
from tests.helpers.paper import gpt2_norm, llama_norm, paper_reference
from tests.helpers.reference import fit_line

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("make", "norm"), [(tiny_gpt2, gpt2_norm), (tiny_llama, llama_norm)], ids=["gpt2", "llama"]
)
def test_equals_paper_protocol(make, norm):
    model = make(seed=1)
    # trained-looking final-norm parameters, so re-applying them is actually tested
    final = model.base_model.ln_f if hasattr(model.base_model, "ln_f") else model.base_model.norm
    with torch.no_grad():
        final.weight.uniform_(0.5, 1.5)
        if getattr(final, "bias", None) is not None:
            final.bias.uniform_(-0.2, 0.2)
    probe = ragged_probe(seed=2, rows=16, max_len=24)
    assert probe.num_examples() > 10 * 16
    want = paper_reference(model, probe, norm(16))
    got = measure(model.double(), probe, batch_size=5)
    assert got.pr.shape == (5,) and got.n_tokens == probe.num_examples()
    # the last entry: Llama's own RMSNorm computes in float32 even in a float64 model
    np.testing.assert_allclose(got.pr[:-1].numpy(), want[:-1], rtol=0, atol=1e-8)
    np.testing.assert_allclose(
        got.pr[-1:].numpy(), want[-1:], rtol=0, atol=1e-8 if make is tiny_gpt2 else 1e-7
    )
    fit = fit_law(got.pr)
    assert got.fit == fit
    # a float32 model: the residual stream rounds at ~1e-7 but the norms run in float64, so
    # PR stays within ~1e-8 of the float64 reference (measured: <= 6.4e-9)
    got32 = measure(model.float(), probe, batch_size=16)
    np.testing.assert_allclose(got32.pr.numpy(), want, rtol=0, atol=1e-7)


def test_batch_size_and_padding_invariance(gpt2):
    probe = ragged_probe(seed=2, rows=16, max_len=24)  # > 10 examples per dimension
    one = measure(gpt2, probe, batch_size=1).pr
    for batch_size in (3, 7, 64):
        torch.testing.assert_close(
            measure(gpt2, probe, batch_size=batch_size).pr, one, rtol=0, atol=1e-6
        )
    padded = ProbeSet(
        torch.cat([probe.input_ids, torch.zeros(len(probe), 9, dtype=torch.long)], dim=1),
        torch.cat([probe.attention_mask, torch.zeros(len(probe), 9, dtype=torch.bool)], dim=1),
    )
    torch.testing.assert_close(measure(gpt2, padded, batch_size=3).pr, one, rtol=0, atol=1e-6)


def test_restores_modes_no_grad_no_logits(gpt2):
    probe = ragged_probe(seed=2, rows=16, max_len=24)
    gpt2.train()
    gpt2.transformer.h[1].eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in gpt2.named_modules()}
    widths = []
    gpt2.lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    snap = measure(gpt2, probe)
    assert {name: m.training for name, m in gpt2.named_modules()} == modes
    # the LM head ran for one position per sequence only: no (batch, length, vocab) logits
    assert widths and set(widths) == {1}
    assert all(p.grad is None for p in gpt2.parameters())
    assert not snap.pr.requires_grad and snap.seconds > 0
    record = snap.to_record()
    assert set(record) >= RECORD_KEYS


def test_restores_mode_when_measurement_fails(gpt2):
    gpt2.train()
    tiny = ProbeSet.from_tokens([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="Too few probe examples"):
        measure(gpt2, tiny)
    assert gpt2.training and gpt2.transformer.h[0].training


def test_vocab_fixture_is_small():
    assert VOCAB < 100


def _deep_gpt2(layers=6):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=layers, n_head=2)
    model = GPT2LMHeadModel(config)
    assert sum(p.numel() for p in model.parameters()) < 40_000
    return model


def test_layer_selection_measures_true_entries():
    model, probe = _deep_gpt2(), ragged_probe(seed=2, rows=16, max_len=24)
    full = measure(model, probe)
    assert full.layers == tuple(range(7)) and full.to_record()["layers"] == list(range(7))
    for layers, entries in [([1, 3, 6], (1, 3, 6)), (2, (0, 2, 4, 6)), ([-1, 4, 1], (1, 4, 6))]:
        snap = measure(model, probe, layers=layers)
        assert snap.layers == entries and snap.to_record()["layers"] == list(entries)
        torch.testing.assert_close(snap.pr, full.pr[list(entries)], rtol=0, atol=1e-12)
        # the fit runs on the true indices: x = entry - 1, entry 0 dropped (numpy reference)
        x = np.array([e for e in entries if e]) - 1.0
        slope, r = fit_line(x, snap.pr.numpy()[[i for i, e in enumerate(entries) if e]])
        assert snap.fit.slope == pytest.approx(slope, abs=1e-12)
        assert snap.fit.pearson_r == pytest.approx(r, abs=1e-12)
    stats = accumulate(model, probe, layers=[1, 3])
    assert (stats.num_layers, stats.layers) == (2, (1, 3))  # only those were accumulated


def test_layer_selection_errors():
    model, probe = _deep_gpt2(), ragged_probe(seed=2, rows=16, max_len=24)
    for bad in ([0, 7], [2, 2], [], 0, True, 1.5):
        with pytest.raises((ValueError, TypeError), match="layers"):
            measure(model, probe, layers=bad)
    with pytest.raises(ValueError, match="at least 3 layers"):
        measure(model, probe, layers=3)  # entries 0, 3, 6: two points to fit
    with pytest.raises(ValueError, match="Cannot merge"):
        plain = {"jackknife": None}  # one ResidualStats (merge is theirs)
        accumulate(model, probe, layers=[1, 2], **plain).merge(
            accumulate(model, probe, layers=[1, 3], **plain)
        )


def test_snapshot_from_stats_and_plain_construction():
    model, probe = _deep_gpt2(), ragged_probe(seed=2, rows=16, max_len=24)
    stats = accumulate(model, probe, layers=[1, 2, 5])
    snap = solve(stats, seconds=1.5, step=7)
    torch.testing.assert_close(snap.pr, stats.compute(), rtol=0, atol=0)
    assert snap.fit == fit_law(snap.pr, layers=[1, 2, 5]) and snap.step == 7
    assert snap.n_tokens == probe.num_examples() and snap.layers == (1, 2, 5)
    plain = Snapshot(pr=snap.pr, fit=snap.fit, n_tokens=1, seconds=0.0)  # as LawWatch builds it
    assert plain.layers == (0, 1, 2)
    with pytest.raises(ValueError, match="2 layers for 3 PR values"):
        Snapshot(pr=snap.pr, fit=snap.fit, n_tokens=1, seconds=0.0, layers=[1, 2])


def test_warns_when_examples_are_few_for_the_hidden_size(gpt2):
    probe = ragged_probe(seed=0, rows=12, max_len=24)
    assert 17 < probe.num_examples() < 160
    with pytest.warns(UserWarning, match=rf"{probe.num_examples()} examples for hidden size 16"):
        measure(gpt2, probe)


def test_probe_ids_beyond_the_vocabulary_are_named(gpt2):
    probe = ProbeSet.from_tokens([[1, 2, VOCAB + 3, 4] * 10])
    with pytest.raises(ValueError, match=rf"token id {VOCAB + 3}.*{VOCAB} rows"):
        measure(gpt2, probe)
