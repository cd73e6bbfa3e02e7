import warnings

import pytest
import torch

from lawwatch import ProbeSet
from lawwatch.probe import example_mask, example_targets
from tests.helpers.models import char_tokenizer, ragged_probe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_from_ragged_tokens_counts_examples():
    with pytest.warns(UserWarning, match="1 of 3 probe sequences hold fewer than 2 real tokens"):
        probe = ProbeSet.from_tokens([[5, 6, 7], [8], [9, 10]])
    assert probe.input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert probe.num_examples() == 2 + 0 + 1
    assert probe.target_ids().tolist() == [6, 7, 10]
    assert probe.num_examples(offset=0) == 6
    assert probe.num_examples(offset=2) == 1
    assert probe.num_examples(offset=-1) == 3


def test_example_mask_and_targets_offsets():
    ids = torch.tensor([[1, 2, 3, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    for offset, positions, targets in [
        (1, [0, 1, 2], [2, 3, 4]),
        (0, [0, 1, 2, 3], [1, 2, 3, 4]),
        (2, [0, 1], [3, 4]),
        (-1, [1, 2, 3], [1, 2, 3]),
    ]:
        m = example_mask(mask, offset)[0]
        assert m.nonzero().flatten().tolist() == positions
        assert example_targets(ids, offset)[0][m].tolist() == targets


def test_pad_values_are_ignored_and_left_padding_refused():
    a = ProbeSet.from_tokens(torch.tensor([[1, 2, 99]]), torch.tensor([[1, 1, 0]]))
    b = ProbeSet.from_tokens(torch.tensor([[1, 2, 7]]), torch.tensor([[1, 1, 0]]))
    assert a.content_hash() == b.content_hash()
    with pytest.raises(ValueError, match="right-padded"):
        ProbeSet.from_tokens(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]]))
    with pytest.raises(TypeError, match="integer"):
        ProbeSet.from_tokens(torch.rand(2, 3))
    with pytest.raises(ValueError, match="no sequences"):
        ProbeSet.from_tokens([])


