"""The ``lawwatch`` command: ``lawwatch demo`` trains a small GPT-2 and shows the law emerge.

Options come from the fields of the config dataclass and their docstrings, so ``--help`` and
the code cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import sys
import textwrap
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, Literal


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--option`` per field: type, choices and default from the annotation and value."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in fields(cls):
        kind = hints[field.name]
        options: dict[str, Any] = {"default": field.default, "dest": field.name}
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
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
        parser.add_argument("--" + field.name.replace("_", "-"), **options)


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
