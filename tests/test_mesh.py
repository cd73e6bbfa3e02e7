"""Tensor-parallel meshes: real ``torchrun`` jobs on gloo (CPU), compared with one process.

One launch per world size (a module fixture; every scenario runs inside it, see
``tests/helpers/workers/mesh_worker.py``): 2 processes on a 1-D tensor-parallel mesh, and 4 on a
2 × 2 data × tensor mesh. A float64 Llama split by ``parallelize_module`` (column/row-wise
attention and MLP, a vocabulary-parallel head; with and without sequence-parallel norms) gives,
on every process, the PRs, r, rho and logit lens of ``lawwatch.measure`` on an unsplit copy with
the same weights, to 1e-9. Before this module, a tensor-parallel group fed one probe shard per
rank: the even probe's PR was off by 7.2e-3 without a word (the ``even`` scenario catches it).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

import lawwatch
from lawwatch import ProbeSet
from lawwatch.models import check_whole, pipeline_stage
from lawwatch.output.store import read_history
from tests.helpers.models import tiny_gpt2, tiny_llama
from tests.helpers.recipes import recipe_common
from tests.helpers.workers.launch import run, torchrun

TOL = 1e-9
SMOKE = "configs/smoke_cpu.yaml"
LENS = ("top1", "ce", "kl", "entropy")


def launch(tmp_path_factory, world: int) -> list[dict]:
    out = tmp_path_factory.mktemp(f"mesh{world}")
    run([*torchrun(world), "-m", "tests.helpers.workers.mesh_worker", str(out)], timeout=400)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return launch(tmp_path_factory, 4)


def assert_equal(got: dict | None, ref: dict) -> None:
    """PRs, r, rho, the lens's means and histograms: one process's, to TOL."""
    assert got is not None, "the snapshot was skipped"
    assert got["n"] == ref["n"]
    assert len(got["pr"]) == len(ref["pr"])
    assert max(abs(a - b) for a, b in zip(got["pr"], ref["pr"], strict=True)) <= TOL
    assert abs(got["r"] - ref["r"]) <= TOL and abs(got["rho"] - ref["rho"]) <= TOL
    lens, want = got["lens"], ref["lens"]
    assert lens["examples"] == want["examples"] > 0
    for key in LENS:
        assert max(abs(a - b) for a, b in zip(lens[key], want[key], strict=True)) <= TOL
    for key in ("first_correct", "final"):
        assert lens[key] == want[key]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["tp", "even", "sp", "tp_background"])
def test_a_tensor_parallel_llama_on_two_processes_equals_one_process(two, scenario):
    ref = two[0]["reference_even" if scenario == "even" else "reference"]
    for rank in two:  # every process gets the snapshot; both feed the whole probe
        assert_equal(rank[scenario], ref)
        assert rank[scenario]["shards"] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["tp", "even", "sp", "tp_background", "replica"])
def test_a_data_by_tensor_mesh_of_four_processes_equals_one_process(four, scenario):
    ref = four[0]["reference_even" if scenario == "even" else "reference"]
    for r, rank in enumerate(four):  # ranks 0, 1: data-parallel shard 0; ranks 2, 3: shard 1
        assert_equal(rank[scenario], ref)
        assert rank[scenario]["shards"] == [r // 2, 2]


@pytest.mark.slow
def test_transformers_tp_plan_auto_is_measured_exactly(two):
    for rank in two:
        assert rank["auto"]["dtensor"] == "DTensor"  # the plan did split the weights
        assert_equal(rank["auto"], two[0]["reference"])


@pytest.mark.slow
@pytest.mark.parametrize("ranks", ["two", "four"])
def test_meshes_lawwatch_cannot_measure_are_refused_when_built(ranks, request):
    for rank in request.getfixturevalue(ranks):
        said = rank["refused"]
        assert "'cp' (context parallelism)" in said["cp"]
        assert (
            "data_parallel='dp'" in said["data_parallel"]
            and "no dimension 'dp'" in said["data_parallel"]
        )
        assert "one stage of a pipeline (model.norm is None)" in said["pipeline"]
        assert "one stage of a pipeline (model.layers[2] is Identity)" in said["identity"]
        assert "docs/scale.md" in said["pipeline"]


@pytest.mark.slow
def test_processes_holding_different_blocks_skip_every_snapshot_together(two):
    for rank in two:
        assert rank["stages"]["skipped"] == [True, True]
        said = [m for m in rank["stages"]["said"] if "hold between 3 and 4 blocks" in m]
        assert len(said) == 2 and "step 0" in said[0] and "step 1" in said[1]
        assert "pipeline parallelism" in said[0]


def test_a_pipeline_stage_is_told_from_a_whole_model():
    assert pipeline_stage(tiny_llama()) is None and pipeline_stage(tiny_gpt2()) is None

    class Stage(nn.Module):  # torchtitan's second stage: layers 2 and 3 kept by number
        def __init__(self) -> None:
            super().__init__()
            self.tok_embeddings = nn.Embedding(8, 4)
            self.layers = nn.ModuleDict({str(i): nn.Linear(4, 4) for i in (2, 3)})
            self.norm = nn.LayerNorm(4)

    stage = Stage()
    stage.tok_embeddings = None  # as torchtitan's pipeline split leaves a later stage
    assert pipeline_stage(stage) == "Stage.tok_embeddings is None"
    stage.tok_embeddings = nn.Embedding(8, 4)
    assert pipeline_stage(stage) == "layers holds the layers 2 … 3 only"
    with pytest.raises(ValueError, match="one stage of a pipeline"):
        check_whole(stage)
    whole = nn.ModuleDict({str(i): nn.Linear(4, 4) for i in range(3)})
    assert pipeline_stage(whole) is None
    assert torch.is_tensor(whole["0"].weight)


LLAMA = (
    "{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 4, num_attention_heads: 4, "
    "num_key_value_heads: 2, max_position_embeddings: 128}"
)


@pytest.mark.slow
def test_the_accelerate_recipe_trains_a_tensor_parallel_llama_and_measures_it(tmp_path):
    """``--tp 2`` on 2 processes: the split float32 Llama trains, and its step-0 snapshot is
    what one process measures on the same initial weights (float32: the split sums round
    differently, so to 1e-5)."""
    out = tmp_path / "out"
    sets = ["--set", "model.type=llama", "--set", f"model.config={LLAMA}", "--set"]
    sets += ["train.steps=4", "--set", f"output.dir={out}", "--tp", "2"]
    log = run([*torchrun(2), "recipes/pretrain_accelerate.py", "--config", SMOKE, *sets])
    assert "2 process(es)" in log
    records = read_history(out / "lawwatch").records
    assert [r["step"] for r in records] == [0, 1, 2, 4]
    common = recipe_common()
    cfg = common.load_config(SMOKE, [s for s in sets if "=" in s and "output" not in s])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    model = common.build_model(cfg["model"], tokenizer, cfg["train"]["seed"])
    _, measure_config = common.watch_settings(cfg["lawwatch"])
    probe = ProbeSet.load(out / "probe.safetensors")
    one = lawwatch.measure(model, probe, measure_config)
    assert records[0]["n_tokens"] == one.n_tokens == probe.num_examples()
    assert max(abs(a - b) for a, b in zip(records[0]["pr"], one.pr.tolist(), strict=True)) <= 1e-5


def test_tp_is_refused_for_a_model_without_a_tensor_parallel_plan():
    common = recipe_common()
    with pytest.raises(SystemExit, match="gpt2 has no transformers tensor-parallel plan"):
        common.tensor_parallel(tiny_gpt2(), 1, "cpu")
