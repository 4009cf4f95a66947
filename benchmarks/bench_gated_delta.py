"""CPU timing of ``gated_delta_rule``: the token-loop reference vs the chunked torch (WY/UT) path, forward + backward.

Prints a markdown table of median wall times. When ``fla`` (flash-linear-attention) is importable, its pure-PyTorch
``naive_chunk_gated_delta_rule`` is timed side by side on the same inputs (fla's own naive reference; it runs on CPU).

    OMP_NUM_THREADS=2 python benchmarks/bench_gated_delta.py [--lengths 256 1024 4096] [--heads 4] [--dim 64]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from zoo.kernels import gated_delta_rule


def make_inputs(T: int, heads: int, dim: int, seed: int = 0):
    """B = 1 inputs in the layer's regime: unit keys, β = sigmoid, g = −softplus; all requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, heads, dim, generator=generator)  # (B, T, H, K)
    k = torch.nn.functional.normalize(torch.randn(1, T, heads, dim, generator=generator), dim=-1)  # (B, T, H, K)
    v = torch.randn(1, T, heads, dim, generator=generator)  # (B, T, H, V)
    g = -torch.nn.functional.softplus(torch.randn(1, T, heads, generator=generator)) * 0.1  # (B, T, H)
    beta = torch.rand(1, T, heads, generator=generator).sigmoid()  # (B, T, H)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def time_call(function, inputs, repeats: int) -> tuple[float, float]:
    """Median forward time and median forward + backward time in seconds."""
    forward, total = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        o = function(*inputs)
        middle = time.perf_counter()
        o.float().square().sum().backward()
        end = time.perf_counter()
        forward.append(middle - start)
        total.append(end - start)
        for x in inputs:
            x.grad = None
    return statistics.median(forward), statistics.median(total)


def fla_function():
    """fla's pure-PyTorch chunked gated delta rule, or None without fla (keywords only: docs/mom.md)."""
    try:
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
    except Exception:  # not installed, or fla.ops needs triton/GPU pieces that are missing
        return None
    return lambda q, k, v, g, beta: naive_chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, chunk_size=64)[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-max-length", type=int, default=1024,
                        help="skip the token-loop reference above this T (it is slow)")
    args = parser.parse_args(argv)

    paths = {
        "reference": lambda *xs: gated_delta_rule(*xs, backend="reference")[0],
        "torch (chunked)": lambda *xs: gated_delta_rule(*xs, backend="torch")[0],
    }
    fla = fla_function()
    if fla is not None:
        paths["fla naive_chunk"] = fla
    print(f"gated_delta_rule on CPU, float32, B=1, H={args.heads}, K=V={args.dim}, threads={torch.get_num_threads()}, "
          f"median of {args.repeats}; fla {'found' if fla is not None else 'not installed'}\n")
    print("| T | " + " | ".join(f"{name} fwd / fwd+bwd (s)" for name in paths) + " | speed-up fwd+bwd |")
    print("|---" * (len(paths) + 2) + "|")
    for T in args.lengths:
        inputs = make_inputs(T, args.heads, args.dim)
        cells, totals = [], {}
        for name, function in paths.items():
            if name == "reference" and T > args.reference_max_length:
                cells.append("skipped")
                continue
            try:
                forward, total = time_call(function, inputs, args.repeats)
            except Exception as error:  # a peer that fails on CPU is reported, not fatal
                cells.append(f"failed: {type(error).__name__}")
                continue
            totals[name] = total
            cells.append(f"{forward:.3f} / {total:.3f}")
        ratio = (f"{totals['reference'] / totals['torch (chunked)']:.0f}x vs reference"
                 if "reference" in totals and "torch (chunked)" in totals else "")
        print(f"| {T} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
