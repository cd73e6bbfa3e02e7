"""One rank's part of a snapshot: its shard of the probe measured, and nothing else disturbed.

The probe forward runs through the module :func:`lawwatch.models.measured_module` picks, with
the RNG state forked (left as found), so that a snapshot is invisible to training. A failure is
returned, not raised, after every forward pass has run: under FSDP and ZeRO-3 each forward is a
collective, and the other ranks must not be left waiting in one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from lawwatch.config import MeasureConfig
from lawwatch.measurement import accumulate, model_device
from lawwatch.models import measured_module
from lawwatch.precision import forward_precision
from lawwatch.probe import ProbeSet
from lawwatch.stats import Statistics
from lawwatch.watch.distributed import Layout


class Measured(NamedTuple):
    """What a rank's measurement gave."""

    stats: Statistics | None  # the statistics of the shard (None when it failed)
    error: BaseException | None  # the first error, if any
    precision: str | None  # of the forward (None when the model could not say)


def measure_shard(
    model: nn.Module,
    shard: ProbeSet,
    config: MeasureConfig,
    targets: Any,
    where: Layout,
    unwrap: Callable[[nn.Module], nn.Module] | None = None,
) -> Measured:
    """This rank's statistics of ``shard``, or the first error (after every forward pass)."""
    errors: list[BaseException] = []
    stats, precision = None, None
    try:
        module = measured_module(model, unwrap)
        precision = forward_precision(module)
        device = model_device(module)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            stats = accumulate(module, shard, config, targets, errors=errors)
        if stats is not None and where.world > 1:
            stats.to(where.device)  # allocate before the vote, not inside the reduction
    except Exception as error:  # before or inside a forward pass
        errors.append(error)
    if stats is None and not errors:
        errors.append(RuntimeError("the probe shard gave no batch"))
    return Measured(stats, errors[0] if errors else None, precision)
