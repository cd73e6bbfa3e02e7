"""Tiny real Hugging Face models built from explicit configs (no hub)."""

from __future__ import annotations

import os
import tempfile
import warnings

# Before any tracker package is imported (transformers imports comet_ml with its integrations):
# comet_ml would otherwise patch MLflow to mirror every MLflow run into a Comet experiment and
# report its own errors over the network; trackio reads its directory once, on import (a
# scratch one, not the user's cache).
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="lawwatch-trackio-"))

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from lawwatch import ProbeSet
from tests.wandb_offline import offline_wandb  # noqa: F401  (a fixture: offline W&B runs)

hf_logging.set_verbosity_error()
torch.set_num_threads(2)

VOCAB = 97
# what every history record (Snapshot.to_record, history.jsonl) holds at least (issue 3)
RECORD_KEYS = {"step", "pr", "rho", "pearson_r", "slope", "intercept", "r2", "n_tokens", "seconds"}


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=16,
        n_layer=4,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        **overrides,
    )
    model = GPT2LMHeadModel(config)
    # a misspelled config field would silently give a full-size model
    assert sum(p.numel() for p in model.parameters()) < 50_000
    return model


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) < 50_000
    return model


def ragged_probe(seed: int = 0, rows: int = 12, max_len: int = 24) -> ProbeSet:
    """Right-padded sequences of different lengths (some of length 1: no example)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (rows,), generator=gen).tolist()
    lengths[0], lengths[1] = max_len, 1
    seqs = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    with warnings.catch_warnings():  # the length-1 row is deliberate
        warnings.simplefilter("ignore")
        return ProbeSet.from_tokens(seqs)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test. Tiny models run tiny ops (RWKV and Mamba loop over
    tokens on CPU): on a busy 2-core machine a second thread makes each op wait for the other
    core, measured at 2.7 s instead of 5 ms for one tiny RWKV forward."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def probe() -> ProbeSet:
    return ragged_probe()


def char_tokenizer():
    """A small byte-level BPE trained here (no hub), wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the law of equi-learning", "each layer cuts the residual", "by the same factor"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)
