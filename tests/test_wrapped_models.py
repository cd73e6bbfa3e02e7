"""Models as training wraps them: PEFT adapters and ``torch.compile``, measured as they compute.

Each is compared with a float64 measurement of the same function without the wrapper (the
adapters merged into the weights; the uncompiled module), after a training step.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lawwatch import LawWatch, measure
from lawwatch.models import measured_module
from tests.helpers.models import VOCAB, ragged_probe, tiny_gpt2

TOL = 1e-12


def train_step(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch = torch.randint(1, VOCAB, (4, 16), generator=gen)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def logit_widths(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    widths: list[int] = []
    head = model.get_output_embeddings()
    return widths, head.register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))


def test_peft_lora_model_is_measured_with_its_adapters():
    peft = pytest.importorskip("peft")
    probe = ragged_probe()
    config = peft.LoraConfig(
        r=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.1, fan_in_fan_out=True
    )
    model = peft.get_peft_model(tiny_gpt2().double(), config)
    model.train()
    train_step(model)  # LoRA's B starts at zero: a step makes the adapters matter
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # the reference: the adapters merged into the weights, an ordinary model
    merged = copy.deepcopy(model).merge_and_unload()
    reference = measure(merged, probe)
    assert reference.pr.tolist() != measure(tiny_gpt2().double(), probe).pr.tolist()

    widths, handle = logit_widths(model.get_base_model())
    snap = LawWatch(model, probe).snapshot(0)
    handle.remove()
    assert (snap.pr - reference.pr).abs().max() <= TOL
    assert widths and set(widths) == {1}  # the model inside runs with logits_to_keep=1
    assert measured_module(model) is model.get_base_model()
    # the adapters' dropout back in training mode, no gradient left behind
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_compiled_models_are_measured_eagerly():
    """``torch.compile(model)`` (the wrapper, as the Trainer's ``torch_compile`` makes it) and
    ``model.compile()`` (in place): the snapshot measures the model's own function and compiles
    nothing for the probe (its hooks and shapes would recompile on every snapshot)."""
    from torch._dynamo.utils import counters

    probe = ragged_probe()
    for how in ("wrapper", "in place"):
        model = tiny_gpt2().double()
        if how == "wrapper":
            compiled = torch.compile(model, backend="eager")
        else:
            compiled = model
            model.compile(backend="eager")
        train_step(compiled)  # compiles the training forward
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        reference = measure(copy.deepcopy(model), probe)
        snap = LawWatch(compiled, probe).snapshot(0)
        assert (snap.pr - reference.pr).abs().max() <= TOL, how
        assert counters["stats"]["unique_graphs"] == graphs, how  # no compilation for the probe
        torch._dynamo.reset()
