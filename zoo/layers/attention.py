"""Multi-head attention mixer: causal or bidirectional, grouped KV heads, sliding window, persistent tokens, KV cache."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from zoo.layers.base import Mixer
from zoo.layers.conv import ShortConv
from zoo.layers.rotary import RotaryEmbedding


def nan_safe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                       is_causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of q (B, H, T, d) over k, v (B, H, S, d) with ``mask`` (B, 1 or H, T, S)
    bool or None, where a non-finite key or value reaches only the queries that may see it.

    SDPA still multiplies a masked key's score and value by 0 (0 · NaN = NaN), so one NaN token would reach every
    query: non-finite keys and values enter as 0 and the queries that see one get NaN.
    """
    finite = torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)                    # (B, H, S)
    k, v = k.masked_fill(~finite[..., None], 0.0), v.masked_fill(~finite[..., None], 0.0)
    if mask is not None:
        reached = (mask & ~finite.unsqueeze(-2)).any(-1)                              # (B, H, T)
    elif is_causal:
        reached = (~finite).cumsum(-1) > 0                                            # (B, H, T), T == S
    else:
        reached = (~finite).any(-1, keepdim=True).expand(*q.shape[:3])                # (B, H, T)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, H, T, d)
    return out.masked_fill(reached[..., None], float("nan"))


class AttentionState(NamedTuple):
    """KV cache of a causal ``Attention``: rotated keys, values and their absolute positions.

    k, v: (B, t, H_kv, d); positions: (B, t) long. With a sliding window only the last ``window`` tokens are kept.
    Rows of a left-padded batch (or packed documents) hold caches of different lengths: the shorter ones are padded on
    the left with keys at position -1, which no query sees.
    conv: (B, conv_size-1, D), the input short conv's state, or None without one.
    """

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    conv: torch.Tensor | None = None


def stack_kv_caches(states: list[AttentionState]) -> AttentionState:
    """One ``AttentionState`` of the rows of ``states``: shorter caches left-padded with keys at position -1, which
    no query sees."""
    length = max(state.k.shape[1] for state in states)

    def pad(tensor: torch.Tensor, value: float) -> torch.Tensor:
        missing = length - tensor.shape[1]
        if not missing:
            return tensor
        return torch.cat([tensor.new_full((tensor.shape[0], missing, *tensor.shape[2:]), value), tensor], dim=1)

    k = torch.cat([pad(state.k, 0.0) for state in states])                           # (B, t, H_kv, d)
    v = torch.cat([pad(state.v, 0.0) for state in states])
    positions = torch.cat([pad(state.positions, -1) for state in states])            # (B, t)
    convs = [state.conv for state in states]
    return AttentionState(k, v, positions, None if convs[0] is None else torch.cat(convs))


