"""Run under `torchrun --nproc_per_node 2`: a DDP Trainer (gloo, CPU) with LawWatchCallback.

Each process writes result_<rank>.json in the output directory: its rank, the steps it
measured, and on rank 0 the final PR of the history next to a single-process measurement of the
trained model on the full probe. The model is float64, so the comparison sees the sharding and
the reduction, not float32 differences between batch shapes (those alone reach ~1e-9 here).
"""

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from transformers import Trainer, TrainingArguments  # noqa: E402

from lawwatch import measure  # noqa: E402
from lawwatch.integrations.hf import LawWatchCallback  # noqa: E402
from lawwatch.output.store import read_history  # noqa: E402
from tests.helpers.models import ragged_probe, tiny_gpt2  # noqa: E402
from tests.helpers.trainer import Tokens  # noqa: E402

out = sys.argv[1]
probe = ragged_probe(rows=13)  # odd: the shards differ in size, one is padded
callback = LawWatchCallback(probe, max_overhead=None, every=2)
args = TrainingArguments(
    output_dir=out,
    max_steps=5,
    per_device_train_batch_size=4,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
    ddp_backend="gloo",
)
trainer = Trainer(
    model=tiny_gpt2(0).double(), args=args, train_dataset=Tokens(), callbacks=[callback]
)
trainer.train()
line = {"rank": torch.distributed.get_rank(), "done": callback.monitor.last_step}
if line["rank"] == 0:
    records = read_history(callback.directory).records
    line["steps"] = [r["step"] for r in records]
    line["n_tokens"] = records[-1]["n_tokens"]
    line["final_pr"] = records[-1]["pr"]
    line["single_process_pr"] = measure(trainer.model, probe).pr.tolist()
    line["probe_examples"] = probe.num_examples()
# every measured value agrees across ranks; the wall time is each rank's own
line["history"] = [{k: v for k, v in r.items() if k != "seconds"} for r in callback.monitor.history]
# one file per rank: the ranks' stdout (merged with stderr by the launcher) can interleave
Path(out, f"result_{line['rank']}.json").write_text(json.dumps(line))
# a gloo group never destroyed can abort a finished rank at exit (pytorch/pytorch#190489)
torch.distributed.barrier()  # drain gloo's worker threads first (see recipes/common.py)
torch.distributed.destroy_process_group()
