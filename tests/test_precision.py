"""The precision you were told: a snapshot runs in the weights' dtype, autocast off, everywhere.

Training under bf16 autocast (the ``Trainer``'s ``bf16=True``, accelerate's
``mixed_precision="bf16"``, a ``torch.autocast`` region of one's own) must not reach the probe
forward: the snapshot of float32 weights equals a float32 measurement of the same weights, and
every record says which precision it was measured at. (2-process DDP and FSDP2: see
``tests/test_distributed.py``.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

from lawwatch import LawWatch, measure
from lawwatch.history import History
from lawwatch.integrations.hf import LawWatchCallback
from lawwatch.precision import exact_float32_matmul, forward_precision
from tests.helpers.models import ragged_probe, tiny_gpt2

TOL = 1e-9


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(list(a), list(b), strict=True))


@pytest.fixture
def bf16_accelerator():
    """A single-process Accelerator under bf16 autocast; its global state reset after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)


def test_cpu_bf16_autocast_moves_pr():
    """The premise: bf16 autocast on CPU changes what a forward computes, hence PR."""
    model, probe = tiny_gpt2(), ragged_probe()
    plain = measure(model, probe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(input_ids=probe.input_ids[:2], output_hidden_states=True).hidden_states
    assert hidden[1].dtype == torch.float32  # the residual stream itself stays float32 …
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits = model(input_ids=probe.input_ids[:2]).logits
    assert logits.dtype == torch.bfloat16  # … but the matmuls ran in bf16
    assert plain.extra["precision"] == "float32"


def test_a_snapshot_inside_autocast_measures_the_weights_dtype():
    model, probe = tiny_gpt2(), ragged_probe()
    reference = measure(model, probe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = LawWatch(model, probe).snapshot(0)
        measured = measure(model, probe)
    assert max_diff(inside.pr, reference.pr) <= TOL and max_diff(measured.pr, reference.pr) <= TOL
    assert inside.extra["precision"] == measured.extra["precision"] == "float32"


def test_accelerate_bf16_one_process(bf16_accelerator):
    accelerator = bf16_accelerator
    model, probe = tiny_gpt2(), ragged_probe()
    reference = measure(copy.deepcopy(model), probe)
    prepared = accelerator.prepare(model)
    assert "_original_forward" in prepared.__dict__  # accelerate wrapped forward in autocast
    with torch.no_grad():
        out = prepared(input_ids=probe.input_ids[:2])
    assert out.logits.dtype == torch.float32  # convert_outputs_to_fp32 …
    watch = LawWatch(prepared, probe, accelerator=accelerator)
    snap = watch.snapshot(0)
    assert max_diff(snap.pr, reference.pr) <= TOL
    assert snap.extra["precision"] == "float32"
    assert prepared.forward is prepared.__dict__["forward"]  # the wrapper is put back


def test_trainer_bf16_snapshots_in_float32(tmp_path):
    from tests.helpers.trainer import Tokens

    probe = ragged_probe()
    reference = measure(tiny_gpt2(0), probe)
    callback = LawWatchCallback(probe, max_overhead=None, every=2)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=tiny_gpt2(0), args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    records = History.read(tmp_path / "lawwatch").records
    assert [r["step"] for r in records] == [0, 1, 2]
    assert max_diff(records[0]["pr"], reference.pr.tolist()) <= TOL
    # the trained weights too: the last snapshot is a float32 measurement of them
    final = measure(trainer.model, probe)
    assert max_diff(records[-1]["pr"], final.pr.tolist()) <= TOL
    assert {r["precision"] for r in records} == {"float32"}


def test_precision_names():
    model = tiny_gpt2()
    assert forward_precision(model) == "float32"
    assert forward_precision(copy.deepcopy(model).to(torch.bfloat16)) == "bfloat16"
    assert forward_precision(model.double()) == "float64"
    half = tiny_gpt2()
    half.lm_head = torch.nn.Linear(16, 97, bias=False).to(torch.bfloat16)
    assert forward_precision(half) == "bfloat16+float32"


def test_exact_float32_matmul_restores_the_legacy_setting():
    torch.set_float32_matmul_precision("high")  # the legacy API, as many training scripts do
    try:
        with exact_float32_matmul():
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
