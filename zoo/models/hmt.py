"""HMT: Hierarchical Memory Transformer, a segment-recurrent wrapper around any zoo decoder LM (docs/hmt.md).

Paper: He et al., "HMT: Hierarchical Memory Transformer for Efficient Long Context Language Processing",
arXiv 2405.06067 (v3, NAACL 2025).

The input is cut into segments of L text tokens. Segment n is decoded by the unchanged backbone as
``[P_n; E(sensory); E(x_n); P_n]``: the memory embedding P_n before and after the text, and the previous segment's last
k token ids re-embedded in between (sensory memory). P_n is recalled from a FIFO cache of the last N memory
embeddings by one-query cross-attention; the query S_n is the backbone's output at a trailing summary prompt T after
j summary tokens. The output at the trailing P_n is the segment's memory M_n, pushed into the cache. The backbone's
own state never crosses a segment boundary: only these memories carry information across segments.

    import torch
    from zoo.config import ModelConfig
    from zoo.models.hmt import HMT
    from zoo.models import LanguageModel
    backbone = LanguageModel(ModelConfig(dim=64, depth=2))
    hmt = HMT(backbone, segment_len=16, sensory_len=4, cache_size=4)
    logits, state = hmt(torch.randint(0, 258, (2, 40)))      # (2, 40, 258); state.n_done == 2, state.offset == 8
    more, state = hmt(torch.randint(0, 258, (2, 5)), state)  # continues the same stream
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from zoo.layers.base import Mixer, combine_aux_losses, left_padding_starts, row_groups

__all__ = ["HMT", "HMTState"]

SUMMARY_SOURCES = ("previous", "current")


def _detach_tree(value):
    """``value`` with every tensor detached; tuples (NamedTuple states included), lists and None pass through."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        items = [_detach_tree(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_detach_tree(v) for v in value]
    return value


def _collect_aux_losses(terms: list, backbone_state) -> None:
    """Append the ``aux_loss`` of each block state of one backbone call to ``terms``."""
    terms.extend(s.aux_loss for s in backbone_state if getattr(s, "aux_loss", None) is not None)


@dataclass
class HMTState:
    """Streaming state of :class:`HMT`, batch-first; all rows share the segment bookkeeping.

    cache: (B, N, D) ring buffer of memory embeddings; memory number n (0-based) lives in slot n mod N, and the
        first min(n_done, N) slots are valid.
    prev_ids: Long (B, L), ids of the last completed segment (sensory tail; summary source in "previous" mode).
    cur_ids: Long (B, L), ids of the open segment; the first ``offset`` entries are valid.
    mem: (B, D), P_n of the open segment (valid when offset > 0).
    backbone_state: the backbone's state after [P_n; sensory; cur_ids[:offset]] ("previous" mode), else None.
    n_done: completed segments so far. offset: tokens already in the open segment, 0 <= offset < L.
    aux_loss: the ``aux_loss`` fields of the backbone's block states over the backbone calls of the last forward as
        one loss (``combine_aux_losses``: MoM's load balance; training adds it to the loss), or None when no block
        returns one.
    """

    cache: torch.Tensor
    prev_ids: torch.Tensor
    cur_ids: torch.Tensor
    mem: torch.Tensor
    backbone_state: Any = None
    n_done: int = 0
    offset: int = 0
    aux_loss: torch.Tensor | None = None

    def detach(self) -> "HMTState":
        """A copy with every tensor detached: truncated BPTT across consecutive windows of one document."""
        return HMTState(self.cache.detach(), self.prev_ids.detach(), self.cur_ids.detach(), self.mem.detach(),
                        _detach_tree(self.backbone_state), self.n_done, self.offset)


@dataclass
class HMTRowGroups:
    """State of a left-padded HMT batch: rows grouped by their first real token (HMT's segments start there), each
    group with its own ``HMTState``; ``forward`` continues every group and puts the rows back in batch order."""

    rows: tuple[tuple[int, ...], ...]
    states: tuple[HMTState, ...]
    batch: int


