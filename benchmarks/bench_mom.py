"""CPU cost of Mixture-of-Memories: (a) the gated delta rule op vs fla's pure-PyTorch chunked form, (b) a MoM layer's
forward + backward vs one GatedDeltaNet layer of the same width (docs/mom.md#cost; target ≤ 1.3·(k + 1)×).

Every comparison runs side by side in one process: the candidates alternate inside each repeat and the best (minimum)
wall time per candidate is kept, which is the robust statistic on a shared machine. Writes markdown + JSON.

    OMP_NUM_THREADS=1 python benchmarks/bench_mom.py                 # quick: op T ∈ {512, 1024}, layer T ∈ {2k, 4k}
    OMP_NUM_THREADS=1 python benchmarks/bench_mom.py --full          # op up to 2k, layer T ∈ {2k, 4k, 8k, 16k}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from zoo.kernels import gated_delta_rule
from zoo.layers.mom import GatedDeltaNet, MixtureOfMemories

RESULTS = Path(__file__).parent / "results"


def fla_chunk():
    """fla's ``naive_chunk_gated_delta_rule`` (keywords only: its sibling ops disagree on argument order), or the
    reason it is unavailable. Its import runs on CPU (fla warns and falls back); its Triton ops do not."""
    try:
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
        import fla
    except Exception as error:  # not installed, or an import that needs triton/GPU pieces
        return None, f"fla unavailable: {type(error).__name__}: {error}"
    function = lambda q, k, v, g, beta: naive_chunk_gated_delta_rule(  # noqa: E731
        q=q, k=k, v=v, g=g, beta=beta, chunk_size=64)[0]
    return function, f"flash-linear-attention {fla.__version__}"


def op_inputs(T: int, heads: int, dim: int, seed: int = 0):
    """B = 1 inputs in the layer's regime: unit keys, β ∈ (0, 1), g = −0.1·softplus(·); all requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, heads, dim, generator=generator)                                   # (B, T, H, K)
    k = torch.nn.functional.normalize(torch.randn(1, T, heads, dim, generator=generator), dim=-1)
    v = torch.randn(1, T, heads, dim, generator=generator)                                   # (B, T, H, V)
    g = -0.1 * torch.nn.functional.softplus(torch.randn(1, T, heads, generator=generator))   # (B, T, H)
    beta = torch.rand(1, T, heads, generator=generator)                                      # (B, T, H)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def timed(run) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds) of one call of ``run() -> output``."""
    start = time.perf_counter()
    out = run()
    middle = time.perf_counter()
    out.float().square().mean().backward()
    return middle - start, time.perf_counter() - start


def best_of(candidates: dict, repeats: int) -> dict:
    """Alternate the candidates ``repeats`` times (after one warm-up each); the minimum fwd and fwd+bwd per name."""
    best = {name: [float("inf"), float("inf")] for name in candidates}
    for repeat in range(repeats + 1):
        for name, run in candidates.items():
            forward, total = timed(run)
            if repeat:
                best[name] = [min(best[name][0], forward), min(best[name][1], total)]
    return best


def bench_op(lengths, heads, dim, repeats):
    fla, fla_note = fla_chunk()
    rows = []
    for T in lengths:
        inputs = op_inputs(T, heads, dim)
        candidates = {"zoo": lambda: gated_delta_rule(*inputs, backend="torch")[0]}
        if fla is not None:
            candidates["fla"] = lambda: fla(*inputs)
        best = best_of(candidates, repeats)
        row = {"T": T, "zoo_fwd_s": best["zoo"][0], "zoo_fwd_bwd_s": best["zoo"][1]}
        if fla is not None:
            with torch.no_grad():
                agreement = float((fla(*inputs) - candidates["zoo"]()).norm() / fla(*inputs).norm())
            row.update(fla_fwd_s=best["fla"][0], fla_fwd_bwd_s=best["fla"][1], rel_diff=agreement,
                       fla_over_zoo_fwd=best["fla"][0] / best["zoo"][0],
                       fla_over_zoo_fwd_bwd=best["fla"][1] / best["zoo"][1])
        rows.append(row)
        print("op", row, flush=True)
    return {"heads": heads, "head_dim": dim, "B": 1, "fla": fla_note, "rows": rows}


