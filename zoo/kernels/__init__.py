"""Functional ops: one file per op, each with a float64 reference, a chunked torch path and (all but
``titans_mlp_memory``) a Triton path.

``import zoo.kernels`` imports torch and the op modules but never Triton (each op imports its Triton part only when
``backend="triton"`` runs). The functions are bound here explicitly: an op named like its module (``ssd``,
``selective_scan``) would otherwise be shadowed by the submodule once that is imported.
"""
from __future__ import annotations

from zoo.kernels.gated_delta import gated_delta_rule
from zoo.kernels.hash_lookup import hash_lookup
from zoo.kernels.selective_scan import selective_scan
from zoo.kernels.ssd import ssd
from zoo.kernels.titans_linear_memory import titans_linear_memory
from zoo.kernels.titans_mlp_memory import titans_mlp_memory

__all__ = ["gated_delta_rule", "hash_lookup", "selective_scan", "ssd", "titans_linear_memory", "titans_mlp_memory"]
