import pytest

from lawwatch.corpus import (
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
