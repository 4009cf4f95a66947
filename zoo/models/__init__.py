"""Assembled models: ``LanguageModel`` (decoder LM from a block pattern), ``EmbeddingModel``, ``HMT`` (a wrapper that
makes any of them segment-recurrent), ``VisionClassifier``, and ``build_model``, the one place models are built."""
from __future__ import annotations

import torch

from zoo.models.embedding import EmbeddingModel
from zoo.models.hmt import HMT, HMTState
from zoo.models.lm import Block, LanguageModel
from zoo.models.vision import VisionClassifier
from zoo.registry import architecture, resolve


def build_model(config, *, device: str | torch.device | None = None) -> torch.nn.Module:
    """The model a ``Config`` (or its ``ModelConfig``) describes, built as ``ARCHITECTURES`` names it: constructed on
    the meta device, materialised on ``device`` (default CPU), then initialised by one ``reset_parameters()`` pass
    that draws from the caller's RNG (seed it first, as training does, for reproducible weights)."""
    from zoo.config import Config

    model_config = config.model if isinstance(config, Config) else config
    build = resolve(architecture(model_config.architecture).model)
    with torch.device("meta"):
        model = build(model_config)
    model.to_empty(device=device or "cpu")
    model.reset_parameters()
    return model


__all__ = ["Block", "EmbeddingModel", "HMT", "HMTState", "LanguageModel", "VisionClassifier", "build_model"]

