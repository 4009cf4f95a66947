"""Time the Mamba ops on CPU: reference loop vs chunked torch path, forward + backward, at a few T.

Usage: ``python benchmarks/bench_mamba_ops.py [--lengths 256 1024 2048] [--repeats 3] [--threads N] [--out F.md]``.
Prints a markdown table (median of the repeats, after one warm-up) with torch version, threads and machine.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from zoo.kernels.selective_scan import selective_scan
from zoo.kernels.ssd import ssd


def _time_fwd_bwd(fn, make, repeats):
    """Median seconds of forward + backward of mean(y²) + mean(state²), after one warm-up."""
    times = []
    for i in range(repeats + 1):
        inputs = make()
        start = time.perf_counter()
        y, state = fn(*inputs)
        (y.square().mean() + state.square().mean()).backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _scan_inputs(T, Dm=256, N=16):
    def make():
        gen = torch.Generator().manual_seed(0)
        return [t.requires_grad_() for t in (
            torch.randn(1, T, Dm, generator=gen), torch.randn(1, T, Dm, generator=gen) - 2,
            -torch.rand(Dm, N, generator=gen) - 0.5, torch.randn(1, T, N, generator=gen),
            torch.randn(1, T, N, generator=gen))]
    return make


def _ssd_inputs(T, H=8, P=32, N=64):
    def make():
        gen = torch.Generator().manual_seed(0)
        return [t.requires_grad_() for t in (
            torch.randn(1, T, H, P, generator=gen), torch.randn(1, T, H, generator=gen) - 2,
            -torch.rand(H, generator=gen) - 0.5, torch.randn(1, T, 1, N, generator=gen),
            torch.randn(1, T, 1, N, generator=gen))]
    return make


SSD_SHAPES = [(8, 32, 64), (24, 64, 128)]  # (H, P, N): a small head set, and Mamba-2 at d_model 768 (headdim 64)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [f"# Mamba ops on CPU: reference loop vs chunked torch path\n",
             f"Command: `python benchmarks/bench_mamba_ops.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')})."
             f"\n", f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()} "
             f"{platform.processor() or platform.platform()}; fp32, B = 1, fwd+bwd, median of {args.repeats}\n",
             "| op | shape | T | reference (s) | torch chunked (s) | speed-up |", "|---|---|---|---|---|---|"]
    for line in lines:
        print(line, flush=True)

    def row(text):
        lines.append(text)
        print(text, flush=True)

    for T in args.lengths:
        ref = _time_fwd_bwd(lambda *a: selective_scan(*a, delta_softplus=True, backend="reference"),
                            _scan_inputs(T), args.repeats)
        fast = _time_fwd_bwd(lambda *a: selective_scan(*a, delta_softplus=True, backend="torch"),
                             _scan_inputs(T), args.repeats)
        row(f"| selective_scan | Dm 256, N 16 | {T} | {ref:.3f} | {fast:.3f} | {ref / fast:.1f}x |")
    for H, P, N in SSD_SHAPES:
        for T in args.lengths:
            make = _ssd_inputs(T, H, P, N)
            ref = _time_fwd_bwd(lambda *a: ssd(*a, chunk_size=64, backend="reference"), make, args.repeats)
            fast = _time_fwd_bwd(lambda *a: ssd(*a, chunk_size=64, backend="torch"), make, args.repeats)
            row(f"| ssd (chunk 64) | H {H}, P {P}, N {N} | {T} | {ref:.3f} | {fast:.3f} | {ref / fast:.1f}x |")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
