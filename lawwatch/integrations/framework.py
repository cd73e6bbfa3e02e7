"""What every framework adapter shares: bad settings fail when it is built, never after.

A callback inside a training framework must never raise into it (a monitor failure is logged
and training goes on), and what it was given is checked where the user builds it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

from lawwatch.probe import ProbeSet

log = logging.getLogger("lawwatch")


def never_raises(event: Callable[..., None]) -> Callable[..., None]:
    """Report any exception of a callback event instead of raising it into the framework."""

    @functools.wraps(event)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            event(self, *args, **kwargs)
        except Exception as error:  # the reason in the line itself, the traceback below it
            log.exception(
                "lawwatch: %s failed, training goes on: %s: %s",
                event.__name__,
                type(error).__name__,
                error,
            )

    return guarded


@contextlib.contextmanager
def refused(what: str) -> Iterator[None]:
    """A monitor refused when built inside the framework: one ERROR line with the reason.

    The settings the model decides (a lens head, the blocks) can only be checked once the
    framework hands the model over; their refusal (``ValueError``, ``TypeError``,
    ``LookupError``: a message naming the setting and its fix) is said in the log line itself,
    without a traceback, and training goes on. Anything else propagates.
    """
    try:
        yield
    except (ValueError, TypeError, LookupError) as error:
        log.error("lawwatch: %s: %s", what, error)


def checked_probe(probe: Any) -> ProbeSet:
    """``probe``, if it is a probe set with something to measure.

    Raises:
        TypeError: Not a :class:`~lawwatch.ProbeSet`.
        ValueError: No (token, next token) pair in it.
    """
    if not isinstance(probe, ProbeSet):
        raise TypeError(
            f"probe must be a lawwatch.ProbeSet, got {type(probe).__name__}; build one with "
            "ProbeSet.from_texts(...) or ProbeSet.from_tokens(...)."
        )
    if len(probe) == 0 or probe.num_examples() == 0:
        raise ValueError("The probe set has no (token, next token) pair to measure.")
    return probe


def monitor_attribute(name: str, doc: str) -> property:
    """An adapter's view of its current monitor's ``name`` (before training: None, or ``{}``)."""
    empty = dict if name == "trackers" else type(None)
    return property(lambda self: getattr(self.monitor, name) if self.monitor else empty(), doc=doc)
