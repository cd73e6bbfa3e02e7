"""The ``lawwatch`` command.

- ``lawwatch demo``: train a small GPT-2 and watch the law emerge;
- ``lawwatch analyze``: measure the law on saved checkpoints (:mod:`lawwatch.analyze`);
- ``lawwatch report``: figures and an HTML page from histories (:mod:`lawwatch.report`);
- ``lawwatch probe build`` / ``lawwatch probe show``: make and inspect probe files.

Options come from the fields of the config dataclasses and their docstrings, so ``--help`` and
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
    _add_analyze(commands)
    _add_report(commands)
    _add_probe(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lawwatch`` console script."""
    args = build_parser().parse_args(argv)
    if args.command != "demo":
        return args.run(args)
    if args.command == "demo":
        from lawwatch.demo import DemoConfig, run_demo

        try:
            config = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
        except ValueError as error:
            print(f"lawwatch demo: {error}", file=sys.stderr)
            return 2
        run_demo(config)
    return 0


# -- probes -----------------------------------------------------------------------------------


def add_probe_arguments(
    parser: argparse.ArgumentParser, flags: Mapping[str, str] | None = None
) -> None:
    """The fields of :class:`~lawwatch.probe.spec.ProbeSpec` as an option group.

    Each lands under ``probe_<field>`` (see :func:`probe_spec`).

    Args:
        parser: The command's parser.
        flags: Field name -> option name, for fields whose names the command already uses.
    """
    from lawwatch.probe.spec import ProbeSpec

    group = parser.add_argument_group(
        "building a probe (from texts, a saved dataset or a token file)"
    )
    hints = typing.get_type_hints(ProbeSpec)
    docs = field_docs(ProbeSpec)
    for field in fields(ProbeSpec):
        kind = hints[field.name]
        options: dict[str, Any] = {"dest": "probe_" + field.name, "default": field.default}
        if field.name == "texts":
            options.update(nargs="+", metavar="FILE_OR_GLOB")
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            options["choices"] = typing.get_args(kind)
        else:
            options["type"] = int if int in (kind, *typing.get_args(kind)) else str
        options["help"] = f"{docs.get(field.name, '')} (default: {field.default})".replace(
            "%", "%%"
        )
        flag = (flags or {}).get(field.name, field.name)
        group.add_argument("--" + flag.replace("_", "-"), **options)


def probe_spec(args: argparse.Namespace) -> Any:
    """The :class:`~lawwatch.probe.spec.ProbeSpec` of parsed command-line options."""
    from lawwatch.probe.spec import ProbeSpec

    return ProbeSpec(**{f.name: getattr(args, "probe_" + f.name) for f in fields(ProbeSpec)})


def _fail(command: str, error: BaseException) -> int:
    print(f"lawwatch {command}: {error}", file=sys.stderr)
    return 2


def _add_probe(commands: Any) -> None:
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
    add_probe_arguments(build)
    build.set_defaults(run=_run_probe_build)
    show = actions.add_parser(
        "show",
        help="what a probe file holds: summary, provenance, hashes",
        description="Print a probe file's summary, provenance and content hash (checked).",
    )
    show.add_argument("file", help="a probe file written by ProbeSet.save / lawwatch probe build")
    show.add_argument("--offset", type=int, default=1, help="target offset of the summary")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(run=_run_probe_show)


def _run_probe_build(args: argparse.Namespace) -> int:
    try:
        probe = probe_spec(args).build()
        path = probe.save(args.out)
    except (ValueError, TypeError, OSError) as error:
        return _fail("probe build", error)
    summary = probe.summary()
    print(
        f"{path}: {summary['sequences']} sequences of up to {summary['length']} tokens, "
        f"{summary['examples']} examples; content hash {probe.content_hash()}"
    )
    return 0


def _run_probe_show(args: argparse.Namespace) -> int:
    import json

    from safetensors import safe_open

    from lawwatch.probe import ProbeSet

    try:
        probe = ProbeSet.load(args.file)
        with safe_open(args.file, framework="pt") as f:
            file_format = (f.metadata() or {}).get("format")
    except (ValueError, OSError) as error:
        return _fail("probe show", error)
    shown = {
        "file": str(args.file),
        "format": file_format,
        "content_hash": probe.content_hash(),
        "summary": probe.summary(args.offset),
        "offset": args.offset,
        "meta": probe.meta,
    }
    if args.json:
        print(json.dumps(shown, indent=2))
        return 0
    print(f"{shown['file']}  ({file_format}, hashes checked)")
    print(f"content hash  {shown['content_hash']}")
    for key, value in shown["summary"].items():
        print(f"{key:<27} {value}")
    print("provenance")
    for key, value in probe.meta.items():
        print(f"  {key:<25} {json.dumps(value)}")
    return 0


# -- analyze ----------------------------------------------------------------------------------