class Attention(Mixer):
    """Softmax attention (Vaswani et al. 2017) with RoPE, GQA, sliding window and persistent memory tokens.

    ``forward(x (B, T, D), state=None, mask=None) -> (y (B, T, D), state)``.

    - causal (default): query t sees keys at positions t - window < s <= t (all s <= t without a window); the
      returned ``AttentionState`` is the KV cache, so streaming and token-by-token decoding equal one call.
    - ``causal=False``: bidirectional; ``mask (B, T)`` marks real tokens (True) so padding never changes real
      outputs; the state is None.
    - causal with ``mask`` (left padding): pads are invisible keys and each row's positions count from its first
      real token, so every row equals that row run alone; ``cu_seqlens`` packs documents (no key crosses a boundary).
    - ``rope=False`` drops rotary embeddings (the Mamba-2-Hybrid's attention layers use no positions).
    - ``conv_size = w > 0`` adds a residual depthwise causal conv on the input, ``x + conv(x)``, before the
      projections (token shift, as the short convs of Mamba/GatedDeltaNet); it hands each token its neighbours, which
      shortens the plateau on recall tasks. Its state rides in the KV cache.
    - ``persistent_tokens = N_p``: learned tokens P (N_p, D) whose keys P W_K and values P W_V (no RoPE) every query
      sees, whatever the mask or window (Titans v1 eq. 19).
    """

    has_causal_option, takes_mask, takes_cu_seqlens, State = True, True, True, AttentionState

    def __init__(self, dim: int, heads: int = 4, kv_heads: int | None = None, head_dim: int | None = None,
                 window: int | None = None, persistent_tokens: int = 0, causal: bool = True,
                 rope: bool = True, rope_base: float = 10000.0, conv_size: int = 0):
        super().__init__()
        kv_heads = kv_heads or heads
        head_dim = head_dim or dim // heads
        if heads % kv_heads:
            raise ValueError(f"Attention: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        if window is not None and window < 1:
            raise ValueError(f"Attention: window must be >= 1 or None, got {window}")
        if window is not None and not causal:
            raise ValueError("Attention: a sliding window needs causal=True")
        if conv_size and not causal:
            raise ValueError("Attention: conv_size needs causal=True (the conv looks only backwards)")
        if persistent_tokens < 0:
            raise ValueError(f"Attention: persistent_tokens must be >= 0, got {persistent_tokens}")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.window, self.causal, self.persistent_tokens = window, causal, persistent_tokens
        self.w_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.w_k = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.w_v = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.w_o = nn.Linear(heads * head_dim, dim, bias=False)
        self.rotary = RotaryEmbedding(head_dim, rope_base) if rope else None
        self.persistent = nn.Parameter(torch.empty(persistent_tokens, dim)) if persistent_tokens else None
        self.conv = ShortConv(dim, conv_size) if conv_size else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.w_q, self.w_k, self.w_v, self.w_o):
            nn.init.normal_(linear.weight, std=0.02)
        if self.rotary is not None:
            self.rotary.reset_parameters()
        if self.persistent is not None:
            nn.init.normal_(self.persistent, std=0.02)
        if self.conv is not None:
            self.conv.reset_parameters()

    # ------------------------------------------------------------------------------------------------ pieces
    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """Rotated queries and keys and the values of ``x`` at ``positions`` (B, T)."""
        q = rearrange(self.w_q(x), "b t (h d) -> b t h d", d=self.head_dim)      # (B, T, H, d)
        k = rearrange(self.w_k(x), "b t (h d) -> b t h d", d=self.head_dim)      # (B, T, H_kv, d)
        v = rearrange(self.w_v(x), "b t (h d) -> b t h d", d=self.head_dim)      # (B, T, H_kv, d)
        if self.rotary is None:
            return q, k, v
        return self.rotary(q, positions), self.rotary(k, positions), v

    def persistent_kv(self, batch: int, dtype: torch.dtype):
        """Keys and values of the persistent tokens, (B, N_p, H_kv, d) each; None without them."""
        if self.persistent is None:
            return None
        p = self.persistent.to(dtype)
        k = rearrange(self.w_k(p), "n (h d) -> n h d", d=self.head_dim)           # (N_p, H_kv, d)
        v = rearrange(self.w_v(p), "n (h d) -> n h d", d=self.head_dim)
        return (repeat(k, "n h d -> b n h d", b=batch), repeat(v, "n h d -> b n h d", b=batch))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
               is_causal: bool = False) -> torch.Tensor:
        """Softmax attention of q (B, T, H, d) over k, v (B, S, H_kv, d); ``allowed`` (B, T, S) bool or None.

        ``is_causal`` (no persistent tokens, T == S, no ``allowed``) takes SDPA's causal fast path.

        Returns (B, T, H*d) before the output projection. Persistent keys are prepended here when present.
        """
        batch, T = q.shape[0], q.shape[1]
        persistent = self.persistent_kv(batch, k.dtype)
        if persistent is not None:
            k = torch.cat([persistent[0], k], dim=1)                                  # (B, N_p + S, H_kv, d)
            v = torch.cat([persistent[1], v], dim=1)
            if allowed is not None:
                always = allowed.new_ones(batch, T, self.persistent_tokens)
                allowed = torch.cat([always, allowed], dim=-1)                        # (B, T, N_p + S)
        group = self.heads // self.kv_heads
        k = repeat(k, "b s h d -> b (h g) s d", g=group)                               # (B, H, S, d)
        v = repeat(v, "b s h d -> b (h g) s d", g=group)
        q = rearrange(q, "b t h d -> b h t d")                                         # (B, H, T, d)
        mask = None if allowed is None else allowed.unsqueeze(1)                       # (B, 1, T, S)
        out = nan_safe_attention(q, k, v, mask, is_causal)                        # (B, H, T, d)
        return rearrange(out, "b h t d -> b t (h d)")

    def causal_allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(B, T, S) bool: key s is visible to query t (causal, within the window; pads at position -1 never)."""
        diff = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)                               # (B, T, S)
        allowed = (diff >= 0) & (k_pos >= 0).unsqueeze(-2)
        if self.window is not None:
            allowed = allowed & (diff < self.window)
        return allowed

    # ------------------------------------------------------------------------------------------------ forward
    def state_shapes(self) -> dict:
        cache = (None, self.kv_heads, self.head_dim)  # (t, H_kv, d)
        conv = {} if self.conv is None else {"conv": (self.conv.size - 1, self.dim)}
        return {"k": cache, "v": cache, "positions": (None,), **conv}

    def stack_states(self, states: list[AttentionState]) -> AttentionState:
        return stack_kv_caches(states)

    def forward(self, x: torch.Tensor, state: AttentionState | None = None, *, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        self.check_input(x)
        if not self.causal:
            if cu_seqlens is not None:
                raise ValueError("Attention: cu_seqlens needs causal=True; bidirectional attention takes padded "
                                 "rows with mask= instead")
            self.check_state(state, x)
            return self._forward_bidirectional(x, mask), None
        if mask is not None or cu_seqlens is not None:
            return self.forward_split(x, state, mask, cu_seqlens)
        self.check_state(state, x)
        B, T, _ = x.shape
        conv_state = None
        if self.conv is not None:
            shifted, conv_state = self.conv(x, None if state is None else state.conv)
            x = x + shifted                                                           # (B, T, D)
        steps = torch.arange(T, device=x.device).expand(B, T)                         # (B, T)
        if state is None:
            q_pos = steps
        else:
            q_pos = state.positions[:, -1:] + 1 + steps if state.positions.shape[1] else steps
        q, k, v = self.project(x, q_pos)
        if state is not None:
            k_all = torch.cat([state.k.to(k.dtype), k], dim=1)                        # (B, t + T, H_kv, d)
            v_all = torch.cat([state.v.to(v.dtype), v], dim=1)
            k_pos = torch.cat([state.positions, q_pos], dim=1)                        # (B, t + T)
        else:
            k_all, v_all, k_pos = k, v, q_pos
        if state is None and self.window is None and self.persistent is None:
            out = self.attend(q, k_all, v_all, None, is_causal=True)
        else:
            out = self.attend(q, k_all, v_all, self.causal_allowed(q_pos, k_pos))
        keep = k_all.shape[1] if self.window is None else min(self.window, k_all.shape[1])
        new_state = AttentionState(k_all[:, -keep:], v_all[:, -keep:], k_pos[:, -keep:], conv_state)
        return self.w_o(out), new_state

    def _forward_bidirectional(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device).expand(B, T)
        q, k, v = self.project(x, positions)
        allowed = None
        if mask is not None:
            if mask.shape != (B, T):
                raise ValueError(f"Attention: mask has shape {tuple(mask.shape)}, expected {(B, T)}")
            allowed = mask.bool().unsqueeze(1).expand(B, T, T)                       # keys that are real
            allowed = allowed | ~mask.bool().unsqueeze(-1)   # padded queries see everything: no all-False rows
        return self.w_o(self.attend(q, k, v, allowed))
