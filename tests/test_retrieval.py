"""The synthetic retrieval probe and the logit lens alone (docs/retrieval.md).

Every number is checked against ``tests/helpers/lens_reference.py`` (full float64 logits of
every entry through the final norm and head), on a tiny GPT-2 trained here for a few steps on
the probe's texts (so the answers are sometimes right and the first-correct / final depths are
not all "never").
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import lawwatch
from lawwatch import ProbeSet
from lawwatch.probe.retrieval import (
    KEYS,
    POSITIONS,
    position_names,
    queried_index,
    retrieval_probe,
    retrieval_texts,
)
from tests.helpers.lens_reference import lens_reference

PASSAGES, PER_POSITION = 5, 8
STEPS = 30  # Adam steps on the probe's texts: some answers right, some not
LENS_FIELDS = ("top1", "ce", "kl", "entropy")
DEPTH_FIELDS = ("first_correct", "final", "examples")
MEANS = ("first_correct_mean", "final_mean", "gap_mean")


def _tokenizer():
    """A byte-level BPE trained here on retrieval contexts (no hub): a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [item.text for item in retrieval_texts(passages=5, per_position=20, seed=99)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok), tok


@pytest.fixture(scope="module")
def tokenizers():
    return _tokenizer()


@pytest.fixture(scope="module")
def tokenizer(tokenizers):
    return tokenizers[0]


@pytest.fixture(scope="module")
def probe(tokenizer):
    return ProbeSet.retrieval(tokenizer, passages=PASSAGES, per_position=PER_POSITION, seed=0)


