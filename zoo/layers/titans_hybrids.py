"""Titans hybrids: memory as context (MAC), as a gate (MAG), as a layer (MAL) (docs/titans.md#hybrids).

Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663 v1 Sec. 4.1–4.3, eqs. 19–31).
Each hybrid combines a :class:`~zoo.layers.titans.TitansMemory` (the long-term memory) with a
:class:`~zoo.layers.attention.Attention` (the short-term memory) that holds N_p learned persistent tokens. All three are
causal mixers with ``forward(x (B, T, D), state=None) -> (y (B, T, D), state)``; streaming over any split and
token-by-token decoding equal one call.

Each takes ``heads`` (its attention's heads) and ``memory``, a dict of :class:`TitansMemory` arguments besides ``dim``
(``model.titans_mac.memory`` etc. arrive as such a dict); ``memory["heads"]`` defaults to the hybrid's ``heads``.

    from zoo.layers.titans_hybrids import TitansMAC
    mixer = TitansMAC(dim=64, heads=2, segment_len=32, persistent_tokens=4)
    y, state = mixer(torch.randn(2, 80, 64))
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from zoo.layers.attention import Attention, AttentionState
from zoo.layers.base import Mixer, cat_rows, left_pad_time, row_groups, select_rows
from zoo.layers.norm import RMSNorm
from zoo.layers.titans import MEMORY_OPTIONS, TitansMemory, TitansState


def _build_memory(owner: str, dim: int, heads: int, memory: dict | None) -> TitansMemory:
    """TitansMemory(dim, **memory) with the keys of ``memory`` checked (ValueError naming a bad one); the memory's
    heads default to the hybrid's."""
    memory = {"heads": heads, **(memory or {})}
    unknown = sorted(set(memory) - set(MEMORY_OPTIONS))
    if unknown:
        raise ValueError(f"{owner}: unknown memory option {unknown[0]!r}; known: {', '.join(MEMORY_OPTIONS)}")
    return TitansMemory(dim, **memory)


