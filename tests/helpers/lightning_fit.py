"""A tiny GPT-2 in a ``LightningModule``, its data, and one fit: what the Lightning tests share.

The module keeps every training loss (``losses``) so that runs with and without lawwatch can be
compared step by step; dropout is on (GPT-2's defaults), so a draw from the RNG by the monitor
would show.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.models import VOCAB, tiny_gpt2


class Steps:
    """A transformers GPT-2 held as an attribute (lawwatch finds it inside); its steps."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.model = tiny_gpt2(seed)
        self.losses: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class TinyLM(Steps, pl.LightningModule):
    """:class:`Steps` as a ``lightning.pytorch`` module."""


def pl_tiny_lm(seed: int = 0):
    """:class:`Steps` as a ``pytorch_lightning`` module (the other import path)."""
    import pytorch_lightning

    return type("TinyLM", (Steps, pytorch_lightning.LightningModule), {})(seed)


def batches(rows: int = 48, length: int = 16, batch_size: int = 4) -> DataLoader:
    """``rows`` random token rows (seeded), in order."""
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randint(1, VOCAB, (rows, length), generator=gen))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def trainer(root, callbacks=(), logger=False, **options) -> pl.Trainer:
    """A quiet CPU ``Trainer`` writing under ``root``."""
    options.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        callbacks=list(callbacks),
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **options,
    )


def fit(root, callbacks=(), logger=False, rows: int = 48, ckpt_path=None, **options) -> TinyLM:
    """Seed, build the module and fit it; returns the module (its ``losses``)."""
    pl.seed_everything(0, verbose=False)
    module = TinyLM()
    trainer(root, callbacks, logger, **options).fit(module, batches(rows), ckpt_path=ckpt_path)
    return module
