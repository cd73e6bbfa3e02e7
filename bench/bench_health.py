"""What the residual stream's vital signs cost a snapshot (numbers in BENCHMARKS.md).

    PYTHONPATH=. .venv/bin/python bench/bench_health.py [--shape gpt2-small|1b|1.1b|7b]
        [--blocks N] [--rows 16] [--length 256] [--batch-size 8] [--repeat 2] [--threads 1]
        [--tiny]

Random weights (:func:`bench_floor.build`). Timed in one process, interleaved (each repeat runs
both variants once, in turn), best of ``--repeat``, in wall and process CPU time (on one
thread the CPU time is the work done, whatever else loads the machine):

* ``measure`` with the defaults (``health=True``), and with ``health=False``;
* **health (own)**: inside the default ``measure``, the time spent in
  :meth:`lawwatch.stats.health.HealthStats.add` (each call clocked: the vital signs' whole
  per-row work) plus the record's reduction to numbers, summed; its share of that
  ``measure``'s time is the direct measurement (the difference of the two ``measure`` rows is
  within their noise at these sizes).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from bench_floor import SHAPES, build


class Clocked:
    """Clocks every call of ``HealthStats.add`` and ``record`` (wall and CPU seconds)."""

    def __init__(self) -> None:
        from lawwatch.stats.health import HealthStats

        self.cls = HealthStats
        self.wall = self.cpu = 0.0
        self.calls = 0
        self._originals = {name: getattr(HealthStats, name) for name in ("add", "record")}

    def __enter__(self) -> Clocked:
        for name, original in self._originals.items():

            def timed(*args, _original=original, **kwargs):
                wall, cpu = time.perf_counter(), time.process_time()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.wall += time.perf_counter() - wall
                    self.cpu += time.process_time() - cpu
                    self.calls += 1

            setattr(self.cls, name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(self.cls, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="gpt2-small", choices=SHAPES)
    parser.add_argument("--blocks", type=int, default=None, help="keep the first N blocks")
    parser.add_argument("--rows", type=int, default=16, help="probe sequences")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="the snapshot's batch size")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="a tiny model, once (tests)")
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.rows, args.length, args.repeat = "tiny", 16, 32, 1
    torch.set_num_threads(args.threads)
    from lawwatch import ProbeSet, measure
    from lawwatch.config import MeasureConfig

    model = build(args.shape, blocks=args.blocks)
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(1)
    probe = ProbeSet.from_tokens(
        torch.randint(0, vocab, (args.rows, args.length), generator=generator)
    )
    on = MeasureConfig.build(batch_size=args.batch_size)
    off = on.replace(health=False)
    best = {name: [float("inf"), float("inf")] for name in ("on", "off", "own")}

    def keep(name: str, wall: float, cpu: float) -> None:
        best[name][0], best[name][1] = min(best[name][0], wall), min(best[name][1], cpu)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few examples per dimension at short probes
        measure(model, probe, off)  # warm-up
        for _ in range(args.repeat):
            for name, config in (("on", on), ("off", off)):
                with Clocked() as clock:
                    wall, cpu = time.perf_counter(), time.process_time()
                    measure(model, probe, config)
                    keep(name, time.perf_counter() - wall, time.process_time() - cpu)
                if name == "on":
                    keep("own", clock.wall, clock.cpu)
    d = model.get_input_embeddings().weight.shape[1]
    print(
        f"\n{args.shape} (d {d}, {args.blocks or 'all'} blocks), probe {args.rows} × "
        f"{args.length} tokens ({probe.num_examples()} examples), batch {args.batch_size}, "
        f"{args.threads} threads, best of {args.repeat}, torch {torch.__version__}\n"
    )
    print("| what | wall s | CPU s | share of `measure` (CPU) |")
    print("|---|---:|---:|---:|")
    rows = (
        ("on", "`measure` (defaults: health on)"),
        ("off", "`measure`, `health=False`"),
        ("own", "health (own): `HealthStats.add` + `record`"),
    )
    for name, label in rows:
        wall, cpu = best[name]
        print(f"| {label} | {wall:.3f} | {cpu:.3f} | {cpu / best['on'][1]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
