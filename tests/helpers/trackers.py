"""What every tracker should hold, how to read TensorBoard back, and an accelerate loop."""

from __future__ import annotations

from lawwatch.history import History
from lawwatch.output.sinks import scalars
from tests.helpers.trainer import Tokens

STEPS = [0, 1, 2, 4]  # every=2, max_steps=4: step 0, powers of two, multiples of 2


def expected_scalars(records):
    """Step -> the scalars every tracker should hold, from the local history."""
    return {r["step"]: scalars(History([r]).snapshots()[0]) for r in records}


def read_events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(directory), size_guidance={"scalars": 0, "tensors": 0, "images": 0}
    )
    events.Reload()
    return events


def accelerate_loop(accelerator, model, optimizer, watch, steps: int = 4) -> None:
    """Train ``steps`` steps of 8 sequences (the loss logged first), snapshots at 0 … steps."""
    data = Tokens()
    for step in range(steps + 1):
        if step > 0:
            batch = data.ids[8 * (step - 1) : 8 * step]
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            accelerator.log({"train/loss": loss.item()}, step=step)
        watch.maybe_snapshot(step)
