"""``lawwatch demo``: its options are the fields of :class:`~lawwatch.demo.DemoConfig`."""

from __future__ import annotations

import argparse
from typing import Any

from lawwatch.cli import fail
from lawwatch.cli.options import DataclassOptions


def _options() -> DataclassOptions:
    # the demo package loads only when the parser is built: the library never imports it
    from lawwatch.demo import DemoConfig

    return DataclassOptions(DemoConfig)


def add(commands: Any) -> None:
    """Register ``demo`` on the ``lawwatch`` subcommands."""
    demo = commands.add_parser(
        "demo",
        help="train a small GPT-2 from scratch on CPU and watch the law emerge",
        description=(
            "Train a small GPT-2 from scratch on CPU on text CPython ships, with the "
            "lawwatch Trainer callback, a live table and a W&B run (offline unless you are "
            "logged in)."
        ),
    )
    _options().add(demo)
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed options."""
    from lawwatch.demo import run_demo

    try:
        config = _options().build(args)
    except ValueError as error:
        return fail("demo", error)
    run_demo(config)
    return 0
