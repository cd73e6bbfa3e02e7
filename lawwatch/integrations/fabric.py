"""Lightning Fabric loops: the monitor wired to the Fabric's processes, loggers and checkpoints.

A Fabric loop needs three lines::

    watch = FabricWatch(fabric, model, probe, every=500, directory="run/lawwatch")
    state = {"model": model, "optimizer": optimizer, "step": step, "lawwatch": watch}
    ...
    watch.maybe_snapshot(step)  # on every process, after each optimizer step

The watch is a stateful object of the checkpoint's state: ``fabric.save(path, state)`` keeps
its history and ``fabric.load(path, state)`` restores it (on every process), so a resumed
loop continues one history. The process layout is the Fabric's (``global_rank``,
``world_size``, ``device``); on the main process every snapshot goes to each of
``fabric.loggers`` (:mod:`lawwatch.output.trackers.lightning`) and, with ``directory``, to a
:class:`~lawwatch.output.store.LocalHistory` there. Where records go is
:mod:`lawwatch.output.run`'s; this adapter only says which.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lawwatch.alerts import Alerts
from lawwatch.config import MeasureConfig
from lawwatch.output.run import Outputs
from lawwatch.output.sinks import Sink
from lawwatch.output.trackers import TrainerRun
from lawwatch.output.trackers.lightning import lightning_trackers
from lawwatch.probe import ProbeSet
from lawwatch.watch.config import WatchConfig, build_configs
from lawwatch.watch.monitor import LawWatch

__all__ = ["FabricWatch"]


class FabricProcesses:
    """A Fabric's process layout, as :func:`lawwatch.watch.distributed.layout` reads one."""

    def __init__(self, fabric: Any) -> None:
        self.fabric = fabric

    @property
    def process_index(self) -> int:
        """This process's global rank."""
        return int(self.fabric.global_rank)

    @property
    def num_processes(self) -> int:
        """The number of processes."""
        return int(self.fabric.world_size)

    @property
    def device(self) -> torch.device:
        """This process's device (collective tensors live there: the CPU for gloo)."""
        return self.fabric.device


def fabric_module(model: nn.Module) -> nn.Module:
    """The module a ``fabric.setup`` wrapper trains (DDP or FSDP around the model, or the model).

    Its forward, not the wrapper's: the Fabric's autocast is not the probe's (lawwatch runs the
    probe eagerly at the weights' precision), and lawwatch strips DDP and keeps an FSDP root.
    """
    try:
        from lightning.fabric.wrappers import _FabricModule
    except ImportError:
        return model
    return model._forward_module if isinstance(model, _FabricModule) else model


class FabricWatch(LawWatch):
    """:class:`~lawwatch.LawWatch` for a Lightning Fabric loop: its layout, loggers and state.

    Args:
        fabric: The loop's ``lightning.fabric.Fabric`` (launched): the process layout, and the
            loggers every snapshot is logged to (main process).
        model: The model, as ``fabric.setup`` returned it.
        probe: The full probe set; each process measures its shard.
        config: The measurement options (see :class:`~lawwatch.config.MeasureConfig`).
        watch: When to measure and at what cost (see
            :class:`~lawwatch.watch.config.WatchConfig`). With ``background``, call
            :meth:`~lawwatch.LawWatch.close` on every process at the end of training.
        directory: Where the main process keeps ``history.jsonl`` and ``pr.safetensors`` and,
            at :meth:`~lawwatch.LawWatch.close`, ``law.png``; None for none.
        sinks: More sinks (main process only).
        alerts: ``True`` (or an :class:`~lawwatch.alerts.Alerts`) raises an alert when the law
            emerges, breaks, or a layer's PR stops falling (W&B loggers get them too).
        unwrap: As in :class:`~lawwatch.LawWatch`, applied after the Fabric's wrapper is taken
            off (:func:`fabric_module`).
        **options: Fields of :class:`~lawwatch.config.MeasureConfig` or of
            :class:`~lawwatch.watch.config.WatchConfig` overriding ``config``'s or ``watch``'s.
    """

    def __init__(
        self,
        fabric: Any,
        model: nn.Module,
        probe: ProbeSet,
        config: MeasureConfig | None = None,
        watch: WatchConfig | None = None,
        *,
        directory: str | Path | None = None,
        sinks: list[Sink] | None = None,
        alerts: bool | Alerts = False,
        unwrap: Callable[[nn.Module], nn.Module] | None = None,
        **options: Any,
    ) -> None:
        config, watch = build_configs(config, watch, **options)  # checked on every process
        outputs = Outputs(directory, sinks=sinks, alerts=Alerts.of(alerts))
        if fabric.is_global_zero:  # the loggers' runs exist on the main process only
            run = TrainerRun(emergence_threshold=watch.emergence_threshold)
            outputs.trackers = lightning_trackers(fabric.loggers, run)

        def unwrapped(module: nn.Module) -> nn.Module:
            module = fabric_module(module)
            return module if unwrap is None else unwrap(module)

        self.fabric = fabric
        super().__init__(
            model,
            probe,
            config,
            watch,
            accelerator=FabricProcesses(fabric),
            unwrap=unwrapped,
            outputs=outputs,
        )
