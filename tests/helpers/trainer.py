"""Training data for the real `Trainer` runs: token patterns a tiny model learns quickly."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from tests.helpers.models import VOCAB, tiny_gpt2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # a PNG file's first bytes


class Tokens(torch.utils.data.Dataset):
    """Causal-LM examples: a few token patterns the tiny model can learn (labels = inputs)."""

    def __init__(self, rows: int = 64, length: int = 16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(1, VOCAB, (rows, 1), generator=gen)
        stride = torch.randint(1, 4, (rows, 1), generator=gen)
        self.ids = (start + stride * torch.arange(length)) % (VOCAB - 1) + 1

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_trainer(out, callbacks, *, max_steps, report_to=(), save_steps=None, seed=0):
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=list(report_to),
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
    )
    return Trainer(model=tiny_gpt2(seed), args=args, train_dataset=Tokens(), callbacks=callbacks)
