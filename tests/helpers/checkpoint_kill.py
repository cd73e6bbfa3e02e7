"""A Trainer with LawWatchCallback(background=True) killed right after a checkpoint is written.

``python -m tests.helpers.checkpoint_kill OUT kill``: trains 12 steps with a checkpoint every 8
and snapshots at 0, 1, 2, 4, 8, 12; a callback placed before lawwatch's SIGKILLs the process in
the Trainer's ``on_save`` of step 8 (checkpoint-8 is on disk, nothing after it has run).
``python -m tests.helpers.checkpoint_kill OUT resume``: resumes from checkpoint-8 to step 12.
"""

import os
import signal
import sys

import torch

torch.set_num_threads(1)

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lawwatch.integrations.hf import LawWatchCallback  # noqa: E402
from tests.helpers.models import ragged_probe, tiny_gpt2  # noqa: E402
from tests.helpers.trainer import Tokens  # noqa: E402


class KillOnSave(TrainerCallback):
    """SIGKILL at the first checkpoint: the window between the write and the next callback."""

    def on_save(self, args, state, control, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)


out, mode = sys.argv[1], sys.argv[2]
callbacks = [LawWatchCallback(ragged_probe(), max_overhead=None, every=4, background=True)]
if mode == "kill":
    callbacks.insert(0, KillOnSave())
args = TrainingArguments(
    output_dir=out,
    max_steps=12,
    per_device_train_batch_size=4,
    save_strategy="steps",
    save_steps=8,
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
)
trainer = Trainer(model=tiny_gpt2(0), args=args, train_dataset=Tokens(), callbacks=callbacks)
trainer.train(
    resume_from_checkpoint=os.path.join(out, "checkpoint-8") if mode == "resume" else None
)
