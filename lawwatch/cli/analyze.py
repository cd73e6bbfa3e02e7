"""``lawwatch analyze``: measure the law on saved checkpoints (:func:`lawwatch.analyze.analyze`).

Its measurement options are the fields of :class:`~lawwatch.config.MeasureConfig`
(:data:`MEASURE`), its probe options those of :class:`~lawwatch.probe.ProbeSpec`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lawwatch.checkpoints import Checkpoint, LoadOptions
from lawwatch.cli import fail
from lawwatch.cli.options import DataclassOptions
from lawwatch.cli.probe import PROBE
from lawwatch.config import REGEX_PREFIX, MeasureConfig
from lawwatch.probe import ProbeSet


def _layers(text: str) -> int | tuple[int, ...]:
    """``4`` (every 4th entry) or ``1,6,-1`` (those entries)."""
    try:
        return int(text) if "," not in text else tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give an int k (every k-th entry) or entries like 1,6,-1"
        ) from None


def _blocks(text: str) -> str | tuple[str, ...]:
    """A name or glob; ``re:PATTERN`` for a regex (MeasureConfig compiles it); ``a,b,c`` a list."""
    if text.startswith(REGEX_PREFIX):
        return text
    return tuple(text.split(",")) if "," in text else text


def _jackknife(text: str) -> int | str | None:
    """``auto``, ``none`` (off) or a number of groups."""
    word = text.strip().lower()
    return None if word == "none" else word if word == "auto" else int(word)


MEASURE = DataclassOptions(
    MeasureConfig,
    "measurement options (lawwatch.MeasureConfig; the defaults are the paper's protocol)",
    overrides={
        "layers": {"type": _layers},
        "blocks": {"type": _blocks},
        "final_norm": {"type": str},
        "jackknife": {"type": _jackknife},
    },
)


def add(commands: Any) -> None:
    """Register ``analyze`` on the ``lawwatch`` subcommands."""
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
    PROBE.add(analyze, flags={"seed": "probe_seed"})
    MEASURE.add(analyze)
    analyze.set_defaults(run=run)


def _probe(args: argparse.Namespace, checkpoints: list[Checkpoint], load: LoadOptions) -> ProbeSet:
    """The sweep's probe: ``--probe``, one built from the probe options, or the earlier sweep's.

    Texts are tokenized by the first checkpoint's own tokenizer unless ``--tokenizer`` names one.
    """
    from lawwatch.analyze import PROBE_FILE
    from lawwatch.probe import load_tokenizer

    spec = PROBE.build(args)
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


def run(args: argparse.Namespace) -> int:
    """Sweep the checkpoints, then the report and the W&B run; 1 if a checkpoint failed."""
    from lawwatch.analyze import analyze, log_to_wandb
    from lawwatch.checkpoints import find_checkpoints

    try:
        config = MEASURE.build(args)
        load = LoadOptions(
            dtype=args.dtype,
            device=args.device,
            device_map=args.device_map,
            cache_dir=args.cache_dir,
            offline=args.offline,
            trust_remote_code=args.trust_remote_code,
        )
        checkpoints = find_checkpoints(args.checkpoints, steps=args.step, gguf_file=args.gguf_file)
        probe = _probe(args, checkpoints, load)
        result = analyze(checkpoints, probe, args.out, config, load=load, progress=args.progress)
    except (ValueError, TypeError, OSError) as error:
        return fail("analyze", error)
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
