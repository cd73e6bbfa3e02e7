"""LightningWatch: the law of equi-learning, measured live inside a Lightning ``Trainer``.

``Trainer(..., callbacks=[LightningWatch(probe, every=100)])``. A thin adapter: it says *when*
to measure (at optimizer steps) and passes *where* records go to :class:`~lawwatch.LawWatch`
(see :mod:`lawwatch.output.run`). Nothing here may stop training: a failure is logged to the
``"lawwatch"`` logger and training goes on.

Lightning ships under two import paths, ``lightning.pytorch`` and ``pytorch_lightning``, with
two ``Callback`` base classes. :func:`lightning_callback` builds the callback class on either;
:class:`LightningWatch` here is built on ``lightning.pytorch`` (on ``pytorch_lightning`` when
only that is installed), and :mod:`lawwatch.integrations.pytorch_lightning` holds the one on
``pytorch_lightning``. The events are the same (:class:`LightningEvents`).
"""

from __future__ import annotations

import functools
import importlib
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from lawwatch.alerts import Alerts
from lawwatch.config import MeasureConfig
from lawwatch.integrations.framework import (
    checked_probe,
    monitor_attribute,
    never_raises,
    refused,
)
from lawwatch.measurement import check_options
from lawwatch.models import is_hf
from lawwatch.output.layout import run_directory
from lawwatch.output.run import Outputs
from lawwatch.output.sinks import Sink
from lawwatch.output.trackers import TrainerRun
from lawwatch.output.trackers.lightning import lightning_trackers
from lawwatch.probe import ProbeSet
from lawwatch.watch.config import WatchConfig, build_configs
from lawwatch.watch.monitor import LawWatch

__all__ = ["LightningEvents", "LightningWatch", "lightning_callback", "lightning_model"]

PACKAGES = ("lightning.pytorch", "pytorch_lightning")
"""The import paths of Lightning's ``Trainer``, the one named first preferred."""


def lightning_model(module: nn.Module, config: MeasureConfig) -> nn.Module:
    """The model inside a ``LightningModule`` that the probe runs through.

    With ``blocks`` given, the ``LightningModule`` itself (the names are its own, its
    ``forward`` takes the token ids). Otherwise the one attribute that is a model with a
    depth (a transformers model, or a model whose ``config`` has ``n_layer``, as nanoGPT's),
    else the ``LightningModule`` itself (blocks defined in it).
    """
    if config.blocks is not None or getattr(module, "config", None) is not None:
        return module
    found = [child for child in module.children() if is_hf(child) or _has_depth(child)]
    return found[0] if len(found) == 1 else module


