"""Activation memory with and without ``trainer.activation_checkpointing``: one forward + backward of a small language
model at T = 4096 on CPU, measuring the bytes autograd keeps for backward (distinct storages, the CPU stand-in for
peak activation memory) and the wall time, side by side in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_activation_checkpointing [--T 4096] [--pattern attention]
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.harness import SavedBytes
from zoo.config import parse_args
from zoo.models import build_model
from zoo.train.parallel import checkpoint_blocks


def measure(model, tokens) -> tuple[int, float]:
    start = time.perf_counter()
    with SavedBytes() as saved:
        logits = model(tokens)[0]
    logits.float().logsumexp(-1).mean().backward()
    return saved.bytes, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--pattern", default="attention")
    args = parser.parse_args()
    cfg = parse_args(["model.dim=256", "model.depth=4", "model.attention.heads=4", f"model.pattern=[{args.pattern}]",
                      "model.vocab_size=256"]).config
    torch.manual_seed(0)
    plain = build_model(cfg)
    checkpointed = build_model(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_blocks(checkpointed)
    tokens = torch.randint(0, 256, (1, args.T))
    rows = [(name, *measure(model, tokens)) for name, model in (("off", plain), ("on", checkpointed))]
    print(f"{args.pattern}, dim 256, depth 4, B 1, T {args.T}, CPU float32\n")
    print("| activation_checkpointing | saved for backward (MiB) | fwd+bwd (s) |\n|---|---|---|")
    for name, saved, seconds in rows:
        print(f"| {name} | {saved / 2 ** 20:.1f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
