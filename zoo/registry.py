"""Names users type, resolved lazily: mixers, architectures, bundled configs, shipped checkpoints.

Torch-free, and imports nothing of zoo: the config layer validates ``model.pattern`` and ``model.architecture``
against these tables before torch is imported (``zoo.config`` imports this module, never the reverse).

A layer family registers a mixer by adding one line to ``MIXERS``: name -> (import path, config section of
``ModelConfig``). The model builds every mixer as ``cls(dim=model.dim, **dataclasses.asdict(section))``: a section's
fields are exactly the constructor's arguments besides ``dim``, and a nested section (the Titans hybrids' ``memory``)
arrives as a dict of the nested mixer's arguments.
"""
from __future__ import annotations

import importlib
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

MIXERS: dict[str, tuple[str, str]] = {
    "attention": ("zoo.layers.attention:Attention", "attention"),
    "titans": ("zoo.layers.titans:TitansMemory", "titans"),
    "titans_mac": ("zoo.layers.titans_hybrids:TitansMAC", "titans_mac"),
    "titans_mag": ("zoo.layers.titans_hybrids:TitansMAG", "titans_mag"),
    "titans_mal": ("zoo.layers.titans_hybrids:TitansMAL", "titans_mal"),
    "mamba": ("zoo.layers.mamba:Mamba", "mamba"),
    "mamba2": ("zoo.layers.mamba2:Mamba2", "mamba2"),
    "bimamba": ("zoo.layers.mamba:BiMamba", "mamba"),
    "memoryformer": ("zoo.layers.memoryformer:MemoryAttention", "memoryformer"),
    "gdn": ("zoo.layers.mom:GatedDeltaNet", "gdn"),
    "mom": ("zoo.layers.mom:MixtureOfMemories", "mom"),
}

# Blocks whose channel mixer is part of the layer family (instead of ``model.mlp``): name -> (import path, the fields
# of the mixer's section it takes). Built as ``cls(dim=model.dim, **those fields)``; maps (B, T, D) -> (B, T, D).
BLOCK_MLPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "memoryformer": ("zoo.layers.memoryformer:MemoryFFN", ("tau", "score", "temperature", "table_weight_decay")),
}

# A pattern entry that is not a mixer: a block with only the channel MLP (Mamba-2-Hybrid's MLP layers).
MLP_ONLY = "mlp"


@dataclass(frozen=True)
class Architecture:
    """One value of ``model.architecture``: what is built, how it trains, what it reads and how it is evaluated.

    model: import path of a callable ``(ModelConfig) -> nn.Module`` (a class, or ``module:Class.method``);
    task: import path of the LightningModule class that trains it; data: the ``data.name`` values it reads;
    eval_tasks: ``zoo eval tasks=`` names it offers -> the ``data.name`` holding each one's held-out split (empty:
    ``zoo eval`` scores the checkpoint's own data); retrieval: scored by recall@k/MRR instead of loss and accuracy;
    generates: ``zoo generate`` continues text with it;
    help: one line for ``zoo train --help``.
    """

    model: str
    task: str
    data: tuple[str, ...]
    help: str
    eval_tasks: dict[str, str] = field(default_factory=dict)
    retrieval: bool = False
    generates: bool = False


TOKEN_DATA = ("kjv", "text", "mqar", "selective_copy", "induction", "niah")

ARCHITECTURES: dict[str, Architecture] = {
    "lm": Architecture(model="zoo.models.lm:LanguageModel", task="zoo.train.module:LanguageModelTask",
                       data=TOKEN_DATA, generates=True, help="decoder language model"),
    "vision": Architecture(model="zoo.models.vision:VisionClassifier",
                           task="zoo.train.vision:VisionClassificationTask", data=("digits",),
                           help="image classifier over patches"),
    "hmt": Architecture(model="zoo.models.hmt:HMT.from_config", task="zoo.train.hmt:HMTTask", data=TOKEN_DATA,
                        generates=True, help="the LM wrapped in HMT's hierarchical memory"),
    "embedding": Architecture(model="zoo.models.embedding:EmbeddingModel", task="zoo.train.contrastive:EmbeddingTask",
                              data=("ict", "needle"), eval_tasks={"ict_retrieval": "ict", "needle_retrieval": "needle"},
                              retrieval=True, help="text embedder (backbone + pooling head, contrastive training)"),
}


def resolve(path: str):
    """Import ``module:attr`` (``attr`` may be dotted, e.g. ``HMT.from_config``) and return the object."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def block_kinds() -> list[str]:
    """Every name ``model.pattern`` accepts."""
    return sorted(MIXERS) + [MLP_ONLY]


def mixer_class(name: str):
    """Import and return the mixer class registered as ``name``."""
    if name not in MIXERS:
        raise KeyError(f"unknown mixer '{name}'; known: {', '.join(sorted(MIXERS))}")
    return resolve(MIXERS[name][0])


def block_mlp_class(name: str):
    """The channel mixer class a block kind brings with it, or None (then ``model.mlp`` applies)."""
    return resolve(BLOCK_MLPS[name][0]) if name in BLOCK_MLPS else None


def mixer_section(name: str) -> str:
    """The ``ModelConfig`` field holding the options of mixer ``name``."""
    return MIXERS[name][1]


def architecture(name: str) -> Architecture:
    """The ``ARCHITECTURES`` entry ``name``, with a one-line error naming the known ones."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture '{name}'; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def bundled_config_names() -> list[str]:
    """Names of the configs shipped inside the package (``zoo/configs/*.yaml``)."""
    root = importlib.resources.files("zoo") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


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
    return {"mixers": sorted(MIXERS), "configs": bundled_config_names(), "checkpoints": shipped_checkpoints()}
