"""Text embedder (NV-Embed recipe, arXiv 2405.17428): a zoo block stack without the LM head, bidirectional where the
mixer supports it, plus a pooling head (latent attention, masked mean, or the last valid token).

    from zoo.config import ModelConfig
    from zoo.models.embedding import EmbeddingModel
    cfg = ModelConfig(architecture="embedding", dim=64, depth=2)
    cfg.attention.heads, cfg.embedding.num_latents, cfg.embedding.heads = 2, 16, 2
    model = EmbeddingModel(cfg)
    e = model.encode(["In the beginning", "Jesus wept."])                     # (2, 64), unit norm
    q = model.encode(["who wept?"], instruction="Find the verse")             # instruction seen, not pooled
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from zoo.config import ModelConfig
from zoo.errors import CheckpointError
from zoo.layers.latent_pooling import LatentAttentionPooling, last_valid, masked_mean, valid_mask
from zoo.layers.norm import RMSNorm
from zoo.models.lm import build_blocks, no_weight_decay_names
from zoo.registry import MLP_ONLY, mixer_class, mixer_section
from zoo.state_dict import state_mismatches

LM_HEAD_KEY = "lm_head.weight"


def bidirectional_config(config: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """``config`` with ``causal=False`` in the section of every mixer that declares ``has_causal_option`` (its
    section then has a ``causal`` field: a section's fields are its mixer's constructor arguments).

    Returns (the changed copy, names of the pattern's mixers that have no such switch). Those stay as they are:
    causal, or bidirectional by construction (BiMamba).
    """
    changed, without_switch = config, []
    for name in dict.fromkeys(config.pattern[:config.depth]):
        if name == MLP_ONLY:
            continue
        section_name = mixer_section(name)
        section = getattr(changed, section_name)
        if mixer_class(name).has_causal_option:
            changed = dataclasses.replace(changed, **{section_name: dataclasses.replace(section, causal=False)})
        else:
            without_switch.append(name)
    return changed, without_switch


def takes_padding_mask(mixer: nn.Module | None) -> bool:
    """Whether a built mixer is non-causal and declares ``takes_mask``: it then must see the padding mask."""
    return mixer is not None and mixer.takes_mask and not mixer.causal


class EmbeddingModel(nn.Module):
    """Backbone (embeddings, pre-norm blocks, final RMSNorm; no LM head) + pooling head -> one vector per text.

    ``forward(input_ids (B, T), attention_mask (B, T) | None, pool_mask (B, T) | None) -> e (B, D)``.

    - ``model.embedding.bidirectional``: mixers that declare ``has_causal_option`` (attention) are built non-causal;
      the others stay as they are and, when causal, are named in one warning at construction.
    - Right padding; ``attention_mask`` (True = real token) reaches only the mixers that are non-causal and declare
      ``takes_mask`` (causal mixers need none: the pads come after every real token).
    - ``pool_mask`` defaults to ``attention_mask``; instructed queries clear the instruction prefix in it, so the
      backbone sees the instruction and the pooling does not.
    - ``model.embedding.pooling``: ``latent`` (``LatentAttentionPooling``), ``mean`` (masked mean) or ``last`` (the
      last valid token); the latter two are L2-normalised when ``normalize`` is set, as the latent head is.
    - Parameter names of the backbone equal ``LanguageModel``'s, so ``load_init_state`` takes an LM export (without
      its head) as NV-Embed starts from a causal LM.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        settings, D = config.embedding, config.dim
        built_config, without_switch = bidirectional_config(config) if settings.bidirectional else (config, [])
        self.embed = nn.Embedding(config.vocab_size, D)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = build_blocks(built_config)
        self.norm = RMSNorm(D, config.norm_eps)
        self.pooling = None
        if settings.pooling == "latent":
            self.pooling = LatentAttentionPooling(D, settings.num_latents, settings.heads, settings.mlp_ratio,
                                                  head_dim=settings.head_dim, latent_dim=settings.latent_dim,
                                                  normalize=settings.normalize)
        self.masked_blocks = tuple(takes_padding_mask(block.mixer) for block in self.blocks)
        still_causal = [name for name, block in zip(config.pattern * config.depth, self.blocks)
                        if name in without_switch and not takes_padding_mask(block.mixer)]
        if still_causal:
            warnings.warn(f"EmbeddingModel: mixers {', '.join(dict.fromkeys(still_causal))} have no bidirectional "
                          f"form and stay causal", stacklevel=2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter, each sub-module once: embeddings N(0, init_std²), then the blocks, the final
        norm and the pooling head by their own ``reset_parameters``."""
        nn.init.normal_(self.embed.weight, std=self.config.init_std)
        for block in self.blocks:
            block.reset_parameters()
        self.norm.reset_parameters()
        if self.pooling is not None:
            self.pooling.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay: embeddings, norms, biases, and those layers mark (the latents)."""
        return no_weight_decay_names(self)

    # ------------------------------------------------------------------------------------------------ forward
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm backbone states (B, T, D) of right-padded ``input_ids`` (B, T)."""
        return self.hidden_states_and_state(input_ids, attention_mask)[0]

    def hidden_states_and_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(final-norm backbone states (B, T, D), the blocks' states) of right-padded ``input_ids`` (B, T)."""
        if input_ids.dim() != 2:
            raise ValueError(f"EmbeddingModel: input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        mask = None if attention_mask is None else valid_mask(attention_mask, *input_ids.shape, input_ids.device)
        h = self.embed_dropout(self.embed(input_ids))                                      # (B, T, D)
        states = []
        for block, wants_mask in zip(self.blocks, self.masked_blocks):
            h, block_state = block(h, None, mask if wants_mask else None)
            states.append(block_state)
        return self.norm(h), tuple(states)

    def pool(self, h: torch.Tensor, pool_mask: torch.Tensor | None) -> torch.Tensor:
        """Embeddings (B, D) of states h (B, T, D) over the positions ``pool_mask`` (B, T) marks."""
        if self.pooling is not None:
            return self.pooling(h, pool_mask)
        valid = valid_mask(pool_mask, h.shape[0], h.shape[1], h.device)
        e = masked_mean(h, valid) if self.config.embedding.pooling == "mean" else last_valid(h, valid)
        return F.normalize(e, dim=-1, eps=1e-12) if self.config.embedding.normalize else e

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pool_mask: torch.Tensor | None = None, *, return_state: bool = False):
        """Embeddings e (B, D); with ``return_state`` (e, the blocks' states), whose ``aux_loss`` training adds."""
        h, state = self.hidden_states_and_state(input_ids, attention_mask)
        e = self.pool(h, attention_mask if pool_mask is None else pool_mask)
        return (e, state) if return_state else e

    @torch.no_grad()
    def encode(self, texts: list[str], instruction: str = "", batch_size: int = 32) -> torch.Tensor:
        """Embeddings (N, D) of ``texts`` with the byte tokenizer and an EOS appended to each (eval mode, no grad).

        A non-empty ``instruction`` (the task) prefixes every text with ``"Instruct: {task}\\nQuery: "``; the prefix
        is seen by the backbone and left out of the pooling, its length counted from the ids actually produced.
        """
        from zoo.data.retrieval import encode_with_prefix, pad_right, query_prefix
        from zoo.data.tokenizer import ByteTokenizer

        if isinstance(texts, str):
            raise TypeError("EmbeddingModel.encode: texts must be a list of strings, got one string; wrap it: [text]")
        if batch_size < 1:
            raise ValueError(f"EmbeddingModel.encode: batch_size must be >= 1, got {batch_size}")
        tokenizer = ByteTokenizer()
        if self.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"EmbeddingModel.encode: the byte tokenizer needs model.vocab_size >= "
                             f"{tokenizer.vocab_size}, the model has {self.config.vocab_size}")
        prefix = query_prefix(instruction)
        device = self.embed.weight.device
        was_training = self.training
        self.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            encoded = [encode_with_prefix(tokenizer, prefix, text) for text in texts[start:start + batch_size]]
            ids, mask, pool_mask = pad_right(encoded, tokenizer.pad_id)
            out.append(self(ids.to(device), mask.to(device), pool_mask.to(device)))
        self.train(was_training)
        if not out:
            return torch.zeros(0, self.config.dim, device=device)
        return torch.cat(out)

    # ------------------------------------------------------------------------------------------------ init_from
    def load_init_state(self, state: dict, source: str) -> None:
        """Initialise from an export's weights: a ``LanguageModel`` (backbone only; its head is dropped and the
        pooling head keeps its init) or an ``EmbeddingModel`` (everything, e.g. stage 2 from stage 1)."""
        own = self.state_dict()
        taken = {k: v for k, v in state.items() if k != LM_HEAD_KEY}
        with_pooling = any(k.startswith("pooling.") for k in taken)
        wanted = [k for k in own if with_pooling or not k.startswith("pooling.")]
        parts = state_mismatches({k: own[k] for k in wanted}, taken, unexpected=[k for k in taken if k not in own])
        if parts:
            raise CheckpointError(f"{source} does not fit the embedding model's backbone (export a LanguageModel "
                                  f"with the same dim, depth, pattern and vocab_size): " + "; ".join(parts))
        self.load_state_dict({**own, **taken}, strict=True)
