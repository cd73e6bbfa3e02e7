"""`lawwatch analyze` under torchrun, rank 1 SIGKILLed as it loads its second checkpoint.

``torchrun --nproc_per_node 2 -m tests.helpers.workers.sweep_kill ARGS…`` runs
``lawwatch analyze ARGS…`` unchanged, except that rank 1's second ``load_model`` kills its own
process (``kill -9``): its first checkpoint is measured and handed over, nothing after it is.
torchrun then stops the main process wherever it is.
"""

import os
import signal
import sys

import lawwatch.analyze
from lawwatch import cli

_load_model = lawwatch.analyze.load_model
_loads: list[int] = []


def _killing_load(ckpt, options=None):
    _loads.append(ckpt.step)
    if os.environ.get("RANK") == "1" and len(_loads) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return _load_model(ckpt, options)


lawwatch.analyze.load_model = _killing_load
sys.exit(cli.main(["analyze", *sys.argv[1:]]))
