"""Multi-process snapshots: real ``torchrun`` jobs with 2 processes on gloo (CPU).

Each job runs once per module (fixtures) and several tests read its result files. The workers
live in ``tests/helpers/workers/``. Every comparison is against ``lawwatch.measurement`` on the full
probe in a single process with the same weights; the models are float64, so the bound (1e-9)
tests the sharding and the reduction, not float32 differences between batch shapes (those alone
reach ~3e-9 on a float32 model).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import lawwatch
from lawwatch.measurement import accumulate
from lawwatch.models import is_sharded, measured_module
from lawwatch.output.sinks import scalars
from lawwatch.probe import example_mask
from lawwatch.watch import distributed
from lawwatch.watch.distributed import layout
from lawwatch.watch.monitor import LawWatch
from tests.helpers.health_reference import assert_matches as assert_health_matches
from tests.helpers.models import (
    UNSOLVABLE_SPLIT,
    ragged_probe,
    tiny_gpt2,
    tiny_llama,
    unsolvable_probe,
)
from tests.helpers.paper import gpt2_norm, llama_norm, paper_reference
from tests.helpers.workers.common import uneven_probe
from tests.helpers.workers.launch import run, torchrun

TOL = 1e-9


def launch(module: str, out: Path) -> str:
    """``torchrun --nproc_per_node 2 -m module OUT``: its output (both ranks' logs)."""
    return run([*torchrun(2), "-m", module, str(out)])


def results(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# -- three processes: an uneven split of the entries, the solve sharded ------------------------


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    out = tmp_path_factory.mktemp("three")
    log = run([*torchrun(3), "-m", "tests.helpers.workers.three_worker", str(out)])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(3)], log


@pytest.mark.slow
@pytest.mark.parametrize("case", ["token_id", "onehot_subset", "shuffled_subset"])
def test_three_processes_solve_their_share_and_equal_one_process(three, case):
    ranks, _ = three
    assert [r["world"] for r in ranks] == [3, 3, 3]
    ref = ranks[0][f"ref_{case}"]
    for r in ranks:  # every rank returns every PR, equal to one process
        assert max_diff(r[case], ref) <= TOL
        assert r[f"{case}_layers"] == ranks[0][f"{case}_layers"]
    assert ranks[0]["onehot_subset_layers"] == [0, 1, 3, 4]
    assert ranks[0]["shuffled_subset_layers"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_solve_that_fails_on_one_of_three_processes_is_skipped_by_all(three):
    ranks, log = three
    for r in ranks:
        assert r["failed_solve"] is None
        assert r["after_failure"] is not None and r["after_failure"] == ranks[0]["token_id"]
        assert r["history_steps"] == [3]
    assert log.count("lawwatch: snapshot at step 2 skipped") == 3  # every rank says so
    assert "injected solve failure on rank 2" in log
    assert "the solve failed on process(es) [2]" in log


@pytest.mark.slow
def test_the_overhead_budget_is_agreed_by_all_processes(three):
    ranks, _ = three
    # alone, rank 0 would snapshot every 10 steps and rank 2 every 60: the largest times
    # decide (at step 3, after 3 timed steps) a gap of 30 on every rank
    assert [r["budget_steps"] for r in ranks] == [[0, 30]] * 3


# -- DDP through Accelerator(cpu=True) ----------------------------------------------------------


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    log = launch("tests.helpers.workers.ddp_worker", out)
    return out, results(out), log


@pytest.mark.slow
def test_ddp_sharded_probe_equals_one_process(ddp):
    _, (r0, r1), _ = ddp
    assert r0["is_ddp"] and r0["world"] == 2 and r0["wrapper"] == "DistributedDataParallel"
    # 13 rows over 2 ranks at batch size 2: 7 and 6+1 padded rows, the same number of forwards
    assert r0["shard_batches"] == [4, 4]
    for step in (0, 1, 4):
        ref = r0[f"ref{step}"]
        assert all(math.isfinite(p) and 0 < p <= 1 for p in ref)
        for r in (r0, r1):  # every rank gets the snapshot
            assert max_diff(r[f"step{step}"], ref) <= TOL


@pytest.mark.slow
def test_ddp_other_targets_use_the_whole_probe_vocabulary(ddp):
    _, (r0, r1), _ = ddp
    for target in ("onehot", "token_id_shuffled"):
        for r in (r0, r1):
            assert max_diff(r[target], r0[f"ref_{target}"]) <= TOL


@pytest.mark.slow
def test_ddp_logit_lens_equals_one_process(ddp):
    _, (r0, r1), _ = ddp
    ref = r0["ref_lens"]
    assert ref["examples"] > 0
    for r in (r0, r1):
        for name in ("lens", "lens_background"):
            lens = r[name]
            assert lens["examples"] == ref["examples"]
            assert lens["first_correct"] == ref["first_correct"] and lens["final"] == ref["final"]
            for metric in ("top1", "ce", "kl", "entropy"):
                assert max_diff(lens[metric], ref[metric]) <= TOL


@pytest.mark.slow
def test_ddp_breakdowns_equal_one_process_and_each_group_alone(ddp):
    # groups a, b, c: b only on rank 1's shard, c only on rank 0's (and too few examples for
    # the hidden size: no PR, the reason instead); a target mask selecting nothing in two rows
    _, (r0, r1), _ = ddp
    ref, alone = r0["ref_grouped"], r0["ref_alone"]
    assert r0["grouped_shard_examples"][0]["b"] == 0 and r0["grouped_shard_examples"][1]["c"] == 0
    assert ref["groups"]["c"]["pr"] is None and "Too few" in ref["groups"]["c"]["error"]
    for name in ("a", "b"):
        assert max_diff(ref["groups"][name]["pr"], alone[name]) <= 1e-9
    for r in (r0, r1):
        for kind in ("grouped", "grouped_background"):
            got = r[kind]
            assert max_diff(got["pr"], ref["pr"]) <= TOL
            for name, group in ref["groups"].items():
                mine = got["groups"][name]
                assert mine["n_tokens"] == group["n_tokens"]
                assert mine.get("error") == group.get("error")
                if group["pr"] is not None:
                    assert max_diff(mine["pr"], alone[name]) <= 1e-9
                    assert mine["pearson_r"] == pytest.approx(group["pearson_r"], abs=1e-9)
                lens, want = mine["lens"], group["lens"]
                assert lens["examples"] == want["examples"]
                assert lens["first_correct"] == want["first_correct"]
                for metric in ("top1", "ce", "kl", "entropy"):
                    assert max_diff(lens[metric], want[metric]) <= TOL
            assert list(got["positions"]) == list(ref["positions"])
            for bucket, want in ref["positions"].items():
                assert got["positions"][bucket]["examples"] == want["examples"]
                assert got["positions"][bucket]["final"] == want["final"]
                assert max_diff(got["positions"][bucket]["ce"], want["ce"]) <= TOL


def test_ddp_vital_signs_equal_one_process(ddp):
    """Sums re-based on the common mean, summed, max-reduced: the whole probe's vital signs
    on every rank (in the snapshot, and before the background solve), and with one rank
    holding no example at all."""
    _, (r0, r1), _ = ddp
    for r in (r0, r1):
        for name in ("lens_health", "lens_background_health"):
            assert_health_matches(r[name], r0["ref_health"], rtol=1e-12, krtol=1e-10)
        assert_health_matches(r["lopsided_health"], r0["ref_lopsided_health"])


@pytest.mark.slow
def test_ddp_rank_without_examples(ddp):
    _, (r0, r1), _ = ddp
    assert r0["shard_examples"][1] == 0 and r0["shard_examples"][0] > 0
    for r in (r0, r1):
        assert max_diff(r["lopsided"], r0["ref_lopsided"]) <= TOL


@pytest.mark.slow
def test_ddp_failed_rank_makes_every_rank_skip(ddp):
    _, (r0, r1), log = ddp
    for r in (r0, r1):
        assert r["failed2"] is None and r["failed3"] is None  # raised / NaN on rank 1 only
        assert r["history_steps"] == [0, 1, 4]
        assert math.isfinite(r["loss4"])  # training went on
    assert "rank 1 could not measure step 2: RuntimeError('injected failure" in log
    assert "rank 1 could not measure step 3: NonFiniteError('The hidden states of" in log
    assert "contain NaN or Inf" in log
    assert "snapshot at step 2 skipped: another rank failed" in log
    assert "snapshot at step 3 skipped: another rank failed" in log


@pytest.mark.slow
def test_ddp_ranks_that_disagree_skip_together(ddp):
    _, (r0, r1), log = ddp
    for r in (r0, r1):
        assert r["mixed_probes"] is None and r["mixed_steps"] is None
    assert log.count("snapshot at step 1 skipped: the ranks disagree on probe") == 2
    # ranks at different steps never reach the vote: the check-in before it names them
    assert "snapshot at step 5 skipped: rank 1 (its latest snapshot call: step 6) did not " in log
    assert "snapshot at step 6 skipped: rank 0 (its latest snapshot call: step 5) did not " in log
    assert "step 5) did not reach it within 5 s" in log  # half the store's timeout, shortened


@pytest.mark.slow
def test_ddp_history_survives_accelerate_checkpoints(ddp):
    out, (r0, r1), _ = ddp
    for r in (r0, r1):  # register_for_checkpointing, save_state, then load_state
        assert r["after_checkpoint"] is not None
        assert r["resumed"] == [[0, 1, 4], 4]
    # rank 0's history file dropped the step measured after the checkpoint
    records = [json.loads(line) for line in (out / "history" / "history.jsonl").open()]
    assert [rec["step"] for rec in records] == [0, 1, 4]


@pytest.mark.slow
def test_ddp_snapshot_leaves_training_alone(ddp):
    out, (r0, r1), _ = ddp
    for r in (r0, r1):
        assert r["training_mode"] and r["grads_clear"]
        assert r["repeat1"] is None  # a step is attempted once, on every rank alike
        assert r["replicas_equal"]  # DDP replicas still agree after snapshots
    # only rank 0 wrote the history
    records = [json.loads(line) for line in (out / "history" / "history.jsonl").open()]
    assert [rec["step"] for rec in records] == [0, 1, 4]
    assert max_diff(records[-1]["pr"], r0["ref4"]) <= TOL
    assert records[0]["n_tokens"] == ragged_probe(seed=3, rows=13, max_len=24).num_examples()


# -- FSDP2 fully_shard, plain process group ---------------------------------------------------


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    log = launch("tests.helpers.workers.fsdp_worker", out)
    return results(out), log


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fsdp2_sharded_probe_equals_one_process(fsdp, name):
    (r0, r1), _ = fsdp
    assert r0[f"{name}_root_is_fsdp"] and r0[f"{name}_measured_as_is"]
    assert r0[f"{name}_hooked"] and r1[f"{name}_hooked"]  # the final-norm pre-hook fired
    for step in (0, 2):  # 0: the probe's forward is the first the root ever runs
        for r in (r0, r1):
            assert max_diff(r[f"{name}_step{step}"], r0[f"{name}_ref{step}"]) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fsdp2_failed_rank_makes_every_rank_skip(fsdp, name):
    (r0, r1), log = fsdp
    for r in (r0, r1):
        assert r[f"{name}_failed1"] is None
        assert all(math.isfinite(r[f"{name}_loss{k}"]) for k in (1, 2, 3))
    assert log.count("snapshot at step 1 skipped: another rank failed") == 2  # both models


@pytest.mark.slow
def test_fsdp2_snapshots_run_without_autocast_at_the_policy_precision(fsdp):
    (r0, r1), _ = fsdp
    for r in (r0, r1):
        # a bf16 autocast region around the snapshot changes nothing
        assert r["float32_inside"] == r["float32_outside"]
        assert r["policy_inside"] == r["policy_outside"]
    assert r0["float32_precision"] == r1["float32_precision"] == "float32"
    # the policy's bf16 is the sharding's own precision: measured, and recorded as such
    assert r0["policy_precision"] == "bfloat16 (FSDP mixed-precision policy)"
    assert max_diff(r0["policy_outside"], r0["float32_outside"]) > 1e-6


@pytest.mark.slow
def test_half_sharded_model_is_refused_with_the_fix(fsdp):
    (r0, _), _ = fsdp
    assert "is not itself the FSDP root" in r0["llama_half_sharded"]
    assert "accelerator.prepare" in r0["llama_half_sharded"]


# -- misuse: unformed groups, ranks out of step, another collective ---------------------------


@pytest.fixture(scope="module")
def misuse(tmp_path_factory):
    out = tmp_path_factory.mktemp("misuse")
    log = launch("tests.helpers.workers.misuse_worker", out)
    return results(out), log


@pytest.mark.slow
def test_unformed_group_is_warned_once_per_process(misuse):
    (r0, r1), log = misuse
    assert r0["unformed_worlds"] == r1["unformed_worlds"] == [1, 1, 1]
    assert log.count("started as one of WORLD_SIZE=2, but the Accelerator passed") == 2
    assert log.count("launch with ACCELERATE_USE_CPU=1") == 2


@pytest.mark.slow
def test_a_rank_in_another_collective_is_waited_for_then_joined(misuse):
    """Rank 1 is in a collective of its own when rank 0 reaches a snapshot: rank 0 waits at the
    check-in (no collective), names rank 1, skips, and meets it in that collective; rank 1 comes
    late and skips too. The vote's marker still tells a foreign collective of its size."""
    (r0, r1), log = misuse
    assert r0["step0"] is not None and r1["step0"] is not None
    assert r0["step1"] is None and r1["step1"] is None
    assert r0["metrics"] == r1["metrics"] == [5.0e6 + 1] * 7  # the script's own reduction
    assert (
        "snapshot at step 1 skipped: rank 1 (its latest snapshot call: step 0) did not reach "
        "it within 2 s" in log
    )
    # rank 1, late: told who decided, and why
    assert (
        "snapshot at step 1 skipped: rank 0 stopped waiting for every rank to reach it (after "
        "2 s)" in log
    )
    # the vote met by a foreign all-reduce of its size
    assert r0["vote7"] is None
    assert "rank 0's vote on step 7 of probe hash" in log
    assert "met a collective that is not lawwatch's vote" in log
    assert "snapshot at step 7 skipped: another rank was in a different collective" in log


@pytest.mark.slow
def test_a_rank_that_skips_a_step_is_named(misuse):
    (r0, r1), log = misuse
    key = f"hash {uneven_probe().content_hash()[:12]}…"
    # rank 1 went on to step 3: rank 0 skips step 2 at once, and both measure step 3
    assert r0["step2"] is None
    assert r0["step3"] is not None and r0["step3"] == r1["step3"]
    assert "snapshot at step 2 skipped: rank 1 (its latest snapshot call: step 3) did not " in log
    assert "did not reach it. Every rank must call LawWatch.maybe_snapshot" in log
    assert r0["seconds_2_3"] < 30
    assert log.count("Every rank must call LawWatch.maybe_snapshot") >= 4
    # a vote that meets no one: the process group's timeout, then the hint
    assert r0["vote9"] is None
    assert f"rank 0's vote on step 9 of probe {key} failed (" in log
    assert "another rank never entered the vote" in log
    assert "snapshot at step 9 skipped" in log
    assert r0["seconds_9"] < 30  # the short group timeout, not a hang


@pytest.mark.slow
def test_a_rank_that_skips_a_call_under_ddp_does_not_abort_the_run(misuse):
    """The monitor called under `if master_process:` at one step of a DDP loop: the other rank
    is in the gradient all-reduce, which lawwatch's first collective would meet (gloo used to
    abort the run: "Received data size doesn't match expected size"). Rank 0 names rank 1 and
    skips; training goes on, in step, and the later snapshots are taken."""
    (r0, r1), log = misuse
    assert r0["ddp_step4"] is not None and r0["ddp_step4"] == r1["ddp_step4"]
    assert r0["ddp_step5"] is None and "ddp_step5" not in r1
    assert r0["ddp_step6"] is not None and r0["ddp_step6"] == r1["ddp_step6"]
    assert r0["ddp_weights"] == r1["ddp_weights"]  # DDP kept the ranks' weights in step
    assert (
        "snapshot at step 5 skipped: rank 1 (its latest snapshot call: step 4) did not reach "
        "it within 2 s" in log
    )
    assert "under `if master_process:`" in log and "terminate called" not in log


# -- single process: the pieces the jobs above rely on ------------------------------------------


def test_single_process_layout():
    where = layout()
    assert (where.rank, where.world, where.device) == (0, 1, torch.device("cpu"))


def test_launch_without_a_group_warns_once(monkeypatch, caplog):
    """WORLD_SIZE=2 (as torchrun sets it) but no process group: each process would measure
    and write alone. (The Accelerator case runs in the misuse job above.)"""
    monkeypatch.setattr(distributed, "_warned_unformed", False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        assert layout().world == 1 and not caplog.records  # a plain single process
        monkeypatch.setenv("WORLD_SIZE", "2")
        for _ in range(3):
            assert layout().world == 1
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "WORLD_SIZE=2" in message and "no torch.distributed process group" in message
    assert "init_process_group()" in message and "LawWatch(accelerator=...)" in message


def test_plain_model_is_measured_as_is(gpt2):
    assert measured_module(gpt2) is gpt2 and not is_sharded(gpt2)
    assert measured_module(gpt2, unwrap=lambda m: m.transformer) is gpt2.transformer


_FRESH = {tiny_gpt2: gpt2_norm, tiny_llama: llama_norm}


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_runs_from_the_root_and_keeps_one_logit(build, probe):
    """The forward enters at the root (as FSDP and ZeRO-3 need) without full-vocabulary logits,
    and gives the same PR as the paper's protocol on the body alone."""
    model = build().double()
    widths = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    stats = accumulate(model, probe, batch_size=4)
    handle.remove()
    assert widths and set(widths) == {1}  # logits_to_keep=1: no (batch, length, vocab) logits
    expected = paper_reference(model, probe, _FRESH[build](16))
    got = stats.compute().cpu().numpy()
    np.testing.assert_allclose(got[:-1], expected[:-1], rtol=0, atol=1e-12)
    # the last entry: Llama's own RMSNorm (the reference's) computes in float32
    np.testing.assert_allclose(got[-1], expected[-1], rtol=0, atol=1e-8)


def test_shards_cover_every_example_once_with_equal_batches():
    """ProbeSet.shard: equal forward counts for every world size and batch size, including
    more ranks than sequences, and every example in exactly one shard."""
    probe = ragged_probe(seed=7, rows=11)
    for world in (1, 2, 3, 4, 7, 11, 12, 16):
        shards = [probe.shard(rank, world) for rank in range(world)]
        assert sum(s.num_examples() for s in shards) == probe.num_examples()
        rows = torch.cat([s.input_ids[example_mask(s.attention_mask).any(dim=1)] for s in shards])
        assert rows.shape[0] == int(example_mask(probe.attention_mask).any(dim=1).sum())
        for batch_size in (1, 2, 3, 5, 8, 64):
            counts = {len(list(s.batches(batch_size))) for s in shards}
            assert len(counts) == 1, (world, batch_size, counts)


def test_a_step_is_attempted_once_even_when_it_fails(gpt2, caplog):
    # the held-out part's targets take one value: every snapshot fails (a probe too small
    # for the hidden size, or of one target value, is refused when the monitor is built)
    tiny = unsolvable_probe()
    watch = LawWatch(gpt2, tiny, max_overhead=None, every=1, split=UNSOLVABLE_SPLIT)
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        assert watch.maybe_snapshot(3) is None
    assert not watch.should_snapshot(3) and watch.should_snapshot(4)
    assert watch.state_dict() == {"history": [], "last_step": 3}
    resumed = LawWatch(gpt2, tiny, max_overhead=None, every=1, split=UNSOLVABLE_SPLIT)
    resumed.load_state_dict(watch.state_dict(), resume_step=2)
    assert resumed.should_snapshot(3)


def test_scalars(gpt2, probe):
    """What every tracker sink logs (the sink itself runs against a real Accelerator
    and W&B offline in tests/test_recipes.py)."""
    snapshot = lawwatch.measure(gpt2, probe)
    values = scalars(snapshot)
    assert values["lawwatch/pearson_r"] == snapshot.fit.pearson_r
    assert values["lawwatch/rho"] == snapshot.fit.rho
    assert values["lawwatch/n_tokens"] == probe.num_examples()
    pr_keys = sorted(k for k in values if k.startswith("lawwatch/pr/"))
    assert pr_keys == [f"lawwatch/pr/layer_{i:02d}" for i in range(snapshot.pr.numel())]
    assert [values[k] for k in pr_keys] == snapshot.pr.tolist()
    snapshot.extra.update(note="text", lr=0.5)
    values = scalars(snapshot)
    assert values["lawwatch/lr"] == 0.5 and "lawwatch/note" not in values


# -- the precision of a snapshot under accelerate's bf16 autocast -------------------------------


@pytest.fixture(scope="module")
def bf16_ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    launch("tests.helpers.workers.precision_worker", out)
    return results(out)


@pytest.mark.slow
def test_ddp_under_bf16_autocast_snapshots_the_float32_weights(bf16_ddp):
    r0, r1 = bf16_ddp
    assert r0["world"] == 2 and r0["wrapper"] == "DistributedDataParallel"
    assert r0["forward_wrapped"]  # accelerate wrapped the forward in autocast …
    assert r0["training_dtypes"] == ["torch.bfloat16"]  # … and training runs under it
    assert r0["snapshot_dtypes"] == ["torch.float32"]  # the probe forward does not
    for step in (0, 1):
        for r in (r0, r1):
            assert max_diff(r[f"step{step}"], r0[f"ref{step}"]) <= TOL
    assert r0["precision0"] == r1["precision0"] == "float32"
    assert r0["forward_restored"] and r1["forward_restored"]  # training keeps its autocast


def test_the_unformed_group_warning_names_the_shipped_cpu_launch(monkeypatch, caplog):
    """Not `--multi_gpu` (accelerate's GPU launcher): the CPU launch line the docs give."""
    from pathlib import Path

    from lawwatch.watch import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_warned_unformed", False)
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        assert distributed.warn_unformed(object())
    (said,) = [r.getMessage() for r in caplog.records]
    line = "ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/cpu_2proc.yaml"
    assert line in said and "--multi_gpu" not in said
    root = Path(__file__).resolve().parents[1]
    assert (root / "configs/accelerate/cpu_2proc.yaml").is_file()
    assert line in (root / "docs/scale.md").read_text()
