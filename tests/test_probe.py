import pytest
import torch

from lawwatch import ProbeSet
from lawwatch.probe import example_mask, example_targets
from tests.conftest import char_tokenizer, ragged_probe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_from_ragged_tokens_counts_examples():
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
        metadata={"format": "lawwatch.probe/1", "meta": "{}", "hash": probe.content_hash()},
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
