"""`lawwatch probe build` and `lawwatch probe show`, and the ProbeSpec behind them."""

import json
import logging
import sys
import warnings

import numpy as np
import pytest

from lawwatch import ProbeSet, cli
from lawwatch.demo.corpus import pydoc_topics
from lawwatch.probe.spec import ProbeSpec, read_texts
from tests.helpers.gguf_files import write_gguf
from tests.helpers.models import char_tokenizer


@pytest.fixture
def tokenizer_dir(tmp_path):
    path = tmp_path / "tokenizer"
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    topics = pydoc_topics()
    (folder / "a.txt").write_text(topics[0])
    (folder / "sub" / "b.txt").write_text(topics[1] + "\n\n" + topics[2])
    return folder, topics


def test_build_from_texts_and_show(tmp_path, tokenizer_dir, docs, capsys):
    folder, topics = docs
    out = tmp_path / "probe.safetensors"
    argv = ["probe", "build", "--texts", str(folder / "**" / "*.txt"), "--out", str(out)]
    argv += ["--tokenizer", str(tokenizer_dir), "--max-length", "32", "--text-unit", "paragraph"]
    argv += ["--num-texts", "20", "--seed", "4"]
    assert cli.main(argv) == 0
    built = capsys.readouterr().out
    probe = ProbeSet.load(out)
    assert probe.content_hash() in built and "20 sequences" in built
    # the same probe, built by hand: glob order sorted, paragraphs split at blank lines
    paragraphs = [
        p.strip()
        for text in (topics[0], topics[1] + "\n\n" + topics[2])
        for p in text.split("\n\n")
        if p.strip()
    ]
    expected = ProbeSet.from_texts(
        paragraphs, char_tokenizer(), max_length=32, num_texts=20, seed=4
    )
    assert probe.content_hash() == expected.content_hash()
    assert probe.meta["spec"]["text_unit"] == "paragraph" and probe.meta["source"] == "texts"

    assert cli.main(["probe", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert probe.content_hash() in shown and "lawwatch.probe/2" in shown
    assert f"sequences                   {len(probe)}" in shown
    assert cli.main(["probe", "show", str(out), "--json", "--offset", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["content_hash"] == probe.content_hash()
    assert data["summary"] == probe.summary(2) and data["meta"] == probe.meta


def test_build_from_a_saved_dataset(tmp_path, tokenizer_dir):
    datasets = pytest.importorskip("datasets")
    texts = pydoc_topics()[:30]
    data = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": texts[:10]}),
            "validation": datasets.Dataset.from_dict({"body": texts[10:]}),
        }
    )
    data.save_to_disk(tmp_path / "ds")
    out = tmp_path / "probe.safetensors"
    argv = ["probe", "build", "--dataset", str(tmp_path / "ds"), "--text-column", "body"]
    argv += ["--tokenizer", str(tokenizer_dir), "--max-length", "16", "--out", str(out)]
    assert cli.main([*argv, "--dataset-split", "validation", "--num-texts", "8"]) == 0
    expected = ProbeSet.from_texts(texts[10:], char_tokenizer(), max_length=16, num_texts=8)
    probe = ProbeSet.load(out)
    assert probe.content_hash() == expected.content_hash()
    assert probe.meta["source"] == "dataset" and probe.meta["dataset_rows"] == 20
    assert cli.main(argv) == 2  # a DatasetDict needs a split, and the message lists them


def test_build_from_a_token_file(tmp_path, capsys):
    stream = np.arange(1000, dtype=np.uint16) % 97
    stream.tofile(tmp_path / "val.bin")
    out = tmp_path / "probe.safetensors"
    argv = ["probe", "build", "--token-file", str(tmp_path / "val.bin"), "--out", str(out)]
    assert cli.main([*argv, "--max-length", "64", "--num-texts", "5", "--seed", "1"]) == 2
    assert "raw binary file" in capsys.readouterr().err  # the dtype is needed
    argv += ["--token-dtype", "uint16", "--max-length", "64", "--num-texts", "5", "--seed", "1"]
    assert cli.main(argv) == 0
    expected = ProbeSet.from_token_file(
        tmp_path / "val.bin", seq_len=64, num_sequences=5, seed=1, dtype="uint16"
    )
    assert ProbeSet.load(out).content_hash() == expected.content_hash()


def test_bad_input_says_what_to_do(tmp_path, tokenizer_dir, capsys):
    out = ["--out", str(tmp_path / "p.safetensors")]
    assert cli.main(["probe", "build", *out]) == 2
    assert "No probe source" in capsys.readouterr().err
    assert cli.main(["probe", "build", "--texts", "a.txt", "--dataset", "d", *out]) == 2
    assert "one probe source, not texts and dataset" in capsys.readouterr().err
    assert cli.main(["probe", "build", "--texts", str(tmp_path / "*.none"), *out]) == 2
    assert "No text file matches" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("some text here")
    assert cli.main(["probe", "build", "--texts", str(tmp_path / "a.txt"), *out]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    assert cli.main(["probe", "show", str(tmp_path / "bad.safetensors")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_length"):
        ProbeSpec(texts=("a",), max_length=1)


def test_read_texts_units(tmp_path):
    (tmp_path / "x.txt").write_text("one\n\ntwo\nthree\n")
    assert read_texts([str(tmp_path / "x.txt")]) == ["one\n\ntwo\nthree\n"]
    assert read_texts([str(tmp_path / "x.txt")], "line") == ["one", "two", "three"]
    assert read_texts([str(tmp_path / "x.txt")], "paragraph") == ["one", "two\nthree"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ProbeSpec(texts=str(tmp_path / "x.txt")).texts == (str(tmp_path / "x.txt"),)


def test_text_not_in_utf8_is_refused_with_the_file_and_the_fix(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "latin.txt").write_bytes("café au lait, déjà vu".encode("latin-1"))
    (tmp_path / "random.txt").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 400)))
    out = tmp_path / "probe.safetensors"
    for name in ("latin.txt", "random.txt"):
        argv = ["probe", "build", "--texts", str(tmp_path / name), "--out", str(out)]
        assert cli.main([*argv, "--tokenizer", str(tokenizer_dir), "--max-length", "8"]) == 2
        err = capsys.readouterr().err
        assert name in err and "not utf-8 text" in err and "--encoding" in err
        assert not out.exists()
    # named, the encoding decodes: the same words, no replacement character
    assert read_texts([str(tmp_path / "latin.txt")], encoding="latin-1") == [
        "café au lait, déjà vu"
    ]
    argv = ["probe", "build", "--texts", str(tmp_path / "latin.txt"), "--out", str(out)]
    argv += ["--tokenizer", str(tokenizer_dir), "--max-length", "8", "--encoding", "latin-1"]
    assert cli.main(argv) == 0


@pytest.mark.parametrize("size", [0, 7])
def test_an_empty_or_odd_sized_token_file_names_the_file(tmp_path, capsys, size):
    path = tmp_path / "val.bin"
    path.write_bytes(b"\x01" * size)
    argv = ["probe", "build", "--token-file", str(path), "--token-dtype", "uint16"]
    assert cli.main([*argv, "--out", str(tmp_path / "p.safetensors"), "--max-length", "4"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and f"holds {size} bytes" in err and "--token-dtype" in err


@pytest.fixture
def eos_tokenizer(tmp_path):
    """A tokenizer with an EOS (the packing separator) and a short model_max_length."""
    tok = char_tokenizer()
    tok.add_special_tokens({"eos_token": "<eos>"})
    tok.model_max_length = 32  # shorter than a whole document: transformers would warn
    path = tmp_path / "eos-tokenizer"
    tok.save_pretrained(path)
    return path, tok


@pytest.fixture
def transformers_warnings():
    """The warnings transformers logs (the suite silences them), as a user would see them."""
    from transformers.utils import logging as hf_logging

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    library = logging.getLogger("transformers")  # its handler does not propagate: ours is added
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    library.addHandler(handler)
    yield seen
    library.removeHandler(handler)
    hf_logging.set_verbosity(before)


def test_build_reproduces_packed_probes_quietly(
    tmp_path, eos_tokenizer, docs, transformers_warnings
):
    folder, topics = docs
    path, tok = eos_tokenizer
    out = tmp_path / "packed.safetensors"
    argv = ["probe", "build", "--tokenizer", str(path), "--max-length", "24", "--pack"]
    assert cli.main([*argv, "--texts", str(folder / "a.txt"), "--out", str(out)]) == 0
    expected = ProbeSet.from_texts([topics[0]], tok, max_length=24, pack=True)
    assert ProbeSet.load(out).content_hash() == expected.content_hash()
    assert expected.meta["separator"] == tok.eos_token_id  # packed with the EOS between texts
    # lawwatch cuts the stream itself: no "longer than the maximum sequence length" warning
    assert not [m for m in transformers_warnings if "Token indices sequence length" in m]

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": topics[:12]}).save_to_disk(tmp_path / "ds")
    argv += ["--dataset", str(tmp_path / "ds"), "--num-texts", "5", "--seed", "2"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    expected = ProbeSet.from_dataset(
        datasets.load_from_disk(str(tmp_path / "ds")),
        tok,
        max_length=24,
        num_texts=5,
        seed=2,
        pack=True,
    )
    assert ProbeSet.load(out).content_hash() == expected.content_hash()
    assert not [m for m in transformers_warnings if "Token indices sequence length" in m]
    # the warning is transformers' own, and shown when a document is fed to a model whole
    tok([topics[0]])
    assert [m for m in transformers_warnings if "Token indices sequence length" in m]


def test_build_with_a_gguf_models_tokenizer(tmp_path, docs, capsys, monkeypatch):
    folder, topics = docs
    (tmp_path / "gguf").mkdir()
    fake = tmp_path / "gguf" / "model.gguf"
    fake.write_bytes(b"GGUF")
    text = ["--texts", str(folder / "a.txt"), "--max-length", "16"]
    out = ["--out", str(tmp_path / "p.safetensors")]
    # without the gguf package: a clear error naming the fix, for both spellings
    monkeypatch.setitem(sys.modules, "gguf", None)
    for spelling in (["--tokenizer", str(fake)], ["--tokenizer", str(fake.parent)]):
        gguf_file = ["--gguf-file", fake.name] if spelling[1] == str(fake.parent) else []
        assert cli.main(["probe", "build", *spelling, *gguf_file, *text, *out]) == 2
        assert "pip install gguf" in capsys.readouterr().err
    monkeypatch.undo()

    pytest.importorskip("gguf")
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=16, n_layer=1, n_head=2))
    path = write_gguf(model, tmp_path / "gguf" / "tiny.gguf")
    argv = ["probe", "build", "--tokenizer", str(path.parent), "--gguf-file", path.name]
    assert cli.main([*argv, *text, *out]) == 0
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    expected = ProbeSet.from_texts([topics[0]], tok, max_length=16)
    assert ProbeSet.load(tmp_path / "p.safetensors").content_hash() == expected.content_hash()
