"""Every paper option — normalize, target, offset — against the protocol done literally in
float64 (HF hidden states, numpy norms, numpy lstsq)."""

import copy
import re

import numpy as np
import pytest
import torch

from lawwatch import MeasureConfig, ProbeSet, measure
from lawwatch.measurement import accumulate, prepare
from lawwatch.targets import OTHER, Targets, human_bytes, onehot_bytes, shuffled_ids
from tests.helpers.models import ragged_probe, tiny_gpt2
from tests.helpers.reference import (
    hf_residual_stream,
    layer_norm,
    onehot,
    onehot_top_k,
    protocol_pr,
    rms_norm,
    standardize,
)

EPS = 3e-4  # the model's final-norm epsilon: "layernorm" and "rmsnorm" take it too


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a busy machine: see the one_thread fixture
    model = tiny_gpt2(seed=3, layer_norm_epsilon=EPS).double()
    probe = ragged_probe(seed=4, rows=16, max_len=24)
    m64 = copy.deepcopy(model).double().eval()
    cache = {}

    def stream(ids):  # the float64 model's entries for one sequence, computed once
        key = tuple(ids.tolist())
        if key not in cache:
            cache[key] = hf_residual_stream(m64, ids)
        return cache[key]

    yield model, probe, stream
    torch.set_num_threads(threads)


NORMALIZE = {
    "auto": lambda h: layer_norm(h, EPS),  # GPT-2's final norm is a LayerNorm
    "layernorm": lambda h: layer_norm(h, EPS),
    "rmsnorm": lambda h: rms_norm(h, EPS),
    "standardize": standardize,
    "none": lambda h: h,
}


@pytest.mark.parametrize("normalize", list(NORMALIZE))
def test_normalize_options(setup, normalize):
    model, probe, stream = setup
    want = protocol_pr(stream, probe, NORMALIZE[normalize])
    got = measure(model, probe, normalize=normalize, batch_size=6).pr.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def _reference_target(target, probe, offset, k=None):
    if target == "token_id":
        return None
    if target == "onehot":
        return onehot if k is None else (lambda ids: onehot_top_k(ids, k))
    # the permutation is lawwatch's (seeded); the reference only applies it
    table = shuffled_ids(probe.target_ids(offset), seed=5)
    return lambda ids: np.array([table[int(i)] for i in ids], dtype=np.float64)


@pytest.mark.parametrize("offset", [1, 0, 2, -1])
@pytest.mark.parametrize(
    ("target", "k"),
    [("token_id", None), ("token_id_shuffled", None), ("onehot", None), ("onehot", 7)],
)
def test_targets_and_offsets(setup, target, k, offset):
    model, probe, stream = setup
    want = protocol_pr(
        stream,
        probe,
        NORMALIZE["auto"],
        offset=offset,
        target=_reference_target(target, probe, offset, k),
    )
    snap = measure(model, probe, target=target, offset=offset, seed=5, onehot_top_k=k, batch_size=5)
    assert snap.n_tokens == probe.num_examples(offset)
    np.testing.assert_allclose(snap.pr.numpy(), want, rtol=0, atol=1e-10)


def test_shuffled_permutation_is_a_seeded_bijection(setup):
    _, probe, _ = setup
    ids = probe.target_ids()
    table = shuffled_ids(ids, seed=5)
    assert sorted(table) == sorted(table.values()) == ids.tolist()  # a permutation of the ids
    assert sum(a != b for a, b in table.items()) > len(table) // 2  # and not near the identity
    assert table == shuffled_ids(ids, seed=5) and table != shuffled_ids(ids, seed=6)


def test_top_k_keeps_every_example_and_breaks_ties_by_id():
    probe = ProbeSet.from_tokens([[1, 5, 5, 7, 7, 9, 3, 3, 2]])
    targets = Targets.build("onehot", probe, onehot_top_k=2)
    # next-token counts: 5:2, 7:2, 3:2, 9:1, 2:1 -> the two most frequent, ties to the smaller
    assert targets.classes.tolist() == [OTHER, 3, 5]
    mapped = targets(torch.tensor([5, 7, 3, 9, 2]))
    assert mapped.tolist() == [5, OTHER, 3, OTHER, OTHER]
    everything = Targets.build("onehot", probe, onehot_top_k=50)
    assert OTHER not in everything.classes.tolist() and everything.classes.numel() == 5


def test_onehot_memory_is_bounded_with_a_knob_that_fits(setup):
    model, probe, _ = setup
    entries, dim, classes = 5, 16, probe.target_ids().numel()
    limit = onehot_bytes(entries, dim, 10)
    assert onehot_bytes(entries, dim, classes) > limit
    with pytest.raises(ValueError, match=r"onehot_top_k=(\d+)") as info:
        measure(model, probe, target="onehot", max_onehot_bytes=limit)
    assert "max_onehot_bytes" in str(info.value) and "layers=" in str(info.value)
    k = int(re.search(r"onehot_top_k=(\d+)", str(info.value)).group(1))
    assert k == 9 and onehot_bytes(entries, dim, k + 1) <= limit  # k ids + the OTHER class
    snap = measure(model, probe, target="onehot", onehot_top_k=k, max_onehot_bytes=limit)
    assert ((snap.pr > 0) & (snap.pr < 1)).all()
    # measuring fewer entries is the other way to fit
    measure(model, probe, target="onehot", layers=[1, 2, 4], max_onehot_bytes=3 * dim * classes * 8)