def _add_analyze(commands: Any) -> None:
    from lawwatch.checkpoints import DTYPES
    from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD

    analyze = commands.add_parser(
        "analyze",
        help="measure the law on saved checkpoints (a step sweep)",
        description=(
            "Measure the law on checkpoints, in increasing step order, and write DIR/"
            "history.jsonl and DIR/pr.safetensors (as a live run writes them) and a report. "
            "Run again, it measures only what is new. Exit code: 0, 1 if a checkpoint failed, "
            "2 for bad arguments."
        ),
    )
    analyze.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help=(
            "a model directory, a Trainer output_dir (its checkpoint-N folders), a .gguf file, "
            "or a hub id (org/name or org/name@revision, e.g. EleutherAI/pythia-70m@step1000)"
        ),
    )
    analyze.add_argument("--out", required=True, help="output directory (history, report)")
    analyze.add_argument(
        "--probe",
        help="a probe file (lawwatch probe build); default: built from the options below, or "
        "DIR/probe.safetensors of an earlier sweep",
    )
    analyze.add_argument(
        "--step",
        type=int,
        action="append",
        help="the step of each CHECKPOINT argument, in order (default: from the checkpoint)",
    )
    analyze.add_argument("--gguf-file", help="the GGUF file inside each checkpoint")
    loading = analyze.add_argument_group("loading")
    loading.add_argument("--dtype", choices=DTYPES, default="auto", help="(default: auto)")
    loading.add_argument("--device", help="cpu, cuda, cuda:1, … (default: cuda if available)")
    loading.add_argument(
        "--device-map",
        help="'auto': spread a model too large for one device over the GPUs and CPU (accelerate)",
    )
    loading.add_argument("--cache-dir", help="the hub cache (default: Hugging Face's)")
    loading.add_argument(
        "--offline", action="store_true", help="hub checkpoints from the local cache only"
    )
    loading.add_argument("--trust-remote-code", action="store_true")
    output = analyze.add_argument_group("output")
    output.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the report (figures, report.html) into DIR (default: yes)",
    )
    output.add_argument("--emergence-threshold", type=float, default=DEFAULT_EMERGENCE_THRESHOLD)
    output.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: on a terminal)",
    )
    output.add_argument("--wandb-project", help="also log the sweep as one W&B run")
    output.add_argument("--wandb-name", help="the W&B run's name (default: DIR's name)")
    output.add_argument(
        "--wandb-mode",
        choices=("online", "offline"),
        help="(default: W&B's own: online when logged in)",
    )
    add_probe_arguments(analyze, flags={"seed": "probe_seed"})
    add_measure_arguments(analyze)
    analyze.set_defaults(run=_run_analyze)


def _analyze_probe(args: argparse.Namespace, checkpoints: list[Any], load: Any) -> Any:
    from pathlib import Path

    from lawwatch.analyze import PROBE_FILE
    from lawwatch.checkpoints import load_tokenizer
    from lawwatch.probe import ProbeSet

    spec = probe_spec(args)
    if args.probe is not None:
        if spec.source is not None:
            raise ValueError(f"Give --probe or --{spec.source.replace('_', '-')}, not both.")
        return ProbeSet.load(args.probe)
    if spec.source is None:
        earlier = Path(args.out) / PROBE_FILE
        if earlier.is_file():
            return ProbeSet.load(earlier)
        return spec.build()  # raises: says which options give a probe
    tokenizer = None
    if spec.needs_tokenizer and spec.tokenizer is None:
        tokenizer = load_tokenizer(checkpoints[0], load)
    return spec.build(tokenizer)


def _run_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lawwatch.analyze import analyze, log_to_wandb
    from lawwatch.checkpoints import LoadOptions, find_checkpoints

    try:
        config = measure_config(args)
        load = LoadOptions(
            dtype=args.dtype,
            device=args.device,
            device_map=args.device_map,
            cache_dir=args.cache_dir,
            offline=args.offline,
            trust_remote_code=args.trust_remote_code,
        )
        checkpoints = find_checkpoints(args.checkpoints, steps=args.step, gguf_file=args.gguf_file)
        probe = _analyze_probe(args, checkpoints, load)
        result = analyze(checkpoints, probe, args.out, config, load=load, progress=args.progress)
    except (ValueError, TypeError, OSError) as error:
        return _fail("analyze", error)
    done = ", ".join(
        f"{len(steps)} {what}"
        for what, steps in (
            ("measured", result.measured),
            ("copied (same weights)", result.copied),
            ("already measured", result.skipped),
        )
        if steps
    )
    print(f"lawwatch analyze: {done or 'nothing done'}; history in {Path(args.out)}")
    for ckpt, reason in result.failed:
        print(f"lawwatch analyze: FAILED {ckpt.name} (step {ckpt.step}): {reason}", file=sys.stderr)
    png = None
    if args.report and len(result.history):
        try:
            from lawwatch.report import write_report

            report = write_report(
                [args.out], args.out, emergence_threshold=args.emergence_threshold
            )
            png = report.figures["law_layers"].get("png")
            print(f"lawwatch analyze: report in {report.html}")
        except ImportError as error:
            print(f"lawwatch analyze: no report ({error}; pip install matplotlib)", file=sys.stderr)
        except ValueError as error:
            print(f"lawwatch analyze: no report ({error})", file=sys.stderr)
    if args.wandb_project and len(result.history):
        run_dir = log_to_wandb(
            result.history,
            project=args.wandb_project,
            name=args.wandb_name or Path(args.out).resolve().name,
            mode=args.wandb_mode,
            directory=args.out,
            config={"measure": config.to_dict(), "checkpoints": args.checkpoints},
            emergence_threshold=args.emergence_threshold,
            image=png,
        )
        print(f"lawwatch analyze: W&B run in {run_dir}")
    return 1 if result.failed else 0


# -- report -----------------------------------------------------------------------------------


def _steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give steps like 0,100,1000") from None


def _add_report(commands: Any) -> None:
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
    report.add_argument("--emergence-threshold", type=float, default=DEFAULT_EMERGENCE_THRESHOLD)
    report.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from lawwatch.report import write_report

    try:
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
        return _fail("report", error)
    print(f"lawwatch report: {report.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
