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
from zoo.layers.base import document_bounds, left_padding_starts
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
    ``forward(x (B, T, D), state=None, mask=None, cu_seqlens=None) -> (x (B, T, D), state)``; mask and cu_seqlens
    reach the mixer (which must declare ``takes_mask`` / ``takes_cu_seqlens``).
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

    def forward(self, x: torch.Tensor, state=None, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        if self.mixer is not None:
            options = {}
            for key, value, declared in (("mask", mask, "takes_mask"), ("cu_seqlens", cu_seqlens, "takes_cu_seqlens")):
                if value is None:
                    continue
                if not getattr(self.mixer, declared):
                    raise ValueError(f"Block: {type(self.mixer).__name__} takes no {key} (it declares {declared} = "
                                     f"False); call it with {key}=None")
                options[key] = value
            mixed, state = self.mixer(self.mixer_norm(x), state, **options)
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
    """Decoder LM: ``forward(input_ids (B, T), state=None, *, attention_mask=None, cu_seqlens=None) -> (logits
    (B, T, V), state)``.

    ``state`` is a tuple with one entry per block (None for blocks without a mixer); passing it back continues the
    sequence, so ``generate`` keeps constant memory per token for recurrent mixers.
    ``attention_mask`` (B, T) (bool or 0/1, True = real token) takes left-padded rows: each row's real tokens give the
    logits and state of that row run alone (logits at pads are meaningless). ``cu_seqlens`` (int64 (N + 1,), B == 1)
    packs N documents along time, each run alone; the state then has one row per document
    (docs/training.md#packed-documents). Hooks for wrappers (HMT): ``embed`` (the ``nn.Embedding``),
    ``forward_embeds(h, state) -> (final-norm hidden, state)``, ``head(h)``.
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

    def forward_embeds(self, h: torch.Tensor, state=None, mask: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None):
        """Run the blocks on embeddings h (B, T, D); returns (final-norm hidden (B, T, D), state)."""
        states = state if state is not None else (None,) * len(self.blocks)
        if len(states) != len(self.blocks):
            raise ValueError(f"LanguageModel: state has {len(states)} entries, the model has {len(self.blocks)} blocks")
        h = self.embed_dropout(h)
        new_states = []
        for block, block_state in zip(self.blocks, states):
            h, block_state = block(h, block_state, mask, cu_seqlens)
            new_states.append(block_state)
        return self.norm(h), tuple(new_states)

    def forward(self, input_ids: torch.Tensor, state=None, *, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        if input_ids.dim() != 2:
            raise ValueError(f"LanguageModel: input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        mask = padding_mask("LanguageModel", attention_mask, input_ids)
        if mask is not None:
            left_padding_starts("LanguageModel: attention_mask", mask, input_ids)   # one error, before any block
        if cu_seqlens is not None:
            document_bounds("LanguageModel", cu_seqlens, input_ids)
        h, state = self.forward_embeds(self.embed(input_ids), state, mask, cu_seqlens)
        return self.head(h), state

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, eos_id: int | None = None, stop=None, streamer=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue ``input_ids`` (B, T) by ``max_new_tokens``; greedy when ``temperature == 0``.

        The prompt is run once, then one token per step with the carried state (KV cache or recurrent state).
        ``attention_mask`` (B, T) takes prompts of different lengths, left-padded. Returns (B, T + new) token ids; see
        ``generate_with_state`` for the options.
        """
        return generate_with_state(self, input_ids, max_new_tokens, attention_mask=attention_mask,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, eos_id=eos_id, stop=stop,
                                   streamer=streamer, generator=generator)


def padding_mask(name: str, attention_mask, input_ids: torch.Tensor) -> torch.Tensor | None:
    """``attention_mask`` (B, T) bool or 0/1 as a bool mask, None when absent or without a pad (the fast path)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"{name}: attention_mask must be a (B, T) = {tuple(input_ids.shape)} tensor of 0/1 or bool "
                         f"like input_ids, got {got}")
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(f"{name}: attention_mask must hold 0/1 or bool (1 = real token), got "
                             f"{attention_mask.dtype} values")
        attention_mask = attention_mask == 1
    return None if bool(attention_mask.all()) else attention_mask


def check_generate_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id, stop, streamer):
    """One-line ValueErrors for the options of ``generate``; returns ``stop`` as a list of token-id lists."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"generate: temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must be a number in (0, 1] or None, got {top_p!r}")
    if not isinstance(repetition_penalty, (int, float)) or not math.isfinite(repetition_penalty) \
            or repetition_penalty <= 0:
        raise ValueError(f"generate: repetition_penalty must be a finite number > 0 (1 = off), got "
                         f"{repetition_penalty!r}")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or eos_id < 0):
        raise ValueError(f"generate: eos_id must be a token id (an integer >= 0) or None, got {eos_id!r}")
    sequences = [] if stop is None else list(stop)
    for sequence in sequences:
        if not isinstance(sequence, (list, tuple)) or not sequence or \
                not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in sequence):
            raise ValueError(f"generate: stop must be a list of token-id sequences (non-empty lists of ints), got "
                             f"{sequence!r} in it; encode stop strings with the tokenizer first")
    if streamer is not None and not (callable(streamer) or hasattr(streamer, "put")):
        raise ValueError(f"generate: streamer must be a callable or an object with put() (and end()), got "
                         f"{type(streamer).__name__}")
    return [list(sequence) for sequence in sequences]