def test_onehot_budgets_print_human_sizes(setup):
    """A 6400-byte budget printed as '0.00 GiB' before."""
    model, probe, _ = setup
    limit = onehot_bytes(5, 16, 10)
    with pytest.raises(ValueError, match=r"max_onehot_bytes=6400 \(6\.25 KiB\)") as info:
        measure(model, probe, target="onehot", max_onehot_bytes=limit)
    need = human_bytes(onehot_bytes(5, 16, probe.target_ids().numel()))
    assert f"needs {need} of float64" in str(info.value) and "GiB" not in str(info.value)
    assert [human_bytes(n) for n in (0, 1023, 1024, 6400, 3 * 2**19, 2**30, 5 * 2**40)] == [
        "0 B", "1023 B", "1 KiB", "6.25 KiB", "1.5 MiB", "1 GiB", "5 TiB"
    ]  # fmt: skip


def test_when_not_even_top_1_fits_the_other_knobs_are_named(setup):
    """onehot_top_k=1 was suggested, then refused with the same suggestion."""
    model, probe, _ = setup
    limit = onehot_bytes(5, 16, 2) - 1  # one id and OTHER at every entry: one byte short
    with pytest.raises(ValueError, match="Even onehot_top_k=1") as info:
        measure(model, probe, target="onehot", max_onehot_bytes=limit)
    message = str(info.value)
    assert "Pass onehot_top_k" not in message and "raise max_onehot_bytes" in message
    assert "at most 4 entries (layers=…) with onehot_top_k=1" in message
    with pytest.raises(ValueError, match="Even onehot_top_k=1"):  # the old loop
        measure(model, probe, target="onehot", onehot_top_k=1, max_onehot_bytes=limit)
    # what the message says fits, fits
    snap = measure(
        model, probe, target="onehot", onehot_top_k=1, layers=[1, 2, 3, 4], max_onehot_bytes=limit
    )
    assert ((snap.pr > 0) & (snap.pr <= 1)).all()
    with pytest.raises(ValueError, match="no single entry fits"):
        measure(model, probe, target="onehot", max_onehot_bytes=100)


@pytest.mark.parametrize(
    ("target", "k"), [("token_id_shuffled", None), ("onehot", None), ("onehot", 5)]
)
def test_shards_resolve_targets_on_the_whole_probe(setup, target, k):
    """Each process measures a shard; their statistics must sum to the whole probe's. The
    permutation and the one-hot classes come from the whole set, not the shard."""
    model, probe, _ = setup
    # the plain statistics (no jackknife groups), which merge by addition
    config = MeasureConfig(target=target, seed=5, onehot_top_k=k, jackknife=None)
    targets = prepare(model, probe, config)  # once, on the whole probe, as LawWatch does
    whole = accumulate(model, probe, config, targets)
    merged = None
    for rank in range(3):
        part = accumulate(model, probe.shard(rank, 3), config, targets)
        merged = part if merged is None else merged.merge(part)
    assert merged.count.item() == whole.count.item()
    torch.testing.assert_close(merged.compute(), whole.compute(), rtol=0, atol=1e-10)


def test_bad_options_are_named(setup):
    model, probe, _ = setup
    with pytest.raises(ValueError, match="Unknown target"):
        measure(model, probe, target="logits")
    with pytest.raises(ValueError, match="Unknown normalize"):
        measure(model, probe, normalize="batchnorm")
    with pytest.raises(ValueError, match="onehot_top_k=3 needs target='onehot'"):
        measure(model, probe, onehot_top_k=3)
    with pytest.raises(TypeError, match="offset must be an int"):
        measure(model, probe, offset=1.0)
    with pytest.raises(ValueError, match="no example at offset=30"):
        measure(model, probe, offset=30)


_TWO_RANKS = """
import json, sys
import torch
import torch.distributed as dist
from lawwatch.watch.monitor import LawWatch
from tests.helpers.models import ragged_probe, tiny_gpt2

torch.set_num_threads(1)
dist.init_process_group("gloo")
model, probe = tiny_gpt2(seed=3), ragged_probe(seed=4, rows=17, max_len=24)
out = {}
for target in ("onehot", "token_id_shuffled"):
    snap = LawWatch(model, probe, target=target).snapshot(0)
    if dist.get_rank() == 0:
        out[target] = snap.pr.tolist()
if dist.get_rank() == 0:
    json.dump(out, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_regress_the_same_targets(tmp_path):
    """torchrun, 2 processes on gloo, the monitor as it is: each rank measures its shard and the
    statistics are summed. Resolving targets per shard gave each rank different one-hot classes
    and aborted the run (a collective of mismatched sizes)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port), str(script),
         str(tmp_path / "out.json")],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    model, probe = tiny_gpt2(seed=3), ragged_probe(seed=4, rows=17, max_len=24)
    for target, pr in got.items():
        want = measure(model, probe, target=target).pr.numpy()
        np.testing.assert_allclose(pr, want, rtol=0, atol=1e-9)
