"""``lawwatch report``: figures and an HTML page from histories (:mod:`lawwatch.report`)."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from lawwatch.cli import fail, pearson_r


def _steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give steps like 0,100,1000") from None


def add(commands: Any) -> None:
    """Register ``report`` on the ``lawwatch`` subcommands."""
    from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
    from lawwatch.report import FORMATS

    report = commands.add_parser(
        "report",
        help="figures (PNG, SVG, PDF) and an HTML page from one or more histories",
        description=(
            "Figures of the law (PNG, SVG, PDF) and DIR/report.html, a page that needs no "
            "network, from histories written live (<output_dir>/lawwatch) or by lawwatch "
            "analyze; several histories are compared on each figure."
        ),
    )
    report.add_argument("histories", nargs="+", metavar="HISTORY", help="a history directory")
    report.add_argument("--out", required=True, help="output directory")
    report.add_argument(
        "--label", action="append", help="each history's label, in order (default: its folder)"
    )
    report.add_argument(
        "--steps", type=_steps, help="steps drawn against layer, e.g. 0,100,1000 (default: 6)"
    )
    report.add_argument(
        "--formats",
        type=lambda t: tuple(t.split(",")),
        default=FORMATS,
        help=f"figure formats among {','.join(FORMATS)} (default: all)",
    )
    report.add_argument("--title", default="The law of equi-learning")
    report.add_argument(
        "--emergence-threshold",
        type=pearson_r,
        default=DEFAULT_EMERGENCE_THRESHOLD,
        help=f"Pearson r in [-1, 1] at or below which the law counts as emerged (default "
        f"{DEFAULT_EMERGENCE_THRESHOLD})",
    )
    report.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the report; 2 when the histories cannot be read or drawn."""
    from lawwatch.report import ReportWarning, write_report

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReportWarning)  # printed below, once, in our words
            report = write_report(
                args.histories,
                args.out,
                labels=args.label,
                steps=args.steps,
                emergence_threshold=args.emergence_threshold,
                formats=args.formats,
                title=args.title,
            )
    except (ValueError, OSError) as error:
        return fail("report", error)
    for message in report.warnings:
        print(f"lawwatch report: warning: {message}", file=sys.stderr)
    print(f"lawwatch report: {report.html}")
    return 0