def generate_with_state(model, input_ids: torch.Tensor, max_new_tokens: int, *,
                        attention_mask: torch.Tensor | None = None, temperature: float = 0.0,
                        top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                        eos_id: int | None = None, stop=None, streamer=None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The decoding loop of any ``model(ids, state, attention_mask=) -> (logits, state)``: prompt once, then one
    token per call.

    - ``attention_mask`` (B, T): left-padded prompts (1 = real token); each row continues as if run alone.
    - sampling: argmax at ``temperature == 0``; else softmax of logits / temperature, cut to the ``top_k`` best and to
      the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2019).
    - ``repetition_penalty`` p (CTRL, Keskar et al. 2019): the logit of every token already in the row (prompt or
      generated) is divided by p where positive, multiplied where negative.
    - a row finishes at ``eos_id`` or when its new tokens end with one of the ``stop`` token-id sequences; finished
      rows are filled with ``eos_id`` (kept as generated without one); generation ends when every row has finished.
    - ``streamer``: called with each new token row (B,) (or its ``put``), then ``end()`` if it has one.
    Returns (B, T + new) token ids.
    """
    stop = check_generate_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id, stop,
                                  streamer)
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"generate: input_ids must be (B, T) with T >= 1 (the prompt must hold at least one token), "
                         f"got shape {tuple(input_ids.shape)}")
    mask = padding_mask("generate", attention_mask, input_ids)
    put = None if streamer is None else getattr(streamer, "put", streamer)
    logits, state = model(input_ids) if mask is None else model(input_ids, attention_mask=mask)
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask  # (B, T) tokens to penalise
    seen = torch.zeros(input_ids.shape[0], logits.shape[-1], dtype=torch.bool, device=input_ids.device)
    seen.scatter_(1, input_ids.masked_fill(~real, 0), real)                         # (B, V)
    out = [input_ids]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        scores = logits[:, -1]                                                      # (B, V)
        if repetition_penalty != 1.0:
            penalised = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
            scores = torch.where(seen, penalised, scores)
        next_id = sample_next(scores, temperature, top_k, generator, top_p)         # (B, 1)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished.unsqueeze(1), eos_id)
        out.append(next_id)
        seen.scatter_(1, next_id, True)
        if put is not None:
            put(next_id.squeeze(1))
        if eos_id is not None:
            finished |= next_id.squeeze(1) == eos_id
        if stop:
            finished |= stopped(torch.cat(out[1:], dim=1), stop)
        if (eos_id is not None or stop) and bool(finished.all()):
            break
        if step + 1 < max_new_tokens:
            logits, state = model(next_id, state)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return torch.cat(out, dim=1)


def stopped(new_tokens: torch.Tensor, stop: list[list[int]]) -> torch.Tensor:
    """(B,) bool: the row of new_tokens (B, n) ends with one of the ``stop`` sequences."""
    hit = torch.zeros(new_tokens.shape[0], dtype=torch.bool, device=new_tokens.device)
    for sequence in stop:
        if len(sequence) <= new_tokens.shape[1]:
            tail = torch.tensor(sequence, device=new_tokens.device)
            hit |= (new_tokens[:, -len(sequence):] == tail).all(dim=1)
    return hit


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None, top_p: float | None = None) -> torch.Tensor:
    """One token per row from logits (B, V): argmax at temperature 0, else softmax sampling (optionally top-k and
    top-p)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)                       # (B, V)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs                                       # mass of the better tokens
        drop = (before >= top_p).scatter(1, order, before >= top_p)                 # back in vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