def bench_layer(lengths, dim, heads, head_dim, memories, topk, repeats):
    torch.manual_seed(0)
    gdn = GatedDeltaNet(dim, heads=heads, head_dim=head_dim)
    mom = MixtureOfMemories(dim, heads=heads, head_dim=head_dim, num_memories=memories, topk=topk)
    rows = []
    for T in lengths:
        x = torch.randn(1, T, dim, generator=torch.Generator().manual_seed(T)).requires_grad_()
        best = best_of({"gdn": lambda: gdn(x)[0], "mom": lambda: mom(x)[0]}, repeats)
        row = {"T": T, "gdn_fwd_bwd_s": best["gdn"][1], "mom_fwd_bwd_s": best["mom"][1],
               "gdn_fwd_s": best["gdn"][0], "mom_fwd_s": best["mom"][0],
               "ratio_fwd_bwd": best["mom"][1] / best["gdn"][1], "ratio_fwd": best["mom"][0] / best["gdn"][0]}
        rows.append(row)
        print("layer", row, flush=True)
    return {"dim": dim, "heads": heads, "head_dim": head_dim, "num_memories": memories, "topk": topk,
            "shared_memory": True, "B": 1, "target_ratio": 1.3 * (topk + 1), "rows": rows}


def markdown(result: dict) -> str:
    op, layer = result["op"], result["layer"]
    lines = ["# MoM on CPU", "",
             f"Machine: {result['machine']}; torch {result['torch']}; {result['threads']} threads. "
             "Best of the repeats, candidates alternating inside each repeat (shared machine).", "",
             f"Command: `{result['command']}`", "",
             f"## (a) gated_delta_rule vs fla's naive_chunk_gated_delta_rule (B=1, H={op['heads']}, "
             f"d={op['head_dim']}, fp32)", "", f"fla: {op['fla']}", "",
             "| T | zoo fwd (s) | zoo fwd+bwd (s) | fla fwd (s) | fla fwd+bwd (s) | fla/zoo fwd | fla/zoo fwd+bwd "
             "| rel diff |", "|---|---|---|---|---|---|---|---|"]
    for r in op["rows"]:
        lines.append(f"| {r['T']} | {r['zoo_fwd_s']:.3f} | {r['zoo_fwd_bwd_s']:.3f} | "
                     f"{r.get('fla_fwd_s', float('nan')):.3f} | {r.get('fla_fwd_bwd_s', float('nan')):.3f} | "
                     f"{r.get('fla_over_zoo_fwd', float('nan')):.2f} | "
                     f"{r.get('fla_over_zoo_fwd_bwd', float('nan')):.2f} | {r.get('rel_diff', float('nan')):.1e} |")
    lines += ["", f"## (b) MixtureOfMemories vs GatedDeltaNet, fwd+bwd (B=1, dim={layer['dim']}, "
                  f"H={layer['heads']}×{layer['head_dim']}, M={layer['num_memories']}, k={layer['topk']}, "
                  f"shared memory)", "",
              f"Target: MoM ≤ 1.3·(k+1) = {layer['target_ratio']:.1f}× one GatedDeltaNet layer.", "",
              "| T | GDN fwd+bwd (s) | MoM fwd+bwd (s) | ratio fwd+bwd | ratio fwd | within target |",
              "|---|---|---|---|---|---|"]
    for r in layer["rows"]:
        ok = "yes" if r["ratio_fwd_bwd"] <= layer["target_ratio"] else "no"
        lines.append(f"| {r['T']} | {r['gdn_fwd_bwd_s']:.3f} | {r['mom_fwd_bwd_s']:.3f} | "
                     f"{r['ratio_fwd_bwd']:.2f} | {r['ratio_fwd']:.2f} | {ok} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="op up to T=2048, layer T ∈ {2k, 4k, 8k, 16k}")
    parser.add_argument("--op-lengths", type=int, nargs="+")
    parser.add_argument("--layer-lengths", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "mom"), help="output stem (.md and .json are written)")
    args = parser.parse_args(argv)
    op_lengths = args.op_lengths or ([512, 1024, 2048] if args.full else [512, 1024])
    layer_lengths = args.layer_lengths or ([2048, 4096, 8192, 16384] if args.full else [2048, 4096])
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}".replace(
            "OMP_NUM_THREADS= ", ""), "python benchmarks/bench_mom.py", *(sys.argv[1:] if argv is None else argv)]),
        "op": bench_op(op_lengths, args.heads, args.head_dim, args.repeats),
        "layer": bench_layer(layer_lengths, args.dim, args.heads, args.head_dim, 4, 2, args.repeats),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
