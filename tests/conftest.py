"""Tiny real Hugging Face models built from explicit configs (no hub)."""

from __future__ import annotations

import os
import tempfile

# Before any tracker package is imported (transformers imports comet_ml with its integrations):
# comet_ml would otherwise patch MLflow to mirror every MLflow run into a Comet experiment and
# report its own errors over the network; trackio reads its directory once, on import (a
# scratch one, not the user's cache).
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="lawwatch-trackio-"))

import pytest
import torch
from transformers.utils import logging as hf_logging

from lawwatch import ProbeSet
from tests.helpers.default_demo import BackgroundDemo
from tests.helpers.models import ragged_probe, tiny_gpt2, tiny_llama
from tests.helpers.wandb_offline import offline_wandb  # noqa: F401  (a fixture: offline W&B runs)

hf_logging.set_verbosity_error()
torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test. Tiny models run tiny ops (RWKV and Mamba loop over
    tokens on CPU): on a busy 2-core machine a second thread makes each op wait for the other
    core, measured at 2.7 s instead of 5 ms for one tiny RWKV forward."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def probe() -> ProbeSet:
    return ragged_probe()


# -- the default demo: trained beside the other tests, checked after them ----------------------

_DEMO = pytest.StashKey[BackgroundDemo]()


@pytest.hookimpl(trylast=True)  # after deselection (-m, -k): only the tests that will run
def pytest_collection_modifyitems(config, items):
    """The tests that use ``default_demo`` go last: its process trains meanwhile."""
    items.sort(key=lambda item: "default_demo" in getattr(item, "fixturenames", ()))


def pytest_collection_finish(session):
    """Start the default demo's process (tests/helpers/default_demo.py) when a test uses it."""
    wanted = any("default_demo" in getattr(item, "fixturenames", ()) for item in session.items)
    if wanted and not session.config.option.collectonly:
        session.config.stash[_DEMO] = BackgroundDemo()


def pytest_sessionfinish(session):
    demo = session.config.stash.get(_DEMO, None)
    if demo is not None:
        demo.stop()


@pytest.fixture(scope="session")
def default_demo(request) -> dict:
    """The default demo's result (records, emergence step, plot), once its process ends."""
    demo = request.config.stash.get(_DEMO, None)
    if demo is None:  # not started when collection ended (a plugin's late selection)
        demo = request.config.stash[_DEMO] = BackgroundDemo()
    return demo.result()
