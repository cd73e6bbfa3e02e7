"""DDP under accelerate's bf16 mixed precision: snapshots still measure the float32 weights.

Run by tests/test_distributed.py as
``torchrun --nproc_per_node 2 -m tests.helpers.workers.precision_worker OUT``.
``Accelerator(cpu=True, mixed_precision="bf16")`` wraps the model's forward in CPU bf16
autocast; training runs under it, the probe forward must not. Rank 0's reference is
``lawwatch.measure`` on an unwrapped float32 copy with the same weights, in the same batches
(12 probe rows, batch size 6: each rank's shard is one reference batch, so both run the same
float32 forwards and only the float64 reduction differs).
"""

from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

import lawwatch
from tests.helpers.models import VOCAB, ragged_probe, tiny_gpt2
from tests.helpers.workers.common import TIMEOUT_S, pr_list, setup, write


def main() -> None:
    out = setup()
    accelerator = Accelerator(
        cpu=True,
        mixed_precision="bf16",
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=TIMEOUT_S))],
    )
    rank = accelerator.process_index
    model = tiny_gpt2(seed=0)  # float32 weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    plain = accelerator.unwrap_model(model, keep_fp32_wrapper=True)
    probe = ragged_probe(seed=3, rows=12, max_len=24)
    watch = lawwatch.LawWatch(
        model, probe, max_overhead=None, every=1, batch_size=6, accelerator=accelerator
    )
    results: dict = {
        "world": accelerator.num_processes,
        "wrapper": type(model).__name__,
        "forward_wrapped": "_original_forward" in plain.__dict__,
    }

    # what dtype a matmul inside the model computes in: bf16 in training, float32 in snapshots
    seen: list[str] = []
    probe_point = plain.transformer.h[0].mlp.c_fc
    handle = probe_point.register_forward_hook(lambda m, a, out: seen.append(str(out.dtype)))

    def reference() -> list[float] | None:
        if rank != 0:
            return None
        weights = tiny_gpt2(seed=0)  # a plain float32 model (no autocast) with the same weights
        weights.load_state_dict(plain.state_dict())
        return lawwatch.measure(weights, probe, batch_size=6).pr.tolist()

    patched = plain.__dict__.get("forward")
    snap = watch.maybe_snapshot(0)
    results["step0"], results["precision0"] = pr_list(snap), snap.extra.get("precision")
    results["snapshot_dtypes"] = sorted(set(seen))
    results["ref0"] = reference()
    seen.clear()
    gen = torch.Generator().manual_seed(1 + rank)
    batch = torch.randint(1, VOCAB, (4, 16), generator=gen)
    loss = model(input_ids=batch, labels=batch).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    results["training_dtypes"] = sorted(set(seen))
    results["loss_dtype"] = str(loss.dtype)
    seen.clear()
    results["step1"] = pr_list(watch.maybe_snapshot(1))
    results["ref1"] = reference()
    handle.remove()
    results["forward_restored"] = patched is not None and plain.__dict__.get("forward") is patched
    write(out, rank, results)
    accelerator.wait_for_everyone()
    torch.distributed.barrier()  # drain gloo's worker threads first (see recipes/common.py)
    accelerator.end_training()


if __name__ == "__main__":
    main()