@pytest.fixture(scope="module")
def model(tokenizer, probe):
    """A tiny float64 GPT-2, trained a little on the probe's own texts (answers partly right)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=16,
        n_layer=4,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    labels = probe.input_ids.masked_fill(~probe.attention_mask, -100)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend
    try:
        for _ in range(STEPS):
            loss = model(
                probe.input_ids, attention_mask=probe.attention_mask.long(), labels=labels
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.double().eval()


def answer_rows(probe: ProbeSet, sequences) -> list[tuple[int, int]]:
    """(sequence, position) of the examples predicting a marked token, written as a loop."""
    mask = probe.attention_mask.numpy()
    marked = probe.target_mask.numpy()
    rows = []
    for s in sequences:
        for j in range(mask.shape[1] - 1):
            if mask[s, j] and mask[s, j + 1] and marked[s, j + 1]:
                rows.append((s, j))
    return rows


def assert_lens_equal(mine: dict, ref: dict, tol: float) -> None:
    for name in LENS_FIELDS:
        np.testing.assert_allclose(mine[name], ref[name], rtol=0, atol=tol, err_msg=name)
    for name in DEPTH_FIELDS:
        assert mine[name] == ref[name], name
    for name in MEANS:
        if ref[name] is None:
            assert mine[name] is None, name
        else:
            assert mine[name] == pytest.approx(ref[name], abs=tol), name


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PR is noisy on a probe of so few examples
        return function(*args, **kwargs)


# -- the probe ------------------------------------------------------------------------------


def test_texts_are_deterministic_and_place_the_queried_passage():
    items = retrieval_texts(passages=PASSAGES, per_position=PER_POSITION, seed=3)
    assert items == retrieval_texts(passages=PASSAGES, per_position=PER_POSITION, seed=3)
    assert items != retrieval_texts(passages=PASSAGES, per_position=PER_POSITION, seed=4)
    assert [i.group for i in items] == [g for g in POSITIONS for _ in range(PER_POSITION)]
    where = {"beginning": 0, "middle": 2, "end": 4}
    passage = re.compile(r"The code of (\w+) is (\d+)\.")
    for item in items:
        found = passage.findall(item.text)
        assert len(found) == PASSAGES
        keys, values = zip(*found, strict=True)
        assert len(set(keys)) == PASSAGES and len(set(values)) == PASSAGES
        assert set(keys) <= set(KEYS)
        assert all(10 <= int(v) <= 99 for v in values)
        assert item.queried == where[item.group]
        assert found[item.queried] == (item.key, item.value)
        assert item.text.endswith(f"Question: what is the code of {item.key}? Answer: {item.value}")
        start, end = item.answer
        assert item.text[start:end] == item.value and end == len(item.text)


def test_more_positions_spread_the_queried_passage_evenly():
    assert position_names(5) == tuple(f"position_{i}" for i in range(5))
    assert [queried_index(p, 5, 5) for p in range(5)] == [0, 1, 2, 3, 4]
    assert [queried_index(p, 3, 4) for p in range(3)] == [0, 2, 3]  # 1.5 rounds up
    assert [queried_index(p, 3, 7) for p in range(3)] == [0, 3, 6]
    assert [queried_index(p, 2, 6) for p in range(2)] == [0, 5]
    items = retrieval_texts(passages=9, per_position=2, positions=5, seed=1)
    assert [i.queried for i in items] == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8]
    assert [i.group for i in items][::2] == list(position_names(5))


def test_the_probe_marks_exactly_the_answer_tokens(tokenizer, probe):
    items = retrieval_texts(passages=PASSAGES, per_position=PER_POSITION, seed=0)
    assert probe.groups == [i.group for i in items]
    assert probe.group_names == POSITIONS
    assert probe.meta["retrieval"]["queried"] == [i.queried for i in items]
    assert probe.meta["source"] == "retrieval"
    for s, item in enumerate(items):
        encoded = tokenizer(item.text, add_special_tokens=False, return_offsets_mapping=True)
        n = len(encoded["input_ids"])
        assert probe.input_ids[s, :n].tolist() == encoded["input_ids"]
        assert probe.attention_mask[s].sum() == n
        start, end = item.answer
        expected = [lo < end and start < hi for lo, hi in encoded["offset_mapping"]]
        assert probe.target_mask[s, :n].tolist() == expected
        assert not probe.target_mask[s, n:].any()
        marked = probe.input_ids[s, :n][probe.target_mask[s, :n]]
        assert tokenizer.decode(marked).strip() == item.value
        assert probe.target_mask[s, n - 1]  # the answer ends the sequence
    # every example is an answer token: as many examples as marked tokens after the first
    assert probe.num_examples() == int(probe.target_mask[:, 1:].sum())
    assert probe.group_examples() == {
        g: len(answer_rows(probe, [s for s, i in enumerate(items) if i.group == g]))
        for g in POSITIONS
    }


def test_entry_points_agree_and_the_file_round_trips(tokenizer, probe, tmp_path):
    again = lawwatch.probe.retrieval_probe(tokenizer, passages=PASSAGES, per_position=PER_POSITION)
    assert again.content_hash() == probe.content_hash()
    assert ProbeSet.retrieval(tokenizer, seed=1).content_hash() != probe.content_hash()
    longest = int(probe.attention_mask.sum(dim=1).max())
    assert probe.input_ids.shape[1] == longest  # default max_length: the longest context
    padded = retrieval_probe(tokenizer, passages=PASSAGES, per_position=PER_POSITION, max_length=90)
    assert padded.meta["max_length"] == 90 and padded.num_examples() == probe.num_examples()
    loaded = ProbeSet.load(probe.save(tmp_path / "retrieval.safetensors"))
    assert loaded.content_hash() == probe.content_hash()
    assert loaded.meta["retrieval"] == probe.meta["retrieval"]


def test_probe_build_retrieval_writes_the_same_probe(tokenizer, probe, tmp_path, capsys):
    from lawwatch import cli

    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "r.safetensors"
    argv = ["probe", "build", "--retrieval", "--tokenizer", str(tmp_path / "tok"), "--out"]
    assert cli.main([*argv, str(out), "--per-position", str(PER_POSITION)]) == 0
    assert "group middle" in capsys.readouterr().out
    assert ProbeSet.load(out).content_hash() == probe.content_hash()
    assert cli.main([*argv, str(out), "--positions", "5", "--passages", "6", "--seed", "2"]) == 0
    built = ProbeSet.load(out)
    assert built.group_names == position_names(5)
    assert built.meta["retrieval"]["queried"][::8] == [0, 1, 3, 4, 5]
    # refused: another source, no tokenizer, a max length too short
    assert cli.main([*argv, str(out), "--texts", "a.txt"]) == 2
    assert "leave out --texts" in capsys.readouterr().err
    assert cli.main(["probe", "build", "--retrieval", "--out", str(out)]) == 2
    assert "--retrieval needs --tokenizer" in capsys.readouterr().err
    assert cli.main([*argv, str(out), "--max-length", "10"]) == 2
    assert "max_length=10 is too short" in capsys.readouterr().err


def test_refusals_name_the_problem_and_the_fix(tokenizer, tokenizers, tmp_path):
    from transformers import CTRLTokenizer

    with pytest.raises(ValueError, match="'middle' needs a passage strictly between"):
        retrieval_texts(passages=2)
    with pytest.raises(ValueError, match="passages >= 5"):
        retrieval_texts(passages=4, positions=5)
    with pytest.raises(ValueError, match="at most 30 passages"):
        retrieval_texts(passages=31)
    with pytest.raises(ValueError, match="per_position must be a positive int"):
        retrieval_texts(per_position=0)
    with pytest.raises(ValueError, match="positions must be an int of at least 2"):
        retrieval_texts(positions=1)
    with pytest.raises(ValueError, match=r"max_length=20 is too short.*at least \d+"):
        ProbeSet.retrieval(tokenizer, max_length=20)
    # a BPE tokenizer of the Python backend (no Rust one): no character offsets
    tokenizers[1].model.save(str(tmp_path))
    slow = CTRLTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert not slow.is_fast
    with pytest.raises(ValueError, match=r"need a fast tokenizer.*use_fast=True"):
        ProbeSet.retrieval(slow)


# -- the measurement ------------------------------------------------------------------------


def test_the_gap_per_position_equals_the_reference(model, probe, one_thread):
    record = lawwatch.measure_lens(model, probe, lens=1.0, by_group=True, position_buckets=4)
    assert "pr" not in record and "pearson_r" not in record
    rows = answer_rows(probe, range(len(probe)))
    assert record["n_tokens"] == len(rows)
    assert_lens_equal(record["lens"], lens_reference(model, probe, rows=rows), 1e-12)
    gaps = []
    for group in POSITIONS:
        mine = [s for s, g in enumerate(probe.groups) if g == group]
        ref = lens_reference(model, probe, rows=answer_rows(probe, mine))
        entry = record["groups"][group]
        assert entry["n_tokens"] == ref["examples"] == len(answer_rows(probe, mine))
        assert_lens_equal(entry["lens"], ref, 1e-12)
        gaps.append(entry["lens"]["gap_mean"])
    # the model was trained on these texts: some answers are right, the gap is a number
    assert any(g is not None for g in gaps)
    assert sum(record["groups"][g]["lens"]["first_correct"][-1] for g in POSITIONS) < len(rows)
    # the share of answer tokens the model itself gets right: the last entry's top-1
    assert record["lens"]["top1"][-1] > 0
    # position buckets: the answers sit in the last quarter of each sequence
    buckets = record["positions"]
    assert [buckets[b]["examples"] for b in ("0-25", "25-50", "50-75")] == [0, 0, 0]
    assert_lens_equal(buckets["75-100"], lens_reference(model, probe, rows=rows), 1e-12)


def test_lens_only_equals_the_lens_of_the_full_measurement(model, probe, one_thread):
    # the answers end each sequence: the final norm's calibration reads them (not a prefix)
    options = {"lens": 1.0, "by_group": True, "position_buckets": 3}
    full = quiet(lawwatch.measure, model, probe, **options)
    alone = lawwatch.measure_lens(model, probe, **options)
    assert full.n_tokens == alone["n_tokens"] > model.config.n_embd + 1
    assert list(full.layers) == alone["layers"]
    assert_lens_equal(alone["lens"], full.extra["lens"], 1e-12)
    for group in POSITIONS:
        mine, theirs = alone["groups"][group], full.extra["groups"][group]
        assert_lens_equal(mine["lens"], theirs["lens"], 1e-12)
        assert mine["n_tokens"] == theirs["n_tokens"]
    for label, lens in full.extra["positions"].items():
        assert_lens_equal(alone["positions"][label], lens, 1e-12)
    assert alone["probe"] == full.extra["probe"] == probe.content_hash()
    assert alone["config"] == full.extra["config"]


def test_lens_only_needs_no_minimum_of_examples_and_refuses_what_it_cannot_measure(
    model, probe, one_thread
):
    few = probe.select([0, 8, 16])  # one context per position: fewer examples than d + 1
    assert few.num_examples() <= model.config.n_embd + 1
    with pytest.raises(ValueError, match="Too few probe examples"):
        lawwatch.measure(model, few, lens=1.0)
    record = lawwatch.measure_lens(model, few, lens=1.0, by_group=True)
    rows = answer_rows(few, range(len(few)))
    assert_lens_equal(record["lens"], lens_reference(model, few, rows=rows), 1e-12)
    assert sorted(record["groups"]) == sorted(POSITIONS)
    refused = {
        "lens is None": {},
        "split=0.5 is an option of the law": {"lens": 1.0, "split": 0.5},
        "metric='separation_fuzziness' is an option of the law": {
            "lens": 1.0,
            "metric": "separation_fuzziness",
        },
        "target='onehot' is an option of the law": {"lens": 1.0, "target": "onehot"},
        "jackknife=4 gives the law's standard errors": {"lens": 1.0, "jackknife": 4},
        "layers holds 99": {"lens": 1.0, "layers": (99,)},  # the model checked before a forward
        "lens_head='nope' is not a module": {"lens": 1.0, "lens_head": "nope"},
    }
    for message, options in refused.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            lawwatch.measure_lens(model, probe, **options)
    plain = ProbeSet.from_tokens(probe.input_ids[:2, :10].tolist())
    with pytest.raises(ValueError, match="the probe carries no groups"):
        lawwatch.measure_lens(model, plain, lens=1.0, by_group=True)
    with pytest.raises(ValueError, match=r"vocabulary|token id"):
        lawwatch.measure_lens(model, ProbeSet.from_tokens([[1, 2, 10_000]]), lens=1.0)