def _has_depth(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return getattr(config, "num_hidden_layers", getattr(config, "n_layer", None)) is not None


def final_step(trainer: Any) -> int | None:
    """The last optimizer step of a fit: ``max_steps``, else Lightning's estimate for epochs."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        estimate = trainer.estimated_stepping_batches
    except Exception:  # an iterable of unknown length
        return None
    return int(estimate) if math.isfinite(estimate) and estimate > 0 else None


class LightningEvents:
    """Measure the law of equi-learning while a Lightning ``Trainer`` fits.

    Every process measures its shard of the probe: step 0 when training starts, the schedule
    at each optimizer step (``trainer.global_step``: with ``accumulate_grad_batches`` the
    batches that step no optimizer are not steps), and the final step (``max_steps`` at its own
    batch, while the loggers are open; a ``max_epochs`` run or an early stop at
    ``on_train_end``); a validation-only run (``trainer.validate``) once, at the model's step.
    The main process writes ``<trainer.log_dir or default_root_dir>/lawwatch/``
    (history, PR matrix, probe, ``law.png`` at the end) and logs the law to every logger in
    ``trainer.loggers`` (:mod:`lawwatch.output.trackers.lightning`).

    The model is found inside the ``LightningModule`` (:func:`lightning_model`); when its
    blocks cannot be told, the error says which ``blocks=`` and ``final_norm=`` to pass.

    Its state (the history) goes into Lightning's checkpoints (``state_dict``); a fit resumed
    with ``trainer.fit(..., ckpt_path=...)`` continues one history: records after the
    checkpoint are redone, none twice, none lost. With ``background``, pending results are
    recorded before a checkpoint is written.

    Args:
        probe: The held-out probe set.
        config: The measurement options (:class:`~lawwatch.config.MeasureConfig`).
        watch: When to measure and at what cost (:class:`~lawwatch.watch.config.WatchConfig`;
            ``last_step`` defaults to the fit's last optimizer step).
        directory: Where the local files go. Default:
            ``<trainer.log_dir or trainer.default_root_dir>/lawwatch``.
        sinks: More sinks for every snapshot (main process only).
        alerts: ``True`` (or an :class:`~lawwatch.alerts.Alerts`) raises an alert when the law
            emerges, breaks after emerging, or a layer's PR stops falling. Off by default.
        **options: Fields of either config overriding ``config``'s or ``watch``'s.

    Raises:
        TypeError: An unknown option, a probe not a :class:`~lawwatch.ProbeSet`, ``sinks``
            not sinks, or ``alerts`` neither a bool nor an ``Alerts``.
        ValueError: An invalid option value, or an empty probe.

    Attributes:
        monitor: The :class:`~lawwatch.LawWatch` of the current fit.
    """

    def __init__(
        self,
        probe: ProbeSet,
        config: MeasureConfig | None = None,
        watch: WatchConfig | None = None,
        *,
        directory: str | Path | None = None,
        sinks: list[Sink] | None = None,
        alerts: bool | Alerts = False,
        **options: Any,
    ) -> None:
        super().__init__()
        # bad settings fail here, where the user builds the callback, not mid-training
        self.probe = checked_probe(probe)
        self.config, self.watch = build_configs(config, watch, **options)
        check_options(self.probe, self.config)  # what needs no model; the rest at train start
        self.outputs = Outputs(directory, sinks=sinks, alerts=Alerts.of(alerts), strict=False)
        self.monitor: LawWatch | None = None
        self._restored: dict[str, Any] | None = None  # a checkpoint's state, loaded at start
        self._step: int | None = None  # the latest global step seen

    trackers = monitor_attribute("trackers", "Logger sink name -> its sink (main process).")
    directory = monitor_attribute("directory", "Where the local files are (from train start).")
    report_path = monitor_attribute("report_path", "The PNG written at train end, if any.")
    emergence_step = monitor_attribute(
        "emergence_step", "First step from which r stays at or below the threshold."
    )

    # -- Lightning's events ---------------------------------------------------------------------

    @never_raises
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Open the outputs (main process), restore a resumed history, measure the start.

        Here, not at fit start: Lightning restores the global step of a checkpoint just before.
        """
        self._open(trainer, pl_module)
        if self.monitor is not None:
            self.monitor.measure_at(trainer.global_step)

    @never_raises
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """A validation-only run (``trainer.validate``): the model measured once, at its step."""
        if getattr(trainer.state.fn, "value", trainer.state.fn) != "validate":
            return  # a fit's validation: the fit's events measure
        self._open(trainer, pl_module)
        try:
            self._finish(trainer)
        finally:
            if self.monitor is not None:
                self.monitor.close()

    @never_raises
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After an optimizer step: measure when the schedule says so; the last step is final."""
        step = trainer.global_step
        if self.monitor is None or step == self._step:  # an accumulating batch: no step
            return
        self._step = step
        self.monitor.maybe_snapshot(step)
        if 0 < trainer.max_steps <= step:
            self._finish(trainer)

    @never_raises
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """The final snapshot and the report if not yet done; close the outputs."""
        if self.monitor is None:
            return
        try:
            self._finish(trainer)
        finally:
            self.monitor.close()

    @never_raises
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Training failed: what is recorded stays, no report (the run did not end)."""
        if self.monitor is not None:
            self.monitor.outputs.close(report=False)

    def state_dict(self) -> dict[str, Any]:
        """What Lightning keeps in its checkpoint: the history (pending results recorded first)."""
        if self.monitor is None:
            return dict(self._restored or {})
        try:
            return self.monitor.state_dict()
        except Exception:  # a checkpoint is still written, without lawwatch's latest state
            return {"history": self.monitor.history.records, "last_step": self.monitor.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's state: it is loaded when training starts again."""
        self._restored = dict(state_dict)

    # -- helpers ------------------------------------------------------------------------------

    def _open(self, trainer: Any, pl_module: Any) -> None:
        """The monitor of this run: its outputs opened (main process), a checkpoint's history."""
        if self.monitor is not None:  # a run that ended without its end event: its files
            self.monitor.outputs.close(report=False)
        self.monitor = None
        start, restored, self._restored = trainer.global_step, self._restored, None
        watch = self.watch
        if watch.last_step is None:
            watch = watch.replace(last_step=final_step(trainer))
        root = trainer.log_dir or trainer.default_root_dir  # log_dir: on every rank (broadcast)
        run = TrainerRun(since=time.time(), emergence_threshold=watch.emergence_threshold)
        loggers = lightning_trackers(trainer.loggers, run) if trainer.is_global_zero else []
        outputs = replace(
            self.outputs,
            directory=self.outputs.directory or run_directory(root),
            trackers=loggers,
            # a checkpoint without lawwatch's state: the directory's records are the history
            resume_step=start if start > 0 and not restored else None,
        )
        config = self.config
        with refused("this training is not measured"):  # the reason, in one line
            self.monitor = LawWatch(
                pl_module,
                self.probe,
                config,
                watch,
                unwrap=lambda module: lightning_model(module, config),
                outputs=outputs,
            )
        if self.monitor is not None and restored:
            self.monitor.load_state_dict(restored, resume_step=start)
        self._step = start

    def _finish(self, trainer: Any) -> None:
        """Measure the final step if not yet done; the PNG and the report to the loggers."""
        if self.monitor is not None:
            self.monitor.finish(trainer.global_step)


@functools.cache
def lightning_callback(package: str) -> type:
    """The callback class on ``package``'s ``Callback`` (``"lightning.pytorch"``, …).

    Raises:
        ImportError: ``package`` is not installed (``pip install 'lawwatch[lightning]'``).
    """
    if package not in PACKAGES:
        raise ValueError(f"package must be one of {PACKAGES}, got {package!r}.")
    base = importlib.import_module(package).Callback
    return type(
        "LightningWatch",
        (LightningEvents, base),
        {"__module__": __name__, "__doc__": LightningEvents.__doc__},
    )


def _installed() -> str:
    for package in PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            continue
        return package
    raise ImportError(
        "lawwatch.integrations.lightning needs Lightning: pip install 'lawwatch[lightning]'."
    )


LightningWatch = lightning_callback(_installed())
