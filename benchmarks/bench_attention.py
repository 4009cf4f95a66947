"""zoo's Attention against torch.nn.MultiheadAttention (causal mask), side by side in one process.

    python -m benchmarks.bench_attention            # quick: T = 512, 1024, 2048 at D = 256
    python -m benchmarks.bench_attention --full     # adds T = 4096

Both use PyTorch's scaled_dot_product_attention; zoo adds RoPE and its KV-cache bookkeeping.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.harness import Case, compare, markdown_table, write_results, zoo_mixer_case


def torch_mha_case(heads: int) -> Case:
    def build(dim: int):
        return torch.nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)

    def call(module, x):
        T = x.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(T, device=x.device, dtype=x.dtype)
        return module(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]

    return Case("torch MultiheadAttention", build, call)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    lengths = [512, 1024, 2048] + ([4096] if args.full else [])
    shapes = [(1, T, 256) for T in lengths]
    rows = compare([zoo_mixer_case("attention", heads=4), torch_mha_case(4)], shapes, repeats=args.repeats)
    print(markdown_table(rows))
    path = write_results("attention", rows, header="Causal self-attention, fwd+bwd, D = 256, 4 heads, float32.",
                         notes="ratio = time / zoo Attention's time at the same shape.")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
