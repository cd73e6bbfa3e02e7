"""What lawwatch knows about wrappers and families, and the probe checked where it meets the
model: every probe a model cannot run is refused before any forward, with the fix."""

import warnings

import pytest
import torch
import transformers as tf
from torch import nn

from lawwatch import ProbeSet, measure
from lawwatch.models import (
    accepts,
    check_probe,
    clean_name,
    embedding_rows,
    max_positions,
    measured_module,
)
from tests.helpers.models import VOCAB, NanoGPT, ragged_probe, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(rows: int, length: int, seed: int = 0) -> ProbeSet:
    gen = torch.Generator().manual_seed(seed)
    return ProbeSet.from_tokens(torch.randint(1, VOCAB, (rows, length), generator=gen))


def short_gpt2(positions: int) -> tf.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=VOCAB, n_positions=positions, n_embd=16, n_layer=3, n_head=2)
    model = tf.GPT2LMHeadModel(config)
    assert sum(p.numel() for p in model.parameters()) < 20_000
    return model


# -- positions ----------------------------------------------------------------------------------


def test_probe_longer_than_the_models_positions_is_refused_with_the_fix():
    """GPT-2 with 32 positions and a 64-token probe: a bare IndexError at every snapshot
    before; now one error that names the limit, where it is read and the fix."""
    model = short_gpt2(32)
    with pytest.raises(
        ValueError, match=r"64 tokens.*at most 32 positions \(config\.n_positions\)"
    ):
        measure(model, tokens(8, 64))
    with pytest.raises(ValueError, match=r"max_length=32.*seq_len=32"):
        measure(model, tokens(8, 64))
    # the fix: sequences of the model's length run
    assert measure(model, tokens(8, 32)).pr.shape == (4,)


def test_the_monitor_checks_the_whole_probe_before_training():
    """Every rank decides alike: the long rows sit in rank 1's shard only, and the monitor
    refuses the whole probe when it is built, before any rank runs its shard."""
    from lawwatch import LawWatch

    rows = [list(range(1, 9))] * 4 + [list(range(1, 41))] * 4
    probe = ProbeSet.from_tokens(rows)
    model = short_gpt2(32)
    check_probe(model, probe.shard(0, 2))  # rank 0's shard alone would pass
    with pytest.raises(ValueError, match="40 tokens"):
        LawWatch(model, probe)


def test_where_the_position_limit_is_read():
    assert max_positions(tiny_gpt2()) == (64, "config.n_positions")
    assert max_positions(tiny_llama()) == (64, "config.max_position_embeddings")
    with pytest.raises(ValueError, match=r"config\.max_position_embeddings"):
        check_probe(tiny_llama(), tokens(2, 65))
    assert max_positions(NanoGPT()) == (32, "the position embedding 'transformer.wpe'")
    # recurrent families have no limit; RWKV's context_length (an alias of
    # max_position_embeddings in its config) limits no CPU forward
    mamba = tf.MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2)
    assert max_positions(tf.MambaForCausalLM(mamba)) is None
    rwkv = tf.RwkvConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=3,
        attention_hidden_size=16,
        intermediate_size=32,
        context_length=8,
        rescale_every=0,
    )
    model = tf.RwkvForCausalLM(rwkv)
    assert model.config.max_position_embeddings == 8 and max_positions(model) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few examples for the hidden size
        assert measure(model, tokens(4, 24)).pr.shape == (4,)


def test_custom_module_longer_than_its_position_table():
    with pytest.raises(
        ValueError, match=r"at most 32 positions \(the position embedding 'transformer\.wpe'\)"
    ):
        measure(NanoGPT(), tokens(8, 40), blocks="transformer.h")


# -- token ids ----------------------------------------------------------------------------------


def test_negative_ids_are_refused_where_the_probe_is_built():
    """-100 (label padding) was accepted and failed later with a bare IndexError."""
    ids = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
    with pytest.raises(ValueError, match=r"3 negative token ids.*-100, at sequence 0, position 3"):
        ProbeSet.from_tokens(ids)
    with pytest.raises(ValueError, match="label padding"):
        ProbeSet.from_tokens([[5, 6, -1]])
    with pytest.raises(ValueError, match="attention_mask=0"):
        ProbeSet(ids, torch.ones_like(ids))
    # -100 where the mask says padding is padding: kept out, stored as 0
    probe = ProbeSet.from_tokens(ids, ids >= 0)
    assert probe.input_ids.tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]


def test_ids_beyond_a_custom_modules_vocabulary_are_named():
    with pytest.raises(
        ValueError, match=rf"token id {VOCAB + 5}.*{VOCAB} rows.*'transformer\.wte'"
    ):
        measure(NanoGPT(), ProbeSet.from_tokens([[1, 2, VOCAB + 5] * 8]), blocks="transformer.h")


def test_where_the_vocabulary_is_read():
    assert embedding_rows(tiny_gpt2()) == (VOCAB, "get_input_embeddings()")
    assert embedding_rows(NanoGPT()) == (VOCAB, "the embedding 'transformer.wte'")

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(11, 4)

    class Two(One):
        def __init__(self):
            super().__init__()
            self.other = nn.Embedding(50, 4)  # positions? segments? no guess is made

    assert embedding_rows(One()) == (11, "the embedding 'table'")
    assert embedding_rows(Two()) is None and max_positions(Two()) is None
    check_probe(Two(), tokens(2, 80))  # nothing known, nothing refused


# -- wrappers -----------------------------------------------------------------------------------


def test_wrappers_are_stripped_and_their_names_cleaned():
    model = tiny_gpt2()
    assert measured_module(nn.DataParallel(model)) is model  # on CPU: keeps the module
    assert measured_module(torch.compile(model)) is model  # compiled lazily: nothing runs
    assert clean_name("_fsdp_wrapped_module.transformer._orig_mod.h.0") == "transformer.h.0"
    assert accepts(model, "logits_to_keep") and not accepts(NanoGPT(), "logits_to_keep")


def test_a_probe_that_fits_passes_unchanged():
    probe = ragged_probe()
    check_probe(tiny_gpt2(), probe)
    check_probe(NanoGPT(), probe)
