"""ConsoleSink: one line per snapshot on standard output, for runs without a tracker.

``lawwatch step 200: r = -0.982 ± 0.006, rho = 0.71, 1.4 s`` (rho near 1 as ``1 - 0.00269``;
the first line without ``±`` says why). The line goes through
``tqdm.write`` while a tqdm progress bar is open (the Trainer's, accelerate scripts'), which
clears the bar, prints and redraws it, so the line never lands inside a bar; otherwise it is
printed. Not a logging handler: the line is the run's output, like the Trainer's own loss
lines, whatever the user's logging configuration (which, by default, would hide it, or, with a
root handler at INFO, print it twice).
"""

from __future__ import annotations

import logging
import math
import sys
from typing import TextIO

from lawwatch.history import Snapshot
from lawwatch.stats.build import AUTO_JACKKNIFE_SEQUENCES

__all__ = ["ConsoleSink"]

log = logging.getLogger("lawwatch")


class ConsoleSink:
    """Prints a one-line summary of each snapshot (the monitor writes it on the main process).

    Args:
        stream: Where to print when no progress bar is open (default: ``sys.stdout`` at the
            time of writing).
    """

    threadsafe = False  # shares the terminal with the training loop's progress bar

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._broken = False  # the stream failed once: said, and nothing more printed
        self._explained = False  # why a line has no standard error: said once

    @staticmethod
    def line(snapshot: Snapshot) -> str:
        """The summary: step, r (± its jackknife standard error when measured), rho, seconds.

        With ``by_group``, each group's r follows (``—`` for a group without a PR).

        rho is written so that values near 1 stay apart: within 0.01 of 1 as ``1 - 0.00269``
        (three significant digits of ``1 - rho``), else to three significant digits.
        """
        se = snapshot.extra.get("pearson_r_se")
        r = f"{snapshot.fit.pearson_r:.3f}" + ("" if se is None else f" ± {se:.3f}")
        text = (
            f"lawwatch step {snapshot.step}: r = {r}, rho = {rho_text(snapshot.fit.rho)}, "
            f"{snapshot.seconds:.1f} s"
        )
        groups = snapshot.extra.get("groups")
        if isinstance(groups, dict) and groups:  # by_group: each group's r ("—": none)
            each = [
                f"{name} {g['pearson_r']:.3f}" if g.get("pearson_r") is not None else f"{name} —"
                for name, g in groups.items()
            ]
            text += f"; r by group: {', '.join(each)}"
        return text

    @staticmethod
    def why_no_error(snapshot: Snapshot) -> str | None:
        """Why the line shows no ``± se``, or None when it shows one.

        The standard error comes from the jackknife (``MeasureConfig.jackknife``): off, or
        ``'auto'`` with too few probe sequences (two per group at least) or over its memory cap.
        """
        if snapshot.extra.get("pearson_r_se") is not None:
            return None
        config = snapshot.extra.get("config")
        chosen = config.get("jackknife", "auto") if isinstance(config, dict) else "auto"
        if chosen is None:
            return "no ± standard error: measured with jackknife=None"
        if chosen == "auto":
            return (
                f"no ± standard error: jackknife='auto' needs at least "
                f"{AUTO_JACKKNIFE_SEQUENCES} probe sequences (and its statistics within "
                "1 GiB); pass jackknife=<groups> for one"
            )
        return f"no ± standard error: the jackknife's {chosen} groups gave none"

    def write(self, snapshot: Snapshot) -> None:
        """Print the snapshot's line, around any open tqdm bar.

        The first line without a standard error says why, once.
        """
        text = self.line(snapshot)
        why = None if self._explained else self.why_no_error(snapshot)
        if why is not None:
            self._explained = True
            text = f"{text} ({why})"
        self.say(text)

    def say(self, text: str) -> None:
        """Print ``text`` as the run's output: around any open tqdm bar, else on the stream.

        A stream that cannot be written (closed, a broken pipe) is said once, as a WARNING on
        the ``"lawwatch"`` logger, and nothing more is printed: the records still reach the
        history and the trackers.
        """
        if self._broken:
            return
        stream = self.stream or sys.stdout
        try:
            tqdm = sys.modules.get("tqdm")  # only if the training loop imported it
            bars = getattr(getattr(tqdm, "tqdm", None), "_instances", None)
            if bars:
                tqdm.tqdm.write(text, file=stream)
                return
            print(text, file=stream, flush=True)
        except (OSError, ValueError) as error:  # closed file: ValueError; broken pipe: OSError
            self._broken = True
            log.warning(
                "lawwatch: the console line cannot be printed (%s: %s); no more lines are "
                "printed, the history and trackers still get every record.",
                type(error).__name__,
                error,
            )

    def close(self) -> None:
        """Nothing to release."""


def rho_text(rho: float) -> str:
    """The decay ratio as printed: ``0.712``; within 0.01 of 1, ``1 - 0.00269`` or ``1 + 1.3e-4``.

    Three significant digits of rho alone print every value of 0.995 to 1.005 as ``1``; the
    law's decay near 1 is in ``1 - rho``.
    """
    if not math.isfinite(rho):
        return str(rho)
    gap = 1.0 - rho
    if gap == 0.0 or abs(gap) >= 0.01:
        return f"{rho:.3g}"
    return f"1 {'-' if gap > 0 else '+'} {abs(gap):.3g}"
