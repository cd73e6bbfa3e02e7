"""Statistics made inside the hooks (Capture.stream), against the path that keeps every entry.

The reference is the path every earlier test checked against numpy: all measured entries of a
batch kept (``tests.helpers.kept``: its own hooks), their float64 features made and added with
``ResidualStats.update``. The streamed path must give the same PRs (to rounding, 1e-12),
hand on one entry at a time, make the final norm's reading before the first batch, and fail
the way the old path failed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lawwatch import measure
from lawwatch.capture import Capture, evaluating
from lawwatch.measurement import accumulate
from lawwatch.norms import NormSpec
from lawwatch.probe import example_mask, example_targets
from lawwatch.stats.residual import ResidualStats
from lawwatch.stats.update import BatchUpdate
from tests.helpers.kept import kept_features
from tests.helpers.models import FAMILIES, NanoGPT, build, ragged_probe
from tests.helpers.reference import ols_pr

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:The probe gives"),  # small probes: deliberate
]


def kept_path(model, probe, batch_size=4, target="token_id", offset=1, **capture_options):
    """PRs through the path that keeps every entry of a batch (the earlier default)."""
    capture = Capture(model, **capture_options)
    normalize = capture_options.get("normalize", "auto")
    ids_all = probe.target_ids() if target == "onehot" else None
    stats = None
    with evaluating(model):
        for ids, mask in probe.batches(batch_size):
            positions = example_mask(mask, offset)
            features = kept_features(capture, ids, mask, positions, normalize)
            y = example_targets(ids, offset)[positions]
            if stats is None:
                stats = ResidualStats(
                    features.shape[0],
                    features.shape[2],
                    target=target,
                    classes=ids_all,
                    layers=capture.layers,
                )
            stats.update(features, y)
    return stats.compute()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
@pytest.mark.parametrize(
    "options",
    [{}, {"layers": [1, 2]}, {"layers": [0, 3]}, {"normalize": "standardize"}, {"offset": 0}],
)
def test_streamed_equals_keeping_every_entry(family, options):
    if family not in FAMILIES:
        pytest.skip(f"{family} is not among the test families")
    model = build(family).double()  # float64: any difference is the path's, not rounding
    probe = ragged_probe(seed=11, rows=14, max_len=24)
    streamed = accumulate(model, probe, batch_size=4, **options).compute()
    kept = kept_path(model, probe, **options)
    np.testing.assert_allclose(streamed.numpy(), kept.numpy(), rtol=0, atol=1e-12)


def test_streamed_equals_numpy_on_one_batch():
    """Entries by hand (hooks-free) through numpy's lstsq: the streamed measurement's bar."""
    model = build("gpt2").double()
    probe = ragged_probe(seed=12, rows=14, max_len=24)
    streamed = measure(model, probe, batch_size=len(probe)).pr.numpy()
    capture = Capture(model)
    ids, mask = next(probe.batches(len(probe)))
    positions = example_mask(mask)
    with evaluating(model):
        features = kept_features(capture, ids, mask, positions).numpy()
    y = example_targets(ids)[positions].numpy().astype(np.float64)
    want = [ols_pr(f, y) for f in features]
    np.testing.assert_allclose(streamed, want, rtol=0, atol=1e-8)


def test_onehot_and_float32_streamed_equal_the_kept_path():
    model = build("llama")  # float32 weights: float64 features made from float32 states
    probe = ragged_probe(seed=13, rows=14, max_len=24)
    streamed = measure(model, probe, batch_size=5, target="onehot").pr
    kept = kept_path(model, probe, batch_size=5, target="onehot")
    np.testing.assert_allclose(streamed.numpy(), kept.numpy(), rtol=0, atol=1e-12)


def test_one_entry_at_a_time_and_one_calibration(monkeypatch):
    """Every add carries one entry; the final norm is read once, off a short forward."""
    model = build("gpt2")
    probe = ragged_probe(seed=14, rows=14, max_len=24)
    shapes, forwards = [], []
    original = BatchUpdate.add

    def recording(self, part, features, *, owned=False):
        shapes.append(tuple(features.shape))
        return original(self, part, features, owned=owned)

    monkeypatch.setattr(BatchUpdate, "add", recording)
    handle = model.register_forward_pre_hook(
        lambda _m, args, kwargs: forwards.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        measure(model, probe, batch_size=4)
    finally:
        handle.remove()
    batches = -(-len(probe) // 4)
    assert len(forwards) == batches + 1  # one short calibration forward
    assert forwards[0][0] == 1 and forwards[0][1] <= 64
    assert all(s[0] == 1 for s in shapes)  # one entry per call, never all of them at once
    assert len(shapes) == batches * (len(model.transformer.h) + 1)


def test_no_calibration_when_the_norm_is_given():
    model = NanoGPT()
    probe = ragged_probe(seed=15, rows=8, max_len=24)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        measure(model, probe, blocks="transformer.h", final_norm=NormSpec("layernorm", 1e-5))
    finally:
        handle.remove()
    assert len(calls) == -(-len(probe) // 8)


def test_nonfinite_states_fail_after_the_forward_with_the_old_message():
    model = build("gpt2")
    probe = ragged_probe(seed=16, rows=8, max_len=24)
    seen = []

    def poison(_m, _args, output):
        seen.append(1)
        out = output[0] if isinstance(output, tuple) else output
        out[0, 0, 0] = float("nan")

    handle = model.transformer.h[1].register_forward_hook(poison)
    after = model.transformer.h[-1].register_forward_hook(lambda *_: seen.append(2))
    try:
        with pytest.raises(ValueError, match=r"The hidden states of .* contain NaN or Inf"):
            measure(model, probe, batch_size=4)
    finally:
        handle.remove()
        after.remove()
    assert 2 in seen  # the forward ran to its end before anything was raised


def test_a_raising_callback_never_breaks_the_forward():
    """What the callback raises is raised after the forward, which completes (collectives)."""
    model = build("gpt2")
    capture = Capture(model)
    probe = ragged_probe(seed=17, rows=6, max_len=24)
    ids, mask = next(probe.batches(6))
    positions = example_mask(mask)
    done = []
    handle = model.transformer.ln_f.register_forward_hook(lambda *_: done.append(1))

    def add(index, features):
        raise KeyError(f"entry {index}")

    try:
        with evaluating(model):
            capture.calibrate(ids, mask, example_mask(mask))
            with pytest.raises(KeyError, match="entry 0"):
                capture.stream(ids, mask, positions, add)
    finally:
        handle.remove()
    assert done == [1, 1]  # the calibration, then the whole streamed forward
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_a_norm_that_changes_between_batches_is_refused():
    model = build("gpt2")
    probe = ragged_probe(seed=18, rows=8, max_len=24)
    norm = model.transformer.ln_f
    calls = []

    def drift(_m, _args, output):
        calls.append(1)
        if len(calls) > 2:  # calibration and first batch agree; then the eps changes
            return output * 1.5

    handle = norm.register_forward_hook(drift)
    try:
        with pytest.raises(TypeError, match="no longer matches"):
            measure(model, probe, batch_size=4)
    finally:
        handle.remove()


def test_errors_list_discards_a_failed_batch_and_keeps_the_forwards():
    """accumulate(errors=...): the failing batch is recorded, later forwards still run."""
    model = build("gpt2")
    probe = ragged_probe(seed=19, rows=12, max_len=24)
    calls = []
    state = {"batch": 0}

    def poison(_m, _args, output):
        calls.append(1)
        state["batch"] += 1
        if state["batch"] == 3:  # the calibration is call 1: poison the second batch
            out = output[0] if isinstance(output, tuple) else output
            out[:, :, 0] = float("inf")

    handle = model.transformer.h[0].register_forward_hook(poison)
    errors: list[BaseException] = []
    try:
        accumulate(model, probe, batch_size=4, errors=errors)
    finally:
        handle.remove()
    assert len(errors) == 1 and "NaN or Inf" in str(errors[0])
    assert len(calls) == 1 + 3  # calibration + every batch's forward


def test_stream_batch_without_examples():
    model = build("gpt2")
    capture = Capture(model)
    ids = torch.randint(1, 50, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.long)
    got = []
    with evaluating(model):
        capture.calibrate(ids, mask, example_mask(mask))  # nothing to read: no tokens
        capture.stream(ids, mask, example_mask(mask), lambda i, f: got.append(f.shape))
    assert got == [(0, model.config.n_embd)] * (len(model.transformer.h) + 1)
