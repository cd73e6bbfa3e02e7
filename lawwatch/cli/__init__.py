"""The ``lawwatch`` command: one module per subcommand, each with ``add`` and ``run``.

- ``lawwatch demo``: train a small GPT-2 and watch the law emerge (:mod:`.demo`);
- ``lawwatch analyze``: measure the law on saved checkpoints (:mod:`.analyze`);
- ``lawwatch report``: figures and an HTML page from histories (:mod:`.report`);
- ``lawwatch probe build`` / ``lawwatch probe show``: make and inspect probe files (:mod:`.probe`).

Config dataclasses become options through :class:`~lawwatch.cli.options.DataclassOptions`.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "fail", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``lawwatch`` argument parser; each subcommand sets ``run``, its entry point."""
    # here, not at the top: a subcommand module imports `fail` from this package
    from lawwatch.cli import analyze, demo, probe, report

    parser = argparse.ArgumentParser(
        prog="lawwatch",
        description="Watch the law of equi-learning (He & Su, arXiv 2408.13442) emerge.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (demo, analyze, report, probe):
        command.add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lawwatch`` console script: the subcommand's exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)


def fail(command: str, error: BaseException) -> int:
    """Say why ``lawwatch <command>`` refused its arguments; the exit code for bad arguments."""
    print(f"lawwatch {command}: {error}", file=sys.stderr)
    return 2
