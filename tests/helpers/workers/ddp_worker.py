"""DDP through ``Accelerator(cpu=True)``: sharded snapshots equal one process; failures agree.

Run by tests/test_distributed.py as
``torchrun --nproc_per_node 2 -m tests.helpers.workers.ddp_worker OUT``.
Each rank writes ``OUT/rank{r}.json``; rank 0 adds single-process references computed with
``lawwatch.measure`` on the full probe and the same weights. The model is float64 so that the
comparison sees the reduction, not float32 differences between batch shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import InitProcessGroupKwargs

import lawwatch
from lawwatch.output.store import LocalHistory
from tests.helpers.models import VOCAB, tiny_gpt2
from tests.helpers.workers.common import (
    TIMEOUT_S,
    lopsided_probe,
    poison,
    pr_list,
    setup,
    uneven_probe,
    write,
)


def train_step(model, optimizer, accelerator, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed + accelerator.process_index)
    batch = torch.randint(1, VOCAB, (4, 16), generator=gen)
    loss = model(input_ids=batch, labels=batch).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    return float(loss)


def grouped_probe(probe: lawwatch.ProbeSet) -> lawwatch.ProbeSet:
    """``probe`` with groups a, b, c (c on rank 0's shard only) and a target mask that marks
    every third token, and no token of sequences 2 and 9."""
    groups = ["a", "a", "a", "a", "c", "c", "c"] + ["a", "b"] * 3
    marks = probe.attention_mask.clone()
    marks[:, ::3] = False
    marks[[2, 9]] = False
    return lawwatch.ProbeSet(
        probe.input_ids, probe.attention_mask, groups=groups, target_mask=marks
    )


@contextmanager
def short_check_in(seconds: float = 10.0) -> Iterator[None]:
    """The default store's timeout at ``seconds`` for a while: the snapshot's check-in waits for
    a missing rank half of it (``Arrivals.wait_seconds``), instead of half the group's 60 s."""
    store = torch.distributed.distributed_c10d._get_default_store()
    before = store.timeout
    store.set_timeout(timedelta(seconds=seconds))
    try:
        yield
    finally:
        store.set_timeout(before)


def main() -> None:
    out = setup()
    accelerator = Accelerator(
        cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=TIMEOUT_S))]
    )
    rank = accelerator.process_index
    model = tiny_gpt2(seed=0).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    plain = accelerator.unwrap_model(model)
    probe, lopsided = uneven_probe(), lopsided_probe()
    sinks = [LocalHistory(out / "history")] if rank == 0 else []
    watch = lawwatch.LawWatch(
        model, probe, max_overhead=None, every=1, accelerator=accelerator, batch_size=2, sinks=sinks
    )
    results: dict = {
        "distributed_type": str(accelerator.distributed_type),
        "is_ddp": accelerator.distributed_type == DistributedType.MULTI_CPU,
        "world": accelerator.num_processes,
        "wrapper": type(model).__name__,
        "shard_batches": [len(list(watch._shard(r, 2).batches(2))) for r in range(2)],
    }

    def reference(target: str = "token_id", on=probe) -> list[float] | None:
        return lawwatch.measure(plain, on, target=target).pr.tolist() if rank == 0 else None

    # step 0: before any training forward; then train and measure again
    results["step0"] = pr_list(watch.maybe_snapshot(0))
    results["ref0"] = reference()
    results["loss"] = train_step(model, optimizer, accelerator, seed=1)
    results["step1"] = pr_list(watch.maybe_snapshot(1))
    results["ref1"] = reference()
    results["repeat1"] = pr_list(watch.maybe_snapshot(1))  # already attempted: None everywhere
    results["training_mode"] = plain.training and all(m.training for m in plain.modules())
    results["grads_clear"] = all(p.grad is None for p in plain.parameters())

    # the other targets: every rank must use the whole probe's vocabulary
    for target in ("onehot", "token_id_shuffled"):
        other = lawwatch.LawWatch(
            model, probe, target=target, batch_size=3, accelerator=accelerator
        )
        results[target] = pr_list(other.snapshot(1))
        results[f"ref_{target}"] = reference(target)

    # the logit lens rides with the PR statistics: reduced with them (in the snapshot, and
    # before the background solve), equal to one process
    for name, background in (("lens", False), ("lens_background", True)):
        lensed = lawwatch.LawWatch(
            model, probe, lens=0.5, batch_size=3, accelerator=accelerator, background=background
        )
        lensed.snapshot(1)
        lensed.flush()
        results[name] = lensed.history[-1]["lens"] if len(lensed.history) else None
        # the vital signs ride with them too (reduced: sums re-based on the common mean)
        results[f"{name}_health"] = lensed.history[-1]["health"] if len(lensed.history) else None
    ref = lawwatch.measure(plain, probe, lens=0.5) if rank == 0 else None
    results["ref_lens"] = ref.extra["lens"] if ref is not None else None
    results["ref_health"] = ref.extra["health"] if ref is not None else None

    # breakdowns (docs/breakdowns.md): groups (one only on rank 0's shard), a target mask
    # that selects nothing in some sequences, the lens per group and per position bucket
    grouped = grouped_probe(probe)
    breakdowns = {"by_group": True, "lens": 1.0, "position_buckets": 3, "jackknife": None}
    for name, background in (("grouped", False), ("grouped_background", True)):
        watched = lawwatch.LawWatch(
            model,
            grouped,
            batch_size=3,
            accelerator=accelerator,
            background=background,
            **breakdowns,
        )
        watched.snapshot(1)
        watched.flush()
        last = watched.history[-1] if len(watched.history) else {}
        results[name] = {k: last.get(k) for k in ("pr", "groups", "positions")}
    if rank == 0:
        whole = lawwatch.measure(plain, grouped, **breakdowns).to_record()
        results["ref_grouped"] = {k: whole[k] for k in ("pr", "groups", "positions")}
        results["ref_alone"] = {
            name: lawwatch.measure(plain, grouped.group(name), jackknife=None).pr.tolist()
            for name in ("a", "b")
        }
        results["grouped_shard_examples"] = [grouped.shard(r, 2).group_examples() for r in range(2)]

    # rank 1's shard holds no example at all
    empty = lawwatch.LawWatch(model, lopsided, batch_size=3, accelerator=accelerator)
    results["shard_examples"] = [lopsided.shard(r, 2).num_examples() for r in range(2)]
    lopsided_snapshot = empty.snapshot(1)
    results["lopsided"] = pr_list(lopsided_snapshot)
    results["ref_lopsided"] = reference(on=lopsided)
    results["lopsided_health"] = (
        None if lopsided_snapshot is None else lopsided_snapshot.extra["health"]
    )
    results["ref_lopsided_health"] = (
        lawwatch.measure(plain, lopsided).extra["health"] if rank == 0 else None
    )

    # ranks that disagree: different probes; different steps (a mis-called schedule)
    mixed = lawwatch.LawWatch(
        model, probe if rank == 0 else lopsided, batch_size=3, accelerator=accelerator
    )
    results["mixed_probes"] = pr_list(mixed.snapshot(1))
    with short_check_in():  # rank 1 waits for rank 0 at step 6 in vain: 5 s, not 30
        results["mixed_steps"] = pr_list(empty.snapshot(5 + rank))

    # failures on one rank: an exception in its forward, then non-finite features
    block = plain.transformer.h[1]

    def explode(module, args):
        raise RuntimeError("injected failure on rank 1")

    results["loss2"] = train_step(model, optimizer, accelerator, seed=2)
    for step, hook in ((2, "pre"), (3, "post")):
        handle = None
        if rank == 1:
            handle = (
                block.register_forward_pre_hook(explode)
                if hook == "pre"
                else block.register_forward_hook(poison)
            )
        results[f"failed{step}"] = pr_list(watch.maybe_snapshot(step))
        if handle is not None:
            handle.remove()
    # training and later snapshots go on
    results["loss4"] = train_step(model, optimizer, accelerator, seed=4)
    results["step4"] = pr_list(watch.maybe_snapshot(4))
    results["ref4"] = reference()
    # replicas still identical after snapshots and steps
    flat = torch.cat([p.detach().reshape(-1) for p in plain.parameters()])
    gathered = accelerator.gather(flat.unsqueeze(0))
    results["replicas_equal"] = bool(torch.equal(gathered[0], gathered[1]))
    results["history_steps"] = [h["step"] for h in watch.history]
    # the history goes with accelerate's checkpoints (rank 0 saves it, every rank loads it)
    accelerator.register_for_checkpointing(watch)
    accelerator.save_state(str(out / "checkpoint"))
    results["after_checkpoint"] = pr_list(watch.snapshot(6))  # then the run dies
    watch.history, watch.last_step = lawwatch.History(), None  # what a fresh process holds
    accelerator.wait_for_everyone()
    accelerator.load_state(str(out / "checkpoint"))
    results["resumed"] = [[h["step"] for h in watch.history], watch.last_step]
    write(out, rank, results)
    accelerator.wait_for_everyone()
    torch.distributed.barrier()  # drain gloo's worker threads first (see recipes/common.py)
    accelerator.end_training()


if __name__ == "__main__":
    main()
