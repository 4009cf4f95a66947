"""Assembled models: ``LanguageModel`` (decoder LM from a block pattern) and ``build_model``."""
from __future__ import annotations

from zoo.models.embedding import EmbeddingModel
from zoo.models.lm import Block, LanguageModel


def build_model(config):
    """Build the model a ``Config`` (or its ``ModelConfig``) describes."""
    from zoo.config import Config

    model_config = config.model if isinstance(config, Config) else config
    if model_config.architecture == "vision":
        from zoo.models.vision import VisionClassifier

        return VisionClassifier(model_config)
    if model_config.architecture == "hmt":
        from zoo.models.hmt import HMT

        return HMT.from_config(model_config)
    if model_config.architecture == "embedding":
        return EmbeddingModel(model_config)
    return LanguageModel(model_config)


__all__ = ["Block", "EmbeddingModel", "LanguageModel", "build_model"]
