"""The solve and the statistics update at the hidden sizes people pretrain, side by side.

1. **Solve.** The same statistics (LayerNorm'd random features: rank-deficient, as every entry
   but the last of a real model) solved by the eigendecomposition ``compute()`` used before the
   Cholesky fast path (a verbatim copy below) and by today's ``compute()``, in one process, for
   d in {768, 2048, 4096}; wall and CPU seconds, the ratio, the largest PR difference and how
   many entries fell back to the eigendecomposition.
2. **Update throughput.** ``ResidualStats.update`` in GFLOP/s (``2·L·n·d²`` per call: the
   full product's flops, so the upper-triangular Gram can exceed the matmul rate) with
   ``precision="float64"`` and ``"mixed"``, today's Gram (upper-triangular panels) and the
   earlier full ``uᵀu`` side by side, against this machine's measured batched matmul rate in
   float64 and float32 on the same shapes.
3. **Mixed precision error.** ``|PR(mixed) - PR(float64)|`` on hostile inputs.

Run: ``.venv/bin/python bench/bench_solve.py [--threads 2] [--tiny]`` (``--tiny``: small
sizes, seconds; what the test suite runs).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

from lawwatch.precision import exact_float32_matmul
from lawwatch.stats.residual import ResidualStats

_EPS = torch.finfo(torch.float64).eps


def eigh_compute(stats: ResidualStats) -> torch.Tensor:
    """``ResidualStats.compute()`` before the fast path (token_id target): one batched ``eigh``
    of the correlation-scaled Gram, eigenvalues under ``rtol · λ_max`` dropped."""
    n = stats.count.item()
    sx, sy = stats.sum_x, stats.sum_y
    gram = stats.sum_xx - sx.unsqueeze(2) * sx.unsqueeze(1) / n  # (L, d, d)
    tss = (stats.sum_yy - sy * sy / n).sum()
    var = gram.diagonal(dim1=1, dim2=2)
    raw = stats.sum_xx.diagonal(dim1=1, dim2=2)
    alive = var > 64 * _EPS * raw
    scale = torch.where(alive, var.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    corr = gram * scale.unsqueeze(2) * scale.unsqueeze(1)
    evals, evecs = torch.linalg.eigh(corr)
    keep = evals > stats.rtol * evals[:, -1:].clamp_min(0.0)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)
    cross = stats.sum_xy - sx.unsqueeze(2) * sy.view(1, 1, -1) / n
    proj = evecs.transpose(1, 2) @ (cross * scale.unsqueeze(2))
    explained = (inv.unsqueeze(2) * proj * proj).sum(dim=(1, 2))
    return (tss - explained) / tss


def features(
    layers: int, n: int, d: int, seed: int, family: str = "layernorm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layers, n, d) float64 features partly predictive of Zipf-like ids, and the ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (n,), generator=gen)
    z = (ids.double().log1p() - ids.double().log1p().mean()) / ids.double().log1p().std()
    x = torch.randn(layers, n, d, generator=gen, dtype=torch.float64)
    x[:, :, 0] += torch.linspace(0.2, 2.0, layers).view(-1, 1) * z
    if family == "massive activations":  # ~1e4 x the median on every token, then LayerNorm
        x[:, :, 5] = 1e4 * (1 + 0.01 * torch.randn(layers, n, generator=gen, dtype=x.dtype))
    if family == "outliers":  # raw: a huge mean with unit spread, a column 1e5 times the others
        x[:, :, 5] += 1e6
        x[:, :, 7] *= 1e5
        return x, ids
    return torch.nn.functional.layer_norm(x, (d,)), ids


class FullGram(ResidualStats):
    """``ResidualStats`` with the float64 Gram of before: the full ``uᵀu`` of every batch (a
    verbatim copy of the earlier ``_add_gram``), to compare with the upper-triangular panels."""

    def _add_gram(self, part, u, staged):
        if self.precision == "mixed":
            u32 = u.to(torch.float32)
            with exact_float32_matmul():
                gram = u32.transpose(1, 2) @ u32
            self.sum_xx[part] += gram.to(self.device)
        elif staged:
            self.sum_xx[part] += (u.transpose(1, 2) @ u).to(self.device)
        else:
            self.sum_xx[part].baddbmm_(u.transpose(1, 2), u)


def accumulate(
    x: torch.Tensor, ids: torch.Tensor, batch: int, cls: type = ResidualStats, **options
) -> ResidualStats:
    stats = cls(x.shape[0], x.shape[2], **options)
    for lo in range(0, x.shape[1], batch):
        stats.update(x[:, lo : lo + batch], ids[lo : lo + batch])
    return stats


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def solve_table(sizes: list[tuple[int, int]]) -> None:
    print(
        "\n| entries × d | eigh compute s (CPU s) | new compute s (CPU s) | ratio wall (CPU) "
        "| max abs PR diff | eigh fallbacks |"
    )
    print("|---|---|---|---|---|---|")
    for layers, d in sizes:
        x, ids = features(layers, d + d // 2, d, seed=d)
        stats = accumulate(x, ids, batch=2048)
        del x
        # new, old, new: the faster of the two new runs (the first pays for cold pages)
        new1 = timed(stats.solve)
        old = timed(lambda s=stats: eigh_compute(s))
        new2 = timed(stats.solve)
        new = min(new1, new2, key=lambda t: t[0])
        solved = new[2]
        diff = (solved.pr - old[2]).abs().max().item()
        print(
            f"| {layers} × {d} | {old[0]:.2f} ({old[1]:.2f}) | {new[0]:.3f} ({new[1]:.3f}) "
            f"| {old[0] / new[0]:.1f}x ({old[1] / new[1]:.1f}x) | {diff:.1e} "
            f"| {int(solved.eigh.sum())} of {layers} |",
            flush=True,
        )


def matmul_rate(layers: int, batch: int, d: int, dtype: torch.dtype) -> float:
    """GFLOP/s of the batched ``uᵀu`` this machine reaches, (layers, batch, d) operands."""
    u = torch.randn(layers, batch, d, dtype=dtype)
    out = torch.empty(layers, d, d, dtype=dtype)
    torch.bmm(u.transpose(1, 2), u, out=out)  # warm up
    best = min(timed(lambda: torch.bmm(u.transpose(1, 2), u, out=out))[0] for _ in range(3))
    return 2 * layers * batch * d * d / best / 1e9


def update_table(layers: int, n: int, d: int, batch: int) -> None:
    x, ids = features(layers, n, d, seed=1)
    flops = 2 * layers * n * d * d
    print(f"\nupdate: {layers} entries × {n} tokens × d {d}, batches of {batch} tokens")
    print("| what | s | GFLOP/s | of the float64 matmul rate |")
    print("|---|---|---|---|")
    f64 = matmul_rate(layers, batch, d, torch.float64)
    f32 = matmul_rate(layers, batch, d, torch.float32)
    print(f"| batched matmul uᵀu, float64 | — | {f64:.1f} | 100% |")
    print(f"| batched matmul uᵀu, float32 | — | {f32:.1f} | {100 * f32 / f64:.0f}% |")
    results = {}
    for precision in ("float64", "mixed"):
        for name, cls in (("full uᵀu (before)", FullGram), ("upper panels", ResidualStats)):
            accumulate(x[:, :batch], ids[:batch], batch, cls, precision=precision)  # warm up
            walls = []
            for _ in range(2):
                wall, _, stats = timed(
                    lambda p=precision, c=cls: accumulate(x, ids, batch, c, precision=p)
                )
                walls.append(wall)
            results[precision, name] = stats.compute()
            wall = min(walls)
            rate = flops / wall / 1e9  # flops of the full product: the work done before
            print(
                f"| update, precision={precision}, {name} | {wall:.2f} | {rate:.1f} "
                f"| {100 * rate / f64:.0f}% |",
                flush=True,
            )
        diff = (results[precision, "upper panels"] - results[precision, "full uᵀu (before)"]).abs()
        print(f"| (precision={precision}: max abs PR diff, panels vs full: {diff.max():.1e}) |||")


def mixed_table(dims: list[int]) -> None:
    print("\n| family | d | n | max abs PR diff, mixed vs float64 |")
    print("|---|---|---|---|")
    for d in dims:
        for family in ("layernorm", "massive activations", "outliers"):
            x, ids = features(3, 4 * d, d, seed=d + 7, family=family)
            exact = accumulate(x, ids, 2048).compute()
            mixed = accumulate(x, ids, 2048, precision="mixed").compute()
            diff = (mixed - exact).abs().max().item()
            print(f"| {family} | {d} | {4 * d} | {diff:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="small sizes: runs in seconds")
    parser.add_argument(
        "--parts", default="solve,update,mixed", help="which tables: solve, update, mixed"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if "model name" in line]
        cpu = names[0] if names else cpu
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, load average {load:.1f}"
    )
    tiny = args.tiny
    if "solve" in parts:
        solve_table([(3, 64), (2, 128)] if tiny else [(13, 768), (4, 2048), (2, 4096)])
    if "update" in parts:
        update_table(*((2, 1024, 64, 256) if tiny else (4, 8192, 1024, 2048)))
    if "mixed" in parts:
        mixed_table([32] if tiny else [256, 1024])


if __name__ == "__main__":
    main()
