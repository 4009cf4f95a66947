"""zoo: a model zoo of memory-augmented sequence layers for PyTorch (distribution ``memzoo``).

``import zoo`` is light: torch is imported only when a model is built or loaded.

    import zoo
    model = zoo.build(zoo.config.load_config(["config=transformer-mqar"]).model)
"""
from __future__ import annotations

from zoo.hf import register_when_imported
from zoo.version import __version__

__all__ = ["__version__", "build", "load", "list_models"]

register_when_imported()  # transformers' AutoModelForCausalLM reads zoo LM exports (docs/interop.md)


def build(config, *, device=None):
    """Build a model from a ``ModelConfig`` (or a full ``Config``, whose ``model`` section is used) on ``device``
    (default CPU), initialised from the caller's RNG: ``zoo.models.build_model``."""
    from zoo.models import build_model

    return build_model(config, device=device)


def load(path):
    """Load an exported model directory (``config.json`` + ``model.safetensors``) for use."""
    from zoo.checkpoint import load_export

    return load_export(path)


def list_models() -> dict:
    """Names of the registered mixers, bundled configs and shipped checkpoints."""
    from zoo.registry import list_everything

    return list_everything()
