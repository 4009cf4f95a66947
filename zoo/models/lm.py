"""Decoder language model built from a block pattern: embeddings, pre-norm blocks, final norm, (tied) LM head.

A block is ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; ``model.pattern`` names the mixer of each block
(repeated to ``model.depth``), e.g. ``[mamba2, mamba2, attention, mlp]`` or ``[titans_mac]``.

    from zoo.config import ModelConfig
    from zoo.models import LanguageModel
    model = LanguageModel(ModelConfig(dim=64, depth=2))
    logits, state = model(torch.randint(0, 258, (2, 16)))     # (2, 16, 258)
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.config import ModelConfig
from zoo.layers.mlp import SwiGLU, swiglu_hidden
from zoo.layers.norm import RMSNorm
from zoo.registry import BLOCK_MLPS, MLP_ONLY, block_mlp_class, mixer_class, mixer_section


def build_mixer(name: str, cfg: ModelConfig) -> nn.Module:
    """The mixer ``name`` built as ``cls(dim=cfg.dim, **fields of its section)``: a section's fields are exactly the
    constructor's arguments besides ``dim``; a nested section (a Titans hybrid's ``memory``) arrives as a dict."""
    return mixer_class(name)(dim=cfg.dim, **dataclasses.asdict(getattr(cfg, mixer_section(name))))


def build_block_mlp(name: str, cfg: ModelConfig, hidden: int) -> nn.Module | None:
    """The channel mixer of a block of kind ``name``: the family's own (MemoryFFN, from the fields of its mixer's
    section that ``BLOCK_MLPS`` names), SwiGLU, or None."""
    own = block_mlp_class(name)
    if own is not None:
        section = getattr(cfg, mixer_section(name))
        return own(dim=cfg.dim, **{field: getattr(section, field) for field in BLOCK_MLPS[name][1]})
    if name == MLP_ONLY or cfg.mlp == "swiglu":
        return SwiGLU(cfg.dim, hidden, cfg.init_std)
    return None


def no_weight_decay_names(model: nn.Module, norm_types: tuple = (nn.Embedding, RMSNorm, nn.LayerNorm)) -> set[str]:
    """Parameters that get no weight decay: those of embeddings and norms, vectors (biases, gains), and the names a
    module lists in its ``_no_weight_decay`` (e.g. HMT's memory tokens, the pooling latents)."""
    names = set()
    for module_name, module in model.named_modules():
        marked = set(getattr(module, "_no_weight_decay", ()))
        for param_name, param in module.named_parameters(recurse=False):
            if isinstance(module, norm_types) or param.dim() < 2 or param_name in marked:
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; the unit of FSDP wrapping.

    Either part may be absent (an MLP-only block, or a mixer without MLP).
    ``forward(x (B, T, D), state=None, mask=None) -> (x (B, T, D), state)``.
    """

    def __init__(self, dim: int, mixer: nn.Module | None, mlp: nn.Module | None, eps: float, dropout: float):
        super().__init__()
        self.mixer_norm = RMSNorm(dim, eps) if mixer is not None else None
        self.mixer = mixer
        self.mlp_norm = RMSNorm(dim, eps) if mlp is not None else None
        self.mlp = mlp
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        """Initialise the norms, the mixer and the channel mixer, each once."""
        for part in (self.mixer_norm, self.mixer, self.mlp_norm, self.mlp):
            if part is not None:
                part.reset_parameters()

    def forward(self, x: torch.Tensor, state=None, mask: torch.Tensor | None = None):
        if self.mixer is not None:
            if mask is None:
                mixed, state = self.mixer(self.mixer_norm(x), state)
            elif self.mixer.takes_mask:
                mixed, state = self.mixer(self.mixer_norm(x), state, mask=mask)
            else:
                raise ValueError(f"Block: {type(self.mixer).__name__} takes no mask (it declares takes_mask = False); "
                                 f"call it with mask=None")
            x = x + self.dropout(mixed)                                   # (B, T, D)
        if self.mlp is not None:
            x = x + self.dropout(self.mlp(self.mlp_norm(x)))              # (B, T, D)
        return x, state


def build_blocks(config: ModelConfig) -> nn.ModuleList:
    """The ``config.depth`` pre-norm blocks of ``config.pattern`` (repeated), each with its mixer and channel mixer."""
    hidden = config.mlp_hidden or swiglu_hidden(config.dim, config.mlp_expansion)
    blocks = []
    for i in range(config.depth):
        name = config.pattern[i % len(config.pattern)]
        mixer = None if name == MLP_ONLY else build_mixer(name, config)
        mlp = build_block_mlp(name, config, hidden)
        blocks.append(Block(config.dim, mixer, mlp, config.norm_eps, config.dropout))
    return nn.ModuleList(blocks)


class LanguageModel(nn.Module):
    """Decoder LM: ``forward(input_ids (B, T), state=None) -> (logits (B, T, V), state)``.

    ``state`` is a tuple with one entry per block (None for blocks without a mixer); passing it back continues the
    sequence, so ``generate`` keeps constant memory per token for recurrent mixers. Hooks for wrappers (HMT):
    ``embed`` (the ``nn.Embedding``), ``forward_embeds(h, state) -> (final-norm hidden, state)``, ``head(h)``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D = config.dim
        self.embed = nn.Embedding(config.vocab_size, D)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = build_blocks(config)
        self.norm = RMSNorm(D, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(D, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter, each sub-module once: embeddings and head N(0, init_std²), then each block and
        the final norm by their own ``reset_parameters`` (``zoo.models.build_model`` runs this after a meta build)."""
        nn.init.normal_(self.embed.weight, std=self.config.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=self.config.init_std)
        for block in self.blocks:
            block.reset_parameters()
        self.norm.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Names of parameters excluded from weight decay: embeddings, norms, biases, and those layers mark."""
        return no_weight_decay_names(self)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) from final-norm hidden states (B, T, D)."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight.to(h.dtype))

    def forward_embeds(self, h: torch.Tensor, state=None, mask: torch.Tensor | None = None):
        """Run the blocks on embeddings h (B, T, D); returns (final-norm hidden (B, T, D), state)."""
        states = state if state is not None else (None,) * len(self.blocks)
        if len(states) != len(self.blocks):
            raise ValueError(f"LanguageModel: state has {len(states)} entries, the model has {len(self.blocks)} blocks")
        h = self.embed_dropout(h)
        new_states = []
        for block, block_state in zip(self.blocks, states):
            h, block_state = block(h, block_state, mask)
            new_states.append(block_state)
        return self.norm(h), tuple(new_states)

    def forward(self, input_ids: torch.Tensor, state=None, mask: torch.Tensor | None = None):
        if input_ids.dim() != 2:
            raise ValueError(f"LanguageModel: input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        h, state = self.forward_embeds(self.embed(input_ids), state, mask)
        return self.head(h), state

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 eos_id: int | None = None) -> torch.Tensor:
        """Continue ``input_ids`` (B, T) by ``max_new_tokens``; greedy when ``temperature == 0``.

        The prompt is run once, then one token per step with the carried state (KV cache or recurrent state).
        Returns (B, T + new) token ids; stops early when every row has produced ``eos_id``.
        """
        return generate_with_state(self, input_ids, max_new_tokens, temperature, top_k, generator, eos_id)


def generate_with_state(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                        top_k: int | None = None, generator: torch.Generator | None = None,
                        eos_id: int | None = None) -> torch.Tensor:
    """The decoding loop of any ``model(ids, state) -> (logits, state)``: prompt once, then one token per call."""
    if input_ids.shape[1] < 1:
        raise ValueError("generate: the prompt must hold at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"generate: temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k must be an integer >= 1 or None, got {top_k!r}")
    logits, state = model(input_ids)
    out = [input_ids]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        next_id = sample_next(logits[:, -1], temperature, top_k, generator)   # (B, 1)
        out.append(next_id)
        if eos_id is not None:
            finished |= next_id.squeeze(1) == eos_id
            if bool(finished.all()):
                break
        logits, state = model(next_id, state)
    return torch.cat(out, dim=1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits (B, V): argmax at temperature 0, else softmax sampling (optionally top-k)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
