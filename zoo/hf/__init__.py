"""zoo models in Hugging Face tools: transformers classes, hub-style directories, export to HF Mamba (docs/interop.md).

``import zoo`` calls ``register_when_imported()``: the ``AutoConfig`` / ``AutoModelForCausalLM`` entries for
model_type "zoo" are added when transformers is imported (at once if it already is), so ``import zoo`` itself stays
free of torch and transformers, and zoo works without transformers installed.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["register", "register_when_imported"]

_registered = False


def register() -> None:
    """Register ``ZooConfig`` and ``ZooForCausalLM`` with transformers' Auto classes (once)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from zoo.hf.modeling import ZooConfig, ZooForCausalLM

    AutoConfig.register(ZooConfig.model_type, ZooConfig, exist_ok=True)
    AutoModelForCausalLM.register(ZooConfig, ZooForCausalLM, exist_ok=True)
    _registered = True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of ``transformers`` so that ``register()`` runs once it has loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                register()

            spec.loader.exec_module = exec_module
        return spec


def register_when_imported() -> None:
    """Register now when transformers is imported already, else as soon as it is; nothing when it is not installed."""
    if "transformers" in sys.modules:
        register()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())
