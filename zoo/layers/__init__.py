"""Layers users import: mixers (sequence mixing) and building blocks.

    from zoo.layers import Attention
    mixer = Attention(dim=128, heads=4)
    y, state = mixer(torch.randn(2, 16, 128))

Names resolve lazily so that ``import zoo.layers`` stays cheap and each family imports only when used.
"""
from __future__ import annotations

import importlib

_NAMES = {
    "RMSNorm": "zoo.layers.norm",
    "SwiGLU": "zoo.layers.mlp",
    "ShortConv": "zoo.layers.conv",
    "RotaryEmbedding": "zoo.layers.rotary",
    "Attention": "zoo.layers.attention",
    "AttentionState": "zoo.layers.attention",
    "Mamba": "zoo.layers.mamba",
    "Mamba2": "zoo.layers.mamba2",
    "BiMamba": "zoo.layers.mamba",
    "MambaState": "zoo.layers.mamba",
    "Mamba2State": "zoo.layers.mamba2",
    "GatedDeltaNet": "zoo.layers.mom",
    "MixtureOfMemories": "zoo.layers.mom",
    "GDNState": "zoo.layers.mom",
    "MoMState": "zoo.layers.mom",
    "MemoryLinear": "zoo.layers.memoryformer",
    "MemoryFFN": "zoo.layers.memoryformer",
    "MemoryAttention": "zoo.layers.memoryformer",
    "TitansMemory": "zoo.layers.titans",
    "TitansState": "zoo.layers.titans",
    "MACState": "zoo.layers.titans_hybrids",
    "MAGState": "zoo.layers.titans_hybrids",
    "MALState": "zoo.layers.titans_hybrids",
    "TitansMAC": "zoo.layers.titans_hybrids",
    "TitansMAG": "zoo.layers.titans_hybrids",
    "TitansMAL": "zoo.layers.titans_hybrids",
    "LatentAttentionPooling": "zoo.layers.latent_pooling",
}

__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'zoo.layers' has no attribute {name!r}")
