"""The demo application: watch the law of equi-learning emerge in a GPT-2 trained from scratch.

``lawwatch demo`` (what ``make demo`` runs) needs nothing from the network: the text is what
CPython itself ships (:mod:`lawwatch.demo.corpus`), the tokenizer is trained on it here, the model
starts from random weights, and the Hugging Face ``Trainer`` trains it on CPU with
:class:`~lawwatch.integrations.hf.LawWatchCallback` attached. W&B runs offline unless W&B
credentials are configured on this machine. Every knob is a field of :class:`DemoConfig`.

An application of the library, not part of it: nothing under ``lawwatch`` imports this package
(the ``lawwatch`` command imports it when asked for ``demo``). Its modules:

* :mod:`~lawwatch.demo.config`: :class:`DemoConfig`, the knobs;
* :mod:`~lawwatch.demo.training`: the data, the model and the ``TrainingArguments``;
* :mod:`~lawwatch.demo.credentials`: online or offline W&B, from local credentials;
* :mod:`~lawwatch.demo.view`: the live table and the closing summary;
* :mod:`~lawwatch.demo.app`: :func:`run_demo`, which puts them together.
"""

from typing import Any

from lawwatch.demo.config import DemoConfig

__all__ = ["DemoConfig", "run_demo"]


def __getattr__(name: str) -> Any:
    """``run_demo``, imported on first use.

    It brings the ``Trainer``'s imports, which the ``lawwatch`` command's parsers and the
    recipes that borrow :mod:`~lawwatch.demo.corpus` do without.
    """
    if name == "run_demo":
        from lawwatch.demo.app import run_demo

        return run_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
