"""Tiny zoo causal LMs of every family, exported to a directory, for the transformers interop tests."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 40

# every mixer family, a hybrid pattern, and HMT over a softmax-attention and a recurrent backbone
FAMILIES = {
    "attention": ["model.pattern=[attention]"],
    "titans": ["model.pattern=[titans]"],
    "titans_mac": ["model.pattern=[titans_mac]"],
    "titans_mag": ["model.pattern=[titans_mag]"],
    "titans_mal": ["model.pattern=[titans_mal]"],
    "mamba": ["model.pattern=[mamba]", "model.mlp=none"],
    "mamba2": ["model.pattern=[mamba2]"],
    "memoryformer": ["model.pattern=[memoryformer]"],
    "gdn": ["model.pattern=[gdn]"],
    "mom": ["model.pattern=[mom]"],
    "hybrid": ["model.pattern=[mamba2,attention,mlp]", "model.depth=3"],
    "hmt_attention": ["model.architecture=hmt", "model.pattern=[attention]", "model.hmt.segment_len=8",
                      "model.hmt.sensory_len=2", "model.hmt.cache_size=3"],
    "hmt_mamba": ["model.architecture=hmt", "model.pattern=[mamba]", "model.hmt.segment_len=8",
                  "model.hmt.sensory_len=2", "model.hmt.cache_size=3"],
}

TINY = ["model.dim=32", "model.depth=2", f"model.vocab_size={VOCAB}", "model.attention.heads=2",
        "model.titans.heads=2", "model.titans.chunk_size=4", "model.titans_mac.heads=2", "model.titans_mac.segment_len=8", "model.titans_mac.memory.chunk_size=4",
        "model.titans_mag.memory.chunk_size=4", "model.titans_mal.memory.chunk_size=4",
        "model.titans_mag.heads=2", "model.titans_mag.window=8", "model.titans_mal.heads=2", "model.titans_mal.window=8",
        "model.mamba2.headdim=16", "model.mamba2.d_state=8", "model.mamba2.chunk_size=4", "model.memoryformer.heads=2",
        "model.memoryformer.tau=4", "model.gdn.heads=2", "model.mom.heads=2"]


def family_config(name: str):
    """The zoo ``Config`` of family ``name`` at test size."""
    from zoo.config import parse_args

    return parse_args(TINY + FAMILIES[name]).config


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """family name -> (zoo model, export directory), built once per session with perturbed norms."""
    from zoo.checkpoint import export_model
    from zoo.models import build_model

    made = {}

    def make(name: str):
        if name not in made:
            config = family_config(name)
            torch.manual_seed(0)
            model = build_model(config).eval()
            with torch.no_grad():
                for param_name, param in model.named_parameters():
                    if param_name.endswith("norm.weight"):
                        param.add_(0.1 * torch.randn_like(param))
            out = export_model(model, config, tmp_path_factory.mktemp(name) / "model")
            made[name] = (model, out)
        return made[name]

    return make
