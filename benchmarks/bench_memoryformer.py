"""MemoryFormer's Memory Layer against nn.Linear at the same sizes, and a MemoryFormer LM against the dense LM.

    python -m benchmarks.bench_memoryformer            # quick: D = 256, 512 at B·T = 2048 tokens
    python -m benchmarks.bench_memoryformer --full     # adds D = 1024

1. ``MemoryLinear(D, D, tau=8)`` (torch backend: ``F.embedding_bag``) vs ``nn.Linear(D, D)``: time of fwd and
   fwd+bwd, and forward FLOPs per token from docs/memoryformer.md#flops (2·K·d_out vs 2·d_in·d_out; the O(d_in) hash
   is ignored).
2. Parameters and forward FLOPs per token of a MemoryFormer LM (pattern [memoryformer]) vs the equivalent dense
   transformer LM (pattern [attention] + SwiGLU, zoo's ``transformer`` configs) at docs/memoryformer.md#configs:
   analytic block FLOPs and whole-model FLOPs counted by ``FlopCounterMode`` on a meta-device forward (with
   ``EMBEDDING_BAG_FLOPS`` so lookups are counted). Models are built on the meta device: nothing is allocated.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import RESULTS, Case, compare, markdown_table, write_results
from zoo.config import AttentionConfig, MemoryFormerConfig, ModelConfig
from zoo.kernels.hash_lookup import EMBEDDING_BAG_FLOPS
from zoo.layers.memoryformer import MemoryLinear
from zoo.models.lm import LanguageModel

TAU = 8


def linear_flops(d_in: int, d_out: int) -> int:
    """Dense linear, forward, per token: 2·d_in·d_out."""
    return 2 * d_in * d_out


def memory_linear_flops(d_in: int, d_out: int, tau: int) -> int:
    """Memory Layer, forward, per token: 2·K·d_out with K = d_in / τ (docs/memoryformer.md#flops)."""
    return 2 * (d_in // tau) * d_out


def block_flops(d: int, s: int, tau: int | None) -> int:
    """Forward FLOPs per token of one block at context s: standard 24d² + 4sd; MemoryFormer
    6d²/τ + 2d²(τ+2)/τ² + 2d²/τ + 4sd (QKV lookup, FFN expand, FFN contract, attention)."""
    attention = 4 * s * d
    if tau is None:
        return 24 * d * d + attention
    K = d // tau
    return (memory_linear_flops(d, 3 * d, tau) + memory_linear_flops(d, K * (tau + 2), tau)
            + memory_linear_flops(K * (tau + 2), d, tau + 2) + attention)


def linear_cases(tau: int) -> list[Case]:
    return [Case("nn.Linear", lambda dim: torch.nn.Linear(dim, dim)),
            Case(f"MemoryLinear tau={tau}", lambda dim: MemoryLinear(dim, dim, tau))]


def model_config(d: int, layers: int, heads: int, tau: int, memory: bool) -> ModelConfig:
    if memory:
        return ModelConfig(dim=d, depth=layers, pattern=["memoryformer"],
                           memoryformer=MemoryFormerConfig(heads=heads, tau=tau))
    return ModelConfig(dim=d, depth=layers, pattern=["attention"], attention=AttentionConfig(heads=heads))


def model_row(name: str, d: int, layers: int, heads: int, seq: int, memory: bool) -> dict:
    """Parameters and forward FLOPs per token of one LM, built and run on the meta device."""
    config = model_config(d, layers, heads, TAU, memory)
    with torch.device("meta"):
        model = LanguageModel(config)
        ids = torch.zeros(1, seq, dtype=torch.long)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel()
    counter = FlopCounterMode(display=False, custom_mapping=EMBEDDING_BAG_FLOPS)
    with counter, torch.no_grad():
        model(ids)
    return {"model": name, "d": d, "layers": layers, "heads": heads, "seq": seq,
            "params": params, "block_params": params - embedding - sum(p.numel() for p in model.norm.parameters()),
            "flops_per_token_counted": counter.get_total_flops() / seq,
            "block_flops_per_token_analytic": layers * block_flops(d, seq, TAU if memory else None)}


def model_rows() -> list[dict]:
    rows = []
    for label, d, layers, heads, seq in [("CPU small", 128, 4, 4, 256), ("CPU medium", 256, 4, 8, 512),
                                         ("paper tiny", 512, 6, 8, 2048)]:
        dense = model_row(f"{label}: dense transformer", d, layers, heads, seq, memory=False)
        memory = model_row(f"{label}: MemoryFormer tau={TAU}", d, layers, heads, seq, memory=True)
        for row in (dense, memory):
            row["params_ratio"] = row["params"] / dense["params"]
            row["flops_ratio"] = row["flops_per_token_counted"] / dense["flops_per_token_counted"]
            row["block_flops_ratio"] = (row["block_flops_per_token_analytic"]
                                        / dense["block_flops_per_token_analytic"])
        rows += [dense, memory]
    return rows


def model_table(rows: list[dict]) -> str:
    lines = ["| model | d | layers | seq | params | block params | FLOPs/token (counted) | ratio | "
             "block FLOPs/token (analytic) | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['d']} | {r['layers']} | {r['seq']} | {r['params'] / 1e6:.2f}M | "
                     f"{r['block_params'] / 1e6:.2f}M | {r['flops_per_token_counted'] / 1e6:.2f}M | "
                     f"{r['flops_ratio']:.3f} | {r['block_flops_per_token_analytic'] / 1e6:.2f}M | "
                     f"{r['block_flops_ratio']:.3f} |")
    return "\n".join(lines)


def flops_table(dims: list[int]) -> str:
    lines = ["| D | nn.Linear FLOPs/token | MemoryLinear FLOPs/token | ratio | nn.Linear params | "
             "MemoryLinear params |", "|---|---|---|---|---|---|"]
    for d in dims:
        dense, memory = linear_flops(d, d), memory_linear_flops(d, d, TAU)
        lines.append(f"| {d} | {dense:,} | {memory:,} | {memory / dense:.3f} | {d * d + d:,} | "
                     f"{(d // TAU) * 2 ** TAU * d + d:,} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    dims = [256, 512] + ([1024] if args.full else [])
    shapes = [(4, 512, d) for d in dims]
    rows = []
    for backward in (False, True):
        timed = compare(linear_cases(TAU), shapes, backward=backward, repeats=args.repeats)
        for row in timed:
            memory = row["case"].startswith("MemoryLinear")
            row["flops_per_token"] = (memory_linear_flops if memory else lambda a, b, _: linear_flops(a, b))(
                row["D"], row["D"], TAU)
        rows += timed
    print(markdown_table(rows))
    models = model_rows()
    print(model_table(models))
    notes = (f"ratio = time / nn.Linear's time at the same shape and pass. MemoryLinear runs the torch backend "
             f"(`F.embedding_bag` with per-sample weights; its backward sorts the B·T·K row ids to build the dense "
             f"table gradient, which dominates fwd+bwd on CPU).\n\n"
             f"### Forward FLOPs per token and parameters, D → D, tau = {TAU}\n\n{flops_table(dims)}\n\n"
             f"### Language models: MemoryFormer vs the dense transformer (meta-device build)\n\n"
             f"{model_table(models)}\n\n"
             "Counted FLOPs include the token embedding lookup (0) and the tied LM head (2·d·258 per token); "
             "attention is counted at the full context s (4·s·d per token). The dense transformer is the "
             "zoo's attention block with a SwiGLU MLP of hidden 8d/3 (8d² parameters, the same as a 4d GELU MLP). "
             "Block FLOPs ratios reproduce docs/memoryformer.md#flops (29.1 % at d=128/256, 43.3 % at d=512, s=2048).")
    path = write_results("memoryformer", rows,
                         header=f"MemoryLinear(D, D, tau={TAU}) vs nn.Linear(D, D), float32, CPU, B·T = 2048 tokens.",
                         notes=notes)
    data = json.loads((RESULTS / "memoryformer.json").read_text())
    data["models"] = models
    (RESULTS / "memoryformer.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
