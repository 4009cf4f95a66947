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
from zoo.layers.conv import ShortConv
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


_OUT_PROJ_STD = 0.02  # init std of the output projection after the gate: the residual stream's scale (model.init_std)


def _output_projection(dim: int, enabled: bool) -> nn.Linear | None:
    """The linear layer after a hybrid's gate (v1 Sec. 4.2: "normalization and gating with a linear layer before the
    final output projection"), or None when disabled."""
    return nn.Linear(dim, dim, bias=False) if enabled else None


def _reset_output_projection(linear: nn.Linear | None) -> None:
    if linear is not None:
        nn.init.normal_(linear.weight, std=_OUT_PROJ_STD)


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

STORE_INPUTS = ("residual", "attention_norm", "attention")  # what TitansMAC's memory stores (docs/titans.md#mac-memory-as-context)


class MACState(NamedTuple):
    """State of :class:`TitansMAC`, batch-first.

    memory: TitansState of the memory on the store stream (v1 eq. 24), None before the first token.
    read_weights: L tensors (B, H, in, out): the memory weights at the start of the current segment (Φ_{s−1}).
    read_conv: (B, conv_size − 1, H·d): conv cache of the read path's q projection on the x stream.
    memory_k, memory_v, token_k, token_v: (B, p, H_a, d_a): attention keys/values of the h and x positions of the
        current partial segment (p read from the shape; emptied when a segment completes).
    shift: (B, conv_size − 1, D): the last inputs of the token-shift conv ((B, 0, D) without one).
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
    shift: torch.Tensor
    filled_rows: torch.Tensor | None = None


class TitansMAC(Mixer):
    """Titans, memory as context (v1 Sec. 4.1, eqs. 21–25; docs/titans.md#mac-memory-as-context).

    ``forward(x (B, T, D), state: MACState | None = None) -> (o (B, T, D), MACState)``.

    x is first token-shifted, x ← x + conv(x) (``conv_size`` taps, causal; 0 = none), then cut into segments of
    C = ``segment_len`` tokens (aligned to the sequence start). For segment s with memory state Φ_{s−1}:
    1. h_j = read(x_j; Φ_{s−1}): the memory's q path on x, read with the segment-start weights, no update (eq. 21),
       RMS-normalised when ``memory_token_norm`` so the memory tokens join attention at the tokens' scale;
    2. y = Attention(queries x_j; keys/values [P ; h_{≤j} ; x_{≤j}]): persistent tokens P always visible, h_j and x_j
       share RoPE position j, causal inside the segment, never across segments (eq. 22);
    3. z_j = M(u_j), the memory run causally on the store stream u (store u, read token j after storing u_{≤j};
       eq. 24): u = RMSNorm(x + y) for ``store="residual"``, RMSNorm(y) for ``"attention_norm"``, y for
       ``"attention"``;
    4. o_j = W_out(RMSNorm(y_j) ⊙ sigmoid(RMSNorm(z_j))) (eq. 25), W_out (small init) when ``out_proj``.
    Both causality traps (docs/titans.md#causality-traps) are avoided: h is masked causally and z_j never sees y_{>j}.
    ``segment_len`` must be a multiple of the memory's ``chunk_size``, so segment ends are chunk boundaries.

    The paper's choices: segments, the read h with the segment-start weights, the [P ; h ; x] context, storing the
    attention output and the gate of y by M(y). Gaps the paper leaves open, filled by zoo (docs/titans.md#hybrid-choices):
    the scale of the stored stream and of h (the paper normalises neither explicitly), storing the residual stream
    x + y rather than y alone (the paper's y_t is the attention layer's output, which in a residual block carries x),
    the linear layer after the gate and its init, and the token-shift conv (the paper's convs sit in the memory's
    q, k, v only). ``store="attention"``, ``memory_token_norm=False``, ``out_proj=False``, ``conv_size=0`` is the
    module before these fixes (checkpoints saved by it load with those values).
    """

    takes_mask, takes_cu_seqlens, State = True, True, MACState

    def __init__(self, dim: int, heads: int = 4, segment_len: int = 512, persistent_tokens: int = 128,
                 memory: dict | None = None, store: str = "residual", memory_token_norm: bool = True,
                 out_proj: bool = True, conv_size: int = 4):
        super().__init__()
        _check_positive("TitansMAC", "segment_len", segment_len, 1)
        _check_positive("TitansMAC", "persistent_tokens", persistent_tokens, 0)
        _check_positive("TitansMAC", "conv_size", conv_size, 0)
        if store not in STORE_INPUTS:
            raise ValueError(f"TitansMAC: store must be one of {', '.join(STORE_INPUTS)}, got {store!r}")
        self.lmm = _build_memory("TitansMAC", dim, heads, memory)
        if segment_len % self.lmm.chunk_size:
            raise ValueError(f"TitansMAC: segment_len ({segment_len}) must be a multiple of the memory's chunk_size "
                             f"({self.lmm.chunk_size}) so that segment ends are chunk boundaries")
        self.dim, self.heads, self.segment_len = dim, heads, segment_len
        self.store, self.conv_size = store, conv_size
        self.shift = ShortConv(dim, conv_size) if conv_size else None
        self.attn = Attention(dim, heads, rope=True, persistent_tokens=persistent_tokens)
        self.memory_token_norm = RMSNorm(dim) if memory_token_norm else None
        self.store_norm = None if store == "attention" else RMSNorm(dim)
        self.gate = _Gate(dim)
        self.out_proj = _output_projection(dim, out_proj)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.lmm.reset_parameters()
        self.attn.reset_parameters()
        self.gate.reset_parameters()
        for part in (self.shift, self.memory_token_norm, self.store_norm):
            if part is not None:
                part.reset_parameters()
        _reset_output_projection(self.out_proj)

    def _fresh_state(self, x: torch.Tensor) -> MACState:
        B = x.shape[0]
        empty = x.new_zeros(B, 0, self.attn.heads, self.attn.head_dim)
        shift = x.new_zeros(B, max(self.conv_size - 1, 0), self.dim)
        return MACState(None, self.lmm.initial_weights(B), None, empty, empty, empty, empty, shift)

    def state_shapes(self) -> dict:
        cache = (None, self.attn.heads, self.attn.head_dim)  # (p, H_a, d_a)
        return {"memory": self.lmm, "read_weights": [tuple(w.shape) for w in self.lmm.memory_weights],
                "memory_k": cache, "memory_v": cache, "token_k": cache, "token_v": cache,
                "shift": (max(self.conv_size - 1, 0), self.dim)}

    def stack_states(self, states: list[MACState]) -> MACState:
        """The rows of ``states`` in one state; rows at different places of the segment grid keep their own
        position in ``filled_rows``."""
        counts = torch.cat([filled_counts(state) for state in states])                 # (B,)
        width = max(state.token_k.shape[1] for state in states)
        caches = [[left_pad_time(tensor, width) for tensor in state[3:7]] for state in states]
        memories = [state.memory for state in states]
        memory = None if all(m is None for m in memories) else self.lmm.stack_states(memories)
        rest = cat_rows("TitansMAC", [(state.read_weights, state.read_conv) for state in states])
        shift = cat_rows("TitansMAC", [state.shift for state in states])
        stacked = MACState(memory, *rest, *(torch.cat(column) for column in zip(*caches)), shift)
        return stacked if bool((counts == width).all()) else stacked._replace(filled_rows=counts)

    def _forward_apart(self, x: torch.Tensor, state: MACState):
        """Rows at different places of the segment grid: each group of rows with one position runs alone."""
        width = state.token_k.shape[1]
        groups = []
        for count, rows in row_groups(state.filled_rows.tolist()).items():
            part = select_rows(state, rows)
            caches = (tensor[:, width - count:] for tensor in part[3:7])
            groups.append((rows, 0, MACState(part.memory, part.read_weights, part.read_conv, *caches, part.shift)))
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
        if self.shift is not None and T:
            shifted, shift = self.shift(x, state.shift)  # (B, T, D), (B, conv_size − 1, D)
            x = x + shifted  # (B, T, D)
            state = state._replace(shift=shift)
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
        if self.memory_token_norm is not None:
            h = self.memory_token_norm(h)
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
        stored = y if self.store == "attention" else self.store_norm(x + y if self.store == "residual" else y)
        z, memory = self.lmm(stored, state.memory)  # (B, n, D): store u, read each token after its own update
        out = self.gate(y, z)
        if self.out_proj is not None:
            out = self.out_proj(out)
        if filled + n == self.segment_len:  # segment complete: its end is a chunk boundary, so memory.weights = Φ_s
            empty = memory_k[:, :0]
            state = MACState(memory, memory.weights, read_conv, empty, empty, empty, empty, state.shift)
        else:
            state = MACState(memory, state.read_weights, read_conv, memory_k, memory_v, token_k, token_v, state.shift)
        return out, state


# ---------------------------------------------------------------------------------------------------------------------
# MAG and MAL
# ---------------------------------------------------------------------------------------------------------------------

def _absorb_persistent(lmm: TitansMemory, attn: Attention, x: torch.Tensor) -> TitansState:
    """The memory state after absorbing the persistent tokens P (N_p, D) as a prefix of every sequence (v1 eqs. 26
    and 29: x̃ = [P ; x] is the memory's input too); their reads are dropped."""
    prefix = attn.persistent.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, N_p, D)
    return lmm(prefix, None)[1]


class MAGState(NamedTuple):
    """State of :class:`TitansMAG`: the sliding-window KV cache and the memory state."""

    attention: AttentionState
    memory: TitansState


class TitansMAG(Mixer):
    """Titans, memory as a gate (v1 Sec. 4.2, eqs. 26–28; docs/titans.md#mag-memory-as-a-gate).

    ``forward(x (B, T, D), state: MAGState | None = None) -> (o (B, T, D), MAGState)``.

    y = SWA(x) (causal sliding window of ``window`` tokens, self included, persistent tokens P always visible, a
    residual token-shift conv of ``conv_size`` taps on its input, 0 = none); z = TitansMemory([P ; x]) read at x's
    positions (``memory_persistent``: the memory absorbs P before the first token, as v1 eq. 26 prepends P to its
    input; false: it starts from M_0); o = W_out(RMSNorm(y) ⊙ sigmoid(RMSNorm(z))), W_out a small-init linear layer
    when ``out_proj`` (v1 Sec. 4.2 puts a linear layer after the gate). No segmenting.

    The paper's: the window, P in both branches, the normalised gate. zoo's, filling gaps (docs/titans.md#hybrid-choices):
    sigmoid as the gate's non-linearity, W_out's init, the token-shift conv. ``out_proj=False``, ``conv_size=0``,
    ``memory_persistent=False`` is the module before these fixes (checkpoints saved by it load with those values).
    """

    takes_mask, takes_cu_seqlens, State = True, True, MAGState

    def __init__(self, dim: int, heads: int = 4, window: int = 2048, persistent_tokens: int = 128,
                 memory: dict | None = None, out_proj: bool = True, conv_size: int = 4,
                 memory_persistent: bool = True):
        super().__init__()
        _check_positive("TitansMAG", "window", window, 1)
        _check_positive("TitansMAG", "persistent_tokens", persistent_tokens, 0)
        _check_positive("TitansMAG", "conv_size", conv_size, 0)
        self.dim = dim
        self.memory_persistent = memory_persistent and persistent_tokens > 0
        self.attn = Attention(dim, heads, window=window, persistent_tokens=persistent_tokens, conv_size=conv_size)
        self.lmm = _build_memory("TitansMAG", dim, heads, memory)
        self.gate = _Gate(dim)
        self.out_proj = _output_projection(dim, out_proj)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.attn.reset_parameters()
        self.lmm.reset_parameters()
        self.gate.reset_parameters()
        _reset_output_projection(self.out_proj)

    def state_shapes(self) -> dict:
        return {"attention": self.attn, "memory": self.lmm}

    def forward(self, x: torch.Tensor, state: MAGState | None = None, *, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        self.check_input(x)
        if mask is not None or cu_seqlens is not None:
            return self.forward_split(x, state, mask, cu_seqlens)
        self.check_state(state, x)
        attention_state, memory_state = (None, None) if state is None else state
        if memory_state is None and self.memory_persistent:
            memory_state = _absorb_persistent(self.lmm, self.attn, x)
        y, attention_state = self.attn(x, attention_state)  # (B, T, D)
        z, memory_state = self.lmm(x, memory_state)  # (B, T, D)
        out = self.gate(y, z)
        if self.out_proj is not None:
            out = self.out_proj(out)
        return out, MAGState(attention_state, memory_state)


class MALState(NamedTuple):
    """State of :class:`TitansMAL`: the memory state and the sliding-window KV cache."""

    memory: TitansState
    attention: AttentionState


class TitansMAL(Mixer):
    """Titans, memory as a layer (v1 Sec. 4.3, eqs. 29–31; docs/titans.md#mal-memory-as-a-layer).

    ``forward(x (B, T, D), state: MALState | None = None) -> (o (B, T, D), MALState)``.

    u = TitansMemory([P ; x]) read at x's positions (``memory_persistent`` as in :class:`TitansMAG`, v1 eq. 29);
    o = u + SWA(RMSNorm(x + u)): two residual sub-layers in one mixer, the attention a causal sliding window of
    ``window`` tokens with P always visible and a residual token-shift conv of ``conv_size`` taps on its input
    (0 = none; zoo's, the paper has none). ``conv_size=0``, ``memory_persistent=False`` is the module before these
    fixes (checkpoints saved by it load with those values).
    """

    takes_mask, takes_cu_seqlens, State = True, True, MALState

    def __init__(self, dim: int, heads: int = 4, window: int = 2048, persistent_tokens: int = 128,
                 memory: dict | None = None, conv_size: int = 4, memory_persistent: bool = True):
        super().__init__()
        _check_positive("TitansMAL", "window", window, 1)
        _check_positive("TitansMAL", "persistent_tokens", persistent_tokens, 0)
        _check_positive("TitansMAL", "conv_size", conv_size, 0)
        self.dim = dim
        self.memory_persistent = memory_persistent and persistent_tokens > 0
        self.lmm = _build_memory("TitansMAL", dim, heads, memory)
        self.norm = RMSNorm(dim)
        self.attn = Attention(dim, heads, window=window, persistent_tokens=persistent_tokens, conv_size=conv_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.lmm.reset_parameters()
        self.norm.reset_parameters()
        self.attn.reset_parameters()

    def state_shapes(self) -> dict:
        return {"memory": self.lmm, "attention": self.attn}

    def forward(self, x: torch.Tensor, state: MALState | None = None, *, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        self.check_input(x)
        if mask is not None or cu_seqlens is not None:
            return self.forward_split(x, state, mask, cu_seqlens)
        self.check_state(state, x)
        memory_state, attention_state = (None, None) if state is None else state
        if memory_state is None and self.memory_persistent:
            memory_state = _absorb_persistent(self.lmm, self.attn, x)
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
