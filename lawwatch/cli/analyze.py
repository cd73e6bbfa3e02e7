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
from lawwatch.output.layout import HISTORY_FILE, PROBE_FILE, run_directory
from lawwatch.output.store import read_history
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


def _float_or_none(text: str) -> float | None:
    """A number, or ``none`` (off: to measure without what a live run measured with)."""
    return None if text.strip().lower() == "none" else float(text)


def _int_or_none(text: str) -> int | None:
    return None if text.strip().lower() == "none" else int(text)


MEASURE = DataclassOptions(
    MeasureConfig,
    "measurement options (lawwatch.MeasureConfig; the defaults are the paper's protocol; an "
    "option not given is the run's own when the checkpoints' live history says it)",
    overrides={
        "layers": {"type": _layers},
        "blocks": {"type": _blocks},
        "final_norm": {"type": str},
        "jackknife": {"type": _jackknife},
        "lens": {"type": _float_or_none},
        "split": {"type": _float_or_none},
        "onehot_top_k": {"type": _int_or_none},
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
            "Run again, it measures only what is new; a checkpoint still being written is left "
            "for that next run (and said so). Exit code: 0, 1 if a checkpoint failed, 2 for bad "
            "arguments."
        ),
    )
    analyze.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help=(
            "a model directory, a Trainer output_dir (its checkpoint-N folders and its final "
            "model), a .gguf file, "
            "or a hub id (org/name or org/name@revision, e.g. EleutherAI/pythia-70m@step1000)"
        ),
    )
    analyze.add_argument("--out", required=True, help="output directory (history, report)")
    analyze.add_argument(
        "--probe",
        help="a probe file (lawwatch probe build); default: built from the options below, "
        "DIR/probe.safetensors of an earlier sweep, or the probe the run was measured with "
        "(OUTPUT_DIR/lawwatch/probe.safetensors)",
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
    # --gguf-file names each checkpoint's GGUF file; the probe's tokenizer's is another option
    PROBE.add(analyze, flags={"seed": "probe_seed", "gguf_file": "tokenizer_gguf_file"})
    MEASURE.add(analyze)
    analyze.set_defaults(run=run)


def _probe(args: argparse.Namespace, checkpoints: list[Checkpoint], load: LoadOptions) -> ProbeSet:
    """The sweep's probe: ``--probe``, one built from options, the earlier sweep's, the run's.

    The run's is the one it was measured with (``<output_dir>/lawwatch/probe.safetensors``).
    Texts are tokenized by the first checkpoint's own tokenizer unless ``--tokenizer`` names one.
    A probe other than the run's own is said to give numbers not comparable with its history.
    """
    from lawwatch.probe import load_tokenizer

    spec = PROBE.build(args)
    saved = _run_probes(args.checkpoints)
    if args.probe is not None:
        if spec.source is not None:
            raise ValueError(f"Give --probe or --{spec.source.replace('_', '-')}, not both.")
        return _compared(ProbeSet.load(args.probe), f"--probe {args.probe}", saved)
    if spec.source is None:
        earlier = Path(args.out) / PROBE_FILE
        if earlier.is_file():
            return _compared(ProbeSet.load(earlier), f"{earlier} (an earlier sweep's)", saved)
        hashes = {probe.content_hash() for probe in saved.values()}
        if len(hashes) > 1:
            raise ValueError(
                "The runs were measured with different probes ("
                + ", ".join(str(path) for path in saved)
                + "): one sweep holds one probe. Give the one to use with --probe."
            )
        if saved:
            path, probe = next(iter(saved.items()))
            print(
                f"lawwatch analyze: measuring with the run's own probe, {path} (content hash "
                f"{probe.content_hash()[:12]}…), as its live history was"
            )
            return probe
        return spec.build()  # raises: says which options give a probe
    tokenizer = None
    if spec.needs_tokenizer and spec.tokenizer is None:
        tokenizer = load_tokenizer(checkpoints[0], load)
    return _compared(spec.build(tokenizer), "the probe built from the options", saved)


def _local_folders(specs: list[str]) -> list[Path]:
    """The folders the local ``specs`` name (a file's folder for a file); hub ids left out."""
    folders = [Path(spec).parent if Path(spec).is_file() else Path(spec) for spec in specs]
    return [folder for folder in folders if folder.is_dir()]


def _run_probes(specs: list[str]) -> dict[Path, ProbeSet]:
    """The probes saved with the runs ``specs`` name, by path.

    ``<dir>/lawwatch/probe.safetensors`` of an output_dir, or of a ``checkpoint-N`` folder's.
    """
    found: dict[Path, ProbeSet] = {}
    for path in _local_folders(specs):
        for folder in (path, path.parent):
            saved = (run_directory(folder) / PROBE_FILE).resolve()
            if saved not in found and saved.is_file():
                found[saved] = ProbeSet.load(saved)
                break
    return found


def _run_options(specs: list[str]) -> dict[Path, dict[str, Any]]:
    """The measurement options of the live histories beside the runs ``specs`` name, by folder.

    ``<dir>/lawwatch/history.jsonl`` of an output_dir, or of a ``checkpoint-N`` folder's: its
    latest record's ``config``.
    """
    found: dict[Path, dict[str, Any]] = {}
    for path in _local_folders(specs):
        for folder in (path, path.parent):
            live = run_directory(folder).resolve()
            if (live / HISTORY_FILE).is_file():
                if live not in found:
                    records = read_history(live).records
                    if records and isinstance(records[-1].get("config"), dict):
                        found[live] = records[-1]["config"]
                break
    return found


def _earlier_sweep(out: str) -> dict[Path, dict[str, Any]]:
    """The options of the sweep already in ``out``, if any (its latest record's)."""
    folder = Path(out).resolve()
    if not (folder / HISTORY_FILE).is_file():
        return {}
    records = read_history(folder).records
    config = records[-1].get("config") if records else None
    return {folder: config} if isinstance(config, dict) else {}


def _measure_config(args: argparse.Namespace) -> MeasureConfig:
    """The options given; the others as the sweep in ``--out``, or else the run, measured.

    So a sweep run again continues itself, and a first sweep measures as the live run did (its
    jackknife, its logit lens, …) and agrees with it, emergence step included. An option given
    on the command line wins, and what was taken is said. Options that only change a snapshot's
    cost are not taken, nor an option the run passed as a Python object (it has no plain form).
    """
    from lawwatch.history import COST_OPTIONS

    earlier = _earlier_sweep(args.out)
    runs = earlier or _run_options(args.checkpoints)
    whose = "the earlier sweep in" if earlier else "the run's live history was"
    given = MEASURE.given(args)
    plain = MEASURE.build(args).to_dict()
    taken: dict[str, Any] = {}
    for name in MeasureConfig.names():
        if name in given or name in COST_OPTIONS:
            continue
        values = [options[name] for options in runs.values() if name in options]
        if not values:
            continue
        if any(value != values[0] for value in values):
            raise ValueError(
                f"The runs were measured with different {name} ("
                + ", ".join(f"{path}: {options.get(name)!r}" for path, options in runs.items())
                + f"): one sweep measures one way. Give it with --{name.replace('_', '-')}."
            )
        value = values[0]
        unloadable = isinstance(value, str) and value.startswith("<") and value.endswith(">")
        if value != plain[name] and not unloadable:
            taken[name] = value
    if not taken:
        return MEASURE.build(args)
    config = MEASURE.build(args, **taken)
    print(
        f"lawwatch analyze: measuring as {whose} ("
        + ", ".join(str(path) for path in runs)
        + "): "
        + ", ".join(f"{name}={value!r}" for name, value in taken.items())
        + "; an option given here measures otherwise"
    )
    return config


def _compared(probe: ProbeSet, what: str, saved: dict[Path, ProbeSet]) -> ProbeSet:
    """``probe``, with a warning for each run it was not the probe of."""
    wanted = probe.content_hash()
    for path, own in saved.items():
        if own.content_hash() != wanted:
            print(
                f"lawwatch analyze: warning: {what} (content hash {wanted[:12]}…) is not the "
                f"probe the run was measured with ({path}, content hash "
                f"{own.content_hash()[:12]}…): these numbers are not comparable with its live "
                f"history in {path.parent}. Leave --probe and the probe options out to measure "
                "with the run's own.",
                file=sys.stderr,
            )
    return probe


def run(args: argparse.Namespace) -> int:
    """Sweep the checkpoints, then the report and the W&B run; 1 if a checkpoint failed.

    Launched as several processes (torchrun, ``accelerate launch``), the checkpoints are dealt
    over them (:mod:`lawwatch.sweep`); the main process alone prints and writes.
    """
    from lawwatch.sweep import join, serve

    team = join()
    if team is not None and not team.main:
        try:
            return serve(team)
        finally:
            team.close()
    try:
        return _lead(args, team)
    finally:
        if team is not None:
            team.cancel()  # the others end even when this one stopped before dealing
            team.close()


def _lead(args: argparse.Namespace, team: Any) -> int:
    """The sweep, its summary, report and W&B run (on the main process of several)."""
    from lawwatch.analyze import analyze, log_to_wandb
    from lawwatch.checkpoints import describe, find_checkpoints
    from lawwatch.sweep import lead

    try:
        config = _measure_config(args)
        load = LoadOptions(
            dtype=args.dtype,
            device=args.device,
            device_map=args.device_map,
            cache_dir=args.cache_dir,
            offline=args.offline,
            trust_remote_code=args.trust_remote_code,
        )
        checkpoints = find_checkpoints(args.checkpoints, steps=args.step, gguf_file=args.gguf_file)
        print(f"lawwatch analyze: found {describe(checkpoints)}")
        probe = _probe(args, checkpoints, load)
        if team is None:
            result = analyze(
                checkpoints, probe, args.out, config, load=load, progress=args.progress
            )
        else:
            print(f"lawwatch analyze: dealt over {team.world} processes")
            result = lead(
                team, checkpoints, probe, args.out, config, load=load, progress=args.progress
            )
    except (ValueError, TypeError, OSError) as error:
        return fail("analyze", error)
    done = ", ".join(
        f"{len(steps)} {what}"
        for what, steps in (
            ("measured", result.measured),
            ("recorded from the stopped sweep", result.recovered),
            ("copied (same weights)", result.copied),
            ("already measured", result.skipped),
        )
        if steps
    )
    print(f"lawwatch analyze: {done or 'nothing done'}; history in {Path(args.out)}")
    for ckpt, reason in result.failed:
        print(f"lawwatch analyze: FAILED {ckpt.name} (step {ckpt.step}): {reason}", file=sys.stderr)
    for ckpt, reason in result.unfinished:
        print(
            f"lawwatch analyze: not yet measured: {ckpt.name} (step {ckpt.step}) looks still being "
            f"written ({reason}); run again once it is saved",
            file=sys.stderr,
        )
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
