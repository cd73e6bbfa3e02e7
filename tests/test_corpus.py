import pytest
import torch

from lawwatch.demo.corpus import (
    Blocks,
    pack,
    pack_texts,
    pydoc_topics,
    python_texts,
    split_texts,
    stdlib_docstrings,
    train_tokenizer,
)


def test_python_ships_real_text():
    topics = pydoc_topics()
    assert len(topics) > 50 and sum(map(len, topics)) > 300_000
    docs = stdlib_docstrings(min_chars=400)
    assert len(docs) > 500 and all(len(d) >= 400 for d in docs)
    assert docs == stdlib_docstrings(min_chars=400)  # deterministic
    with pytest.raises(ValueError, match="Unknown source"):
        python_texts("wikipedia")


def test_split_is_deterministic_and_disjoint():
    texts = [f"doc {i}" for i in range(50)]
    train, held = split_texts(texts, heldout=0.2, seed=3)
    assert len(held) == 10 and len(train) == 40 and not set(train) & set(held)
    assert split_texts(texts, heldout=0.2, seed=3) == (train, held)
    with pytest.raises(ValueError, match="too few"):
        split_texts(["one"], heldout=0.5)


def test_tokenizer_round_trips():
    tok = train_tokenizer(pydoc_topics()[:20], vocab_size=600)
    assert len(tok) == 600 and tok.pad_token_id == tok.eos_token_id == 0
    text = "The law of equi-learning holds in every layer."
    assert tok.decode(tok(text)["input_ids"]) == text


def test_pack_concatenates_documents_with_eos_and_cuts_blocks():
    blocks = pack([[5, 6], [7, 8, 9], [4]], eos_id=0, seq_len=4)
    # stream 5 6 0 7 8 9 0 4 0: two blocks, the tail [0] dropped
    assert blocks.tolist() == [[5, 6, 0, 7], [8, 9, 0, 4]]
    assert blocks.dtype == torch.long
    with pytest.raises(ValueError, match="fewer than one block"):
        pack([[1, 2]], eos_id=0, seq_len=8)


def test_pack_texts_tokenizes_without_specials_and_blocks_feed_the_trainer():
    tok = train_tokenizer(pydoc_topics()[:5], vocab_size=400)
    texts = ["first document", "a second, longer document here"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    stream = [i for doc in ids for i in [*doc, tok.eos_token_id]]
    blocks = pack_texts(texts, tok, seq_len=3)
    assert blocks.tolist() == [stream[i : i + 3] for i in range(0, len(stream) // 3 * 3, 3)]
    data = Blocks(blocks)
    assert len(data) == blocks.shape[0]
    item = data[1]  # a causal LM's labels are its inputs (the model shifts them)
    assert torch.equal(item["input_ids"], blocks[1]) and torch.equal(item["labels"], blocks[1])