def test_save_load_roundtrip_and_corruption(tmp_path):
    probe = ragged_probe()
    path = probe.save(tmp_path / "probe.safetensors")
    again = ProbeSet.load(path)
    assert torch.equal(again.input_ids, probe.input_ids)
    assert torch.equal(again.attention_mask, probe.attention_mask)
    assert again.meta == probe.meta and again.content_hash() == probe.content_hash()
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors["input_ids"][0, 0] += 1
    save_file(
        tensors,
        str(tmp_path / "bad.safetensors"),
        metadata={
            "format": "lawwatch.probe/2",
            "meta": "{}",
            "content_hash": probe.content_hash(),
            "hash": "0" * 64,
        },
    )
    with pytest.raises(ValueError, match="corrupt"):
        ProbeSet.load(tmp_path / "bad.safetensors")
    save_file(tensors, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a lawwatch probe"):
        ProbeSet.load(tmp_path / "other.safetensors")


def test_from_texts_truncates_and_reports():
    tok = char_tokenizer()
    texts = ["the law of equi-learning holds", "", "each layer cuts the residual by a factor"]
    with pytest.warns(UserWarning, match="1 of 3 probe texts"):
        probe = ProbeSet.from_texts(texts, tok, max_length=5)
    assert len(probe) == 2 and probe.input_ids.shape[1] <= 5
    assert probe.meta["max_length"] == 5 and probe.meta["num_texts"] == 2
    with pytest.raises(ValueError, match="No probe text"), pytest.warns(UserWarning):
        ProbeSet.from_texts(["", " "[:0]], tok, max_length=8)
    sample = ProbeSet.from_texts(texts[::2] * 4, tok, max_length=8, num_texts=3, seed=1)
    assert len(sample) == 3
    assert (
        sample.content_hash()
        == ProbeSet.from_texts(
            texts[::2] * 4, tok, max_length=8, num_texts=3, seed=1
        ).content_hash()
    )


def test_batches_trim_and_cover():
    probe = ragged_probe(rows=11)
    seen = 0
    for ids, mask in probe.batches(4):
        assert ids.shape == mask.shape and ids.shape[0] <= 4
        assert mask[:, -1].any()  # trimmed to the longest real row
        seen += int(example_mask(mask).sum())
    assert seen == probe.num_examples()


@pytest.mark.parametrize("world", [2, 3, 5])
def test_shard_pads_to_equal_batches(world):
    probe = ragged_probe(rows=11)
    shards = [probe.shard(r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert len({len(list(s.batches(2))) for s in shards}) == 1
    assert sum(s.num_examples() for s in shards) == probe.num_examples()
    with pytest.raises(ValueError, match="rank"):
        probe.shard(world, world)


def test_no_pad_token_needed_and_empty_texts_reported():
    tok = char_tokenizer()
    assert tok.pad_token is None and tok.eos_token is None
    texts = ["the law of equi-learning", None, "", "each layer cuts the residual"]
    with pytest.warns(UserWarning, match="2 of 4 probe texts give fewer than 2 tokens"):
        probe = ProbeSet.from_texts(texts, tok, max_length=6)
    assert len(probe) == 2 and probe.meta["num_texts"] == 2
    with pytest.raises(TypeError, match="Probe text 1 is a int"):
        ProbeSet.from_texts(["a b", 7], tok, max_length=6)


def test_packing_keeps_every_token():
    tok = char_tokenizer()
    texts = ["the law of equi-learning", "", "each layer cuts the residual", "by the same factor"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with pytest.warns(UserWarning, match="1 of 4 probe texts are empty"):
        packed = ProbeSet.from_texts(texts, tok, max_length=5, pack=True)
    stream = [i for row in ids for i in row]  # no EOS: documents simply follow each other
    assert packed.meta["separator"] is None and packed.meta["pack"]
    got = packed.input_ids[packed.attention_mask].tolist()
    assert got == stream[: len(got)] and len(stream) - len(got) <= 1  # only a 1-token tail
    assert (packed.attention_mask[:-1].sum(dim=1) == 5).all()
    tok.add_special_tokens({"eos_token": "<|end|>"})
    with pytest.warns(UserWarning):
        with_eos = ProbeSet.from_texts(texts, tok, max_length=5, pack=True)
    eos = tok.eos_token_id
    stream = [i for row in ids if row for i in [*row, eos]]
    assert with_eos.meta["separator"] == eos
    full = len(stream) // 5 * 5  # whole chunks, then the tail if it holds a next-token pair
    want = stream if len(stream) - full >= 2 else stream[:full]
    assert with_eos.input_ids[with_eos.attention_mask].tolist() == want


def test_summary_reports_what_the_probe_holds():
    with pytest.warns(UserWarning, match="1 of 4 probe sequences"):
        probe = ProbeSet.from_tokens([[5, 6, 7], [8], [9, 10], [5, 5, 5, 5]])
    assert probe.summary() == {
        "sequences": 4,
        "length": 4,
        "tokens": 10,
        "examples": 2 + 0 + 1 + 3,
        "distinct_targets": 4,  # 6, 7, 10, 5
        "sequences_without_examples": 1,
    }
    assert probe.summary(offset=2)["examples"] == 1 + 2
    assert "sequences_without_examples=1" in repr(probe)


def test_a_shard_is_a_plain_probe():
    """Targets are resolved once on the whole probe by whoever shards it (LawWatch, see
    tests/test_targets.py), so a shard carries no pointer back to the set it was cut from."""
    probe = ragged_probe(rows=11)
    shard = probe.shard(1, 3)
    assert not hasattr(shard, "whole") and shard.meta["shard"] == [1, 3]
    assert torch.equal(shard.input_ids, probe.input_ids[4:8])


def test_from_dataset_equals_from_texts(tmp_path):
    import datasets

    tok = char_tokenizer()
    texts = [f"the law {i} of equi-learning holds for layer {i}" for i in range(12)]
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(12))})
    for kwargs in ({}, {"num_texts": 5, "seed": 3}, {"pack": True}):
        got = ProbeSet.from_dataset(ds, tok, max_length=7, **kwargs)
        want = ProbeSet.from_texts(texts, tok, max_length=7, **kwargs)
        assert got.content_hash() == want.content_hash()
        assert got.meta["source"] == "dataset" and got.meta["dataset_rows"] == 12
    ds.save_to_disk(str(tmp_path / "ds"))
    again = ProbeSet.from_dataset(tmp_path / "ds", tok, max_length=7, num_texts=5, seed=3)
    assert (
        again.content_hash()
        == ProbeSet.from_texts(texts, tok, max_length=7, num_texts=5, seed=3).content_hash()
    )
    with pytest.raises(ValueError, match=r"no column 'body'.*\['text', 'n'\]"):
        ProbeSet.from_dataset(ds, tok, text_column="body", max_length=7)
    with pytest.raises(TypeError, match="pass one split"):
        ProbeSet.from_dataset(datasets.DatasetDict({"train": ds}), tok, max_length=7)
    with pytest.raises(TypeError, match="IterableDataset"):
        ProbeSet.from_dataset(ds.to_iterable_dataset(), tok, max_length=7)
    with pytest.raises(ValueError, match="only 12 rows"):
        ProbeSet.from_dataset(ds, tok, max_length=7, num_texts=13)


def test_from_token_files(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    stream = np.random.default_rng(0).integers(0, 60_000, size=1000).astype(np.uint16)
    stream.tofile(tmp_path / "val.bin")  # nanoGPT's format
    np.save(tmp_path / "val.npy", stream.astype(np.int32))
    from_bin = ProbeSet.from_token_file(tmp_path / "val.bin", seq_len=64, dtype="uint16")
    from_npy = ProbeSet.from_token_file(tmp_path / "val.npy", seq_len=64)
    assert from_bin.content_hash() == from_npy.content_hash()
    assert from_bin.input_ids.shape == (15, 64) and from_bin.attention_mask.all()
    assert from_bin.input_ids.flatten().tolist() == stream[:960].tolist()
    assert from_bin.meta["tail_tokens_unused"] == 40
    draw = ProbeSet.from_token_file(tmp_path / "val.npy", seq_len=64, num_sequences=4, seed=1)
    assert (
        draw.content_hash()
        == ProbeSet.from_token_file(
            tmp_path / "val.npy", seq_len=64, num_sequences=4, seed=1
        ).content_hash()
    )
    assert (
        draw.content_hash()
        != ProbeSet.from_token_file(
            tmp_path / "val.npy", seq_len=64, num_sequences=4, seed=2
        ).content_hash()
    )
    chunks = {tuple(stream[i : i + 64].tolist()) for i in range(0, 960, 64)}
    assert all(tuple(row.tolist()) in chunks for row in draw.input_ids)
    # 2-D sequences with a mask in safetensors; a lawwatch probe file is loaded as such
    rows = stream[:60].reshape(3, 20).astype(np.int64)
    mask = np.ones((3, 20), dtype=np.uint8)
    mask[1, 12:] = 0
    save_file({"input_ids": rows, "attention_mask": mask}, str(tmp_path / "rows.safetensors"))
    two_d = ProbeSet.from_token_file(tmp_path / "rows.safetensors", seq_len=16)
    assert two_d.input_ids.shape == (3, 16) and two_d.attention_mask.sum() == 16 + 12 + 16
    saved = ragged_probe().save(tmp_path / "probe.safetensors")
    assert (
        ProbeSet.from_token_file(saved, seq_len=8).content_hash() == ragged_probe().content_hash()
    )


def test_token_file_errors_are_named(tmp_path):
    import numpy as np

    np.arange(10, dtype=np.int64).tofile(tmp_path / "raw.bin")
    with pytest.raises(ValueError, match="dtype='uint16'"):
        ProbeSet.from_token_file(tmp_path / "raw.bin", seq_len=4)
    np.save(tmp_path / "f.npy", np.zeros(10, dtype=np.float32))
    with pytest.raises(TypeError, match="must be integers"):
        ProbeSet.from_token_file(tmp_path / "f.npy", seq_len=4)
    np.save(tmp_path / "neg.npy", np.array([1, -2, 3, 4]))
    with pytest.raises(ValueError, match="negative token ids"):
        ProbeSet.from_token_file(tmp_path / "neg.npy", seq_len=2)
    np.save(tmp_path / "short.npy", np.arange(5))
    with pytest.raises(ValueError, match="fewer than seq_len=8"):
        ProbeSet.from_token_file(tmp_path / "short.npy", seq_len=8)
    with pytest.raises(ValueError, match="only 2 chunks"):
        ProbeSet.from_token_file(tmp_path / "short.npy", seq_len=2, num_sequences=3)
    with pytest.raises(ValueError, match="records its own dtype"):
        ProbeSet.from_token_file(tmp_path / "short.npy", seq_len=2, dtype="int64")
    with pytest.raises(ValueError, match="at least 2"):
        ProbeSet.from_token_file(tmp_path / "short.npy", seq_len=1)
    whole = (tmp_path / "short.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(whole[: len(whole) - 9])
    with pytest.raises(ValueError, match=r"cut\.npy is not a readable \.npy file"):
        ProbeSet.from_token_file(tmp_path / "cut.npy", seq_len=2)
    with pytest.raises(FileNotFoundError, match=r"gone\.bin"):
        ProbeSet.from_token_file(tmp_path / "gone.bin", seq_len=2, dtype="uint16")


def _rewrite(src, dst, *, metadata=None, drop=(), data=None):
    """Copy probe file ``src`` to ``dst`` with metadata, tensors or bytes changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if data is not None:
        dst.write_bytes(data(src.read_bytes()))
        return dst
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}  # noqa: SIM118
        stored = f.metadata()
    save_file(tensors, str(dst), metadata={**stored, **(metadata or {})})
    return dst


def test_probe_files_cover_their_provenance(tmp_path):
    """An edited provenance loaded silently before: the file hash now covers it."""
    import json

    from lawwatch.probe import FORMAT

    probe = ProbeSet.from_tokens([[5, 6, 7, 8], [9, 10, 11, 12]])
    probe.meta.update(source="texts", seed=3)
    path = probe.save(tmp_path / "probe.safetensors")
    assert FORMAT == "lawwatch.probe/2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current format loads without a warning
        assert ProbeSet.load(path).meta == probe.meta
    edited = json.dumps({**probe.meta, "seed": 4})
    bad = _rewrite(path, tmp_path / "edited.safetensors", metadata={"meta": edited})
    with pytest.raises(ValueError, match=r"edited\.safetensors is corrupt.*provenance"):
        ProbeSet.load(bad)
    # the content hash (tokens and mask) is stored too, and still the probe's identity
    other = _rewrite(path, tmp_path / "hash.safetensors", metadata={"content_hash": "0" * 64})
    with pytest.raises(ValueError, match=r"hash\.safetensors is corrupt.*tokens and mask"):
        ProbeSet.load(other)
    with pytest.raises(TypeError, match="JSON-serializable"):
        ProbeSet(probe.input_ids, probe.attention_mask, {"x": torch.ones(1)}).save(
            tmp_path / "x.safetensors"
        )


def test_every_damaged_probe_file_is_named_with_its_damage(tmp_path):
    """Bare JSONDecodeError / KeyError / SafetensorError before, without the file's name."""
    path = ragged_probe().save(tmp_path / "probe.safetensors")
    cases = {
        "truncated": (dict(data=lambda b: b[: len(b) - 7]), "not a readable safetensors file"),
        "empty": (dict(data=lambda b: b""), "truncated or damaged"),
        "badjson": (dict(metadata={"meta": "{'seed': 1"}), "'meta' metadata is not valid JSON"),
        "notdict": (dict(metadata={"meta": "[1, 2]"}), "'meta' metadata is a list"),
        "nomask": (dict(drop=("attention_mask",)), r"lacks attention_mask.*\['input_ids'\]"),
        "format": (dict(metadata={"format": "lawwatch.probe/9"}), "not a lawwatch probe"),
    }
    for name, (change, message) in cases.items():
        bad = _rewrite(path, tmp_path / f"{name}.safetensors", **change)
        with pytest.raises(ValueError, match=rf"{name}\.safetensors.*{message}"):
            ProbeSet.load(bad)
    nometa = tmp_path / "nometa.safetensors"
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), str(nometa), metadata={"format": "lawwatch.probe/2", "hash": "x"})
    with pytest.raises(ValueError, match=r"nometa\.safetensors.*lacks meta"):
        ProbeSet.load(nometa)
    # tensors that are no probe: the constructor's reason, with the file's name
    shapes = tmp_path / "shapes.safetensors"
    tensors = load_file(path)
    tensors["attention_mask"] = tensors["attention_mask"][:, :3].contiguous()
    save_file(
        tensors, str(shapes), metadata={"format": "lawwatch.probe/2", "meta": "{}", "hash": "x"}
    )
    with pytest.raises(
        ValueError, match=r"shapes\.safetensors is a damaged .*attention_mask shape"
    ):
        ProbeSet.load(shapes)
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        ProbeSet.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"truncated\.safetensors.*not a readable"):
        ProbeSet.from_token_file(tmp_path / "truncated.safetensors", seq_len=4)
