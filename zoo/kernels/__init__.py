"""Functional ops: one file per op, each with a float64 reference, a chunked torch path and a Triton path.

Names resolve lazily, so ``import zoo.kernels`` imports neither Triton nor any op module until it is used.
"""
from __future__ import annotations

import importlib

_OPS = {
    "titans_linear_memory": "zoo.kernels.titans_memory",
    "titans_mlp_memory": "zoo.kernels.titans_deep_memory",
    "selective_scan": "zoo.kernels.selective_scan",
    "ssd": "zoo.kernels.ssd",
    "gated_delta_rule": "zoo.kernels.gated_delta",
    "hash_lookup": "zoo.kernels.hash_lookup",
}

__all__ = list(_OPS)


def __getattr__(name: str):
    if name in _OPS:
        return getattr(importlib.import_module(_OPS[name]), name)
    raise AttributeError(f"module 'zoo.kernels' has no attribute {name!r}")
