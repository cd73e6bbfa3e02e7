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

__all__ = ["build_parser", "fail", "main", "pearson_r"]


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


def pearson_r(text: str) -> float:
    """An ``--emergence-threshold``: a finite Pearson r in [-1, 1] (argparse's ``type``).

    Raises:
        argparse.ArgumentTypeError: Not a number, not finite, or outside [-1, 1].
    """
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and -1.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Pearson r: give a number in [-1, 1], e.g. -0.95 (the default: "
            "r at or below it counts as the law having emerged)"
        )
    return value
