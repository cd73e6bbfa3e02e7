"""``entries="hidden_states"`` numbers entries as the model's ``output_hidden_states`` does.

Mamba's and RWKV's hidden states omit the embeddings (block outputs, then the final norm's
output); the authors' numbers for them come from that sequence. Checked against
``output_hidden_states`` of tiny float64 models and a numpy lstsq reference.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers as tf

from lawwatch import measure
from lawwatch.probe import ProbeSet, example_mask, example_targets
from tests.helpers.reference import layer_norm, ols_pr, rms_norm

VOCAB = 64


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "mamba":
        config = tf.MambaConfig(
            vocab_size=VOCAB, hidden_size=8, state_size=4, num_hidden_layers=4, expand=2
        )
        model = tf.MambaForCausalLM(config)
    elif family == "rwkv":
        config = tf.RwkvConfig(
            vocab_size=VOCAB,
            hidden_size=8,
            num_hidden_layers=4,
            attention_hidden_size=8,
            intermediate_size=16,
            context_length=32,
            rescale_every=0,  # eval-mode halving would make hooks and hidden_states differ
        )
        model = tf.RwkvForCausalLM(config)
    else:
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=8, n_layer=4, n_head=2)
        )
    assert sum(p.numel() for p in model.parameters()) < 20_000  # tiny, as intended
    return model.double().eval()


def probe() -> ProbeSet:
    gen = torch.Generator().manual_seed(1)
    return ProbeSet.from_tokens(torch.randint(1, VOCAB, (6, 20), generator=gen).tolist())


def reference(model, probe: ProbeSet, normalize: str) -> np.ndarray:
    """PR of every entry of ``output_hidden_states`` (the last used as it is), numpy lstsq."""
    with torch.no_grad():
        hidden = model(
            probe.input_ids, attention_mask=probe.attention_mask, output_hidden_states=True
        ).hidden_states
    positions = example_mask(probe.attention_mask, 1)
    y = example_targets(probe.input_ids, 1)[positions].numpy().astype(np.float64)
    eps = model.config.layer_norm_epsilon
    fresh = rms_norm if isinstance(model, tf.MambaForCausalLM) else layer_norm
    out = []
    for k, h in enumerate(hidden):
        x = h[positions].numpy()
        if k < len(hidden) - 1 and normalize == "auto":
            x = fresh(x, eps)
        out.append(ols_pr(x, y))
    return np.array(out)


@pytest.mark.parametrize("family", ["mamba", "rwkv", "gpt2"])
@pytest.mark.parametrize("normalize", ["auto", "none"])
def test_hidden_states_entries_match_output_hidden_states(family, normalize, one_thread):
    model, p = tiny(family), probe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few examples per dimension: deliberate
        got = measure(model, p, normalize=normalize, entries="hidden_states").pr.numpy()
        hooks = measure(model, p, normalize=normalize).pr.numpy()
    want = reference(model, p, normalize)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)
    if family == "gpt2":  # its hidden states start with the embeddings: the same numbering
        np.testing.assert_array_equal(got, hooks)
    else:  # hooks: entry 0 is the embeddings, entries 1.. the blocks (shifted by one)
        np.testing.assert_allclose(got[:-2], hooks[1:-1], rtol=0, atol=0)
        assert abs(got[0] - hooks[0]) > 1e-6
