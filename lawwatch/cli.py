"""The ``lawwatch`` command: ``lawwatch demo`` trains a small GPT-2 and shows the law emerge.

Options come from the fields of the config dataclass and their docstrings, so ``--help`` and
the code cannot drift apart.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from typing import Any, Literal

from lawwatch.config import MeasureConfig, field_docs


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    parsers: Mapping[str, Callable[[str], Any]] | None = None,
    flags: Mapping[str, str] | None = None,
) -> None:
    """One ``--option`` per field: type, choices and default from the annotation and value.

    Args:
        parser: The parser or argument group to add to.
        cls: The dataclass.
        parsers: Field name -> function parsing its text, for fields of composite types.
        flags: Field name -> the option's name where the field's own would clash (the parsed
            value still lands under the field name).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in fields(cls):
        kind = hints[field.name]
        options: dict[str, Any] = {"default": field.default, "dest": field.name}
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if parsers and field.name in parsers:
            options["type"] = parsers[field.name]
            options["metavar"] = field.name.upper()
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            options["choices"] = typing.get_args(kind)
        else:
            options["type"] = kind
        if field.default is MISSING:
            options.pop("default")
            options["required"] = True
        help_text = docs.get(field.name, "")
        options["help"] = f"{help_text} (default: {field.default})".replace("%", "%%")
        flag = (flags or {}).get(field.name, field.name)
        parser.add_argument("--" + flag.replace("_", "-"), **options)


def _layers(text: str) -> int | tuple[int, ...]:
    """``4`` (every 4th entry) or ``1,6,-1`` (those entries)."""
    try:
        return int(text) if "," not in text else tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give an int k (every k-th entry) or entries like 1,6,-1"
        ) from None


def _blocks(text: str) -> str | re.Pattern[str] | tuple[str, ...]:
    """A name or glob; ``re:PATTERN`` for a regex; ``a,b,c`` for a list of names."""
    if text.startswith("re:"):
        return re.compile(text[3:])
    return tuple(text.split(",")) if "," in text else text


MEASURE_PARSERS: dict[str, Callable[[str], Any]] = {
    "layers": _layers,
    "blocks": _blocks,
    "final_norm": str,
}
"""How the command line spells the MeasureConfig fields of composite type."""


def add_measure_arguments(
    parser: argparse.ArgumentParser, flags: Mapping[str, str] | None = None
) -> None:
    """The fields of :class:`~lawwatch.config.MeasureConfig` as an option group.

    Args:
        parser: The command's parser.
        flags: Field name -> option name, for fields whose names the command already uses.
    """
    group = parser.add_argument_group(
        "measurement options (lawwatch.MeasureConfig; the defaults are the paper's protocol)"
    )
    add_dataclass_arguments(group, MeasureConfig, parsers=MEASURE_PARSERS, flags=flags)


def measure_config(args: argparse.Namespace) -> MeasureConfig:
    """The :class:`~lawwatch.config.MeasureConfig` of parsed command-line options."""
    return MeasureConfig(**{name: getattr(args, name) for name in MeasureConfig.names()})


def build_parser() -> argparse.ArgumentParser:
    """The ``lawwatch`` argument parser."""
    from lawwatch.demo import DemoConfig

    parser = argparse.ArgumentParser(
        prog="lawwatch",
        description="Watch the law of equi-learning (He & Su, arXiv 2408.13442) emerge.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train a small GPT-2 from scratch on CPU and watch the law emerge",
        description=(
            "Train a small GPT-2 from scratch on CPU on text CPython ships, with the "
            "lawwatch Trainer callback, a live table and a W&B run (offline unless you are "
            "logged in)."
        ),
    )
    add_dataclass_arguments(demo, DemoConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lawwatch`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from lawwatch.demo import DemoConfig, run_demo

        try:
            config = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
        except ValueError as error:
            print(f"lawwatch demo: {error}", file=sys.stderr)
            return 2
        run_demo(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
