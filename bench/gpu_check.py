"""What only a GPU shows, in one prepared run of at most a few minutes (``make gpu-check``).

    PYTHONPATH=. .venv/bin/python bench/gpu_check.py [--device cuda]
        [--parts solve,precision,floor,trainer]
    PYTHONPATH=. .venv/bin/python bench/gpu_check.py --device cpu --tiny   # seconds: the tests

Random weights throughout (the costs do not depend on them); each part prints BENCHMARKS.md
rows, and a part that fails prints its error and the others still run (the exit status is then
1). Parts:

* ``solve``: a snapshot at the TinyLlama 1.1B shape (22 × 2048) and the 7B shape (32 × 4096),
  bf16 weights, the statistics float64 on the GPU (the defaults): the forward alone,
  ``accumulate`` (the forwards with the statistics made inside the hooks), the solve (and how
  many entries the eigendecomposition solved), the statistics' size and the peak GPU memory
  beyond the weights in each phase;
* ``precision``: on the 1.1B model of ``solve``, the PRs with ``precision="mixed"`` statistics
  (a float32 Gram per batch, TF32 off) against ``"float64"``, and the GPU's float64 solve
  against the same statistics solved on the CPU by the eigendecomposition (the reference);
* ``floor``: the table of ``bench/bench_floor.py`` (a snapshot against its forward) at the
  GPT-2-small shape (float32) and the 1B shape (bf16);
* ``trainer``: a Hugging Face ``Trainer`` run on one device with ``LawWatchCallback``: a
  GPT-2 small (bf16 mixed precision on CUDA), the median training step and the median snapshot,
  a snapshot in training steps.

``--tiny``: every part at a tiny shape (a GPT-2 of 4 × 16 for the 1.1B, 7B and 1B shapes), one
repeat, a few training steps: it checks that the script runs (the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable

import torch
from bench_floor import build, floor_table, print_table

PARTS = ("solve", "precision", "floor", "trainer")
GB = 2**30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: the clock stops when the GPU is done


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float, int]:
    """``(result, wall seconds, peak GPU bytes above the allocation at the start)`` of ``fn()``."""
    synchronize(device)
    start_bytes = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    began = time.perf_counter()
    result = fn()
    synchronize(device)
    seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated(device) - start_bytes if device.type == "cuda" else 0
    return result, seconds, peak


def random_probe(model: torch.nn.Module, rows: int, length: int) -> object:
    from lawwatch import ProbeSet

    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(1)
    return ProbeSet.from_tokens(torch.randint(0, vocab, (rows, length), generator=generator))


class Check:
    """The run's options and the models the parts share (the 1.1B model serves two parts)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.tiny = args.tiny
        # the 1.1B model of `solve`, kept for `precision`
        self.kept: tuple[torch.nn.Module, object] | None = None

    def shape(self, name: str) -> str:
        return "tiny" if self.tiny else name

    def model(self, name: str, dtype: torch.dtype) -> torch.nn.Module:
        return build(self.shape(name), device=str(self.device), dtype=dtype)

    # -- parts ------------------------------------------------------------------------------------

    def solve(self) -> None:
        """The snapshot's phases, its solve and its memory at the 1.1B and 7B shapes in bf16."""
        from lawwatch.capture import Capture, evaluating
        from lawwatch.config import MeasureConfig
        from lawwatch.measurement import accumulate, prepare
        from lawwatch.stats import wrapped
        from lawwatch.stats.residual import ResidualStats

        print(
            "\n| shape | entries × d | weights | examples | forward s | accumulate s | solve s "
            "(eigen fallbacks) | stats GiB | weights GiB | accumulate peak beyond weights GiB "
            "| solve peak beyond stats GiB |"
        )
        print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        # n > d + 1 at every shape (7B: d 4096): 16 × 512 tokens, 8176 examples
        rows, length = (16, 32) if self.tiny else (16, 512)
        for name in ("1.1b", "7b"):  # the 1.1B model (2 GiB in bf16) stays for `precision`
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            model = self.model(name, torch.bfloat16)
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            probe = random_probe(model, rows, length)
            # jackknife="auto" is off at both shapes; said explicitly for --tiny's 16 sequences
            config = MeasureConfig.build(batch_size=8, jackknife=None)
            targets = prepare(model, probe, config)
            capture = Capture(model)

            def forward(model=model, probe=probe, capture=capture) -> None:
                with evaluating(model):
                    for ids, mask in probe.batches(8):
                        capture.run_bare(ids.to(self.device), mask.to(self.device))

            forward()  # warm-up (kernels, allocator)
            _, forward_s, _ = timed(forward, self.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # few examples per dimension: deliberate
                stats, accumulate_s, accumulate_peak = timed(
                    lambda model=model, probe=probe, config=config, targets=targets: accumulate(
                        model, probe, config, targets
                    ),
                    self.device,
                )
                stats = wrapped(stats, ResidualStats)  # the PR statistics (vital signs beside)
                solved, solve_s, solve_peak = timed(stats.solve, self.device)
            stats_bytes = sum(
                getattr(stats, n).numel() * 8 for n in ("sum_xx", "sum_xy", "sum_x", "shift_x")
            )
            print(
                f"| {name} | {stats.num_layers} × {stats.dim} | bf16 | {int(stats.count)} "
                f"| {forward_s:.2f} | {accumulate_s:.2f} | {solve_s:.2f} "
                f"({int(solved.eigh.sum())}) | {stats_bytes / GB:.2f} | {weights / GB:.2f} "
                f"| {accumulate_peak / GB:.2f} | {solve_peak / GB:.2f} |",
                flush=True,
            )
            if name == "1.1b":
                self.kept = (model, probe)
            del stats, solved, model

    def precision(self) -> None:
        """Mixed vs float64 statistics on the device, and the device's solve vs the CPU's."""
        from lawwatch.config import MeasureConfig
        from lawwatch.measurement import accumulate, prepare
        from lawwatch.stats import wrapped
        from lawwatch.stats.residual import ResidualStats

        if self.kept is None:
            model = self.model("1.1b", torch.bfloat16)
            self.kept = (model, random_probe(model, *((16, 32) if self.tiny else (16, 512))))
        model, probe = self.kept
        print(
            "\n| shape | device | examples | float64 s | mixed s | max abs ΔPR/PR mixed vs "
            "float64 | max abs PR diff: device solve vs CPU eigh |"
        )
        print("|---|---|---:|---:|---:|---:|---:|")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = {}
            for precision in ("float64", "mixed"):
                config = MeasureConfig.build(batch_size=8, precision=precision, jackknife=None)
                targets = prepare(model, probe, config)
                stats, seconds, _ = timed(
                    lambda c=config, t=targets: accumulate(model, probe, c, t), self.device
                )
                stats = wrapped(stats, ResidualStats)  # the PR statistics (vital signs beside)
                pr, solve_s, _ = timed(stats.compute, self.device)
                results[precision] = (stats, pr.cpu(), seconds + solve_s)
        stats, pr64, seconds64 = results["float64"]
        _, pr_mixed, seconds_mixed = results["mixed"]
        reference = stats.clone().to("cpu").solve(method="eigh").pr
        relative = ((pr_mixed - pr64).abs() / pr64).max().item()
        print(
            f"| {self.shape('1.1b')} (bf16 weights) | {self.device} | {int(stats.count)} "
            f"| {seconds64:.2f} | {seconds_mixed:.2f} | {relative:.1e} "
            f"| {(pr64 - reference).abs().max().item():.1e} |",
            flush=True,
        )
        self.kept = None

    def floor(self) -> None:
        """bench_floor's table on this device: GPT-2 small in float32, the 1B shape in bf16."""
        rows, repeat = (16, 1) if self.tiny else (32, 3)
        for name, dtype in (("gpt2-small", torch.float32), ("1b", torch.bfloat16)):
            model = self.model(name, dtype)
            length = 32 if self.tiny else 256
            probe = random_probe(model, rows, length)
            timings = floor_table(model, probe, batch_size=8, repeat=repeat)
            print_table(
                timings,
                label=(
                    f"{self.shape(name)} ({str(dtype).removeprefix('torch.')} weights, "
                    f"{self.device}), probe {rows} × {length} ({probe.num_examples()} examples), "
                    f"batch 8, best of {repeat}"
                ),
            )
            del model
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def trainer(self) -> None:
        """A Trainer run with the callback on one device: a snapshot in training steps."""
        from transformers import Trainer, TrainerCallback, TrainingArguments
        from transformers.utils import logging as hf_logging

        from lawwatch.integrations.hf import LawWatchCallback

        hf_logging.set_verbosity_error()
        model = self.model("gpt2-small", torch.float32)
        vocab = model.get_output_embeddings().weight.shape[0]
        steps, every, length, batch = (6, 3, 32, 4) if self.tiny else (60, 20, 256, 8)
        generator = torch.Generator().manual_seed(2)
        ids = torch.randint(0, vocab, (steps * batch, length), generator=generator)

        class Tokens(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return ids.shape[0]

            def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
                return {"input_ids": ids[i], "labels": ids[i]}

        class StepClock(TrainerCallback):
            """The time of every step end: the gaps between them are whole steps."""

            def __init__(self) -> None:
                self.ends: list[float] = []

            def on_step_end(self, *args: object, **kwargs: object) -> None:
                synchronize(self_device)
                self.ends.append(time.perf_counter())

        self_device = self.device
        probe = random_probe(model, 16 if self.tiny else 32, length)
        clock = StepClock()
        with tempfile.TemporaryDirectory() as out:
            watch = LawWatchCallback(
                probe, every=every, max_overhead=None, console=False, directory=f"{out}/lawwatch"
            )
            cuda = self.device.type == "cuda"
            args = TrainingArguments(
                output_dir=out,
                max_steps=steps,
                per_device_train_batch_size=batch,
                learning_rate=1e-4,
                logging_steps=10**6,
                save_strategy="no",
                report_to=[],
                use_cpu=not cuda,
                bf16=cuda and torch.cuda.is_bf16_supported(),
                disable_tqdm=True,
                seed=0,
            )
            trainer = Trainer(
                model=model, args=args, train_dataset=Tokens(), callbacks=[watch, clock]
            )
            began = time.perf_counter()
            trainer.train()
            total = time.perf_counter() - began
            records = list(watch.monitor.history)
        gaps = [b - a for a, b in zip(clock.ends[:-1], clock.ends[1:], strict=True)]
        snapped = {r["step"] for r in records}
        # a step's gap includes the snapshot taken at its end: keep the steps without one
        steps_after = range(2, steps + 1)  # the step whose end closes each gap
        plain = [g for g, step in zip(gaps, steps_after, strict=True) if step not in snapped]
        step_s = statistics.median(plain)
        snapshot_s = statistics.median(r["seconds"] for r in records[1:] or records)
        print(
            "\n| model | device | precision | steps | snapshots (steps) | train s | median step s "
            "| median snapshot s (after step 0) | snapshot / step |"
        )
        print("|---|---|---|---:|---|---:|---:|---:|---:|")
        print(
            f"| {self.shape('gpt2-small')} | {self.device} | {'bf16' if args.bf16 else 'fp32'} "
            f"| {steps} | {len(records)} ({', '.join(str(r['step']) for r in records)}) "
            f"| {total:.1f} | {step_s:.3f} | {snapshot_s:.2f} | {snapshot_s / step_s:.1f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, seconds (tests)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose among {','.join(PARTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run with --device cpu (and --tiny) on a CPU.")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}, torch {torch.__version__}{' (tiny shapes)' if args.tiny else ''}")
    check = Check(args)
    failed = []
    for part in parts:
        began = time.perf_counter()
        try:
            getattr(check, part)()
        except Exception:  # one part's failure must not cost the others' numbers
            traceback.print_exc()
            failed.append(part)
        print(f"[{part}: {time.perf_counter() - began:.1f} s]", flush=True)
    if failed:
        sys.exit(f"gpu_check: part(s) {failed} failed (tracebacks above).")
    print("gpu_check: every part ran.")


if __name__ == "__main__":
    main()
