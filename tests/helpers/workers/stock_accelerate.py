"""A stock accelerate training loop, as run_clm_no_trainer.py writes it, plus lawwatch's lines.

Nothing here asks for the CPU or a process group: ``Accelerator()`` with no arguments, the way
unmodified scripts create it. ``python stock_accelerate.py OUT`` writes ``OUT/rank-<pid>.json``
(what the Accelerator saw, the losses) and lawwatch's history to ``OUT/lawwatch``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from lawwatch import ProbeSet
from lawwatch.integrations.accelerate import AcceleratorWatch
from tests.helpers.models import VOCAB, ragged_probe, tiny_gpt2

STEPS = 6


def main() -> None:
    out = Path(sys.argv[1])
    accelerator = Accelerator()
    torch.manual_seed(0)
    model = tiny_gpt2(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(1, VOCAB, (4 * STEPS, 16), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    probe: ProbeSet = ragged_probe(seed=3)
    # lawwatch: the lines the docs show
    watch = AcceleratorWatch(accelerator, model, probe, every=2, directory=out / "lawwatch")
    losses = []
    model.train()
    for step, batch in enumerate(loader):
        if step == STEPS:
            break
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        watch.maybe_snapshot(step)
    watch.close()
    seen = {"index": accelerator.process_index, "processes": accelerator.num_processes}
    (out / f"rank-{os.getpid()}.json").write_text(json.dumps({**seen, "losses": losses}))


if __name__ == "__main__":
    main()
