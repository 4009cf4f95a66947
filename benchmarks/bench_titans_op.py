"""Time the Titans memory ops on CPU: the token-loop reference against the chunked torch path, forward + backward.

    python benchmarks/bench_titans_op.py [--lengths 256 1024] [--repeats 3] [--threads 1]

Prints a markdown table (median seconds of ``--repeats`` runs of forward + backward of sum(o) + sum(M)) for the linear
op ``titans_linear_memory`` and the deep op ``titans_mlp_memory`` (L = 2, expansion 4).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from zoo.kernels.titans_linear_memory import titans_linear_memory
from zoo.kernels.titans_mlp_memory import titans_mlp_memory


def _linear_inputs(B, T, H, d):
    q, k = torch.nn.functional.normalize(torch.randn(2, B, T, H, d), dim=-1)
    v = torch.randn(B, T, H, d)
    alpha, eta, theta = torch.rand(3, B, T, H) * torch.tensor([0.05, 1.0, 0.2])[:, None, None, None]
    return [x.requires_grad_() for x in (q, k, v, alpha, eta, theta)]


def _deep_inputs(B, T, H, d):
    tensors = _linear_inputs(B, T, H, d)
    theta = (0.1 * torch.rand(B, T, H, 2)).requires_grad_()
    weights = [(torch.randn(H, d, 4 * d) / d ** 0.5).requires_grad_(),
               (torch.randn(H, 4 * d, d) / (4 * d) ** 0.5).requires_grad_()]
    return tensors[:5] + [theta], weights


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-reference-length", type=int, default=256,
                        help="skip the (slow) token-loop reference above this T")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, H, d, b = args.batch, args.heads, args.head_dim, args.chunk_size

    def linear(backend, inputs):
        o, (M, *_) = titans_linear_memory(*inputs, chunk_size=b, backend=backend)
        (o.sum() + M.sum()).backward()

    def deep(backend, inputs, weights):
        o, state = titans_mlp_memory(*inputs, weights, chunk_size=b, backend=backend)
        (o.sum() + sum(w.sum() for w in state.weights)).backward()

    print(f"B={B} H={H} d={d} chunk_size={b} threads={args.threads}; median of {args.repeats} fwd+bwd, seconds\n")
    print("| op | T | reference | torch | speed-up |")
    print("|---|---|---|---|---|")
    for T in args.lengths:
        inputs = _linear_inputs(B, T, H, d)
        deep_inputs, weights = _deep_inputs(B, T, H, d)
        rows = [("titans_linear_memory", lambda backend: linear(backend, inputs)),
                ("titans_mlp_memory (L=2)", lambda backend: deep(backend, deep_inputs, weights))]
        for name, run in rows:
            torch_time = _time(lambda: run("torch"), args.repeats)
            if T <= args.max_reference_length:
                ref_time = _time(lambda: run("reference"), args.repeats)
                print(f"| {name} | {T} | {ref_time:.3f} | {torch_time:.3f} | {ref_time / torch_time:.1f}x |")
            else:
                print(f"| {name} | {T} | – | {torch_time:.3f} | – |")


if __name__ == "__main__":
    main()
