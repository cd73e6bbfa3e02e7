"""``lawwatch probe build`` / ``lawwatch probe show``: make a probe file, or show what one holds.

:data:`PROBE` (the fields of :class:`~lawwatch.probe.ProbeSpec`) also serves ``lawwatch
analyze``, which builds its probe the same way.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lawwatch.cli import fail
from lawwatch.cli.options import DataclassOptions
from lawwatch.probe import ProbeSet, ProbeSpec

PROBE = DataclassOptions(
    ProbeSpec,
    "building a probe (from texts, a saved dataset or a token file)",
    overrides={"texts": {"metavar": "FILE_OR_GLOB"}},
)


def add(commands: Any) -> None:
    """Register ``probe`` (``build`` and ``show``) on the ``lawwatch`` subcommands."""
    probe = commands.add_parser(
        "probe",
        help="build a probe file, or show what one holds",
        description="Build a probe file (held-out token sequences) or show what one holds.",
    )
    actions = probe.add_subparsers(dest="probe_command", required=True)
    build = actions.add_parser(
        "build",
        help="build a probe file from texts, a saved dataset or a token file",
        description=(
            "Build a probe file (.safetensors: tokens, mask, provenance, hashes) from text "
            "files, a datasets.Dataset saved with save_to_disk, or a file of token ids."
        ),
    )
    build.add_argument("--out", required=True, help="the probe file to write (.safetensors)")
    PROBE.add(build)
    retrieval = build.add_argument_group(
        "the synthetic retrieval probe (docs/retrieval.md)",
        "k key-value passages, a question about one, its answer the marked target; grouped by "
        "the queried passage's position. Takes --tokenizer (a fast one), --seed and "
        "--max-length (default: the longest context) and no other source.",
    )
    retrieval.add_argument(
        "--retrieval", action="store_true", help="build the retrieval probe (no other source)"
    )
    retrieval.add_argument(
        "--passages", type=int, default=5, help="key-value passages per context (default 5)"
    )
    retrieval.add_argument(
        "--per-position", type=int, default=8, help="contexts per position (default 8)"
    )
    retrieval.add_argument(
        "--positions",
        type=int,
        default=3,
        help="positions of the queried passage (default 3: beginning, middle, end)",
    )
    show = actions.add_parser(
        "show",
        help="what a probe file holds: summary, provenance, hashes",
        description="Print a probe file's summary, provenance and content hash (checked).",
    )
    show.add_argument("file", help="a probe file written by ProbeSet.save / lawwatch probe build")
    show.add_argument("--offset", type=int, default=1, help="target offset of the summary")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    probe.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``build`` or ``show``; 2 when the sources or the file are refused."""
    return _build(args) if args.probe_command == "build" else _show(args)


def _build(args: argparse.Namespace) -> int:
    try:
        probe = _retrieval(args) if args.retrieval else PROBE.build(args).build()
        path = probe.save(args.out)
    except (ValueError, TypeError, OSError) as error:
        return fail("probe build", error)
    summary = probe.summary()
    print(
        f"{path}: {summary['sequences']} sequences of up to {summary['length']} tokens, "
        f"{summary['examples']} examples; content hash {probe.content_hash()}"
    )
    for name, count in probe.group_examples().items():
        print(f"  group {name}: {count} examples")
    return 0


# the probe options --retrieval takes; any other is refused (the probe makes its own texts)
_RETRIEVAL_TAKES = {"tokenizer", "max_length", "seed"}


def _retrieval(args: argparse.Namespace) -> ProbeSet:
    """The retrieval probe of ``--retrieval`` (its options checked first).

    Raises:
        ValueError: A probe source or option it does not take, no tokenizer, or what
            :func:`~lawwatch.probe.retrieval_probe` refuses.
    """
    from lawwatch.probe import load_tokenizer, retrieval_probe

    others = sorted(PROBE.given(args) - _RETRIEVAL_TAKES)
    if others:
        flags = ", ".join("--" + name.replace("_", "-") for name in others)
        raise ValueError(
            f"--retrieval builds its own texts and takes only --tokenizer, --seed and "
            f"--max-length of the probe options; leave out {flags}."
        )
    spec = PROBE.build(args)
    if spec.tokenizer is None:
        raise ValueError("--retrieval needs --tokenizer NAME_OR_PATH (a fast tokenizer).")
    return retrieval_probe(
        load_tokenizer(spec.tokenizer),
        passages=args.passages,
        per_position=args.per_position,
        positions=args.positions,
        seed=spec.seed,
        max_length=spec.max_length if "max_length" in PROBE.given(args) else None,
    )


def _show(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    try:
        probe = ProbeSet.load(args.file)
        with safe_open(args.file, framework="pt") as f:
            file_format = (f.metadata() or {}).get("format")
    except (ValueError, OSError) as error:
        return fail("probe show", error)
    shown = {
        "file": str(args.file),
        "format": file_format,
        "content_hash": probe.content_hash(),
        "summary": probe.summary(args.offset),
        "offset": args.offset,
        "meta": probe.meta,
    }
    if probe.group_names:
        shown["groups"] = probe.group_examples(args.offset)
    if args.json:
        print(json.dumps(shown, indent=2))
        return 0
    print(f"{shown['file']}  ({file_format}, hashes checked)")
    print(f"content hash  {shown['content_hash']}")
    for key, value in shown["summary"].items():
        print(f"{key:<27} {value}")
    for name, count in shown.get("groups", {}).items():
        print(f"group {name:<21} {count} examples")
    print("provenance")
    for key, value in probe.meta.items():
        print(f"  {key:<25} {json.dumps(value)}")
    return 0