def _check_positive(owner: str, name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")


class _Gate(nn.Module):
    """o = RMSNorm_y(y) ⊙ sigmoid(RMSNorm_z(z)) (v1 eq. 25 / Sec. 4.2; sigmoid is zoo's choice of non-linearity)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_y = RMSNorm(dim)
        self.norm_z = RMSNorm(dim)

    def reset_parameters(self) -> None:
        self.norm_y.reset_parameters()
        self.norm_z.reset_parameters()

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.norm_y(y) * torch.sigmoid(self.norm_z(z))


# ---------------------------------------------------------------------------------------------------------------------
# MAC: memory as context
# ---------------------------------------------------------------------------------------------------------------------

class MACState(NamedTuple):
    """State of :class:`TitansMAC`, batch-first.

    memory: TitansState of the memory on the y stream (stores y, v1 eq. 24), None before the first token.
    read_weights: L tensors (B, H, in, out): the memory weights at the start of the current segment (Φ_{s−1}).
    read_conv: (B, conv_size − 1, H·d): conv cache of the read path's q projection on the x stream.
    memory_k, memory_v, token_k, token_v: (B, p, H_a, d_a): attention keys/values of the h and x positions of the
        current partial segment (p read from the shape; emptied when a segment completes).
    filled_rows: (B,) long, each row's own p when the rows of a batch stand at different places of the segment grid
        (left-padded rows, packed documents): the caches then hold each row's p positions at their end, after zeros;
        None when every row has p = token_k.shape[1].
    """

    memory: TitansState | None
    read_weights: tuple
    read_conv: torch.Tensor | None
    memory_k: torch.Tensor
    memory_v: torch.Tensor
    token_k: torch.Tensor
    token_v: torch.Tensor
    filled_rows: torch.Tensor | None = None


class TitansMAC(Mixer):
    """Titans, memory as context (v1 Sec. 4.1, eqs. 21–25; docs/titans.md#mac-memory-as-context).

    ``forward(x (B, T, D), state: MACState | None = None) -> (o (B, T, D), MACState)``.

    x is cut into segments of C = ``segment_len`` tokens (aligned to the sequence start). For segment s with memory
    state Φ_{s−1}:
    1. h_j = read(x_j; Φ_{s−1}): the memory's q path on x, read with the segment-start weights, no update (eq. 21);
    2. y = Attention(queries x_j; keys/values [P ; h_{≤j} ; x_{≤j}]): persistent tokens P always visible, h_j and x_j
       share RoPE position j, causal inside the segment, never across segments (eq. 22);
    3. z_j = M(y_j), the memory run causally on the y stream (store y, read token j after storing y_{≤j}; eq. 24);
    4. o_j = RMSNorm(y_j) ⊙ sigmoid(RMSNorm(z_j)) (eq. 25).
    Both causality traps (docs/titans.md#causality-traps) are avoided: h is masked causally and z_j never sees y_{>j}.
    ``segment_len`` must be a multiple of the memory's ``chunk_size``, so segment ends are chunk boundaries.
    """

    takes_mask, takes_cu_seqlens, State = True, True, MACState

    def __init__(self, dim: int, heads: int = 4, segment_len: int = 512, persistent_tokens: int = 128,
                 memory: dict | None = None):
        super().__init__()
        _check_positive("TitansMAC", "segment_len", segment_len, 1)
        _check_positive("TitansMAC", "persistent_tokens", persistent_tokens, 0)
        self.lmm = _build_memory("TitansMAC", dim, heads, memory)
        if segment_len % self.lmm.chunk_size:
            raise ValueError(f"TitansMAC: segment_len ({segment_len}) must be a multiple of the memory's chunk_size "
                             f"({self.lmm.chunk_size}) so that segment ends are chunk boundaries")
        self.dim, self.heads, self.segment_len = dim, heads, segment_len
        self.attn = Attention(dim, heads, rope=True, persistent_tokens=persistent_tokens)
        self.gate = _Gate(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.lmm.reset_parameters()
        self.attn.reset_parameters()
        self.gate.reset_parameters()

    def _fresh_state(self, x: torch.Tensor) -> MACState:
        B = x.shape[0]
        empty = x.new_zeros(B, 0, self.attn.heads, self.attn.head_dim)
        return MACState(None, self.lmm.initial_weights(B), None, empty, empty, empty, empty)

    def state_shapes(self) -> dict:
        cache = (None, self.attn.heads, self.attn.head_dim)  # (p, H_a, d_a)
        return {"memory": self.lmm, "read_weights": [tuple(w.shape) for w in self.lmm.memory_weights],
                "memory_k": cache, "memory_v": cache, "token_k": cache, "token_v": cache}

    def stack_states(self, states: list[MACState]) -> MACState:
        """The rows of ``states`` in one state; rows at different places of the segment grid keep their own
        position in ``filled_rows``."""
        counts = torch.cat([filled_counts(state) for state in states])                 # (B,)
        width = max(state.token_k.shape[1] for state in states)
        caches = [[left_pad_time(tensor, width) for tensor in state[3:7]] for state in states]
        memories = [state.memory for state in states]
        memory = None if all(m is None for m in memories) else self.lmm.stack_states(memories)
        rest = cat_rows("TitansMAC", [(state.read_weights, state.read_conv) for state in states])
        stacked = MACState(memory, *rest, *(torch.cat(column) for column in zip(*caches)))
        return stacked if bool((counts == width).all()) else stacked._replace(filled_rows=counts)

    def _forward_apart(self, x: torch.Tensor, state: MACState):
        """Rows at different places of the segment grid: each group of rows with one position runs alone."""
        width = state.token_k.shape[1]
        groups = []
        for count, rows in row_groups(state.filled_rows.tolist()).items():
            part = select_rows(state, rows)
            caches = (tensor[:, width - count:] for tensor in part[3:7])
            groups.append((rows, 0, MACState(part.memory, part.read_weights, part.read_conv, *caches)))
        return self.forward_row_groups(x, groups)

    def forward(self, x: torch.Tensor, state: MACState | None = None, *, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        self.check_input(x)
        if mask is not None or cu_seqlens is not None:
            return self.forward_split(x, state, mask, cu_seqlens)
        self.check_state(state, x)
        if state is not None and state.filled_rows is not None:
            return self._forward_apart(x, state)
        B, T, D = x.shape
        state = self._fresh_state(x) if state is None else state
        outputs, start = [], 0
        while start < T:
            filled = state.token_k.shape[1]  # tokens of the current segment already seen
            stop = min(T, start + self.segment_len - filled)
            out, state = self._segment(x[:, start:stop], state)
            outputs.append(out)
            start = stop
        if not outputs:
            return x.new_zeros(B, 0, D), state
        return torch.cat(outputs, dim=1), state

    def _segment(self, x: torch.Tensor, state: MACState):
        """One piece x (B, n, D) of a segment that already holds p = state.token_k.shape[1] tokens."""
        B, n, _ = x.shape
        filled = state.token_k.shape[1]
        h, read_conv = self.lmm.read(x, state.read_weights, state.read_conv)  # (B, n, D)
        positions = (filled + torch.arange(n, device=x.device)).expand(B, n)  # (B, n) positions in the segment
        q, token_k, token_v = self.attn.project(x, positions)  # (B, n, H_a, d_a) each
        _, memory_k, memory_v = self.attn.project(h, positions)
        memory_k = torch.cat([state.memory_k.to(memory_k.dtype), memory_k], dim=1)  # (B, p + n, H_a, d_a)
        memory_v = torch.cat([state.memory_v.to(memory_v.dtype), memory_v], dim=1)
        token_k = torch.cat([state.token_k.to(token_k.dtype), token_k], dim=1)
        token_v = torch.cat([state.token_v.to(token_v.dtype), token_v], dim=1)
        key_positions = torch.arange(filled + n, device=x.device).expand(B, filled + n)  # (B, p + n)
        key_positions = torch.cat([key_positions, key_positions], dim=1)  # (B, 2(p + n)): h and x share positions
        allowed = self.attn.causal_allowed(positions, key_positions)  # (B, n, 2(p + n))
        attended = self.attn.attend(q, torch.cat([memory_k, token_k], dim=1), torch.cat([memory_v, token_v], dim=1),
                                    allowed)  # (B, n, H_a·d_a)
        y = self.attn.w_o(attended)  # (B, n, D)
        z, memory = self.lmm(y, state.memory)  # (B, n, D): store y, read each token after its own update
        out = self.gate(y, z)
        if filled + n == self.segment_len:  # segment complete: its end is a chunk boundary, so memory.weights = Φ_s
            empty = memory_k[:, :0]
            state = MACState(memory, memory.weights, read_conv, empty, empty, empty, empty)
        else:
            state = MACState(memory, state.read_weights, read_conv, memory_k, memory_v, token_k, token_v)
        return out, state


# ---------------------------------------------------------------------------------------------------------------------
# MAG and MAL
# ---------------------------------------------------------------------------------------------------------------------

class MAGState(NamedTuple):
    """State of :class:`TitansMAG`: the sliding-window KV cache and the memory state."""

    attention: AttentionState
    memory: TitansState


class TitansMAG(Mixer):
    """Titans, memory as a gate (v1 Sec. 4.2, eqs. 26–28; docs/titans.md#mag-memory-as-a-gate).

    ``forward(x (B, T, D), state: MAGState | None = None) -> (o (B, T, D), MAGState)``.

    y = SWA(x) (causal sliding window of ``window`` tokens, self included, persistent tokens always visible);
    z = TitansMemory(x); o = RMSNorm(y) ⊙ sigmoid(RMSNorm(z)). No segmenting.
    """

    takes_mask, takes_cu_seqlens, State = True, True, MAGState

    def __init__(self, dim: int, heads: int = 4, window: int = 2048, persistent_tokens: int = 128,
                 memory: dict | None = None):
        super().__init__()
        _check_positive("TitansMAG", "window", window, 1)
        _check_positive("TitansMAG", "persistent_tokens", persistent_tokens, 0)
        self.dim = dim
        self.attn = Attention(dim, heads, window=window, persistent_tokens=persistent_tokens)
        self.lmm = _build_memory("TitansMAG", dim, heads, memory)
        self.gate = _Gate(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.attn.reset_parameters()
        self.lmm.reset_parameters()
        self.gate.reset_parameters()

    def state_shapes(self) -> dict:
        return {"attention": self.attn, "memory": self.lmm}

    def stack_states(self, states: list[MAGState]) -> MAGState:
        return MAGState(self.attn.stack_states([s.attention for s in states]),
                        self.lmm.stack_states([s.memory for s in states]))

    def forward(self, x: torch.Tensor, state: MAGState | None = None, *, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        self.check_input(x)
        if mask is not None or cu_seqlens is not None:
            return self.forward_split(x, state, mask, cu_seqlens)
        self.check_state(state, x)
        attention_state, memory_state = (None, None) if state is None else state
        y, attention_state = self.attn(x, attention_state)  # (B, T, D)
        z, memory_state = self.lmm(x, memory_state)  # (B, T, D)
        return self.gate(y, z), MAGState(attention_state, memory_state)


class MALState(NamedTuple):
    """State of :class:`TitansMAL`: the memory state and the sliding-window KV cache."""

    memory: TitansState
    attention: AttentionState


class TitansMAL(Mixer):
    """Titans, memory as a layer (v1 Sec. 4.3, eqs. 29–31; docs/titans.md#mal-memory-as-a-layer).

    ``forward(x (B, T, D), state: MALState | None = None) -> (o (B, T, D), MALState)``.

    u = TitansMemory(x); o = u + SWA(RMSNorm(x + u)): two residual sub-layers in one mixer, the attention a causal
    sliding window of ``window`` tokens with persistent tokens always visible.
    """

    takes_mask, takes_cu_seqlens, State = True, True, MALState

    def __init__(self, dim: int, heads: int = 4, window: int = 2048, persistent_tokens: int = 128,
                 memory: dict | None = None):
        super().__init__()
        _check_positive("TitansMAL", "window", window, 1)
        _check_positive("TitansMAL", "persistent_tokens", persistent_tokens, 0)
        self.dim = dim
        self.lmm = _build_memory("TitansMAL", dim, heads, memory)
        self.norm = RMSNorm(dim)
        self.attn = Attention(dim, heads, window=window, persistent_tokens=persistent_tokens)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.lmm.reset_parameters()
        self.norm.reset_parameters()
        self.attn.reset_parameters()

    def state_shapes(self) -> dict:
        return {"memory": self.lmm, "attention": self.attn}

    def stack_states(self, states: list[MALState]) -> MALState:
        return MALState(self.lmm.stack_states([s.memory for s in states]),
                        self.attn.stack_states([s.attention for s in states]))

    def forward(self, x: torch.Tensor, state: MALState | None = None, *, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        self.check_input(x)
        if mask is not None or cu_seqlens is not None:
            return self.forward_split(x, state, mask, cu_seqlens)
        self.check_state(state, x)
        memory_state, attention_state = (None, None) if state is None else state
        u, memory_state = self.lmm(x, memory_state)  # (B, T, D)
        a, attention_state = self.attn(self.norm(x + u), attention_state)  # (B, T, D)
        return u + a, MALState(memory_state, attention_state)


def filled_counts(state: MACState) -> torch.Tensor:
    """(B,) long: each row's number of positions in its current segment."""
    if state.filled_rows is not None:
        return state.filled_rows
    B, p = state.token_k.shape[:2]
    return torch.full((B,), p, dtype=torch.long, device=state.token_k.device)


__all__ = ["TitansMAC", "TitansMAG", "TitansMAL", "MACState", "MAGState", "MALState"]
