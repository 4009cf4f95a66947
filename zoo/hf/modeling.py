"""zoo's language models as transformers models: ``ZooConfig`` (model_type "zoo") and ``ZooForCausalLM``.

A zoo export directory (``config.json`` + ``model.safetensors``) of an ``lm`` or ``hmt`` model is a transformers model
directory: ``config.json`` holds the zoo ``Config`` plus ``model_type`` / ``architectures``, and the weights keep zoo's
names (transformers adds the ``model.`` prefix of ``ZooForCausalLM.model`` on load). ``generate()`` carries the zoo
model's own state (KV cache or recurrent state) in a ``ZooCache`` (docs/interop.md#cache).

    import zoo
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("checkpoints/titans-kjv")
    out = model.generate(torch.tensor([[73, 110]]), max_new_tokens=8, do_sample=False)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from zoo.config import Config, from_dict, to_dict
from zoo.models.state import select_rows
from zoo.registry import ARCHITECTURES, architecture, resolve

__all__ = ["CAUSAL_ARCHITECTURES", "ZooCache", "ZooCausalLMOutput", "ZooConfig", "ZooForCausalLM"]

# zoo architectures that are causal language models (``model.architecture``): those that generate
CAUSAL_ARCHITECTURES = tuple(name for name, entry in ARCHITECTURES.items() if entry.generates)


class ZooConfig(PreTrainedConfig):
    """A zoo ``Config`` as a transformers config: the sections of ``config.json`` as dicts (``zoo_config()`` parses)."""

    model_type = "zoo"

    architecture: str | None = None
    zoo_version: str | None = None
    seed: int = 0
    init_from: str | None = None
    model: dict | None = None
    data: dict | None = None
    optim: dict | None = None
    trainer: dict | None = None
    run: dict | None = None
    eval: dict | None = None

    def zoo_config(self) -> Config:
        """The zoo ``Config`` these fields describe (unknown keys are errors, as for ``zoo.load``)."""
        sections = {field.name: getattr(self, field.name) for field in dataclasses.fields(Config)}
        return from_dict({name: value for name, value in sections.items() if value is not None})

    @classmethod
    def from_zoo(cls, config: Config, architecture: str) -> "ZooConfig":
        """The transformers config of a zoo ``Config``; ``architecture`` is the zoo model's class name."""
        from zoo.version import __version__

        return cls(architecture=architecture, zoo_version=__version__, architectures=[ZooForCausalLM.__name__],
                   **to_dict(config))


class ZooCache:
    """The zoo model's state between ``generate()`` steps, and how many tokens of each row it has consumed."""

    is_compileable = False

    def __init__(self, state, seen_tokens: int):
        self.state = state
        self.seen_tokens = seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far (prompt padding included), for transformers' input slicing."""
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: keep rows ``beam_idx`` (B',) of the state, in place (``zoo.models.state.select_rows``)."""
        self.state = select_rows(self.state, beam_idx)


@dataclass
class ZooCausalLMOutput(ModelOutput):
    """loss (scalar, when labels are given), logits (B, T, V), cache (a ``ZooCache`` when use_cache)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: ZooCache | None = None


def zoo_model_config(model: torch.nn.Module):
    """The ``ModelConfig`` that rebuilds ``model`` (a ``LanguageModel``, or an ``HMT`` built by ``HMT.from_config``)."""
    from zoo.models import HMT, LanguageModel

    if isinstance(model, HMT) and model.backbone.config.architecture == "hmt":
        return model.backbone.config
    if isinstance(model, LanguageModel) and model.config.architecture == "lm":
        return model.config
    raise ValueError(f"ZooForCausalLM: {type(model).__name__} is not a zoo causal LM built from a config (a "
                     f"LanguageModel with model.architecture=lm or an HMT with model.architecture=hmt); build it "
                     f"with zoo.build or load it with zoo.load")


class ZooForCausalLM(PreTrainedModel, GenerationMixin):
    """A zoo ``LanguageModel`` or ``HMT`` (``self.model``) behind transformers' causal-LM interface.

    ``forward(input_ids (B, T), attention_mask=None, cache=None, labels=None) -> ZooCausalLMOutput``; a left-padded
    ``attention_mask`` (B, T) is passed to the zoo model as ``attention_mask`` (True = real token).
    """

    config_class = ZooConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: ZooConfig):
        super().__init__(config)
        model_config = config.zoo_config().model
        if model_config.architecture not in CAUSAL_ARCHITECTURES:
            raise ValueError(f"ZooForCausalLM: model.architecture={model_config.architecture} is not a causal "
                             f"language model ({', '.join(CAUSAL_ARCHITECTURES)}); load it with zoo.load instead")
        self.model = resolve(architecture(model_config.architecture).model)(model_config)
        self.post_init()

    @classmethod
    def from_zoo(cls, model: torch.nn.Module) -> "ZooForCausalLM":
        """Wrap a zoo causal LM (its parameters are shared, not copied)."""
        config = ZooConfig.from_zoo(Config(model=zoo_model_config(model)), type(model).__name__)
        with torch.device("meta"):
            wrapper = cls(config)
        wrapper.model = model
        return wrapper.train(model.training)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Recompute the non-persistent buffers of ``module`` (rotary frequencies), which no checkpoint holds.

        zoo's modules compute such buffers in ``reset_parameters``; every parameter is built initialised by the zoo
        model itself, and from_pretrained loads them all.
        """
        if module._non_persistent_buffers_set:
            module.reset_parameters()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """False: the cache is the zoo model's own state (``ZooCache``), made by ``forward``."""
        return False

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.language_model().embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.language_model().embed = value

    def language_model(self):
        """The ``LanguageModel`` holding the embeddings: ``self.model``, or the backbone of an HMT."""
        return getattr(self.model, "backbone", self.model)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: ZooCache | None = None, labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> ZooCausalLMOutput:
        """Logits (B, T, V) of ``input_ids`` (B, T) continuing ``cache``; loss when ``labels`` (B, T) are given."""
        state = None if cache is None else cache.state
        mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1]:].bool()  # (B, T)
        if mask is None or bool(mask.all()):
            logits, state = self.model(input_ids, state)                                     # (B, T, V)
        else:
            logits, state = self.model(input_ids, state, attention_mask=mask)               # (B, T, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
        if use_cache is None:
            use_cache = not self.training
        seen = (0 if cache is None else cache.seen_tokens) + input_ids.shape[1]
        return ZooCausalLMOutput(loss=loss, logits=logits, cache=ZooCache(state, seen) if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: ZooCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                                      **kwargs: Any) -> dict:
        """The tokens the state has not consumed yet (the whole prompt first, then one per step)."""
        if cache is not None:
            input_ids = input_ids[:, cache.seen_tokens:]                                     # (B, new)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Write a zoo export directory (which transformers and ``zoo.load`` both read); no other options."""
        from zoo.checkpoint import export_model

        if kwargs:
            raise ValueError(f"ZooForCausalLM.save_pretrained: options {', '.join(sorted(kwargs))} are not "
                             f"supported; it writes a zoo export directory (config.json + model.safetensors) only")
        export_model(self.model, self.config.zoo_config(), save_directory)
