"""What every worker shares: quiet setup, probes that do not split evenly, result files."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from lawwatch import ProbeSet
from tests.helpers.models import VOCAB, ragged_probe

TIMEOUT_S = 60  # process-group timeout: a hang becomes a failure, well inside the test's


def setup() -> Path:
    """One thread, lawwatch's log on stderr; returns the output directory (argv[1])."""
    torch.set_num_threads(1)
    logging.basicConfig(stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    return out


def uneven_probe() -> ProbeSet:
    """13 ragged rows: 2 ranks get 7 and 6 (+1 fully masked) rows; at batch_size 2 rank 1's
    last batch is entirely padding."""
    return ragged_probe(seed=3, rows=13, max_len=24)


def lopsided_probe() -> ProbeSet:
    """8 rows; the last 4 (rank 1's shard of 2) are single tokens, so rank 1 has no example."""
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, VOCAB, (24,), generator=gen).tolist() for _ in range(4)]
    rows += [[int(torch.randint(1, VOCAB, (1,), generator=gen))] for _ in range(4)]
    return ProbeSet.from_tokens(rows)


def poison(module, args, output):
    """A forward hook that turns a block's output (a tensor or a tuple led by one) into NaN."""
    nan = float("nan")
    return (output[0] * nan, *output[1:]) if isinstance(output, tuple) else output * nan


def pr_list(snapshot: Any) -> list[float] | None:
    return None if snapshot is None else snapshot.pr.tolist()


def write(out: Path, rank: int, results: dict[str, Any]) -> None:
    """``rank{r}.json``: floats survive JSON exactly (shortest round-trip repr)."""
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    os.sync()
