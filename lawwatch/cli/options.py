"""A config dataclass as command-line options, and the parsed options back as the dataclass.

Every config of lawwatch (``MeasureConfig``, ``ProbeSpec``, the demo's ``DemoConfig``) documents
each field with a docstring under it. :class:`DataclassOptions` turns the fields into one
``--field-name`` option each, with that docstring as the help, and builds the dataclass from
the parsed values, so ``--help`` and the code cannot drift apart. A new config takes one line:
``DataclassOptions(WatchConfig, "monitor options")``.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from typing import Any, Literal

from lawwatch.config import field_docs

__all__ = ["DataclassOptions"]

PLAIN = (int, float, str)
"""The types whose own constructor parses an option's text."""


@dataclass(frozen=True)
class DataclassOptions:
    """The fields of one config dataclass as command-line options.

    Each option's type, choices and default come from the field's annotation and default: a
    ``bool`` is a ``--name/--no-name`` switch, a ``Literal`` a choice, ``tuple[X, ...]`` one or
    more values, ``X | None`` an ``X``. A field of any other type needs its parser in
    ``overrides``.

    Example::

        MEASURE = DataclassOptions(MeasureConfig, "measurement options")
        MEASURE.add(parser)
        config = MEASURE.build(parser.parse_args())
    """

    cls: type
    """A dataclass whose fields are documented by a docstring under each."""
    title: str | None = None
    """The title of the options' group in ``--help`` (None: no group of their own)."""
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Field name -> ``add_argument`` keywords replacing the derived ones, e.g. ``{"layers":
    {"type": parse_layers}}`` for a field of composite type, or a ``metavar``."""

    def __post_init__(self) -> None:
        if not (isinstance(self.cls, type) and is_dataclass(self.cls)):
            raise TypeError(f"DataclassOptions needs a dataclass, got {self.cls!r}.")
        unknown = sorted(set(self.overrides) - {f.name for f in fields(self.cls)})
        if unknown:
            raise ValueError(f"overrides name {unknown}, which are not fields of {self._name}.")

    @property
    def _name(self) -> str:
        return self.cls.__name__

    def _dest(self, name: str) -> str:
        # namespaced, so two configs with a field of the same name (seed) share one parser
        return f"{self._name}.{name}"

    def add(
        self,
        parser: argparse.ArgumentParser | argparse._ArgumentGroup,
        *,
        flags: Mapping[str, str] | None = None,
    ) -> None:
        """Add one ``--option`` per field to ``parser``.

        Args:
            parser: The command's parser (a group of it when :attr:`title` is None).
            flags: Field name -> option name, where the field's own name is taken by another
                option of the command (``{"seed": "probe_seed"}`` gives ``--probe-seed``).

        Raises:
            TypeError: A field whose type has no command-line spelling and no parser in
                :attr:`overrides`.
        """
        hints = typing.get_type_hints(self.cls)
        docs = field_docs(self.cls)
        if self.title is not None:
            parser = parser.add_argument_group(self.title)
        for f in _init_fields(self.cls):
            flag = (flags or {}).get(f.name, f.name).replace("_", "-")
            options = {**_derived(hints[f.name]), **self.overrides.get(f.name, {})}
            if not options.keys() & {"type", "action", "choices"}:
                raise TypeError(
                    f"{self._name}.{f.name} is a {hints[f.name]}, which has no command-line "
                    f"spelling: give its parser, DataclassOptions({self._name}, overrides="
                    f"{{{f.name!r}: {{'type': parse_text}}}})."
                )
            if "action" not in options and "choices" not in options:
                options.setdefault("metavar", flag.replace("-", "_").upper())
            default = _default(f)
            if default is MISSING:
                options["required"] = True
                note = "required"
            else:
                # absent from the namespace unless given: :meth:`build` fills the default in,
                # and :meth:`given` tells what the user typed from what was left out
                options["default"] = argparse.SUPPRESS
                note = f"default: {default}"
            options["help"] = f"{docs.get(f.name, '')} ({note})".replace("%", "%%")
            parser.add_argument("--" + flag, dest=self._dest(f.name), **options)

    def build(self, args: argparse.Namespace, **defaults: Any) -> Any:
        """The dataclass of the parsed options (its own checks raise on a bad value).

        An option not given takes ``defaults[name]`` if there, else the field's default.
        """
        values = {
            f.name: getattr(args, self._dest(f.name), defaults.get(f.name, _default(f)))
            for f in _init_fields(self.cls)
        }
        # argparse gathers several values in a list; a frozen config keeps a tuple (hashable)
        return self.cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def given(self, args: argparse.Namespace) -> set[str]:
        """The fields whose option was given on the command line (even at its default)."""
        return {f.name for f in _init_fields(self.cls) if hasattr(args, self._dest(f.name))}


def _derived(kind: Any) -> dict[str, Any]:
    """The ``add_argument`` keywords an annotation implies ({} when it implies none)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
        members = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(members) != 1:
            return {}
        kind = members[0]
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is Literal:
        return {"choices": typing.get_args(kind)}
    if typing.get_origin(kind) is tuple:
        item, *rest = typing.get_args(kind)
        return {"type": item, "nargs": "+"} if rest == [Ellipsis] and item in PLAIN else {}
    return {"type": kind} if kind in PLAIN else {}


def _init_fields(cls: type) -> list[Field[Any]]:
    return [f for f in fields(cls) if f.init]


def _default(f: Field[Any]) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default
