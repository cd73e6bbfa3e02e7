"""What a training run pays for LawWatchCallback: the same run without and with it, side by side.

    .venv/bin/python bench/bench_overhead.py [--steps 300] [--every 100] [--repeat 2] [--quick]

(``--tiny``: a 3-block, 32-wide model for 10 steps, seconds; it checks that the script runs.)
The demo's run (``lawwatch.demo``: GPT-2 of 6 blocks x 128 dims, byte-level BPE of 1024 tokens,
sequences of 128, batch 16, trained by the Hugging Face ``Trainer`` on CPU) and the demo's probe
(128 held-out documents x up to 128 tokens). Each run is a fresh child process, so its peak
RSS is its own and no run inherits another's heap; runs alternate, A B B A A B …, so a load
change on a shared machine hits both variants alike, and ratios are taken within each adjacent
pair. Reported per variant: wall and CPU time of ``trainer.train()``, the median step (the gap
between two step ends), peak RSS; for the monitored run also the time spent inside the
callback's events, per snapshot, and what one snapshot costs in steps of the plain run. The
losses of the two variants are compared too: a snapshot must not change training.

``--snapshot-cost``: what one snapshot costs with the jackknife (``jackknife=8``, the default)
against one without (``jackknife=None``), on the same model and probe in one process:
``measure`` alternated A B B A …, the median of each, their ratio.

``--max-overhead``: the callback's overhead budget in the monitored runs (a fraction, or
``none``); default: ``WatchConfig``'s.

A third variant, in the same run: the callback with ``background=True`` (the solve, the fit
and the local history on a worker thread). Side by side with the foreground callback: the
training stall per snapshot (the wall time of the event that takes a snapshot, and all the
callback's time, including collecting background results and the train-end flush, divided by
the snapshots), and whether the two give the same records (all but ``seconds``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lawwatch.demo import DemoConfig

BENCH = Path(__file__).resolve()
# --tiny: the demo shrunk to a smoke run (the numbers mean nothing)
TINY = {
    "source": "topics",
    "vocab_size": 300,
    "n_layer": 3,
    "n_embd": 32,
    "n_head": 2,
    "n_positions": 64,
    "seq_len": 64,
    "batch_size": 4,
    "warmup_steps": 1,
    "probe_texts": 8,
    "probe_length": 64,
}


def demo_config(args: argparse.Namespace) -> DemoConfig:
    """The demo's config (the same data, model and training settings) with this run's steps."""
    return DemoConfig(steps=args.steps, every=args.every, seed=0, **(TINY if args.tiny else {}))


def child(args: argparse.Namespace) -> None:
    """One training run; prints one JSON line."""
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file
    from transformers import Trainer, TrainerCallback
    from transformers.utils import logging as hf_logging

    from lawwatch import ProbeSet, read_history
    from lawwatch.demo.corpus import Blocks
    from lawwatch.demo.training import build_model, training_arguments
    from lawwatch.integrations.hf import LawWatchCallback

    hf_logging.set_verbosity_error()
    data = Path(args.data)
    meta = json.loads((data / "meta.json").read_text())
    blocks = Blocks(load_file(data / "blocks.safetensors")["ids"])
    probe = ProbeSet.load(data / "probe.safetensors")
    config = demo_config(args)
    model = build_model(config, meta["vocab_size"], meta["eos_id"])

    class StepClock(TrainerCallback):
        """The time of every step end (the gaps between them are whole steps)."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, *a, **k) -> None:
            self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **k) -> None:
            self.ends.append(time.perf_counter())

    class TimedCallback(LawWatchCallback):
        """LawWatchCallback with a stopwatch around each snapshot and around train end."""

        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            self.snapshots: list[dict] = []  # step, wall and CPU seconds of each snapshot event
            self.other = {"wall": 0.0, "cpu": 0.0}  # events that took no snapshot, train end

        def _timed(self, event, args, state, control, **kwargs) -> None:
            before = None if self.monitor is None else self.monitor.last_step
            wall, cpu = time.perf_counter(), time.process_time()
            event(args, state, control, **kwargs)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if self.monitor is not None and self.monitor.last_step != before:
                self.snapshots.append({"step": state.global_step, "wall": wall, "cpu": cpu})
            else:
                self.other["wall"] += wall
                self.other["cpu"] += cpu

        def on_train_begin(self, args, state, control, **k):
            self._timed(super().on_train_begin, args, state, control, **k)

        def on_step_end(self, args, state, control, **k):
            self._timed(super().on_step_end, args, state, control, **k)

        def on_train_end(self, args, state, control, **k):
            self._timed(super().on_train_end, args, state, control, **k)  # PNG, close

    clock = StepClock()
    callbacks: list = [clock]
    watch = None
    if args.child in ("lawwatch", "background"):
        watch = TimedCallback(
            probe,
            every=args.every,
            batch_size=config.probe_batch_size,
            background=args.child == "background",
            **budget(args),
        )
        callbacks.append(watch)
    with tempfile.TemporaryDirectory() as out:
        train_args = training_arguments(config, out, logging_steps=10)  # the demo's settings
        trainer = Trainer(model=model, args=train_args, train_dataset=blocks, callbacks=callbacks)
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        records = []
        if watch is not None:
            records = read_history(Path(out) / "lawwatch").records
    gaps = [b - a for a, b in itertools.pairwise(clock.ends)]
    result = {
        "variant": args.child,
        "wall": wall,
        "cpu": cpu,
        "step_median": statistics.median(gaps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": losses,
    }
    if watch is not None:
        result.update(
            snapshots=[r["step"] for r in records],
            measure_seconds=[r["seconds"] for r in records],  # measure + reduce + solve
            snapshot_events=watch.snapshots,
            other_events=watch.other,
            examples=probe.num_examples(),
            records=[{k: v for k, v in r.items() if k != "seconds"} for r in records],
        )
    print("RESULT " + json.dumps(result), flush=True)


def budget(args: argparse.Namespace) -> dict:
    """The callback's ``max_overhead`` keyword for ``--max-overhead`` (none: WatchConfig's)."""
    if args.max_overhead is None:
        return {}
    return {"max_overhead": None if args.max_overhead == "none" else float(args.max_overhead)}


def snapshot_cost(args: argparse.Namespace) -> None:
    """One snapshot with and without the jackknife, alternated in one process (medians)."""
    from lawwatch import measure
    from lawwatch.demo.training import build_model, prepare

    config = demo_config(args)
    tokenizer, _, probe = prepare(config)
    model = build_model(config, len(tokenizer), tokenizer.eos_token_id)
    variants = {"plain": {"jackknife": None}, "jackknife=8": {"jackknife": 8}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    ses = {}
    measure(model, probe, batch_size=config.probe_batch_size)  # warm-up (first-call set-up)
    for i in range(args.repeat):
        for name in list(variants) if i % 2 == 0 else list(variants)[::-1]:
            start = time.perf_counter()
            snap = measure(model, probe, batch_size=config.probe_batch_size, **variants[name])
            times[name].append(time.perf_counter() - start)
            ses[name] = snap.extra.get("pearson_r_se")
    plain, jack = (statistics.median(times[n]) for n in variants)
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"torch {torch.__version__}, {args.threads} thread(s); {config.n_layer} blocks x "
        f"{config.n_embd} dims, probe {len(probe)} documents, {probe.num_examples()} examples; "
        f"{args.repeat} measurements each"
    )
    print("| variant | snapshot s (median) | all s | pearson_r_se |")
    print("|---|---|---|---|")
    for name in variants:
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {statistics.median(times[name]):.3f} | {runs} | {ses[name]} |")
    print(f"jackknife=8 snapshot / plain snapshot: {jack / plain:.3f}")


def make_data(directory: Path, config: DemoConfig) -> dict:
    """The demo's tokenizer, training blocks and probe, made once for every child."""
    from safetensors.torch import save_file

    from lawwatch.demo.training import prepare

    tokenizer, blocks, probe = prepare(config)
    save_file({"ids": blocks.ids.contiguous()}, directory / "blocks.safetensors")
    probe.save(directory / "probe.safetensors")
    meta = {"vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id}
    (directory / "meta.json").write_text(json.dumps(meta))
    return {**meta, "blocks": len(blocks), "probe_docs": len(probe), "probe": probe.num_examples()}


def launch(variant: str, data: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(BENCH), "--child", variant, "--data", str(data)]
    cmd += ["--steps", str(args.steps), "--every", str(args.every), "--threads", str(args.threads)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += [] if args.max_overhead is None else ["--max-overhead", args.max_overhead]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def report(pairs: list[tuple[dict, dict]], args: argparse.Namespace, data: dict) -> None:
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, {args.threads} thread(s); "
        f"{args.steps} steps, every={args.every}; probe {data['probe_docs']} documents, "
        f"{data['probe']} examples; {data['blocks']} training blocks"
    )
    print(
        "| pair | plain s (CPU s) | lawwatch s (CPU s) | ratio wall (CPU) | extra wall s | "
        "callback s | snapshots | step 0 snapshot s | later snapshots, median s | "
        "step s plain / lawwatch | "
        "snapshot / step | rest of callback s (PNG) | peak RSS MB plain / lawwatch |"
    )
    print("|" + "---|" * 13)
    ratios, costs, later_all = [], [], []
    for i, (plain, watched) in enumerate(pairs):
        events = watched["snapshot_events"]
        first, later = events[0]["wall"], [e["wall"] for e in events[1:]]
        callback = sum(e["wall"] for e in events) + watched["other_events"]["wall"]
        step = plain["step_median"]  # one whole training step, from step end to step end
        ratio = watched["wall"] / plain["wall"]
        ratios.append(ratio)
        costs.append(statistics.median(later) / step)
        later_all += later
        print(
            f"| {i} | {plain['wall']:.1f} ({plain['cpu']:.1f}) | {watched['wall']:.1f} "
            f"({watched['cpu']:.1f}) | {ratio:.3f} ({watched['cpu'] / plain['cpu']:.3f}) | "
            f"{watched['wall'] - plain['wall']:.1f} | {callback:.1f} | {len(events)} | "
            f"{first:.2f} | {statistics.median(later):.2f} | {step:.3f} / "
            f"{watched['step_median']:.3f} | {costs[-1]:.1f} | "
            f"{watched['other_events']['wall']:.2f} | "
            f"{plain['peak_rss_mb']:.0f} / {watched['peak_rss_mb']:.0f} |"
        )
        if plain["losses"] != watched["losses"]:
            print(
                f"    pair {i}: the losses differ with the callback: {plain['losses']} vs "
                f"{watched['losses']}"
            )
    measured = [s for _, w in pairs for s in w["measure_seconds"][1:]]
    same = all(p["losses"] == w["losses"] for p, w in pairs)
    print(
        f"median overhead ratio {statistics.median(ratios):.3f}; one snapshot (after step 0) = "
        f"{statistics.median(later_all):.2f} s = {statistics.median(costs):.1f} training steps; "
        f"of it Snapshot.seconds (measure + solve) median {statistics.median(measured):.2f} s; "
        f"snapshots at steps {pairs[0][1]['snapshots']}; training losses identical with and "
        f"without the callback: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2, help="pairs of runs (A B, then B A, …)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="40 steps, every=20, one pair")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, 10 steps (tests)")
    parser.add_argument(
        "--snapshot-cost", action="store_true", help="one snapshot with and without jackknife"
    )
    parser.add_argument("--max-overhead", help="the callback's max_overhead (a fraction, none)")
    parser.add_argument(
        "--child", choices=["plain", "lawwatch", "background"], help=argparse.SUPPRESS
    )
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.snapshot_cost:
        snapshot_cost(args)
        return
    if args.quick:
        args.steps, args.every, args.repeat = 40, 20, 1
    if args.tiny:
        args.steps, args.every, args.repeat = 10, 5, 1  # one loss logged (logging_steps=10)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        data = make_data(data_dir, demo_config(args))
        pairs, backgrounds = [], []
        for i in range(args.repeat):
            order = ["plain", "lawwatch", "background"]
            runs = {v: launch(v, data_dir, args) for v in (order if i % 2 == 0 else order[::-1])}
            pairs.append((runs["plain"], runs["lawwatch"]))
            backgrounds.append((runs["lawwatch"], runs["background"]))
    report(pairs, args, data)
    report_background(backgrounds)


def stall(run: dict) -> tuple[float, float]:
    """Median wall s of a snapshot-taking event after step 0; all callback s per snapshot."""
    events = run["snapshot_events"]
    total = sum(e["wall"] for e in events) + run["other_events"]["wall"]
    return statistics.median(e["wall"] for e in events[1:]), total / len(events)


def report_background(runs: list[tuple[dict, dict]]) -> None:
    """Foreground vs background callback, side by side: what training waits per snapshot."""
    print(
        "| run | foreground: snapshot event s (median) | background: snapshot event s | "
        "foreground: callback s per snapshot | background: callback s per snapshot | "
        "wall s fg / bg | records identical |"
    )
    print("|" + "---|" * 7)
    for i, (fore, back) in enumerate(runs):
        (fe, ft), (be, bt) = stall(fore), stall(back)
        print(
            f"| {i} | {fe:.3f} | {be:.3f} | {ft:.3f} | {bt:.3f} | {fore['wall']:.1f} / "
            f"{back['wall']:.1f} | {fore['records'] == back['records']} |"
        )
    same = all(f["records"] == b["records"] for f, b in runs)
    fe = statistics.median(stall(f)[0] for f, _ in runs)
    be = statistics.median(stall(b)[0] for _, b in runs)
    print(
        f"training stall per snapshot (median event after step 0): foreground {fe:.3f} s, "
        f"background {be:.3f} s; background records identical to foreground: {same}"
    )


if __name__ == "__main__":
    main()