def _noncausal_mixers(backbone: nn.Module) -> list[str]:
    """Names of the mixers that declare ``causal = False`` and so see the future (bidirectional attention, BiMamba)."""
    return [name for name, module in backbone.named_modules() if isinstance(module, Mixer) and not module.causal]


class HMT(nn.Module):
    """Hierarchical Memory Transformer around a decoder LM: ``forward(input_ids (B, T), state=None)``.

    Returns ``(logits (B, T, V), HMTState)``; ``logits[:, t]`` predicts ``input_ids[:, t+1]``.

    Args (docs/hmt.md#api): ``segment_len`` L text tokens per segment; ``sensory_len`` k tokens of the previous
    segment re-read (0 disables); ``cache_size`` N memories in the FIFO cache; ``summary_fraction`` gives the
    j = max(1, floor(fraction * L)) summary tokens; ``recall_dim`` d_h of the recall query/key projections (None = D);
    ``summary_source`` "current" (the default, the paper's eq. 1 and the reference: the recall query reads the first j
    tokens of segment n, a small look-ahead) or "previous" (the last j tokens of segment n-1: strictly causal, streams
    at any split); ``recall=False`` is
    training stage 1 (P_n = M_{n-1}, no cache recall); ``checkpoint_segments`` recomputes each main pass in backward.

    Per segment n with ids x_n (B, L): (1) S_n = F([T; E(src); T])[:, -1]; (2) P_n = m0 (n = 0), M_{n-1}
    (recall=False), else softmax(S_n Wq (C Wk)^T / sqrt(d_h)) C over the valid cache C; (3) H = F([P_n; E(x_{n-1}
    [:, L-k:]); E(x_n); P_n]), logits_n = head(H[:, 1+k':1+k'+L]), M_n = H[:, -1]; (4) cache[n mod N] = M_n.
    The backbone must provide ``embed``, ``forward_embeds`` and ``head`` (``zoo.models.LanguageModel`` does) and be
    causal. It sees L+k+2 positions per main pass; no zoo mixer has a maximum length (sliding windows and Titans
    MAC segments work at any pass length), so causality is the only property checked.
    """

    def __init__(self, backbone: nn.Module, segment_len: int, sensory_len: int = 32, cache_size: int = 300,
                 summary_fraction: float = 0.5, *, recall_dim: int | None = None, summary_source: str = "current",
                 recall: bool = True, checkpoint_segments: bool = False):
        super().__init__()
        self._check_options(segment_len, sensory_len, cache_size, summary_fraction, recall_dim, summary_source)
        self._check_backbone(backbone)
        self.backbone = backbone
        weight = backbone.embed.weight
        D = weight.shape[1]
        self.dim = D
        self.segment_len, self.sensory_len, self.cache_size = segment_len, sensory_len, cache_size
        self.summary_len = max(1, math.floor(summary_fraction * segment_len))
        self.recall_dim = recall_dim or D
        self.summary_source, self.recall, self.checkpoint_segments = summary_source, recall, checkpoint_segments
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.m0 = nn.Parameter(torch.empty(D, **factory))
        self.summary_prompt = nn.Parameter(torch.empty(D, **factory))
        self.w_q = nn.Linear(D, self.recall_dim, bias=False, **factory)
        self.w_k = nn.Linear(D, self.recall_dim, bias=False, **factory)
        self.reset_memory_parameters()  # the given backbone keeps its weights
        if not recall:  # stage 1: never used, so they must not wait for a gradient (DDP unused-parameter error)
            for param in (self.summary_prompt, self.w_q.weight, self.w_k.weight):
                param.requires_grad_(False)

    @staticmethod
    def _check_options(segment_len, sensory_len, cache_size, summary_fraction, recall_dim, summary_source) -> None:
        if not isinstance(segment_len, int) or segment_len < 1:
            raise ValueError(f"HMT: segment_len must be an integer >= 1, got {segment_len!r}")
        if not isinstance(sensory_len, int) or not 0 <= sensory_len <= segment_len:
            raise ValueError(f"HMT: sensory_len must be an integer in [0, segment_len={segment_len}], got "
                             f"{sensory_len!r}; set it to at most segment_len (0 disables sensory memory)")
        if not 0 < summary_fraction <= 1:
            raise ValueError(f"HMT: summary_fraction must be in (0, 1], got {summary_fraction!r}; 0.5 is the paper's")
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"HMT: cache_size must be an integer >= 1, got {cache_size!r}; the paper uses 300")
        if recall_dim is not None and (not isinstance(recall_dim, int) or recall_dim < 1):
            raise ValueError(f"HMT: recall_dim must be an integer >= 1 or None (= model dim), got {recall_dim!r}")
        if summary_source not in SUMMARY_SOURCES:
            raise ValueError(f"HMT: summary_source must be 'previous' or 'current', got {summary_source!r}")

    @staticmethod
    def _check_backbone(backbone: nn.Module) -> None:
        missing = [hook for hook in ("embed", "forward_embeds", "head") if not hasattr(backbone, hook)]
        if missing:
            raise ValueError(f"HMT: the backbone {type(backbone).__name__} lacks {', '.join(missing)}; wrap a "
                             f"zoo.models.LanguageModel")
        noncausal = _noncausal_mixers(backbone)
        if noncausal:
            raise ValueError(f"HMT: the backbone must be causal, but {noncausal[0]} sees the future; use causal "
                             f"mixers (attention.causal=true, mamba instead of bimamba)")

    @classmethod
    def from_config(cls, model_config) -> "HMT":
        """HMT over ``LanguageModel(model_config)`` with the options of ``model_config.hmt`` (``model.hmt``).

        ``freeze_backbone`` and ``loss_last_segments`` are training options, read by ``zoo.train.hmt.HMTTask``.
        """
        from zoo.models.lm import LanguageModel

        options = model_config.hmt
        return cls(LanguageModel(model_config), options.segment_len, options.sensory_len, options.cache_size,
                   options.summary_fraction, recall_dim=options.recall_dim, summary_source=options.summary_source,
                   recall=options.recall, checkpoint_segments=options.checkpoint_segments)

    def reset_parameters(self) -> None:
        """Initialise every parameter once, the backbone's first (after a meta build + ``to_empty``, under a seed).

        This re-initialises a trained backbone too; ``reset_memory_parameters`` re-draws only HMT's own.
        """
        self.backbone.reset_parameters()
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """m0 and T ~ randn(D) * std(backbone embedding); Wq, Wk get PyTorch's default init (docs/hmt.md#parameters)."""
        with torch.no_grad():
            scale = self.backbone.embed.weight.float().std().to(self.m0.dtype)
            self.m0.normal_().mul_(scale)
            self.summary_prompt.normal_().mul_(scale)
        self.w_q.reset_parameters()
        self.w_k.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """The backbone's no-decay names (prefixed ``backbone.``) plus m0 and the summary prompt T."""
        names = {f"backbone.{name}" for name in self.backbone.no_weight_decay()}
        return names | {"m0", "summary_prompt"}

    # -------------------------------------------------------------------------------------------------- state
    def initial_state(self, input_ids: torch.Tensor) -> HMTState:
        """The empty state of a fresh stream for a batch like ``input_ids``: zero cache, no segment yet."""
        B, L, device = input_ids.shape[0], self.segment_len, input_ids.device
        ids = torch.zeros(B, L, dtype=torch.long, device=device)                 # (B, L)
        cache = torch.zeros(B, self.cache_size, self.dim, dtype=self.m0.dtype, device=device)  # (B, N, D)
        return HMTState(cache, ids, ids, cache[:, 0], None, 0, 0)

    # -------------------------------------------------------------------------------------------------- recall
    def recall_memory(self, summary: torch.Tensor, cache: torch.Tensor, valid: int):
        """P = softmax(q K^T / sqrt(d_h)) C over the first ``valid`` cache slots; invalid slots get weight 0.

        summary S_n (B, D), cache C (B, N, D), 1 <= valid <= N. Returns (P (B, D), weights (B, N)); the scores and
        the softmax are computed in at least fp32. No position term: the slot order does not matter.
        """
        compute = torch.promote_types(cache.dtype, torch.float32)
        query = self.w_q(summary).to(compute)                                      # (B, d_h)
        keys = self.w_k(cache).to(compute)                                         # (B, N, d_h)
        scores = torch.einsum("bd,bnd->bn", query, keys) / math.sqrt(self.recall_dim)  # (B, N)
        invalid = torch.arange(cache.shape[1], device=cache.device) >= valid      # (N,)
        weights = scores.masked_fill(invalid, float("-inf")).softmax(dim=-1)       # (B, N)
        memory = torch.einsum("bn,bnd->bd", weights.to(cache.dtype), cache)        # (B, D)
        return memory, weights

    def memory_for_segment(self, n: int, summary: torch.Tensor | None, cache: torch.Tensor) -> torch.Tensor:
        """P_n (B, D): m0 for n = 0, M_{n-1} without recall (or with one cached memory), else recalled."""
        if n == 0:
            return self.m0.to(cache.dtype).expand(cache.shape[0], -1)                # (B, D)
        if not self.recall:
            return cache[:, (n - 1) % self.cache_size]                              # (B, D)
        if n == 1:
            return cache[:, 0]                                                      # softmax over one entry is 1
        memory, _ = self.recall_memory(summary, cache, min(n, self.cache_size))
        return memory

    def _write_cache(self, cache: torch.Tensor, n: int, memory: torch.Tensor) -> torch.Tensor:
        """``cache`` with slot n mod N replaced by ``memory`` (B, D), out of place (autograd keeps the old one)."""
        slot = n % self.cache_size
        return torch.cat([cache[:, :slot], memory[:, None], cache[:, slot + 1:]], dim=1)  # (B, N, D)

    def _summaries(self, sources: list[torch.Tensor | None], aux: list) -> list[torch.Tensor | None]:
        """S for each summary-token embedding (B, j', D) in ``sources`` (None = not needed).

        Sources of equal length share one backbone call of batch B * count: S = F([T; E(src); T])[:, -1].
        """
        out: list[torch.Tensor | None] = [None] * len(sources)
        for length in sorted({s.shape[1] for s in sources if s is not None}):
            members = [i for i, s in enumerate(sources) if s is not None and s.shape[1] == length]
            stacked = torch.cat([sources[i] for i in members], dim=0)              # (B * count, j', D)
            prompt = self.summary_prompt.to(stacked.dtype).expand(stacked.shape[0], 1, -1)  # (B * count, 1, D)
            hidden, backbone_state = self.backbone.forward_embeds(torch.cat([prompt, stacked, prompt], dim=1))
            _collect_aux_losses(aux, backbone_state)                                # hidden (B*count, j'+2, D)
            for i, summary in zip(members, hidden[:, -1].chunk(len(members), dim=0)):
                out[i] = summary                                                    # (B, D)
        return out

    # -------------------------------------------------------------------------------------------------- passes
    def _main_pass(self, embeds: torch.Tensor):
        """F(embeds) from a fresh backbone state -> (hidden, backbone state); optionally checkpointed."""
        if self.checkpoint_segments and torch.is_grad_enabled():
            return checkpoint(self.backbone.forward_embeds, embeds, use_reentrant=False)
        return self.backbone.forward_embeds(embeds)

    def _decode_segment(self, ids: torch.Tensor, embeds: torch.Tensor, sensory: torch.Tensor | None,
                        memory: torch.Tensor, state: HMTState, aux: list):
        """Decode one segment from its start: ids (B, l) with embeddings (B, l, D), l <= L; memory P_n (B, D).

        A full segment (l = L) also runs the trailing P_n, writes M_n into the cache and closes; a partial one stays
        open. Returns (logits (B, l, V), new state).
        """
        B, length = ids.shape
        L = self.segment_len
        closes = length == L
        lead = [memory[:, None]] + ([] if sensory is None else [sensory])
        first = 1 + (0 if sensory is None else sensory.shape[1])                   # index of the first text position
        tail = [memory[:, None]] if closes else []
        hidden, backbone_state = self._main_pass(torch.cat(lead + [embeds] + tail, dim=1))  # (B, first+l(+1), D)
        _collect_aux_losses(aux, backbone_state)
        logits = self.backbone.head(hidden[:, first:first + length])               # (B, l, V)
        if closes:
            cache = self._write_cache(state.cache, state.n_done, hidden[:, -1])      # M_n = output at trailing P_n
            return logits, HMTState(cache, ids, ids, memory, None, state.n_done + 1, 0)
        cur_ids = torch.cat([ids, ids.new_zeros(B, L - length)], dim=1)            # (B, L)
        keep = backbone_state if self.summary_source == "previous" else None
        return logits, HMTState(state.cache, state.prev_ids, cur_ids, memory, keep, state.n_done, length)

    def _continue_segment(self, ids: torch.Tensor, state: HMTState, aux: list):
        """Strict mode: feed ids (B, r), r <= L - offset, to the open segment through the backbone state.

        When the segment fills up, the trailing P_n is one more backbone step; its output M_n goes into the cache.
        """
        hidden, backbone_state = self.backbone.forward_embeds(self.backbone.embed(ids), state.backbone_state)
        _collect_aux_losses(aux, backbone_state)
        logits = self.backbone.head(hidden)                                        # (B, r, V)
        offset = state.offset + ids.shape[1]
        cur_ids = torch.cat([state.cur_ids[:, :state.offset], ids, state.cur_ids[:, offset:]], dim=1)  # (B, L)
        if offset < self.segment_len:
            return logits, HMTState(state.cache, state.prev_ids, cur_ids, state.mem, backbone_state, state.n_done,
                                    offset)
        trailing, backbone_state = self.backbone.forward_embeds(state.mem[:, None], backbone_state)  # (B, 1, D)
        _collect_aux_losses(aux, backbone_state)
        cache = self._write_cache(state.cache, state.n_done, trailing[:, -1])
        return logits, HMTState(cache, cur_ids, cur_ids, state.mem, None, state.n_done + 1, 0)

    def _summary_sources(self, embeds: torch.Tensor, starts: list[int], state: HMTState,
                         previous: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Summary-token embeddings (B, j', D) per new segment starting at ``starts``; None where no recall runs.

        embeds (B, T, D) of this call's ids; previous (B, L, D) = E(prev_ids), the segment before ``starts[0]``.
        """
        j, T = self.summary_len, embeds.shape[1]
        sources = []
        for i, start in enumerate(starts):
            n = state.n_done + i
            if not self.recall or n <= 1:
                sources.append(None)
            elif self.summary_source == "current":
                sources.append(embeds[:, start:min(start + j, T)])
            elif i == 0:
                sources.append(previous[:, self.segment_len - j:])
            else:
                sources.append(embeds[:, start - j:start])
        return sources

    def _new_segments(self, input_ids: torch.Tensor, state: HMTState, aux: list):
        """Decode input_ids (B, T) from a segment boundary (state.offset == 0): full segments, then a partial one."""
        L, k, T = self.segment_len, self.sensory_len, input_ids.shape[1]
        embeds = self.backbone.embed(input_ids)                                    # (B, T, D)
        previous = self.backbone.embed(state.prev_ids) if state.n_done else None  # (B, L, D) E(x_{n-1})
        starts = list(range(0, T, L))
        summaries = self._summaries(self._summary_sources(embeds, starts, state, previous), aux)
        pieces = []
        for start, summary in zip(starts, summaries):
            stop = min(start + L, T)
            memory = self.memory_for_segment(state.n_done, summary, state.cache)   # P_n (B, D)
            if state.n_done == 0 or k == 0:
                sensory = None
            elif start == 0:
                sensory = previous[:, L - k:]                                      # (B, k, D)
            else:
                sensory = embeds[:, start - k:start]
            logits, state = self._decode_segment(input_ids[:, start:stop], embeds[:, start:stop], sensory, memory,
                                                 state, aux)
            pieces.append(logits)
        return torch.cat(pieces, dim=1), state

    # -------------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, state: HMTState | None = None, *,
                attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None):
        if cu_seqlens is not None:
            raise ValueError("HMT: cu_seqlens is not supported (a row's memory segments start at its first token); run "
                             "documents in separate calls")
        if attention_mask is not None or isinstance(state, HMTRowGroups):
            return self._forward_groups(input_ids, state, attention_mask)
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"HMT: input_ids must be (B, T) with T >= 1, got shape {tuple(input_ids.shape)}")
        if state is None:
            state = self.initial_state(input_ids)
        elif state.cache.shape[0] != input_ids.shape[0]:
            raise ValueError(f"HMT: the state holds {state.cache.shape[0]} rows, input_ids {input_ids.shape[0]}; "
                             f"pass the state of this batch (or state=None for a new stream)")
        aux: list[torch.Tensor] = []
        if state.offset and self.summary_source == "current":
            logits, state = self._reopen_segment(input_ids, state, aux)
        else:
            logits, state = self._decode(input_ids, state, aux)
        return logits, replace(state, aux_loss=combine_aux_losses(aux))

    def _forward_groups(self, input_ids: torch.Tensor, state: HMTRowGroups | None, attention_mask):
        """A left-padded batch (``attention_mask``, bool or 0/1, 1 = real token) or the continuation of one: each group
        of rows with the same first real token runs alone on its real tokens; pads get logits 0."""
        if state is None:
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 1
            starts = left_padding_starts("HMT", mask, input_ids)
            if max(starts) == input_ids.shape[1]:
                raise ValueError("HMT: a row of attention_mask holds no real token; give every prompt a token")
            groups = [(tuple(rows), start, None) for start, rows in row_groups(starts).items()]
        else:
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError("HMT: after a padded prompt, continue with unpadded tokens (attention_mask all 1)")
            groups = [(rows, 0, group_state) for rows, group_state in zip(state.rows, state.states)]
        B, T = input_ids.shape
        logits, states, aux = None, [], []
        for rows, start, group_state in groups:
            part, part_state = self.forward(input_ids[list(rows), start:], group_state)   # (b, T − start, V)
            if logits is None:
                logits = part.new_zeros(B, T, part.shape[-1])                              # (B, T, V)
            logits[list(rows), start:] = part
            states.append(replace(part_state, aux_loss=None))
            if part_state.aux_loss is not None:
                aux.append(part_state.aux_loss)
        return logits, HMTRowGroups(tuple(rows for rows, _, _ in groups), tuple(states), B)

    def _decode(self, input_ids: torch.Tensor, state: HMTState, aux: list):
        """Strict-mode continuation of an open segment, then new segments: (logits (B, T, V), new state)."""
        pieces = []
        if state.offset:
            take = min(input_ids.shape[1], self.segment_len - state.offset)
            logits, state = self._continue_segment(input_ids[:, :take], state, aux)
            pieces.append(logits)
            input_ids = input_ids[:, take:]
        if input_ids.shape[1]:
            logits, state = self._new_segments(input_ids, state, aux)
            pieces.append(logits)
        return (torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]), state

    def _reopen_segment(self, input_ids: torch.Tensor, state: HMTState, aux: list):
        """Paper mode mid-segment: recompute the open segment from cur_ids plus the new tokens; new logits only."""
        offset = state.offset
        ids = torch.cat([state.cur_ids[:, :offset], input_ids], dim=1)            # (B, offset + T)
        reopened = HMTState(state.cache, state.prev_ids, state.cur_ids, state.mem, None, state.n_done, 0)
        logits, state = self._new_segments(ids, reopened, aux)
        return logits[:, offset:], state

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """Continue ``input_ids`` (B, T) by ``max_new_tokens``, with the options of ``LanguageModel.generate``
        (``attention_mask``: left-padded prompts, each row continued as if run alone).

        The prompt runs through ``forward``, then one token per call with the carried ``HMTState``: one backbone step
        per token, plus a trailing step and a summary pass at each segment boundary. Returns (B, T + new) ids.
        """
        from zoo.models.lm import generate_with_state

        return generate_with_state(self, input_ids, max_new_tokens, **options)
