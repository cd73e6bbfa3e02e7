"""Lightning fits in a process of their own: a kill between checkpoints, its resume, DDP.

``python -m tests.helpers.workers.lightning_worker OUT kill``: fits toward 8 steps with a
checkpoint every 4 steps and LightningWatch(every=2); a callback after
lawwatch's SIGKILLs the process at the end of step 7 (step 6 is in the history, checkpoint 4 is
the latest on disk). ``... OUT resume``: ``trainer.fit(ckpt_path=<step-4 checkpoint>)`` to
step 8, with ``background=True``.

``torchrun --nproc_per_node 2 -m tests.helpers.workers.lightning_worker OUT ddp``: on 2 CPU
processes (gloo, ``strategy="ddp"``, float64), a fit with LightningWatch then the same fit
without it; writes each rank's losses of both fits (``losses-<rank>.json``) and, from rank 0,
the final weights (``final.pt``).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from tests.helpers.workers.common import setup

out = setup()

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lawwatch.integrations.lightning import LightningWatch  # noqa: E402
from tests.helpers.lightning_fit import fit  # noqa: E402
from tests.helpers.models import ragged_probe  # noqa: E402


class KillAtStep(pl.Callback):
    """SIGKILL at the end of a step: after lawwatch's snapshot, before any later checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


mode = sys.argv[2]
if mode in ("kill", "resume"):
    checkpoints = ModelCheckpoint(
        dirpath=out / "checkpoints", every_n_train_steps=4, save_top_k=-1, filename="{step}"
    )
    # the default directory: <log_dir>/lawwatch, a new logger version when resumed
    # the killed fit records in the foreground (step 6 on disk when it dies); the resumed one
    # in the background: the step-8 checkpoint must hold step 8's record, pending when it is saved
    watch = LightningWatch(ragged_probe(), every=2, max_overhead=None, background=mode == "resume")
    callbacks = [watch, checkpoints] + ([KillAtStep(7)] if mode == "kill" else [])
    fit(
        out,
        callbacks,
        logger=pl.loggers.TensorBoardLogger(out),
        max_steps=8,
        enable_checkpointing=True,
        ckpt_path=str(out / "checkpoints" / "step=4.ckpt") if mode == "resume" else None,
    )
elif mode == "ddp":
    runs = {}
    for name, callbacks in [
        ("watched", [LightningWatch(ragged_probe(), every=2, max_overhead=None)]),
        ("plain", []),
    ]:
        module = fit(
            out / name,
            callbacks,
            max_steps=4,
            strategy="ddp",
            devices=2,
            rows=32,
            # float64: the 1e-9 bound then tests the sharding, not float32 batch shapes
            precision="64-true",
        )
        runs[name] = module.losses
        if name == "watched" and torch.distributed.get_rank() == 0:
            torch.save(module.model.state_dict(), out / "final.pt")
    rank = torch.distributed.get_rank()
    (out / f"losses-{rank}.json").write_text(json.dumps(runs))
else:
    raise SystemExit(f"unknown mode {mode!r}")
