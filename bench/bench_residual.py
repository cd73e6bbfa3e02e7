"""The PR engine against the straightforward way, side by side on the same data.

For each (layers, n, d): lawwatch's streaming statistics + one batched solve, against numpy's
float64 lstsq of each layer's full design matrix (what a re-implementation of the paper does).
Reports the wall time of each, their ratio, the largest |PR difference|, and the memory each
needs (statistics vs. the stacked features).

Run: ``make bench`` or ``.venv/bin/python bench/bench_residual.py [--quick]``.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from lawwatch.stats.residual import ResidualStats


def _features(layers: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm'd random features, partly predictive of Zipf-like token ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.clamp(torch.distributions.Pareto(1.0, 1.2).sample((n,)).long(), max=50_000)
    z = (ids.double().log1p() - ids.double().log1p().mean()) / ids.double().log1p().std()
    x = torch.randn(layers, n, d, generator=gen, dtype=torch.float64)
    x[:, :, 0] += torch.linspace(0.2, 2.0, layers)[:, None] * z
    return torch.nn.functional.layer_norm(x, (d,)), ids


def _lstsq(x: np.ndarray, y: np.ndarray) -> float:
    design = np.hstack([x, np.ones((x.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    return float((resid**2).sum() / ((y - y.mean()) ** 2).sum())


def run(layers: int, n: int, d: int, batch: int, seed: int = 0) -> dict[str, float]:
    x, ids = _features(layers, n, d, seed)
    start = time.perf_counter()
    stats = ResidualStats(layers, d)
    for lo in range(0, n, batch):
        stats.update(x[:, lo : lo + batch], ids[lo : lo + batch])
    t_update = time.perf_counter() - start
    pr = stats.compute()
    t_ours = time.perf_counter() - start
    xs, y = x.numpy(), ids.double().numpy()
    start = time.perf_counter()
    ref = np.array([_lstsq(xs[i], y) for i in range(layers)])
    t_ref = time.perf_counter() - start
    return {
        "t_update": t_update,
        "t_ours": t_ours,
        "t_ref": t_ref,
        "err": float(np.abs(pr.numpy() - ref).max()),
        "stats_mb": (layers * d * d + 3 * layers * d) * 8 / 2**20,
        "features_mb": layers * n * d * 8 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--tiny", action="store_true", help="one tiny size, seconds (tests)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sizes = (
        [(7, 4096, 64), (13, 8192, 256)]
        if args.quick
        else [
            (7, 4096, 64),
            (13, 8192, 256),
            (13, 16384, 768),
        ]
    )
    if args.tiny:
        sizes = [(4, 512, 16)]
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        "| layers | n | d | lawwatch s (of which update) | numpy lstsq s | ratio | max abs diff "
        "| stats MB | features MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for layers, n, d in sizes:
        r = run(layers, n, d, batch=2048)
        print(
            f"| {layers} | {n} | {d} | {r['t_ours']:.2f} ({r['t_update']:.2f}) | {r['t_ref']:.2f} "
            f"| {r['t_ref'] / r['t_ours']:.1f}x | {r['err']:.1e} | {r['stats_mb']:.1f} "
            f"| {r['features_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
