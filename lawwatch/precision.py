"""How a probe forward runs: eagerly, at the weights' own precision, whatever training uses.

PR moves with the precision of the forward (a bf16 residual stream keeps its rounding: ~3e-3 in
PR on a small GPT-2), so a series of snapshots is only comparable at one precision. The rule:

* **Autocast is off** for the probe forward, on every wrapping: a ``torch.autocast`` region the
  snapshot is called from, and the autocast that 🤗 Accelerate (and so the ``Trainer``, under
  ``bf16=True`` / ``fp16=True``) wraps around the prepared model's ``forward``. The forward
  computes in the weights' dtype: float32 weights give a float32 measurement.
* **Sharded models** (FSDP with a mixed-precision policy, DeepSpeed ZeRO-3) compute in the
  dtype the framework gathers the weights in; that precision is part of the sharding and is
  what is measured.

:func:`forward_precision` names the precision (recorded as ``precision`` in every history
record); :func:`plain_forward` is the context a probe forward runs in (also eager: compiled
code runs as the model's code defines it, without recompiling for the probe's shapes).
:func:`exact_float32_matmul` keeps lawwatch's own float32 products (a ``"mixed"`` Gram, the
lens's logits) in IEEE float32, whatever TF32 or bf16 setting training made global.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "STATS_PRECISIONS",
    "exact_float32_matmul",
    "forward_precision",
    "log_statistics_precision",
    "plain_forward",
    "slow_fp64",
]

log = logging.getLogger("lawwatch")

StatsPrecision = Literal["float64", "mixed"]
STATS_PRECISIONS: tuple[str, ...] = ("float64", "mixed")
# CUDA compute capabilities whose FP64 runs at 1/2 of FP32 (P100, V100, A100, H100/H200,
# B200); the others (consumer cards, L4/L40S, RTX 6000: 8.6, 8.9, 12.x, ...) run it at 1/64
FAST_FP64_CAPABILITIES = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fsdp_param_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype an FSDP root gathers its weights in under a mixed-precision policy, if any."""
    get_state = getattr(model, "_get_fsdp_state", None)  # FSDP2's FSDPModule
    if callable(get_state):
        try:
            return get_state()._mp_policy.param_dtype
        except Exception:  # torch's private state moved: fall back to the weights' dtype
            return None
    if type(model).__name__ == "FullyShardedDataParallel":  # FSDP1
        return getattr(getattr(model, "mixed_precision", None), "param_dtype", None)
    return None


def forward_precision(model: nn.Module) -> str:
    """The precision a probe forward through ``model`` computes in, as recorded.

    ``"float32"`` (or the weights' other dtype; ``"bfloat16+float32"`` for mixed weights) for
    an unsharded model; ``"bfloat16 (FSDP mixed-precision policy)"`` for an FSDP root whose
    policy gathers the weights in bf16; ``"… (DeepSpeed ZeRO-3)"`` for partitioned weights.

    Args:
        model: The module the probe runs through (:func:`lawwatch.models.measured_module`).
    """
    policy = _fsdp_param_dtype(model)
    if policy is not None:
        return f"{_name(policy)} (FSDP mixed-precision policy)"
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    label = "+".join(sorted(_name(d) for d in dtypes)) or _name(torch.get_default_dtype())
    first = next(model.parameters(), None)
    if first is not None and hasattr(first, "ds_id"):  # a ZeRO-3 partitioned parameter
        label += " (DeepSpeed ZeRO-3)"
    return label


@contextmanager
def _accelerate_forward_unwrapped(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with the forward it had before ``accelerator.prepare`` wrapped it.

    Under mixed precision, ``Accelerator.prepare_model`` replaces the model's ``forward`` by
    ``convert_outputs_to_fp32(autocast(forward))`` and keeps the original as
    ``_original_forward``; an autocast entered inside the forward would override ours. The
    instance attribute is swapped back afterwards (module hooks, FSDP's included, still run:
    the model is still called through ``nn.Module.__call__``).
    """
    patched = model.__dict__.get("forward")
    original = model.__dict__.get("_original_forward")
    if patched is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = patched


@contextmanager
def _eager() -> Iterator[None]:
    """Compiled code (``module.compile()``, ``torch.compile``d functions) runs eagerly inside.

    A probe forward is not the training step a compiled graph was built for: its hooks and
    batch shapes would make ``torch.compile`` recompile (and, past its limit, fall back) on
    every snapshot. The eager forward is the model's own definition.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


@contextmanager
def plain_forward(model: nn.Module) -> Iterator[None]:
    """The context of a probe forward through ``model``: eager, autocast off, weights' dtype."""
    param = next(model.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    try:
        no_autocast: Any = torch.autocast(device, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to turn off
        no_autocast = nullcontext()
    with _accelerate_forward_unwrapped(model), no_autocast, _eager():
        yield


def slow_fp64(device: torch.device) -> bool:
    """Whether float64 matrix products on ``device`` run far below the float32 rate.

    True on NVIDIA GPUs outside ``FAST_FP64_CAPABILITIES`` (1/64 of FP32) and on accelerators
    other than CUDA/ROCm and the CPU; False on the CPU (about 1/2), on NVIDIA's datacenter GPUs
    with FP64 units and on ROCm GPUs (the Instinct line).
    """
    if device.type == "cpu":
        return False
    if device.type == "cuda":  # untested here: no GPU in the test suite
        if getattr(torch.version, "hip", None):
            return False
        return torch.cuda.get_device_capability(device) not in FAST_FP64_CAPABILITIES
    return True


_logged: set[tuple[str, str]] = set()


def log_statistics_precision(precision: str, device: torch.device) -> None:
    """Say once per process and device in which precision the statistics are formed.

    ``device`` is where each batch's products are computed (the model's device). On a device
    with slow float64 (:func:`slow_fp64`) the message says what that costs and what
    ``precision="mixed"`` would cost in accuracy.
    """
    key = (precision, str(device))
    if key in _logged:
        return
    _logged.add(key)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if precision == "float64" and slow_fp64(device):
        log.warning(
            "lawwatch: statistics in float64 on %s, whose float64 runs at a small fraction of "
            "its float32 rate: snapshots cost more here. precision='mixed' is faster but moves "
            "PR by percents on trained models (see MeasureConfig.precision).",
            name,
        )
    else:
        log.debug("lawwatch: statistics precision %s on %s", precision, name)


@contextmanager
def exact_float32_matmul() -> Iterator[None]:
    """Run float32 matmuls in IEEE float32 inside the block, whatever the global setting.

    ``torch.set_float32_matmul_precision("high")`` (or the per-backend ``fp32_precision``
    switches) let float32 matmuls run in TF32 on CUDA and in bf16 on CPUs with AMX: ~1e-3
    relative, useless for a Gram matrix. The per-backend switches are set to ``"ieee"`` and
    restored on exit (the per-backend API works whether the user set the legacy or the new one;
    torch before 2.9 has only the legacy switches, which are used there).
    """
    cuda = torch.backends.cuda.matmul
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    if not hasattr(cuda, "fp32_precision") or mkldnn is None:  # torch < 2.9
        legacy = (torch.get_float32_matmul_precision(), cuda.allow_tf32)
        torch.set_float32_matmul_precision("highest")
        cuda.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(legacy[0])
            cuda.allow_tf32 = legacy[1]
        return
    before = (cuda.fp32_precision, mkldnn.fp32_precision)
    cuda.fp32_precision = "ieee"
    mkldnn.fp32_precision = "ieee"
    try:
        yield
    finally:
        cuda.fp32_precision, mkldnn.fp32_precision = before
