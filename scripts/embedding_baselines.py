"""Held-out retrieval of an embedder before contrastive training: random initialisation, then initialised from its
``init_from`` LM export (the rows a trained checkpoint's card is compared with).

    python scripts/embedding_baselines.py [config=nv-embed.yaml]

Uses the same data, evaluation and batch size as ``zoo eval`` on the trained export.
"""
from __future__ import annotations

import json
import sys

import torch

from zoo.checkpoint import load_init_weights
from zoo.config import parse_args
from zoo.data.loader import build_data
from zoo.eval.evaluate import evaluate
from zoo.models import build_model


def main(argv: list[str]) -> None:
    cfg = parse_args(argv or ["config=nv-embed.yaml"]).config
    data = build_data(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    print("random init", json.dumps(evaluate(model, data, cfg.data.eval_batch_size, None, cfg.data.name)))
    if cfg.init_from:
        load_init_weights(model, cfg.init_from)
        print(f"from {cfg.init_from}", json.dumps(evaluate(model, data, cfg.data.eval_batch_size, None,
                                                            cfg.data.name)))


if __name__ == "__main__":
    main(sys.argv[1:])
