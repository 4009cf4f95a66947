"""Names users type in configs, resolved lazily: mixers, bundled configs, shipped checkpoints.

Torch-free: the config layer validates ``model.pattern`` against ``MIXERS`` before torch is imported.
A layer family registers its mixers by adding a line here: name -> (import path, config section of ``ModelConfig``).
The model builds a mixer as ``cls.from_config(dim, section)`` when the class defines it, else
``cls(dim=dim, **fields of section)``.
"""
from __future__ import annotations

import importlib
from pathlib import Path

MIXERS: dict[str, tuple[str, str]] = {
    "attention": ("zoo.layers.attention:Attention", "attention"),
    "titans": ("zoo.layers.titans:TitansMemory", "titans"),
    "titans_mac": ("zoo.layers.titans:TitansMAC", "titans"),
    "titans_mag": ("zoo.layers.titans:TitansMAG", "titans"),
    "titans_mal": ("zoo.layers.titans:TitansMAL", "titans"),
    "mamba": ("zoo.layers.mamba:Mamba", "mamba"),
    "mamba2": ("zoo.layers.mamba2:Mamba2", "mamba2"),
    "bimamba": ("zoo.layers.mamba:BiMamba", "mamba"),
    "memoryformer": ("zoo.layers.memoryformer:MemoryAttention", "memoryformer"),
    "gdn": ("zoo.layers.mom:GatedDeltaNet", "mom"),
    "mom": ("zoo.layers.mom:MixtureOfMemories", "mom"),
}

# Blocks whose channel mixer is part of the layer family (instead of ``model.mlp``): name -> import path. The class
# is built like a mixer (``from_config(dim, section)`` or ``cls(dim=dim, **fields)``) and maps (B, T, D) -> (B, T, D).
BLOCK_MLPS: dict[str, str] = {
    "memoryformer": "zoo.layers.memoryformer:MemoryFFN",
}

# A pattern entry that is not a mixer: a block with only the channel MLP (Mamba-2-Hybrid's MLP layers).
MLP_ONLY = "mlp"


def block_kinds() -> list[str]:
    """Every name ``model.pattern`` accepts."""
    return sorted(MIXERS) + [MLP_ONLY]


def mixer_class(name: str):
    """Import and return the mixer class registered as ``name``."""
    if name not in MIXERS:
        raise KeyError(f"unknown mixer '{name}'; known: {', '.join(sorted(MIXERS))}")
    module, _, attr = MIXERS[name][0].partition(":")
    return getattr(importlib.import_module(module), attr)


def block_mlp_class(name: str):
    """The channel mixer class a block kind brings with it, or None (then ``model.mlp`` applies)."""
    if name not in BLOCK_MLPS:
        return None
    module, _, attr = BLOCK_MLPS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def mixer_section(name: str) -> str:
    """The ``ModelConfig`` field holding the options of mixer ``name``."""
    return MIXERS[name][1]


def checkpoints_dir() -> Path:
    """Where shipped checkpoints live: ``checkpoints/`` of the source checkout (next to the package)."""
    return Path(__file__).resolve().parent.parent / "checkpoints"


def shipped_checkpoints() -> list[str]:
    """Names of the checkpoint directories shipped with the checkout."""
    root = checkpoints_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def list_everything() -> dict:
    """Mixers, bundled configs and shipped checkpoints, by kind."""
    from zoo.config import bundled_config_names

    return {"mixers": sorted(MIXERS), "configs": bundled_config_names(), "checkpoints": shipped_checkpoints()}
