"""ConsoleSink: one line per snapshot on standard output, for runs without a tracker.

``lawwatch step 200: r = -0.982 ± 0.006, rho = 0.71, 1.4 s``. The line goes through
``tqdm.write`` while a tqdm progress bar is open (the Trainer's, accelerate scripts'), which
clears the bar, prints and redraws it, so the line never lands inside a bar; otherwise it is
printed. Not a logging handler: the line is the run's output, like the Trainer's own loss
lines, whatever the user's logging configuration (which, by default, would hide it, or, with a
root handler at INFO, print it twice).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from lawwatch.history import Snapshot

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

    @staticmethod
    def line(snapshot: Snapshot) -> str:
        """The summary: step, r (± its jackknife standard error when measured), rho, seconds."""
        se = snapshot.extra.get("pearson_r_se")
        r = f"{snapshot.fit.pearson_r:.3f}" + ("" if se is None else f" ± {se:.3f}")
        return (
            f"lawwatch step {snapshot.step}: r = {r}, rho = {snapshot.fit.rho:.3g}, "
            f"{snapshot.seconds:.1f} s"
        )

    def write(self, snapshot: Snapshot) -> None:
        """Print the snapshot's line, around any open tqdm bar."""
        self.say(self.line(snapshot))

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
